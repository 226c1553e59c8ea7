"""`minidpo serve`: an OpenAI-compatible server (chat and text completions) for a local model."""

from __future__ import annotations

import ipaddress
import math
import os
import signal
import sys
from pathlib import Path

from minidpo.commands.generate import add_model_arguments, load_for_inference

HELP = "serve a local model over the OpenAI API (POST /v1/chat/completions, /v1/completions)"


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    parser.add_argument("--api-key", default=os.environ.get("MINIDPO_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $MINIDPO_API_KEY)")  # fmt: skip
    parser.add_argument("--model-name", help="the model id clients see (default: the model folder's name)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="rows decoded together (continuous batching)")
    parser.add_argument("--batch-window-ms", type=float, default=5.0,
                        help="an idle server waits this long after a request for more to prefill with")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=512, help="reply length when a request names none")
    parser.add_argument("--max-total-tokens", type=int, help="prompt + reply limit (default: the model's context)")
    parser.add_argument("--max-queue", type=int, default=256, help="requests waiting for the model; beyond: 503")
    parser.add_argument("--backlog", type=int, default=1024, help="connections waiting to be accepted (listen backlog)")
    parser.add_argument("--read-timeout", type=float, default=5.0, help="seconds to wait for a request body (then 408)")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds a request may run before its rows are ended (504)")  # fmt: skip
    parser.add_argument("--static-batching", action="store_true",
                        help="admit requests only into an empty batch (a baseline for benchmarks)")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no access log")


def check_arguments(args) -> None:
    """One clear line for each flag out of range (before the model is loaded)."""
    from minidpo.errors import MiniDPOError

    if args.api_key is not None and not args.api_key:
        raise MiniDPOError("--api-key is empty (or MINIDPO_API_KEY is set but empty): give a key, or leave both unset")
    if not 0 <= args.port <= 65535:
        raise MiniDPOError(f"--port must be in 0..65535, got {args.port}")
    for flag, value in (("--max-batch-size", args.max_batch_size), ("--max-new-tokens", args.max_new_tokens),
                        ("--max-queue", args.max_queue), ("--backlog", args.backlog),
                        ("--max-total-tokens", args.max_total_tokens)):  # fmt: skip
        if value is not None and value < 1:
            raise MiniDPOError(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.batch_window_ms < math.inf:
        raise MiniDPOError(f"--batch-window-ms must be a finite number >= 0, got {args.batch_window_ms}")
    for flag, value in (("--read-timeout", args.read_timeout), ("--request-timeout", args.request_timeout)):
        if not 0 < value < math.inf:
            raise MiniDPOError(f"{flag} must be a finite number of seconds > 0, got {value}")


def run(args) -> int:
    from minidpo.errors import MiniDPOError
    from minidpo.server import make_server

    check_arguments(args)
    model, tokenizer = load_for_inference(args)
    context = model.config.max_position_embeddings
    if args.max_total_tokens is not None and args.max_total_tokens > context:
        raise MiniDPOError(f"--max-total-tokens {args.max_total_tokens} is beyond the model's context of {context}")
    try:
        server = make_server(
            model,
            tokenizer,
            args.host,
            args.port,
            model_name=args.model_name or Path(args.model).resolve().name,
            api_key=args.api_key,
            max_batch_size=args.max_batch_size,
            batch_window=args.batch_window_ms / 1000,
            max_queue=args.max_queue,
            max_new_tokens=args.max_new_tokens,
            max_total_tokens=args.max_total_tokens,
            backlog=args.backlog,
            read_timeout=args.read_timeout,
            request_timeout=args.request_timeout,
            compile=args.compile,
            static_batching=args.static_batching,
            verbose=not args.quiet,
        )
    except OSError as e:
        raise MiniDPOError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    if exposed_without_key(args.host, args.api_key):
        print(f"minidpo serve: warning: {args.host} is reachable from other machines and no --api-key is set",
              file=sys.stderr)  # fmt: skip
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    print(f"minidpo serve: {server.model_name} at {server.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        print("minidpo serve: stopping (finishing the rows in flight)", file=sys.stderr, flush=True)
        server.close()
    return 0


def exposed_without_key(host: str, api_key: str | None) -> bool:
    """True when `host` is not a loopback address and no key protects the server."""
    if api_key:
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: only localhost is known to stay on this machine
        return host != "localhost"


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt
