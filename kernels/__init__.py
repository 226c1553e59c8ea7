"""Triton kernels for minidpo, each beside the plain-PyTorch reference it must match.

logprobs.py          token_logprobs: log softmax(logits)[target] per row; the reference and dispatch
logprobs_triton.py   the Triton forward/backward row kernels (online logsumexp)
linear_logprobs.py   linear_token_logprobs: the lm_head fused with the above, chunked over tokens
nf4.py               dequantize_nf4: NF4 weights (minidpo/quant.py) back to dense; the reference and dispatch
nf4_triton.py        the Triton NF4 dequantization kernel
"""

from .linear_logprobs import linear_token_logprobs, linear_token_logprobs_reference
from .logprobs import token_logprobs, token_logprobs_reference

__all__ = [
    "linear_token_logprobs",
    "linear_token_logprobs_reference",
    "token_logprobs",
    "token_logprobs_reference",
]
