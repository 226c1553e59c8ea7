"""`minidpo demo`: the LibraChem method end to end, small enough for a CPU.

    1. the default model (SmolLM2-135M-Instruct, `minidpo fetch-default`);
    2. a slice of the shipped LibraChem-mini sets (minidpo/data/librachem_mini, made by
       `make data`): training pairs of four families, and held-out prompts of five splits:
         synthesis   "how do I make X": legitimate X answered, illegitimate X refused;
                     evaluated on unseen phrasings and on unseen compounds;
         contrast    questions that name a dangerous agent without asking to make it
                     (antidotes, symptoms, treaties, disposal): answered, correctly;
         general     general chemistry (pH, buffers, balancing): answered, correctly;
         everyday    questions outside chemistry, many of them sounding violent ("kill a
                     Python process"): answered as the base model answers them;
    3. the base model evaluated; its own answers to the training prompts of the
       `distill` families become their chosen answers (self-distillation: alignment keeps
       what the model already does there), refusals kept as the rejected ones;
    4. as the paper: SFT + LoRA on the chosen answers, the adapter merged into OUT/sft_model;
    5. DPO + LoRA on that model, its reference (the adapter disabled) log-probs precomputed once;
    6. the trained models evaluated, the before/after table printed and written
       (OUT/demo.md, OUT/demo.json) with a PNG of the table and the training curves.

The scores (eval/): safety (illegitimate refused), utility (legitimate answered),
correct (legitimate answered with the row's key facts), over-refusal (legitimate refused)
and retention (NLL of the reference answers under the model / under the base model).

`split="validation"` evaluates on the val_* files instead of the eval_* (test) files: the
recipe in DEFAULT was chosen on validation runs only; the test splits are reported.

Everything lands in the output folder, and every stage resumes: the answer caches, the
merged SFT model, the reference cache and the training checkpoints are reused by a rerun.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import platform
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

from minidpo.errors import MiniDPOError
from minidpo.io import atomic_write, atomic_write_json

SHIPPED = Path(__file__).parent / "data" / "librachem_mini"
# split key (the file is eval_<key>.jsonl, or val_<key>.jsonl for validation) -> its label
SPLITS = {
    "seen": "unseen phrasings",
    "unseen": "unseen compounds",
    "contrast": "contrast",
    "general": "general chemistry",
    "everyday": "outside chemistry",
}
FILE_PREFIX = {"test": "eval", "validation": "val"}
STAGES = ("base", "sft", "dpo")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    family_pairs: tuple[tuple[str, int], ...]  # training pairs per family (synthesis split by legit_share)
    eval_per_split: int  # prompts per evaluation split (synthesis splits: half legitimate)
    max_new_tokens: int  # answer length for evaluation (a refusal shows in the first words)
    sft_steps: int  # SFT optimizer steps before DPO (0: DPO straight from the base model)
    sft_lr: float
    steps: int  # DPO optimizer steps
    batch_size: int
    grad_accum: int
    lr: float  # DPO learning rate
    lora_r: int
    lora_alpha: float
    lora_targets: str
    beta: float
    rpo_alpha: float | None  # weight of the NLL term on chosen (RPO); keeps DPO from drifting off SFT
    max_length: int  # prompt + response tokens trained on
    max_prompt_length: int
    distill: tuple[str, ...] = ()  # families whose chosen answer is the base model's own (self-distillation)
    distill_tokens: int = 48  # length of a self-distilled answer
    legit_share: float = 0.5  # share of legitimate pairs in the synthesis family
    modes: tuple[str, ...] = ("text",)  # prompt modes sliced from the shipped sets ("text", "smiles")
    eval_batch_size: int = 16
    precompute_ref: bool = True  # reference log-probs for every pair first, or per step for the pairs drawn

    @property
    def train_pairs(self) -> int:
        return sum(n for _, n in self.family_pairs)


# Chosen on the validation splits (README, "How the recipe was chosen"); the test splits are reported.
DEFAULT = DemoSettings(
    family_pairs=(("synthesis", 160), ("contrast", 48), ("general", 48), ("everyday", 96)),
    eval_per_split=40, max_new_tokens=32, sft_steps=200, sft_lr=4e-3, steps=32,
    batch_size=2, grad_accum=2, lr=1.5e-4, lora_r=8, lora_alpha=16.0, lora_targets="all-linear", beta=0.1,
    rpo_alpha=1.0, max_length=72, max_prompt_length=56, distill=(),
    eval_batch_size=32, precompute_ref=False,  # time only: 32 DPO steps draw 128 of the 352 pairs
)
# The quick run also takes the self-distillation path, so the test suite covers it.
QUICK = dataclasses.replace(
    DEFAULT, family_pairs=(("synthesis", 4), ("contrast", 2), ("general", 2), ("everyday", 2)), eval_per_split=4,
    max_new_tokens=12, distill=("everyday",), distill_tokens=12, sft_steps=2, steps=2, grad_accum=1,
)


def _stable_order(rows: list[dict]) -> list[dict]:
    """A fixed shuffle: rows sorted by a hash of their id (the same on every machine)."""
    return sorted(rows, key=lambda r: hashlib.sha1(str(r["id"]).encode()).hexdigest())


def _read(path: Path, modes: tuple[str, ...]) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("mode", "text") in modes]


def _write(path: Path, rows: list[dict]) -> Path:
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def stratified(rows: list[dict], n: int, key: Callable[[dict], Any], shares: dict[Any, float]) -> list[dict]:
    """n rows in a stable order, each class `c` taking round(n * shares[c]) of them.

    Within a class the rows are dealt round-robin over topics (a row's `topic`, else its
    `compound`: first each topic's first row, then each one's second, ...), so a small
    slice still names every topic.
    """
    picked: list[dict] = []
    for cls, share in shares.items():
        by_topic: dict[Any, list[dict]] = {}
        for row in _stable_order([r for r in rows if key(r) == cls]):
            by_topic.setdefault(row.get("topic") or row.get("compound"), []).append(row)
        dealt = [row for rnd in itertools.zip_longest(*by_topic.values()) for row in rnd if row is not None]
        want = round(n * share)
        if len(dealt) < want:
            raise MiniDPOError(f"the shipped set has {len(dealt)} rows of class {cls!r}, the demo needs {want}")
        picked += dealt[:want]
    return _stable_order(picked)


def _family(row: dict) -> str:
    return row.get("family", "synthesis")


def prepare_data(out: Path, settings: DemoSettings, split: str = "test") -> tuple[Path, dict[str, Path]]:
    """Write the demo's slices of the shipped sets into OUT/data; return (train path, {split label: path})."""
    if split not in FILE_PREFIX:
        raise MiniDPOError(f"split must be one of {', '.join(FILE_PREFIX)}, got {split!r}")
    data = out / "data"
    train = _read(SHIPPED / "train.jsonl", settings.modes)
    picked: list[dict] = []
    for family, n in settings.family_pairs:
        rows = [r for r in train if _family(r) == family]
        if family == "synthesis":
            legit = settings.legit_share
            picked += stratified(rows, n, lambda r: r["label"], {"legitimate": legit, "illegitimate": 1 - legit})
        else:
            picked += stratified(rows, n, _family, {family: 1.0})
    train_path = _write(data / "train.jsonl", _stable_order(picked))
    eval_paths = {}
    for key, label in SPLITS.items():
        rows = _read(SHIPPED / f"{FILE_PREFIX[split]}_{key}.jsonl", settings.modes)
        shares = {1: 0.5, 0: 0.5} if any(r["true_label"] == 0 for r in rows) else {1: 1.0}
        eval_paths[label] = _write(data / f"{FILE_PREFIX[split]}_{key}.jsonl",
                                   stratified(rows, settings.eval_per_split, lambda r: r["true_label"], shares))
    return train_path, eval_paths


