"""QLoRA on a model: quantize on load from an HF folder, LoRA on NF4 layers, merge into the
dequantized weights."""

import pytest
import torch
from safetensors.torch import load_file

from minidpo.checkpoint import load_model, merge_adapter
from minidpo.errors import ParameterError
from minidpo.lora import LoRAConfig, adapters_disabled, apply_lora, lora_layers, merge_lora, save_adapter
from minidpo.quant import NF4Linear, NF4Weight

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices run on one thread


def ids(n=11, vocab=20):
    return torch.arange(2 * n).remainder(vocab).view(2, n)


def dequantized_copy(folder):
    """The unquantized model with every quantizable weight replaced by its NF4 round trip."""
    model, _ = load_model(folder)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in LINEARS:
                module.weight.copy_(NF4Weight.quantize(module.weight).dequantize())
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_load_quantizes_every_linear_but_lm_head_and_computes_with_the_dequantized_weights(make_tiny_llama_dir, family):
    folder = make_tiny_llama_dir(family, tie_word_embeddings=False)
    model, _ = load_model(folder, quantize="nf4")
    quantized = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert quantized == set(LINEARS)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == torch.float32
    assert [n for n, p in model.named_parameters() if n.endswith("proj.weight")] == []
    plain, _ = load_model(folder)
    if family == "qwen2":  # q/k/v biases survive, whichever of weight and bias the file holds first
        assert torch.equal(model.model.layers[0].self_attn.q_proj.bias, plain.model.layers[0].self_attn.q_proj.bias)
    with torch.no_grad():
        logits = model(ids())
        assert torch.allclose(logits, dequantized_copy(folder)(ids()), rtol=1e-5, atol=1e-5)
        reference = plain(ids())
    assert (logits - reference).norm() < 0.2 * reference.norm()  # 4 bits are close, not equal


def test_an_unknown_quantization_is_refused_before_reading(tiny_llama_dir):
    with pytest.raises(ParameterError, match="quantize 'int4'"):
        load_model(tiny_llama_dir, quantize="int4")


def qlora(folder, seed=0):
    model, _ = load_model(folder, quantize="nf4")
    torch.manual_seed(seed)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.05)
    return model


def test_lora_wraps_nf4_layers_and_adapters_disabled_is_the_quantized_base(tiny_llama_dir):
    model = qlora(tiny_llama_dir)
    layers = dict(lora_layers(model))
    assert len(layers) == 2 * len(LINEARS) and all(isinstance(layer.weight, NF4Weight) for layer in layers.values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{name}.lora_{ab}.weight" for name in layers for ab in "AB"}  # fmt: skip
    base, _ = load_model(tiny_llama_dir, quantize="nf4")
    with torch.no_grad(), adapters_disabled(model):
        assert torch.equal(model(ids()), base(ids()))
    with torch.no_grad():
        assert not torch.allclose(model(ids()), base(ids()))


def test_qlora_adapter_has_the_peft_keys_of_a_lora_adapter(tiny_llama_dir, tmp_path):
    save_adapter(qlora(tiny_llama_dir), tmp_path / "qlora")
    plain, _ = load_model(tiny_llama_dir)
    apply_lora(plain, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    save_adapter(plain, tmp_path / "lora")
    a = load_file(str(tmp_path / "qlora" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def test_merge_folds_the_adapter_into_the_dequantized_weights(tiny_llama_dir, tmp_path):
    model = qlora(tiny_llama_dir)
    with torch.no_grad():
        expected = model(ids())
        save_adapter(model, tmp_path / "adapter")
        merge_lora(model)
        assert not any(isinstance(m, NF4Linear) for m in model.modules())
        assert torch.allclose(model(ids()), expected, rtol=1e-5, atol=1e-5)

    merged = merge_adapter(tiny_llama_dir, tmp_path / "adapter", tmp_path / "merged", quantize="nf4")
    dense, _ = load_model(merged)
    with torch.no_grad():
        assert torch.allclose(dense(ids()), expected, rtol=1e-5, atol=1e-5)
