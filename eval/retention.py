"""Reference-answer NLL: how likely a model finds the correct answer to a question (teacher forcing).

For a legitimate row with prompt x and reference answer y, the sequence is exactly what
SFT trains on (chat.encode_prompt_response): the prompt rendered in the model's chat
format (with the system prompt, if any) and y followed by the format's end of turn. Its
per-token negative log-likelihood is

    nll(x, y) = -(1/|y|) sum_{t in y} log p(y_t | x, y_<t)

summed in float32 by minidpo.logprobs.sequence_logprobs (the forward runs in the model's
dtype: float32 on a CPU). Nothing is generated. Rows go `batch_size` at a time, longest
first, right-padded (a real token never attends to a later pad, so no mask is needed).

The retention score of a model (eval/scores.py: ratio_with_interval) divides its mean
NLL over a set's reference answers by the base model's over the same answers: 1.0 keeps
what the base model knew, above 1.0 the alignment made correct answers less likely.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from minidpo.chat import ChatFormat, encode_prompt_response
from minidpo.data import Example, collate
from minidpo.logprobs import sequence_logprobs


@torch.inference_mode()
def reference_nll(
    model,
    tokenizer,
    chat_format: ChatFormat,
    pairs: Sequence[tuple[str, str]],
    *,
    system: str | None = None,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[float]:
    """Per-token NLL of each (prompt, reference answer) pair, in order; `on_batch(rows)` after each batch."""
    examples = [Example(str(i), *encode_prompt_response(tokenizer, chat_format, prompt, answer, system))
                for i, (prompt, answer) in enumerate(pairs)]
    order = sorted(range(len(examples)), key=lambda i: -examples[i].length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = [0.0] * len(examples)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = collate([examples[i] for i in rows], pad_id, pairs=False).to(device)  # (B, T) ids and labels
            logps, counts = sequence_logprobs(model, batch.input_ids, batch.labels)  # (B,) float32, (B,)
            for i, value in zip(rows, (-logps / counts).tolist()):
                nll[i] = value
            if on_batch is not None:
                on_batch(len(rows))
    finally:
        model.train(was_training)
    return nll
