"""torchrun on the CPU (gloo, 2 processes, float64): DDP and FSDP2 compute one process's steps.

Each 2-rank run (per-rank batch 1 x accumulation 2) is compared with one process running
the same global batch (batch 2 x accumulation 2) on ten pairs of unequal lengths, so the
last step is partial and one rank's share of it is empty.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import tiny_model, tiny_tokenizer

from minidpo.checkpoint import save_model
from minidpo.cli import main
from minidpo.io import load_jsonl_tolerant

WORKER = Path(__file__).with_name("distributed_worker.py")
SETTINGS = ["--max-length", "64", "--max-prompt-length", "32", "--device", "cpu", "--dtype", "float64",
            "--lora-dropout", "0", "--warmup-steps", "0", "--lr", "2e-2", "--max-steps", "4",
            "--no-progress", "--no-plot"]  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tokenizer_dir = tmp_path_factory.mktemp("tok")
    tok = tiny_tokenizer(tokenizer_dir)
    model_dir = save_model(tiny_model(tok.vocab_size), tmp_path_factory.mktemp("tiny"), tokenizer_from=tokenizer_dir)
    rows = [{"prompt": f"How do I make compound {i}?", "chosen": "I cannot help with that. " * (1 + i % 3),
             "rejected": f"Mix reagent {i} with water, then heat. " * (1 + i % 2)} for i in range(10)]
    data = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, wait: bool = True, timeout: float = 300):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def one_rank(command: str, out: Path, options: list[str]) -> None:
    torch.set_num_threads(1)
    assert main([command, *options, "--out", str(out), "--batch-size", "2", "--grad-accum", "2"]) == 0


def two_ranks(command: str, out: Path, options: list[str], *prefix: str) -> subprocess.CompletedProcess:
    result = torchrun(*prefix or ("-m", "minidpo"), command, *options, "--out", str(out), "--batch-size", "1",
                      "--grad-accum", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def weights(out: Path) -> dict[str, torch.Tensor]:
    folder = out / "adapter" if (out / "adapter").is_dir() else out / "model"
    return load_file(str(next(folder.glob("*.safetensors"))))


def train_records(out: Path) -> list[dict]:
    return [r for r in load_jsonl_tolerant(out / "metrics.jsonl") if r["split"] == "train"]


CASES = {
    "ddp-lora-dpo-rpo": ("train", ["--parallel", "ddp", "--lora-targets", "q_proj,v_proj,lm_head", "--rpo-alpha", "0.5"]),
    "fsdp-lora-sft": ("sft", ["--parallel", "fsdp", "--lora-targets", "all-linear"]),
    "fsdp-full-dpo": ("train", ["--parallel", "fsdp", "--full-finetune", "--lr", "1e-3"]),
}


def case_options(case: str, inputs, folder: Path) -> list[str]:
    model_dir, data = inputs
    options = ["--model", str(model_dir), "--data", str(data), *SETTINGS, *CASES[case][1]]
    if CASES[case][0] == "train":  # full fine-tuning precomputes the reference: sharded over the ranks, gathered
        options += ["--ref-cache-dir", str(folder / "cache")]
    return options


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    """Each case run by one process and by two ranks, once: {case: (options, one-process OUT, 2-rank OUT, output)}."""
    done = {}

    def run(case: str):
        if case not in done:
            folder = tmp_path_factory.mktemp(case)
            options = case_options(case, inputs, folder)
            one_rank(CASES[case][0], folder / "one", options)
            result = two_ranks(CASES[case][0], folder / "two", options)
            done[case] = options, folder / "one", folder / "two", result.stdout.strip().splitlines()[-1]
        return done[case]

    return run


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_compute_the_steps_of_one_process(runs, case):
    options, one_dir, two_dir, printed = runs(case)
    assert printed == str(two_dir / ("model" if "full" in case else "adapter"))  # rank 0 alone prints

    one, two = train_records(one_dir), train_records(two_dir)
    assert [r["count"] for r in one] == [r["count"] for r in two] and len(one) == 4
    for a, b in zip(one, two):
        # not rewards/accuracies: at step 1 policy = reference, and the sign of a 1e-15 margin is noise
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    a, b = weights(one_dir), weights(two_dir)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert any((a[k] != 0).any() for k in a if "lora_B" in k or "full" in case)  # it trained


def test_kill_9_then_resume_gives_the_uninterrupted_run(runs, tmp_path):
    options, _, straight, _ = runs("ddp-lora-dpo-rpo")
    options = [*options, "--save-every", "2"]

    markers = tmp_path / "markers"
    markers.mkdir()
    run = torchrun(str(WORKER), "hang", "3", str(markers), "--", "train", *options, "--out", str(tmp_path / "killed"),
                   "--batch-size", "1", "--grad-accum", "2", wait=False)  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(markers.iterdir())) < 2 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = [int(p.read_text()) for p in markers.iterdir()]
    assert len(pids) == 2, run.communicate(timeout=30)[0] if run.poll() is not None else "no markers"
    os.killpg(run.pid, signal.SIGKILL)  # torchrun
    for pid in pids:  # the ranks, wherever torchrun put them
        os.kill(pid, signal.SIGKILL)
    run.wait(timeout=30)
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step-000002"]

    two_ranks("train", tmp_path / "killed", [*options, "--resume"])
    a, b = weights(straight), weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_records(straight) == train_records(tmp_path / "killed")


def test_a_failing_rank_ends_the_run_with_one_line_per_rank(inputs, tmp_path):
    model_dir, data = inputs
    result = torchrun(str(WORKER), "fail", "2", str(tmp_path), "--", "train", "--model", str(model_dir), "--data",
                      str(data), *SETTINGS, "--out", str(tmp_path / "run"), "--batch-size", "1")  # a hang times out
    assert result.returncode != 0
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("minidpo: error:")]
    assert "minidpo: error: rank 1 of 2: injected failure" in errors
    assert all(e.startswith(("minidpo: error: rank 1 of 2:", "minidpo: error: rank 0 of 2: stopped, another rank failed"))
               for e in errors)
    assert "[rank0]: Traceback" not in output and "[rank1]: Traceback" not in output
