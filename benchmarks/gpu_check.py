"""One call on a fresh H100/H200: compiled kernel tests, a bf16 smoke of every command, benchmarks.

`bash benchmarks/gpu_check.sh` (or `make gpu`) installs what was carried, then runs this:

    step            at most  what is checked, not only run
    env               20 s   CUDA visible; device, torch/triton and peer versions recorded
    tests-gpu        120 s   pytest -m gpu over the test files that hold GPU tests (the Triton
                             kernels compiled, not interpreted; the compiled CUDA-graph decode):
                             exit 0, something passed, nothing skipped
    smoke-model       40 s   SmolLM2-135M-Instruct in bf16: the real weights when --model names
                             them, else its config + tokenizer (.gpu/smollm2) with random
                             weights of its shape; forward finite
    sft               60 s   minidpo sft, LoRA, one batch repeated: loss finite and falling
    train-lora        60 s   minidpo train (DPO): first loss log 2 (policy = reference), then falling
    train-qlora       60 s   the same with --quantize nf4, once `minidpo train` has it
    merge             40 s   minidpo merge: the merged model's logits equal base + adapter's
    generate          90 s   minidpo generate, eager and --compile: same text, not empty
    serve             60 s   minidpo serve + one request through the openai client: the reply
                             equals `minidpo generate`'s text
    eval              60 s   minidpo eval --limit: report.json written, every row answered
    bench-sampler    150 s   python -m benchmarks sampler (Llama-3-8B shapes, eager and compiled,
                             against transformers): the minidpo rows are ok
    bench-logprob    100 s   python -m benchmarks logprob (kernels vs eager, compile, Liger)
    bench-dpo_step    90 s   python -m benchmarks dpo_step (minidpo vs TRL on the smoke model)
    bench-train_step 120 s   python -m benchmarks train_step (Llama-3-8B LoRA-DPO vs HF+PEFT(+Liger))
    bench-serve      120 s   python -m benchmarks.server_load on the smoke model, continuous batching
                             then --static-batching, 20 s each: no failed request; tokens/s and
                             time to first token of both (in the step's detail line)

Every step runs in its own processes under min(its cap, the time left of --budget); a step
that fails or times out is recorded and the next one starts; steps that no longer fit are
recorded as skipped. Whatever happens the results are written and a short table is printed
last: <device>-<date>-gpu-check.{json,md,png} (each step: status, seconds, what it checked,
the tail of its log) beside the benchmarks' own <device>-<date>.{json,md} and PNGs, in $OUT
when it is set (the device tool brings back at most 8 files) and benchmarks/results/
otherwise. --only / --skip pick steps (a second call can run what a first one had no time
for); --dry-run checks on a CPU machine that every step is wired: each minidpo and
benchmarks command line is parsed by the real parsers, each input path exists, the pytest
files and marker exist, and the results writer runs; nothing is executed.

This module imports no torch: the orchestrator outlives any step that crashes. The checks
that need the model run as `python -m benchmarks.gpu_check check NAME ...` subprocesses.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from minidpo.io import atomic_write, atomic_write_json, read_json

REPO = Path(__file__).resolve().parents[1]
CARRIED = REPO / ".gpu"  # benchmarks/fetch_gpu_wheels.sh fills it; the device call carries it
DATA = REPO / "minidpo" / "data" / "librachem_mini"
DEFAULT_BUDGET_S = 540  # the device tool stops a command at 600 s; gpu_check.sh's installs come first
REPORT_RESERVE_S = 15  # kept back for writing the results
LOG_TAIL_CHARS = 3000
OUT_FILES = 8  # the device tool brings back at most this many files from $OUT
PROMPT = "How is aspirin made?"
NEW_TOKENS = 24


class StepFailed(Exception):
    """A check did not hold; the message says which and what was seen."""


@dataclasses.dataclass
class Result:
    step: str
    status: str  # ok | FAIL | timeout | skipped | wired (dry run)
    seconds: float
    detail: str
    log: str = ""


class Context:
    """What steps share: paths, the interpreter, the clock, and `sh` (run or, dry, validate)."""

    def __init__(self, args: argparse.Namespace):
        self.dry = args.dry_run
        self.python = sys.executable
        self.device = args.device
        self.model = args.model
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check."))
        self.results_dir = args.results_dir
        self.deadline = time.monotonic() + args.budget - REPORT_RESERVE_S
        self.step_deadline = self.deadline
        self.log: list[str] = []
        self.stderr = ""  # of the last command
        self.facts: dict = {}  # what steps learn for later ones (device slug, generated text)

    def remaining(self) -> float:
        return self.step_deadline - time.monotonic()

    def path(self, *parts: str) -> Path:
        return self.work.joinpath(*parts)

    def argv(self, kind: str, args: list[str]) -> list[str]:
        modules = {"minidpo": "minidpo", "benchmarks": "benchmarks", "pytest": "pytest",
                   "check": "benchmarks.gpu_check", "server_load": "benchmarks.server_load"}  # fmt: skip
        prefix = [self.python, "-m", modules[kind]] + (["check"] if kind == "check" else [])
        return prefix + [str(a) for a in args]

    def sh(self, kind: str, *args, env: dict | None = None) -> str:
        """Run one command (kind: minidpo, benchmarks, pytest, check, server_load) to completion within the
        step's time; return its output. Dry: validate its command line instead, return ""."""
        args = [str(a) for a in args]
        if self.dry:
            validate(kind, args, self)
            return ""
        argv = self.argv(kind, args)
        self.log.append("$ " + " ".join(argv))
        timeout = self.remaining()
        if timeout <= 1:
            raise subprocess.TimeoutExpired(argv, 0)
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {})}, start_new_session=True)  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, err = proc.communicate()
            self.log += [out, err]
            raise
        self.log += [out, err]
        self.stderr = err
        if proc.returncode != 0:
            raise StepFailed(f"{kind} {args[0] if args else ''} exited {proc.returncode}: {last_line(err or out)}")
        return out


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


