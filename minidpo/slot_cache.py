"""The decode cache of continuous batching: a slot per sequence, each at its own length.

    k[layer]: (slots, n_kv_heads, width, head_dim)      same for v
    lengths:  (slots,) long    columns written in each slot
    real:     (slots, width)   bool, False on a prompt's left padding
    live:     (slots,) long    1 for a slot that holds a running sequence

Row i of a running batch of B rows lives in slot i (the batch stays compact: slots [0, B)),
left-aligned, so rows of any length sit side by side:

    slot 0   a  b  c  x0 x1 x2 x3 .          length 7
    slot 1   .  d  e  y0 .  .  .  .          length 4   (. at column 0: prompt padding)
    slot 2   f  g  z0 z1 z2 .  .  .          length 5

A decode forward over the B rows writes row i's new key and value at column lengths[i]
of slot i, then `advance` moves every live slot's length on by one. Attention sees
keys[:B, :, :S] with S = the longest row + 1 (a view: the cache is not copied per step),
under `decode_mask`, which hides each row's padding and the columns past its own length
(left over from a longer sequence that held the slot before).

Joining (`put`) copies a prefilled cache's rows into the slots after the batch; leaving
(`keep`) moves the rows from the top slots down into the freed ones, one row's columns
each, so neither touches the rows that stay. `resized` copies the rows into a cache of
another shape: its owner grows it for newcomers and shrinks it once the rows that needed
the room have left (a busy server's batch may never empty). (vLLM's paged cache goes further and copies
nothing; a row-per-slot buffer keeps attention a plain sdpa over a view.)

Static (for CUDA graphs, gpt-fast's design): forwards run over all `slots` rows and the
whole `width`, so every decode step has the same shapes; idle slots are fed padding and
write at their column 0, which a joining row overwrites. The buffers are marked as static
addresses: a captured graph reads and writes them in place.
"""

from __future__ import annotations

import torch

from minidpo.config import ModelConfig
from minidpo.kv_cache import KVCache, layer_buffers


