"""`minidpo sft`: supervised fine-tuning on the chosen responses (prompt masked), before DPO."""

from __future__ import annotations

from minidpo.commands.train import FLAGS as TRAIN_FLAGS
from minidpo.commands.train import add_common_arguments, config_from_args

HELP = "supervised fine-tuning on the chosen responses of prompt/chosen JSONL (LoRA by default)"
FLAGS = TRAIN_FLAGS


def add_arguments(parser) -> None:
    add_common_arguments(parser)


def run(args) -> int:
    from minidpo.distributed import is_main_process, rank_errors
    from minidpo.train import train_sft

    with rank_errors():
        result = train_sft(config_from_args(args), catch_interrupt=True)
    if is_main_process():
        print(result.output)
    return 0
