"""The trainer: DPO (or SFT) of a Llama-family model with LoRA or full fine-tuning.

    from minidpo.train import TrainConfig, train_dpo, train_sft
    result = train_dpo(TrainConfig(model="smollm2", data="train.jsonl", out="runs/dpo"))

One optimizer step:
    counts <- the step's pairs and chosen-response tokens, over all its micro-batches
    for each of `grad_accum` micro-batches of `batch_size` pairs (one (2B, T) forward):
        ref logps   <- precomputed cache | same weights, adapters off | --ref-model   (no grad)
        loss        <- losses.dpo_loss(policy logps, ref logps)  (SFT: NLL on chosen)
                       as a share of the step's mean: divided by the step's counts
        loss.backward()
    clip the gradient norm to max_grad_norm; AdamW on the trainable parameters only;
    lr from linear warm-up then cosine (or linear, or constant) decay to 0, with
    transformers' formula (the first step uses lr 0 when warming up, as the reference code).

Defaults are the LibraChem reference's (arXiv 2501.13952, its public code): LoRA r=8, alpha=16, dropout 0.05 on
q/k/v; beta 0.1; lr 5e-4, cosine, 10 warm-up steps; batch 1 x accumulation 4;
max_prompt_length 512, max_length 1024.

The micro-batch losses so add up to the step's loss, the mean over its pairs (DPO) or its
tokens (SFT, RPO's NLL term), whatever the split into micro-batches: batch 1 x accumulation
4 computes the step of batch 4 x accumulation 1. The logged loss is that sum, the loss
optimized; evaluation weights its batches the same way.

Precision: on CUDA the frozen base is bf16 and the forward runs under bf16 autocast while
LoRA weights (and, in full fine-tuning, all weights) stay float32 masters; on a CPU all is
float32. Log-probs are float32 sums either way (minidpo.logprobs). `dtype="float64"` runs
everything in float64 (no autocast), a reference precision for exactness checks.

Under torchrun (minidpo.distributed) every rank runs this loop on its share of each global
micro-batch (`batch_size` x ranks examples), DDP or FSDP2 sums the gradients, and the step
is the one a single process computes with the same global batch; rank 0 alone writes.

Everything a run writes lives in OUT:
    metrics.jsonl              one record per step (split "train") and per evaluation
                               ("eval"), appended and flushed; every metric with its count
    checkpoints/step-NNNNNN/   trainable.safetensors, adapter/ (PEFT layout, LoRA runs),
                               optimizer.{safetensors,json}, trainer.{safetensors,json}
                               (counters, data position, RNG states, the run's config):
                               written to a temporary folder and renamed, no pickle
    adapter/ or model/         the result: a PEFT adapter, or a full HF-format model
    train_config.json, metrics.png (when matplotlib is installed)

Resuming (`resume=True`; with no checkpoint yet it starts at step 0) restores the last
checkpoint and continues exactly: the data order is a pure function of (seed, epoch), the
trainer's own random stream (LoRA dropout; RNGStream, which leaves the caller's global RNG
as it was) is restored, and metrics.jsonl is cut back to the checkpoint's step, so 5 steps
+ kill + resume + 5 steps gives the weights and metrics of 10 straight steps. With
`catch_interrupt=True` (the CLI's), Ctrl-C is caught between micro-batches: the run saves
a checkpoint at the last completed step, then stops (a second Ctrl-C stops at once); the
library installs no signal handler otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minidpo.checkpoint import load_model, save_model
from minidpo.data import Batch, Dataset, batch_order, collate, load_dataset
from minidpo.distributed import (
    Distributed,
    check_parallel,
    default_parallel,
    gather_optimizer_state,
    gather_state,
    load_full_state,
    wrap,
)
from minidpo.errors import MiniDPOError, ParameterError
from minidpo.io import (
    JsonlAppender,
    atomic_dir,
    atomic_write,
    atomic_write_json,
    check_output_dir,
    load_jsonl_tolerant,
)
from minidpo.logprobs import SequenceLogprobs
from minidpo.lora import LoRAConfig, apply_lora, save_adapter
from minidpo.losses import check_loss_options, dpo_loss, is_reference_free, sft_loss
from minidpo.packing import pack, response_lengths
from minidpo.quant import check_quantize
from minidpo.refcache import ReferenceModel, default_cache_dir, fingerprint, precompute_reference_logps
from minidpo.tokenizer import load_tokenizer
from minidpo.train_state import load_state, save_state

SCHEDULERS = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    model: str
    data: str
    out: str
    eval_data: str | None = None
    # what is trained
    full_finetune: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,k_proj,v_proj"  # comma-separated leaf names, or "all-linear"
    use_rslora: bool = False
    quantize: str | None = None  # "nf4": the frozen base in 4-bit NormalFloat (QLoRA); LoRA runs only
    # the DPO loss and its reference
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    rpo_alpha: float | None = None
    reference_free: bool = False
    ref_model: str | None = None
    precompute_ref: bool = False
    ref_cache_dir: str | None = None
    # data
    chat_format: str | None = None  # None: detected from the tokenizer files
    system: str | None = None
    max_length: int = 1024
    max_prompt_length: int = 512
    strict: bool = False
    group_by_length: bool = False
    packing: bool = False  # each micro-batch one row, pairs sharing their prompt, no padding (minidpo.packing)
    # optimization
    lr: float = 5e-4
    scheduler: str = "cosine"
    warmup_steps: int = 10
    batch_size: int = 1
    grad_accum: int = 4
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    seed: int = 42
    # running
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # the base weights: None (bfloat16 on CUDA for LoRA, else float32), or a name
    parallel: str | None = None  # under torchrun: "ddp" or "fsdp" (None: ddp for LoRA, fsdp for full fine-tuning)
    gradient_checkpointing: bool = False
    eval_every: int = 0  # steps; 0: only at the end
    eval_batch_size: int = 4
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True
    plot: bool = True


# Options that may change between a run and its resumption: they do not change the numbers
# (packing: only by float rounding and the dropout draws).
RESUMABLE_CHANGES = {
    "out", "eval_data", "ref_cache_dir", "device", "eval_every", "eval_batch_size", "save_every",
    "keep_checkpoints", "resume", "progress", "plot", "strict", "packing",
}


@dataclass
class TrainResult:
    out: Path
    steps: int
    train: dict | None  # the last train record of metrics.jsonl
    eval: dict | None  # the last eval record, if any
    output: Path  # OUT/adapter or OUT/model


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """The multiplier of the base lr at optimizer step `step` (0-based), transformers' formulas."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


