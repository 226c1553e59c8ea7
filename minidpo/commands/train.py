"""`minidpo train`: DPO (or a variant) with LoRA, or full fine-tuning; `sft` shares these options."""

from __future__ import annotations

import argparse

from minidpo.commands import add_quantize_argument

HELP = "align a model with DPO (LoRA by default) on prompt/chosen/rejected JSONL"


# Library parameter names that this command spells differently (ParameterError.renamed; cli.py)
FLAGS = {
    "r": "--lora-r", "alpha": "--lora-alpha", "dropout": "--lora-dropout", "target_modules": "--lora-targets",
    "use_rslora": "--rslora", "loss_type": "--loss", "progress": "--no-progress", "plot": "--no-plot",
}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `minidpo train` and `minidpo sft` share (defaults: TrainConfig's, the paper's)."""
    from minidpo.distributed import PARALLEL
    from minidpo.train import DTYPES, SCHEDULERS, TrainConfig

    d = TrainConfig(model="", data="", out="")
    parser.add_argument("--model", required=True, metavar="DIR", help="HF-format model folder")
    parser.add_argument("--data", required=True, metavar="FILE", help="training JSONL (prompt, chosen, rejected)")
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder: metrics, checkpoints, adapter/")
    parser.add_argument("--eval-data", metavar="FILE", help="held-out JSONL, evaluated every --eval-every steps and at the end")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g = parser.add_argument_group("what is trained")
    g.add_argument("--full-finetune", action="store_true", help="train every weight instead of LoRA adapters")
    g.add_argument("--lora-r", type=int, default=d.lora_r, help=f"LoRA rank (default {d.lora_r})")
    g.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help=f"LoRA alpha (default {d.lora_alpha:g})")
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help=f"(default {d.lora_dropout})")
    g.add_argument("--lora-targets", default=d.lora_targets, help=f'comma-separated layer names or "all-linear" (default {d.lora_targets})')
    g.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) (rsLoRA)")
    add_quantize_argument(g)
    g = parser.add_argument_group("data")
    g.add_argument("--chat-format", help="chatml, llama3, llama2, mistral, plain (LibraChem's Question/Answer), smollm2, qwen2; default: from the tokenizer")
    g.add_argument("--system", help="system prompt for every example")
    g.add_argument("--max-length", type=int, default=d.max_length, help=f"tokens of prompt + response (default {d.max_length})")
    g.add_argument("--max-prompt-length", type=int, default=d.max_prompt_length, help=f"prompt tokens kept, from the end (default {d.max_prompt_length})")
    g.add_argument("--strict", action="store_true", help="a bad data line is fatal (default: skip and count)")
    g.add_argument("--group-by-length", action="store_true", help="batch examples of similar length (less padding)")
    g.add_argument("--packing", action="store_true",
                   help="each micro-batch as one row: chosen and rejected share their prompt, no padding (same numbers)")
    g = parser.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    g.add_argument("--scheduler", choices=SCHEDULERS, default=d.scheduler, help=f"(default {d.scheduler})")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help=f"(default {d.warmup_steps})")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"examples per micro-batch (default {d.batch_size})")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help=f"micro-batches per step (default {d.grad_accum})")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help=f"0: no clipping (default {d.max_grad_norm:g})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW (default {d.weight_decay:g})")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"(default {d.epochs})")
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--seed", type=int, default=d.seed, help=f"(default {d.seed})")
    g = parser.add_argument_group("running")
    g.add_argument("--device", help="cuda, cpu, cuda:1 ... (default: cuda when available)")
    g.add_argument("--parallel", choices=PARALLEL,
                   help="under torchrun: ddp (default with LoRA) or fsdp (FSDP2 sharding; default with --full-finetune)")
    g.add_argument("--dtype", choices=DTYPES, help="the base weights (default: bfloat16 on CUDA with LoRA, else float32)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward (less memory)")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evaluations (default: only at the end)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help=f"(default {d.eval_batch_size})")
    g.add_argument("--save-every", type=int, default=d.save_every, help=f"steps between checkpoints (default {d.save_every})")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help=f"(default {d.keep_checkpoints})")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plot", action="store_true", help="no metrics.png at the end")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from minidpo.losses import LOSS_TYPES
    from minidpo.train import TrainConfig

    add_common_arguments(parser)
    d = TrainConfig(model="", data="", out="")
    g = parser.add_argument_group("DPO loss and reference")
    g.add_argument("--loss", choices=LOSS_TYPES, default=d.loss, help=f"(default {d.loss})")
    g.add_argument("--beta", type=float, default=d.beta, help=f"(default {d.beta:g})")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="cDPO / robust label noise (default 0)")
    g.add_argument("--simpo-gamma", type=float, default=d.simpo_gamma, help=f"SimPO target margin (default {d.simpo_gamma:g})")
    g.add_argument("--rpo-alpha", type=float, help="add alpha x NLL of the chosen responses (RPO)")
    g.add_argument("--reference-free", action="store_true", help="no reference model (log-ratios against a uniform reference)")
    g.add_argument("--ref-model", metavar="DIR", help="a separate frozen reference model (default: the same weights, adapters off)")
    g.add_argument("--precompute-ref", action="store_true", help="compute reference log-probs once, cache them on disk, reuse them")
    g.add_argument("--ref-cache-dir", metavar="DIR", help="where --precompute-ref keeps them (default ~/.cache/minidpo/ref_logps)")


def config_from_args(args: argparse.Namespace):
    """A TrainConfig from parsed arguments (the options a command does not have keep their defaults)."""
    import dataclasses

    from minidpo.train import TrainConfig

    renamed = {"use_rslora": "rslora", "progress": "no_progress", "plot": "no_plot"}
    values = {}
    for field in dataclasses.fields(TrainConfig):
        arg = renamed.get(field.name, field.name)
        if hasattr(args, arg):
            value = getattr(args, arg)
            values[field.name] = not value if arg.startswith("no_") else value
    return TrainConfig(**values)


def run(args) -> int:
    from minidpo.distributed import is_main_process, rank_errors
    from minidpo.train import train_dpo

    with rank_errors():
        result = train_dpo(config_from_args(args), catch_interrupt=True)
    if is_main_process():
        print(result.output)
    return 0
