"""Generation: decode and prefill tokens/s of minidpo.sampler against transformers' generate.

Greedy decoding of B prompts of P random tokens each, N new tokens, random weights of a
real shape (speed does not depend on the values), all rows the same length (no padding)
and no stop token, so every call does exactly one prefill and N - 1 decode steps:

    t(1)  = one generate call with max_new_tokens 1   (the prefill + one lm_head)
    t(N)  = one generate call with max_new_tokens N
    prefill tokens/s = B P / t(1)
    decode  tokens/s = B (N - 1) / (t(N) - t(1))

The same model weights run through transformers (SDPA attention, its own static-shape-free
DynamicCache) with `min_new_tokens = N` so that it too generates exactly N tokens;
`same_tokens` says whether both produced identical token ids.

CPU: SmolLM2-135M in float32, P = N = 32, batches 1, 8, 32 (target: >= 1.3x transformers
at batch 1). CUDA: Llama-3-8B in bf16, P = N = 128, eager and with the decode step through
torch.compile (`minidpo-compiled`); each decode step reads every matmul weight once plus
the KV cache, so `frac_of_copy_bw` = those bytes / step time / the copy bandwidth measured
in the same run (target >= 0.8 at batch 1; gpt-fast reports about 0.69 on an A100).
The sampler's text side is left out: the benchmark tokenizer decodes nothing.
"""

from __future__ import annotations

import statistics
import traceback

import torch

from benchmarks._harness import Context, model_config
from benchmarks.train_step import default_dtype

NAME = "sampler"
PLOT = {"x": "batch", "y": "decode_tokens_per_s", "series": ("impl",), "logx": True}


def add_arguments(parser) -> None:
    parser.add_argument("--sampler-batches", type=int, nargs="+", metavar="B", help="default: 1 8 32")
    parser.add_argument("--sampler-tokens", type=int, metavar="N", help="prompt and new tokens (default 32 CPU, 128 CUDA)")
    parser.add_argument("--sampler-rounds", type=int, metavar="R", help="timed rounds of every impl (default 5 CUDA, 3 CPU)")


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


def settings(ctx: Context) -> tuple[str, int, list[int]]:
    shape = "tiny" if ctx.tiny else ("Llama-3-8B" if ctx.is_cuda else "SmolLM2-135M")
    tokens = ctx.args.sampler_tokens or (4 if ctx.tiny else 128 if ctx.is_cuda else 32)
    return shape, tokens, ctx.args.sampler_batches or ([1, 4] if ctx.tiny else [1, 8, 32])


def build_models(ctx: Context, config):
    """minidpo's model with random weights and, when importable, transformers' with the same."""
    from minidpo.model import LlamaForCausalLM

    with default_dtype(ctx.dtype), ctx.device:
        ours = LlamaForCausalLM(config).eval()
    if ctx.peers.get("transformers") is None:
        return ours, None
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config.to_dict())
    hf_config._attn_implementation = "sdpa"
    with default_dtype(ctx.dtype), ctx.device:
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=ctx.dtype).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf.tie_weights()
    return ours, hf


def generators(ours, hf):
    """impl name -> fn(input_ids (B, P), new_tokens) -> generated ids (B, new_tokens)."""
    from minidpo.sampler import generate

    tokenizer = NullTokenizer()

    def run_ours(ids: torch.Tensor, n: int, compile: bool = False) -> torch.Tensor:
        out = generate(ours, tokenizer, ids.tolist(), max_new_tokens=n, compile=compile)
        return torch.tensor([c.token_ids for c in out])

    def run_hf(ids: torch.Tensor, n: int) -> torch.Tensor:
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)  # fmt: skip
        return out[:, ids.shape[1] :].cpu()

    impls = {"minidpo": run_ours}
    if ours.lm_head.weight.is_cuda:
        impls["minidpo-compiled"] = lambda ids, n: run_ours(ids, n, compile=True)
    if hf is not None:
        impls["transformers"] = run_hf
    return impls