DTYPES = ("float32", "bfloat16", "float64")


@dataclass
class Counts:
    """The denominators of a loss that spans several micro-batches (an optimizer step, an eval)."""

    pairs: int  # examples: DPO pairs, SFT sequences
    chosen_tokens: int  # tokens of the chosen responses (SFT: of the responses)


def count_batches(batches: list[Batch], pairs: bool) -> Counts:
    chosen = [response_lengths(b.labels)[: len(b.keys) if pairs else None] for b in batches]  # (B,) each
    return Counts(sum(len(b.keys) for b in batches), sum(int(c.sum()) for c in chosen))


class MetricSums:
    """The summed loss shares of a step (or eval) and count-weighted sums of the per-batch metrics."""

    def __init__(self):
        self.loss = 0.0
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, loss: torch.Tensor, metrics: dict) -> None:
        self.loss += float(loss)
        n = metrics["count"]
        for name, value in metrics.items():
            if name != "count":
                self.sums[name] = self.sums.get(name, 0.0) + float(value) * n
        self.count += n

    def means(self, ranks: Distributed) -> dict:
        """The step's (or eval's) loss and metric means over every rank's batches."""
        names = sorted(self.sums)
        loss, count, *sums = ranks.sum([self.loss, self.count, *(self.sums[k] for k in names)])
        count = int(count)
        return {"loss": loss, **{k: v / max(1, count) for k, v in zip(names, sums)}, "count": count}


