"""LoRA: exact at init, exact merge, PEFT's file layout both ways, clear errors."""

import pytest
import torch

from minidpo.config import ModelConfig
from minidpo.errors import MiniDPOError
from minidpo.lora import (
    LoRAConfig,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
)
from minidpo.model import LlamaForCausalLM

TINY = dict(
    model_type="llama",
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)


def tiny_model(seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(ModelConfig.from_dict(TINY)).eval()


def logits(model, ids):
    with torch.no_grad():
        return model.lm_head(model(ids))


def randomize_lora_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


IDS = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))


def test_fresh_adapter_gives_the_base_logits_exactly():
    model = tiny_model()
    base = logits(model, IDS)
    apply_lora(model, LoRAConfig(target_modules="all-linear"))
    assert torch.equal(logits(model, IDS), base)


def test_only_adapter_weights_are_trainable():
    model = tiny_model()
    names = apply_lora(model, LoRAConfig())
    assert len(names) == 2 * 3
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_all_linear_skips_the_output_layer():
    model = tiny_model()
    names = apply_lora(model, LoRAConfig(target_modules="all-linear"))
    assert len(names) == 2 * 7
    assert not isinstance(model.lm_head, LoRALinear)


def test_state_dict_keeps_hf_names_for_base_weights():
    model = tiny_model()
    apply_lora(model, LoRAConfig())
    keys = set(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in keys


def test_adapters_disabled_gives_the_base_logits():
    model = tiny_model()
    base = logits(model, IDS)
    apply_lora(model, LoRAConfig())
    randomize_lora_b(model)
    adapted = logits(model, IDS)
    with adapters_disabled(model):
        assert torch.equal(logits(model, IDS), base)
    assert torch.equal(logits(model, IDS), adapted)
    assert not torch.allclose(adapted, base)


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_then_forward_equals_unmerged_forward(rslora):
    model = tiny_model()
    apply_lora(model, LoRAConfig(r=4, alpha=8, use_rslora=rslora, target_modules="all-linear"))
    randomize_lora_b(model)
    unmerged = logits(model, IDS)
    merge_lora(model)
    assert not list(lora_layers(model))
    torch.testing.assert_close(logits(model, IDS), unmerged, rtol=1e-5, atol=1e-5)


def test_unmerge_restores_the_base_weight():
    model = tiny_model()
    apply_lora(model, LoRAConfig())
    randomize_lora_b(model)
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.weight.clone()
    layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, before, rtol=0, atol=1e-6)


def test_rslora_scales_by_alpha_over_sqrt_r():
    assert LoRAConfig(r=16, alpha=8, use_rslora=True).scale == 2.0
    assert LoRAConfig(r=16, alpha=8).scale == 0.5


def test_adapter_round_trips_through_its_files(tmp_path):
    model = tiny_model()
    apply_lora(model, LoRAConfig(r=4, alpha=12))
    randomize_lora_b(model)
    save_adapter(model, tmp_path / "adapter")
    fresh = tiny_model()
    config = load_adapter(fresh, tmp_path / "adapter")
    assert (config.r, config.alpha) == (4, 12)
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))


def test_adapter_for_another_model_is_a_one_line_error(tmp_path):
    model = tiny_model()
    apply_lora(model, LoRAConfig())
    save_adapter(model, tmp_path / "adapter")
    other = LlamaForCausalLM(ModelConfig.from_dict({**TINY, "hidden_size": 64}))
    with pytest.raises(MiniDPOError, match="another model"):
        load_adapter(other, tmp_path / "adapter")


def test_missing_adapter_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(MiniDPOError, match="adapter_config.json: file not found"):
        load_adapter(tiny_model(), tmp_path / "nope")


# ---- PEFT interop (test extra: transformers + peft as oracles)


def hf_and_ours(seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = {k: v for k, v in TINY.items() if k != "model_type"}
    hf_config = transformers.LlamaConfig(**cfg)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    ours = LlamaForCausalLM(ModelConfig.from_dict(hf_config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def test_adapter_saved_here_loads_in_peft_with_equal_logits(tmp_path):
    peft = pytest.importorskip("peft")
    hf, ours = hf_and_ours()
    apply_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")))
    randomize_lora_b(ours)
    save_adapter(ours, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(IDS).logits
    torch.testing.assert_close(logits(ours, IDS), theirs, rtol=1e-5, atol=1e-5)


def test_peft_adapter_loads_here_with_equal_logits(tmp_path):
    peft = pytest.importorskip("peft")
    hf, ours = hf_and_ours()
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"], use_rslora=True)
    peft_model = peft.get_peft_model(hf, config).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        theirs = peft_model(IDS).logits
    peft_model.save_pretrained(str(tmp_path / "peft"))
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours, IDS), theirs, rtol=1e-5, atol=1e-5)


# ---- LoRA on the output layer (the fused log-prob path must see it)


def lm_head_lora_model(dtype=torch.float64):
    model = tiny_model().to(dtype)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="lm_head,q_proj"))
    randomize_lora_b(model)
    return model.to(dtype)


# float32 runs the fused kernel; float64 the plain path, exactly
TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-9)}


@pytest.mark.parametrize("dtype", TOLERANCES)
def test_fused_logprobs_honour_an_adapted_lm_head(dtype):
    from minidpo.logprobs import sequence_logprobs

    model = lm_head_lora_model(dtype)
    labels = IDS.clone()
    labels[:, :3] = -100  # a prompt of 3 tokens
    fused, _ = sequence_logprobs(model, IDS, labels)
    logp = torch.log_softmax(model.lm_head(model(IDS)), -1)[:, :-1]  # (B, T-1, V)
    targets = labels[:, 1:]
    token = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)  # (B, T-1)
    torch.testing.assert_close(fused.to(dtype), token.sum(1), **TOLERANCES[dtype])
    with adapters_disabled(model):
        assert not torch.allclose(sequence_logprobs(model, IDS, labels)[0], fused)


@pytest.mark.parametrize("dtype", TOLERANCES)
def test_lm_head_adapter_gradients_equal_autograd_through_the_full_logits(dtype):
    from minidpo.logprobs import sequence_logprobs

    def grads(loss_of):
        model = lm_head_lora_model(dtype)
        loss_of(model).backward()
        head = model.lm_head
        return head.lora_A.weight.grad, head.lora_B.weight.grad

    labels = IDS.clone()
    labels[:, :2] = -100
    mask = labels[:, 1:] != -100

    def reference(model):
        logp = torch.log_softmax(model.lm_head(model(IDS)), -1)[:, :-1]  # (B, T-1, V)
        return -(logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0] * mask).sum()

    fused = grads(lambda model: -sequence_logprobs(model, IDS, labels)[0].sum())
    expected = grads(reference)
    assert fused[1].abs().sum() > 0
    for ours, theirs in zip(fused, expected):
        torch.testing.assert_close(ours, theirs, **TOLERANCES[dtype])


def test_adapter_on_lm_head_loads_in_peft_with_equal_logits(tmp_path):
    peft = pytest.importorskip("peft")
    hf, ours = hf_and_ours()
    apply_lora(ours, LoRAConfig(r=4, alpha=8, target_modules="lm_head,q_proj"))
    randomize_lora_b(ours)
    save_adapter(ours, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(IDS).logits
    torch.testing.assert_close(logits(ours, IDS), theirs, rtol=1e-5, atol=1e-5)