# ---- dry run: the wiring of each command line


def validate(kind: str, args: list[str], ctx: Context) -> None:
    """Raise StepFailed unless this command line would start: parsed by the real parser,
    its input paths present (paths under the work folder are made by earlier steps)."""
    if kind == "minidpo":
        from minidpo.cli import COMMANDS, build_parser

        if args[0] not in COMMANDS:
            raise StepFailed(f"minidpo has no command {args[0]!r}")
        parse(build_parser(args[0]), args)
    elif kind == "benchmarks":
        from benchmarks.__main__ import build_parser, discover

        modules = discover()
        parsed = parse(build_parser(modules), args)
        unknown = [n for n in parsed.names if n not in modules]
        if unknown:
            raise StepFailed(f"no benchmark named {', '.join(unknown)}")
    elif kind == "pytest":
        markers = re.findall(r'^\s+"(\w+):', (REPO / "pyproject.toml").read_text(), re.M)
        for i, a in enumerate(args):
            if args[i - 1] == "-m" and a not in markers:
                raise StepFailed(f"pytest marker {a!r} is not declared in pyproject.toml")
        if not [a for a in args if a.endswith(".py")]:
            raise StepFailed("no test file holds a GPU test")
    elif kind == "server_load":
        from benchmarks.server_load import build_parser as server_load_parser

        parse(server_load_parser(), args)
    elif kind == "check":
        if args[0] not in CHECKS:
            raise StepFailed(f"no check named {args[0]!r}")
    for a in args:
        looks_like_path = "/" in a and not a.startswith(("-", "http"))
        made_here = Path(a).is_relative_to(ctx.work) or Path(a).is_relative_to(CARRIED)  # by a step, or carried
        if looks_like_path and not made_here and not (REPO / a).exists():
            raise StepFailed(f"{kind} {args[0]}: input {a} does not exist")


def parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    messages = io.StringIO()
    try:
        with contextlib.redirect_stderr(messages), contextlib.redirect_stdout(messages):
            return parser.parse_args(args)
    except SystemExit:
        raise StepFailed(f"command line rejected ({last_line(messages.getvalue())}): {' '.join(args)}") from None


# ---- the steps


