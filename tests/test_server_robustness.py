"""The server under bad requests and load: 400s not 500s, one request never fails another,
dropped clients free their rows, bursts are not reset (issue 21). 127.0.0.1 only."""

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from tiny_lm import tiny_model

from minidpo.errors import MiniDPOError
from minidpo.sampler import SamplingParams
from minidpo.server import make_server, serve_in_thread
from minidpo.server_worker import GenerationRequest

MESSAGES = [{"role": "user", "content": "What is the boiling point of water?"}]
LONG = {"max_tokens": 3000, "ignore_eos": True, "temperature": 0}  # ~seconds of decoding: cancelled long before


@pytest.fixture(scope="module")
def long_model(tok):
    return tiny_model(tok.vocab_size, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def server(long_model, tok):
    with serve_in_thread(long_model, tok, model_name="tiny", max_batch_size=16, read_timeout=1.0) as server:
        yield server


def connect(server) -> http.client.HTTPConnection:
    host, port = server.server_address[:2]
    return http.client.HTTPConnection(host, port, timeout=60)


def post(server, body, path="/v1/chat/completions", method="POST"):
    """(status, headers, parsed JSON) of one request; body is bytes or an object."""
    conn = connect(server)
    conn.request(method, path, body if isinstance(body, bytes) else json.dumps(body).encode())
    response = conn.getresponse()
    out = response.status, dict(response.getheaders()), json.loads(response.read() or b"null")
    conn.close()
    return out


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **fields}


def wait_for(condition, timeout=10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return False


def raw(fields: str) -> bytes:
    """A body with raw JSON text for the extra fields (NaN, long numbers, escapes)."""
    return b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], ' + fields.encode() + b"}"


BAD_BODIES = {
    "temperature-nan": (raw('"temperature": NaN'), None),
    "top-p-infinity": (raw('"top_p": Infinity'), None),
    "float-overflow": (raw('"min_p": 1e999'), None),
    "integer-5000-digits": (raw('"seed": ' + "9" * 5000), None),
    "nested-100k": (b"[" * 100_000, None),
    "invalid-utf8": (raw('"stop": "\xff"').replace(b"\xc3\xbf", b"\xff"), None),
    "lone-surrogate": (b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
                       "messages[0].content"),  # fmt: skip
    "surrogate-in-stop": (raw('"stop": ["\\udfff"]'), "stop"),
    "temperature-3": (json.dumps(chat(temperature=3)).encode(), "temperature"),
    "top-p-0": (json.dumps(chat(top_p=0)).encode(), "top_p"),
    "repetition-penalty-tiny": (json.dumps(chat(repetition_penalty=1e-300)).encode(), "repetition_penalty"),
    "seed-2**70": (json.dumps(chat(seed=2**70, temperature=1)).encode(), "seed"),
    "seed-negative": (json.dumps(chat(seed=-1)).encode(), "seed"),
    "top-k-huge": (json.dumps(chat(top_k=2**70)).encode(), "top_k"),
    "min-tokens-over-max": (json.dumps(chat(min_tokens=9)).encode(), "min_tokens"),
    "ignore-eos-type": (json.dumps(chat(ignore_eos="yes")).encode(), "ignore_eos"),
    "top-logprobs-without-logprobs": (json.dumps(chat(top_logprobs=2)).encode(), "top_logprobs"),
}


@pytest.mark.parametrize("name", BAD_BODIES)
def test_odd_values_get_400_not_500(server, name):
    body, param = BAD_BODIES[name]
    status, _, reply = post(server, body)
    assert status == 400, reply
    assert reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["param"] == param
    status, _, _ = post(server, chat())
    assert status == 200


def test_a_prompt_longer_than_the_context_gets_400_naming_it(tok):
    with serve_in_thread(tiny_model(tok.vocab_size, max_position_embeddings=64), tok) as small:
        status, _, reply = post(small, chat(messages=[{"role": "user", "content": "word " * 100}]))
        assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
        assert reply["error"]["param"] == "prompt" and "64 tokens" in reply["error"]["message"]
        status, _, reply = post(small, chat(max_tokens=60))
        assert status == 400 and reply["error"]["param"] == "max_tokens"
        assert "max_tokens asks for 60" in reply["error"]["message"]


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_wrong_methods_get_405_with_allow(server, method):
    status, headers, reply = post(server, chat(), method=method)
    assert status == 405
    assert headers["Allow"] == "POST"
    assert reply["error"]["code"] == "method_not_allowed"


def test_a_tiny_temperature_samples_greedily_beside_others(server):
    kwargs = chat(max_tokens=6)
    greedy = post(server, kwargs | {"temperature": 0})[2]["choices"][0]["message"]["content"]
    with ThreadPoolExecutor(9) as pool:
        replies = list(pool.map(lambda t: post(server, kwargs | {"temperature": t}), [1e-300] + [1.0] * 8))
    assert all(status == 200 for status, _, _ in replies)
    assert replies[0][2]["choices"][0]["message"]["content"] == greedy


