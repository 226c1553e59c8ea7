"""DPO training throughput at 1 and N ranks: torchrun with DDP over the LoRA weights.

The trainer step of dpo_step.py (SmolLM2-135M-Instruct from `minidpo fetch-default`, LoRA r=8
on q/k/v/o_proj, the reference with adapters off, sigmoid loss, AdamW) run by `torchrun
--nproc_per_node n -m benchmarks.scaling worker ...` with n = 1 and n = every GPU of the
machine (N = torch.cuda.device_count() >= 2). The per-rank batch is fixed (2 pairs, no
accumulation), so the global batch grows with n (weak scaling). Every row of every batch is
exactly 256 tokens (a prompt cut to 64, responses cut to fit), so

    tokens/s = n x 2 pairs x 2 rows x 256 tokens / step time

with the step time the median over the timed steps of rank 0's step-end clock (which
stops after the gradient all-reduce). `scaling` = tokens/s at N / (N x tokens/s at 1):
1.0 is perfect. Without two GPUs the row says "skipped", unless --scaling-cpu runs 1 and 2
gloo ranks on the CPU (with --tiny, the tiny model): that checks the path, and its numbers
mean little on a shared 2-core machine. tests/test_distributed.py covers the same ranks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

NAME = "scaling"
PAIRS, STEPS, TINY_STEPS = 2, 12, 3
SEQ_TOKENS = 256


def add_arguments(parser) -> None:
    parser.add_argument("--scaling-model", metavar="DIR", help="HF-format model folder (default: fetch-default's)")
    parser.add_argument("--scaling-cpu", action="store_true", help="without GPUs: 1 and 2 gloo ranks on the CPU")


def run(ctx) -> list[dict]:
    gpus = torch.cuda.device_count() if ctx.is_cuda else 0
    if gpus < 2 and not getattr(ctx.args, "scaling_cpu", False):
        return [{"impl": "minidpo-ddp", "status": f"skipped: needs 2+ GPUs (found {gpus}) or --scaling-cpu"}]
    from benchmarks.dpo_step import benchmark_model

    ranks = (1, gpus) if gpus >= 2 else (1, 2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="scaling.") as tmp:
        tmp = Path(tmp)
        model_dir, label = benchmark_model(ctx, tmp / "model", getattr(ctx.args, "scaling_model", None))
        data = write_full_length_pairs(tmp / "pairs.jsonl", PAIRS * max(ranks) * (STEPS + 1))
        steps = TINY_STEPS if ctx.tiny else STEPS
        for n in ranks:
            row = {"impl": "minidpo-ddp", "model": label, "ranks": n, "pairs_per_rank": PAIRS, "seq": SEQ_TOKENS,
                   "device": ctx.device.type}  # fmt: skip
            result = tmp / f"result-{n}.json"
            proc = torchrun(n, "worker", model_dir, data, ctx.device.type, steps, tmp / f"run-{n}", result)
            if proc.returncode != 0 or not result.exists():
                rows.append({**row, "status": f"error: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"})
                continue
            s_per_step = json.loads(result.read_text())["s_per_step"]
            rows.append({**row, "status": "ok", "s_per_step": s_per_step,
                         "tokens_per_s": n * PAIRS * 2 * SEQ_TOKENS / s_per_step})
    ok = {r["ranks"]: r for r in rows if r["status"] == "ok"}
    if len(ok) == 2:
        n = max(ok)
        ok[n]["scaling"] = ok[n]["tokens_per_s"] / (n * ok[1]["tokens_per_s"])
    return rows


def write_full_length_pairs(path: Path, n: int) -> Path:
    """n pairs whose every row fills SEQ_TOKENS: long prompts (cut to 64) and long responses (cut to fit)."""
    from benchmarks.dpo_step import words

    rows = [{"prompt": words(80, i), "chosen": words(400, i + 1), "rejected": words(400, i + 2)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def torchrun(n: int, *args) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
               "127.0.0.1", "--master_port", str(port), "-m", "benchmarks.scaling", *map(str, args)]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def worker(model_dir: str, data: str, device: str, steps: str, out: str, result: str) -> None:
    """One rank of a timed run; rank 0 writes {"s_per_step": median} to `result`."""
    from benchmarks.dpo_step import LORA_TARGETS, StepClock
    from minidpo.train import TrainConfig, train_dpo

    clock = StepClock(device)
    config = TrainConfig(
        model=model_dir, data=data, out=out, chat_format="plain", lora_targets=",".join(LORA_TARGETS),
        max_length=SEQ_TOKENS, max_prompt_length=64, batch_size=PAIRS, grad_accum=1, warmup_steps=0,
        scheduler="constant", max_steps=int(steps), save_every=10**6, progress=False, plot=False, device=device,
    )
    train_dpo(config, on_step=lambda step, record: clock.step_end(), log=lambda message: None)
    if os.environ.get("RANK", "0") == "0":
        Path(result).write_text(json.dumps({"s_per_step": clock.result()["s_per_step"]}))


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(*sys.argv[2:])