class RNGStream:
    """The trainer's own random stream (LoRA's init, dropout), seeded from its config.

    It is swapped into torch's global generators (the CPU's and the training device's) for
    the trainer's work and out again, so a caller's stream is untouched. Not a private
    torch.Generator: dropout takes none, and gradient checkpointing replays the global one.
    """

    def __init__(self, seed: int, device: torch.device):
        self.device = device
        self.state = {"torch": torch.Generator().manual_seed(seed).get_state()}
        if device.type == "cuda":
            self.state["cuda"] = torch.Generator(device).manual_seed(seed).get_state()

    @contextlib.contextmanager
    def active(self):
        with torch.random.fork_rng(devices=[self.device] if "cuda" in self.state else []):
            torch.set_rng_state(self.state["torch"])
            if "cuda" in self.state:
                torch.cuda.set_rng_state(self.state["cuda"], self.device)
            try:
                yield
            finally:
                self.state = {"torch": torch.get_rng_state()}
                if self.device.type == "cuda":
                    self.state["cuda"] = torch.cuda.get_rng_state(self.device)


@contextlib.contextmanager
def interrupt_flag(catch: bool):
    """With `catch`, turn the first Ctrl-C into a flag the loop polls; a second one interrupts at once."""
    flag = threading.Event()
    if not catch or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class _Interrupted(Exception):
    pass


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


