"""A key/value cache for a forward over whole prompts: one preallocated buffer per layer,
filled left to right.

    k[layer]: (B, n_kv_heads, max_len, head_dim)      same for v

All rows share one write position p (the sampler left-pads prompts so that every row ends
at the same column); padding columns are masked out by the attention mask, not by the
cache. A forward over T new tokens writes columns [p, p + T) of every layer and hands
attention the filled columns [0, p + T); then `advance(T)` moves p. The sampler prefills
newcomers into one of these, then moves their rows into a SlotKVCache (minidpo/slot_cache.py),
where each row decodes at its own length.
"""

from __future__ import annotations

import torch

from minidpo.config import ModelConfig


def layer_buffers(config: ModelConfig, rows: int, width: int, dtype: torch.dtype, device) -> tuple[list, list]:
    """Zeroed keys and values, one (rows, n_kv_heads, width, head_dim) tensor per layer each."""
    shape = (rows, config.num_key_value_heads, width, config.head_dim)
    k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
    v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
    return k, v


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.k, self.v = layer_buffers(config, batch_size, max_len, dtype, device)
        self.max_len = max_len
        self.length = 0  # columns [0, length) hold keys/values

    def columns(self, T: int) -> tuple[int, int]:
        """(first column written by a forward over T tokens, number of key columns it sees)."""
        return self.length, self.length + T

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v (B, n_kv, T, hd) for `layer`; return the keys/values
        attention sees: views (B, n_kv, length + T, hd)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def filled(self) -> int:
        """Columns written so far."""
        return self.length
