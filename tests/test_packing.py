"""Shared-prompt, padding-free packing: the packed forward scores what the padded one does."""

import json

import pytest
import torch
from tiny_lm import tiny_model

from minidpo.data import Example, collate
from minidpo.logprobs import sequence_logprobs
from minidpo.lora import LoRAConfig, adapters_disabled, apply_lora
from minidpo.packing import CHOSEN, PROMPT, REJECTED, pack, response_lengths
from minidpo.train import TrainConfig, Trainer

VOCAB = 101
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices run on one thread


def examples(lengths, pairs=True, seed=0):
    """Examples of random tokens with (prompt, chosen, rejected) lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()
    return [Example(str(i), ids(p), ids(c), ids(r) if pairs else None) for i, (p, c, r) in enumerate(lengths)]


# odd lengths: a one-token response, a prompt longer than both responses, uneven responses
ODD = [(5, 7, 3), (1, 1, 9), (11, 2, 2), (3, 13, 6)]


def lora_model(dtype=torch.float32, **overrides):
    model = tiny_model(VOCAB, **overrides).to(dtype)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():  # B starts at zero: give the adapters an effect to check
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


def both(model, batch_examples, pairs=True):
    unpacked = collate(batch_examples, pad_id=0, pairs=pairs)
    packed = pack(batch_examples, pairs=pairs)
    return (sequence_logprobs(model, unpacked.input_ids, unpacked.labels),
            sequence_logprobs(model, packed.input_ids, packed.labels))  # fmt: skip


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_packed_log_probs_equal_the_padded_forward_with_lora(dtype, rtol):
    (expected, expected_counts), (got, counts) = both(lora_model(dtype), examples(ODD))
    assert got.dtype == expected.dtype and got.shape == (2 * len(ODD),)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * 10)
    assert counts.tolist() == expected_counts.tolist() == [c for _, c, _ in ODD] + [r for _, _, r in ODD]


def test_reference_pass_with_adapters_off_equals_the_padded_one():
    model = lora_model()
    with torch.no_grad(), adapters_disabled(model):
        (expected, _), (got, _) = both(model, examples(ODD, seed=1))
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-5)
    (adapted, _), _ = both(model, examples(ODD, seed=1))
    assert not torch.allclose(adapted, expected)  # the adapters did change the numbers


def test_sft_packing_equals_the_padded_forward():
    (expected, expected_counts), (got, counts) = both(lora_model(torch.float64), examples(ODD, pairs=False), pairs=False)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-11)
    assert counts.tolist() == expected_counts.tolist() == [c for _, c, _ in ODD]


def test_lora_gradients_equal_the_padded_forward():
    grads = []
    for layout in (collate, pack):
        model = lora_model(torch.float64)
        batch = layout(examples(ODD, seed=2), 0) if layout is collate else layout(examples(ODD, seed=2))
        logps, _ = sequence_logprobs(model, batch.input_ids, batch.labels)
        (logps * torch.linspace(-1, 1, len(logps), dtype=logps.dtype)).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's block masks need CUDA")
def test_flex_attention_block_mask_on_cuda_equals_the_padded_forward():
    model = lora_model().cuda()
    batch_examples = examples(ODD, seed=4)
    unpacked, packed = collate(batch_examples, 0).to("cuda"), pack(batch_examples).to("cuda")
    assert not isinstance(packed.labels.attention_mask(), torch.Tensor)  # a BlockMask
    with torch.no_grad():
        expected, _ = sequence_logprobs(model, unpacked.input_ids, unpacked.labels)
        got, _ = sequence_logprobs(model, packed.input_ids, packed.labels)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)  # TF32 and another summation order


def test_sliding_window_is_applied_at_the_unpacked_positions():
    model = lora_model(torch.float64, sliding_window=4)
    (expected, _), (got, _) = both(model, examples(ODD, seed=3))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-11)
    (full, _), _ = both(lora_model(torch.float64), examples(ODD, seed=3))
    assert not torch.allclose(full, expected)  # the window mattered


def test_mask_rejected_sees_its_prompt_not_chosen_and_pairs_never_meet():
    batch = pack(examples([(2, 2, 1), (1, 1, 1)]))
    packing = batch.labels
    assert batch.input_ids.shape == (1, 8)  # no pad token, each prompt once
    assert packing.parts[0].tolist() == [PROMPT, PROMPT, CHOSEN, CHOSEN, REJECTED, PROMPT, CHOSEN, REJECTED]
    assert packing.position_ids[0].tolist() == [0, 1, 2, 3, 2, 0, 1, 1]
    mask = packing.attention_mask()[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0],  # rejected: its prompt and itself, not chosen
        [0, 0, 0, 0, 0, 1, 0, 0],  # the second pair starts afresh
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1, 0, 1],
    ]
    # c0 and r0 are both scored from the last prompt token; sequences: chosen 0, 1, then rejected 0, 1
    assert packing.source.tolist() == [1, 2, 1, 5, 5]
    assert packing.sequence.tolist() == [0, 0, 2, 1, 3]


def test_response_lengths_agree_between_layouts():
    batch_examples = examples(ODD)
    assert response_lengths(pack(batch_examples).labels).tolist() == response_lengths(collate(batch_examples, 0).labels).tolist()


def test_a_mask_for_attention_itself_needs_position_ids():
    model = tiny_model(VOCAB)
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))


# ---- in the trainer


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """A tiny model folder (ChatML) and pairs of uneven lengths."""
    from tiny_lm import tiny_model_folder

    folder = tmp_path_factory.mktemp("packing")
    rows = [{"prompt": f"Question {i}?" + " why" * (i % 3), "chosen": "yes " * (1 + 5 * (i % 3)),
             "rejected": "no " * (1 + 3 * (i % 2))} for i in range(6)]  # fmt: skip
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tiny_model_folder(folder), data


def trainer(run_files, out, mode="dpo", **options):
    model_dir, data = run_files
    config = TrainConfig(model=str(model_dir), data=str(data), out=str(out), chat_format="chatml", max_length=48,
                         max_prompt_length=16, batch_size=3, grad_accum=2, lr=1e-2, warmup_steps=0, dtype="float64",
                         lora_dropout=0.0, lora_targets="all-linear", progress=False, plot=False, device="cpu", **options)
    t = Trainer(config, mode, log=lambda message: None)
    if t.step:  # resumed: the adapters come from the checkpoint
        return t
    with torch.no_grad():  # B = 0 would make every gradient but B's zero
        for name, p in t.trainable.items():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return t


@pytest.mark.parametrize("mode, options", [("dpo", {}), ("sft", {}), ("dpo", {"loss": "ipo", "rpo_alpha": 0.5})])
def test_a_packed_training_step_equals_the_padded_one(run_files, tmp_path, mode, options):
    results = []
    for packing in (False, True):
        t = trainer(run_files, tmp_path / str(packing), mode, packing=packing, **options)
        t.optimizer.zero_grad(set_to_none=True)
        record = t.accumulate([[0, 1, 2], [3, 4, 5]])
        results.append((record, {name: p.grad.clone() for name, p in t.trainable.items()}))
    (expected, expected_grads), (got, grads) = results
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-12) and got["count"] == expected["count"]
    for name, g in expected_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-12, msg=name)


class Stop(Exception):
    pass


def stop_at(step):
    def on_step(done, record):
        if done == step:
            raise Stop

    return on_step


def test_packing_resumes_a_padded_run_with_the_same_reference_cache_and_weights(run_files, tmp_path):
    cache = {"precompute_ref": True, "ref_cache_dir": str(tmp_path / "cache"), "max_steps": 4, "save_every": 1}
    straight = trainer(run_files, tmp_path / "straight", **cache)
    straight.train()
    files = sorted((tmp_path / "cache").iterdir())
    with pytest.raises(Stop):  # steps 1 and 2 padded, checkpointed; stopped in step 3
        trainer(run_files, tmp_path / "run", **cache).train(stop_at(3))
    resumed = trainer(run_files, tmp_path / "run", **cache, packing=True, resume=True)
    assert resumed.step == 2
    resumed.train()
    assert sorted((tmp_path / "cache").iterdir()) == files  # the same cache file, read and not rewritten
    for name, p in straight.trainable.items():
        torch.testing.assert_close(resumed.trainable[name], p, rtol=1e-9, atol=1e-12, msg=name)
