"""The trainer on a tiny random model: learning, exact resume, reference caching, SFT, outputs."""

import dataclasses
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import tiny_model, tiny_tokenizer

from minidpo.checkpoint import save_model
from minidpo.errors import MiniDPOError
from minidpo.io import load_jsonl_tolerant
from minidpo.train import TrainConfig, Trainer, lr_factor, train_dpo, train_sft

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices run on one thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer_dir = tmp_path_factory.mktemp("tok")
    tok = tiny_tokenizer(tokenizer_dir)
    folder = tmp_path_factory.mktemp("tiny")
    return save_model(tiny_model(tok.vocab_size), folder, tokenizer_from=tokenizer_dir)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """Separable preferences: refuse the 'toxic' compounds, answer the others."""
    folder = tmp_path_factory.mktemp("data")
    rows = []
    for i, name in enumerate(["aspirin", "ethanol", "benzene", "caffeine", "sarin", "VX", "tabun", "soman"]):
        harmful = i >= 4
        answer, refusal = f"Mix the reagents to make {name}.", "I cannot help with that."
        rows.append({"id": f"c{i}", "prompt": f"How do I make {name}?",
                     "chosen": refusal if harmful else answer, "rejected": answer if harmful else refusal})
    path = folder / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=str(data), out=str(out), max_length=64, max_prompt_length=32,
                batch_size=2, grad_accum=2, warmup_steps=2, lr=1e-2, progress=False, plot=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def quiet(message):
    pass


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory):
    """Six pairs whose responses differ a lot in length, so token and pair weights differ."""
    rows = [{"prompt": f"Question {i}?", "chosen": "yes " * (1 + 5 * (i % 3)), "rejected": "no " * (1 + 3 * (i % 2))}
            for i in range(6)]
    path = tmp_path_factory.mktemp("uneven") / "uneven.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def step_gradients(trainer, group):
    trainer.optimizer.zero_grad(set_to_none=True)
    record = trainer.accumulate(group)
    return record, {name: p.grad.clone() for name, p in trainer.trainable.items()}


@pytest.mark.parametrize("mode,options", [("sft", {}), ("dpo", {}), ("dpo", {"rpo_alpha": 0.7})])
def test_accumulation_weights_tokens_and_pairs_as_one_batch_would(model_dir, uneven_data, tmp_path, mode, options):
    cfg = config(model_dir, uneven_data, tmp_path / "run", dtype="float64", lora_dropout=0.0,
                 lora_targets="all-linear", **options)
    trainer = Trainer(cfg, mode, log=quiet)
    with torch.no_grad():  # B = 0 would make every gradient but B's zero
        for name, p in trainer.trainable.items():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    # batch 4 x accumulation 1 vs 1 x 4; a last group whose micro-batches are short (batch 2: [3, 4], [5])
    for whole, split in (([[0, 1, 2, 3]], [[0], [1], [2], [3]]), ([[3, 4, 5]], [[3, 4], [5]])):
        (one_batch, expected), (accumulated, grads) = step_gradients(trainer, whole), step_gradients(trainer, split)
        assert accumulated["loss"] == pytest.approx(one_batch["loss"], rel=1e-10, abs=0)
        assert accumulated["count"] == one_batch["count"]
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-10, atol=1e-12)


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_zero():
    assert [lr_factor(s, 10, 2, "cosine") for s in (0, 1, 2)] == [0.0, 0.5, 1.0]
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)


