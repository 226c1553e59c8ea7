"""The log-probability of each response in a batch, without the full logits.

For a row with tokens x_1..x_T and labels that mark the response positions,

    log pi(y|x) = sum_{t : label_t != IGNORE} log softmax(W_head h_{t-1})[x_t]

where h_{t-1} is the final hidden state one position earlier. Only the response positions
are gathered, (M, D) with M the response tokens in the batch, and handed to the fused
kernel kernels.linear_token_logprobs with lm_head's weight, so neither the prompt, the
padding nor the (tokens, vocab) logits ever cost memory. Sums are float32 whatever the
model dtype. A packed row (minidpo.packing: pairs sharing their prompt, no padding) names
the hidden state that precedes each response token in its own sequence; the same (M, D)
are gathered from it. The head runs outside autocast: the kernel takes hidden and weight in the
weight's own dtype.

A LoRA adapter on lm_head (lora.LoRALinear, active) adds s B A dropout(h) to the logits.
The kernel takes it as one wider product, so the adapter is trained and the log-probs are
the adapted head's:

    W h + s B A dropout(h) = [W, B] [h ; s A dropout(h)]      [W, B]: (V, D + r)

A float64 model (a reference precision for exactness tests) is outside the kernel's dtypes:
it takes the plain log_softmax of the (M, V) logits and returns float64 sums.
"""

from __future__ import annotations

import torch

from minidpo.data import IGNORE_INDEX
from minidpo.kernels import linear_token_logprobs
from minidpo.lora import LoRALinear
from minidpo.packing import Packing


def head_operands(head: torch.nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (M, D'), weight (V, D')) whose product is `head`'s logits, an active adapter included."""
    weight = head.weight  # (V, D)
    h = h.to(weight.dtype)  # (M, D)
    if not isinstance(head, LoRALinear) or head.disabled or head.merged:
        return h, weight
    low_rank = head.scale * head.lora_A(head.dropout(h.to(head.lora_A.weight.dtype)))  # (M, r)
    return torch.cat([h, low_rank.to(h.dtype)], 1), torch.cat([weight, head.lora_B.weight.to(weight.dtype)], 1)


def sequence_logprobs(
    model, input_ids: torch.Tensor, labels: torch.Tensor | Packing
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-probs (N,) float32 (float64 for a float64 model), response token counts (N,) int64).

    `labels` (N, T) mark the responses of N right-padded rows; a packed row (input_ids (1, T))
    comes with its packing.Packing instead, which says what to score in it.
    """
    if isinstance(labels, Packing):
        N = labels.sequences
        mask = labels.attention_mask(model.config.sliding_window)
        hidden = model(input_ids, attention_mask=mask, position_ids=labels.position_ids)  # (1, T, D)
        h, targets, rows = hidden[0, labels.source], labels.targets, labels.sequence  # (M, D), (M,), (M,)
        counts = labels.lengths()  # (N,)
    else:
        N = input_ids.shape[0]
        hidden = model(input_ids)  # (N, T, D)
        shifted = labels[:, 1:]  # (N, T-1): position t predicts token t+1
        scored = shifted != IGNORE_INDEX  # (N, T-1)
        rows = torch.arange(N, device=input_ids.device)[:, None].expand_as(shifted)[scored]  # (M,)
        h, targets = hidden[:, :-1][scored], shifted[scored]  # (M, D), (M,)
        counts = scored.sum(dim=1)  # (N,)
    with torch.autocast(input_ids.device.type, enabled=False):
        h, weight = head_operands(model.lm_head, h)  # (M, D'), (V, D')
        if weight.dtype == torch.float64:
            token_logps = torch.log_softmax(h @ weight.T, -1).gather(1, targets[:, None])[:, 0]  # (M,)
        else:
            token_logps = linear_token_logprobs(h, weight, targets)  # (M,) float32
    logps = torch.zeros(N, dtype=token_logps.dtype, device=input_ids.device).index_add(0, rows, token_logps)  # (N,)
    return logps, counts


class SequenceLogprobs(torch.nn.Module):
    """`sequence_logprobs` of a causal LM as a module: (input_ids, labels) -> (logps, counts).

    DDP and FSDP2 wrap this module, so the head that runs after the model's forward is inside
    the wrapped forward too (FSDP2 gathers lm_head for it; DDP sees its parameters used).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sequence_logprobs(self.model, input_ids, labels)