def step_env(ctx: Context) -> str:
    out = ctx.sh("check", "env", ctx.device)
    if ctx.dry:
        ctx.facts["slug"] = "dry-run"
        return "wired"
    info = json.loads(out.strip().splitlines()[-1])
    ctx.facts.update(slug=info["device"]["slug"], env=info)
    peers = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    if ctx.device == "cuda" and info["device"]["type"] != "cuda":
        raise StepFailed(f"CUDA is not available ({peers})")
    return f"{info['device']['name']}; {peers}"


def gpu_test_files() -> list[str]:
    """Test files with a test marked gpu (others may need packages the GPU image lacks)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text())  # fmt: skip


def step_tests_gpu(ctx: Context) -> str:
    out = ctx.sh("pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu", *gpu_test_files())
    if ctx.dry:
        return "wired"
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", out)}
    if not counts.get("passed") or counts.get("skipped"):
        raise StepFailed(f"expected GPU tests to run, not skip: {last_line(out)}")
    return last_line(out)


def step_smoke_model(ctx: Context) -> str:
    source = Path(ctx.model or CARRIED / "smollm2")
    missing = "" if source.exists() else f"{source} is missing: run benchmarks/fetch_gpu_wheels.sh and carry .gpu"
    if missing and not ctx.dry:
        raise StepFailed(missing)
    ctx.sh("check", "smoke-model", source, ctx.path("model"), ctx.device)
    if ctx.dry:
        return f"wired ({missing})" if missing else "wired"
    return ("weights from " if any(source.glob("*.safetensors")) else "random weights, config from ") + str(source)


def smoke_data(ctx: Context, pairs: int) -> Path:
    """The first `pairs` training pairs (one batch, repeated every step)."""
    path = ctx.path(f"train{pairs}.jsonl")
    if not ctx.dry:
        lines = (DATA / "train.jsonl").read_text().splitlines()[:pairs]
        atomic_write(path, "\n".join(lines) + "\n")
    return path


def train_args(ctx: Context, out: str, *extra: str) -> list:
    return ["--model", ctx.path("model"), "--data", smoke_data(ctx, 2), "--out", ctx.path(out), "--batch-size", "2",
            "--max-steps", "6", "--lr", "3e-3", "--scheduler", "constant", "--lora-targets", "all-linear",
            "--max-length", "128", "--max-prompt-length", "64", "--device", ctx.device, "--no-progress", "--no-plot",
            *extra]  # fmt: skip


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in records if r.get("split", "train") == "train" and "loss" in r]


def check_falling(run_dir: Path, first: float | None = None) -> str:
    seen = losses(run_dir)
    if len(seen) < 2 or not all(v == v and abs(v) < float("inf") for v in seen):
        raise StepFailed(f"losses {seen}")
    if first is not None and abs(seen[0] - first) > 1e-3:
        raise StepFailed(f"first loss {seen[0]:.4f}, expected {first:.4f} (policy = reference)")
    if not seen[-1] < seen[0]:
        raise StepFailed(f"loss did not fall: {seen}")
    if not (run_dir / "adapter" / "adapter_model.safetensors").exists():
        raise StepFailed("no adapter written")
    return "loss " + " -> ".join(f"{v:.4g}" for v in (seen[0], seen[-1])) + f" over {len(seen)} steps"


def step_sft(ctx: Context) -> str:
    ctx.sh("minidpo", "sft", *train_args(ctx, "sft"))
    return "wired" if ctx.dry else check_falling(ctx.path("sft"))


def step_train_lora(ctx: Context) -> str:
    ctx.sh("minidpo", "train", *train_args(ctx, "dpo"))
    return "wired" if ctx.dry else check_falling(ctx.path("dpo"), first=0.6931)


def step_train_qlora(ctx: Context) -> str:
    if ctx.dry:  # the parsers are imported here already
        from minidpo.cli import build_parser as minidpo_parser

        usage = minidpo_parser("train")._subparsers._group_actions[0].choices["train"].format_help()
    else:  # this process keeps clear of torch
        usage = subprocess.run(ctx.argv("minidpo", ["train", "--help"]), cwd=REPO, capture_output=True, text=True,
                               timeout=max(1.0, ctx.remaining())).stdout  # fmt: skip
    if "--quantize" not in usage:
        return "skipped: minidpo train has no --quantize yet"
    ctx.sh("minidpo", "train", *train_args(ctx, "qlora", "--quantize", "nf4"))
    return "wired" if ctx.dry else check_falling(ctx.path("qlora"), first=0.6931)


def step_merge(ctx: Context) -> str:
    ctx.sh("minidpo", "merge", "--model", ctx.path("model"), "--adapter", ctx.path("dpo", "adapter"),
           "--out", ctx.path("merged"))  # fmt: skip
    out = ctx.sh("check", "merge-equal", ctx.path("model"), ctx.path("dpo", "adapter"), ctx.path("merged"), ctx.device)
    return "wired" if ctx.dry else last_line(out)


def generate_args(ctx: Context, *extra: str) -> list:
    return ["generate", "--model", ctx.path("merged"), "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS,
            "--device", ctx.device, *extra]  # fmt: skip


def step_generate(ctx: Context) -> str:
    eager = ctx.sh("minidpo", *generate_args(ctx))
    counts = ctx.stderr.strip()  # "[1: P prompt + N completion tokens, REASON]"
    t0 = time.monotonic()
    compiled = ctx.sh("minidpo", *generate_args(ctx, "--compile"))
    if ctx.dry:
        return "wired"
    made = re.search(r"\+ (\d+) completion tokens", counts)
    if not made or int(made.group(1)) == 0:
        raise StepFailed(f"no tokens generated: {counts!r}")
    if (compiled, ctx.stderr.strip()) != (eager, counts):
        raise StepFailed(f"--compile gave {compiled[:60]!r} {ctx.stderr.strip()!r}, eager {eager[:60]!r} {counts!r}")
    ctx.facts["generated"] = eager.removesuffix("\n")  # the streamed text, then one newline
    return f"eager == --compile, {made.group(1)} tokens (compiled run {time.monotonic() - t0:.0f} s)"


def step_serve(ctx: Context) -> str:
    args = ["serve", "--model", ctx.path("merged"), "--port", "0", "--device", ctx.device, "--quiet"]
    if ctx.dry:
        ctx.sh("minidpo", *args)
        return "wired"
    argv = ctx.argv("minidpo", args)
    ctx.log.append("$ " + " ".join(map(str, argv)))
    server = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # fmt: skip
    try:
        url = None
        while url is None and ctx.remaining() > 1:  # "minidpo serve: NAME at http://127.0.0.1:PORT ..."
            line = server.stderr.readline()
            if not line:
                raise StepFailed(f"server exited {server.wait()} before listening")
            ctx.log.append(line.rstrip())
            url = next(iter(re.findall(r"(http://127\.0\.0\.1:\d+\S*)", line)), None)
        if url is None:
            raise subprocess.TimeoutExpired(argv, 0)
        import openai

        client = openai.OpenAI(base_url=url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1"),
                               api_key="unused", timeout=max(5.0, ctx.remaining()))  # fmt: skip
        reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=NEW_TOKENS,
                                               temperature=0, messages=[{"role": "user", "content": PROMPT}])  # fmt: skip
        text = reply.choices[0].message.content or ""
    finally:
        kill_group(server)
    expected = ctx.facts.get("generated")
    if expected is not None and text != expected:
        raise StepFailed(f"server replied {text[:80]!r}, generate gave {expected[:80]!r}")
    return f"openai client: {len(text)} chars" + (", equal to generate's" if expected is not None else "")


def step_eval(ctx: Context) -> str:
    limit = 4
    ctx.sh("minidpo", "eval", "--model", ctx.path("merged"), "--data", DATA / "eval_seen.jsonl", "--limit", limit,
           "--max-new-tokens", "16", "--out", ctx.path("eval"), "--device", ctx.device)  # fmt: skip
    if ctx.dry:
        return "wired"
    report = read_json(ctx.path("eval", "report.json"))
    counts = [int(n) for n in re.findall(r'"n": (\d+)', json.dumps(report))]
    if not counts or max(counts) < limit:
        raise StepFailed(f"report.json counts {counts[:6]}, expected {limit} rows")
    return f"report.json: n = {max(counts)}"


BENCH_ARGS = {
    "sampler": ["--sampler-batches", "1", "8", "--sampler-rounds", "3"],
    "logprob": ["--logprob-n", "16384", "--logprob-vocab", "128256"],
    "dpo_step": ["--dpo-step-reps", "3"],
    "train_step": ["--train-step-seqs", "1024", "4096", "--train-step-no-search"],
}


def bench_step(name: str) -> Callable[[Context], str]:
    def step(ctx: Context) -> str:
        extra = ["--dpo-step-model", ctx.path("model")] if name == "dpo_step" else []
        ctx.sh("benchmarks", name, "--results-dir", ctx.results_dir, *BENCH_ARGS[name], *extra)
        if ctx.dry:
            return "wired"
        result = read_json(newest_result(ctx.results_dir))
        rows = result["benchmarks"][name]["rows"]
        ours = [r for r in rows if str(r.get("impl", "")).startswith("minidpo")]
        bad = [r for r in ours if r.get("status", "ok") != "ok"]
        if not ours or bad:
            raise StepFailed(f"minidpo rows: {len(ours)}, not ok: {[r.get('status') for r in bad][:3]}")
        return f"{len(rows)} rows, {len(ours)} minidpo rows ok"

    return step


def step_bench_serve(ctx: Context) -> str:
    """The server under load (benchmarks/server_load.py) on the smoke model, continuous batching
    then --static-batching: does a full batch pay where decode is memory-bound? Its rows stay
    in the work folder (the device tool brings back 8 files); the detail line has the numbers."""
    for label, extra in (("continuous", []), ("static (--static-batching)", ["--server-arg=--static-batching"])):
        ctx.sh("server_load", "--model", ctx.path("model"), "--duration", "20", "--burst", "20", "--label", label,
               "--results-dir", ctx.path("server-load"), f"--server-arg=--device={ctx.device}", *extra,
               "--note", "gpu_check: the smoke model, 20 s each, continuous then --static-batching")  # fmt: skip
    if ctx.dry:
        return "wired"
    files = sorted(ctx.path("server-load").glob("server-load-*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise StepFailed(f"no server-load-*.json in {ctx.path('server-load')}")
    rows = {r["server"]: r for r in read_json(files[-1])["rows"]}
    cont, static = rows["continuous"], rows["static (--static-batching)"]
    if cont["failed"] or static["failed"]:
        raise StepFailed(f"failed requests: continuous {cont['failed']}, static {static['failed']}")
    ratio = cont["completion_tokens_per_s"] / max(static["completion_tokens_per_s"], 1e-9)
    return (f"tokens/s continuous {cont['completion_tokens_per_s']}, static {static['completion_tokens_per_s']} "
            f"({ratio:.2f}x); TTFT p50 {cont['ttft_p50_ms']} vs {static['ttft_p50_ms']} ms")  # fmt: skip


def newest_result(results_dir: Path) -> Path:
    files = [p for p in results_dir.glob("*.json")
             if not p.stem.endswith(("-gpu-check", "-tiny")) and not p.stem.startswith("server-load-")]  # fmt: skip
    return max(files, key=lambda p: p.stat().st_mtime)


STEPS: list[tuple[str, float, Callable[[Context], str]]] = [
    ("env", 20, step_env),
    ("tests-gpu", 120, step_tests_gpu),
    ("smoke-model", 40, step_smoke_model),
    ("sft", 60, step_sft),
    ("train-lora", 60, step_train_lora),
    ("train-qlora", 60, step_train_qlora),
    ("merge", 40, step_merge),
    ("generate", 90, step_generate),
    ("serve", 60, step_serve),
    ("eval", 60, step_eval),
    ("bench-sampler", 150, bench_step("sampler")),
    ("bench-logprob", 100, bench_step("logprob")),
    ("bench-dpo_step", 90, bench_step("dpo_step")),
    ("bench-train_step", 120, bench_step("train_step")),
    ("bench-serve", 120, step_bench_serve),
]


def run_step(ctx: Context, name: str, cap: float, fn: Callable[[Context], str]) -> Result:
    ctx.step_deadline = min(ctx.deadline, time.monotonic() + cap)
    ctx.log = []
    if not ctx.dry and ctx.deadline - time.monotonic() < min(cap, 10):
        return Result(name, "skipped", 0.0, f"no time left of the budget (needs up to {cap:.0f} s)")
    t0 = time.monotonic()
    try:
        detail = fn(ctx)
        status = "skipped" if detail.startswith("skipped") else ("wired" if ctx.dry else "ok")
    except subprocess.TimeoutExpired:
        status, detail = "timeout", f"stopped after {time.monotonic() - t0:.0f} s (cap {cap:.0f} s)"
    except StepFailed as e:
        status, detail = "FAIL", str(e)
    except Exception as e:  # a bug in a step must not stop the others
        status, detail = "FAIL", f"{type(e).__name__}: {e}"
    log = "\n".join(ctx.log)
    return Result(name, status, round(time.monotonic() - t0, 1), detail, log[-LOG_TAIL_CHARS:])


# ---- results


def write_results(ctx: Context, results: list[Result], started: str, *, final: bool = True) -> Path:
    """The summary json and md (after every step, so a run killed from outside keeps what it
    finished), and at the end the png."""
    slug = ctx.facts.get("slug", "unknown-device")
    stem = ctx.results_dir / f"{slug}-{dt.date.today().isoformat()}-gpu-check"
    summary = {
        "started": started,
        "dry_run": ctx.dry,
        "device": ctx.device,
        "env": ctx.facts.get("env"),
        "steps": [dataclasses.asdict(r) for r in results],
    }
    atomic_write_json(stem.with_suffix(".json"), summary)
    atomic_write(stem.with_suffix(".md"), render_markdown(summary))
    out = os.environ.get("OUT")
    full = out and Path(out).resolve() == ctx.results_dir.resolve() and len(list(ctx.results_dir.iterdir())) >= OUT_FILES
    if final and not full:
        plot_steps(results, stem.with_suffix(".png"), title=f"gpu_check: {slug}, {started[:10]}")  # (the md has it all)
    return stem


def render_markdown(summary: dict) -> str:
    from benchmarks.report import markdown_table

    env = summary.get("env") or {}
    lines = [f"# gpu_check, {summary['started']}", ""]
    if env:
        lines += [f"- device: {env['device']['name']}",
                  "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), ""]  # fmt: skip
    rows = [{k: s[k] for k in ("step", "status", "seconds", "detail")} for s in summary["steps"]]
    return "\n".join(lines + [markdown_table(rows), ""])


def plot_steps(results: list[Result], path: Path, *, title: str) -> None:
    """Seconds per step, coloured by status (skipped when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    colours = {"ok": "tab:green", "wired": "tab:green", "FAIL": "tab:red", "timeout": "tab:orange"}
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(results) + 1.2))
    names = [r.step for r in results][::-1]
    ax.barh(names, [r.seconds for r in results][::-1], color=[colours.get(r.status, "tab:gray") for r in results][::-1])
    ax.set_xlabel("seconds (green ok, red FAIL, orange timeout, grey skipped)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(results: list[Result]) -> str:
    width = max(len(r.step) for r in results)
    lines = [f"{'step':<{width}}  status   seconds  detail"]
    lines += [f"{r.step:<{width}}  {r.status:<7}  {r.seconds:>7.1f}  {r.detail[:110]}" for r in results]
    return "\n".join(lines)


# ---- entry points


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check", description="One call on an H100/H200 (see the module docstring).")
    p.add_argument("--dry-run", action="store_true", help="check every step's wiring on this machine; run nothing")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for everything (default %(default)s)")
    p.add_argument("--only", help="comma-separated steps to run")
    p.add_argument("--skip", help="comma-separated steps to leave out")
    p.add_argument("--model", help="SmolLM2-135M-Instruct folder with real weights (default: random weights)")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu runs the smoke on a CPU, slowly")
    p.add_argument("--results-dir", type=Path, help="default: $OUT, else benchmarks/results (dry run: a temp dir)")
    p.add_argument("--work", help="folder for models and runs (default: a new temp dir)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"]:
        return run_check(argv[1:])
    args = build_parser().parse_args(argv)
    names = [name for name, _, _ in STEPS]
    chosen = set(args.only.split(",")) if args.only else set(names)
    chosen -= set(args.skip.split(",")) if args.skip else set()
    unknown = chosen - set(names)
    if unknown:
        build_parser().error(f"unknown step {', '.join(sorted(unknown))}; steps: {', '.join(names)}")
    if args.results_dir is None:
        out = os.environ.get("OUT")
        args.results_dir = (Path(tempfile.mkdtemp(prefix="gpu_check_dry.")) if args.dry_run
                            else Path(out) if out else REPO / "benchmarks" / "results")  # fmt: skip
    args.results_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(args)
    started = dt.datetime.now().isoformat(timespec="seconds")
    print(f"gpu_check: work {ctx.work}, results {args.results_dir}, budget {args.budget:.0f} s"
          + (" (dry run)" if ctx.dry else ""), flush=True)  # fmt: skip
    results: list[Result] = []
    try:
        for name, cap, fn in STEPS:
            if name in chosen or name == "env":  # env names the results files
                print(f"== {name}", flush=True)
                results.append(run_step(ctx, name, cap, fn))
                print(f"   {results[-1].status} {results[-1].seconds:.1f} s: {results[-1].detail}", flush=True)
                write_results(ctx, results, started, final=False)
    finally:
        stem = write_results(ctx, results, started)
        print(f"\nwrote {stem}.json, .md, .png\n\n{table(results)}", flush=True)
    return 0 if all(r.status in ("ok", "wired", "skipped") for r in results) else 1


# ---- checks that need torch, run as subprocesses: python -m benchmarks.gpu_check check NAME ...


def check_env(device: str) -> None:
    import importlib.metadata

    import torch

    from benchmarks._harness import PEERS, device_info

    dev = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
    versions = {}
    for module, dist in PEERS + (("openai", "openai"),):
        try:
            versions[module] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[module] = None
    print(json.dumps({"device": device_info(dev), "versions": versions, "python": sys.version.split()[0]}))


def check_smoke_model(source: str, out: str, device: str) -> None:
    """A SmolLM2 folder in bf16 at `out`: `source`'s weights, or random ones when it has none."""
    import torch

    from minidpo.checkpoint import load_model, save_model
    from minidpo.config import ModelConfig
    from minidpo.model import LlamaForCausalLM

    src = Path(source)
    if any(src.glob("*.safetensors")):
        model, _ = load_model(src, dtype=torch.bfloat16)
    else:
        torch.manual_seed(0)
        config = ModelConfig.from_dict(read_json(src / "config.json"), source=str(src / "config.json"))
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    save_model(model, out, tokenizer_from=src)
    model, _ = load_model(out, dtype=torch.bfloat16, device=device)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), device=device)  # (2, 16)
    logits = model.lm_head(model(ids)).float()  # (2, 16, V)
    if not torch.isfinite(logits).all():
        raise SystemExit("non-finite logits")
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, logits finite")


