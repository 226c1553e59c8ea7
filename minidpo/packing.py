"""Shared-prompt, padding-free packing: a micro-batch of pairs as one row, no pad token.

Chosen and rejected share their prompt, so a pair need not run it twice. Pair i is laid out
as [prompt | chosen | rejected] with position ids that restart after the prompt,

    tokens     p0 p1 p2 | c0 c1 c2 c3 | r0 r1        positions  0 1 2 | 3 4 5 6 | 3 4

and an attention mask in which a token sees the earlier tokens of its own pair, except
that rejected tokens do not see the chosen ones:

    query \\ key   prompt   chosen   rejected
    prompt        causal     -         -
    chosen        all      causal      -
    rejected      all        -       causal

So every token sees exactly the keys, at exactly the positions, that it sees in the
unpacked (prompt + response, right-padded) forward of its own sequence. The pairs of a
micro-batch follow one another in one row (the mask is block-diagonal over pairs); an SFT
example packs as [prompt | response].

Log-probs: response token y_k is scored from the hidden state that precedes it in its own
sequence: the last prompt token for c0 and for r0 (one hidden state serves both), the
previous response token otherwise. `Packing` keeps those row indices (`source`), the
tokens (`targets`) and which output sequence each belongs to (`sequence`: chosen of pair
i -> i, rejected -> B + i, as data.collate orders its rows), so that
logprobs.sequence_logprobs gathers the same (M, D) hidden states as in the unpacked layout.
A packed Batch carries its Packing where an unpacked one carries its labels.

Exactness: RoPE depends on the position ids only, RMSNorm and the MLP on the token alone,
attention on the visible keys at their positions: the packed forward equals the unpacked
one up to float32 summation order (tests/test_packing.py: LoRA, the adapter-off reference,
SFT, odd lengths). With LoRA dropout in training each packed token draws one mask; the
prompt's is shared by chosen and rejected where the unpacked layout draws two (same
distribution, other draws).

The mask, built once per batch and device: on a CPU, and on CUDA without FlexAttention, a
boolean (1, 1, T, T) tensor for scaled_dot_product_attention, whose kernels compute all
T^2 scores, the masked ones too. On CUDA with torch.nn.attention.flex_attention a BlockMask
from the same rule, so that 128 x 128 blocks without a visible key are skipped (that path
is tested only where a GPU is; it has not been measured).
Cost: a row of B pairs has T = sum_i (P_i + C_i + R_i) tokens, against 2B (P + the longest
response) unpacked: one prompt per pair and no padding fewer tokens through every weight,
for a dense T^2 attention over the whole row on the CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from functools import cache

import torch

from minidpo.data import IGNORE_INDEX, Batch, Example

PROMPT, CHOSEN, REJECTED = 0, 1, 2


@dataclasses.dataclass
class Packing:
    """The layout of one packed row and what to score in it (see the module docstring)."""

    position_ids: torch.Tensor  # (1, T) positions in each token's own (unpacked) sequence
    example_ids: torch.Tensor  # (1, T) the example each token belongs to
    parts: torch.Tensor  # (1, T) PROMPT, CHOSEN or REJECTED
    source: torch.Tensor  # (M,) row index of the hidden state that predicts each response token
    targets: torch.Tensor  # (M,) the response tokens
    sequence: torch.Tensor  # (M,) their output sequence: chosen i -> i, rejected i -> B + i
    sequences: int  # N: 2B for pairs, B for SFT
    _masks: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def to(self, device: torch.device | str) -> Packing:
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "_masks"}
        return Packing(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})

    def lengths(self) -> torch.Tensor:
        """Response tokens of each output sequence, (N,) int64."""
        return torch.bincount(self.sequence, minlength=self.sequences)

    def attention_mask(self, sliding_window: int | None = None):
        """What the model's attention takes: a BlockMask on CUDA with FlexAttention, else a
        boolean (1, 1, T, T) tensor, True = may attend. Built once per sliding window."""
        if sliding_window not in self._masks:
            build = block_mask if flex_attention_available(self.parts.device) else dense_mask
            self._masks[sliding_window] = build(self, sliding_window)
        return self._masks[sliding_window]


def allowed(packing: Packing, q: torch.Tensor, k: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Whether row token q may attend to row token k (q, k: index tensors that broadcast)."""
    example, part, pos = packing.example_ids[0], packing.parts[0], packing.position_ids[0]
    ok = (example[q] == example[k]) & (k <= q) & ~((part[q] == REJECTED) & (part[k] == CHOSEN))
    if sliding_window is not None:
        ok = ok & (pos[q] - pos[k] < sliding_window)
    return ok


def dense_mask(packing: Packing, sliding_window: int | None) -> torch.Tensor:
    idx = torch.arange(packing.parts.shape[1], device=packing.parts.device)  # (T,)
    return allowed(packing, idx[:, None], idx[None, :], sliding_window)[None, None]  # (1, 1, T, T)


def block_mask(packing: Packing, sliding_window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    T = packing.parts.shape[1]
    return create_block_mask(lambda b, h, q, k: allowed(packing, q, k, sliding_window), 1, None, T, T,
                             device=packing.parts.device)  # fmt: skip


@cache
def flex_attention_available(device: torch.device) -> bool:
    """FlexAttention's fused kernels: a CUDA device and Triton."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def pack(examples: list[Example], *, pairs: bool = True) -> Batch:
    """One packed row of the examples (pairs, or SFT prompt + response): a Batch whose
    input_ids are (1, T) and whose labels are its Packing; keys as data.collate."""
    ids: list[int] = []
    positions: list[int] = []
    example_ids: list[int] = []
    parts: list[int] = []
    source: list[int] = []
    targets: list[int] = []
    sequence: list[int] = []
    B = len(examples)
    for i, e in enumerate(examples):
        start, P = len(ids), len(e.prompt_ids)
        ids += e.prompt_ids
        positions += range(P)
        parts += [PROMPT] * P
        responses = [(e.chosen_ids, CHOSEN, i)] + ([(e.rejected_ids, REJECTED, B + i)] if pairs else [])
        for tokens, part, out in responses:
            first = len(ids)
            ids += tokens
            positions += range(P, P + len(tokens))
            parts += [part] * len(tokens)
            for k, token in enumerate(tokens):
                before = P + k - 1  # the position that predicts this token, in its own sequence
                if before < 0:  # no prompt: the first token has no predictor (as in the unpacked layout)
                    continue
                source.append(start + before if before < P else first + before - P)
                targets.append(token)
                sequence.append(out)
        example_ids += [i] * (len(ids) - start)
    long = lambda values: torch.tensor(values, dtype=torch.long)
    packing = Packing(
        position_ids=long(positions)[None], example_ids=long(example_ids)[None], parts=long(parts)[None],
        source=long(source), targets=long(targets), sequence=long(sequence), sequences=2 * B if pairs else B,
    )
    return Batch(long(ids)[None], packing, [e.key for e in examples])


def response_lengths(labels: torch.Tensor | Packing) -> torch.Tensor:
    """Response tokens of each sequence of a batch, (N,) int64: from its labels (N, T), or its Packing."""
    if isinstance(labels, Packing):
        return labels.lengths()
    return (labels[:, 1:] != IGNORE_INDEX).sum(1)