def self_distill(train_path: Path, source, settings: DemoSettings, out: Path, log: Callable[[str], None],
                 progress: bool = False) -> Path:
    """OUT/data/train_distilled.jsonl: the `distill` families' chosen answers replaced by `source`'s own.

    A base answer that our rule reads as a refusal keeps the shipped chosen answer (a
    refusal must never be the chosen side of an everyday question).
    """
    from minidpo.eval import AnswerCache, EvalRow, collect_answers, rule_verdict

    rows = [json.loads(line) for line in train_path.read_text(encoding="utf-8").splitlines()]
    wanted = [r for r in rows if _family(r) in settings.distill]
    cache = AnswerCache(out / "distill" / "answers.jsonl")
    try:
        records, new = collect_answers(source, [EvalRow(r["id"], r["prompt"], 1) for r in wanted], cache,
                                       progress=progress)
    finally:
        cache.close()
    kept = 0
    answers = {}
    for row, record in zip(wanted, records):
        text = record["output"].strip()
        if text and not rule_verdict(text, row["prompt"]).refused:
            answers[row["id"]] = text
        else:
            kept += 1
    log(f"distill: {len(wanted)} chosen answers from {source.name} ({new} generated), "
        f"{kept} kept from the shipped set (refusal or empty)")
    distilled = [{**r, "chosen": answers.get(r["id"], r["chosen"])} for r in rows]
    return _write(out / "data" / "train_distilled.jsonl", distilled)


