"""`minidpo generate`: complete one or more prompts with a local model, batched and KV-cached.

Also the model and sampling options that `minidpo chat` and `minidpo serve` share.
"""

from __future__ import annotations

import sys

from minidpo.commands import add_quantize_argument

HELP = "complete prompts with a local model (each wrapped in its chat format unless --raw)"

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="HF-format model folder")
    parser.add_argument("--adapter", metavar="DIR", help="LoRA adapter folder (PEFT layout), merged in at load")
    parser.add_argument("--chat-format", help="chatml, llama3, llama2, mistral, plain, smollm2, qwen2 (default: detected)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="weights (default: bfloat16 on CUDA, else float32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA)")
    add_quantize_argument(parser)


def add_sampling_arguments(parser, *, temperature: float, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N")
    parser.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, help="makes sampling reproducible")


def load_for_inference(args):
    """(model, tokenizer) from --model/--adapter/--chat-format/--device/--dtype/--quantize, ready to generate.

    The adapter is merged into the weights, except on a quantized base: there it stays a LoRA
    beside the 4-bit layers, which keeps the memory saving.
    """
    import torch

    from minidpo.checkpoint import load_model
    from minidpo.device import resolve_device
    from minidpo.tokenizer import load_tokenizer

    device = resolve_device(args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    tokenizer = load_tokenizer(args.model, chat_format=args.chat_format)
    model, _ = load_model(args.model, dtype=getattr(torch, dtype_name), device=device, quantize=args.quantize)
    if args.adapter:
        from minidpo.lora import load_adapter, merge_lora

        load_adapter(model, args.adapter)
        if not args.quantize:
            merge_lora(model)
    return model, tokenizer


def check_sampling_arguments(args) -> None:
    """Refuse bad sampling options before the model loads, naming the flag."""
    import re

    from minidpo.errors import MiniDPOError
    from minidpo.sampler import SamplingParams

    try:
        SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                       stop=tuple(args.stop))  # fmt: skip
    except ValueError as e:  # "top_p must be in (0, 1], got SamplingParams(...)" -> "--top-p must be ..."
        message = re.sub(r"^\w+", lambda m: "--" + m.group(0).replace("_", "-"), str(e).split(", got")[0])
        raise MiniDPOError(message) from None


def check_context(prompt_lengths: list[int], max_new_tokens: int, context: int) -> None:
    """Refuse prompts that, with --max-new-tokens of reply, do not fit the model's context
    (max_position_embeddings), as vLLM does, instead of running past the positions it was trained on."""
    from minidpo.errors import MiniDPOError

    for i, n in enumerate(prompt_lengths, start=1):
        if n == 0:
            raise MiniDPOError(f"--prompt {i} is empty; give some text")
        if n >= context:
            raise MiniDPOError(f"--prompt {i} is {n} tokens, the model's context is {context} tokens "
                               "(max_position_embeddings); shorten it")  # fmt: skip
        if n + max_new_tokens > context:
            raise MiniDPOError(f"--max-new-tokens {max_new_tokens}: prompt {i} ({n} tokens) and the reply would "
                               f"exceed the model's context of {context} tokens; use at most {context - n}")  # fmt: skip


def sampling_options(args, tokenizer, *, raw: bool = False) -> dict:
    """generate()'s keyword arguments from the sampling options (+ the chat format's stop strings)."""
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop) + (() if raw else tokenizer.chat_format.stop_strings),
    )
    return options | {"seed": args.seed, "compile": args.compile}


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="a prompt (repeatable: one batch)")
    parser.add_argument("--system", help="system message for every prompt")
    parser.add_argument("--raw", action="store_true", help="send the prompts as they are, without the chat template")
    add_sampling_arguments(parser, temperature=0.0, max_new_tokens=256)


def run(args) -> int:
    from minidpo.sampler import generate, render_chat

    check_sampling_arguments(args)
    model, tokenizer = load_for_inference(args)
    options = sampling_options(args, tokenizer, raw=args.raw)
    system = [{"role": "system", "content": args.system}] if args.system else []
    prompts = args.prompt if args.raw else [render_chat(tokenizer, [*system, {"role": "user", "content": p}]) for p in args.prompt]
    check_context([len(tokenizer.encode(p)) for p in prompts], args.max_new_tokens, model.config.max_position_embeddings)
    if len(prompts) == 1:  # one prompt: stream it
        [completion] = generate(model, tokenizer, prompts, stream=lambda row, text: print(text, end="", flush=True), **options)
        print()
        completions = [completion]
    else:
        completions = generate(model, tokenizer, prompts, **options)
        for i, completion in enumerate(completions):
            print(f"=== {i + 1}/{len(completions)}", args.prompt[i], "", completion.text, sep="\n")
    for i, c in enumerate(completions):
        print(f"[{i + 1}: {c.prompt_tokens} prompt + {c.completion_tokens} completion tokens, {c.finish_reason}]",
              file=sys.stderr)  # fmt: skip
    return 0