def decode_bytes(config, batch: int, context: int, elem_size: int) -> int:
    """Bytes one decode step must read: every matmul weight once, plus the KV cache so far."""
    embedding = config.vocab_size * config.hidden_size  # looked up, not read whole
    matmul = config.num_parameters - (0 if config.tie_word_embeddings else embedding)
    kv = batch * config.num_hidden_layers * 2 * config.num_key_value_heads * context * config.head_dim
    return (matmul + kv) * elem_size


def time_interleaved(ctx: Context, impls: dict, ids: torch.Tensor, tokens: int) -> dict[str, tuple[float, float]]:
    """impl -> (t(1), t(N)) in seconds: medians over rounds that run every impl in turn, so
    that a neighbour's load on a shared machine falls on all of them alike."""
    rounds = getattr(ctx.args, "sampler_rounds", None) or (3 if ctx.tiny or not ctx.is_cuda else 5)
    times: dict[str, list[tuple[float, float]]] = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl, fn in impls.items():
            t1 = ctx.time(fn, inputs=[(ids, 1)], warmup=0, rep=1).seconds
            t_all = ctx.time(fn, inputs=[(ids, tokens)], warmup=0, rep=1).seconds
            times[impl].append((t1, t_all))
    return {impl: tuple(statistics.median(t[k] for t in ts) for k in (0, 1)) for impl, ts in times.items()}


def run(ctx: Context) -> list[dict]:
    shape, tokens, batches = settings(ctx)
    config = model_config(shape)
    ours, hf = build_models(ctx, config)
    impls = generators(ours, hf)
    rows = []
    for batch in batches:
        ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(batch))
        ids = ids.to(ctx.device)
        base = {"model": shape, "batch": batch, "prompt": tokens, "new": tokens}
        if hf is None:
            rows.append({"impl": "transformers", **base, "status": "skipped: not importable"})
        outputs, ready = {}, {}
        for impl, fn in impls.items():  # warm-up (CUDA: twice, compiling) and the tokens to compare
            try:
                for _ in range(2 if ctx.is_cuda else 1):
                    outputs[impl] = fn(ids, tokens)
                ready[impl] = fn
            except Exception as e:
                if not ctx.is_oom(e):
                    traceback.print_exc()
                rows.append({"impl": impl, **base, "status": "oom" if ctx.is_oom(e) else f"error: {type(e).__name__}"})
                ctx.release_memory()
        reference = outputs.get("minidpo", next(iter(outputs.values()), None))
        nbytes = decode_bytes(config, batch, tokens + tokens // 2, ours.lm_head.weight.element_size())
        for impl, (t_prefill, t_all) in time_interleaved(ctx, ready, ids, tokens).items():
            step = (t_all - t_prefill) / (tokens - 1) if t_all > t_prefill else None  # None: lost in timer noise
            rows.append(
                {"impl": impl, **base}
                | {
                    "status": "ok",
                    "decode_tokens_per_s": batch / step if step else None,
                    "decode_ms_per_step": step * 1e3 if step else None,
                    "prefill_tokens_per_s": batch * tokens / t_prefill,
                    "frac_of_copy_bw": ctx.bandwidth_fraction(nbytes, step) if step else None,
                    "same_tokens": bool(torch.equal(outputs[impl], reference)),
                }
            )
            print(f"  {impl} batch {batch}: {rows[-1]['decode_tokens_per_s'] or 0:.1f} decode tokens/s", flush=True)
    peers = {r["batch"]: r["decode_tokens_per_s"] for r in rows if r["impl"] == "transformers" and r.get("decode_tokens_per_s")}
    for row in rows:
        if row.get("decode_tokens_per_s") and row["batch"] in peers:
            row["decode_vs_transformers"] = row["decode_tokens_per_s"] / peers[row["batch"]]
    return rows
