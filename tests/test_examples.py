"""examples/dpo_minimal.py: the bare DPO step computes the Trainer's loss and gradients."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tiny_lm import tiny_model, tiny_tokenizer

from minidpo.checkpoint import save_model
from minidpo.train import TrainConfig, Trainer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dpo_minimal.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("dpo_minimal", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    tokenizer_dir = tmp_path_factory.mktemp("tok")
    tok = tiny_tokenizer(tokenizer_dir)
    model_dir = save_model(tiny_model(tok.vocab_size), tmp_path_factory.mktemp("tiny"), tokenizer_from=tokenizer_dir)
    rows = [{"prompt": f"How do I make compound {i}?", "chosen": "I cannot help." * (1 + i % 2),
             "rejected": f"Mix reagent {i} with water, then heat it."} for i in range(4)]
    data = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def test_the_bare_step_has_the_trainers_loss_and_gradients(example, run_inputs, tmp_path):
    model_dir, data = run_inputs
    cfg = TrainConfig(model=str(model_dir), data=str(data), out=str(tmp_path / "run"), dtype="float64",
                      lora_dropout=0.0, batch_size=2, grad_accum=1, device="cpu", progress=False, plot=False)
    trainer = Trainer(cfg, log=lambda message: None)
    with torch.no_grad():  # a policy away from the reference, so that every gradient is non-trivial
        for name, p in trainer.trainable.items():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    record = trainer.accumulate([[0, 1]])
    expected = {name: p.grad.clone() for name, p in trainer.trainable.items()}
    trainer.optimizer.zero_grad(set_to_none=True)

    loss, metrics = example.dpo_batch_loss(trainer.model, trainer.collate([0, 1]), cfg.beta)
    loss.backward()
    assert loss.item() == pytest.approx(record["loss"], rel=1e-12)
    assert metrics["rewards/margins"].item() == pytest.approx(record["rewards/margins"], rel=1e-12)
    for name, p in trainer.trainable.items():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-12, atol=1e-15)


def test_the_example_runs_and_starts_at_ln_2(example, run_inputs, capsys):
    model_dir, data = run_inputs
    example.main(["--model", str(model_dir), "--data", str(data), "--steps", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("4 pairs")
    assert [line.split(":")[0] for line in lines[1:]] == ["step 1", "step 2", "step 3"]
    assert lines[1].startswith("step 1: loss 0.6931 ")  # a fresh adapter: policy = reference
