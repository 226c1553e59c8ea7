"""LoRA-DPO training step: tokens/s, MFU and peak memory at real model shapes, random weights.

One step is what DPO training with the reference "the same weights, adapters off" does per
batch of B pairs (the LibraChem setup, arXiv 2501.13952):
  1. reference forward, no grad, adapters disabled, over the 2B sequences (chosen rows
     then rejected rows, one batch);
  2. policy forward + backward with LoRA r=8, alpha=16, dropout 0.05 on q/k/v;
  3. the DPO sigmoid loss (beta 0.1) and an AdamW step on the adapter weights.
Each sequence has T tokens; the first T/4 are the prompt (no loss), the rest the response.
Weights in the compute dtype (bf16 on CUDA), adapters in float32.

Implementations, each when importable:
  minidpo   minidpo.model + minidpo.lora + minidpo.losses; response log-probs through
            minidpo.logprobs.sequence_logprobs (the trainer's path: the fused
            lm_head + log-softmax kernel on the response positions only, so the
            (tokens, vocab) logits are never held);
  hf-peft   transformers (SDPA attention) + PEFT's LoRA with the same settings; the
            reference through PEFT's disable_adapter(); log-probs from the full logits,
            with trl.trainer.utils.selective_log_softmax where TRL is importable (what
            TRL's DPOTrainer calls), else log_softmax + gather;
  hf-peft-liger  the same with Liger-Kernel: its RMSNorm, RoPE and SwiGLU kernels patched
            into transformers (CUDA only; class-wide, so this runs last) and
            LigerFusedLinearDPOLoss on the final hidden states (lm_head fused with the
            loss, chunked per pair).
A peer that is not importable gives a "skipped" row; one that raises, an "error" row.

What is counted (model FLOPs; `forward_flops` in _harness.py; two per multiply-add):
  F = one forward over the 2B sequences: 2 x block weights per token + causal attention
      2 L d_q T^2 per sequence + the output projection 2 V D per response token.
  The step costs 4F: the reference forward (F) plus the policy forward (F) and backward
  through frozen weights (2F: gradients of the activations only). In the usual
  per-token shorthand that is 2N + 4N = 6N, where full fine-tuning without a reference
  pass is also 6N (2N forward + 4N backward). Not counted: the adapters' own FLOPs
  (under 0.1% at r=8), norms, softmax, the optimizer, and the forward that activation
  checkpointing recomputes (so MFU falls with checkpointing on by up to a quarter
  even at equal hardware efficiency).
  tokens/s = 2 B T / step time (every sequence token, each seen by both passes).
  MFU = 4F / step time / the matmul rate measured in the same run (not the datasheet).
  peak memory = torch.cuda.max_memory_allocated over one step (weights included).

max-seq rows: the longest T (multiple of 1024) for which one step at B = 1 pair runs
without running out of memory, by binary search; CUDA only, not in --tiny runs.

Fair comparison on a CPU (harness `interleaved`): the implementations alternate, each run
a fresh process that measures every (ckpt, seq) configuration (1 warm-up step, the median
of 3; peak memory = the process's peak resident set over one more step), 5 pairs by
default; rows give the medians over the pairs, `time_vs_hf_peft` the ratio of step times
within each pair (median, min, max), the load average, threads and the busy mark. On CUDA
the implementations run one after the other in this process (three 8B models built anew
per pair would cost more than the measurement; a GPU is not shared the way the CPU is).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from benchmarks._harness import (
    MIN_PAIRS,
    MODEL_SHAPES,
    Context,
    forward_flops,
    fresh_process,
    interleaved,
    model_config,
    worker_output,
)
from minidpo.data import IGNORE_INDEX

NAME = "train_step"
PLOT = {"x": "seq", "y": "tokens_per_s", "series": ("impl", "ckpt"), "logx": True}

LORA = {"r": 8, "alpha": 16.0, "dropout": 0.05, "targets": ("q_proj", "k_proj", "v_proj")}
BETA = 0.1
LEARNING_RATE = 5e-4
IMPLS = ("minidpo", "hf-peft", "hf-peft-liger")


def add_arguments(parser) -> None:
    parser.add_argument("--train-step-model", choices=sorted(MODEL_SHAPES), help="default: Llama-3-8B on CUDA")
    parser.add_argument("--train-step-seqs", type=int, nargs="+", metavar="T", help="default: 1024 4096 on CUDA")
    parser.add_argument("--train-step-pairs", type=int, default=1, metavar="B", help="preference pairs per step")
    parser.add_argument("--train-step-impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--train-step-max-seq", type=int, default=65536, metavar="T",
                        help="upper end of the longest-sequence search (CUDA)")
    parser.add_argument("--train-step-no-search", action="store_true", help="skip the longest-sequence search")
    parser.add_argument("--train-step-rounds", type=int, metavar="N",
                        help=f"CPU: A B pairs of fresh-process runs (default {MIN_PAIRS})")


def settings(ctx: Context) -> tuple[str, list[int]]:
    """(model shape, sequence lengths) for this device and size, unless given."""
    if ctx.tiny:
        model, seqs = "tiny", [32, 64]
    elif ctx.is_cuda:
        model, seqs = "Llama-3-8B", [1024, 4096]
    else:
        model, seqs = "SmolLM2-135M", [256, 512]
    return ctx.args.train_step_model or model, ctx.args.train_step_seqs or seqs


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Create parameters directly in `dtype` (no float32 copy of an 8B model first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class Trainer(NamedTuple):
    """One implementation, built: `step(input_ids (2B, T), labels (2B, T)) -> loss` trains once."""

    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    set_checkpointing: Callable[[bool], None]
    logps_via: str


def build_minidpo(ctx: Context, config, quantize: str | None = None) -> Trainer:
    """minidpo's step; quantize="nf4" puts the frozen base in NF4 first (QLoRA, benchmarks/quant.py)."""
    from minidpo.logprobs import sequence_logprobs
    from minidpo.lora import LoRAConfig, adapters_disabled, apply_lora
    from minidpo.losses import dpo_loss
    from minidpo.model import LlamaForCausalLM

    with default_dtype(ctx.dtype), ctx.device:
        model = LlamaForCausalLM(config)
    if quantize:
        from minidpo.quant import quantize_model

        quantize_model(model)
    apply_lora(model, LoRAConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                                 target_modules=LORA["targets"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)

    def step(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pairs = input_ids.shape[0] // 2
        with torch.no_grad(), adapters_disabled(model):
            ref, _ = sequence_logprobs(model, input_ids, labels)  # (2B,)
        policy, _ = sequence_logprobs(model, input_ids, labels)  # (2B,)
        loss, _ = dpo_loss(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], beta=BETA)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def set_checkpointing(on: bool) -> None:
        model.gradient_checkpointing = on

    return Trainer(step, set_checkpointing, "minidpo.logprobs (fused kernel)")


def hf_peft_model(ctx: Context, config):
    """A random transformers model of `config` (SDPA attention) with PEFT LoRA, its AdamW and a
    checkpointing switch."""
    import peft
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config.to_dict())
    hf_config._attn_implementation = "sdpa"
    with default_dtype(ctx.dtype), ctx.device:
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=ctx.dtype)
    lora = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                           target_modules=list(LORA["targets"]), task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)

    def set_checkpointing(on: bool) -> None:
        with warnings.catch_warnings():  # transformers 5.2x renames these to activation_checkpointing_*
            warnings.simplefilter("ignore", FutureWarning)
            if on:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_disable()

    return model, optimizer, set_checkpointing