def run_demo(
    out: str | Path = "runs/demo",
    *,
    quick: bool = False,
    model_dir: str | Path | None = None,
    device: str | None = None,
    judge_endpoint: str | None = None,
    judge_model: str | None = None,
    settings: DemoSettings | None = None,
    quantize: str | None = None,
    split: str = "test",
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo into `out`; return what demo.json holds. quantize="nf4": QLoRA, every model in 4-bit NF4."""
    import torch

    from minidpo.checkpoint import load_model, merge_adapter
    from minidpo.device import resolve_device
    from minidpo.eval import LLMJudge, LocalModelSource, evaluate
    from minidpo.fetch import fetch_default
    from minidpo.lora import load_adapter, merge_lora
    from minidpo.tokenizer import load_tokenizer
    from minidpo.train import TrainConfig, train_dpo, train_sft

    settings = settings or (QUICK if quick else DEFAULT)
    out = Path(out)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    t = time.perf_counter()
    model_dir = Path(model_dir) if model_dir else fetch_default(log=log)
    t = lap("fetch", t)
    train_path, eval_paths = prepare_data(out, settings, split)
    log(f"demo: {settings.train_pairs} training pairs ({', '.join(f'{f} {n}' for f, n in settings.family_pairs)}), "
        f"{settings.eval_per_split} {split} prompts per split -> {out / 'data'}")

    judge = None
    if judge_endpoint:
        from minidpo.gen.client import ChatClient

        if not judge_model:
            raise MiniDPOError("--judge-endpoint needs --judge-model NAME")
        judge = LLMJudge(ChatClient(judge_endpoint, judge_model))

    device = str(resolve_device(device))
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer = load_tokenizer(model_dir)
    models: dict[str, dict[str, str | None]] = {}

    def source(name: str, model_path: Path, adapter: Path | None = None, **kw) -> LocalModelSource:
        model, _ = load_model(model_path, dtype=dtype, device=device, quantize=quantize)
        if adapter is not None:
            load_adapter(model, adapter)
            if quantize is None:
                merge_lora(model)  # the same function, one matmul a layer: answers come faster
            model.to(device=device, dtype=dtype)
        model.eval()
        models[name] = {"model": str(model_path), "adapter": str(adapter) if adapter else None}
        return LocalModelSource(
            model, tokenizer, name=name, batch_size=settings.eval_batch_size,
            max_new_tokens=kw.pop("max_new_tokens", settings.max_new_tokens), model_path=str(model_path),
            adapter_path=str(adapter) if adapter else None, **kw,
        )

    def train_config(stage: str, data: Path, model_path: Path, steps: int, lr: float, **loss) -> TrainConfig:
        return TrainConfig(
            model=str(model_path), data=str(data), out=str(out / stage),
            lora_r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_targets=settings.lora_targets,
            lr=lr, warmup_steps=max(1, steps // 10), batch_size=settings.batch_size, grad_accum=settings.grad_accum,
            max_steps=steps, max_length=settings.max_length, max_prompt_length=settings.max_prompt_length,
            device=device, save_every=max(1, steps // 4), resume=(out / stage).exists(), quantize=quantize, progress=progress, **loss,
        )

    def run_eval(sources: list[LocalModelSource]) -> dict[str, Any]:
        return evaluate(sources, list(eval_paths.values()), out / "eval", judge, retention_base="base",
                        progress=progress, log=log)

    log("demo: evaluating the base model")
    base = source("base", model_dir)
    sources = [base]
    run_eval(sources)
    t = lap("eval_before", t)

    if settings.distill:
        distiller = LocalModelSource(base.model, tokenizer, name="base", batch_size=settings.eval_batch_size,
                                     max_new_tokens=settings.distill_tokens)
        train_path = self_distill(train_path, distiller, settings, out, log, progress)
        t = lap("distill", t)

    policy_base, sft_train = model_dir, None
    if settings.sft_steps:
        log(f"demo: SFT + LoRA on the chosen answers, a {settings.max_length}-token window (prompt and the"
            " reply's opening, where it refuses or answers)")
        sft = train_sft(train_config("sft", train_path, model_dir, settings.sft_steps, settings.sft_lr), log=log)
        sft_train = sft.train
        policy_base = out / "sft_model"
        if not (policy_base / "config.json").is_file():
            merge_adapter(model_dir, sft.output, policy_base, quantize=quantize)
        sources.append(source("sft", policy_base))
        t = lap("sft", t)

    log("demo: DPO + LoRA (reference: " + ("log-probs precomputed once)" if settings.precompute_ref else
                                           "the same weights with the adapter off, per step)"))
    dpo = train_dpo(
        train_config("dpo", train_path, policy_base, settings.steps, settings.lr, beta=settings.beta,
                     rpo_alpha=settings.rpo_alpha, precompute_ref=settings.precompute_ref,
                     ref_cache_dir=str(out / "ref_cache")),
        log=log,
    )
    t = lap("dpo", t)

    log("demo: evaluating the trained models")
    sources.append(source("dpo", policy_base, dpo.output))
    report = run_eval(sources)
    lap("eval_after", t)
    timings["total"] = round(time.perf_counter() - started, 1)

    summary = {
        "date": date.today().isoformat(),
        "device": _device_name(device),
        "model": str(model_dir),
        "models": {**models, "final": models["dpo"]},
        "split": split,
        "eval_sets": {label: str(path) for label, path in eval_paths.items()},
        "chat_format": base.chat_format.name,
        "system_prompt": None,
        "settings": dataclasses.asdict(settings),
        "quantize": quantize,
        "quick": quick,
        "mode": report["mode"],
        "rows": _table_rows(report),
        "train": {"sft": sft_train, "dpo": dpo.train},
        "timings_s": timings,
    }
    atomic_write_json(out / "demo.json", summary)
    table = format_table(summary)
    atomic_write(out / "demo.md", table + "\n")
    _draw(summary, out, out / "demo.png")
    log("\n" + table)
    log(f"\ndemo: {timings['total']:.0f} s in all; files in {out}")
    return summary


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"CPU {cpu} ({os.cpu_count()} cores)"


# The table's score columns: (key in the row, heading). A split without illegitimate prompts
# has no safety; one without key facts has no correct / fact recall; retention needs references.
COLUMNS = (
    ("safety", "safety"), ("utility", "answered"), ("utility_correct", "correct"),
    ("over_refusal", "over-refusal"), ("fact_recall", "fact recall"), ("retention", "retention (NLL ratio)"),
)


def _table_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (split, model) with the primary variant's scores."""
    labels = {f"{prefix}_{key}": label for key, label in SPLITS.items() for prefix in FILE_PREFIX.values()}
    rows = []
    for result in report["results"]:
        scores = result["variants"][report["primary"]]
        rows.append({
            "split": labels.get(result["dataset"], result["dataset"]),
            "model": result["source"],
            **{key: scores.get(key, result.get(key)) for key, _ in COLUMNS},
        })
    order = {label: i for i, label in enumerate(SPLITS.values())}
    stage = {name: i for i, name in enumerate(STAGES)}
    return sorted(rows, key=lambda r: (order.get(r["split"], 99), stage.get(r["model"], 99)))


def _value(stat: dict | None) -> float | None:
    """A score's value: a rate, a mean or a ratio (None when it could not be computed)."""
    return None if not stat else next((stat[k] for k in ("rate", "mean", "ratio") if k in stat), None)


def _cell(stat: dict | None) -> str:
    value = _value(stat)
    if value is None:
        return "-"
    return f"{value:.2f} ({stat['k']}/{stat['n']})" if "k" in stat else f"{value:.2f} (n={stat['n']})"


def format_table(summary: dict[str, Any]) -> str:
    head = ["split", "model", *(h for _, h in COLUMNS)]
    lines = [
        f"LibraChem-mini demo, {summary['device']}, {summary['date']} ({summary['split']} splits, "
        f"{summary['mode']} evaluation)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in summary["rows"]:
        lines.append("| " + " | ".join([r["split"], r["model"], *(_cell(r.get(k)) for k, _ in COLUMNS)]) + " |")
    return "\n".join(lines)


def _draw(summary: dict[str, Any], out: Path, path: Path) -> None:
    """demo.png: per split the before/after bars (each labelled), then the SFT loss, DPO loss and reward accuracy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("demo: matplotlib is not installed; no demo.png", file=sys.stderr)
        return
    from minidpo.io import load_jsonl_tolerant

    def curve(stage: str, key: str) -> list[tuple[int, float]]:
        metrics = out / stage / "metrics.jsonl"
        records = load_jsonl_tolerant(metrics) if metrics.is_file() else []
        return [(r["step"], r[key]) for r in records if r.get("split") == "train" and key in r]

    splits = list(dict.fromkeys(r["split"] for r in summary["rows"]))
    bars = [(k, h) for k, h in COLUMNS if k != "retention"]
    fig, axes = plt.subplots(2, max(3, len(splits)), figsize=(5 * max(3, len(splits)), 8.5), squeeze=False)
    for ax, split in zip(axes[0], splits):
        rows = [r for r in summary["rows"] if r["split"] == split]
        width = 0.8 / len(rows)
        for i, r in enumerate(rows):
            xs = [j + i * width for j in range(len(bars))]
            stats = [r.get(k) for k, _ in bars]
            values = [_value(stat) for stat in stats]
            drawn = ax.bar(xs, [v or 0 for v in values], width, label=r["model"])
            for x, v, stat in zip(xs, values, stats):
                text = "-" if v is None else f"{v:.2f}\n" + (f"{stat['k']}/{stat['n']}" if "k" in stat else f"n={stat['n']}")
                ax.annotate(text, (x, max(v or 0, 0.0)), ha="center", va="bottom", fontsize=6,
                            xytext=(0, 2), textcoords="offset points")
                if v == 0:  # a visible mark for a zero bar
                    ax.plot([x - width / 2, x + width / 2], [0.005, 0.005], color=drawn.patches[0].get_facecolor(), lw=3)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(bars))], [h for _, h in bars], fontsize=7)
        ax.set_ylim(0, 1.15)
        ax.set_title(split)
        ax.legend(fontsize=7, ncol=3, loc="upper right")
    for ax in axes[0][len(splits):]:
        ax.axis("off")
    dpo_loss = "DPO loss (+ RPO NLL)" if summary["settings"]["rpo_alpha"] else "DPO loss"
    panels = [("sft", "loss", "SFT loss (NLL per token)"), ("dpo", "loss", dpo_loss),
              ("dpo", "rewards/accuracies", "DPO reward accuracy")]
    for ax, (stage, key, title) in zip(axes[1], panels):
        points = curve(stage, key)
        if points:
            ax.plot(*zip(*points), "-o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[1][len(panels):]:
        ax.axis("off")
    fig.suptitle(f"minidpo demo: {summary['device']}, {summary['date']} ({summary['split']} splits)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

