"""QLoRA DPO on a tiny model: it learns like LoRA on the unquantized model and resumes exactly."""

import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from test_train import config, model_dir, quiet, toy_data  # noqa: F401 (fixtures)

from minidpo.errors import ParameterError
from minidpo.io import load_jsonl_tolerant
from minidpo.train import Trainer, train_dpo

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices run on one thread
STEPS = 8
# |QLoRA loss - LoRA loss| at every step, same seed and batches. Both start at log 2 (the
# reference is the policy's own base, quantized or not). Measured: at most 0.0016 over these 8
# steps (the losses range 0.61-0.77); the gap grows with training (0.05 after 16 steps).
LOSS_TOLERANCE = 0.01


def train_losses(out):
    return [r["loss"] for r in load_jsonl_tolerant(out / "metrics.jsonl") if r["split"] == "train"]


def test_qlora_dpo_loss_follows_lora_on_the_unquantized_model(model_dir, toy_data, tmp_path):  # noqa: F811
    kw = dict(max_steps=STEPS, lora_targets="all-linear", lora_dropout=0.0)
    train_dpo(config(model_dir, toy_data, tmp_path / "lora", **kw), log=quiet)
    train_dpo(config(model_dir, toy_data, tmp_path / "qlora", quantize="nf4", **kw), log=quiet)
    lora, qlora = train_losses(tmp_path / "lora"), train_losses(tmp_path / "qlora")
    assert len(lora) == len(qlora) == STEPS
    assert qlora[0] == pytest.approx(lora[0], abs=1e-6)
    assert max(abs(a - b) for a, b in zip(lora, qlora)) < LOSS_TOLERANCE
    assert min(qlora) < 0.62 and max(qlora) > 0.76  # the adapters moved the policy away from its reference


def test_qlora_kill_and_resume_equals_a_straight_run(model_dir, toy_data, tmp_path):  # noqa: F811
    kw = dict(max_steps=6, save_every=3, lora_dropout=0.2, quantize="nf4")
    train_dpo(config(model_dir, toy_data, tmp_path / "a", **kw), log=quiet)

    def kill_at_3(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train_dpo(config(model_dir, toy_data, tmp_path / "b", **kw), on_step=kill_at_3, log=quiet, catch_interrupt=True)
    resumed = train_dpo(config(model_dir, toy_data, tmp_path / "b", resume=True, **kw), log=quiet)
    assert resumed.steps == 6
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")


def test_quantize_is_refused_with_full_finetuning(model_dir, toy_data, tmp_path):  # noqa: F811
    with pytest.raises(ParameterError, match="full_finetune"):
        Trainer(config(model_dir, toy_data, tmp_path / "run", quantize="nf4", full_finetune=True), log=quiet)
