"""`minidpo eval`: safety and utility of local models and endpoints, rule + LLM judge (eval/).

    minidpo eval --model DIR [--adapter A ...] [--with-base] [--base-model D [--base-adapter A]] --out OUT
    minidpo eval --endpoint URL --model-name NAME [--model-name NAME2] --data test.jsonl --out OUT
    minidpo eval --like runs/demo --out OUT        # the demo's evaluation, from its demo.json
    ... --judge-endpoint URL --judge-model NAME [--grade] [--no-progress]

Every source answers every --data set (default: the shipped eval_* splits); answers and
judge verdicts are cached in OUT by everything that changes them, so a rerun or a new
judge regenerates nothing and a changed setting regenerates. --base-model adds the
source "base", the retention base. API keys are read from the environment variables
named by --api-key-env and --judge-api-key-env, never from the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from minidpo.commands import add_quantize_argument
from minidpo.errors import MiniDPOError

HELP = ("score safety, utility, over-refusal and correctness of models or endpoints (rule + LLM judge); "
        "report.json/.md/.png")
# answering settings: their defaults, and the flags --like takes from demo.json instead
DEFAULTS = {"max_new_tokens": 256, "temperature": 0.0, "seed": 0, "batch_size": 8}
LIKE_EXCLUDES = ("model", "adapter", "with_base", "endpoint", "model_name", "name", "data", "base_model", "base_adapter",
                 "max_new_tokens", "temperature", "seed", "batch_size", "chat_format", "system", "quantize")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what to evaluate")
    g.add_argument("--model", type=Path, help="HF-format model folder (e.g. the one `minidpo fetch-default` prints)")
    g.add_argument("--adapter", type=Path, action="append", default=[],
                   help="LoRA adapter folder for --model; repeat to compare several (one source each)")
    g.add_argument("--with-base", action="store_true", help="with --adapter: also evaluate --model without one")
    g.add_argument("--base-model", type=Path,
                   help="the base model folder: evaluated as the source 'base' and divided by in the retention score")
    g.add_argument("--base-adapter", type=Path, help="LoRA adapter folder for --base-model")
    g.add_argument("--like", type=Path, metavar="DEMO_OUT",
                   help="evaluate as a demo run did, from DEMO_OUT/demo.json: its final model and base, its splits "
                        "and settings (excludes the other model, data and answering flags)")
    g.add_argument("--endpoint", help="OpenAI-compatible base URL of models to evaluate, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model-name", action="append", default=[], help="model at --endpoint; repeat for several")
    g.add_argument("--name", action="append", default=[],
                   help="names of the sources in order (local ones first, then endpoints; --base-model's is 'base')")
    g.add_argument("--data", type=Path, action="append", default=[],
                   help="evaluation JSONL {prompt, true_label, id?, compound?}; repeat for several "
                        "(default: the shipped eval_seen.jsonl and eval_unseen.jsonl)")
    g.add_argument("--limit", type=int, help="only N rows of each set (the first of each class, keeping the class ratio)")
    g.add_argument("--out", type=Path, required=True, help="folder for answers, verdicts and the report")

    g = parser.add_argument_group("answering")
    g.add_argument("--max-new-tokens", type=int, help="answer length limit in tokens (default 256)")
    g.add_argument("--temperature", type=float, help="0 = greedy (default)")
    g.add_argument("--seed", type=int, help="sampling seed when --temperature > 0 (default 0)")
    g.add_argument("--batch-size", type=int, help="local model: prompts (and reference answers) per batch (default 8)")
    g.add_argument("--chat-format", help="local model: chatml, llama3, llama2, mistral, plain (default: detected)")
    g.add_argument("--system", help="system prompt for every question")
    g.add_argument("--device", help="local model: cuda, cpu, ... (default: cuda when available)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="local model weights (default bfloat16 on CUDA, float32 on CPU)")
    add_quantize_argument(g)
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable with --endpoint's key")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (one summary line per stage stays)")

    g = parser.add_argument_group("judging")
    g.add_argument("--judge-endpoint", help="OpenAI-compatible base URL of the judge (without one: rule-only)")
    g.add_argument("--judge-model", help="judge model name")
    g.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable with the judge's key")
    g.add_argument("--judge-max-reasks", type=int, default=2, help="re-asks on a reply that is not yes/no (default 2)")
    g.add_argument("--judge-max-tokens", type=int, help="reply budget of the judge (default: the endpoint's)")
    g.add_argument("--grade", action="store_true", help="also grade legitimate answers 1-5 with a rubric")

    g = parser.add_argument_group("requests (endpoints and judge)")
    g.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    g.add_argument("--timeout", type=float, default=120.0, help="read timeout per request, seconds")
    g.add_argument("--max-retries", type=int, default=6, help="retries per request on 429/5xx/timeouts")


def _client(endpoint: str, model: str, api_key_env: str, args: argparse.Namespace):
    from minidpo.gen.client import ChatClient

    return ChatClient(endpoint, model, api_key_env=api_key_env, read_timeout=args.timeout,
                      max_retries=args.max_retries, workers=args.concurrency)


def build_sources(args: argparse.Namespace) -> list:
    from minidpo.eval import EndpointSource, LocalModelSource

    if args.adapter and args.model is None:
        raise MiniDPOError("--adapter needs --model (the base model folder the adapter was trained on)")
    if args.endpoint and not args.model_name:
        raise MiniDPOError("--endpoint needs --model-name NAME (the model to request)")
    if args.model_name and not args.endpoint:
        raise MiniDPOError("--model-name needs --endpoint URL")
    if args.base_adapter and args.base_model is None:
        raise MiniDPOError("--base-adapter needs --base-model (the folder the adapter was trained on)")
    local = [None] if args.model and (args.with_base or not args.adapter) else []
    local += args.adapter if args.model else []
    count = len(local) + len(args.model_name)
    if not count:
        raise MiniDPOError("nothing to evaluate: give --model DIR and/or --endpoint URL --model-name NAME")
    if args.name and len(args.name) != count:
        raise MiniDPOError(f"--name given {len(args.name)} times for {count} sources; name all of them or none")
    names = iter(args.name or [None] * count)

    sources = []
    settings = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature, "seed": args.seed, "chat_format": args.chat_format,
                "system": args.system}
    for adapter in local:
        sources.append(LocalModelSource.from_dir(args.model, adapter, name=next(names), device=args.device,
                                                 dtype=_dtype(args), quantize=args.quantize, **settings))
    for model_name in args.model_name:
        sources.append(EndpointSource(_client(args.endpoint, model_name, args.api_key_env, args), name=next(names),
                                      max_tokens=args.max_new_tokens, temperature=args.temperature,
                                      system=args.system))
    if args.base_model:
        sources.append(LocalModelSource.from_dir(args.base_model, args.base_adapter, name="base", device=args.device,
                                                 dtype=_dtype(args), quantize=args.quantize, **settings))
    return sources


def _dtype(args: argparse.Namespace):
    import torch

    return getattr(torch, args.dtype) if args.dtype else None


def _like(args: argparse.Namespace) -> tuple[list, list, str | None]:
    """(sources, evaluation sets, retention base) of the demo run named by --like."""
    from minidpo.eval.dataset import load_eval_set
    from minidpo.eval.like import like_sources, read_demo_run

    given = [name for name in LIKE_EXCLUDES if getattr(args, name) not in (None, False, [])]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise MiniDPOError(f"--like takes models, data and answering settings from demo.json; drop {flag}")
    run = read_demo_run(args.like)
    datasets = [load_eval_set(path, name=label, limit=args.limit) for label, path in run.eval_sets.items()]
    return like_sources(run, device=args.device, dtype=_dtype(args)), datasets, "base" if run.base else None


def run(args: argparse.Namespace) -> int:
    from minidpo.config import ModelConfig
    from minidpo.eval import LLMJudge, evaluate, shipped_eval_paths
    from minidpo.eval.dataset import load_eval_set
    from minidpo.eval.report import summary
    from minidpo.io import check_output_dir

    if bool(args.judge_endpoint) != bool(args.judge_model):
        raise MiniDPOError("give both --judge-endpoint URL and --judge-model NAME (or neither for rule-only)")
    for flag, value, least in (("--limit", args.limit, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                               ("--batch-size", args.batch_size, 1), ("--temperature", args.temperature, 0),
                               ("--concurrency", args.concurrency, 1), ("--judge-max-reasks", args.judge_max_reasks, 0),
                               ("--max-retries", args.max_retries, 0)):
        if value is not None and value < least:
            raise MiniDPOError(f"{flag} must be >= {least}, got {value}")
    if not args.timeout > 0:
        raise MiniDPOError(f"--timeout must be > 0 seconds, got {args.timeout}")
    check_output_dir(args.out)
    if args.like is not None:
        sources, datasets, retention_base = _like(args)
    else:
        for key, value in DEFAULTS.items():
            setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
        datasets = [load_eval_set(p, limit=args.limit) for p in (args.data or shipped_eval_paths())]
        context = ModelConfig.from_file(args.model).max_position_embeddings if args.model else None
        if context is not None and args.max_new_tokens >= context:
            raise MiniDPOError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                               f"context of {context} tokens; use fewer")  # fmt: skip
        sources = build_sources(args)
        retention_base = "base" if args.base_model else None
    judge = None
    if args.judge_endpoint:
        judge = LLMJudge(_client(args.judge_endpoint, args.judge_model, args.judge_api_key_env, args),
                         max_reasks=args.judge_max_reasks, max_tokens=args.judge_max_tokens)
    report = evaluate(sources, datasets, args.out, judge, grade=args.grade, retention_base=retention_base,
                      progress=not args.no_progress)
    print()
    print(summary(report))
    print()
    print("wrote " + ", ".join(report["files"].values()))
    return 0
