"""`minidpo merge`: fold a LoRA adapter into its base model and write an HF-format folder."""

from __future__ import annotations

from minidpo.commands import add_quantize_argument

HELP = "merge a LoRA adapter (PEFT layout) into the base model and save a full model folder"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="the base model folder")
    parser.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write (replaced if it exists)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="weights written (default: the base model's)")
    add_quantize_argument(parser)  # an adapter trained on the NF4 base merges into the dequantized weights


def run(args) -> int:
    import torch

    from minidpo.checkpoint import merge_adapter

    dtype = getattr(torch, args.dtype) if args.dtype else None
    print(merge_adapter(args.model, args.adapter, args.out, dtype=dtype, quantize=args.quantize))
    return 0
