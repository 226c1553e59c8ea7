"""The model equals transformers' on tiny random configs of every supported family."""

import pytest
import torch

from minidpo.config import ModelConfig
from minidpo.errors import MiniDPOError
from minidpo.kv_cache import KVCache
from minidpo.model import LlamaForCausalLM

transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama3-rope-scaling": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "llama-bias": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1e6)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
}


def make_pair(family: str, seed: int = 0):
    """A random HF model and ours with the same weights (fp32, eval mode)."""
    cfg_name, model_name, extra = FAMILIES[family]
    hf_config = getattr(transformers, cfg_name)(**BASE, **extra)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    hf = getattr(transformers, model_name)(hf_config).eval()
    with torch.no_grad():  # random biases too, so that a missing bias cannot hide
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.5)
    config = ModelConfig.from_dict(hf_config.to_dict())
    ours = LlamaForCausalLM(config).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}
    ours.tie_weights()
    return hf, ours


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_transformers(family):
    hf, ours = make_pair(family)
    ids = torch.randint(0, BASE["vocab_size"], (2, 23))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours.lm_head(ours(ids))
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral-window"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(family, side):
    hf, ours = make_pair(family)
    lengths = [11, 7, 3]
    T = max(lengths)
    seqs = [torch.randint(0, BASE["vocab_size"], (n,)) for n in lengths]
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, cols], mask[i, cols] = s, 1
    with torch.no_grad():
        hidden = ours(ids, attention_mask=mask)
        for i, s in enumerate(seqs):
            alone = hf.model(s[None]).last_hidden_state[0]
            real = hidden[i][mask[i].bool()]
            assert (real - alone).abs().max().item() < 1e-5
            assert torch.isfinite(hidden[i]).all()


def test_right_padding_needs_no_mask():
    _, ours = make_pair("llama")
    ids = torch.randint(0, BASE["vocab_size"], (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        assert (ours(padded)[:, :9] - ours(ids)).abs().max().item() < 1e-6


@pytest.mark.parametrize("family", ["llama", "mistral-window"])
def test_kv_cache_equals_recompute(family):
    _, ours = make_pair(family)
    ids = torch.randint(0, BASE["vocab_size"], (2, 14))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 left-padded
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        cache = KVCache(ours.config, 2, 32)
        prefix = ours(ids[:, :9], attention_mask=mask[:, :9], kv_cache=cache)
        steps = [ours(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], kv_cache=cache) for t in range(9, 14)]
    got = torch.cat([prefix, *steps], dim=1)
    real = mask.bool()
    assert (got[real] - full[real]).abs().max().item() < 1e-5


def test_gradient_checkpointing_gives_the_same_gradients():
    _, ours = make_pair("llama")
    ours.train()
    ids = torch.randint(0, BASE["vocab_size"], (2, 10))

    def grads():
        ours.zero_grad()
        ours.lm_head(ours(ids)).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters()}

    plain = grads()
    ours.gradient_checkpointing = True
    ckpt = grads()
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6), name


def test_config_round_trips_through_transformers():
    hf, ours = make_pair("llama3-rope-scaling")
    again = transformers.LlamaConfig.from_dict(ours.config.to_dict())
    back = ModelConfig.from_dict(again.to_dict())
    back.extra = ours.config.extra  # transformers adds bookkeeping keys of its own
    assert back == ours.config


def test_unknown_architecture_is_one_line():
    with pytest.raises(MiniDPOError, match=r'cfg.json: model_type "gpt2"'):
        ModelConfig.from_dict({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, source="cfg.json")


def test_missing_key_is_named():
    d = dict(BASE, model_type="llama")
    del d["hidden_size"]
    with pytest.raises(MiniDPOError, match='key "hidden_size"'):
        ModelConfig.from_dict(d)


def test_parameter_count_matches_the_module():
    for family in ("llama", "llama-bias", "qwen2"):
        _, ours = make_pair(family)
        n = sum(p.numel() for p in ours.parameters())  # tied weights counted once
        assert ours.config.num_parameters == n, family


def test_the_torch_floor_has_scaled_dot_product_attention_with_enable_gqa():
    import re
    from pathlib import Path

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    (major, minor), = re.findall(r'^\s*"torch>=(\d+)\.(\d+)"', pyproject, re.MULTILINE)
    assert (int(major), int(minor)) >= (2, 5)  # enable_gqa arrived in torch 2.5
