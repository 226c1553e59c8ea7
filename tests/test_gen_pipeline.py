"""`minidpo gen` end to end: offline, against the fault-injecting server, killed and resumed,
and against `minidpo serve`."""

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fake_openai import BadEnvelope, FakeOpenAI, Hang, InvalidJSON, Reply, Status, Truncated
from minidpo.gen.client import ChatClient
from minidpo.gen.combine import combine
from minidpo.gen.rephrase import LLMRephraser, read_rephrased, run_rephrase
from minidpo.gen.seed import build_seed, load_compounds
from tiny_librachem import fake_llm, write_tiny_library

from minidpo.cli import main
from minidpo.io import load_jsonl_tolerant, read_jsonl_records

OUTPUTS = ("train.jsonl", "test_triplets.jsonl", "val_seen.jsonl", "val_unseen.jsonl", "eval_seen.jsonl",
           "eval_unseen.jsonl", "manifest.json")


@pytest.fixture
def library(tmp_path):
    return write_tiny_library(tmp_path / "lib")


def gen(*args) -> int:
    return main(["gen", *[str(a) for a in args], "--no-progress"])


def llm_args(server, *extra):
    return ["--endpoint", server.url, "--model", "fake", "-k", 3, *extra]


def records_by_id(path: Path) -> dict[str, dict]:
    records = load_jsonl_tolerant(path)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {r["id"]: r for r in records}


def test_offline_all_on_the_shipped_data_makes_a_valid_set(tmp_path, capsys):
    out = tmp_path / "out"
    assert gen("all", "--offline", "--out", out, "--modes", "text,smiles") == 0
    train = read_jsonl_records(out / "train.jsonl", {"prompt": str, "chosen": str, "rejected": str}, strict=True)
    assert len(train) > 1000
    for name in ("val_seen.jsonl", "val_unseen.jsonl", "eval_seen.jsonl", "eval_unseen.jsonl"):
        rows = read_jsonl_records(out / name, {"prompt": str, "true_label": int}, strict=True)
        assert rows and {r["true_label"] for _, r in rows} == {0, 1}
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["train"]["total"] == len(train)
    assert set(counts["families"]) == {"contrast", "general", "everyday"} & {r["family"] for _, r in train}
    for side in ("train", "val", "test"):
        assert counts["compounds"][side]["legitimate"] * 2 == counts["compounds"][side]["illegitimate"] > 0
    assert "combine:" in capsys.readouterr().out


def test_offline_rerun_skips_done_rows_and_rewrites_identical_files(tmp_path, library, capsys):
    out = tmp_path / "out"
    assert gen("all", "--offline", "--out", out, "--data-dir", library) == 0
    first = {name: (out / name).read_bytes() for name in OUTPUTS}
    capsys.readouterr()
    assert gen("all", "--offline", "--out", out, "--data-dir", library) == 0
    assert "0 new, 18 already done" in capsys.readouterr().out
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == first
    assert len(records_by_id(out / "rephrase.jsonl")) == 18


def test_torn_last_line_is_cut_and_its_row_redone(tmp_path, library):
    out = tmp_path / "out"
    assert gen("all", "--offline", "--out", out, "--data-dir", library) == 0
    path = out / "rephrase.jsonl"
    complete = records_by_id(path)
    data = path.read_bytes()
    path.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 40])  # a kill in the middle of the last write
    assert gen("rephrase", "--offline", "--out", out, "--data-dir", library) == 0
    assert records_by_id(path) == complete


def test_pipeline_completes_under_every_fault_with_each_record_once(tmp_path, library):
    rows = build_seed(load_compounds(library / "compounds.jsonl"))
    with FakeOpenAI(fake_llm) as server:
        clean_client = ChatClient(server.url, "fake")
        run_rephrase(rows, tmp_path / "clean.jsonl", LLMRephraser(clean_client, 3), progress=False)
        server.script(Status(429, retry_after="1"), Status(500), Hang(2.0), InvalidJSON(), Truncated(), BadEnvelope(),
                      Reply('{"items": "not a list"}'), Reply("Sure, happy to help!"))
        client = ChatClient(server.url, "fake", read_timeout=0.5, max_retries=8, sleep=lambda s: None)
        summary = run_rephrase(rows, tmp_path / "faulty.jsonl", LLMRephraser(client, 3), workers=3, progress=False)
    assert (summary.done, summary.failed) == (18, 0)
    assert (client.stats.retries, client.stats.reasks) == (6, 2)
    assert records_by_id(tmp_path / "faulty.jsonl") == records_by_id(tmp_path / "clean.jsonl")
    assert combine(rows, read_rephrased(tmp_path / "faulty.jsonl")).train


