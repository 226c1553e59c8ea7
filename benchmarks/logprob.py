"""Token log-probs and the fused lm_head: minidpo's kernels vs eager, torch.compile and Liger.

Two families of rows (`bench` column), each timed forward only (`fwd`) and forward plus
backward (`fwd+bwd`: the output summed, then torch.autograd.grad, so no .grad accumulation):

  token   logits (N, V) in the compute dtype (bf16 on CUDA) -> (N,) log-probs, for
          N in {4096, 16384} and V in {32000, 49152, 128256, 151936} (Llama-2, SmolLM2,
          Llama-3, Qwen2 vocabularies).
          minidpo   kernels.token_logprobs (Triton on CUDA; the chunked reference on a CPU)
          eager     logits.float().log_softmax(-1).gather(target), what DPO code does
          compile   torch.compile of eager (compiled afresh for each shape)
          liger     Liger-Kernel's cross entropy, reduction "none", negated (when importable;
                    it writes its gradient over the logits during the forward)
  head    hidden (N, D) and lm_head weight (V, D) -> (N,) log-probs, D=4096, V=128256,
          N=16384 (Llama-3-8B's head). `fwd+bwd` gives gradients of hidden and weight;
          `fwd+bwd-frozen` of hidden only (LoRA: the head is frozen).
          minidpo             kernels.linear_token_logprobs, default grad_mode "auto"
                              (in_forward for the frozen weight, recompute otherwise)
          minidpo-recompute   grad_mode "recompute" with the frozen weight, to compare
          eager / compile     hidden @ weight.T, then the eager log-prob above
          liger               Liger's fused linear cross entropy, reduction "sum"

What is counted. Bytes (token rows): the fewest a pass must move, N*V*b for the forward
(read the logits once; b bytes per element) and 3*N*V*b with the backward (read them again,
write the gradient), whatever the implementation; `gbps` is those bytes over the median time
and `frac_copy` that rate over the copy bandwidth measured in the same run, so it reads as
"fraction of the floor reached". FLOPs (head rows): model FLOPs 2NVD forward, 6NVD with both
gradients, 4NVD with the weight frozen; `frac_mm` is over the measured matmul rate.
`extra_gib` is the CUDA allocator's peak during one call minus what was allocated before it
(inputs and weights excluded). Timing alternates the implementations of one shape and pass
(harness `interleaved`, in this process: A B C A B C ..., 5 rounds, each round a median of a
few calls), so a load that comes and goes falls on all of them alike; `ms` is the median over
the rounds, and `x_eager` / `x_compile` the median of the round-by-round speed-ups over those
rows (`*_min`, `*_max`, `*_pairs` give the spread); `mem_vs_eager` divides extra memory by eager's. `rel_err` is
||out - eager_fp32|| / ||eager_fp32|| over the log-probs and the gradients of one call on
fresh inputs. Inputs are random normal logits (never zeros) and targets with no ignored rows
(ignored rows would let the fused kernels skip reading them).

Targets from issue 3 (ratios within one run): token fwd frac_copy >= 0.85; token fwd+bwd
x_eager >= 3 and x_compile >= 1.3; head mem_vs_eager <= 0.1 at x_eager >= 1.0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from minidpo.kernels import linear_token_logprobs, token_logprobs

from benchmarks._harness import MIN_PAIRS, Context, interleaved

NAME = "logprob"
PLOT = {"x": "vocab", "y": "ms", "series": ("bench", "impl", "pass", "n"), "logx": True}

TOKEN_IMPLS = ("minidpo", "eager", "compile", "liger")
HEAD_IMPLS = ("minidpo", "minidpo-recompute", "eager", "compile", "liger")
IGNORE_INDEX = -100


def add_arguments(parser) -> None:
    parser.add_argument("--logprob-n", type=int, nargs="+", metavar="N", help="token rows (default 4096 16384 on CUDA)")
    parser.add_argument("--logprob-vocab", type=int, nargs="+", metavar="V",
                        help="vocabulary sizes (default 32000 49152 128256 151936 on CUDA)")
    parser.add_argument("--logprob-head", type=int, nargs=3, metavar=("N", "V", "D"),
                        help="fused-head shape (default 16384 128256 4096 on CUDA)")
    parser.add_argument("--logprob-pairs", type=int, metavar="R",
                        help=f"rounds of alternating timings per shape and pass (default {MIN_PAIRS})")
    parser.add_argument("--logprob-impls", nargs="+", choices=sorted(set(TOKEN_IMPLS + HEAD_IMPLS)),
                        help="implementations to run (default all)")


def settings(ctx: Context) -> tuple[list[int], list[int], tuple[int, int, int], set[str]]:
    """(token Ns, vocabularies, head (N, V, D), implementations) for this device and size."""
    if ctx.tiny:
        ns, vocabs, head = [64], [1000], (128, 512, 64)
    elif ctx.is_cuda:
        ns, vocabs, head = [4096, 16384], [32000, 49152, 128256, 151936], (16384, 128256, 4096)
    else:
        ns, vocabs, head = [1024], [32000, 49152], (1024, 32000, 576)
    args = ctx.args
    impls = set(getattr(args, "logprob_impls", None) or TOKEN_IMPLS + HEAD_IMPLS)
    return (getattr(args, "logprob_n", None) or ns, getattr(args, "logprob_vocab", None) or vocabs,
            tuple(getattr(args, "logprob_head", None) or head), impls)


def eager_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logp = logits.float().log_softmax(dim=-1)  # (N, V) float32
    picked = logp.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)  # (N,)
    return torch.where(targets != IGNORE_INDEX, picked, 0.0)


def eager_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return eager_logprobs(hidden @ weight.T, targets)  # logits (N, V) in the compute dtype


def compiled(fn: Callable) -> Callable:
    """torch.compile of fn with a clean cache, so each shape gets its own static graph."""
    torch._dynamo.reset()
    return torch.compile(fn)


def liger_token(ctx: Context) -> Callable | str:
    if ctx.peers.get("liger_kernel") is None:
        return "skipped: liger_kernel not importable"
    if not ctx.is_cuda:
        return "skipped: Liger needs CUDA"
    from liger_kernel.transformers.functional import liger_cross_entropy

    return lambda logits, targets: -liger_cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")


def liger_head(ctx: Context) -> Callable | str:
    if ctx.peers.get("liger_kernel") is None:
        return "skipped: liger_kernel not importable"
    if not ctx.is_cuda:
        return "skipped: Liger needs CUDA"
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def head(hidden, weight, targets):
        loss = liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        return -(loss[0] if isinstance(loss, tuple) else loss)

    return head


def token_impls(ctx: Context, chosen: set[str]) -> dict[str, Callable | str]:
    """Implementation name -> fn(logits, targets), or the reason it does not run."""
    impls: dict[str, Callable | str] = {
        "minidpo": token_logprobs,
        "eager": eager_logprobs,
        "compile": "skipped: not compiled in --tiny runs" if ctx.tiny else compiled(eager_logprobs),
        "liger": liger_token(ctx),
    }
    return {name: impl for name, impl in impls.items() if name in chosen}


def head_impls(ctx: Context, chosen: set[str]) -> dict[str, Callable | str]:
    """Implementation name -> fn(hidden, weight, targets), or the reason it does not run."""
    impls: dict[str, Callable | str] = {
        "minidpo": linear_token_logprobs,
        "minidpo-recompute": lambda h, w, t: linear_token_logprobs(h, w, t, grad_mode="recompute"),
        "eager": eager_head_logprobs,
        "compile": "skipped: not compiled in --tiny runs" if ctx.tiny else compiled(eager_head_logprobs),
        "liger": liger_head(ctx),
    }
    return {name: impl for name, impl in impls.items() if name in chosen}


def make_step(impl: Callable, inputs: tuple, grad_of: tuple[int, ...]) -> Callable:
    """A call of impl on inputs, with gradients of the inputs at positions grad_of (if any)."""

    def step():
        out = impl(*inputs)
        if not grad_of:
            return out, ()
        return out, torch.autograd.grad(out.sum(), [inputs[i] for i in grad_of])

    return step


def relative_error(out, grads, ref_out, ref_grads) -> float:
    """Worst of ||x - ref|| / ||ref|| over the output (compared as sums if shapes differ) and grads."""
    pairs = [(out, ref_out) if out.shape == ref_out.shape else (out.sum(), ref_out.sum())]
    pairs += list(zip(grads, ref_grads))
    return max(float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-30))
               for a, b in pairs)


def check(ctx: Context, step_on: Callable[[], Callable], reference, row: dict) -> dict:
    """One call on fresh inputs: rel_err against the float32 eager reference and extra memory."""
    try:
        with torch.no_grad() if row["pass"] == "fwd" else contextlib.nullcontext():
            out, grads = step_on()()  # fresh inputs: Liger overwrites its logits
            row["rel_err"] = relative_error(out, grads, *reference)
            del out, grads
            step = step_on()
            base = torch.cuda.memory_allocated(ctx.device) if ctx.is_cuda else None
            peak = ctx.peak_memory(step)
    except Exception as exc:
        if not ctx.is_oom(exc):
            raise
        ctx.release_memory()
        return {**row, "status": "oom"}
    row["extra_gib"] = None if base is None or peak is None else (peak - base) / 2**30
    row["status"] = "ok"
    return row


def timed_runner(ctx: Context, step_on: Callable[[], Callable], pass_: str) -> Callable[[], dict]:
    """A runner for `interleaved`: one short timing (a median of a few calls) of this impl per pair."""
    step = step_on()
    warmup, rep = ctx.default_reps()
    timings: list = []

    def run() -> dict:
        try:
            with torch.no_grad() if pass_ == "fwd" else contextlib.nullcontext():
                timing = ctx.time(step, warmup=1 if timings else warmup, rep=rep)
        except Exception as exc:
            if not ctx.is_oom(exc):
                raise
            ctx.release_memory()
            return {"status": "oom"}
        timings.append(timing)
        return {"status": "ok", "ms": timing.median_ms, "ms_q20": timing.q20_ms, "ms_q80": timing.q80_ms}

    return run


def measure_shape(ctx: Context, runs: dict[str, tuple[dict, Callable[[], Callable]]], reference,
                  nbytes=None, flops=None) -> list[dict]:
    """Check every impl once, then time them alternating (harness `interleaved`, in this process:
    A B C A B C ..., `--logprob-pairs` rounds) and fill ms (median over the rounds), gbps or
    tflops, and x_eager / x_compile as the median of the round-by-round ratios."""
    rows = {name: check(ctx, step_on, reference, row) for name, (row, step_on) in runs.items()}
    ready = {name: timed_runner(ctx, runs[name][1], row["pass"]) for name, row in rows.items() if row["status"] == "ok"}
    if not ready:
        return list(rows.values())
    pairs = 2 if ctx.tiny else getattr(ctx.args, "logprob_pairs", None) or MIN_PAIRS
    measured = interleaved(ready, pairs, log=lambda message: None)
    for name, row in rows.items():
        if name not in ready:
            continue
        if not measured.ok(name):
            row["status"] = measured.results[name][-1]["status"]
            continue
        ms = measured.median(name, "ms")
        seconds = ms / 1e3
        row.update(ms=ms, ms_q20=measured.median(name, "ms_q20"), ms_q80=measured.median(name, "ms_q80"))
        if nbytes is not None:
            row.update(gbps=nbytes / seconds / 1e9, frac_copy=ctx.bandwidth_fraction(nbytes, seconds))
        if flops is not None:
            row.update(tflops=flops / seconds / 1e12, frac_mm=ctx.flops_fraction(flops, seconds))
        for peer, column in (("eager", "x_eager"), ("compile", "x_compile")):
            if peer in ready and peer != name:
                row |= measured.ratio_columns(peer, name, "ms", column)  # peer's time / this impl's, per round
        row |= measured.machine_columns(name)
    return list(rows.values())


def add_memory_ratios(rows: list[dict]) -> None:
    """mem_vs_eager: extra memory over eager's, for rows of the same shape and pass."""
    def key(r):
        return (r["bench"], r["pass"], r["n"], r["vocab"])

    eager = {key(r): r for r in rows if r.get("status") == "ok" and r["impl"] == "eager"}
    for row in rows:
        base = eager.get(key(row))
        if row.get("status") != "ok" or base is None:
            continue
        extra = base.get("extra_gib")
        row["mem_vs_eager"] = row["extra_gib"] / extra if extra and row["extra_gib"] is not None else None


