"""The benchmark harness: ceilings, timing, peak memory, model shapes, peers.

`python -m benchmarks` builds one `Context`, measures the device's two ceilings in the
same run (copy bandwidth and matmul rate, METHOD.md: "two numbers first"), then calls
each chosen benchmark module's `run(ctx)` and writes what they return.

How a benchmark module plugs in (benchmarks/<name>.py, found automatically):

    NAME = "logprob"                      # family name: table heading, PNG name
    PLOT = {"x": "vocab", "y": "ms", "series": ("impl",), "logx": True}   # optional
    def add_arguments(parser): ...        # optional; prefix options: --logprob-vocab
    def run(ctx) -> list[dict]: ...       # rows of scalars (str, int, float, bool, None)

A row is one measured configuration: say what was run (impl, model, seq, ...) and what
came out (ms, tokens_per_s, frac_of_peak, peak_mem_gib, ...). Use `ctx.time(fn)` and
`ctx.peak_memory(fn)`, `ctx.bandwidth_fraction(bytes, seconds)` and
`ctx.flops_fraction(flops, seconds)` so every module measures the same way; skip a
peer that is not importable (`ctx.peers[name] is None`) with a row saying so rather
than raising; catch out-of-memory per configuration (`ctx.is_oom(exc)`) and record
`"status": "oom"`. With `ctx.tiny` use CPU-sized shapes: the test suite runs every
module that way (tests/test_benchmarks.py), so keep tiny runs to a few seconds.

Timing follows /work/.library/device/METHOD.md: on CUDA, one pair of CUDA events
around each call after warm-up, median of many repeats, inputs rotated so that their
total exceeds the L2 cache (`ctx.rotations(bytes_per_call)` says how many sets); on the
CPU, time.perf_counter after warm-up, median. Peak memory: on CUDA
torch.cuda.max_memory_allocated (all live tensors, model weights included); on Linux
CPUs the process's peak resident set (VmHWM, reset through /proc/self/clear_refs),
which includes the interpreter and libraries; None where neither is available.

Peer comparisons (`interleaved`): on a shared machine a neighbour's load can slow one
implementation and not the other, so a comparison of two runs made one after the other
measures the load, not the code. Each implementation runs as a worker in a fresh process
(no allocator, cache or compiled state carried over), alternating A B A B ... for at
least 5 pairs in full runs; each pair's ratio is taken within the pair, and the rows
report the median, min and max of those ratios. Every row records the 1-minute load
average (the highest sampled before and after each worker) and the threads the workers
used; a row measured with the load above the core count is marked `busy` and the run
warns: its numbers say little about the code and must be redone on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time as _time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
MIN_PAIRS = 5  # full-size peer comparisons: at least this many A B pairs

# Peers recorded in every result file: (import name, distribution name).
PEERS = (
    ("torch", "torch"),
    ("triton", "triton"),
    ("transformers", "transformers"),
    ("peft", "peft"),
    ("trl", "trl"),
    ("liger_kernel", "liger-kernel"),
)

# Real model shapes as HF config.json dicts (random weights: speed does not depend on values).
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "Llama-3-8B": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "Llama-2-7B": {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    },
    "Qwen2-7B": {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 131072,
        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151643,
    },
    "SmolLM2-135M": {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    },
    # CPU-sized stand-in for --tiny runs: a Llama with every feature on, seconds to run.
    "tiny": {
        "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 1024,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    },
}


def model_config(name: str):
    """The ModelConfig of a registered shape (see MODEL_SHAPES)."""
    from minidpo.config import ModelConfig

    return ModelConfig.from_dict(dict(MODEL_SHAPES[name]), source=f"benchmarks shape {name}")


def forward_flops(config, seq_len: int, *, sequences: int = 1, head_tokens: int | None = None) -> float:
    """Model FLOPs of one forward pass over `sequences` causal sequences of `seq_len` tokens.

    Two FLOPs per multiply-add: 2 x (block weights) per token; causal attention
    2 x L x d_q x T^2 per sequence (QK^T and AV are 4 d_q FLOPs per query-key pair, and
    half of the T^2 pairs are masked); the output projection 2 x V x D for each of
    `head_tokens` tokens (default: every token). Norms, RoPE and softmax are left out.
    """
    d, v = config.hidden_size, config.vocab_size
    block_params = config.num_parameters - v * d * (1 if config.tie_word_embeddings else 2)
    tokens = sequences * seq_len
    head_tokens = tokens if head_tokens is None else head_tokens
    attention = 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len**2
    return 2.0 * block_params * tokens + attention * sequences + 2.0 * v * d * head_tokens


@dataclasses.dataclass
class Timing:
    """Median and spread (20th..80th percentile) of `reps` timed calls, in milliseconds."""

    median_ms: float
    q20_ms: float
    q80_ms: float
    reps: int

    @property
    def seconds(self) -> float:
        return self.median_ms / 1e3


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    i = q * (len(sorted_values) - 1)
    lo, hi = math.floor(i), math.ceil(i)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (i - lo)


@dataclasses.dataclass
class Context:
    """What every benchmark gets: the device, measured ceilings, peers, and the timers."""

    device: torch.device
    dtype: torch.dtype  # the compute dtype benchmarks use: bf16 on CUDA, fp32 on CPU
    tiny: bool
    args: argparse.Namespace
    ceilings: dict[str, Any] = dataclasses.field(default_factory=dict)
    peers: dict[str, str | None] = dataclasses.field(default_factory=dict)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def default_reps(self) -> tuple[int, int]:
        """(warmup, rep) for a call of unknown cost on this device and size."""
        if self.tiny:
            return 1, 3
        return (10, 50) if self.is_cuda else (2, 7)

    def time(
        self,
        fn: Callable[..., Any],
        *,
        warmup: int | None = None,
        rep: int | None = None,
        inputs: Sequence[Sequence[Any]] | None = None,
    ) -> Timing:
        """Median time of `fn()`, or of `fn(*inputs[i % len(inputs)])` rotating input sets."""
        dw, dr = self.default_reps()
        warmup = dw if warmup is None else warmup
        rep = dr if rep is None else rep
        if self.tiny:
            warmup, rep = min(warmup, 1), min(rep, 3)
        sets = list(inputs) if inputs else [()]
        for i in range(warmup):
            fn(*sets[i % len(sets)])
        self.synchronize()
        times_ms: list[float] = []
        if self.is_cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rep)]
            for i, (start, end) in enumerate(events):
                args = sets[(warmup + i) % len(sets)]
                start.record()
                fn(*args)
                end.record()
            torch.cuda.synchronize(self.device)
            times_ms = [s.elapsed_time(e) for s, e in events]
        else:
            for i in range(rep):
                args = sets[(warmup + i) % len(sets)]
                t0 = _time.perf_counter()
                fn(*args)
                times_ms.append((_time.perf_counter() - t0) * 1e3)
        times_ms.sort()
        return Timing(statistics.median(times_ms), _quantile(times_ms, 0.2), _quantile(times_ms, 0.8), rep)

    def rotations(self, bytes_per_call: int, *, limit: int = 32) -> int:
        """How many input sets make the rotation's total exceed twice the L2 cache (1 on CPU)."""
        if not self.is_cuda or bytes_per_call <= 0:
            return 1
        l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 50 * 2**20)
        return max(1, min(limit, math.ceil(2 * l2 / bytes_per_call)))

    def peak_memory(self, fn: Callable[[], Any]) -> int | None:
        """Peak bytes while `fn()` runs once: CUDA allocator peak, or process peak RSS on CPU."""
        gc.collect()
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if not _reset_peak_rss():
            fn()
            return None
        fn()
        return _peak_rss()

    @staticmethod
    def is_oom(exc: BaseException) -> bool:
        """Whether `exc` is the device running out of memory (record it, don't raise)."""
        return isinstance(exc, torch.cuda.OutOfMemoryError) or (
            isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
        )

    def release_memory(self) -> None:
        """Return cached blocks after an OOM or between configurations."""
        gc.collect()
        if self.is_cuda:
            torch.cuda.empty_cache()

    def flops_fraction(self, flops: float, seconds: float) -> float | None:
        """Achieved FLOP/s over the measured matmul ceiling."""
        peak = self.ceilings.get("matmul_tflops")
        return None if not peak or seconds <= 0 else flops / seconds / (peak * 1e12)

    def bandwidth_fraction(self, nbytes: float, seconds: float) -> float | None:
        """Achieved bytes/s (read + write) over the measured copy ceiling."""
        peak = self.ceilings.get("copy_gbps")
        return None if not peak or seconds <= 0 else nbytes / seconds / (peak * 1e9)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset VmHWM to the current resident set
        return _peak_rss() is not None
    except OSError:
        return False


