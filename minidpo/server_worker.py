"""The server's model thread: continuous batching over one DecodeBatch.

HTTP threads validate requests and `submit` them to a bounded queue (full: 503 with
Retry-After). The one model thread loops:

    1. admit: take waiting requests while their rows fit in max_batch_size, prefill them
       together and join them to the running batch (sampler.DecodeBatch.add); an idle
       worker waits `batch_window` seconds after a first request for others to prefill with;
    2. end the rows whose request was cancelled (the client went away) or outlived its
       deadline (504 request_timeout);
    3. step: one token for every row; a row that finishes leaves the batch at once.

So a request never waits for another to finish, only for one decode step. With
`static_batching` (a baseline for benchmarks/server_load.py) step 1 runs only when the batch
is empty: a request that arrives while a batch runs waits for all of its rows to end. Each request
gets its results on its own queue, `events`: (choice, "text", str) as text is decoded,
(choice, "done", Completion) when a row ends, or (None, "error", RequestError). A row that
fails alone (its own sampling) fails its request only; a prefill or step that raises fails
the requests it held, never the thread.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import torch

from minidpo.sampler import Completion, DecodeBatch, SamplingParams
from minidpo.server_requests import RequestError

RETRY_AFTER_S = 1


@dataclass(eq=False)  # hashed by identity: a row's key is (request, choice)
class GenerationRequest:
    """One accepted request: a prompt (token ids) and SamplingParams per choice; results go to `events`."""

    prompt_ids: list[list[int]]
    params: list[SamplingParams]
    stream: bool = False
    include_usage: bool = False  # streamed: a last chunk with the token counts
    deadline: float | None = None  # time.monotonic() after which its rows are ended
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def fail(self, error: RequestError) -> None:
        self.cancelled.set()
        self.events.put((None, "error", error))


class BatchWorker:
    """The one thread that runs the model, admitting requests into the running batch."""

    def __init__(self, model, tokenizer, *, max_batch_size: int, batch_window: float, max_queue: int, compile: bool,
                 static_batching: bool = False):  # fmt: skip
        self.model, self.tokenizer, self.compile = model, tokenizer, compile
        self.static_batching = static_batching
        self.max_batch_size, self.batch_window = max_batch_size, batch_window
        self.queue: queue.Queue[GenerationRequest | None] = queue.Queue(maxsize=max_queue)
        self.waiting: GenerationRequest | None = None  # taken from the queue, not admitted yet
        self.stopping = threading.Event()
        self.accepting = threading.Lock()  # orders submit() against the final drain
        self.steps = 0  # decode steps run
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # rows in the batch at recent steps (logs, tests)
        self.finished: Counter[str] = Counter()  # rows ended, by finish_reason (cancelled: client gone, timeout)
        self.thread = threading.Thread(target=self._run, name="minidpo-model", daemon=True)

    def submit(self, request: GenerationRequest) -> None:
        with self.accepting:
            if self.stopping.is_set():
                raise RequestError(503, "the server is shutting down", code="unavailable")
            try:
                self.queue.put_nowait(request)
            except queue.Full:
                raise RequestError(503, "too many queued requests; retry later", code="overloaded",
                                   headers={"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip

    def stop(self, timeout: float | None = None) -> None:
        """Finish the rows in flight, refuse what is queued, end the thread."""
        self.stopping.set()
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)  # wakes an idle thread
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _run(self) -> None:
        with torch.inference_mode():
            self.model.eval()
            batch = self._new_batch()
            while batch.rows or not self.stopping.is_set():
                if not self.stopping.is_set():
                    self._admit(batch, block=not batch.rows)
                self._cancel(batch)
                if batch.rows:
                    self.steps += 1
                    self.batch_sizes.append(len(batch.rows))
                    try:
                        batch.step()
                    except Exception as e:  # a failed step fails its requests, never the server
                        self._fail({r.key[0] for r in batch.rows}, "generation", e)
                        batch = self._new_batch()
        with self.accepting:  # refuse whatever is still queued
            pending = [self.waiting] if self.waiting else []
            while not self.queue.empty():
                pending.append(self.queue.get_nowait())
            for request in filter(None, pending):
                request.fail(RequestError(503, "the server is shutting down", code="unavailable"))

    def _new_batch(self) -> DecodeBatch:
        return DecodeBatch(self.model, self.tokenizer, stream=self._stream, on_finish=self._finish,
                           compile=self.compile)  # fmt: skip

    def _admit(self, batch: DecodeBatch, *, block: bool) -> None:
        """Prefill the waiting requests whose rows fit and join them to the batch. An idle
        worker (block) waits for a first request, then batch_window seconds for more."""
        if self.static_batching and batch.rows:
            return
        admitted, free, window_end = [], self.max_batch_size - len(batch.rows), 0.0
        while True:
            if self.waiting is None:
                try:
                    if block and not admitted:
                        self.waiting = self.queue.get(timeout=0.5)
                        window_end = time.monotonic() + self.batch_window
                    else:
                        self.waiting = self.queue.get(timeout=max(0.0, window_end - time.monotonic()))
                except queue.Empty:
                    break
                if self.waiting is None:  # stop() woke us
                    break
            request = self.waiting
            if request.cancelled.is_set() or _expired(request):
                self.waiting = None
                if _expired(request):
                    request.fail(_timeout())
                continue
            if len(request.params) > free:
                break
            self.waiting, free = None, free - len(request.params)
            admitted.append(request)
        if not admitted:
            return
        rows = [(r, i) for r in admitted for i in range(len(r.params))]
        try:
            batch.add([r.prompt_ids[i] for r, i in rows], [r.params[i] for r, i in rows], rows)
        except Exception as e:
            self._fail(set(admitted), "prefill", e)

    def _cancel(self, batch: DecodeBatch) -> None:
        ended = {r.key for r in batch.rows if r.key[0].cancelled.is_set() or _expired(r.key[0])}
        if ended:
            for request in {key[0] for key in ended}:
                if not request.cancelled.is_set():
                    request.fail(_timeout())
            batch.cancel(ended)

    def _fail(self, requests: set[GenerationRequest], stage: str, e: Exception) -> None:
        print(f"minidpo serve: {stage} failed: {type(e).__name__}: {e}", file=sys.stderr)
        for request in requests:
            request.fail(RequestError(500, f"{stage} failed: {type(e).__name__}", code="server_error"))

    @staticmethod
    def _stream(key, piece: str) -> None:
        request, choice = key
        if request.stream:
            request.events.put((choice, "text", piece))

    def _finish(self, key, completion: Completion) -> None:
        request, choice = key
        self.finished[completion.finish_reason] += 1
        if completion.finish_reason == "error":
            request.fail(RequestError(500, f"generation failed: {completion.error}", code="server_error"))
        elif completion.finish_reason != "cancelled":
            request.events.put((choice, "done", completion))


def _expired(request: GenerationRequest) -> bool:
    return request.deadline is not None and time.monotonic() > request.deadline


def _timeout() -> RequestError:
    return RequestError(504, "the request outlived the server's --request-timeout", code="request_timeout")
