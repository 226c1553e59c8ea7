"""The Llama family (Llama 2/3.x, SmolLM2, Mistral, Qwen2) in plain PyTorch.

A pre-norm decoder-only transformer:

    x = embed(tokens)
    for each layer:  x = x + Attention(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))
    hidden = RMSNorm(x)                       # returned by forward()
    logits = hidden @ W_head^T                # applied by the caller (see below)

- RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * w, computed in float32 (or float64).
- RoPE (Su et al. 2021, "rotate-half" layout as in HF): q' = q cos(p f) + rot(q) sin(p f) with
  f_i = theta^(-2i/d); Llama 3.1's "llama3" scaling stretches the low frequencies.
- Grouped-query attention (Ainslie et al. 2023): n_kv_heads key/value heads, each shared by
  n_heads / n_kv_heads query heads, through F.scaled_dot_product_attention.
- SwiGLU MLP (Shazeer 2020): down(silu(gate(x)) * up(x)).

Module and parameter names equal Hugging Face's (model.layers.0.self_attn.q_proj.weight ...),
so an HF state dict loads one to one. forward() returns hidden states, not logits: the DPO
loss feeds (hidden, lm_head.weight) to the fused log-prob kernel and never holds the
(tokens, vocab) logits; `model.lm_head(hidden)` gives logits when they are wanted.

Padding: with attention_mask=None the model is plainly causal, which is exact for right
padding (real tokens never look at later pads). A (B, S) 0/1 mask handles left padding
(the sampler's layout); positions then count real tokens only (cumsum(mask) - 1).
Packed rows (minidpo.packing) give attention's own mask instead, with their position_ids:
a boolean (B, 1, T, S) tensor (True = may attend), or on CUDA a FlexAttention BlockMask.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

from minidpo.config import ModelConfig
from minidpo.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # float32, float64 kept
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(config: ModelConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """f_i = theta^(-2i/d) for i < d/2, float32, with the config's scaling applied. Shape (d/2,)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: wavelengths longer than old_ctx/low are slowed by `factor`, shorter than
        # old_ctx/high are kept, and the band between is interpolated smoothly.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hd); cos, sin: (B, T, hd)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        D, qkv_bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(D, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=config.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | BlockMask | None,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd), S = cached + T
        S = k.shape[2]
        if mask is None:
            # Plain causal (or one query over the whole cache): the flash kernels take GQA as is
            # (enable_gqa needs torch >= 2.5, pyproject.toml's floor).
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1 and S == T, enable_gqa=True)
        elif isinstance(mask, BlockMask):  # packed rows on CUDA: blocks without a visible key are skipped
            y = compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=True)  # (B, nh, T, hd)
        else:
            groups = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(groups, dim=1)  # (B, nh, S, hd)
            v = v.repeat_interleave(groups, dim=1)  # (B, nh, S, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)


@cache
def compiled_flex_attention():
    """FlexAttention through torch.compile (its fused kernel; uncompiled it materializes the scores)."""
    return torch.compile(flex_attention, dynamic=False)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        D, Fd, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(D, Fd, bias=bias)
        self.up_proj = nn.Linear(D, Fd, bias=bias)
        self.down_proj = nn.Linear(Fd, D, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_4d(
    attention_mask: torch.Tensor | None, start: int, T: int, S: int, sliding_window: int | None, device
) -> torch.Tensor | None:
    """The boolean mask (B or 1, 1, T, S) that sdpa takes; True = may attend.

    Queries are columns start..start+T-1 of the key axis. None when plain causal suffices.
    (A decode step over a SlotKVCache, whose rows differ in length, brings its own 4-D mask.)
    """
    windowed = sliding_window is not None and S > sliding_window
    if attention_mask is None and not windowed and (start == 0 or T == 1):
        return None
    q_idx = (start + torch.arange(T, device=device))[:, None]  # (T, 1)
    k_idx = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = k_idx <= q_idx  # (T, S)
    if windowed:
        allowed = allowed & (q_idx - k_idx < sliding_window)
    allowed = allowed[None]  # (1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :].bool()  # (B, T, S)
        # A padding query would see no key at all (and sdpa would return NaN): let it see
        # itself. Its output is never used; real queries are unaffected.
        allowed = allowed | (k_idx == q_idx)[None]
    return allowed[:, None]  # (B, 1, T, S)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self._inv_freq: dict[torch.device, torch.Tensor] = {}  # not a buffer: stays float32, no meta

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        device = position_ids.device
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inverse_frequencies(self.config, device)
        freqs = position_ids[..., None].float() * self._inv_freq[device]  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None):
        B, T = input_ids.shape
        start, S = kv_cache.columns(T) if kv_cache is not None else (0, T)  # first query column, key columns
        ready = isinstance(attention_mask, BlockMask) or (attention_mask is not None and attention_mask.dim() == 4)
        if ready and position_ids is None:
            raise ValueError("an attention mask for attention itself (4-D or a BlockMask) needs position_ids")
        if attention_mask is not None and not ready and attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
            else:
                position_ids = torch.arange(start, S, device=input_ids.device).expand(B, T)  # (B, T)
        x = self.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = self.rope(position_ids, x.dtype)  # (B, T, hd) each
        mask = attention_mask if ready else attention_mask_4d(attention_mask, start, T, S, self.config.sliding_window, x.device)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpointing:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm(x)  # (B, T, D)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _init_weights(module: nn.Module, std: float = 0.02) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.model.gradient_checkpointing = on

    def tie_weights(self) -> None:
        """Re-tie lm_head to the embedding (after loading tensors with assign=True)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, D) for input_ids (B, T); see the module docstring."""
        return self.model(input_ids, attention_mask, position_ids, kv_cache)
