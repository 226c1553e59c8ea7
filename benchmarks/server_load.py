"""`minidpo serve` under load: concurrent clients, early disconnects and a connection burst.

    python -m benchmarks.server_load                  # tiny random model, 32 clients, 60 s
    python -m benchmarks.server_load --model DIR      # any HF-format folder (e.g. SmolLM2)
    python -m benchmarks.server_load --duration 5 --clients 4 --burst 10 --no-write   # smoke

The server runs as its own process (`python -m minidpo serve --port 0`), so clients and
server do not share an interpreter lock. Each of --clients threads sends requests back to
back until --duration ends, each request drawn (seeded) from a mix:

    stream  50 %   chat, stream=True; time to first token = first content chunk
    n = 2   25 %   two choices in one request
    logprobs 25 %  top_logprobs 3
    early   10 %   a stream the client closes after its first chunk (counted apart: the
                   server must free its row; it is not a failure)
    max_tokens     uniform in [--min-tokens, --max-tokens], ignore_eos so lengths are fixed

Half-way through, --burst threads connect at once (a barrier) and each asks GET /health.
Failures are counted by kind: reset (connection reset or refused), timeout, http_<status>,
bad_reply (a 200 whose body does not parse or has the wrong number of choices), other.
Reported: requests, failures by kind, latency p50/p95 (whole request), time to first token
p50/p95 (streams), completion tokens/s over the run, and the burst's answered/failed. The
row goes to benchmarks/results/server-load-<device>-<date>.{json,md} unless --no-write.

--server-pythonpath DIR runs the server from another checkout (e.g. `git archive` of an
older commit) to compare, on the same load, with what that commit served; --label names the
row's server. --mix plain sends only what every version of the server takes (n = 1, no
logprobs; ignore_eos, which older servers ignore, changes nothing with the random tiny
model, whose end-of-text token is one of 49,152), so continuous batching can be compared
with the static batching it replaced (commit 222bab2^):

    git archive 222bab2^ minidpo | tar -x -C /tmp/static
    for i in 1 2; do   # A B A B on a quiet machine
      python -m benchmarks.server_load --mix plain --label continuous --round $i
      python -m benchmarks.server_load --mix plain --label "static (222bab2^)" --server-pythonpath /tmp/static --round $i
    done

That mixes two changes (the batching and everything else since). --server-arg passes a
flag to `minidpo serve`; `--server-arg=--static-batching` runs today's server admitting only
into an empty batch, which isolates the batching:

    python -m benchmarks.server_load --mix plain --label static --server-arg=--static-batching

Rows with the same label, mix and model replace each other in the day's file unless
--round N keeps them apart; requests_per_s is the comparison for the plain mix.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
QUESTION = "Explain briefly why water boils at a lower temperature on a mountain."


def tiny_model_dir(folder: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer (its vocabulary, its chat format)."""
    import torch

    from minidpo.checkpoint import save_model
    from minidpo.config import ModelConfig
    from minidpo.fetch import fetch_default
    from minidpo.model import LlamaForCausalLM

    tokenizer_dir = fetch_default()
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
    torch.manual_seed(0)
    return save_model(LlamaForCausalLM(config), folder / "tiny", tokenizer_from=tokenizer_dir)


def start_server(model_dir: Path, args) -> tuple[subprocess.Popen, str, int]:
    """The serve process and its host, port (read from its start line)."""
    command = [sys.executable, "-m", "minidpo", "serve", "--model", str(model_dir), "--port", "0", "--quiet",
               "--model-name", "bench", "--max-batch-size", str(args.max_batch_size), *args.server_arg]  # fmt: skip
    env, cwd = dict(os.environ), None
    if args.server_pythonpath:  # `python -m` puts its working folder first on sys.path: start it there
        env["PYTHONPATH"] = cwd = str(Path(args.server_pythonpath).resolve())
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if match := re.search(r"at http://([\d.]+):(\d+)/v1", line):
            return proc, match.group(1), int(match.group(2))
    proc.kill()
    raise SystemExit(f"server_load: the server did not start: {''.join(lines.queue)[-2000:]}")


