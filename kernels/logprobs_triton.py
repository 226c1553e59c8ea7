"""Triton row kernels for `token_logprobs`: one program per row, one pass over the vocabulary.

The math (log-softmax at the target, and its gradient) is in `logprobs.py`; this file
is the GPU side of the same two row operations, matched against the reference there.

Forward, online logsumexp (Milakov & Gimelshein 2018, arXiv:1805.02867). The row is read in
blocks x_b of BLOCK_V logits, accumulating in float32 a running maximum m and a sum s of
exp(x - m) rescaled whenever the maximum grows:

    m_b = max(m_{b-1}, max(x_b))
    s_b = s_{b-1} * exp(m_{b-1} - m_b) + sum(exp(x_b - m_b))
    lse = m_B + log(s_B)

so each logit is read once and exp'd once; the target's logit is one more scalar load, and
logp = x[t] - lse and lse are written (lse is kept for the backward). Ignored rows run no
loop and write zeros. Backward: one program per row again reads each logit once, forms
g * s * (onehot(t) - exp(s*x - lse)) and writes it in the logits' dtype (ignored rows write
zeros without reading); the output may alias the logits (the fused lm_head does so).

Bytes moved and the floor (b bytes per logit: 2 for bf16/fp16, 4 for fp32):
    forward   N*V*b read  + 8N written            -> floor N*V*b / bandwidth
    backward  N*V*b read  + N*V*b written + 12N   -> floor 2*N*V*b / bandwidth
For N = 16384, V = 128256, bf16 that is 4.2 GB and 8.4 GB: about 1.3 ms and 2.5 ms at
3.35 TB/s (H100 SXM datasheet; benchmarks/logprob.py measures the copy bandwidth instead).
Arithmetic is a few flops and one exp per logit, far below the compute ceiling, so both
kernels are bandwidth-bound. Eager PyTorch (log_softmax in float32 + gather) moves at least
three times as many bytes and keeps an N*V*4-byte float32 tensor for the backward.

Launch settings (BLOCK_V, num_warps): on CUDA the first launch of each kernel for a
(vocabulary, dtype, device) times every candidate below on TUNE_ROWS rows of random logits of
that shape (triton.testing.do_bench, median) and keeps the fastest for the process; each row
is one program, so the time per row, not the row count, decides. Under the interpreter, or
with block_v given, the fixed first guess is used (default_block_v, _num_warps).
"""

import os

import torch
import triton
import triton.language as tl

from .logprobs import RowKernels

MAX_BLOCK_V = 4096
CANDIDATES = ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))  # (BLOCK_V, num_warps)
TUNE_ROWS = 512
_tuned: dict[tuple, tuple[int, int]] = {}  # (kernel, vocab_size, dtype, device name) -> (BLOCK_V, num_warps)


