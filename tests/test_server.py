"""The OpenAI-compatible server, on a free port, driven by the official `openai` client."""

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from minidpo.sampler import generate, render_chat
from minidpo.server import serve_in_thread

openai = pytest.importorskip("openai")

KEY = "test-key"
MESSAGES = [{"role": "user", "content": "What is the boiling point of water?"}]


@pytest.fixture(scope="module")
def server(model, tok):
    with serve_in_thread(model, tok, model_name="tiny", api_key=KEY, max_batch_size=8, max_total_tokens=256,
                         max_body_bytes=4096) as server:  # fmt: skip
        yield server


def client(server, key=KEY):
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=60)


def post(server, body: bytes, headers=None):
    """A raw POST to /v1/chat/completions: (status, parsed JSON)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}", **(headers or {})})
    response = conn.getresponse()
    out = response.status, json.loads(response.read())
    conn.close()
    return out


def test_openai_client_gets_a_completion_equal_to_the_sampler(server, model, tok):
    reply = client(server).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    expected = generate(model, tok, [render_chat(tok, MESSAGES)], max_new_tokens=8, stop=tok.chat_format.stop_strings)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected[0].text
    assert reply.choices[0].finish_reason == expected[0].finish_reason
    assert reply.usage.prompt_tokens == expected[0].prompt_tokens
    assert reply.usage.completion_tokens == expected[0].completion_tokens
    assert reply.model == "tiny"


def test_openai_client_streams_the_same_text(server):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    whole = client(server).chat.completions.create(**kwargs)
    chunks = list(client(server).chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_same_seed_same_sampled_reply(server):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=10, temperature=1.0, top_p=0.9, seed=42)
    first, second = (client(server).chat.completions.create(**kwargs) for _ in range(2))
    assert first.choices[0].message.content == second.choices[0].message.content


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (json.dumps({"model": "tiny", "messages": "hello"}).encode(), "messages"),
        (json.dumps({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}).encode(), "messages[0].role"),
        (json.dumps({"model": "tiny", "messages": MESSAGES, "temperature": "hot"}).encode(), "temperature"),
        (json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 1.5}).encode(), "max_tokens"),
        (json.dumps({"model": "tiny", "messages": MESSAGES, "n": 99}).encode(), "n"),
    ],
    ids=["invalid-json", "not-an-object", "messages-type", "unknown-role", "temperature-type", "max-tokens-type", "n"],
)
def test_bad_request_gets_400_with_an_error_object_and_the_next_succeeds(server, body, param):
    status, reply = post(server, body)
    assert status == 400
    assert reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["param"] == param
    assert reply["error"]["message"]
    ok = client(server).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_too_many_tokens_gets_400_context_length_exceeded(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=100_000)
    assert e.value.code == "context_length_exceeded"


def test_oversize_body_gets_413(server):
    long = [{"role": "user", "content": "x" * 5000}]
    status, reply = post(server, json.dumps({"model": "tiny", "messages": long}).encode())
    assert status == 413
    assert reply["error"]["code"] == "body_too_large"


def test_wrong_or_missing_key_gets_401(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    status, reply = post(server, json.dumps({"messages": MESSAGES}).encode(), {"Authorization": ""})
    assert status == 401
    assert reply["error"]["code"] == "invalid_api_key"


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list()] == ["tiny"]
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read()) == {"status": "ok"}
    conn.close()


def test_unknown_route_gets_404(server):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 404
    assert "error" in json.loads(response.read())
    conn.close()


def test_16_concurrent_clients_all_succeed_and_match_one_alone(server):
    kwargs = dict(model="tiny", max_tokens=6, temperature=0)
    questions = [[{"role": "user", "content": f"Question {i % 4}?"}] for i in range(16)]
    alone = {i: client(server).chat.completions.create(messages=questions[i], **kwargs) for i in range(4)}

    def ask(i):
        return client(server).chat.completions.create(messages=questions[i], **kwargs)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, range(16)))
    for i, reply in enumerate(replies):
        assert reply.choices[0].message.content == alone[i % 4].choices[0].message.content


def test_serve_command_answers_then_stops_cleanly_on_sigterm(tmp_path):
    import os
    import queue
    import re
    import signal
    import subprocess
    import sys
    import threading

    from tiny_lm import tiny_model_folder

    model_dir = tiny_model_folder(tmp_path)
    env = {**os.environ, "MINIDPO_API_KEY": KEY}
    command = [sys.executable, "-m", "minidpo", "serve", "--model", str(model_dir), "--chat-format", "chatml",
               "--port", "0", "--model-name", "tiny", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()  # the server's stderr, read all along so that it never blocks
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    log = []
    try:
        while (match := re.search(r"at (http://\S+)", log[-1] if log else "")) is None:
            log.append(lines.get(timeout=60))
        api = openai.OpenAI(base_url=match.group(1), api_key=KEY, max_retries=0, timeout=60)
        reply = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
        assert reply.choices[0].message.content is not None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    except Exception as e:
        proc.kill()
        proc.wait()
        raise AssertionError(f"serve exited {proc.returncode}; its stderr: {''.join(log) + ''.join(lines.queue)}") from e