def _peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure_ceilings(ctx: Context) -> dict[str, Any]:
    """Copy bandwidth (bytes read + written) and matmul rate on random data, on ctx.device.

    CUDA: a 1 GiB device-to-device copy and a bf16 8192^3 product. CPU: 256 MiB and an
    fp32 2048^3 product (tiny runs: 32 MiB and 512^3; numbers only sanity-check the path).
    """
    if ctx.is_cuda:
        copy_bytes, n, mm_dtype, warmup, rep = 2**30, 8192, torch.bfloat16, 5, 20
    elif ctx.tiny:
        copy_bytes, n, mm_dtype, warmup, rep = 32 * 2**20, 512, torch.float32, 1, 3
    else:
        copy_bytes, n, mm_dtype, warmup, rep = 256 * 2**20, 2048, torch.float32, 2, 7
    t_copy = _time_copy(ctx, copy_bytes, warmup, rep)
    t_mm = _time_matmul(ctx, n, mm_dtype, warmup, rep)
    ctx.release_memory()
    return {
        "copy_gbps": 2 * copy_bytes / t_copy.seconds / 1e9,
        "copy_bytes": copy_bytes,
        "matmul_tflops": 2 * n**3 / t_mm.seconds / 1e12,
        "matmul_shape": [n, n, n],
        "matmul_dtype": str(mm_dtype).removeprefix("torch."),
    }


