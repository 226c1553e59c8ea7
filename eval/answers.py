"""Answer sources (a local model, or any OpenAI-compatible endpoint) and the answer cache.

    source = LocalModelSource.from_dir("smollm2/", adapter="run/adapter")       # or an already loaded
    source = LocalModelSource(model, tokenizer, name="after-dpo")               # model + tokenizer
    source = EndpointSource(ChatClient("http://127.0.0.1:8000/v1", "gpt-4o"))  # vLLM, a gateway, serve
    answers = collect_answers(source, rows, AnswerCache(out / "answers.jsonl"))

A local model answers through the batched sampler (minidpo.sampler.generate): each prompt
is the user turn of the tokenizer's chat format (or the one named), greedy by default,
`batch_size` prompts at a time, longest first so that a batch holds similar lengths. An
endpoint answers through gen/client.py's ChatClient (retries, a bounded thread pool).

The cache is OUT/answers.jsonl, one record per answer, appended and fsync'ed as each
answer arrives (minidpo.io.JsonlAppender), keyed by the prompt and the source's answer
key: a hash of `source.identity()`, everything that changes an answer:

    local model   the model as loaded (eval/fingerprint.py: architecture, weights, a loaded
                  adapter, dtype), the device type, the prompt rendering (chat format, system
                  prompt, tokenizer, stop tokens), max_new_tokens, temperature and seed
    endpoint      its URL and model name, max_tokens, temperature and system prompt (the
                  weights behind a name cannot be seen from here)

A rerun, or the same answers under a new judge, generates nothing; an interrupted run
resumes where it stopped; any changed setting, or changed weights under the same folder,
regenerates. The source's name is a label only: two names for the same model and
settings share answers. Batch size, device index and concurrency are not in the key
(greedy answers do not depend on them; tests/test_eval_run.py checks batching).

A record: {source, key, id, prompt, output (the raw text), reasoning_content (an
endpoint's separate reasoning field, or null), finish_reason, completion_tokens}.

A local model also gives the per-token NLL of reference answers (eval/retention.py) for
the retention score; an endpoint cannot (`reference_nll` is None).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from minidpo.gen.client import ChatClient

from minidpo.io import JsonlAppender, load_jsonl_tolerant
from minidpo.progress import GenerationProgress

from .dataset import EvalRow
from .fingerprint import model_fingerprint, prompt_fingerprint
from .retention import reference_nll

Record = dict[str, Any]


class AnswerSource(Protocol):
    name: str

    def describe(self) -> dict[str, Any]:
        """The settings that produced the answers (for the report)."""

    def identity(self) -> dict[str, Any]:
        """Everything that changes an answer (JSON-serialisable); its hash keys the answer cache."""

    def answer(self, rows: Sequence[EvalRow], on_answer: Callable[[Record], None]) -> None:
        """Answer every row, calling `on_answer(record)` as each one is done."""


class LocalModelSource:
    """A model in this process (optionally with a LoRA adapter loaded) and its tokenizer."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        name: str,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
        chat_format: str | None = None,
        system: str | None = None,
        model_path: str | None = None,
        adapter_path: str | None = None,
    ):
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.temperature, self.seed, self.system = temperature, seed, system
        self.chat_format = tokenizer.chat_format_or(chat_format)
        self.model_path, self.adapter_path = model_path, adapter_path
        self._fingerprint: str | None = None

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        adapter: str | Path | None = None,
        *,
        name: str | None = None,
        device: str | None = None,
        dtype=None,
        quantize: str | None = None,
        **settings: Any,
    ) -> LocalModelSource:
        """Load an HF-format folder (+ a PEFT-layout adapter) and its tokenizer; quantize="nf4" holds
        the base in 4 bits (minidpo.quant) and adds "+nf4" to the default name."""
        import torch

        from minidpo.checkpoint import load_model
        from minidpo.device import resolve_device
        from minidpo.lora import load_adapter
        from minidpo.tokenizer import load_tokenizer

        device = resolve_device(device)
        dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
        model, _ = load_model(model_dir, dtype=dtype, device=device, quantize=quantize)
        if adapter is not None:
            load_adapter(model, adapter)
            model.to(device=device, dtype=dtype)
        tokenizer = load_tokenizer(model_dir)
        default_name = Path(model_dir).name + (f"+{Path(adapter).name}" if adapter else "") + (f"+{quantize}" if quantize else "")
        return cls(model, tokenizer, name=name or default_name, model_path=str(model_dir),
                   adapter_path=str(adapter) if adapter else None, **settings)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "local", "model": self.model_path, "adapter": self.adapter_path, "chat_format": self.chat_format.name,
            "batch_size": self.batch_size, "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature, "seed": self.seed if self.temperature else None, "system": self.system,
            "fingerprint": self.fingerprint,
        }

    @property
    def fingerprint(self) -> str:
        """The model's fingerprint as loaded (eval/fingerprint.py), computed once: the model must not
        change under a source (make a new source after training it further)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def identity(self) -> dict[str, Any]:
        return {
            "kind": "local", "model": self.fingerprint, "device": next(self.model.parameters()).device.type,
            "prompt": prompt_fingerprint(self.tokenizer, self.chat_format, self.system or None),
            "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
            "seed": self.seed if self.temperature else None,
        }

    def reference_nll(self, pairs: Sequence[tuple[str, str]], on_batch: Callable[[int], None] | None = None) -> list[float]:
        """Per-token NLL of each (prompt, reference answer) under this model, prompts rendered as for answers."""
        return reference_nll(self.model, self.tokenizer, self.chat_format, pairs, system=self.system or None,
                             batch_size=self.batch_size, on_batch=on_batch)

    def answer(self, rows: Sequence[EvalRow], on_answer: Callable[[Record], None]) -> None:
        from minidpo.sampler import generate

        prompts = {row.id: self.tokenizer.encode(self._render(row.prompt)) for row in rows}
        ordered = sorted(rows, key=lambda row: -len(prompts[row.id]))
        for start in range(0, len(ordered), self.batch_size):
            batch = ordered[start : start + self.batch_size]

            def finished(i: int, completion, batch=batch) -> None:
                on_answer(_record(self.name, batch[i], completion.text, None, completion.finish_reason,
                                  completion.completion_tokens))

            generate(
                self.model, self.tokenizer, [prompts[row.id] for row in batch],
                max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                seed=self.seed + start if self.temperature else None,
                stop=self.chat_format.stop_strings, on_finish=finished,
            )

    def _render(self, prompt: str) -> str:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return self.chat_format.render([*messages, {"role": "user", "content": prompt}], add_generation_prompt=True)


class EndpointSource:
    """Any OpenAI-compatible chat endpoint: the prompt as the user turn, greedy by default."""

    def __init__(
        self,
        client: ChatClient,
        *,
        name: str | None = None,
        max_tokens: int = 1024,
        temperature: float = 0.0,
        system: str | None = None,
    ):
        self.client, self.name = client, name or client.model
        self.max_tokens, self.temperature, self.system = max_tokens, temperature, system

    def describe(self) -> dict[str, Any]:
        return {"kind": "endpoint", "endpoint": self.client.url, "model": self.client.model,
                "max_tokens": self.max_tokens, "temperature": self.temperature, "system": self.system}

    def identity(self) -> dict[str, Any]:
        return self.describe()

    def answer(self, rows: Sequence[EvalRow], on_answer: Callable[[Record], None]) -> None:
        def ask(row: EvalRow):
            messages = [{"role": "system", "content": self.system}] if self.system else []
            messages.append({"role": "user", "content": row.prompt})
            return self.client.chat(messages, max_tokens=self.max_tokens, temperature=self.temperature)

        outcomes = self.client.map(ask, rows)
        try:
            for done in outcomes:
                if done.error is not None:
                    raise done.error
                reply = done.value
                on_answer(_record(self.name, done.item, reply.text, reply.reasoning, reply.finish_reason,
                                  reply.usage.get("completion_tokens")))
        finally:
            outcomes.close()


def _record(source: str, row: EvalRow, output: str, reasoning_content: str | None,
            finish_reason: str | None, completion_tokens: int | None) -> Record:
    return {"source": source, "id": row.id, "prompt": row.prompt, "output": output,
            "reasoning_content": reasoning_content, "finish_reason": finish_reason,
            "completion_tokens": completion_tokens}


class RecordCache:
    """A JSONL file of records found by the values of `fields`: read once, then appended and
    fsync'ed record by record (minidpo.io.JsonlAppender); the last record of a key wins."""

    def __init__(self, path: str | Path, fields: Sequence[str]):
        self.path, self.fields = Path(path), tuple(fields)
        self._records = {self._key(r): r for r in load_jsonl_tolerant(self.path)
                         if isinstance(r, dict) and set(self.fields) <= r.keys()}
        self._appender: JsonlAppender | None = None

    def _key(self, record: Record) -> tuple:
        return tuple(record[f] for f in self.fields)

    def get(self, *values: Any) -> Record | None:
        """The record whose `fields` hold `values`, or None."""
        return self._records.get(values)

    def add(self, record: Record) -> None:
        if self._appender is None:
            self._appender = JsonlAppender(self.path)
        self._appender.write(record)
        self._records[self._key(record)] = record

    def close(self) -> None:
        if self._appender is not None:
            self._appender.close()
            self._appender = None


