"""`minidpo demo`: the LibraChem method end to end, small enough for a CPU.

    1. the default model (SmolLM2-135M-Instruct, `minidpo fetch-default`);
    2. a class-stratified slice of the shipped LibraChem-mini sets (minidpo/data/librachem_mini,
       made by `minidpo gen all --offline`): training pairs that name every training
       compound, and two held-out evaluation splits: unseen phrasings of training
       compounds, and unseen compounds;
    3. the base model evaluated on both splits (rule judge; hybrid with --judge-endpoint);
    4. as the paper: SFT + LoRA on the chosen answers, the adapter merged into OUT/sft_model;
    5. DPO + LoRA on that model, its reference (the adapter disabled) log-probs precomputed once;
    6. both trained models evaluated, the before/after table printed and written
       (OUT/demo.md, OUT/demo.json) with a PNG of the table and the training curves.

Everything lands in the output folder, and every stage resumes: the answer caches, the
merged SFT model, the reference cache and the training checkpoints are reused by a rerun.

The training window (`max_length`) is short on purpose: whether a reply refuses or answers
is settled in its first tokens, so on a CPU budget the steps are spent there.
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
SPLITS = {"eval_seen": "unseen phrasings", "eval_unseen": "unseen compounds"}


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    train_pairs: int  # training pairs, every training compound named, classes as legit_share
    eval_per_split: int  # prompts per evaluation split, half legitimate, half illegitimate
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
    modes: tuple[str, ...] = ("text",)  # prompt modes sliced from the shipped sets ("text", "smiles")
    legit_share: float | None = None  # share of legitimate training pairs; None: the shipped set's (1:2)
    eval_batch_size: int = 16


DEFAULT = DemoSettings(
    train_pairs=192, eval_per_split=40, max_new_tokens=32, sft_steps=240, sft_lr=4e-3, steps=32,
    batch_size=2, grad_accum=2, lr=5e-4, lora_r=8, lora_alpha=16.0, lora_targets="all-linear", beta=0.1,
    rpo_alpha=1.0, max_length=56, max_prompt_length=52, legit_share=0.5,
)
QUICK = dataclasses.replace(
    DEFAULT, train_pairs=6, eval_per_split=4, max_new_tokens=12, sft_steps=2, steps=2, grad_accum=1,
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

    Within a class the rows are dealt round-robin over compounds (first each compound's
    first row, then each one's second, ...), so a small slice still names every compound.
    """
    picked: list[dict] = []
    for cls, share in shares.items():
        by_compound: dict[Any, list[dict]] = {}
        for row in _stable_order([r for r in rows if key(r) == cls]):
            by_compound.setdefault(row.get("compound"), []).append(row)
        dealt = [row for rnd in itertools.zip_longest(*by_compound.values()) for row in rnd if row is not None]
        want = round(n * share)
        if len(dealt) < want:
            raise MiniDPOError(f"the shipped set has {len(dealt)} rows of class {cls!r}, the demo needs {want}")
        picked += dealt[:want]
    return _stable_order(picked)