class SlotKVCache:
    def __init__(
        self,
        config: ModelConfig,
        slots: int,
        width: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        static: bool = False,
    ):
        if slots < 1 or width < 1:
            raise ValueError(f"a slot cache needs slots >= 1 and width >= 1, got slots={slots}, width={width}")
        self.config, self.static = config, static
        self.k, self.v = layer_buffers(config, slots, width, dtype, device)
        self.slot_ids = torch.arange(slots, device=device)  # (slots,) row i's slot, for the writes
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # (slots,)
        self.real = torch.ones(slots, width, dtype=torch.bool, device=device)  # (slots, width)
        self.live = torch.zeros(slots, dtype=torch.long, device=device)  # (slots,)
        self.rows = 0  # slots [0, rows) are live
        self.longest = 0  # max(lengths[:rows]), kept on the host: the dynamic key length is longest + 1
        if static:
            for buffer in (*self.k, *self.v, self.slot_ids, self.lengths, self.live):
                torch._dynamo.mark_static_address(buffer)

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def width(self) -> int:
        return self.k[0].shape[2]

    # --- what the model calls -------------------------------------------------------------

    def columns(self, T: int) -> tuple[int, int]:
        """(the longest row's new column, key columns attention sees). Forwards over a slot
        cache pass position ids and, unless every row has the same length and no padding,
        a 4-D mask (decode_mask). Static: (0, width), numbers that never change."""
        if T != 1:
            raise ValueError(f"a slot cache takes decode steps of one token per row, got {T} (prefill into a KVCache)")
        return (0, self.width) if self.static else (self.longest, self.longest + 1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each row's new k, v (B, n_kv, 1, hd) at its own column; the keys/values
        attention sees: (B, n_kv, S, hd), views into the buffers."""
        B = k.shape[0]
        slots, columns = self.slot_ids[:B], self.lengths[:B]  # (B,) each
        self.k[layer][slots, :, columns] = k[:, :, 0]  # (B, n_kv, hd) into (slot, :, column)
        self.v[layer][slots, :, columns] = v[:, :, 0]
        if self.static:
            return self.k[layer], self.v[layer]
        S = self.longest + 1
        return self.k[layer][:B, :, :S], self.v[layer][:B, :, :S]

    def advance(self, n: int) -> None:
        self.lengths += n * self.live  # in place: the tensor keeps its address
        if not self.static:
            self.longest += n

    # --- what the decode batch calls ------------------------------------------------------

    def decode_mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """(B, 1, 1, S) bool, True = may attend: for the next decode step, each row's real
        columns up to and including the one its new token is written to (and, with a sliding
        window, only the last sliding_window of them). Static: all slots, S = width; an idle
        slot sees its column 0 only."""
        B = self.slots if self.static else self.rows
        S = self.width if self.static else self.longest + 1
        k_idx = torch.arange(S, device=self.lengths.device)[None, :]  # (1, S)
        q_idx = self.lengths[:B, None]  # (B, 1)
        allowed = (k_idx <= q_idx) & self.real[:B, :S]  # (B, S)
        if sliding_window is not None:
            allowed &= q_idx - k_idx < sliding_window
        allowed |= k_idx == q_idx  # a row (or an idle slot) always sees its newest token
        return allowed[:, None, None, :]  # (B, 1, 1, S)

    def put(self, prefilled: KVCache, real: torch.Tensor) -> None:
        """Join the n rows of a prefilled cache (n, n_kv, P, hd per layer; real (n, P) bool,
        False on left padding) in slots [rows, rows + n); `reserve` room first."""
        n, P = real.shape
        start, end = self.rows, self.rows + n
        if end > self.slots or P > self.width or prefilled.filled() != P:
            raise ValueError(f"cannot put {n} rows of {prefilled.filled()} columns (mask {P}) after {self.rows} "
                             f"rows into {self.slots} slots of {self.width} columns")  # fmt: skip
        for mine, theirs in zip((*self.k, *self.v), (*prefilled.k, *prefilled.v)):
            mine[start:end, :, :P] = theirs[:, :, :P]
        self.real[start:end] = True
        self.real[start:end, :P] = real
        self.lengths[start:end] = P
        self.live[start:end] = 1
        self.rows, self.longest = end, max(self.longest if start else 0, P)

    def keep(self, kept: list[int]) -> list[int]:
        """Keep the rows `kept` (ascending batch indices), compacted into slots [0, len(kept));
        the others leave. Returns the new order: new row j is old row order[j]. Rows already
        below len(kept) stay put; each row above moves down into a freed slot (one copy each)."""
        B = len(kept)
        staying = [i for i in kept if i < B]
        movers = [i for i in kept if i >= B]
        holes = sorted(set(range(B)) - set(staying))
        order = list(range(B))
        for hole, row in zip(holes, movers):
            order[hole] = row
            for buffer in (*self.k, *self.v):
                buffer[hole] = buffer[row]
            self.real[hole] = self.real[row]
            self.lengths[hole] = self.lengths[row]
        self.lengths[B:] = 0
        self.live[B:] = 0
        self.rows = B
        self.longest = int(self.lengths[:B].max()) if B else 0
        return order

    def resized(self, slots: int, width: int) -> SlotKVCache:
        """A cache of this many slots and columns holding this one's rows (self when the shape
        is the same): bigger when rows join, smaller when the rows that needed the room leave."""
        if (slots, width) == (self.slots, self.width):
            return self
        k0 = self.k[0]
        other = SlotKVCache(self.config, slots, width, dtype=k0.dtype, device=k0.device, static=self.static)
        other.take(self)
        return other

    def take(self, other: SlotKVCache) -> None:
        """Copy other's live rows into this cache, in place (a static cache's buffers keep their
        addresses, so a captured graph reads them on). The rows must fit: columns past this
        cache's width are dropped, so none may be written there yet."""
        B, W = other.rows, min(other.width, self.width)
        if B > self.slots or other.longest > self.width:
            raise ValueError(f"cannot take {B} rows of up to {other.longest} columns into {self.slots} slots "
                             f"of {self.width}")  # fmt: skip
        self.reset()
        for mine, theirs in zip((*self.k, *self.v), (*other.k, *other.v)):
            mine[:B, :, :W] = theirs[:B, :, :W]
        self.real[:B, :W] = other.real[:B, :W]
        self.lengths[:B] = other.lengths[:B]
        self.live[:B] = 1
        self.rows, self.longest = B, other.longest

    def reset(self) -> None:
        self.lengths.zero_()
        self.live.zero_()
        self.real.fill_(True)
        self.rows = self.longest = 0