def token_rows(ctx: Context, ns: list[int], vocabs: list[int], chosen: set[str]) -> list[dict]:
    impls = token_impls(ctx, chosen)
    rows = []
    for n in ns:
        for vocab in vocabs:
            rows += token_shape_rows(ctx, impls, n, vocab)
            ctx.release_memory()
    add_memory_ratios(rows)
    return rows


def token_shape_rows(ctx: Context, impls: dict[str, Callable | str], n: int, vocab: int) -> list[dict]:
    gen = torch.Generator(device=ctx.device).manual_seed(n + vocab)
    logits = torch.randn(n, vocab, device=ctx.device, dtype=ctx.dtype, generator=gen) * 2  # (N, V)
    targets = torch.randint(0, vocab, (n,), device=ctx.device, generator=gen)  # (N,)
    nbytes = n * vocab * logits.element_size()
    rows = []
    for pass_, grad_of, pass_bytes in (("fwd", (), nbytes), ("fwd+bwd", (0,), 3 * nbytes)):
        def inputs(grad_of=grad_of, dtype=ctx.dtype):
            return logits.to(dtype, copy=True).requires_grad_(bool(grad_of)), targets  # a fresh copy

        with torch.no_grad() if not grad_of else contextlib.nullcontext():
            ref = make_step(eager_logprobs, inputs(dtype=torch.float32), grad_of)()
        runs = {}
        for name, impl in impls.items():
            row = {"bench": "token", "impl": name, "pass": pass_, "n": n, "vocab": vocab, "dim": None}
            if isinstance(impl, str):
                rows.append({**row, "status": impl})
                continue

            def step_on(impl=impl, grad_of=grad_of, inputs=inputs):
                return make_step(impl, inputs(), grad_of)

            runs[name] = (row, step_on)
        rows += measure_shape(ctx, runs, ref, nbytes=pass_bytes)
        del ref
        ctx.release_memory()
    return rows