def test_illegitimate_answer_with_steps_is_never_stored(tmp_path, library):
    rows = [r for r in build_seed(load_compounds(library / "compounds.jsonl")) if r["compound"] == "sarin"]
    leaky = json.dumps({"items": ["Sure: [procedure withheld]\n1. Take the precursor.\n2. Add 5 mL."] * 3})

    def responder(body):
        asked_before = any(m["role"] == "assistant" for m in body["messages"])
        if "[procedure withheld]" in body["messages"][1]["content"] and not asked_before:
            return leaky
        return fake_llm(body)

    with FakeOpenAI(responder) as server:
        client = ChatClient(server.url, "fake")
        run_rephrase(rows, tmp_path / "r.jsonl", LLMRephraser(client, 3), progress=False)
        reask = server.requests[-1]["messages"][-1]["content"]
    (record,) = load_jsonl_tolerant(tmp_path / "r.jsonl")
    assert client.stats.reasks == 1 and "steps" in reask
    assert all("[procedure withheld]" in a and "1." not in a for a in record["rejected"])


def test_failed_rows_are_reported_and_done_by_the_next_run(tmp_path, library, capsys):
    out = tmp_path / "out"
    with FakeOpenAI(fake_llm) as server:
        server.script(*[Status(503)] * 5)
        args = ["all", "--out", out, "--data-dir", library, *llm_args(server, "--max-retries", 0, "--concurrency", 1)]
        assert gen(*args) == 1
        assert "5 failed of 18" in capsys.readouterr().out
        assert not (out / "train.jsonl").exists()
        assert gen(*args) == 0
    assert len(records_by_id(out / "rephrase.jsonl")) == 18
    assert "13 already done" in capsys.readouterr().out