def test_one_poisoned_row_among_eight_fails_alone(server, tok):
    """A row whose sampling fails (injected past validation) ends with its own 500; 8 others succeed."""
    poisoned = GenerationRequest([tok.encode("hi")], [SamplingParams(max_new_tokens=20, temperature=1.0,
                                                                     repetition_penalty=1e-300)])  # fmt: skip
    body = chat(max_tokens=12, temperature=1.0, seed=3)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, server, body) for _ in range(8)]
        server.worker.submit(poisoned)
        replies = [f.result() for f in futures]
    choice, kind, error = poisoned.events.get(timeout=30)
    assert kind == "error" and error.status == 500 and "not finite" in error.message
    assert [status for status, _, _ in replies] == [200] * 8
    assert len({r["choices"][0]["message"]["content"] for _, _, r in replies}) == 1  # same seed, same text


def start_long_request(server, stream: bool) -> socket.socket:
    host, port = server.server_address[:2]
    sock = socket.create_connection((host, port), timeout=30)
    body = json.dumps(chat(stream=stream, **LONG)).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
    return sock


@pytest.mark.parametrize("stream", [False, True], ids=["waiting", "streaming"])
def test_a_client_that_disconnects_frees_its_row(server, stream):
    before, steps = server.worker.finished["cancelled"], server.worker.steps
    sock = start_long_request(server, stream)
    if stream:
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
    assert wait_for(lambda: server.worker.steps > steps + 2)  # its row is decoding
    sock.close()
    assert wait_for(lambda: server.worker.finished["cancelled"] == before + 1, timeout=5)
    assert post(server, chat())[0] == 200


def test_rows_that_outlive_the_request_timeout_end_with_504(long_model, tok):
    with serve_in_thread(long_model, tok, request_timeout=0.5) as timed:
        start = time.monotonic()
        status, _, reply = post(timed, chat(**LONG))
        assert status == 504 and reply["error"]["code"] == "request_timeout"
        assert time.monotonic() - start < 5
        assert wait_for(lambda: timed.worker.finished["cancelled"] == 1)


def test_a_short_body_gets_408_within_seconds(server):
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mod")
        start = time.monotonic()
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - start < 3  # read_timeout is 1 s here


def test_a_burst_of_100_connects_is_answered_not_reset(server):
    assert server.request_queue_size >= 128

    def health():
        conn = connect(server)
        conn.request("GET", "/health")
        status = conn.getresponse().status
        conn.close()
        return status

    barrier = threading.Barrier(100)

    def connect_together(_):
        barrier.wait()
        return health()

    with ThreadPoolExecutor(100) as pool:
        statuses = list(pool.map(connect_together, range(100)))
    assert statuses == [200] * 100


def test_a_full_queue_answers_503_with_retry_after(long_model, tok):
    with serve_in_thread(long_model, tok, max_batch_size=1, max_queue=1) as busy:
        socks = [start_long_request(busy, stream=False)]
        assert wait_for(lambda: busy.worker.steps > 0)
        try:
            for _ in range(4):  # one runs, one waits to be admitted, one fills the queue, the next is refused
                socks.append(start_long_request(busy, stream=False))
                socks[-1].settimeout(0.5)
                response = http.client.HTTPResponse(socks[-1])
                try:
                    response.begin()
                    break
                except TimeoutError:  # queued
                    continue
            else:
                raise AssertionError("the queue never filled")
            assert response.status == 503
            assert json.loads(response.read())["error"]["code"] == "overloaded"
            assert response.getheader("Retry-After") == "1"
        finally:
            for sock in socks:
                sock.close()


def test_an_empty_api_key_is_refused_at_start(model, tok, monkeypatch, capsys):
    from minidpo.cli import main

    with pytest.raises(MiniDPOError, match="api_key is empty"):
        make_server(model, tok, port=0, api_key="")
    assert main(["serve", "--model", "unused", "--api-key", ""]) == 2
    assert "--api-key is empty" in capsys.readouterr().err
    monkeypatch.setenv("MINIDPO_API_KEY", "")
    assert main(["serve", "--model", "unused"]) == 2
    assert "--api-key is empty" in capsys.readouterr().err


def test_binding_beyond_loopback_without_a_key_warns():
    from minidpo.commands.serve import exposed_without_key

    assert exposed_without_key("0.0.0.0", None) and exposed_without_key("192.168.1.5", None)
    assert exposed_without_key("example.org", None)
    assert not exposed_without_key("0.0.0.0", "key")
    assert not any(exposed_without_key(h, None) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))


def test_a_step_that_raises_fails_its_requests_and_the_server_goes_on(model, tok, monkeypatch):
    from minidpo.sampler import DecodeBatch

    real_step, calls = DecodeBatch.step, []

    def step_failing_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real_step(self)

    monkeypatch.setattr(DecodeBatch, "step", step_failing_once)
    with serve_in_thread(model, tok) as flaky:
        status, _, reply = post(flaky, chat())
        assert status == 500 and reply["error"]["message"] == "generation failed: RuntimeError"
        assert post(flaky, chat())[0] == 200