class Client:
    """One client thread's requests; results go to a shared list (append is thread-safe)."""

    def __init__(self, host: str, port: int, args, seed: int, results: list, stop_at: float):
        self.host, self.port, self.args, self.results, self.stop_at = host, port, args, results, stop_at
        self.rng = random.Random(seed)

    def run(self) -> None:
        while time.monotonic() < self.stop_at:
            self.results.append(self.one())

    def one(self) -> dict:
        rng, args = self.rng, self.args
        early = rng.random() < 0.10
        stream = early or rng.random() < 0.5
        plain = args.mix == "plain"
        n = 2 if not plain and rng.random() < 0.25 else 1
        body = {"model": "bench", "messages": [{"role": "user", "content": QUESTION}], "ignore_eos": True,
                "max_tokens": rng.randint(args.min_tokens, args.max_tokens), "temperature": 0.7,
                "seed": rng.randrange(2**31), "n": n, "stream": stream}  # fmt: skip
        if stream:
            body["stream_options"] = {"include_usage": True}
        if not plain and rng.random() < 0.25:
            body |= {"logprobs": True, "top_logprobs": 3}
        kind = "early" if early else "stream" if stream else "plain"
        start = time.monotonic()
        row = {"kind": kind, "n": n, "ok": False, "error": None, "latency_s": None, "ttft_s": None, "tokens": 0}
        conn = http.client.HTTPConnection(self.host, self.port, timeout=args.timeout)
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                response.read()
                row["error"] = f"http_{response.status}"
            elif stream:
                self._read_stream(response, row, start, early, n)
            else:
                reply = json.loads(response.read())
                if len(reply.get("choices", [])) != n:
                    row["error"] = "bad_reply"
                else:
                    row |= {"ok": True, "tokens": reply["usage"]["completion_tokens"]}
        except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError, http.client.RemoteDisconnected):
            row["error"] = "reset"
        except TimeoutError:
            row["error"] = "timeout"
        except (json.JSONDecodeError, KeyError):
            row["error"] = "bad_reply"
        except Exception as e:  # counted, never hidden
            row["error"] = f"other:{type(e).__name__}"
        finally:
            conn.close()
        row["latency_s"] = time.monotonic() - start
        row["finished_at"] = time.monotonic()
        return row

    @staticmethod
    def _read_stream(response, row: dict, start: float, early: bool, n: int) -> None:
        finished = 0
        for line in response:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                row["error"] = "stream_error"
                return
            if chunk.get("usage"):
                row["tokens"] = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content") and row["ttft_s"] is None:
                    row["ttft_s"] = time.monotonic() - start
                    if early:
                        row["ok"] = True
                        return  # the connection closes: the server must free the rows
                finished += choice["finish_reason"] is not None
        row["ok"] = finished == n
        if not row["ok"]:
            row["error"] = "bad_reply"


def burst(host: str, port: int, size: int, timeout: float) -> Counter:
    """`size` threads connect at the same moment and ask GET /health."""
    outcomes: Counter = Counter()
    barrier = threading.Barrier(size)

    def connect() -> None:
        barrier.wait()
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            outcomes["ok" if response.status == 200 else f"http_{response.status}"] += 1
        except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError, http.client.RemoteDisconnected):
            outcomes["reset"] += 1
        except TimeoutError:
            outcomes["timeout"] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=connect) for _ in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1] if len(values) > 1 else values[0]


def summarize(rows: list[dict], burst_outcomes: Counter, duration: float, args, model: str,
              started: float | None = None) -> dict:
    """The row. Rates are over the serving window, from the start to the last answered
    request (not to the end of the run, which a burst's timed-out connects can prolong)."""
    counted = [r for r in rows if r["kind"] != "early"]
    failures = Counter(r["error"] for r in rows if r["error"])
    latencies = [r["latency_s"] for r in counted if r["ok"]]
    ttfts = [r["ttft_s"] for r in rows if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in counted if r["ok"])
    answered = [r["finished_at"] for r in counted if r["ok"] and "finished_at" in r]
    window = max(answered) - started if started is not None and answered else duration
    ms = lambda v: None if v is None else round(1000 * v, 1)  # noqa: E731
    return {
        "server": args.label, "mix": args.mix, "round": args.round, "load_avg_start": args.load_at_start,
        "model": model, "clients": args.clients, "duration_s": round(duration, 1),
        "max_batch_size": args.max_batch_size, "max_tokens": f"{args.min_tokens}-{args.max_tokens}",
        "requests": len(rows), "early_disconnects": sum(r["kind"] == "early" for r in rows),
        "failed": sum(failures.values()), "failures": dict(failures),
        "latency_p50_ms": ms(quantile(latencies, 0.5)), "latency_p95_ms": ms(quantile(latencies, 0.95)),
        "ttft_p50_ms": ms(quantile(ttfts, 0.5)), "ttft_p95_ms": ms(quantile(ttfts, 0.95)),
        "serving_window_s": round(window, 1),
        "completion_tokens_per_s": round(tokens / window, 1),
        "requests_per_s": round(sum(r["ok"] for r in counted) / window, 2),
        "burst": args.burst, "burst_answered": burst_outcomes.get("ok", 0),
        "burst_failures": {k: v for k, v in burst_outcomes.items() if k != "ok"},
    }  # fmt: skip


