"""A whole DPO training step, minidpo's Trainer vs TRL's DPOTrainer + PEFT, same settings.

Where train_step.py times the step's arithmetic at large shapes, this times what a user
runs: each library's own trainer on a real checkpoint (SmolLM2-135M-Instruct from
`minidpo fetch-default`), from the data batch to the optimizer step, logging included.

Implementations: minidpo (right-padded rows, chosen then rejected), minidpo-packed (the same
trainer with packing=True: each pair [prompt | chosen | rejected] in one row, no padding,
minidpo.packing), and TRL. Settings, equal on all: LoRA r=8, alpha=16, dropout 0.05 on q/k/v/o_proj
(TRL's default disable_dropout=True is turned off so that both run the adapter dropout);
reference = the same weights with the adapter disabled; sigmoid loss, beta 0.1; AdamW,
lr 5e-4, constant schedule, no warm-up; 2 pairs per step, no accumulation; a 64-token
prompt and responses of uneven length up to 192 tokens (the longest pairs are cut to 256
tokens); float32 on a CPU (bf16 autocast on CUDA for both); no gradient checkpointing.

The implementations alternate, each run in a fresh Python process (harness `interleaved`:
A B A B ..., 5 pairs by default), so a neighbour's load falls on all alike and one's memory
is not counted against another's. A run is one warm-up step, then `reps` timed steps (time
from one step's end to the next's, median). `time_vs_trl` is
minidpo's step time over TRL's within each pair (median, min, max over the pairs);
`mem_vs_trl` the same for peak memory; `time_vs_padded` packed over padded minidpo. Memory is the process's peak resident set over
the timed steps (weights, libraries and interpreter included), reset after the warm-up
(/proc/self/clear_refs), and `step_extra_gib`, that peak minus the resident set before
the first timed step (activations, gradients and optimizer state beyond what stays). On
CUDA the same numbers come from torch.cuda.max_memory_allocated.

With --tiny a random 2-layer model and a BPE tokenizer trained in-process stand in, so
the test suite checks both code paths in seconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._harness import MIN_PAIRS, fresh_process, interleaved, worker_output

NAME = "dpo_step"
IMPLS = ("minidpo", "minidpo-packed", "trl")
PAIRS, PROMPT_TOKENS, SEQ_TOKENS = 2, 64, 256
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def add_arguments(parser) -> None:
    parser.add_argument("--dpo-step-impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--dpo-step-model", metavar="DIR", help="HF-format model folder (default: fetch-default's)")
    parser.add_argument("--dpo-step-reps", type=int, default=3, metavar="N", help="timed steps per worker")
    parser.add_argument("--dpo-step-pairs", type=int, default=MIN_PAIRS, metavar="N",
                        help=f"A B rounds, each worker a fresh process (default {MIN_PAIRS})")


def run(ctx) -> list[dict]:
    impls = getattr(ctx.args, "dpo_step_impls", list(IMPLS))
    reps = 2 if ctx.tiny else getattr(ctx.args, "dpo_step_reps", 3)
    rounds = 1 if ctx.tiny else getattr(ctx.args, "dpo_step_pairs", MIN_PAIRS)  # tiny: TRL's import alone takes 10 s
    with tempfile.TemporaryDirectory(prefix="dpo_step.") as tmp:
        tmp = Path(tmp)
        model_dir, label = benchmark_model(ctx, tmp / "model", getattr(ctx.args, "dpo_step_model", None))
        data = write_pairs(tmp / "pairs.jsonl", model_dir, PAIRS * (1 + reps + 1))
        runners = {impl: fresh_process("benchmarks.dpo_step", impl, model_dir, data, ctx.device.type, reps)
                   for impl in impls}
        run = interleaved(runners, rounds)
    rows = []
    for impl in impls:
        row = {"impl": impl, "model": label, "pairs": PAIRS, "max_seq": SEQ_TOKENS, "device": ctx.device.type}
        ok = run.ok(impl)
        if not ok:
            rows.append({**row, "status": run.results[impl][0]["status"]})
            continue
        row |= {"status": "ok", "s_per_step": run.median(impl, "s_per_step"), "s_min": min(r["s_min"] for r in ok),
                "peak_gib": run.median(impl, "peak_gib"), "step_extra_gib": run.median(impl, "step_extra_gib")}
        if impl != "trl" and "trl" in impls:
            row |= run.ratio_columns(impl, "trl", "s_per_step", "time_vs_trl")
            row |= run.ratio_columns(impl, "trl", "peak_gib", "mem_vs_trl")
        if impl == "minidpo-packed" and "minidpo" in impls:
            row |= run.ratio_columns(impl, "minidpo", "s_per_step", "time_vs_padded")
        rows.append(row | run.machine_columns(impl))
    return rows


# ---- inputs


def benchmark_model(ctx, folder: Path, model: str | None) -> tuple[Path, str]:
    """(model folder, label): a tiny random model written to `folder` under --tiny, else
    `model` (a benchmark's --*-model flag) or the default SmolLM2."""
    if ctx.tiny:
        return write_tiny_model(folder), "tiny"
    from minidpo.fetch import fetch_default

    model_dir = Path(model or fetch_default())
    return model_dir, model_dir.name


def write_tiny_model(folder: Path) -> Path:
    """A random 2-layer Llama and a byte-level BPE tokenizer (HF files both libraries read)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from benchmarks._harness import model_config
    from minidpo.checkpoint import save_model
    from minidpo.io import atomic_write_json
    from minidpo.model import LlamaForCausalLM

    torch.manual_seed(0)
    save_model(LlamaForCausalLM(model_config("tiny")), folder)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([" ".join(WORDS)] * 10, trainer)
    tk.save(str(folder / "tokenizer.json"))
    atomic_write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "add_bos_token": False,
    })
    return folder


WORDS = ("the reaction of sodium with water gives hydrogen and sodium hydroxide while heat is released "
         "so the vessel must stay open and cool before the acid is added drop by drop").split()


def words(n: int, offset: int) -> str:
    return " ".join(WORDS[(offset + 7 * i) % len(WORDS)] for i in range(n))


def write_pairs(path: Path, model_dir: Path, n: int) -> Path:
    """n pairs: prompts past 64 tokens (cut to their last 64), responses of uneven length,
    from about 30 words to past 192 tokens (cut)."""
    rows = [{"prompt": words(80, i), "chosen": words(30 + 97 * i % 200, i + 1), "rejected": words(30 + 61 * i % 200, i + 2)}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- the two workers (run as `python -m benchmarks.dpo_step IMPL ...`)


class StepClock:
    """Step-end timestamps; resets the peak-memory counter when the warm-up step ends."""

    def __init__(self, device: str):
        self.device, self.ends, self.base = device, [], None

    def step_end(self) -> None:
        import torch

        from benchmarks._harness import _peak_rss, _reset_peak_rss

        if self.device == "cuda":
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        if len(self.ends) == 1:
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                self.base = torch.cuda.memory_allocated()
            elif _reset_peak_rss():
                self.base = _peak_rss()

    def result(self) -> dict:
        import torch

        from benchmarks._harness import _peak_rss

        steps = [b - a for a, b in zip(self.ends, self.ends[1:])]
        peak = torch.cuda.max_memory_allocated() if self.device == "cuda" else _peak_rss()
        gib = lambda b: None if b is None else b / 2**30
        return {
            "s_per_step": statistics.median(steps), "s_min": min(steps), "reps": len(steps),
            "peak_gib": gib(peak), "step_extra_gib": gib(None if peak is None or self.base is None else peak - self.base),
        }


def run_minidpo(model_dir: str, data: str, device: str, steps: int, out: str, clock: StepClock, packing=False) -> None:
    from minidpo.train import TrainConfig, Trainer

    config = TrainConfig(
        model=model_dir, data=data, out=out, chat_format="plain", lora_targets=",".join(LORA_TARGETS),
        max_length=SEQ_TOKENS, max_prompt_length=PROMPT_TOKENS, batch_size=PAIRS, grad_accum=1, warmup_steps=0,
        scheduler="constant", max_steps=steps, save_every=10**6, progress=False, plot=False, device=device,
        packing=packing,
    )
    trainer = Trainer(config, log=lambda message: None)
    trainer.train(on_step=lambda step, record: clock.step_end())


def run_trl(model_dir: str, data: str, device: str, steps: int, out: str, clock: StepClock) -> None:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # as minidpo's frozen base
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    args = DPOConfig(
        output_dir=out, per_device_train_batch_size=PAIRS, gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=5e-4, lr_scheduler_type="constant", warmup_steps=0, beta=0.1, loss_type=["sigmoid"],
        max_length=SEQ_TOKENS, disable_dropout=False, save_strategy="no", report_to=[], logging_steps=1,
        use_cpu=device == "cpu", bf16=device == "cuda", dataloader_num_workers=0, gradient_checkpointing=False,
        disable_tqdm=True, seed=42,
    )
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    dataset = load_dataset("json", data_files=data, split="train")
    # The prompt is cut to its last 64 tokens as minidpo does; TRL then cuts prompt + response to 256.
    dataset = dataset.map(lambda r: {"prompt": tokenizer.decode(tokenizer(r["prompt"])["input_ids"][-PROMPT_TOKENS:])})
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Clock()])
    trainer.train()


def worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    for name in ("impl", "model_dir", "data", "device", "reps"):
        parser.add_argument(name)
    a = parser.parse_args(argv)
    clock = StepClock(a.device)
    steps = 1 + int(a.reps)  # one warm-up step, then the timed ones
    with tempfile.TemporaryDirectory(prefix=f"dpo_step.{a.impl}.") as out:
        workers = {"minidpo": run_minidpo, "minidpo-packed": functools.partial(run_minidpo, packing=True), "trl": run_trl}
        workers[a.impl](a.model_dir, a.data, a.device, steps, out, clock)
    worker_output(clock.result())


if __name__ == "__main__":
    worker(sys.argv[1:])