def _time_copy(ctx: Context, nbytes: int, warmup: int, rep: int) -> Timing:
    src = torch.randn(nbytes // 4, device=ctx.device, dtype=torch.float32)  # (nbytes/4,)
    dst = torch.empty_like(src)
    return ctx.time(lambda: dst.copy_(src), warmup=warmup, rep=rep)


def _time_matmul(ctx: Context, n: int, dtype: torch.dtype, warmup: int, rep: int) -> Timing:
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)  # (n, n)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)  # (n, n)
    return ctx.time(lambda: torch.mm(a, b), warmup=warmup, rep=rep)


def peer_versions() -> dict[str, str | None]:
    """Version of each peer that is importable here, None for the others (nothing is imported)."""
    out: dict[str, str | None] = {}
    for module, dist in PEERS:
        if importlib.util.find_spec(module) is None:
            out[module] = None
            continue
        try:
            out[module] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[module] = "unknown"
    return out


def device_info(device: torch.device) -> dict[str, Any]:
    """Name, file-name slug ("nvidia-h100", "cpu-amd-epyc") and a few facts of the device."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        slug_words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
        slug_words = [w for w in slug_words if not re.fullmatch(r"\d+gb|hbm\d*e?|sxm\d*|pcie|nvl|mig.*", w)]
        return {
            "type": "cuda",
            "name": name,
            "slug": "-".join(slug_words),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda,
        }
    name = _cpu_model() or platform.machine() or "unknown"
    words = re.sub(r"\(r\)|\(tm\)|@.*$|\bcpu\b|\bprocessor\b|\d+-core", " ", name.lower())
    slug_words = [w for w in re.split(r"[^a-z0-9]+", words) if w]
    return {
        "type": "cpu",
        "name": name,
        "slug": "-".join(["cpu", *slug_words[:4]]),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def today() -> str:
    return _dt.date.today().isoformat()


# ---- fair peer comparisons: interleaved fresh processes


def machine_load() -> float:
    """The 1-minute load average (runnable and waiting processes), or nan where unknown."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