class AnswerCache(RecordCache):
    """OUT/answers.jsonl: every answer so far, by (answer key, prompt)."""

    def __init__(self, path: str | Path):
        super().__init__(path, ("key", "prompt"))


def answer_key(source: AnswerSource) -> str:
    """The cache key of a source's answers: a hash of its identity (see the module doc)."""
    content = json.dumps(source.identity(), sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(content.encode("utf-8"), digest_size=16).hexdigest()


def collect_answers(
    source: AnswerSource,
    rows: Sequence[EvalRow],
    cache: AnswerCache,
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[list[Record], int]:
    """Every row's answer record, in row order, and how many were newly generated.

    Missing answers are generated (each distinct prompt once) under a progress bar of
    answers and tokens/s (`progress`); `log` gets one summary line.
    """
    key = answer_key(source)
    missing = [row for row in rows if cache.get(key, row.prompt) is None]
    pending = list({row.prompt: row for row in missing}.values())
    with GenerationProgress(len(pending), f"answers: {source.name}", enabled=progress and bool(pending)) as bar:
        def on_answer(record: Record) -> None:
            cache.add({**record, "key": key})
            bar.update(tokens=record.get("completion_tokens") or 0)

        if pending:
            source.answer(pending, on_answer)
    if log is not None:
        log(f"{bar.summary()}; {len(rows) - len(missing)} from the cache ({cache.path})")
    return [cache.get(key, row.prompt) for row in rows], len(pending)