def check_merge_equal(base: str, adapter: str, merged: str, device: str) -> None:
    """Logits of base + adapter (unmerged, float32) against the merged folder's (its dtype, upcast)."""
    import torch

    from minidpo.checkpoint import load_model
    from minidpo.lora import load_adapter

    with torch.no_grad():
        model, _ = load_model(base, dtype=torch.float32, device=device)
        load_adapter(model, adapter)
        model.eval()
        ids = torch.randint(0, model.config.vocab_size, (2, 32), device=device)  # (2, 32)
        ref = model.lm_head(model(ids)).float()  # (2, 32, V)
        out, _ = load_model(merged, device=device)
        got = out.lm_head(out(ids)).float()  # (2, 32, V)
    err = float((got - ref).norm() / ref.norm())
    tol = 1e-5 if read_json(Path(merged) / "config.json").get("torch_dtype") == "float32" else 2e-2
    if not err < tol:
        raise SystemExit(f"merged logits differ from base + adapter: relative error {err:.3g} >= {tol}")
    print(f"merged logits = base + adapter (relative error {err:.2g} < {tol})")


CHECKS = {"env": check_env, "smoke-model": check_smoke_model, "merge-equal": check_merge_equal}


def run_check(argv: list[str]) -> int:
    if not argv or argv[0] not in CHECKS:
        print(f"gpu_check check: choose from {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    CHECKS[argv[0]](*argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
