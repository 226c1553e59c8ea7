"""An OpenAI-compatible server (chat and text completions) on the standard library's http.server.

    server = make_server(model, tokenizer, port=0)        # 127.0.0.1, a free port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    OpenAI(base_url=server.url, api_key="...").chat.completions.create(...)
    server.close()                                         # or: with serve_in_thread(...) as server

Endpoints (the subset of https://platform.openai.com/docs/api-reference that a local model
can honour, with vLLM's local extensions):

    POST /v1/chat/completions  messages, max_tokens | max_completion_tokens, temperature, top_p,
                               stop, seed, n, stream (+ stream_options.include_usage),
                               logprobs + top_logprobs, response_format (json_object, json_schema)
    POST /v1/completions       prompt (a string or a list), the same sampling fields, logprobs: k,
                               echo (false only)
    both, vLLM's extensions:   top_k, min_p, repetition_penalty, min_tokens, ignore_eos, guided_choice
    GET  /v1/models, GET /health

Other request fields are accepted and ignored. Choice i of a request samples with seed + i.
Streamed, a choice's log-probs come whole with its last chunk (the one with finish_reason).

Concurrency: each connection gets a thread that validates and tokenizes its request and
puts it on a bounded queue; one model thread runs continuous batching over it
(server_worker.py). A client that disconnects, or whose stream write fails, frees its rows
at the next decode step; `request_timeout` ends rows that outlive it.

Errors follow OpenAI's shape (server_requests.py): 400 for anything invalid in the body,
401 without the right `Authorization: Bearer` key (compared in constant time), 404 for
unknown routes, 405 for a wrong method, 408 for a body that does not arrive within
`read_timeout`, 411/413 for a missing or oversize Content-Length, 503 with Retry-After when
the queue is full or the server is stopping, 504 past request_timeout, 500 if generation
itself fails (that request only). No request can stop the server. The listen backlog
(`backlog`) absorbs connection bursts instead of resetting them.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import math
import queue
import select
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from minidpo.errors import MiniDPOError
from minidpo.guided import TokenTexts
from minidpo.sampler import Completion
from minidpo.server_requests import (
    RequestError,
    boolean,
    encode,
    integer,
    invalid,
    max_tokens,
    parse_body,
    parse_constraint,
    parse_logprobs,
    parse_messages,
    parse_prompts,
    parse_stop,
    row_params,
)
from minidpo.server_worker import BatchWorker, GenerationRequest

ROUTES = {"/health": "GET", "/v1/models": "GET", "/v1/chat/completions": "POST", "/v1/completions": "POST"}


class ClientGone(Exception):
    """The client closed its connection while its request ran."""


class ChatServer(ThreadingHTTPServer):
    """The HTTP server: routes, authentication and limits; generation is the worker's."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        worker: BatchWorker,
        *,
        chat_format,
        model_name: str,
        api_key: str | None,
        max_new_tokens: int,
        max_total_tokens: int,
        max_body_bytes: int,
        backlog: int,
        read_timeout: float,
        request_timeout: float | None,
        verbose: bool,
    ):
        self.request_queue_size = backlog  # listen()'s backlog, read by server_activate
        super().__init__(address, ChatHandler)
        self.worker, self.chat_format, self.model_name, self.api_key = worker, chat_format, model_name, api_key
        self.max_new_tokens, self.max_total_tokens, self.max_body_bytes = max_new_tokens, max_total_tokens, max_body_bytes
        self.read_timeout, self.request_timeout, self.verbose = read_timeout, request_timeout, verbose
        self.created = int(time.time())
        self.serving = False
        self._token_texts: TokenTexts | None = None
        self._token_texts_lock = threading.Lock()

    def token_texts(self) -> TokenTexts:
        """Every token's text, for guided decoding (computed at the first guided request)."""
        with self._token_texts_lock:
            if self._token_texts is None:
                self._token_texts = TokenTexts(self.worker.tokenizer)
            return self._token_texts

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self.serving = True
        try:
            super().serve_forever(poll_interval)
        finally:
            self.serving = False

    @property
    def url(self) -> str:
        """The OpenAI base URL, e.g. http://127.0.0.1:8000/v1."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def close(self) -> None:
        """Stop serving (from another thread than serve_forever's), finish the rows in flight."""
        if self.serving:
            self.shutdown()
        self.worker.stop(timeout=60)
        self.server_close()

    def build_request(self, body: dict, *, chat: bool) -> tuple[GenerationRequest, list[int]]:
        """Validate a chat or text completions body: the request and each prompt's length."""
        if not isinstance(body.get("model", ""), str):
            raise invalid("'model' must be a string", "model", "invalid_type")
        if chat:
            messages = parse_messages(body)
            try:
                prompts = [self.chat_format.render(messages, add_generation_prompt=True)]
            except MiniDPOError as e:
                raise invalid(str(e), "messages") from None
        else:
            prompts = parse_prompts(body)
            if boolean(body, "echo"):
                raise invalid("'echo': true is not supported", "echo")
        n = integer(body, "n", 1, self.worker.max_batch_size, 1)
        if n * len(prompts) > self.worker.max_batch_size:
            raise invalid(f"n x prompts must be at most {self.worker.max_batch_size} rows", "n")
        stream = boolean(body, "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise invalid("'stream_options' must be an object", "stream_options", "invalid_type")
        ids = [encode(self.worker.tokenizer, p, "messages" if chat else "prompt") for p in prompts]
        budget = min(
            max_tokens(body, len(p), context=self.max_total_tokens, default=self.max_new_tokens) for p in ids
        )
        stop = (*(self.chat_format.stop_strings if chat else ()), *parse_stop(body))
        params = row_params(body, n=n, max_tokens=budget, stop=stop, logprobs=parse_logprobs(body, chat=chat),
                            constraint=parse_constraint(body, self.token_texts))  # fmt: skip
        deadline = None if self.request_timeout is None else time.monotonic() + self.request_timeout
        request = GenerationRequest([p for p in ids for _ in range(n)], params * len(prompts), stream,
                                    boolean(options, "include_usage"), deadline)  # fmt: skip
        return request, [len(p) for p in ids]


class ChatHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "minidpo"
    timeout = 120  # seconds an idle keep-alive connection is kept
    server: ChatServer

    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)

    # routes

    def do_GET(self):
        self._serve(lambda: self._route("GET", {"/health": self._health, "/v1/models": self._models}))

    def do_POST(self):
        self._serve(lambda: self._route("POST", {"/v1/chat/completions": self._chat, "/v1/completions": self._text}))

    def _wrong_method(self):
        self.close_connection = True  # a body we do not read must not be parsed as the next request
        self._serve(lambda: self._route(self.command, {}))

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _wrong_method

    def _route(self, method: str, routes: dict) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in routes:
            if path != "/health":
                self._authenticate()
            return routes[path]()
        if path in ROUTES:
            raise RequestError(405, f"{method} {path} is not allowed; use {ROUTES[path]}", code="method_not_allowed",
                               headers={"Allow": ROUTES[path]})  # fmt: skip
        raise RequestError(404, f"no route {method} {path}", code="unknown_url")

    def _serve(self, handle) -> None:
        try:
            handle()
        except RequestError as e:
            self._send_json(e.status, e.body(), e.headers)
        except ClientGone:
            self.close_connection = True
        except Exception as e:  # a bug must cost one request, not the server
            print(f"minidpo serve: {type(e).__name__}: {e}", file=sys.stderr)
            self._send_json(500, RequestError(500, "internal error", code="server_error").body())

    def _authenticate(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        token = given[len("Bearer ") :] if given.startswith("Bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise RequestError(401, "missing or incorrect API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    def _health(self) -> None:
        self._send_json(200, {"status": "ok"})

    def _models(self) -> None:
        model = {"id": self.server.model_name, "object": "model", "created": self.server.created, "owned_by": "minidpo"}
        self._send_json(200, {"object": "list", "data": [model]})

    # generation

    def _chat(self) -> None:
        self._generate(chat=True)

    def _text(self) -> None:
        self._generate(chat=False)

    def _generate(self, *, chat: bool) -> None:
        request, prompt_lengths = self.server.build_request(self._read_json(), chat=chat)
        reply = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                 "model": self.server.model_name}  # fmt: skip
        self.server.worker.submit(request)
        try:
            if request.stream:
                self._stream(request, reply, prompt_lengths, chat)
            else:
                self._reply(request, reply, prompt_lengths, chat)
        finally:
            request.cancelled.set()  # whatever happened, its rows need not run on

    def _reply(self, request: GenerationRequest, reply: dict, prompt_lengths: list[int], chat: bool) -> None:
        done: dict[int, Completion] = {}
        while len(done) < len(request.params):
            choice, kind, value = self._next_event(request)
            if kind == "error":
                raise value
            if kind == "done":
                done[choice] = value
        completions = [done[i] for i in range(len(request.params))]
        choices = [_choice(i, c, self.server.worker.tokenizer, chat) for i, c in enumerate(completions)]
        reply |= {"object": "chat.completion" if chat else "text_completion", "choices": choices,
                  "usage": _usage(prompt_lengths, completions)}  # fmt: skip
        self._send_json(200, reply)

    def _stream(self, request: GenerationRequest, reply: dict, prompt_lengths: list[int], chat: bool) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: int, text: str | None, finish_reason=None, first=False, logprobs=None) -> dict:
            if chat:
                delta = {"content": text} if text is not None else {}
                if first:
                    delta = {"role": "assistant", "content": ""}
                c = {"index": choice, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
            else:
                c = {"index": choice, "text": text or "", "finish_reason": finish_reason, "logprobs": logprobs}
            return {**reply, "object": obj, "choices": [c]} | ({"usage": None} if request.include_usage else {})

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        done: dict[int, Completion] = {}
        try:
            if chat:
                for i in range(len(request.params)):
                    self._send_event(chunk(i, None, first=True))
            while len(done) < len(request.params):
                choice, kind, value = self._next_event(request)
                if kind == "text":
                    self._send_event(chunk(choice, value))
                elif kind == "error":
                    self._send_event(value.body())
                    break
                else:
                    done[choice] = value
                    logprobs = _choice(choice, value, self.server.worker.tokenizer, chat)["logprobs"]
                    self._send_event(chunk(choice, None, value.finish_reason, logprobs=logprobs))
            else:
                if request.include_usage:
                    completions = [done[i] for i in range(len(request.params))]
                    usage = _usage(prompt_lengths, completions)
                    self._send_event({**reply, "object": obj, "choices": [], "usage": usage})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:  # the client went away: its rows end at the next step
            raise ClientGone from None

    def _next_event(self, request: GenerationRequest) -> tuple:
        """The request's next result, watching meanwhile whether its client is still there."""
        while True:
            try:
                return request.events.get(timeout=0.25)
            except queue.Empty:
                if self._client_gone():
                    raise ClientGone from None

    def _client_gone(self) -> bool:
        """True once the client has closed its side (a readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # body and replies

    def _read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise RequestError(411, "send the body with a Content-Length header", code="length_required")
        if int(length) > self.server.max_body_bytes:
            self.close_connection = True  # the unread body must not be parsed as the next request
            raise RequestError(413, f"the body is over {self.server.max_body_bytes} bytes", code="body_too_large")
        self.connection.settimeout(self.server.read_timeout)
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError:
            raw = b""
        finally:
            self.connection.settimeout(self.timeout)
        if len(raw) < int(length):
            self.close_connection = True
            raise RequestError(408, f"the body did not arrive within {self.server.read_timeout:g} s "
                                    f"({len(raw)} of {length} bytes)", code="request_timeout")  # fmt: skip
        return parse_body(raw)

    def _send_json(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def _send_event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()


def _choice(index: int, c: Completion, tokenizer, chat: bool) -> dict:
    if chat:
        logprobs = None if c.logprobs is None else {"content": [_chat_logprob(lp, tokenizer) for lp in c.logprobs]}
        message = {"role": "assistant", "content": c.text}
        return {"index": index, "message": message, "finish_reason": c.finish_reason, "logprobs": logprobs}
    return {"index": index, "text": c.text, "finish_reason": c.finish_reason,
            "logprobs": None if c.logprobs is None else _text_logprobs(c, tokenizer)}  # fmt: skip


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _chat_logprob(lp, tokenizer) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        token = _token_text(tokenizer, token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(i, v) for i, v in lp.top]}


def _text_logprobs(c: Completion, tokenizer) -> dict:
    tokens = [_token_text(tokenizer, lp.token_id) for lp in c.logprobs]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in c.logprobs],
            "top_logprobs": [{_token_text(tokenizer, i): v for i, v in lp.top} for lp in c.logprobs],
            "text_offset": offsets}  # fmt: skip


def _usage(prompt_lengths: list[int], completions: list[Completion]) -> dict:
    prompt, completion = sum(prompt_lengths), sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def make_server(
    model,
    tokenizer,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model_name: str = "minidpo",
    api_key: str | None = None,
    chat_format=None,
    max_batch_size: int = 8,
    batch_window: float = 0.005,
    max_queue: int = 256,
    max_new_tokens: int = 512,
    max_total_tokens: int | None = None,
    max_body_bytes: int = 1 << 20,
    backlog: int = 1024,
    read_timeout: float = 5.0,
    request_timeout: float | None = None,
    compile: bool = False,
    static_batching: bool = False,
    verbose: bool = False,
) -> ChatServer:
    """A bound ChatServer with its model thread running; call serve_forever(), later close().

    max_new_tokens is the reply length when a request names none; max_total_tokens caps
    prompt + reply (default: the model's max_position_embeddings, at most 8192). backlog
    is listen()'s queue of connections not yet accepted; max_queue bounds the requests
    waiting for the model (beyond it: 503); an idle model thread waits batch_window (s)
    after a first request for more to prefill with. read_timeout (s) bounds the wait for a body,
    request_timeout (s, None: none) a request's whole run. static_batching admits requests
    only into an empty batch (the baseline continuous batching is measured against).
    """
    if api_key is not None and not api_key:
        raise MiniDPOError("api_key is empty: give a key, or None for no authentication")
    for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue), ("backlog", backlog)):
        if value < 1:
            raise MiniDPOError(f"{name} must be >= 1, got {value}")
    if not 0 <= batch_window < math.inf:
        raise MiniDPOError(f"batch_window must be a finite number of seconds >= 0, got {batch_window}")
    for name, value in (("read_timeout", read_timeout), ("request_timeout", request_timeout)):
        if value is not None and not 0 < value < math.inf:
            raise MiniDPOError(f"{name} must be a finite number of seconds > 0, got {value}")
    worker = BatchWorker(model, tokenizer, max_batch_size=max_batch_size, batch_window=batch_window,
                         max_queue=max_queue, compile=compile, static_batching=static_batching)  # fmt: skip
    if max_total_tokens is None:
        max_total_tokens = min(model.config.max_position_embeddings, 8192)
    fmt = tokenizer.chat_format_or(chat_format)
    server = ChatServer(
        (host, port),
        worker,
        chat_format=fmt,
        model_name=model_name,
        api_key=api_key,
        max_new_tokens=max_new_tokens,
        max_total_tokens=max_total_tokens,
        max_body_bytes=max_body_bytes,
        backlog=backlog,
        read_timeout=read_timeout,
        request_timeout=request_timeout,
        verbose=verbose,
    )
    worker.thread.start()
    return server


@contextlib.contextmanager
def serve_in_thread(model, tokenizer, **kwargs) -> Iterator[ChatServer]:
    """A running server on 127.0.0.1 and a free port (for tests): `with serve_in_thread(m, t) as s: s.url`."""
    server = make_server(model, tokenizer, kwargs.pop("host", "127.0.0.1"), kwargs.pop("port", 0), **kwargs)
    thread = threading.Thread(target=server.serve_forever, name="minidpo-http", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.close()
        thread.join(10)
