"""A demo run's evaluation, again, from its demo.json: `minidpo eval --like runs/demo --out OUT`.

`minidpo demo` records in OUT/demo.json what its evaluation used:

    {"models": {"base":  {"model": DIR, "adapter": null},
                "sft":   {"model": DIR, "adapter": null},
                "final": {"model": DIR, "adapter": DIR or null}},
     "eval_sets": {"unseen phrasings": PATH, ...},          # split label -> evaluation JSONL
     "settings": {"max_new_tokens": int, "eval_batch_size": int, ...},
     "chat_format": NAME or null, "system_prompt": STR or null, "quantize": "nf4" or null (optional)}

`read_demo_run` checks it (one line naming the key for anything missing or mistyped) and
`like_sources` loads models.final as the source "final" and, when present, models.base as
"base", the retention base, with the demo's token limit, batch size, chat format, system
prompt and quantization (greedy unless settings hold a temperature). A chat_format that
names the tokenizer's own format means that format as detected from its template, default
system prompt included (SmolLM2's template adds one that the bare "chatml" lacks), since
that is what the demo used. The splits keep their labels as set names. Relative paths are read from the current folder, or failing that from the demo
folder, so a run folder that was moved still works.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minidpo.errors import MiniDPOError
from minidpo.io import read_json

from .answers import LocalModelSource


@dataclass(frozen=True)
class DemoModel:
    model: Path
    adapter: Path | None


@dataclass(frozen=True)
class DemoRun:
    path: Path  # the demo.json read
    final: DemoModel
    base: DemoModel | None
    eval_sets: dict[str, Path]  # label -> JSONL
    max_new_tokens: int
    batch_size: int
    temperature: float
    seed: int
    chat_format: str | None
    system: str | None
    quantize: str | None


def read_demo_run(folder: str | Path) -> DemoRun:
    """The evaluation settings of the demo run in `folder` (its demo.json), checked."""
    folder = Path(folder)
    path = folder / "demo.json"
    if not path.is_file():
        raise MiniDPOError(f"{path}: not found; --like takes a demo's output folder (the --out of `minidpo demo`)")
    data = read_json(path)
    check = _Checker(path, folder)
    if not isinstance(data, dict):
        raise MiniDPOError(f"{path}: expected a JSON object")
    models = check.get(data, "models", dict)
    settings = check.get(data, "settings", dict)
    eval_sets = check.get(data, "eval_sets", dict)
    if not eval_sets:
        raise MiniDPOError(f'{path}: key "eval_sets" is empty; it maps split labels to evaluation JSONL files')
    temperature = check.get(settings, "temperature", (int, float), "settings.", required=False)
    seed = check.get(settings, "seed", int, "settings.", required=False)
    return DemoRun(
        path=path,
        final=check.model(models, "final"),
        base=check.model(models, "base") if models.get("base") is not None else None,
        eval_sets={label: check.file(eval_sets, label, "eval_sets.") for label in eval_sets},
        max_new_tokens=check.get(settings, "max_new_tokens", int, "settings."),
        batch_size=check.get(settings, "eval_batch_size", int, "settings."),
        temperature=float(temperature or 0.0),
        seed=seed or 0,
        chat_format=check.get(data, "chat_format", str, required=False),
        system=check.get(data, "system_prompt", str, required=False),
        quantize=check.get(data, "quantize", str, required=False),
    )


def like_sources(run: DemoRun, *, device: str | None = None, dtype=None) -> list[LocalModelSource]:
    """The demo's final model ("final") and its base ("base", when recorded), loaded with the demo's settings."""
    settings = {"batch_size": run.batch_size, "max_new_tokens": run.max_new_tokens, "temperature": run.temperature,
                "seed": run.seed, "system": run.system}
    sources = []
    for name, m in {"final": run.final, **({"base": run.base} if run.base else {})}.items():
        source = LocalModelSource.from_dir(m.model, m.adapter, name=name, device=device, dtype=dtype,
                                           quantize=run.quantize, **settings)
        if run.chat_format not in (None, source.chat_format.name):
            source.chat_format = source.tokenizer.make_chat_format(run.chat_format)
        sources.append(source)
    return sources


class _Checker:
    """Reads keys of demo.json, raising one line that names the key on a missing or mistyped one."""

    def __init__(self, path: Path, folder: Path):
        self.path, self.folder = path, folder

    def get(self, obj: dict, key: str, typ, prefix: str = "", *, required: bool = True) -> Any:
        value = obj.get(key)
        if value is None:
            if required:
                raise MiniDPOError(f'{self.path}: key "{prefix}{key}" is missing; rerun `minidpo demo` to record it')
            return None
        if isinstance(value, bool) or not isinstance(value, typ):
            raise MiniDPOError(f'{self.path}: key "{prefix}{key}" has type {type(value).__name__}')
        return value

    def file(self, obj: dict, key: str, prefix: str, *, folder: bool = False) -> Path:
        """A path under `key`, as given or relative to the demo folder; it must exist."""
        given = Path(self.get(obj, key, str, prefix))
        for candidate in (given, self.folder / given) if not given.is_absolute() else (given,):
            if candidate.is_dir() if folder else candidate.is_file():
                return candidate
        kind = "folder" if folder else "file"
        raise MiniDPOError(f'{self.path}: key "{prefix}{key}": {kind} {given} not found (nor under {self.folder})')

    def model(self, models: dict, name: str) -> DemoModel:
        entry = self.get(models, name, dict, "models.")
        prefix = f"models.{name}."
        adapter = self.file(entry, "adapter", prefix, folder=True) if entry.get("adapter") is not None else None
        return DemoModel(self.file(entry, "model", prefix, folder=True), adapter)
