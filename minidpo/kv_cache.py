"""A static key/value cache: one preallocated buffer per layer, filled left to right.

    k_cache[layer]: (B, n_kv_heads, max_len, head_dim)      same for v_cache

All rows of a batch share one write position `length` (the sampler left-pads prompts so
that every row ends at the same column); padding columns are masked out by the attention
mask, not by the cache. A forward over T new tokens writes columns [length, length + T)
of every layer, then `advance(T)` moves the position. Static shapes keep the decode step
free of allocations, which is what makes it capturable by CUDA graphs (gpt-fast's design).
"""

from __future__ import annotations

import torch

from minidpo.config import ModelConfig


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
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0  # columns [0, length) hold keys/values

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v (B, n_kv, T, hd) for `layer`; return all keys/values so far.

        The returned views are (B, n_kv, length + T, hd).
        """
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (a 1-D index tensor): drop finished sequences."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]

    def realign(self, shift: int, max_len: int) -> None:
        """Move every row's columns `shift` to the right (zeros come in on the left; a
        negative shift drops the first -shift columns) into buffers max_len wide (dynamic
        only: the sampler's continuous batching makes room for, or drops, columns this way)."""
        length = self.length + shift
        if not 0 <= length <= max_len:
            raise ValueError(f"cannot realign a cache of {self.length} columns by {shift} into {max_len}")
        src, dst = slice(max(0, -shift), self.length), slice(max(0, shift), length)

        def moved(buffer: torch.Tensor) -> torch.Tensor:
            B, H, _, D = buffer.shape
            out = buffer.new_zeros(B, H, max_len, D)  # (B, n_kv, max_len, hd)
            out[:, :, dst] = buffer[:, :, src]
            return out

        self.k, self.v = [moved(k) for k in self.k], [moved(v) for v in self.v]
        self.max_len, self.length = max_len, length

    def extend_rows(self, other: KVCache) -> None:
        """Append other's rows after ours (same length and max_len; dynamic only)."""
        if (other.length, other.max_len) != (self.length, self.max_len):
            raise ValueError("extend_rows needs two dynamic caches of the same length and max_len")
        self.k = [torch.cat([a, b]) for a, b in zip(self.k, other.k)]
        self.v = [torch.cat([a, b]) for a, b in zip(self.v, other.v)]
