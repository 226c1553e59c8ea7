"""One module per `minidpo` sub-command: HELP, add_arguments(parser), run(args)."""


def add_quantize_argument(parser) -> None:
    """--quantize, shared by every command that loads a model (one definition, one wording)."""
    parser.add_argument("--quantize", choices=("nf4",),
                        help="hold the base model's linear layers in 4-bit NF4 (QLoRA), quantized while loading "
                             "the HF folder")  # fmt: skip