def test_a_refused_request_stops_the_run_with_one_line(tmp_path, library, capsys):
    with FakeOpenAI(fake_llm) as server:
        server.script(Status(401, body='{"error": {"message": "invalid api key"}}'))
        args = ["all", "--out", tmp_path / "out", "--data-dir", library, *llm_args(server, "--concurrency", 1)]
        assert gen(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minidpo: error:") and "HTTP 401" in err and "OPENAI_API_KEY" in err and "\n" not in err


def test_kill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path, library):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    with FakeOpenAI(fake_llm, delay=0.03) as server:
        def args(out):
            return ["rephrase", "--out", str(out), "--data-dir", str(library), *map(str, llm_args(server, "--concurrency", 2))]

        for out in (killed, clean):
            assert gen("seed", "--out", out, "--data-dir", library) == 0
        proc = subprocess.Popen([sys.executable, "-m", "minidpo", "gen", *args(killed), "--no-progress"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        path = killed / "rephrase.jsonl"
        deadline = time.monotonic() + 60
        while len(load_jsonl_tolerant(path)) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        written = len(load_jsonl_tolerant(path))
        assert 3 <= written < 18
        with open(path, "a") as f:
            f.write('{"id": "aspirin')  # as if the kill had landed mid-write
        assert gen(*args(killed)) == 0
        assert gen(*args(clean)) == 0
    assert records_by_id(path) == records_by_id(clean / "rephrase.jsonl")
    for out in (killed, clean):
        assert gen("combine", "--out", out, "--data-dir", library) == 0
    assert (killed / "train.jsonl").read_bytes() == (clean / "train.jsonl").read_bytes()


def test_dry_run_counts_requests_and_writes_nothing(tmp_path, library, capsys):
    with FakeOpenAI(fake_llm) as server:
        assert gen("all", "--out", tmp_path / "out", "--data-dir", library, *llm_args(server), "--dry-run") == 0
        assert server.requests == []
    out = capsys.readouterr().out
    assert "18 rows, 54 requests" in out and "completion tokens" in out
    assert not (tmp_path / "out").exists()


def test_without_endpoint_or_offline_the_error_says_what_to_give(tmp_path, library, capsys):
    assert gen("all", "--out", tmp_path / "out", "--data-dir", library) == 2
    assert "give --endpoint URL and --model NAME, or --offline" in capsys.readouterr().err


def test_api_key_is_sent_but_never_printed_or_written(tmp_path, library, capsys, monkeypatch):
    monkeypatch.setenv("GEN_TEST_KEY", "sk-do-not-leak")
    out = tmp_path / "out"
    with FakeOpenAI(fake_llm) as server:
        assert gen("all", "--out", out, "--data-dir", library, *llm_args(server, "--api-key-env", "GEN_TEST_KEY")) == 0
        assert {h["Authorization"] for h in server.headers} == {"Bearer sk-do-not-leak"}
    captured = capsys.readouterr()
    assert "sk-do-not-leak" not in captured.out + captured.err
    assert not [p for p in out.iterdir() if b"sk-do-not-leak" in p.read_bytes()]


def test_llm_proposed_compounds_make_an_exactly_balanced_seed(tmp_path, library):
    out = tmp_path / "out"
    with FakeOpenAI(fake_llm) as server:
        assert gen("all", "--propose", "--num-compounds", 9, "--out", out, "--data-dir", library, *llm_args(server)) == 0
    proposed = Counter(c["label"] for _, c in read_jsonl_records(out / "compounds.jsonl", {"label": str}))
    assert proposed == {"legitimate": 3, "illegitimate": 6}
    assert Counter(r["label"] for r in load_jsonl_tolerant(out / "seed.jsonl")) == proposed


def test_fallback_fills_from_the_banks_when_the_model_cannot_follow(tmp_path, library):
    out = tmp_path / "out"
    with FakeOpenAI(lambda body: "I like turtles.") as server:
        args = llm_args(server, "--fallback-offline", "--max-reasks", 0)
        assert gen("all", "--out", out, "--data-dir", library, *args) == 0
    records = records_by_id(out / "rephrase.jsonl")
    assert len(records) == 18 and {r["source"] for r in records.values()} == {"llm:fake+offline"}


def test_rerun_with_other_settings_refuses_to_mix_records(tmp_path, library, capsys):
    out = tmp_path / "out"
    assert gen("all", "--offline", "--out", out, "--data-dir", library, "-k", 3) == 0
    assert gen("all", "--offline", "--out", out, "--data-dir", library, "-k", 4) == 2
    assert "k 3 -> 4" in capsys.readouterr().err


def test_one_small_run_against_minidpo_serve(tmp_path, library, capsys):
    from tiny_lm import tiny_model, tiny_tokenizer

    from minidpo.server import serve_in_thread

    tokenizer = tiny_tokenizer(tmp_path / "tok")
    with serve_in_thread(tiny_model(tokenizer.vocab_size, max_position_embeddings=2048), tokenizer,
                         model_name="tiny") as server:
        # A random tiny model cannot write the JSON asked for: every request still goes over
        # HTTP to the real server, and the banks fill what its replies cannot.
        args = ["--endpoint", server.url, "--model", "tiny", "-k", 1, "--num-compounds", 3, "--max-tokens", 8,
                "--max-reasks", 0, "--fallback-offline", "--concurrency", 2, "--val-holdout-fraction", 0]
        assert gen("all", "--out", tmp_path / "out", "--data-dir", library, *args) == 0
    assert "usage: 9 requests, 0 retries, 0 re-asks" in capsys.readouterr().out
    records = records_by_id(tmp_path / "out" / "rephrase.jsonl")
    assert len(records) == 3 and {r["source"] for r in records.values()} <= {"llm:tiny", "llm:tiny+offline"}
    assert (tmp_path / "out" / "train.jsonl").stat().st_size > 0