def default_block_v(vocab_size: int) -> int:
    return min(MAX_BLOCK_V, triton.next_power_of_2(vocab_size))


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def launch_settings(kernel: str, logits: torch.Tensor, block_v: int | None = None) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for `kernel` ("forward" or "backward") on these logits (R, V)."""
    vocab_size = logits.shape[1]
    if block_v is not None or not _tunable(logits):  # given, the interpreter, a graph capture: the first guess
        block_v = block_v or default_block_v(vocab_size)
        return block_v, _num_warps(block_v)
    key = (kernel, vocab_size, logits.dtype, torch.cuda.get_device_name(logits.device))
    if key not in _tuned:
        _tuned[key] = _autotune(kernel, vocab_size, logits.dtype, logits.device)
    return _tuned[key]


def _tunable(logits: torch.Tensor) -> bool:
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return logits.is_cuda and not interpreted and not torch.cuda.is_current_stream_capturing()


def candidates(vocab_size: int) -> list[tuple[int, int]]:
    """CANDIDATES whose block is not wider than the row needs (the first guess always among them)."""
    widest = triton.next_power_of_2(vocab_size)
    kept = [(b, w) for b, w in CANDIDATES if b <= widest]
    first_guess = (default_block_v(vocab_size), _num_warps(default_block_v(vocab_size)))
    return kept if first_guess in kept else [first_guess, *kept]


def _autotune(kernel: str, vocab_size: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """The fastest candidate on random rows (never zeros: they can run faster than real data)."""
    from triton.testing import do_bench

    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(TUNE_ROWS, vocab_size, generator=gen, device=device) * 4).to(dtype)  # (R, V)
    targets = torch.randint(0, vocab_size, (TUNE_ROWS,), generator=gen, device=device)  # (R,)
    logp, lse = torch.empty(TUNE_ROWS, device=device), torch.empty(TUNE_ROWS, device=device)  # (R,) each
    grad_logp, grad = torch.randn(TUNE_ROWS, generator=gen, device=device), torch.empty_like(logits)
    first_guess = default_block_v(vocab_size)
    _launch_forward(logits, targets, logp, lse, -100, 1.0, first_guess, _num_warps(first_guess))  # lse for backward

    def launch(block_v: int, num_warps: int) -> None:
        if kernel == "forward":
            _launch_forward(logits, targets, logp, lse, -100, 1.0, block_v, num_warps)
        else:
            _launch_backward(logits, targets, lse, grad_logp, grad, -100, 1.0, block_v, num_warps)

    times = {c: do_bench(lambda c=c: launch(*c), warmup=5, rep=20, return_mode="median") for c in candidates(vocab_size)}
    return min(times, key=times.get)


@triton.jit
def _token_logprobs_forward_kernel(
    logits_ptr, targets_ptr, logp_ptr, lse_ptr,
    stride_row, vocab_size, ignore_index, scale,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    m = float("-inf")  # running max of scale * logits, float32
    s = 0.0  # running sum of exp(x - m), float32
    n_blocks = tl.where(valid, tl.cdiv(vocab_size, BLOCK_V), 0)
    for b in range(0, n_blocks):
        offs = b * BLOCK_V + cols
        x = tl.load(row_ptr + offs, mask=offs < vocab_size, other=float("-inf")).to(tl.float32) * scale
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row of -inf so far: no NaN
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
        m = m_new
    s = tl.where(valid, s, 1.0)  # ignored rows ran no blocks
    lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(s)
    x_target = tl.load(row_ptr + target, mask=valid, other=0.0).to(tl.float32) * scale
    tl.store(logp_ptr + row, tl.where(valid, x_target - lse, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))


@triton.jit
def _token_logprobs_backward_kernel(
    logits_ptr, targets_ptr, lse_ptr, grad_logp_ptr, grad_logits_ptr,
    stride_logits_row, stride_grad_row, vocab_size, ignore_index, scale,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    lse = tl.load(lse_ptr + row)
    coef = tl.where(valid, tl.load(grad_logp_ptr + row) * scale, 0.0)  # g * s, 0 if ignored
    row_ptr = logits_ptr + row * stride_logits_row
    grad_row_ptr = grad_logits_ptr + row * stride_grad_row
    cols = tl.arange(0, BLOCK_V)
    read_limit = tl.where(valid, vocab_size, 0)  # ignored rows read nothing, write zeros
    for start in range(0, vocab_size, BLOCK_V):
        offs = start + cols
        in_row = offs < vocab_size
        x = tl.load(row_ptr + offs, mask=offs < read_limit, other=float("-inf")).to(tl.float32) * scale
        softmax = tl.exp(x - lse)
        grad = coef * (tl.where(offs == target, 1.0, 0.0) - softmax)
        tl.store(grad_row_ptr + offs, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


def forward_rows(logits, targets, logp_out, lse_out, ignore_index, scale, block_v=None):
    """Launch the forward kernel: logits (R, V) with unit column stride; outputs contiguous (R,)."""
    if logits.shape[0]:
        settings = launch_settings("forward", logits, block_v)
        _launch_forward(logits, targets, logp_out, lse_out, ignore_index, scale, *settings)


def backward_rows(logits, targets, lse, grad_logp, grad_logits_out, ignore_index, scale, block_v=None):
    """Launch the backward kernel; grad_logits_out (R, V) may be `logits` itself."""
    if logits.shape[0]:
        settings = launch_settings("backward", logits, block_v)
        _launch_backward(logits, targets, lse, grad_logp, grad_logits_out, ignore_index, scale, *settings)


def _launch_forward(logits, targets, logp_out, lse_out, ignore_index, scale, block_v, num_warps):
    n, vocab_size = logits.shape
    _token_logprobs_forward_kernel[(n,)](
        logits, targets.contiguous(), logp_out, lse_out,
        logits.stride(0), vocab_size, ignore_index, scale,
        BLOCK_V=block_v, num_warps=num_warps,
    )


def _launch_backward(logits, targets, lse, grad_logp, grad_logits_out, ignore_index, scale, block_v, num_warps):
    n, vocab_size = logits.shape
    _token_logprobs_backward_kernel[(n,)](
        logits, targets.contiguous(), lse, grad_logp, grad_logits_out,
        logits.stride(0), grad_logits_out.stride(0), vocab_size, ignore_index, scale,
        BLOCK_V=block_v, num_warps=num_warps,
    )


TRITON_ROWS = RowKernels(forward_rows, backward_rows)
