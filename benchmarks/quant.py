"""NF4 (QLoRA): memory of quantized models, dequantization throughput, and a QLoRA DPO step.

Three families of rows (`bench` column), random weights of real shapes:

  memory     the weights of a model held as minidpo loads it with quantize="nf4": every
             decoder linear layer in NF4 (4-bit codes, double-quantized scales), embeddings,
             lm_head and norms in bf16; against all of it in bf16. One decoder layer is
             quantized for real (its 7 linear weights, random normal, on the benchmark's
             device) and its NF4 bytes measured; the model's figure is that times the number
             of layers (every layer has the same shapes) plus the bf16 rest, counted.
             `quantize_s` is the time to quantize that one layer.
  dequant    one weight matrix (Llama-3-8B's MLP, 14336 x 4096) dequantized to the compute
             dtype (bf16 on CUDA, fp32 on a CPU):
               minidpo        minidpo.quant's dequantization (the Triton kernel on CUDA, the
                              PyTorch reference on a CPU)
               bitsandbytes   bitsandbytes.functional.dequantize_4bit of its own NF4 state
                              (compress_statistics=True), when importable
               copy           a clone of the dense weight in the compute dtype: the floor
             Bytes counted: what dequantization must move, n/2 (codes) + n/64 (scale codes)
             + n*b written (b bytes per output element); `gbps` is that over the median time,
             `frac_copy` over the copy bandwidth measured in the same run.
  qlora_step benchmarks/train_step.py's LoRA-DPO step (reference forward with adapters off,
             policy forward + backward, AdamW; LoRA r=8 on q/k/v) with the base in NF4, and
             the same step on the bf16 base for comparison: tokens/s and peak memory. CUDA
             only (Llama-3-8B), and the tiny shape in --tiny runs. A bitsandbytes + PEFT + TRL
             QLoRA peer is not written yet.
"""

from __future__ import annotations

import importlib.util
import time

import torch

from benchmarks._harness import MODEL_SHAPES, Context, model_config
from benchmarks.train_step import build_minidpo, measure_impl

NAME = "quant"

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_arguments(parser) -> None:
    parser.add_argument("--quant-models", nargs="+", choices=sorted(MODEL_SHAPES),
                        help="memory rows (default Llama-3-8B Llama-2-7B)")  # fmt: skip
    parser.add_argument("--quant-seqs", type=int, nargs="+", metavar="T", help="qlora_step lengths (default 1024 4096)")


def layer_shapes(config) -> dict[str, tuple[int, int]]:
    """(out, in) of the 7 linear layers of one decoder layer."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
            "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}  # fmt: skip


def memory_row(ctx: Context, name: str) -> dict:
    from minidpo.quant import NF4Weight

    config = model_config(name)
    shapes = layer_shapes(config)
    layer_params = sum(o * i for o, i in shapes.values())
    nf4_bytes, started = 0, time.perf_counter()
    for o, i in shapes.values():
        w = torch.randn(o, i, device=ctx.device, dtype=torch.bfloat16) * 0.02
        nf4_bytes += NF4Weight.quantize(w).nbytes
        del w
    ctx.synchronize()
    quantize_s = time.perf_counter() - started
    total = config.num_parameters
    rest = total - config.num_hidden_layers * layer_params  # embeddings, lm_head, norms: bf16
    nf4_total = config.num_hidden_layers * nf4_bytes + 2 * rest
    return {"bench": "memory", "model": name, "params_b": total / 1e9, "quantized_params_b":
            config.num_hidden_layers * layer_params / 1e9, "bf16_gb": 2 * total / 1e9, "nf4_gb": nf4_total / 1e9,
            "bf16_gib": 2 * total / 2**30, "nf4_gib": nf4_total / 2**30,
            "bits_per_quantized_weight": 8 * nf4_bytes / layer_params, "quantize_s": quantize_s,
            "method": f"1 layer quantized, x{config.num_hidden_layers} layers + bf16 rest"}  # fmt: skip


def dequant_rows(ctx: Context) -> list[dict]:
    from minidpo.quant import NF4Weight

    rows_, cols = (256, 320) if ctx.tiny else (14336, 4096)
    n, b = rows_ * cols, ctx.dtype.itemsize
    dense = torch.randn(rows_, cols, device=ctx.device, dtype=ctx.dtype) * 0.02
    weight = NF4Weight.quantize(dense)
    base = {"bench": "dequant", "rows": rows_, "cols": cols, "out_dtype": str(ctx.dtype).removeprefix("torch.")}
    impls = {"minidpo": (lambda: weight.dequantize(ctx.dtype), n // 2 + n // 64 + n * b),
             "copy": (dense.clone, 2 * n * b)}  # fmt: skip
    if importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes.functional as bnb

        packed, state = bnb.quantize_4bit(dense, blocksize=64, quant_type="nf4", compress_statistics=True)
        state.dtype = ctx.dtype
        impls["bitsandbytes"] = (lambda: bnb.dequantize_4bit(packed, state), n // 2 + n // 64 + n * b)
    out = []
    for impl, (fn, nbytes) in impls.items():
        timing = ctx.time(fn)
        out.append({**base, "impl": impl, "ms": timing.median_ms, "ms_q20": timing.q20_ms, "ms_q80": timing.q80_ms,
                    "gweights_per_s": n / timing.seconds / 1e9, "gbps": nbytes / timing.seconds / 1e9,
                    "frac_copy": ctx.bandwidth_fraction(nbytes, timing.seconds)})  # fmt: skip
    return out


def qlora_rows(ctx: Context) -> list[dict]:
    if not (ctx.is_cuda or ctx.tiny):
        return [{"bench": "qlora_step", "status": "unmeasured: CUDA only"}]
    name = "tiny" if ctx.tiny else "Llama-3-8B"
    seqs = ctx.args.quant_seqs or ([32] if ctx.tiny else [1024, 4096])
    config = model_config(name)
    rows = []
    impls = (("minidpo-qlora", "nf4"),) if ctx.tiny else (("minidpo-qlora", "nf4"), ("minidpo-lora-bf16", None))
    for impl, quantize in impls:
        torch.manual_seed(0)
        base = {"bench": "qlora_step", "impl": impl, "model": name, "dtype": str(ctx.dtype).removeprefix("torch."),
                "pairs": 1}  # fmt: skip
        trainer = build_minidpo(ctx, config, quantize=quantize)
        rows += measure_impl(ctx, trainer, config, {**base, "logps_via": trainer.logps_via}, seqs)
        trainer = None
        ctx.release_memory()
    return rows


def run(ctx: Context) -> list[dict]:
    models = ctx.args.quant_models or (["tiny"] if ctx.tiny else ["Llama-3-8B", "Llama-2-7B"])
    rows = [memory_row(ctx, name) for name in models]
    ctx.release_memory()
    rows += dequant_rows(ctx)
    ctx.release_memory()
    return rows + qlora_rows(ctx)