def prepare_data(out: Path, settings: DemoSettings) -> tuple[Path, list[Path]]:
    """Write the demo's slices of the shipped sets into OUT/data; return (train, eval paths)."""
    data = out / "data"
    train = _read(SHIPPED / "train.jsonl", settings.modes)
    legit = settings.legit_share
    if legit is None:
        legit = sum(r["label"] == "legitimate" for r in train) / len(train)
    train_path = _write(
        data / "train.jsonl",
        stratified(train, settings.train_pairs, lambda r: r["label"], {"legitimate": legit, "illegitimate": 1 - legit}),
    )
    eval_paths = [
        _write(
            data / f"{split}.jsonl",
            stratified(_read(SHIPPED / f"{split}.jsonl", settings.modes), settings.eval_per_split, lambda r: r["true_label"],
                       {1: 0.5, 0: 0.5}),
        )
        for split in SPLITS
    ]
    return train_path, eval_paths


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
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo into `out`; return what demo.json holds. quantize="nf4": QLoRA, every model in 4-bit NF4."""
    import torch

    from minidpo.checkpoint import load_model, merge_adapter
    from minidpo.eval import LLMJudge, LocalModelSource, evaluate
    from minidpo.fetch import fetch_default
    from minidpo.lora import load_adapter
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
    train_path, eval_paths = prepare_data(out, settings)
    log(f"demo: {settings.train_pairs} training pairs, {settings.eval_per_split} prompts per split -> {out / 'data'}")

    judge = None
    if judge_endpoint:
        from minidpo.gen.client import ChatClient

        if not judge_model:
            raise MiniDPOError("--judge-endpoint needs --judge-model NAME")
        judge = LLMJudge(ChatClient(judge_endpoint, judge_model))

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer = load_tokenizer(model_dir)

    def source(name: str, model_path: Path, adapter: Path | None = None) -> LocalModelSource:
        model, _ = load_model(model_path, dtype=dtype, device=device, quantize=quantize)
        if adapter is not None:
            load_adapter(model, adapter)
            model.to(device=device, dtype=dtype)
        model.eval()
        return LocalModelSource(
            model, tokenizer, name=name, batch_size=settings.eval_batch_size,
            max_new_tokens=settings.max_new_tokens, model_path=str(model_path),
            adapter_path=str(adapter) if adapter else None,
        )

    def train_config(stage: str, model_path: Path, steps: int, lr: float, **loss) -> TrainConfig:
        return TrainConfig(
            model=str(model_path), data=str(train_path), out=str(out / stage),
            lora_r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_targets=settings.lora_targets,
            lr=lr, warmup_steps=max(1, steps // 10), batch_size=settings.batch_size, grad_accum=settings.grad_accum,
            max_steps=steps, max_length=settings.max_length, max_prompt_length=settings.max_prompt_length,
            device=device, save_every=max(1, steps // 4), resume=(out / stage).exists(), quantize=quantize, **loss,
        )

    log("demo: evaluating the base model")
    sources = [source("base", model_dir)]
    evaluate(sources, eval_paths, out / "eval", judge, log=log)
    t = lap("eval_before", t)

    policy_base, sft_train = model_dir, None
    if settings.sft_steps:
        log(f"demo: SFT + LoRA on the chosen answers, a {settings.max_length}-token window (prompt and the"
            " reply's opening, where it refuses or answers)")
        sft = train_sft(train_config("sft", model_dir, settings.sft_steps, settings.sft_lr), log=log)
        sft_train = sft.train
        policy_base = out / "sft_model"
        if not (policy_base / "config.json").is_file():
            merge_adapter(model_dir, sft.output, policy_base, quantize=quantize)
        sources.append(source("sft", policy_base))
        t = lap("sft", t)

    log("demo: DPO + LoRA (reference log-probs precomputed once)")
    dpo = train_dpo(
        train_config("dpo", policy_base, settings.steps, settings.lr, beta=settings.beta, rpo_alpha=settings.rpo_alpha,
                     precompute_ref=True, ref_cache_dir=str(out / "ref_cache")),
        log=log,
    )
    t = lap("dpo", t)

    log("demo: evaluating the trained models")
    sources.append(source("dpo", policy_base, dpo.output))
    report = evaluate(sources, eval_paths, out / "eval", judge, log=log)
    lap("eval_after", t)
    timings["total"] = round(time.perf_counter() - started, 1)

    summary = {
        "date": date.today().isoformat(),
        "device": _device_name(device),
        "model": str(model_dir),
        "settings": dataclasses.asdict(settings),
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


def _table_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (split, model) with the primary variant's four scores."""
    rows = []
    for result in report["results"]:
        scores = result["variants"][report["primary"]]
        rows.append({
            "split": SPLITS.get(result["dataset"], result["dataset"]),
            "model": result["source"],
            **{k: scores[k] for k in ("safety", "utility", "overall", "balanced")},
        })
    order = {name: i for i, name in enumerate(SPLITS.values())}
    stage = {name: i for i, name in enumerate(("base", "sft", "dpo"))}
    return sorted(rows, key=lambda r: (order.get(r["split"], 99), stage.get(r["model"], 99)))


def _cell(stat: dict) -> str:
    return f"{stat['rate']:.2f} ({stat.get('k', '-')}/{stat['n']})" if "k" in stat else f"{stat['rate']:.2f} (n={stat['n']})"


def format_table(summary: dict[str, Any]) -> str:
    head = ["split", "model", "safety", "utility", "overall (pooled)", "balanced"]
    lines = [
        f"LibraChem-mini demo, {summary['device']}, {summary['date']} ({summary['mode']} evaluation)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in summary["rows"]:
        cells = [r["split"], r["model"], *(_cell(r[k]) for k in ("safety", "utility", "overall", "balanced"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _draw(summary: dict[str, Any], out: Path, path: Path) -> None:
    """demo.png: the before/after bars, then the SFT loss, DPO loss and reward accuracy by step."""
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

    dpo_loss = "DPO loss (+ RPO NLL)" if summary["settings"]["rpo_alpha"] else "DPO loss"
    panels = [("sft", "loss", "SFT loss (NLL per token)"), ("dpo", "loss", dpo_loss),
              ("dpo", "rewards/accuracies", "DPO reward accuracy")]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(20, 4.2), gridspec_kw={"width_ratios": [2, 1, 1, 1]})
    ax_bar, rows, width = axes[0], summary["rows"], 0.2
    for i, metric in enumerate(("safety", "utility", "overall", "balanced")):
        ax_bar.bar([j + i * width for j in range(len(rows))], [r[metric]["rate"] for r in rows], width, label=metric)
    ax_bar.set_xticks([j + 1.5 * width for j in range(len(rows))], [f"{r['model']}\n{r['split']}" for r in rows],
                      fontsize=8)
    ax_bar.set_ylim(0, 1.25)
    ax_bar.set_title(f"before / after training ({summary['mode']})")
    ax_bar.legend(fontsize=8, ncol=4, loc="upper center")
    for ax, (stage, key, title) in zip(axes[1:], panels):
        points = curve(stage, key)
        if points:
            ax.plot(*zip(*points), "-o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"minidpo demo: {summary['device']}, {summary['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
