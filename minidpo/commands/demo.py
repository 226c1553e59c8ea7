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


def run(args):
    from minidpo.demo import run_demo

    run_demo(args.out, quick=args.quick, model_dir=args.model, device=args.device,
             judge_endpoint=args.judge_endpoint, judge_model=args.judge_model, quantize=args.quantize)
