"""`minidpo convert-gguf FILE.gguf OUT_DIR`: a llama.cpp GGUF as an HF-format model folder."""

from __future__ import annotations

HELP = "convert a llama-architecture GGUF into config.json + model.safetensors + tokenizer files"

DTYPES = ("float32", "bfloat16", "float16")
FLAGS = {"out_dir": "OUT_DIR"}  # convert_gguf's parameter -> how this command spells it


def add_arguments(parser) -> None:
    parser.add_argument(
        "gguf", metavar="FILE.gguf", help="the GGUF file (F32/F16/BF16/Q8_0/Q4_0/Q4_1/K-quant tensors)"
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (replaced if it exists)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="weight dtype written (default float32)"
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="shard the weights above this size (default 5GB)"
    )


def run(args) -> int:
    import torch

    from minidpo.gguf import convert_gguf

    print(
        convert_gguf(args.gguf, args.out_dir, getattr(torch, args.dtype), max_shard_size=args.max_shard_size)
    )
    return 0