class Trainer:
    """Loads model, tokenizer and data for one run; `train()` runs it (see the module docstring)."""

    def __init__(self, config: TrainConfig, mode: str = "dpo", *, log: Callable[[str], None] = _stderr):
        if mode not in ("dpo", "sft"):
            raise ValueError(f"mode must be 'dpo' or 'sft', got {mode!r}")
        self.config, self.mode = config, mode
        self.pairs = mode == "dpo"
        self._check_options()
        c = config
        self.out = Path(c.out)
        self.ranks = Distributed.from_environment(c.device)
        self.log = log if self.ranks.is_main else (lambda message: None)
        self.device = self.ranks.device
        self.parallel = c.parallel or default_parallel(c.full_finetune)
        on_cuda = self.device.type == "cuda"
        sharded = self.ranks.enabled and self.parallel == "fsdp"  # float32 shards, gathered as bf16 on CUDA
        base_dtype = (getattr(torch, c.dtype) if c.dtype
                      else torch.bfloat16 if on_cuda and not c.full_finetune and not sharded else torch.float32)
        self.autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
            if on_cuda and base_dtype != torch.float64 else contextlib.nullcontext
        )

        self.tokenizer = load_tokenizer(c.model, chat_format=c.chat_format)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.train_data = self._load_data(c.data)
        self.eval_data = self._load_data(c.eval_data) if c.eval_data else None

        self.rng = RNGStream(c.seed, self.device)
        self.model, _ = load_model(c.model, dtype=base_dtype, device=self.device, quantize=c.quantize)
        context = self.model.config.max_position_embeddings
        for data in filter(None, (self.train_data, self.eval_data)):
            if (longest := max(e.length for e in data.examples)) > context:
                raise ParameterError(f"max_length {c.max_length} keeps examples of {longest} tokens in {data.path}, "
                                     f"beyond the model's context of {context}; use at most {context}", "max_length")
        if c.full_finetune:
            for p in self.model.parameters():
                p.requires_grad_(True)
        else:
            lora = LoRAConfig(c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_targets, c.use_rslora)
            with self.rng.active():  # the same initial adapter on every rank, as in one process
                apply_lora(self.model, lora)
        if self.ranks.rank:  # each further rank draws its own dropout masks
            self.rng = RNGStream(c.seed * 1_000_003 + self.ranks.rank, self.device)
        self.model.gradient_checkpointing = c.gradient_checkpointing
        self.model.train()
        self.policy = wrap(SequenceLogprobs(self.model), self.model.model.layers, self.parallel, self.ranks)
        self.trainable = {name: p for name, p in self.model.named_parameters() if p.requires_grad}  # after wrap

        self.reference: ReferenceModel | None = None
        self.ref_logps: dict[str, dict[str, tuple[float, float]]] = {}
        if self.pairs and not is_reference_free(c.loss, c.reference_free):
            self._prepare_reference(base_dtype)

        self.optimizer = torch.optim.AdamW(self.trainable.values(), lr=c.lr, weight_decay=c.weight_decay)
        self.steps_per_epoch = math.ceil(len(self._batches(0)) / c.grad_accum)
        self.total_steps = c.max_steps or c.epochs * self.steps_per_epoch
        self.step, self.epoch, self.batch_index = 0, 0, 0
        self._order_cache: tuple[int, list[list[int]]] | None = None
        self._saved_step: int | None = None
        if not c.resume:
            self._check_fresh_out()
        elif self._checkpoints():
            self._resume(self._checkpoints()[-1])
        else:
            self.log(f"minidpo: no checkpoint in {self.out} yet; starting from step 0")

    # ---- setup

    def _check_options(self) -> None:
        c = self.config
        if self.pairs:
            check_loss_options(c.loss, c.beta, c.label_smoothing)
        check_parallel(c.parallel)
        if c.dtype is not None and c.dtype not in DTYPES:
            raise ParameterError(f"dtype {c.dtype!r} is unknown; choose one of {', '.join(DTYPES)}", "dtype")
        if c.scheduler not in SCHEDULERS:
            raise ParameterError(f"scheduler {c.scheduler!r} is unknown; choose one of {', '.join(SCHEDULERS)}", "scheduler")
        for name in ("batch_size", "grad_accum", "epochs", "eval_batch_size", "save_every", "keep_checkpoints"):
            if getattr(c, name) < 1:
                raise ParameterError(f"{name} must be >= 1, got {getattr(c, name)}", name)
        if c.max_steps is not None and c.max_steps < 1:
            raise ParameterError(f"max_steps must be >= 1, got {c.max_steps}", "max_steps")
        if not c.lr > 0:
            raise ParameterError(f"lr must be > 0, got {c.lr}", "lr")
        for name in ("warmup_steps", "eval_every", "max_grad_norm", "weight_decay"):
            if not getattr(c, name) >= 0:
                raise ParameterError(f"{name} must be >= 0, got {getattr(c, name)}", name)
        if c.rpo_alpha is not None and not c.rpo_alpha >= 0:
            raise ParameterError(f"rpo_alpha must be >= 0, got {c.rpo_alpha}", "rpo_alpha")
        check_output_dir(c.out, "out")
        check_quantize(c.quantize)
        if c.quantize and c.full_finetune:
            raise ParameterError("quantize freezes the base in 4 bits: it trains LoRA adapters, not full_finetune",
                                 "quantize", "full_finetune")  # fmt: skip

    def _load_data(self, path: str) -> Dataset:
        c = self.config
        skipped: list[str] = []
        data = load_dataset(
            path, self.tokenizer, self.tokenizer.chat_format, max_length=c.max_length,
            max_prompt_length=c.max_prompt_length, pairs=self.pairs, system=c.system, strict=c.strict,
            on_skip=skipped.append,
        )
        if skipped:
            self.log(f"minidpo: skipped {len(skipped)} bad line(s) of {path} (first: {skipped[0]}); --strict makes this fatal")
        if data.truncated:
            self.log(f"minidpo: training window {c.max_length} tokens (prompt up to {c.max_prompt_length}): "
                     f"{data.truncated} of {len(data.examples)} examples in {path} are cut to it")
        return data

    def _prepare_reference(self, dtype: torch.dtype) -> None:
        c = self.config
        ref_model = None
        if c.ref_model:
            ref_model, _ = load_model(c.ref_model, dtype=dtype, device=self.device, quantize=c.quantize)
            ref_model.requires_grad_(False)
            ref_model = SequenceLogprobs(ref_model)
            if self.parallel == "fsdp":  # DDP has nothing to synchronize in a frozen model: each rank keeps one
                ref_model = wrap(ref_model, ref_model.model.model.layers, self.parallel, self.ranks)
        self.reference = ReferenceModel(self.policy, ref_model)
        if not (c.precompute_ref or (c.full_finetune and ref_model is None)):
            return
        # Full fine-tuning without --ref-model: the starting weights, computed before any step.
        cache_dir = Path(c.ref_cache_dir) if c.ref_cache_dir else default_cache_dir()
        settings = {
            "format": repr(self.tokenizer.chat_format), "system": c.system, "max_length": c.max_length,
            "max_prompt_length": c.max_prompt_length, "dtype": str(dtype), "device": self.device.type,
            **({"quantize": c.quantize} if c.quantize else {}),
        }
        model_dir = c.ref_model or c.model
        for split, data in (("train", self.train_data), ("eval", self.eval_data)):
            if data is None:
                continue
            cache_file = cache_dir / f"{fingerprint(model_dir, data.path, settings)}.jsonl"
            self.log(f"minidpo: reference log-probs for {data.path}: {cache_file}")
            self.ref_logps[split] = precompute_reference_logps(
                self.reference, data.examples, cache_file, batch_size=c.eval_batch_size, pad_id=self.pad_id,
                device=self.device, autocast=self.autocast, ranks=self.ranks,
            )
        self.reference = None  # every example is cached: no reference forward, no second model kept

    def _checkpoints(self) -> list[Path]:
        return sorted((self.out / "checkpoints").glob("step-*"))

    def _check_fresh_out(self) -> None:
        if self._checkpoints():
            raise ParameterError(f"{self.out} already holds a run; continue it with resume or choose another out", "resume", "out")

    # ---- data

    def _batches(self, epoch: int) -> list[list[int]]:
        c = self.config
        size = c.batch_size * self.ranks.world_size  # global micro-batches; each rank takes its share
        return batch_order(self.train_data.examples, size, seed=c.seed, epoch=epoch, group_by_length=c.group_by_length)

    def _epoch_batches(self) -> list[list[int]]:
        if self._order_cache is None or self._order_cache[0] != self.epoch:
            self._order_cache = (self.epoch, self._batches(self.epoch))
        return self._order_cache[1]

    # ---- loss of one batch

    def _reference_logps(self, batch: Batch, split: str) -> torch.Tensor | None:
        if split in self.ref_logps:
            cached = self.ref_logps[split]
            chosen = [cached[k][0] for k in batch.keys]
            rejected = [cached[k][1] for k in batch.keys]
            return torch.tensor(chosen + rejected, dtype=torch.float64, device=self.device)  # (2B,)
        if self.reference is None:
            return None
        return self.reference.logps(batch.input_ids, batch.labels)  # (2B,)

    def collate(self, indices: list[int], data: Dataset | None = None) -> Batch:
        examples = [(data or self.train_data).examples[i] for i in indices]
        if self.config.packing:
            return pack(examples, pairs=self.pairs).to(self.device)
        return collate(examples, self.pad_id, pairs=self.pairs).to(self.device)

    def batch_loss(self, batch: Batch, split: str, counts: Counts) -> tuple[torch.Tensor, dict]:
        """The batch's share of a loss whose mean spans `counts` (a step's or an eval's), and its metrics."""
        c = self.config
        with self.autocast():
            if not self.pairs:
                logps, lengths = self.policy(batch.input_ids, batch.labels)  # (B,) each
                return sft_loss(logps, lengths, token_count=counts.chosen_tokens)
            ref = self._reference_logps(batch, split)  # (2B,) or None; first, so its activations go
            logps, lengths = self.policy(batch.input_ids, batch.labels)  # (2B,) each
        B = len(batch.keys)
        if ref is not None:
            ref = ref.to(logps.dtype)  # (2B,)
        return dpo_loss(
            logps[:B], logps[B:], None if ref is None else ref[:B], None if ref is None else ref[B:],
            loss_type=c.loss, beta=c.beta, label_smoothing=c.label_smoothing, reference_free=c.reference_free,
            chosen_lengths=lengths[:B], rejected_lengths=lengths[B:], simpo_gamma=c.simpo_gamma,
            rpo_alpha=c.rpo_alpha, pair_count=counts.pairs, chosen_token_count=counts.chosen_tokens,
        )

    # ---- the loop

    def train(self, on_step: Callable[[int, dict], None] | None = None, *, catch_interrupt: bool = False) -> TrainResult:
        """Run to `total_steps`; `on_step(step, record)` is called after each optimizer step.

        `catch_interrupt` installs a SIGINT handler for the run (a command line asks for it):
        the first Ctrl-C saves a checkpoint at the last completed step, then raises
        KeyboardInterrupt. Without it a KeyboardInterrupt propagates as it comes.
        """
        from tqdm import tqdm

        c = self.config
        main = self.ranks.is_main  # rank 0 alone writes; every rank computes
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / "train_config.json", {"mode": self.mode, **dataclasses.asdict(c)})
            if self.step == 0:  # a fresh run: drop records a run killed before its first checkpoint left
                atomic_write(self.out / "metrics.jsonl", "")
        metrics = JsonlAppender(self.out / "metrics.jsonl") if main else contextlib.nullcontext()
        write = metrics.write if main else (lambda record: None)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (c.progress and main), desc=self.mode,
                   dynamic_ncols=True)
        last_eval_step = None
        try:
            with interrupt_flag(catch_interrupt) as interrupted:
                while self.step < self.total_steps:
                    batches = self._epoch_batches()
                    if self.batch_index >= len(batches):
                        self.epoch, self.batch_index = self.epoch + 1, 0
                        continue
                    group = batches[self.batch_index : self.batch_index + c.grad_accum]
                    rng = self.rng.state  # the state at this step boundary, for a Ctrl-C save
                    try:
                        record = self._optimizer_step(group, interrupted)
                    except _Interrupted:
                        self._interrupt(rng)
                    write(record)
                    bar.update(1)
                    bar.set_postfix(self._postfix(record))
                    if on_step is not None:
                        on_step(self.step, record)
                    if self.eval_data is not None and c.eval_every and self.step % c.eval_every == 0:
                        write(self.evaluate())
                        last_eval_step = self.step
                    if self.step % c.save_every == 0 or self.step == self.total_steps:
                        self.save_checkpoint(self.rng.state)
                    if self._any_rank(interrupted):
                        self._interrupt(self.rng.state)
                if self.eval_data is not None and last_eval_step != self.step:
                    write(self.evaluate())
        finally:
            bar.close()
            if main:
                metrics.close()
        output = self._save_output()
        if c.plot and main:
            self._plot()
        records = load_jsonl_tolerant(self.out / "metrics.jsonl")
        last = {split: next((r for r in reversed(records) if r.get("split") == split), None) for split in ("train", "eval")}
        return TrainResult(self.out, self.step, last["train"], last["eval"], output)

    def _shards(self, micro_batches: list[list[int]], size: int, data: Dataset | None = None) -> list[tuple[Batch, bool]]:
        """This rank's (batch, real) of each global micro-batch; a rank without a share gets one unused example."""
        shards = [self.ranks.shard(micro, size) for micro in micro_batches]
        return [(self.collate(shard or micro[:1], data), bool(shard)) for shard, micro in zip(shards, micro_batches)]

    def _counts(self, shards: list[tuple[Batch, bool]]) -> Counts:
        counts = count_batches([batch for batch, real in shards if real], self.pairs)
        return Counts(*(int(n) for n in self.ranks.sum([counts.pairs, counts.chosen_tokens])))

    def accumulate(self, group: list[list[int]], interrupted: threading.Event | None = None) -> dict:
        """Forward and backward over one step's global micro-batches (lists of example indices).

        The gradients add up to those of the step's mean loss over every rank (see the module
        docstring); returns the step's loss and metrics with their count.
        """
        shards = self._shards(group, self.config.batch_size)
        counts = self._counts(shards)
        sums = MetricSums()
        with self.rng.active():
            for batch, real in shards:
                loss, metrics = self.batch_loss(batch, "train", counts)
                # DDP and FSDP2 average the ranks' gradients: scale by N for their sum
                (loss * (self.ranks.world_size if real else 0)).backward()
                sums.add(loss.detach() if real else 0.0, metrics if real else {**metrics, "count": 0})
                if interrupted is not None and self._any_rank(interrupted):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise _Interrupted
        return sums.means(self.ranks)

    def _optimizer_step(self, group: list[list[int]], interrupted: threading.Event) -> dict:
        c = self.config
        means = self.accumulate(group, interrupted)
        params = list(self.trainable.values())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm if c.max_grad_norm > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor over the ranks' shards
            grad_norm = grad_norm.full_tensor()
        lr = c.lr * lr_factor(self.step, self.total_steps, c.warmup_steps, c.scheduler)
        for group_ in self.optimizer.param_groups:
            group_["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.batch_index += len(group)
        epoch = self.epoch + self.batch_index / len(self._epoch_batches())
        return {"step": self.step, "split": "train", "epoch": round(epoch, 6), "lr": lr,
                "grad_norm": float(grad_norm), **means}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss and metrics over the whole eval set, in eval mode (no dropout)."""
        sums = MetricSums()
        size = self.config.eval_batch_size
        order = batch_order(self.eval_data.examples, size * self.ranks.world_size, seed=0, epoch=0, shuffle=False)
        shards = self._shards(order, size, self.eval_data)
        counts = self._counts(shards)
        self.model.eval()
        try:
            for batch, real in shards:
                loss, metrics = self.batch_loss(batch, "eval", counts)
                sums.add(loss if real else 0.0, metrics if real else {**metrics, "count": 0})
        finally:
            self.model.train()
        return {"step": self.step, "split": "eval", **sums.means(self.ranks)}

    def _any_rank(self, flag: threading.Event) -> bool:
        """Whether any rank saw Ctrl-C (so that all stop at the same point)."""
        return self.ranks.sum([flag.is_set()])[0] > 0

    @staticmethod
    def _postfix(record: dict) -> dict:
        keys = {"loss": "loss", "rewards/accuracies": "acc", "rewards/margins": "margin"}
        return {short: f"{record[k]:.3g}" for k, short in keys.items() if k in record}

    def _interrupt(self, rng: dict):
        if self._saved_step != self.step:
            self.save_checkpoint(rng)
        self.log(f"minidpo: interrupted; saved step {self.step} in {self.out / 'checkpoints'} (--resume continues)")
        raise KeyboardInterrupt

    # ---- checkpoints

    def _gather_rng(self, rng: dict) -> list[dict]:
        """Every rank's random stream state (`rng` is this rank's), in rank order."""
        return [
            {kind: states[r].cpu() for kind, states in
             ((kind, self.ranks.gather(state.to(self.device))) for kind, state in rng.items())}
            for r in range(self.ranks.world_size)
        ]

    def save_checkpoint(self, rng: dict) -> Path:
        """Write OUT/checkpoints/step-NNNNNN for the current step (atomically) and prune old ones.

        Every rank calls it: the state is gathered from all (full tensors), rank 0 writes it.
        """
        path = self.out / "checkpoints" / f"step-{self.step:06d}"
        tensors = gather_state(self.model, self.ranks)
        optimizer = gather_optimizer_state(self.model, self.optimizer, self.ranks)
        rngs = self._gather_rng(rng)
        if self.ranks.is_main:
            with atomic_dir(path) as tmp:
                save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()},
                          str(tmp / "trainable.safetensors"))
                if not self.config.full_finetune:
                    save_adapter(self.model, tmp / "adapter", base_model_name_or_path=self.config.model, tensors=tensors)
                save_state(tmp, "optimizer", optimizer)
                save_state(tmp, "trainer", {
                    "mode": self.mode, "step": self.step, "epoch": self.epoch, "batch_index": self.batch_index,
                    "world_size": self.ranks.world_size, "rng": rngs, "config": dataclasses.asdict(self.config),
                })
            for old in self._checkpoints()[: -self.config.keep_checkpoints]:
                shutil.rmtree(old)
        self.ranks.barrier()
        self._saved_step = self.step
        return path

    def _resume(self, path: Path) -> None:
        state = load_state(path, "trainer")
        if state["mode"] != self.mode:
            raise MiniDPOError(f"{path}: the checkpoint is from a {state['mode']} run, not {self.mode}")
        saved, now = state["config"], dataclasses.asdict(self.config)
        for key, value in now.items():
            if key not in RESUMABLE_CHANGES and saved.get(key) != value:
                raise ParameterError(
                    f"{path}: {key} was {saved.get(key)!r} in this run, now {value!r}; "
                    f"resume with the same options or start a new out", key, "out",
                )
        if state["world_size"] != self.ranks.world_size:
            raise MiniDPOError(f"{path}: the run had {state['world_size']} ranks, now {self.ranks.world_size}; "
                               f"resume it with as many (the data order and batches depend on them)")
        tensors = load_file(str(path / "trainable.safetensors"))
        if set(tensors) != set(self.trainable):
            raise MiniDPOError(f"{path}: trainable.safetensors does not match the model's trainable parameters")
        load_full_state(self.model, self.optimizer, tensors, load_state(path, "optimizer"))
        self.rng.state = state["rng"][self.ranks.rank]
        self.step, self.epoch, self.batch_index = state["step"], state["epoch"], state["batch_index"]
        if self.ranks.is_main:  # records written after this checkpoint belong to steps that will run again
            kept = [r for r in load_jsonl_tolerant(self.out / "metrics.jsonl") if r.get("step", 0) <= self.step]
            atomic_write(self.out / "metrics.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        self.ranks.barrier()
        self.log(f"minidpo: resumed {self.out} at step {self.step} of {self.total_steps}")

    def _save_output(self) -> Path:
        """OUT/adapter or OUT/model, gathered from every rank, written by rank 0."""
        c = self.config
        state = gather_state(self.model, self.ranks, trainable_only=not c.full_finetune)
        if self.ranks.is_main and c.full_finetune:
            save_model(self.model, self.out / "model", tokenizer_from=c.model, state=state)
        elif self.ranks.is_main:
            save_adapter(self.model, self.out / "adapter", base_model_name_or_path=c.model, tensors=state)
        self.ranks.barrier()
        return self.out / ("model" if c.full_finetune else "adapter")

    def _plot(self) -> None:
        from minidpo.plot import plot_metrics

        try:
            plot_metrics(self.out)
        except MiniDPOError as e:  # matplotlib missing: the run itself succeeded
            self.log(f"minidpo: no plot ({e})")


def train_dpo(
    config: TrainConfig, *, on_step=None, log: Callable[[str], None] = _stderr, catch_interrupt: bool = False
) -> TrainResult:
    """Align with DPO (or a variant: config.loss); see TrainConfig for every option."""
    return _run(Trainer(config, "dpo", log=log), on_step, catch_interrupt)


def train_sft(
    config: TrainConfig, *, on_step=None, log: Callable[[str], None] = _stderr, catch_interrupt: bool = False
) -> TrainResult:
    """Supervised fine-tuning on the chosen responses (prompt masked)."""
    return _run(Trainer(config, "sft", log=log), on_step, catch_interrupt)


def _run(trainer: Trainer, on_step, catch_interrupt: bool) -> TrainResult:
    try:
        return trainer.train(on_step, catch_interrupt=catch_interrupt)
    finally:
        trainer.ranks.close()
