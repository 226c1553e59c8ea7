"""`minidpo chat`: a multi-turn conversation with a local model in the terminal, streamed."""

from __future__ import annotations

import sys

from minidpo.commands.generate import (
    add_model_arguments,
    add_sampling_arguments,
    check_sampling_arguments,
    load_for_inference,
    sampling_options,
)
from minidpo.errors import MiniDPOError

HELP = "chat with a local model in the terminal (streams; /reset clears, /exit or Ctrl-D quits)"


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", help="system message (default: the chat format's own)")
    add_sampling_arguments(parser, temperature=0.7, max_new_tokens=512)


def run(args) -> int:
    from minidpo.sampler import generate, render_chat

    check_sampling_arguments(args)
    model, tokenizer = load_for_inference(args)
    options = sampling_options(args, tokenizer)
    context = model.config.max_position_embeddings
    if options["max_new_tokens"] >= context:
        raise MiniDPOError(f"--max-new-tokens {options['max_new_tokens']} leaves no room for a message in the "
                           f"model's context of {context} tokens; use fewer")  # fmt: skip
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print(f"minidpo chat: {args.model} ({tokenizer.chat_format.name}); /reset clears, /exit or Ctrl-D quits",
          file=sys.stderr)  # fmt: skip
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        if line == "/exit":
            return 0
        if line == "/reset":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line:
            continue
        messages = [*system, *history, {"role": "user", "content": line}]
        prompt = tokenizer.encode(render_chat(tokenizer, messages))
        if len(prompt) + options["max_new_tokens"] > context:
            print(f"(the conversation is {len(prompt)} tokens, too long for the model's {context}; /reset)",
                  file=sys.stderr)  # fmt: skip
            continue
        try:
            [reply] = generate(model, tokenizer, [prompt], stream=lambda row, text: print(text, end="", flush=True),
                               **options)  # fmt: skip
        except KeyboardInterrupt:  # stop this reply, keep the conversation as it was
            print("\n(interrupted)", file=sys.stderr)
            continue
        print()
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply.text}]