def head_rows(ctx: Context, shape: tuple[int, int, int], chosen: set[str]) -> list[dict]:
    n, vocab, dim = shape
    gen = torch.Generator(device=ctx.device).manual_seed(n + vocab + dim)
    hidden = torch.randn(n, dim, device=ctx.device, dtype=ctx.dtype, generator=gen)  # (N, D)
    weight = (torch.randn(vocab, dim, device=ctx.device, dtype=ctx.dtype, generator=gen) / dim**0.5)  # (V, D)
    targets = torch.randint(0, vocab, (n,), device=ctx.device, generator=gen)  # (N,)
    rows = []
    impls = head_impls(ctx, chosen)
    model_flops = 2.0 * n * vocab * dim
    passes = (("fwd", (), 1), ("fwd+bwd", (0, 1), 3), ("fwd+bwd-frozen", (0,), 2))
    for pass_, grad_of, flop_multiple in passes:
        def inputs(grad_of=grad_of, dtype=ctx.dtype):
            h = hidden.detach().to(dtype).requires_grad_(0 in grad_of)  # (N, D)
            w = weight.detach().to(dtype).requires_grad_(1 in grad_of)  # (V, D)
            return h, w, targets

        with torch.no_grad() if not grad_of else contextlib.nullcontext():
            ref = make_step(eager_head_logprobs, inputs(dtype=torch.float32), grad_of)()
        runs = {}
        for name, impl in impls.items():
            row = {"bench": "head", "impl": name, "pass": pass_, "n": n, "vocab": vocab, "dim": dim}
            if isinstance(impl, str):
                rows.append({**row, "status": impl})
                continue
            if name == "minidpo-recompute" and pass_ != "fwd+bwd-frozen":
                rows.append({**row, "status": "skipped: the same as minidpo here"})
                continue

            def step_on(impl=impl, grad_of=grad_of, inputs=inputs):
                return make_step(impl, inputs(), grad_of)

            runs[name] = (row, step_on)
        rows += measure_shape(ctx, runs, ref, flops=flop_multiple * model_flops)
        del ref
        ctx.release_memory()
    add_memory_ratios(rows)
    return rows


def run(ctx: Context) -> list[dict]:
    ns, vocabs, head, chosen = settings(ctx)
    return token_rows(ctx, ns, vocabs, chosen) + head_rows(ctx, head, chosen)
