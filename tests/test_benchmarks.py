"""The benchmark harness runs end to end on the CPU at tiny sizes, so it cannot rot."""

import argparse
import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ is a folder beside the package, not installed

from benchmarks import _harness, report  # noqa: E402
from benchmarks._harness import Context, forward_flops, fresh_process, interleaved, model_config  # noqa: E402
from benchmarks.train_step import BUILDERS, longest_fitting, random_batch  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One `python -m benchmarks --tiny --device cpu` into a temporary results folder."""
    out = tmp_path_factory.mktemp("results")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--device", "cpu", "--results-dir", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    files = sorted(out.glob("*.json"))
    result = json.loads(files[0].read_text()) if files else None
    return proc, out, files, result


def test_tiny_run_exits_zero_and_writes_one_tiny_result_file(tiny_run):
    proc, _, files, _ = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(files) == 1 and files[0].name.endswith("-tiny.json")


def test_result_file_has_device_ceilings_peers_and_rows(tiny_run):
    _, _, _, result = tiny_run
    assert result["schema"] == report.SCHEMA and result["tiny"] is True
    assert result["device"]["type"] == "cpu" and result["device"]["slug"].startswith("cpu-")
    assert result["ceilings"]["copy_gbps"] > 0 and result["ceilings"]["matmul_tflops"] > 0
    assert result["peers"]["torch"] == importlib.metadata.version("torch")
    assert "train_step" in result["benchmarks"]
    for name, entry in result["benchmarks"].items():
        assert entry["error"] is None, name
        assert entry["rows"], name
        for row in entry["rows"]:
            assert all(isinstance(v, (str, int, float, bool, type(None))) for v in row.values())


def test_tiny_run_prints_a_table_per_benchmark(tiny_run):
    proc, _, _, result = tiny_run
    for name, entry in result["benchmarks"].items():
        assert f"== {name}" in proc.stdout
        header = "  ".join(report.columns(entry["rows"]))
        assert any(line.split() == header.split() for line in proc.stdout.splitlines()), name


def test_markdown_report_is_written_beside_the_json(tiny_run):
    _, _, files, result = tiny_run
    md = files[0].with_suffix(".md").read_text()
    assert result["device"]["name"] in md and result["date"] in md
    for name in result["benchmarks"]:
        assert f"## {name}" in md


def test_train_step_reports_throughput_mfu_and_memory_for_minidpo(tiny_run):
    _, _, _, result = tiny_run
    rows = [r for r in result["benchmarks"]["train_step"]["rows"] if r["impl"] == "minidpo"]
    assert {(r["ckpt"], r["seq"]) for r in rows} == {(False, 32), (False, 64), (True, 32), (True, 64)}
    for row in rows:
        assert row["status"] == "ok"
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"]
        assert row["peak_mem_gib"] is None or row["peak_mem_gib"] > 0


def test_peer_rows_carry_pair_ratios_threads_load_and_busy_mark(tiny_run):
    _, _, _, result = tiny_run
    ratios = {"sampler": ("transformers", "decode_vs_transformers"), "train_step": ("peft", "time_vs_hf_peft"),
              "dpo_step": ("trl", "time_vs_trl")}  # fmt: skip
    for name, (peer, ratio) in ratios.items():
        rows = [r for r in result["benchmarks"][name]["rows"] if r["impl"] == "minidpo"]
        assert rows, name
        for row in rows:
            assert row["rounds"] >= 1 and row["threads"] >= 1 and row["load_avg"] >= 0, name
            assert row["busy"] == (row["load_avg"] > os.cpu_count()), name
        if result["peers"][peer]:
            measured = [r for r in rows if r.get(ratio) is not None]  # a tiny decode can vanish in timer noise
            assert measured, name
            assert all(0 < r[f"{ratio}_min"] <= r[ratio] <= r[f"{ratio}_max"] for r in measured), name


def counting_runners(order, values):
    """Runners that record their calls and return the next of `values[impl]`."""
    def runner(impl):
        def run():
            order.append(impl)
            value = values[impl][sum(1 for i in order if i == impl) - 1]
            return {"status": "ok", "s": value} if value is not None else {"status": "error: boom"}
        return run
    return {impl: runner(impl) for impl in values}


def test_interleaved_alternates_and_takes_ratios_pair_by_pair(monkeypatch):
    monkeypatch.setattr(_harness, "machine_load", lambda: 0.5)
    order = []
    run = interleaved(counting_runners(order, {"a": [1.0, 2.0, 9.0], "b": [2.0, 2.0, 3.0]}), 3, log=lambda m: None)
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert run.ratios("a", "b", "s") == [0.5, 1.0, 3.0]
    columns = run.ratio_columns("a", "b", "s", "a_vs_b")
    assert (columns["a_vs_b"], columns["a_vs_b_min"], columns["a_vs_b_max"]) == (1.0, 0.5, 3.0)
    assert run.median("a", "s") == 2.0 and not run.busy


def test_interleaved_warns_and_marks_busy_when_the_load_exceeds_the_cores(monkeypatch):
    monkeypatch.setattr(_harness, "machine_load", lambda: os.cpu_count() + 0.5)
    messages = []
    run = interleaved(counting_runners([], {"a": [1.0], "b": [1.0]}), 1, log=messages.append)
    assert run.busy and run.machine_columns("a")["busy"] is True
    assert any("warning" in m and "quiet machine" in m for m in messages)


def test_interleaved_does_not_rerun_a_failed_implementation(monkeypatch):
    monkeypatch.setattr(_harness, "machine_load", lambda: 0.0)
    order = []
    run = interleaved(counting_runners(order, {"a": [1.0, 1.0], "b": [None, 1.0]}), 2, log=lambda m: None)
    assert order == ["a", "b", "a"]
    assert run.ok("b") == [] and run.ratios("a", "b", "s") == []


def test_fresh_process_reports_a_worker_that_fails_in_one_status_line():
    result = fresh_process("benchmarks.no_such_worker")()
    assert result["status"].startswith("error") and "no_such_worker" in result["status"]


@pytest.mark.parametrize("impl", ["minidpo", "hf-peft"])
def test_each_train_step_starts_at_the_dpo_loss_of_equal_policy_and_reference(impl):
    if impl != "minidpo":
        pytest.importorskip("transformers")
        pytest.importorskip("peft")
    ctx = Context(torch.device("cpu"), torch.float32, tiny=True, args=argparse.Namespace())
    config = model_config("tiny")
    torch.manual_seed(0)
    trainer = BUILDERS[impl](ctx, config)
    loss = trainer.step(*random_batch(ctx, config, 2, 16))
    assert float(loss) == pytest.approx(math.log(2), abs=1e-4)  # LoRA's B starts at zero: -log sigmoid(0)


def test_longest_fitting_finds_the_out_of_memory_boundary():
    ctx = Context(torch.device("cpu"), torch.float32, tiny=True, args=argparse.Namespace())
    config = model_config("tiny")

    def step(input_ids, prompt_len):
        if input_ids.shape[1] > 5000:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    assert longest_fitting(ctx, step, config, upper=16384) == 4096
    assert longest_fitting(ctx, step, config, upper=16384, quantum=1000) == 5000


def test_longest_fitting_reraises_errors_that_are_not_out_of_memory():
    ctx = Context(torch.device("cpu"), torch.float32, tiny=True, args=argparse.Namespace())

    def step(input_ids, prompt_len):
        raise ValueError("a bug, not a memory limit")

    with pytest.raises(ValueError):
        longest_fitting(ctx, step, model_config("tiny"), upper=4096)


@pytest.mark.parametrize(
    "name, billions", [("Llama-3-8B", 8.03), ("Llama-2-7B", 6.74), ("Qwen2-7B", 7.62), ("SmolLM2-135M", 0.1345)]
)
def test_model_shapes_have_their_published_parameter_counts(name, billions):
    assert model_config(name).num_parameters / 1e9 == pytest.approx(billions, rel=2e-3)


def test_forward_flops_is_two_per_weight_per_token_plus_attention():
    config = model_config("Llama-3-8B")
    one_token = forward_flops(config, 1)
    assert one_token == pytest.approx(2 * (config.num_parameters - config.vocab_size * config.hidden_size), rel=1e-3)
    assert forward_flops(config, 1024) > 1024 * one_token  # attention grows with T^2


def _fake_result(slug, date, tiny):
    return {
        "schema": report.SCHEMA, "date": date, "tiny": tiny, "dtype": "bfloat16", "command": "python -m benchmarks",
        "device": {"type": "cuda", "name": f"GPU {slug}", "slug": slug},
        "ceilings": {"copy_gbps": 3000.0, "matmul_tflops": 700.0, "matmul_shape": [8192] * 3, "matmul_dtype": "bfloat16"},
        "peers": {"torch": "2.11.0", "liger_kernel": None},
        "benchmarks": {"train_step": {"description": "d", "rows": [{"impl": "minidpo", "ms": 1.5}], "error": None}},
    }


def test_readme_section_shows_the_newest_full_size_result_of_each_device(tmp_path):
    for slug, date, tiny in [("nvidia-h100", "2026-11-01", False), ("nvidia-h100", "2026-11-20", False),
                             ("nvidia-h100", "2026-11-25", True), ("nvidia-h200", "2026-11-02", False)]:
        name = f"{slug}-{date}{'-tiny' if tiny else ''}.json"
        (tmp_path / name).write_text(json.dumps(_fake_result(slug, date, tiny)))
    text = report.readme_section(tmp_path)
    assert "GPU nvidia-h100, 2026-11-20" in text and "GPU nvidia-h200, 2026-11-02" in text
    assert "2026-11-01" not in text and "2026-11-25" not in text
    assert "| minidpo | 1.5 |" in text


def test_readme_section_without_results_says_how_to_make_them(tmp_path):
    assert "python -m benchmarks" in report.readme_section(tmp_path)


def test_readme_section_warns_about_rows_measured_on_a_busy_machine(tmp_path):
    result = _fake_result("cpu-amd-epyc", "2026-12-01", False)
    result["benchmarks"]["train_step"]["rows"] = [{"impl": "minidpo", "ms": 1.5, "load_avg": 7.5, "busy": True},
                                                  {"impl": "hf-peft", "ms": 2.5, "load_avg": 1.0, "busy": False}]
    (tmp_path / "cpu-amd-epyc-2026-12-01.json").write_text(json.dumps(result))
    assert "**busy:** 1 of 2 rows" in report.readme_section(tmp_path) and "up to 7.5" in report.readme_section(tmp_path)
    result["benchmarks"]["train_step"] |= {"rows": [{"impl": "minidpo", "ms": 1.5}], "load_avg": 9.0, "cores": 2}
    (tmp_path / "cpu-amd-epyc-2026-12-01.json").write_text(json.dumps(result))
    assert "**busy:** this benchmark ran with the load average at 9 on 2 cores" in report.readme_section(tmp_path)