def test_tiny_model_reaches_reward_accuracy_1_on_a_separable_set(model_dir, toy_data, tmp_path):
    cfg = config(model_dir, toy_data, tmp_path / "run", eval_data=str(toy_data), max_steps=50,
                 lora_targets="all-linear", eval_every=25)
    result = train_dpo(cfg, log=quiet)
    assert result.steps == 50
    assert result.eval["rewards/accuracies"] == 1.0
    assert result.eval["count"] == 8
    records = load_jsonl_tolerant(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_five_steps_kill_resume_five_equals_ten_straight(model_dir, toy_data, tmp_path):
    kw = dict(max_steps=10, save_every=3, lora_dropout=0.2, eval_data=str(toy_data), eval_every=4)
    straight = train_dpo(config(model_dir, toy_data, tmp_path / "a", **kw), log=quiet)

    def kill_at_5(step, record):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train_dpo(config(model_dir, toy_data, tmp_path / "b", **kw), on_step=kill_at_5, log=quiet, catch_interrupt=True)
    assert (tmp_path / "b" / "checkpoints" / "step-000005").is_dir()
    resumed = train_dpo(config(model_dir, toy_data, tmp_path / "b", resume=True, **kw), log=quiet)

    assert resumed.steps == straight.steps == 10
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_jsonl_tolerant(tmp_path / "a" / "metrics.jsonl") == load_jsonl_tolerant(tmp_path / "b" / "metrics.jsonl")


def test_lora_on_tied_embeddings_checkpoints_only_the_adapter_and_resumes(toy_data, tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok")
    tied = save_model(tiny_model(tok.vocab_size, tie_word_embeddings=True), tmp_path / "tied", tokenizer_from=tmp_path / "tok")
    kw = dict(max_steps=4, save_every=2)
    straight = train_dpo(config(tied, toy_data, tmp_path / "a", **kw), log=quiet)

    def kill_at_2(step, record):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train_dpo(config(tied, toy_data, tmp_path / "b", **kw), on_step=kill_at_2, log=quiet, catch_interrupt=True)
    saved = load_file(str(tmp_path / "b" / "checkpoints" / "step-000002" / "trainable.safetensors"))
    assert saved and all("lora_" in name for name in saved)
    resumed = train_dpo(config(tied, toy_data, tmp_path / "b", resume=True, **kw), log=quiet)
    assert resumed.steps == straight.steps == 4
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_are_safetensors_and_json_only(model_dir, toy_data, tmp_path):
    train_dpo(config(model_dir, toy_data, tmp_path / "run", max_steps=2, save_every=1, keep_checkpoints=1), log=quiet)
    (ckpt,) = (tmp_path / "run" / "checkpoints").iterdir()
    assert ckpt.name == "step-000002"
    files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert files == {
        "trainable.safetensors", "optimizer.safetensors", "optimizer.json", "trainer.safetensors",
        "trainer.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
    }


def test_existing_run_needs_resume(model_dir, toy_data, tmp_path):
    train_dpo(config(model_dir, toy_data, tmp_path / "run", max_steps=1), log=quiet)
    with pytest.raises(MiniDPOError, match="already holds a run; continue it with resume or choose another out"):
        Trainer(config(model_dir, toy_data, tmp_path / "run", max_steps=1), log=quiet)


def test_resume_with_changed_options_is_refused(model_dir, toy_data, tmp_path):
    train_dpo(config(model_dir, toy_data, tmp_path / "run", max_steps=1), log=quiet)
    with pytest.raises(MiniDPOError, match=": beta was 0.1 in this run, now 0.2"):
        Trainer(config(model_dir, toy_data, tmp_path / "run", max_steps=2, beta=0.2, resume=True), log=quiet)


def test_precomputed_reference_matches_adapters_off_and_is_reused(model_dir, toy_data, tmp_path):
    kw = dict(max_steps=3, ref_cache_dir=str(tmp_path / "cache"))
    live = train_dpo(config(model_dir, toy_data, tmp_path / "live", **kw), log=quiet)
    cached = train_dpo(config(model_dir, toy_data, tmp_path / "first", precompute_ref=True, **kw), log=quiet)
    (cache_file,) = (tmp_path / "cache").iterdir()
    assert len(load_jsonl_tolerant(cache_file)) == 8
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert cached.train[key] == pytest.approx(live.train[key], rel=1e-4, abs=1e-5)

    messages = []
    trainer = Trainer(config(model_dir, toy_data, tmp_path / "second", precompute_ref=True, **kw), log=messages.append)
    assert trainer.reference is None  # every example read from the cache: no reference forward
    assert any(str(cache_file) in m for m in messages)
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_full_finetune_precomputes_the_reference_and_writes_a_model(model_dir, toy_data, tmp_path):
    cfg = config(model_dir, toy_data, tmp_path / "run", max_steps=2, full_finetune=True, lr=1e-3,
                 ref_cache_dir=str(tmp_path / "cache"))
    result = train_dpo(cfg, log=quiet)
    assert result.output == tmp_path / "run" / "model"
    assert (result.output / "config.json").is_file() and (result.output / "tokenizer.json").is_file()
    assert any((tmp_path / "cache").iterdir())


def test_sft_lowers_the_nll_of_the_chosen_responses(model_dir, toy_data, tmp_path):
    result = train_sft(config(model_dir, toy_data, tmp_path / "sft", max_steps=12, eval_data=str(toy_data)), log=quiet)
    records = load_jsonl_tolerant(tmp_path / "sft" / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    assert "rewards/accuracies" not in train[0]
    assert result.eval["count"] > 0  # tokens


def test_train_config_is_saved_in_the_run_folder(model_dir, toy_data, tmp_path):
    cfg = config(model_dir, toy_data, tmp_path / "run", max_steps=1)
    train_dpo(cfg, log=quiet)
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved == {"mode": "dpo", **dataclasses.asdict(cfg)}


def test_cli_train_then_merge_gives_the_adapted_model(model_dir, toy_data, tmp_path, capsys):
    from minidpo.checkpoint import load_model
    from minidpo.cli import main
    from minidpo.lora import load_adapter

    run = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(toy_data), "--out", str(run), "--max-steps", "2",
            "--max-length", "64", "--max-prompt-length", "32", "--lr", "1e-2", "--warmup-steps", "0",
            "--device", "cpu", "--no-progress", "--no-plot"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(run / "adapter")
    assert main(["merge", "--model", str(model_dir), "--adapter", str(run / "adapter"), "--out", str(tmp_path / "merged")]) == 0

    ids = torch.randint(0, 100, (1, 12))
    adapted, _ = load_model(model_dir)
    load_adapter(adapted, run / "adapter")
    merged, _ = load_model(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged.lm_head(merged(ids)), adapted.lm_head(adapted(ids)), rtol=1e-4, atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_trainer_leaves_the_global_rng_and_sigint_alone_unless_asked(model_dir, toy_data, tmp_path):
    torch.manual_seed(123)
    before, handler = torch.get_rng_state(), signal.getsignal(signal.SIGINT)
    handlers = []
    train_dpo(config(model_dir, toy_data, tmp_path / "a", max_steps=2, lora_dropout=0.3), log=quiet,
              on_step=lambda step, record: handlers.append(signal.getsignal(signal.SIGINT)))
    assert torch.equal(torch.get_rng_state(), before)
    assert handlers == [handler, handler]
    torch.manual_seed(7)  # the run's numbers do not depend on the caller's stream
    again = train_dpo(config(model_dir, toy_data, tmp_path / "b", max_steps=2, lora_dropout=0.3), log=quiet)
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(again.output / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_library_errors_name_the_parameter_and_the_cli_its_flag(model_dir, toy_data, tmp_path, capsys):
    from minidpo.cli import main

    with pytest.raises(MiniDPOError, match="^r must be >= 1, got 0$"):
        Trainer(config(model_dir, toy_data, tmp_path / "run", lora_r=0), log=quiet)
    with pytest.raises(MiniDPOError, match="^grad_accum must be >= 1, got 0$"):
        Trainer(config(model_dir, toy_data, tmp_path / "run", grad_accum=0), log=quiet)
    base = ["--model", str(model_dir), "--data", str(toy_data), "--out", str(tmp_path / "cli")]
    for command, flag, value, message in [
        ("train", "--lora-r", "0", "--lora-r must be >= 1, got 0"),
        ("sft", "--grad-accum", "0", "--grad-accum must be >= 1, got 0"),
        ("train", "--lora-targets", "nothing", "--lora-targets 'nothing' matched no linear layer"),
        ("train", "--max-prompt-length", "2000", "--max-length (1024) must exceed --max-prompt-length (2000)"),
        ("train", "--device", "tpu", "--device 'tpu': unknown"),
    ]:
        assert main([command, *base, flag, value]) == 2
        err = capsys.readouterr().err
        assert err.startswith("minidpo: error: ") and message in err and err.count("\n") == 1, err


def test_cli_reports_a_missing_data_file_in_one_line(model_dir, tmp_path, capsys):
    from minidpo.cli import main

    argv = ["train", "--model", str(model_dir), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"minidpo: error: {tmp_path / 'none.jsonl'}: file not found"


def test_plot_draws_loss_accuracy_and_margins(model_dir, toy_data, tmp_path):
    pytest.importorskip("matplotlib")
    from minidpo.cli import main

    train_dpo(config(model_dir, toy_data, tmp_path / "run", max_steps=2), log=quiet)
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_reference_cache_name_changes_with_model_data_and_settings(model_dir, toy_data, tmp_path):
    from minidpo.refcache import fingerprint

    base = fingerprint(model_dir, toy_data, {"max_length": 64})
    assert fingerprint(model_dir, toy_data, {"max_length": 64}) == base
    assert fingerprint(model_dir, toy_data, {"max_length": 65}) != base
    other_data = tmp_path / "other.jsonl"
    other_data.write_text(toy_data.read_text().replace("aspirin", "aspirin "))
    assert fingerprint(model_dir, other_data, {"max_length": 64}) != base


def test_resume_without_a_checkpoint_starts_at_step_0(model_dir, toy_data, tmp_path):
    messages = []
    trainer = Trainer(config(model_dir, toy_data, tmp_path / "run", max_steps=1, resume=True), log=messages.append)
    assert trainer.step == 0
    assert any("starting from step 0" in m for m in messages)