@dataclasses.dataclass
class Interleaved:
    """What `interleaved` measured: each implementation's worker results, pair by pair."""

    results: dict[str, list[dict]]  # impl -> one result per pair, in run order (status "ok" or why not)
    loads: list[float]  # the load average sampled before and after every worker
    cores: int

    def ok(self, impl: str) -> list[dict]:
        return [r for r in self.results[impl] if r.get("status") == "ok"]

    def median(self, impl: str, key: str) -> float | None:
        values = [r[key] for r in self.ok(impl) if isinstance(r.get(key), (int, float))]
        return statistics.median(values) if values else None

    def ratios(self, impl: str, base: str, key: str) -> list[float]:
        """value(impl) / value(base) within each pair where both ran."""
        out = []
        for a, b in zip(self.results[impl], self.results[base]):
            x, y = a.get(key), b.get(key)
            if a.get("status") == b.get("status") == "ok" and isinstance(x, (int, float)) and isinstance(y, (int, float)) and y:
                out.append(x / y)
        return out

    def ratio_columns(self, impl: str, base: str, key: str, name: str) -> dict[str, Any]:
        """{name: median, name_min, name_max, name_pairs: "r1 r2 ..."} of the pair-by-pair ratios."""
        r = self.ratios(impl, base, key)
        if not r:
            return {name: None}
        return {name: statistics.median(r), f"{name}_min": min(r), f"{name}_max": max(r),
                f"{name}_pairs": " ".join(f"{x:.3g}" for x in r)}

    @property
    def load_max(self) -> float:
        finite = [x for x in self.loads if not math.isnan(x)]
        return max(finite) if finite else math.nan

    @property
    def busy(self) -> bool:
        return self.load_max > self.cores

    def machine_columns(self, impl: str) -> dict[str, Any]:
        """rounds run (A B pairs), threads the workers used, the highest load average, and the busy mark."""
        threads = sorted({r["threads"] for r in self.ok(impl) if "threads" in r})
        return {"rounds": len(self.ok(impl)), "threads": threads[0] if len(threads) == 1 else " ".join(map(str, threads)) or None,
                "load_avg": round(self.load_max, 2), "busy": self.busy}


def interleaved(
    runners: Mapping[str, Callable[[], dict]],
    pairs: int,
    *,
    log: Callable[[str], None] = lambda message: print(message, flush=True),
) -> Interleaved:
    """Run each implementation once per pair, A B A B ..., `pairs` times; warn when busy.

    A runner returns a result dict with "status": "ok" and its numbers, or a status that
    says why not ("skipped: ...", "error: ..."); an implementation that failed is not run
    again. `fresh_process(command)` makes a runner that starts a new Python process each
    time (the default for peer comparisons); a runner may also call into this process
    where a fresh one per pair costs too much (an 8B model compiled anew on a GPU).
    """
    cores = os.cpu_count() or 1
    results: dict[str, list[dict]] = {impl: [] for impl in runners}
    loads: list[float] = []
    for pair in range(pairs):
        for impl, runner in runners.items():
            if results[impl] and results[impl][-1].get("status") != "ok":
                results[impl].append({"status": "not run: failed before"})
                continue
            loads.append(machine_load())
            t0 = _time.perf_counter()
            result = runner()
            loads.append(machine_load())
            results[impl].append(result)
            log(f"  pair {pair + 1}/{pairs} {impl}: {result.get('status')} in {_time.perf_counter() - t0:.1f} s "
                f"(load average {loads[-1]:.2f} on {cores} cores)")
    run = Interleaved(results, loads, cores)
    if run.busy:
        log(f"warning: the load average reached {run.load_max:.2f} on {cores} cores: these rows are marked busy; "
            "their times measure the machine's load as much as the code: rerun on a quiet machine")
    return run


def fresh_process(module: str, *args: Any, timeout: float | None = None) -> Callable[[], dict]:
    """A runner for `interleaved`: `python -m module args...` in a new process each call.

    The worker prints one JSON object on its last stdout line (`worker_output`).
    """
    command = [sys.executable, "-m", module, *map(str, args)]

    def run() -> dict:
        try:
            proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": f"error: no result within {timeout} s"}
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {"status": f"{'skipped' if 'ModuleNotFoundError' in last else 'error'}: {last[:200]}"}
        try:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {"status": "error: the worker printed no JSON result"}

    return run


def worker_output(result: dict) -> None:
    """Print a worker's result as the JSON line `fresh_process` reads, with its thread count."""
    print(json.dumps(worker_result(result)), flush=True)


def worker_result(result: dict) -> dict:
    """An "ok" result with the threads PyTorch used for it."""
    return {"status": "ok", "threads": torch.get_num_threads(), **result}