def build_hf_peft(ctx: Context, config) -> Trainer:
    try:
        from trl.trainer.utils import selective_log_softmax
    except ImportError:
        selective_log_softmax = None
    model, optimizer, set_checkpointing = hf_peft_model(ctx, config)

    def sequence_logps(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]  # (2B, T-1, V)
        targets = labels[:, 1:]  # (2B, T-1)
        mask = targets != IGNORE_INDEX  # (2B, T-1)
        index = targets.clamp(min=0)  # (2B, T-1)
        if selective_log_softmax is not None:
            logps = selective_log_softmax(logits, index)  # (2B, T-1)
        else:
            logps = logits.float().log_softmax(-1).gather(-1, index[..., None])[..., 0]  # (2B, T-1)
        return (logps * mask).sum(-1)  # (2B,)

    def step(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pairs = input_ids.shape[0] // 2
        with torch.no_grad(), model.disable_adapter():
            ref = sequence_logps(input_ids, labels)  # (2B,)
        policy = sequence_logps(input_ids, labels)  # (2B,)
        d = (policy[:pairs] - ref[:pairs]) - (policy[pairs:] - ref[pairs:])  # (B,)
        loss = -torch.nn.functional.logsigmoid(BETA * d).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    via = "trl.selective_log_softmax" if selective_log_softmax is not None else "log_softmax+gather"
    return Trainer(step, set_checkpointing, via)


def build_hf_peft_liger(ctx: Context, config) -> Trainer:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    if ctx.is_cuda:  # Liger's RMSNorm, RoPE and SwiGLU are Triton kernels; patched class-wide
        import liger_kernel.transformers as liger

        patch = {"llama": liger.apply_liger_kernel_to_llama, "mistral": liger.apply_liger_kernel_to_mistral,
                 "qwen2": liger.apply_liger_kernel_to_qwen2}[config.model_type]
        patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    model, optimizer, set_checkpointing = hf_peft_model(ctx, config)
    decoder = model.get_base_model().model  # the LoRA-injected LlamaModel: hidden states, no logits
    head = model.get_base_model().lm_head.weight  # (V, D)
    dpo = LigerFusedLinearDPOLoss(beta=BETA, compiled=ctx.is_cuda, use_ref_model=True)

    def step(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), model.disable_adapter():
            ref_hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state  # (2B, T, D)
        hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state  # (2B, T, D)
        loss, _ = dpo(head, hidden[:, :-1], labels[:, 1:], ref_input=ref_hidden[:, :-1], ref_weight=head)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    kernels = "Liger RMSNorm/RoPE/SwiGLU + " if ctx.is_cuda else ""
    return Trainer(step, set_checkpointing, kernels + "LigerFusedLinearDPOLoss")


# Run in this order: Liger patches transformers' classes for the rest of the process.
BUILDERS = {"minidpo": build_minidpo, "hf-peft": build_hf_peft, "hf-peft-liger": build_hf_peft_liger}
NEEDS = {"minidpo": (), "hf-peft": ("transformers", "peft"), "hf-peft-liger": ("transformers", "peft", "liger_kernel")}


# ---- measurement


def random_batch(ctx: Context, config, pairs: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), each (2B, T): random tokens, labels masking the first T/4 (the prompt)."""
    input_ids = torch.randint(0, config.vocab_size, (2 * pairs, seq_len), device=ctx.device)  # (2B, T)
    labels = input_ids.clone()  # (2B, T)
    labels[:, : prompt_length(seq_len)] = IGNORE_INDEX
    return input_ids, labels


def prompt_length(seq_len: int) -> int:
    return max(1, seq_len // 4)


def measure(ctx: Context, step: Callable, config, pairs: int, seq_len: int) -> dict:
    batches = [random_batch(ctx, config, pairs, seq_len) for _ in range(2)]
    warmup, rep = (2, 5) if ctx.is_cuda else (1, 3)
    timing = ctx.time(step, warmup=warmup, rep=rep, inputs=batches)
    peak = ctx.peak_memory(lambda: step(*batches[0]))
    return {
        "status": "ok",
        "step_ms": timing.median_ms,
        "step_ms_q20": timing.q20_ms,
        "step_ms_q80": timing.q80_ms,
        **throughput(ctx, config, pairs, seq_len, timing.seconds),
        "peak_mem_gib": None if peak is None else peak / 2**30,
    }


def throughput(ctx: Context, config, pairs: int, seq_len: int, seconds: float) -> dict:
    """tokens/s, TFLOP/s and MFU of one step of `seconds` (see the module docstring)."""
    step_flops = 4 * forward_flops(config, seq_len, sequences=2 * pairs,
                                   head_tokens=2 * pairs * (seq_len - prompt_length(seq_len)))
    return {"tokens_per_s": 2 * pairs * seq_len / seconds, "tflops": step_flops / seconds / 1e12,
            "mfu": ctx.flops_fraction(step_flops, seconds)}


def fits(ctx: Context, step: Callable, config, seq_len: int) -> bool:
    """Whether one step at one pair of `seq_len` tokens runs without running out of memory."""
    try:
        step(*random_batch(ctx, config, 1, seq_len))
        ctx.synchronize()
        return True
    except Exception as e:
        if not ctx.is_oom(e):
            raise
        return False
    finally:
        ctx.release_memory()


def longest_fitting(ctx: Context, step: Callable, config, upper: int, quantum: int = 1024) -> int | None:
    """The largest multiple of `quantum` up to `upper` that fits; None if not even one."""
    lo, hi = 0, upper // quantum  # invariant: lo*quantum fits (or lo == 0), (hi+1)*quantum was not shown to fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(ctx, step, config, mid * quantum):
            lo = mid
        else:
            hi = mid - 1
    return lo * quantum or None


def measure_impl(ctx: Context, trainer: Trainer, config, base: dict, seqs: list[int]) -> list[dict]:
    rows = []
    for ckpt in (False, True):
        trainer.set_checkpointing(ckpt)
        for seq_len in seqs:
            row = {**base, "ckpt": ckpt, "seq": seq_len}
            try:
                row.update(measure(ctx, trainer.step, config, base["pairs"], seq_len))
            except Exception as e:
                if not ctx.is_oom(e):
                    raise
                row["status"] = "oom"
            ctx.release_memory()
            rows.append(row)
        if ctx.is_cuda and not ctx.tiny and not ctx.args.train_step_no_search:
            longest = longest_fitting(ctx, trainer.step, config, ctx.args.train_step_max_seq)
            rows.append({**base, "ckpt": ckpt, "pairs": 1, "status": "max-seq", "max_seq": longest})
    return rows


def run(ctx: Context) -> list[dict]:
    model_name, seqs = settings(ctx)
    rows, ready = [], []
    for impl in (i for i in IMPLS if i in ctx.args.train_step_impls):
        missing = [p for p in NEEDS[impl] if ctx.peers.get(p) is None]
        if missing:
            rows.append({**base_row(ctx, impl, model_name), "status": f"skipped: {', '.join(missing)} not importable"})
        else:
            ready.append(impl)
    if ctx.is_cuda:
        return rows + [row for impl in ready for row in run_in_process(ctx, impl, model_name, seqs)]
    return rows + run_interleaved(ctx, ready, model_name, seqs)


def base_row(ctx: Context, impl: str, model_name: str) -> dict:
    return {"impl": impl, "model": model_name, "dtype": str(ctx.dtype).removeprefix("torch."),
            "pairs": ctx.args.train_step_pairs}


def run_in_process(ctx: Context, impl: str, model_name: str, seqs: list[int]) -> list[dict]:
    """One implementation built and measured in this process (CUDA; and each CPU worker)."""
    config = model_config(model_name)
    base = base_row(ctx, impl, model_name)
    torch.manual_seed(0)
    try:
        trainer = BUILDERS[impl](ctx, config)
        return measure_impl(ctx, trainer, config, {**base, "logps_via": trainer.logps_via}, seqs)
    except Exception as e:
        if impl == "minidpo":  # our own failure fails the benchmark; a peer's is recorded
            raise
        traceback.print_exc()
        return [{**base, "status": f"error: {type(e).__name__}: {e}".splitlines()[0][:200]}]
    finally:
        trainer = None
        ctx.release_memory()


MEASURED = ("status", "step_ms", "step_ms_q20", "step_ms_q80", "peak_mem_gib")


def run_interleaved(ctx: Context, impls: list[str], model_name: str, seqs: list[int]) -> list[dict]:
    """CPU: fresh-process runs of the implementations, A B A B ..., rows from their medians."""
    rounds = ctx.args.train_step_rounds or (1 if ctx.tiny else MIN_PAIRS)
    runners = {impl: fresh_process("benchmarks.train_step", impl, model_name, ctx.args.train_step_pairs,
                                   ",".join(map(str, seqs)), int(ctx.tiny)) for impl in impls}  # fmt: skip
    measured = interleaved(runners, rounds)
    config, pairs = model_config(model_name), ctx.args.train_step_pairs
    rows = []
    for impl in impls:
        ok = measured.ok(impl)
        base = base_row(ctx, impl, model_name)
        if not ok:
            rows.append({**base, "status": measured.results[impl][0]["status"]})
            continue
        for ckpt in (False, True):
            for seq_len in seqs:
                key = f"{ckpt}:{seq_len}:"
                row = {**base, "logps_via": ok[0]["logps_via"], "ckpt": ckpt, "seq": seq_len}
                statuses = {r.get(key + "status") for r in ok}
                if statuses != {"ok"}:
                    rows.append({**row, "status": " / ".join(sorted(map(str, statuses)))})
                    continue
                step_ms = measured.median(impl, key + "step_ms")
                row |= {"status": "ok", "step_ms": step_ms, "step_ms_min": min(r[key + "step_ms"] for r in ok),
                        **throughput(ctx, config, pairs, seq_len, step_ms / 1e3),
                        "peak_mem_gib": measured.median(impl, key + "peak_mem_gib")}
                if impl != "hf-peft" and "hf-peft" in impls:
                    row |= measured.ratio_columns(impl, "hf-peft", key + "step_ms", "time_vs_hf_peft")
                rows.append(row | measured.machine_columns(impl))
    return rows


def worker(argv: list[str]) -> None:
    """`python -m benchmarks.train_step IMPL MODEL PAIRS T1,T2,... TINY`: one fresh-process CPU run."""
    parser = argparse.ArgumentParser()
    for name in ("impl", "model", "pairs", "seqs", "tiny"):
        parser.add_argument(name)
    a = parser.parse_args(argv)
    args = argparse.Namespace(train_step_pairs=int(a.pairs), train_step_no_search=True)
    ctx = Context(torch.device("cpu"), torch.float32, tiny=a.tiny == "1", args=args)
    rows = run_in_process(ctx, a.impl, a.model, [int(t) for t in a.seqs.split(",")])
    if len(rows) == 1 and "ckpt" not in rows[0]:
        raise SystemExit(rows[0]["status"])
    result = {"logps_via": rows[0]["logps_via"]}
    for row in rows:
        result |= {f"{row['ckpt']}:{row['seq']}:{k}": row.get(k) for k in MEASURED}
    worker_output(result)


if __name__ == "__main__":
    worker(sys.argv[1:])
