"""A key/value cache: one preallocated buffer per layer, filled left to right.

    k[layer]: (B, n_kv_heads, max_len, head_dim)      same for v

All rows of a batch share one write position (the sampler left-pads prompts so that every
row ends at the same column); padding columns are masked out by the attention mask, not by
the cache. A forward over T new tokens writes columns [p, p + T) of every layer, then
`advance(T)` moves the position p. Two ways to hand the keys to attention:

- dynamic (default): p is a Python int (`length`) and `update` returns the filled columns
  [0, p + T), so the key length grows by one per decode step. Rows can be dropped.
- static (gpt-fast's design, for CUDA graphs): p is a (1,) tensor (`position`), `update`
  writes with index_copy_ and returns the whole buffers, so every decode step has the same
  shapes and reads no Python number that changes; the caller's attention mask (B, max_len)
  hides the columns not written yet (the model's causal mask does, with q = p + arange(T)).
  The buffers and the position are marked as static addresses: a captured graph reads and
  writes them in place. A static cache needs an attention mask and position ids from its
  caller, and writes past max_len raise (CPU) or trip a device assert (CUDA).
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
        static: bool = False,
    ):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.static = static
        self.length = 0  # dynamic: columns [0, length) hold keys/values
        self.position = torch.zeros(1, dtype=torch.long, device=device) if static else None  # static: same, (1,)
        if static:
            for buffer in (*self.k, *self.v, self.position):
                torch._dynamo.mark_static_address(buffer)

    def columns(self, T: int) -> tuple[int | torch.Tensor, int]:
        """(first column written by a forward over T tokens, number of key columns it sees)."""
        if self.static:
            return self.position, self.max_len
        return self.length, self.length + T

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v (B, n_kv, T, hd) for `layer`; return the keys/values attention sees.

        Dynamic: views (B, n_kv, length + T, hd). Static: the whole buffers (B, n_kv, max_len, hd).
        """
        if self.static:
            cols = self.position + torch.arange(k.shape[2], device=k.device)  # (T,)
            self.k[layer].index_copy_(2, cols, k)
            self.v[layer].index_copy_(2, cols, v)
            return self.k[layer], self.v[layer]
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        if self.static:
            self.position += n  # in place: the tensor keeps its address
        else:
            self.length += n

    def filled(self) -> int:
        """Columns written so far (a static cache's position is read back from its device)."""
        return int(self.position) if self.static else self.length

    def copy_from(self, other: KVCache) -> None:
        """Take other's first rows and written columns (either layout) into this cache, in
        place: a static cache's buffers keep their addresses, so a captured graph reads them on."""
        length, rows = other.filled(), min(self.k[0].shape[0], other.k[0].shape[0])
        if length > self.max_len:
            raise ValueError(f"KV cache overflow: {length} positions > max_len {self.max_len}")
        for mine, theirs in zip((*self.k, *self.v), (*other.k, *other.v)):
            mine[:rows, :, :length] = theirs[:rows, :, :length]
        self.length = length
        if self.static:
            self.position.fill_(length)

    def reset(self) -> None:
        if self.static:
            self.position.zero_()
        self.length = 0

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (a 1-D index tensor): drop finished sequences (dynamic only)."""
        if self.static:
            raise ValueError("a static KV cache keeps its batch size: rows cannot be dropped")
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
