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
answer arrives (minidpo.io.JsonlAppender), keyed by (source name, prompt id, prompt text):
a rerun, or the same answers under a new judge, generates nothing, and an interrupted run
resumes where it stopped. A changed prompt under the same id is answered again. The cache
does not key on sampling settings: give a source a new name when changing them.

A record: {source, id, prompt, output (the raw text), reasoning_content (an endpoint's
separate reasoning field, or null), finish_reason, completion_tokens}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from minidpo.gen.client import ChatClient

from minidpo.io import JsonlAppender, load_jsonl_tolerant

from .dataset import EvalRow

Record = dict[str, Any]


class AnswerSource(Protocol):
    name: str

    def describe(self) -> dict[str, Any]:
        """The settings that produced the answers (for the report)."""

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

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        adapter: str | Path | None = None,
        *,
        name: str | None = None,
        device: str | None = None,
        dtype=None,
        **settings: Any,
    ) -> LocalModelSource:
        """Load an HF-format folder (+ a PEFT-layout adapter) and its tokenizer."""
        import torch

        from minidpo.checkpoint import load_model
        from minidpo.device import resolve_device
        from minidpo.lora import load_adapter
        from minidpo.tokenizer import load_tokenizer

        device = resolve_device(device)
        dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
        model, _ = load_model(model_dir, dtype=dtype, device=device)
        if adapter is not None:
            load_adapter(model, adapter)
            model.to(device=device, dtype=dtype)
        tokenizer = load_tokenizer(model_dir)
        default_name = Path(model_dir).name + (f"+{Path(adapter).name}" if adapter else "")
        return cls(model, tokenizer, name=name or default_name, model_path=str(model_dir),
                   adapter_path=str(adapter) if adapter else None, **settings)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "local", "model": self.model_path, "adapter": self.adapter_path, "chat_format": self.chat_format.name,
            "batch_size": self.batch_size, "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature, "seed": self.seed if self.temperature else None, "system": self.system,
        }

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


class AnswerCache:
    """OUT/answers.jsonl: every answer so far, by (source, id, prompt); the last record wins."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._records = {(r["source"], r["id"], r["prompt"]): r for r in load_jsonl_tolerant(self.path)
                         if isinstance(r, dict) and {"source", "id", "prompt", "output"} <= r.keys()}
        self._appender: JsonlAppender | None = None

    def get(self, source: str, row: EvalRow) -> Record | None:
        return self._records.get((source, row.id, row.prompt))

    def add(self, record: Record) -> None:
        if self._appender is None:
            self._appender = JsonlAppender(self.path)
        self._appender.write(record)
        self._records[(record["source"], record["id"], record["prompt"])] = record

    def close(self) -> None:
        if self._appender is not None:
            self._appender.close()
            self._appender = None


def collect_answers(source: AnswerSource, rows: Sequence[EvalRow], cache: AnswerCache) -> tuple[list[Record], int]:
    """Every row's answer record, in row order, and how many were newly generated."""
    pending = [row for row in rows if cache.get(source.name, row) is None]
    unique = list({(row.id, row.prompt): row for row in pending}.values())
    if unique:
        source.answer(unique, cache.add)
    return [cache.get(source.name, row) for row in rows], len(unique)
