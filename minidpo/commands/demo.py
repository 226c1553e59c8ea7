"""minidpo demo: the embedded default end to end (see minidpo/demo.py)."""

from minidpo.commands import add_quantize_argument

HELP = "the LibraChem method end to end on the default model: evaluate, SFT then DPO with LoRA, evaluate again"


def add_arguments(p):
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo; a rerun resumes)")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few minutes on a CPU")
    p.add_argument("--model", default=None, help="an HF-format folder instead of the default SmolLM2-135M-Instruct")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--judge-endpoint", default=None, help="OpenAI-compatible URL of an LLM judge (hybrid scoring)")
    p.add_argument("--judge-model", default=None, help="the judge's model name")
    add_quantize_argument(p)
    p.add_argument("--split", choices=("test", "validation"), default="test",
                   help="evaluate on the test splits (eval_*, the default) or the validation splits (val_*, for tuning)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_arguments(args) -> None:
    """The mistakes that would otherwise show only after the demo has fetched a model or written data."""
    from minidpo.config import ModelConfig
    from minidpo.device import resolve_device
    from minidpo.errors import MiniDPOError
    from minidpo.io import check_output_dir

    check_output_dir(args.out)
    resolve_device(args.device)
    if bool(args.judge_endpoint) != bool(args.judge_model):
        raise MiniDPOError("give both --judge-endpoint URL and --judge-model NAME (or neither for rule-only)")
    if args.model is not None:
        ModelConfig.from_file(args.model)


def run(args):
    from minidpo.demo import run_demo

    check_arguments(args)
    run_demo(args.out, quick=args.quick, model_dir=args.model, device=args.device,
             judge_endpoint=args.judge_endpoint, judge_model=args.judge_model, split=args.split,
             progress=not args.no_progress, quantize=args.quantize)
