"""Preference data: triplet JSONL -> tokenized, truncated, padded training batches.

A line is `{"prompt": ..., "chosen": ..., "rejected": ...}` (optional `id`, `label`,
`compound`, `mode`, `source`). Each pair becomes token ids through the model's chat format
(chat.encode_prompt_response): the prompt ids are exactly what generation starts from and
each response is followed by the format's end of turn.

Truncation is by tokens (the reference code counted characters). A prompt longer than
`max_prompt_length` keeps the end of its user text (the question usually ends it), and the
chat template is rendered around that text again: BOS, the system prompt and the role
markers stay whole, so the training prompt is one the sampler could be given. Then each
response is cut so that prompt + response fits `max_length`.

A DPO batch of B pairs is one (2B, T) tensor, chosen rows first then rejected, so the
policy runs one forward for both (as eric-mitchell/direct-preference-optimization's
concatenated forward). Labels are the input ids with the prompt and the padding set to
IGNORE_INDEX, so only response tokens count. Padding is on the right: a real token never
attends to a later pad, so the model runs without an attention mask.

Batches are drawn in an order fixed by (seed, epoch), so a resumed run sees exactly the
batches it would have seen. With `group_by_length` the shuffled examples are cut into
mega-batches of 50 batches, each sorted by length, which cuts padding (as transformers'
LengthGroupedSampler).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from minidpo.chat import ChatFormat, encode_prompt_response
from minidpo.errors import MiniDPOError, ParameterError
from minidpo.io import read_jsonl_records

IGNORE_INDEX = -100
MEGABATCH_BATCHES = 50


@dataclass
class Example:
    """One tokenized line: a prompt with its chosen (and, for DPO, rejected) response."""

    key: str  # "<line>" or "<line>:<id>": unique in its file, names the line in messages
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int] | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids or ()))


@dataclass
class Dataset:
    path: Path
    examples: list[Example]
    skipped: int  # bad lines skipped (not --strict)
    truncated: int  # examples whose prompt or a response was cut


def truncate_prompt(tokenizer, chat_format: ChatFormat, prompt: str, system: str | None, max_prompt_length: int) -> list[int]:
    """The ids of the chat prompt whose user text is the longest end of `prompt` that fits `max_prompt_length`."""
    content = tokenizer.encode(prompt)
    keep = len(content)
    while keep > 0:
        text = tokenizer.decode(content[len(content) - keep :], skip_special_tokens=False)
        prompt_ids, _ = encode_prompt_response(tokenizer, chat_format, text, "", system)
        if len(prompt_ids) <= max_prompt_length:
            return prompt_ids
        keep -= len(prompt_ids) - max_prompt_length  # re-tokenizing at the cut may merge differently: loop
    template = len(encode_prompt_response(tokenizer, chat_format, "", "", system)[0])
    raise ParameterError(
        f"max_prompt_length ({max_prompt_length}) leaves no room for the user text: the chat template "
        f"{'and system prompt ' if system else ''}take {template} tokens", "max_prompt_length",
    )


def load_dataset(
    path: str | Path,
    tokenizer,
    chat_format: ChatFormat,
    *,
    max_length: int,
    max_prompt_length: int,
    pairs: bool = True,
    system: str | None = None,
    strict: bool = False,
    on_skip: Callable[[str], None] | None = None,
) -> Dataset:
    """Read and tokenize a triplet file; `pairs=False` (SFT) needs only prompt and chosen.

    A bad line raises MiniDPOError with its line number when `strict`, else it is skipped,
    passed to `on_skip(message)` and counted in `Dataset.skipped`.
    """
    if max_prompt_length < 1 or max_length <= max_prompt_length:
        raise ParameterError(
            f"max_length ({max_length}) must exceed max_prompt_length ({max_prompt_length}), which must be >= 1",
            "max_length", "max_prompt_length",
        )
    path = Path(path)
    required = {"prompt": str, "chosen": str} | ({"rejected": str} if pairs else {})
    skipped: list[str] = []

    def skip(message: str) -> None:
        skipped.append(message)
        if on_skip is not None:
            on_skip(message)

    records = read_jsonl_records(path, required, strict=strict, on_skip=skip, nonempty=tuple(required))
    if not records:
        where = skipped[0] if skipped else f"{path}: no lines"
        raise MiniDPOError(f"{where}; no line is usable (each needs {', '.join(required)} as non-empty strings)")
    examples, truncated = [], 0
    for lineno, record in records:
        key = f"{lineno}:{record['id']}" if record.get("id") is not None else str(lineno)
        prompt_ids, chosen_ids = encode_prompt_response(tokenizer, chat_format, record["prompt"], record["chosen"], system)
        responses = [chosen_ids]
        if pairs:
            responses.append(encode_prompt_response(tokenizer, chat_format, record["prompt"], record["rejected"], system)[1])
        cut = len(prompt_ids) > max_prompt_length
        if cut:
            prompt_ids = truncate_prompt(tokenizer, chat_format, record["prompt"], system, max_prompt_length)
        room = max_length - len(prompt_ids)
        cut = cut or any(len(r) > room for r in responses)
        truncated += cut
        responses = [r[:room] for r in responses]
        examples.append(Example(key, prompt_ids, responses[0], responses[1] if pairs else None))
    return Dataset(path, examples, len(skipped), truncated)


@dataclass
class Batch:
    """Right-padded sequences: input_ids and labels (N, T); DPO rows are chosen then rejected.
    (packing.pack makes the other kind: one packed row and its layout.)"""

    input_ids: torch.Tensor  # (N, T) int64
    labels: torch.Tensor  # (N, T) int64, IGNORE_INDEX on prompt and padding; packed: a packing.Packing
    keys: list[str]  # one per example (B for a DPO batch of N = 2B rows)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device), self.keys)


def collate(examples: list[Example], pad_id: int, *, pairs: bool = True) -> Batch:
    """Pad a list of examples into one Batch: 2B rows (chosen, then rejected) or B (SFT)."""
    sequences = [(e.prompt_ids, e.chosen_ids) for e in examples]
    if pairs:
        sequences += [(e.prompt_ids, e.rejected_ids) for e in examples]
    T = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)  # (N, T)
    labels = torch.full((len(sequences), T), IGNORE_INDEX, dtype=torch.long)  # (N, T)
    for row, (prompt, response) in enumerate(sequences):
        n = len(prompt) + len(response)
        input_ids[row, :n] = torch.tensor(prompt + response, dtype=torch.long)
        labels[row, len(prompt) : n] = torch.tensor(response, dtype=torch.long)
    return Batch(input_ids, labels, [e.key for e in examples])


def batch_order(
    examples: list[Example], batch_size: int, *, seed: int, epoch: int, shuffle: bool = True, group_by_length: bool = False
) -> list[list[int]]:
    """The batches of one epoch as lists of example indices, a pure function of (seed, epoch)."""
    n = len(examples)
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=generator).tolist()
    else:
        order = list(range(n))
    if group_by_length:
        mega = batch_size * MEGABATCH_BATCHES
        order = [
            i
            for start in range(0, n, mega)
            for i in sorted(order[start : start + mega], key=lambda i: examples[i].length, reverse=True)
        ]
    return [order[start : start + batch_size] for start in range(0, n, batch_size)]
