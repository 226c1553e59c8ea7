"""Generation: decode and prefill tokens/s of minidpo.sampler against transformers' generate.

Greedy decoding of B prompts of P random tokens each, N new tokens, random weights of a
real shape (speed does not depend on the values), all rows the same length (no padding)
and no stop token, so every call does exactly one prefill and N - 1 decode steps:

    t(1)  = one generate call with max_new_tokens 1   (the prefill + one lm_head)
    t(N)  = one generate call with max_new_tokens N
    prefill tokens/s = B P / t(1)
    decode  tokens/s = B (N - 1) / (t(N) - t(1))

The same model weights (seeded random init) run through transformers (SDPA attention, its
own DynamicCache) with `min_new_tokens = N` so that it too generates exactly N tokens;
`same_tokens` says whether every run produced minidpo's token ids.

Fair comparison (harness `interleaved`): the implementations alternate A B A B ..., 5
pairs by default. On a CPU each run is a fresh process that builds its model, warms up
once per batch size, then takes the median of 3 alternated t(1), t(N) calls per batch
size; `decode_vs_transformers` is the ratio within each pair (median, min, max), and
`x_batch1` a batch's decode tokens/s over batch 1's in the same process (median over the
pairs). On CUDA the rounds run in this one process (a fresh 8B model and a fresh
compilation per pair would cost minutes each).

CPU: SmolLM2-135M in float32, P = N = 32, batches 1 and 16 (targets: >= 1.3x transformers
at batch 1; batch 16 >= 4x batch 1). `minidpo-compiled` (by name, --sampler-impls) runs the
decode step through torch.compile. CUDA: Llama-3-8B in bf16, P = N = 128, batches 1, 8,
32, eager and compiled; each decode step reads every matmul weight once plus the KV cache,
so `frac_of_copy_bw` = those bytes / step time / the copy bandwidth measured in the same run
(target >= 0.8 at batch 1; gpt-fast reports about 0.69 on an A100).
The sampler's text side is left out: the benchmark tokenizer decodes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
import zlib
from collections.abc import Callable

import torch

from benchmarks._harness import (
    MIN_PAIRS,
    Context,
    fresh_process,
    interleaved,
    model_config,
    worker_output,
    worker_result,
)
from benchmarks.train_step import default_dtype

NAME = "sampler"
PLOT = {"x": "batch", "y": "decode_tokens_per_s", "series": ("impl",), "logx": True}
IMPLS = ("minidpo", "minidpo-compiled", "transformers")
REPS = 3  # alternated t(1), t(N) calls per batch size in one run


def add_arguments(parser) -> None:
    parser.add_argument("--sampler-batches", type=int, nargs="+", metavar="B", help="default: 1 16 CPU, 1 8 32 CUDA")
    parser.add_argument("--sampler-tokens", type=int, metavar="N", help="prompt and new tokens (default 32 CPU, 128 CUDA)")
    parser.add_argument("--sampler-rounds", type=int, metavar="R", help=f"A B pairs of runs (default {MIN_PAIRS})")
    parser.add_argument("--sampler-impls", nargs="+", choices=IMPLS,
                        help="default: minidpo and transformers (CUDA: minidpo-compiled too)")


class NullTokenizer:
    """Enough of the Tokenizer API for token-id prompts: no stop tokens, no text."""

    pad_token_id = 0
    stop_token_ids: set[int] = set()

    class _Decoder:
        def push(self, token_id: int) -> str:
            return ""

        def flush(self) -> str:
            return ""

    def decode_stream(self):
        return self._Decoder()


def settings(ctx: Context) -> tuple[str, int, list[int], list[str]]:
    """(model shape, prompt and new tokens, batch sizes, implementations) for this device."""
    shape = "tiny" if ctx.tiny else ("Llama-3-8B" if ctx.is_cuda else "SmolLM2-135M")
    tokens = ctx.args.sampler_tokens or (4 if ctx.tiny else 128 if ctx.is_cuda else 32)
    batches = ctx.args.sampler_batches or ([1, 4] if ctx.tiny else [1, 8, 32] if ctx.is_cuda else [1, 16])
    impls = ctx.args.sampler_impls or [i for i in IMPLS if ctx.is_cuda or i != "minidpo-compiled"]
    return shape, tokens, batches, [i for i in IMPLS if i in impls]


def seeded_model(shape: str, device: torch.device, dtype: torch.dtype):
    """minidpo's model of `shape` with the random weights every implementation uses (fixed seed)."""
    from minidpo.model import LlamaForCausalLM

    torch.manual_seed(0)
    with default_dtype(dtype), device:
        return LlamaForCausalLM(model_config(shape)).eval()


