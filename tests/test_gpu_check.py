"""benchmarks/gpu_check.sh: the one-call GPU script is wired, robust, and writes its results.

The real run needs an H100/H200; here `--dry-run` parses every command line with the real
parsers and writes the results files, and the step runner is checked on steps that fail,
hang and crash: each is recorded, the next one still runs, and the table comes last.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ is a folder beside the package, not installed

from benchmarks import gpu_check  # noqa: E402


def test_dry_run_wires_every_step_and_prints_the_table_last(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [summary] = tmp_path.glob("*-gpu-check.json")
    steps = json.loads(summary.read_text())["steps"]
    assert [s["step"] for s in steps] == [name for name, _, _ in gpu_check.STEPS]
    assert all(s["status"] in ("wired", "skipped") for s in steps), steps
    assert summary.with_suffix(".md").exists() and summary.with_suffix(".png").exists()
    table = proc.stdout.strip().splitlines()[-len(steps) - 1 :]
    assert table[0].split()[:3] == ["step", "status", "seconds"]
    assert [line.split()[0] for line in table[1:]] == [s["step"] for s in steps]


def run_main(tmp_path, *args):
    code = gpu_check.main(["--results-dir", str(tmp_path / "results"), "--work", str(tmp_path / "work"), *args])
    [summary] = (tmp_path / "results").glob("*-gpu-check.json")
    return code, {s["step"]: s for s in json.loads(summary.read_text())["steps"]}


def test_dry_run_rejects_a_flag_the_command_does_not_have(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.BENCH_ARGS, "sampler", ["--sampler-no-such-flag"])
    code, steps = run_main(tmp_path, "--dry-run", "--only", "sft,bench-sampler,bench-logprob")
    assert code == 1
    assert steps["bench-sampler"]["status"] == "FAIL" and "--sampler-no-such-flag" in steps["bench-sampler"]["detail"]
    assert steps["sft"]["status"] == steps["bench-logprob"]["status"] == "wired"


def test_dry_run_rejects_a_missing_input_file(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "DATA", REPO / "no-such-folder")
    code, steps = run_main(tmp_path, "--dry-run", "--only", "eval")
    assert code == 1 and "does not exist" in steps["eval"]["detail"]


def fake_commands(monkeypatch, scripts: dict[str, str]):
    """Run a tiny Python script instead of each named command."""

    def argv(ctx, kind, args):
        return [sys.executable, "-c", scripts.get(str(args[0]), "print('ok')")]

    monkeypatch.setattr(gpu_check.Context, "argv", argv)


def test_a_failing_a_hanging_and_a_crashing_step_are_recorded_and_the_rest_run(tmp_path, monkeypatch, capsys):
    fake_commands(monkeypatch, {
        "env": "import json; print(json.dumps({'device': {'type': 'cuda', 'name': 'GPU', 'slug': 'gpu'}, "
               "'versions': {'torch': '2'}}))",
        "sft": "import sys; print('boom', file=sys.stderr); sys.exit(3)",
        "train": "import time; time.sleep(60)",
    })  # fmt: skip

    def crash(ctx):
        raise KeyError("a bug in a step")

    monkeypatch.setattr(gpu_check, "STEPS", [("env", 20, gpu_check.step_env), ("sft", 20, gpu_check.step_sft),
                                             ("train-lora", 2, gpu_check.step_train_lora), ("crash", 5, crash),
                                             ("last", 5, lambda ctx: ctx.sh("check", "last") or "ran")])  # fmt: skip
    code, steps = run_main(tmp_path, "--budget", "100")
    assert code == 1
    assert steps["env"]["status"] == "ok"
    assert steps["sft"]["status"] == "FAIL" and "exited 3: boom" in steps["sft"]["detail"]
    assert steps["train-lora"]["status"] == "timeout" and steps["train-lora"]["seconds"] < 10
    assert steps["crash"]["status"] == "FAIL" and "KeyError" in steps["crash"]["detail"]
    assert steps["last"]["status"] == "ok"
    assert capsys.readouterr().out.strip().splitlines()[-1].split()[:2] == ["last", "ok"]
    assert list((tmp_path / "results").glob("gpu-*-gpu-check.md"))  # named after the device env found


def test_steps_that_no_longer_fit_the_budget_are_skipped(tmp_path, monkeypatch):
    fake_commands(monkeypatch, {})
    monkeypatch.setattr(gpu_check, "REPORT_RESERVE_S", 0)
    monkeypatch.setattr(gpu_check, "STEPS", [("env", 20, lambda ctx: "fine"), ("late", 30, lambda ctx: "ran")])
    code, steps = run_main(tmp_path, "--budget", "5")
    assert steps["late"]["status"] == "skipped" and "no time left" in steps["late"]["detail"]