def server_device(server_args: list[str]) -> str:
    """The device `minidpo serve` runs on: its --device flag, else CUDA when there is one."""
    import torch

    named = [a.split("=", 1)[1] for a in server_args if a.startswith("--device=")]
    return named[-1] if named else "cuda" if torch.cuda.is_available() else "cpu"


def write(result: dict, note: str, results_dir: Path = RESULTS, device: str = "cpu") -> Path:
    """Add the row to the day's file: a row with the same server, mix, round and model is replaced."""
    import torch

    from benchmarks._harness import device_info, today
    from minidpo.io import atomic_write, atomic_write_json

    device = device_info(torch.device(device))
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"server-load-{device['slug']}-{today()}"
    same = ("server", "mix", "round", "model")
    rows, notes = [], []
    if stem.with_suffix(".json").is_file():
        old = json.loads(stem.with_suffix(".json").read_text())
        rows = [r for r in old.get("rows", []) if any(r.get(k) != result.get(k) for k in same)]
        notes = old.get("notes") or ([old["note"]] if old.get("note") else [])
    rows.append(result)
    if note and note not in notes:
        notes.append(note)
    atomic_write_json(stem.with_suffix(".json"), {"device": device, "date": today(), "notes": notes, "rows": rows})
    keys = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], dict))) + ["failures", "burst_failures"]
    table = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    for r in rows:
        table += "| " + " | ".join(json.dumps(r.get(k)) if isinstance(r.get(k), dict) else str(r.get(k, "-")) for k in keys) + " |\n"
    text = f"# minidpo serve under load, {device['name']}, {today()}\n\n" + "".join(f"- {n}\n" for n in notes)
    atomic_write(stem.with_suffix(".md"), f"{text}\n{table}")
    return stem


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server_load", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="HF-format folder (default: a tiny random model with SmolLM2's tokenizer)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--burst", type=int, default=100, help="simultaneous connects half-way through")
    parser.add_argument("--min-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=32, help="the server's --max-batch-size")
    parser.add_argument("--timeout", type=float, default=120.0, help="client socket timeout (s)")
    parser.add_argument("--server-pythonpath", help="run the server from this checkout (PYTHONPATH)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="a flag for `minidpo serve` (repeatable), e.g. --server-arg=--static-batching")  # fmt: skip
    parser.add_argument("--note", default="", help="conditions to record (machine load, ...)")
    parser.add_argument("--mix", choices=("full", "plain"), default="full",
                        help="full: streams, n = 2, logprobs; plain: n = 1, no logprobs (what older servers take)")
    parser.add_argument("--label", default="continuous", help="the row's name for the server under test")
    parser.add_argument("--round", type=int, default=1, help="keeps A B A B rows apart in the results file")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the day's file goes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.load_at_start = round(os.getloadavg()[0], 2)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else tiny_model_dir(Path(tmp))
        proc, host, port = start_server(model_dir, args)
        try:
            rows: list[dict] = []
            start = time.monotonic()
            stop_at = start + args.duration
            clients = [Client(host, port, args, seed, rows, stop_at) for seed in range(args.clients)]
            threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
            for t in threads:
                t.start()
            time.sleep(args.duration / 2)
            burst_outcomes = burst(host, port, args.burst, args.timeout)
            for t in threads:
                t.join(args.duration + args.timeout)
            duration = time.monotonic() - start
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    model = args.model or "tiny random (2 layers, d 64, SmolLM2 tokenizer)"
    result = summarize(rows, burst_outcomes, duration, args, model, started=start)
    print(json.dumps(result, indent=1))
    if not args.no_write:
        stem = write(result, args.note, args.results_dir, server_device(args.server_arg))
        print(f"wrote {stem}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