def build_generator(impl: str, ours) -> Callable:
    """fn(input_ids (B, P), new_tokens) -> generated ids (B, new_tokens), for one implementation
    over the weights of `ours` (seeded_model): transformers' model loads its state dict."""
    from minidpo.sampler import generate

    config, dtype, device = ours.config, ours.lm_head.weight.dtype, ours.lm_head.weight.device
    if impl != "transformers":
        tokenizer, compile = NullTokenizer(), impl == "minidpo-compiled"

        def run_ours(ids: torch.Tensor, n: int) -> torch.Tensor:
            out = generate(ours, tokenizer, ids.tolist(), max_new_tokens=n, compile=compile)
            return torch.tensor([c.token_ids for c in out])

        return run_ours
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config.to_dict())
    hf_config._attn_implementation = "sdpa"
    with default_dtype(dtype), device:
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf.tie_weights()

    def run_hf(ids: torch.Tensor, n: int) -> torch.Tensor:
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)  # fmt: skip
        return out[:, ids.shape[1] :].cpu()

    return run_hf


def prompt_ids(batch: int, tokens: int, vocab: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)
    return torch.randint(0, vocab, (batch, tokens), generator=generator).to(device)  # (B, P)


def measure(fn: Callable, shape: str, batches: list[int], tokens: int, device: torch.device, warmups: int) -> dict:
    """One run: per batch size, `warmups` untimed calls, then the medians of REPS alternated
    t(1) and t(N) calls, and a checksum of the generated ids. Keys "B:name"."""

    def timed(ids: torch.Tensor, n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn(ids, n)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    out = {}
    vocab = model_config(shape).vocab_size
    for batch in batches:
        ids = prompt_ids(batch, tokens, vocab, device)
        for _ in range(warmups):
            generated = fn(ids, tokens)
        t1, tn = [], []
        for _ in range(REPS):
            t1.append(timed(ids, 1))
            tn.append(timed(ids, tokens))
        prefill, total = statistics.median(t1), statistics.median(tn)
        step = (total - prefill) / (tokens - 1) if total > prefill else None  # None: lost in timer noise
        out |= {f"{batch}:prefill_s": prefill, f"{batch}:step_s": step,
                f"{batch}:decode_tokens_per_s": batch / step if step else None,
                f"{batch}:checksum": zlib.crc32(generated.numpy().tobytes())}
    return out


def decode_bytes(config, batch: int, context: int, elem_size: int) -> int:
    """Bytes one decode step must read: every matmul weight once, plus the KV cache so far."""
    embedding = config.vocab_size * config.hidden_size  # looked up, not read whole
    matmul = config.num_parameters - (0 if config.tie_word_embeddings else embedding)
    kv = batch * config.num_hidden_layers * 2 * config.num_key_value_heads * context * config.head_dim
    return (matmul + kv) * elem_size


def in_process_runner(impl: str, shape: str, batches: list[int], tokens: int, ctx: Context,
                      shared: dict) -> Callable[[], dict]:
    """A runner that keeps its model in this process (CUDA): built and warmed up at its first call.
    The minidpo implementations share one model (`shared`)."""
    state: dict = {}

    def run() -> dict:
        try:
            if "fn" not in state:
                if "model" not in shared:
                    shared["model"] = seeded_model(shape, ctx.device, ctx.dtype)
                state["fn"] = build_generator(impl, shared["model"])
                measure(state["fn"], shape, batches, tokens, ctx.device, warmups=2)  # compiles
            return worker_result(measure(state["fn"], shape, batches, tokens, ctx.device, warmups=0))
        except Exception as e:
            if not ctx.is_oom(e):
                traceback.print_exc()
            state.clear()
            ctx.release_memory()
            return {"status": "oom" if ctx.is_oom(e) else f"error: {type(e).__name__}: {e}".splitlines()[0][:200]}

    return run


def run(ctx: Context) -> list[dict]:
    shape, tokens, batches, impls = settings(ctx)
    rounds = ctx.args.sampler_rounds or (2 if ctx.tiny else MIN_PAIRS)
    if "transformers" in impls and ctx.peers.get("transformers") is None:
        impls.remove("transformers")
    if ctx.is_cuda:
        shared: dict = {}
        runners = {impl: in_process_runner(impl, shape, batches, tokens, ctx, shared) for impl in impls}
    else:
        batch_args = ",".join(map(str, batches))
        runners = {impl: fresh_process("benchmarks.sampler", impl, shape, tokens, batch_args, ctx.device.type)
                   for impl in impls}
    measured = interleaved(runners, rounds)
    config = model_config(shape)
    nbytes = {b: decode_bytes(config, b, tokens + tokens // 2, ctx.dtype.itemsize) for b in batches}
    reference = [r for r in measured.ok("minidpo")] if "minidpo" in impls else []
    rows = []
    for batch in batches:
        base = {"model": shape, "batch": batch, "prompt": tokens, "new": tokens}
        if ctx.peers.get("transformers") is None:
            rows.append({"impl": "transformers", **base, "status": "skipped: not importable"})
        for impl in impls:
            ok = measured.ok(impl)
            if not ok:
                rows.append({"impl": impl, **base, "status": measured.results[impl][0]["status"]})
                continue
            key = f"{batch}:decode_tokens_per_s"
            step = measured.median(impl, f"{batch}:step_s")
            checksums = {r[f"{batch}:checksum"] for r in ok + reference}
            row = {"impl": impl, **base, "status": "ok", "decode_tokens_per_s": measured.median(impl, key),
                   "decode_ms_per_step": step * 1e3 if step else None,
                   "prefill_tokens_per_s": batch * tokens / measured.median(impl, f"{batch}:prefill_s"),
                   "frac_of_copy_bw": ctx.bandwidth_fraction(nbytes[batch], step) if step else None,
                   "same_tokens": len(checksums) == 1}
            if impl != "transformers" and "transformers" in impls:
                row |= measured.ratio_columns(impl, "transformers", key, "decode_vs_transformers")
            if batch != batches[0]:
                within = [r[key] / r[f"{batches[0]}:decode_tokens_per_s"] for r in ok
                          if r.get(key) and r.get(f"{batches[0]}:decode_tokens_per_s")]
                row[f"x_batch{batches[0]}"] = statistics.median(within) if within else None
            rows.append(row | measured.machine_columns(impl) | {"fresh_process": not ctx.is_cuda})
    return rows


def worker(argv: list[str]) -> None:
    """`python -m benchmarks.sampler IMPL SHAPE TOKENS B1,B2,... DEVICE`: one fresh-process run."""
    parser = argparse.ArgumentParser()
    for name in ("impl", "shape", "tokens", "batches", "device"):
        parser.add_argument(name)
    a = parser.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fn = build_generator(a.impl, seeded_model(a.shape, device, dtype))
    worker_output(measure(fn, a.shape, [int(b) for b in a.batches.split(",")], int(a.tokens), device, warmups=1))


if __name__ == "__main__":
    worker(sys.argv[1:])
