"""Batched text generation with a KV cache: prefill, then one token a step, rows joining and leaving.

Prompts that arrive together are left-padded and prefilled as one batch into a KVCache;
then each row moves into a slot of a SlotKVCache (minidpo/slot_cache.py), where it grows
at its own length:

    slot 0    pad  pad   a    b    x0   x1   x2        prompt columns mask 0 0 1 1
    slot 1     c    d    e    f    y0   y1             prompt columns mask 1 1 1 1
    slot 2     g    h    z0                            (joined later, alone)

Each decode step feeds the B newest tokens (B, 1) at per-row positions (row 0 above
continues at position 2, not 4; row 2 at 2) and writes each row's key and value at its
own column. Only the last position's hidden state goes through lm_head. While all rows
have the same length and no padding, the attention mask is left out altogether.

A DecodeBatch is that state between two steps, open to change (continuous batching, as
Orca, Yu et al. OSDI 2022, and vLLM serve): newcomers are prefilled together and join in
the slots after the running rows; a row that finishes or is cancelled leaves at once, and
a row from the top slots moves into its slot. Nothing else is copied. Rows never see each
other: each has its own mask, positions, sampling settings and generator, so a row's
tokens do not depend on what else is in the batch.

Choosing the next token from the logits z (float32) of a row, in transformers' order:

    logit masks: tokens a guided-decoding constraint forbids, and stop tokens before
        min_tokens, get z = -inf
    repetition penalty r (CTRL, Keskar et al. 2019, arXiv 1909.05858): for every token t
        already in the prompt or the completion, z_t <- z_t / r if z_t > 0 else z_t * r
    temperature 0 (or below 1e-5, as vLLM): argmax z (greedy, deterministic); otherwise
        z <- z / temperature, then
    top-k:  keep the k largest z
    top-p (nucleus, Holtzman et al. 2019, arXiv 1904.09751): keep the most likely tokens
        until their probability mass reaches p (the token that crosses p is kept)
    min-p (Nguyen et al. 2024, arXiv 2407.01082): keep tokens with p_t >= min_p * max_t p_t
    draw from softmax(z) by inverting its CDF with one uniform number from the row's own
    torch.Generator, seeded per row, so a seed reproduces a row's samples whatever else is
    in the batch.

A row whose distribution is not a distribution (NaN or infinite logits, nothing allowed)
ends alone with finish_reason "error"; the other rows go on. Log-probs, when asked for,
are log_softmax of the model's own float32 logits (before penalties, temperature, filters
and masks: vLLM's "raw" log-probs).

A row stops at a stop token (the tokenizer's eos and end-of-turn ids unless ignore_eos,
plus any given), at a stop string found in its decoded text (the text is cut just before
it), or after max_new_tokens ("length"). Streaming hands out text as it is decoded,
holding back a tail that could still become a stop string, so streamed pieces always add
up to the final text.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from minidpo.kv_cache import KVCache
from minidpo.slot_cache import SlotKVCache

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (vLLM's _SAMPLING_EPS)
DRAW_BLOCK = 256  # draw_tokens finds the block of this many tokens first, then the token in it
STATIC_COLUMNS = 64  # a static decode step's key length is a multiple of this: fewer graphs to compile


class TokenConstraint(Protocol):
    """Guided decoding: which tokens may come next, given the row's text so far."""

    def allowed(self, text: str) -> torch.Tensor:
        """(V,) bool on the CPU: True where the token keeps the output valid."""
        ...


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one row is sampled and when it stops (0 / 1.0 switch a filter off)."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str | int, ...] = ()  # stop strings and stop token ids
    seed: int | None = None  # None: drawn from torch's global generator
    min_tokens: int = 0  # stop tokens are masked out until this many tokens are generated
    ignore_eos: bool = False  # the tokenizer's eos / end-of-turn ids do not end the row
    logprobs: int | None = None  # None: off; k: each token's log-prob and the k most likely
    constraint: TokenConstraint | None = None  # guided decoding

    def __post_init__(self):
        checks = (
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (0 <= self.temperature < math.inf, "temperature must be finite and >= 0"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (0 < self.repetition_penalty < math.inf, "repetition_penalty must be finite and > 0"),
            (all(isinstance(s, (str, int)) and s != "" for s in self.stop), "stop: non-empty strings or token ids"),
            (self.seed is None or -(2**63) <= self.seed < 2**64, "seed must be in [-2**63, 2**64)"),
            (0 <= self.min_tokens <= self.max_new_tokens, "min_tokens must be in [0, max_new_tokens]"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs must be None or >= 0"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}, got {self}")


@dataclasses.dataclass
class TokenLogprob:
    """A generated token's log-prob and the `k` most likely tokens at its step (id, log-prob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Completion:
    """One row's result. token_ids are every generated token (a final stop token included);
    text is their decoded text, cut before the stop string that ended it."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry when asked for
    error: str | None = None  # why the row failed (finish_reason "error")

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


StreamCallback = Callable[[Hashable, str], None]  # (row key, new text)
FinishCallback = Callable[[Hashable, Completion], None]  # (row key, its completion)


def render_chat(tokenizer, messages: list[dict], chat_format=None) -> str:
    """A conversation as prompt text, ready for the reply, in the tokenizer's chat format
    (or `chat_format`, a name or ChatFormat)."""
    fmt = tokenizer.chat_format_or(chat_format)
    return fmt.render(messages, add_generation_prompt=True)


def generate(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    stop: Sequence[str | int] = (),
    seed: int | None = None,
    stream: StreamCallback | None = None,
    on_finish: FinishCallback | None = None,
    compile: bool = False,
    static: bool = False,
) -> list[Completion]:
    """Complete each prompt (token ids, or text already rendered: see `render_chat`).

    Row i samples from a generator seeded `seed + i`. `stream(row, text)` receives text
    as it is decoded, `on_finish(row, completion)` each row as it ends. `compile` runs the
    decode step with static shapes through torch.compile(mode="reduce-overhead"), on CUDA
    one CUDA-graph replay per token; `static` runs that static-shape step eagerly. All give
    the same tokens (tests/test_static_decode.py).
    """
    stop = (stop,) if isinstance(stop, (str, int)) else tuple(stop)
    params = [
        SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            stop=stop,
            seed=None if seed is None else seed + i,
        )
        for i in range(len(prompts))
    ]
    return generate_rows(model, tokenizer, prompts, params, stream=stream, on_finish=on_finish,
                         compile=compile, static=static)  # fmt: skip


@torch.inference_mode()
def generate_rows(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    params: Sequence[SamplingParams],
    *,
    stream: StreamCallback | None = None,
    on_finish: FinishCallback | None = None,
    compile: bool = False,
    static: bool = False,
) -> list[Completion]:
    """`generate` with each row's own SamplingParams: one DecodeBatch, run until every row ends."""
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int)):
        raise TypeError("prompts is a list of prompts (texts or token-id lists): wrap a single prompt in a list")
    if len(prompts) != len(params) or not prompts:
        raise ValueError(f"need one SamplingParams per prompt and at least one prompt ({len(prompts)}, {len(params)})")
    prompt_ids = [_prompt_ids(tokenizer, p, i) for i, p in enumerate(prompts)]
    results: dict[int, Completion] = {}

    def finished(row: Hashable, completion: Completion) -> None:
        results[row] = completion
        if on_finish is not None:
            on_finish(row, completion)

    was_training = model.training
    model.eval()  # LoRA dropout off
    try:
        batch = DecodeBatch(model, tokenizer, stream=stream, on_finish=finished, compile=compile, static=static)
        batch.add(prompt_ids, list(params), list(range(len(prompt_ids))))
        while batch.rows:
            batch.step()
    finally:
        model.train(was_training)
    return [results[i] for i in range(len(prompt_ids))]


class DecodeBatch:
    """The rows being decoded together, between two steps; rows join and leave at any step.

    `add` prefills newcomers and joins them, `step` samples one token for every row and
    feeds it, `cancel` ends rows early. Each row carries a caller's key, handed back to
    `stream(key, text)` and `on_finish(key, completion)`. Call it under torch.inference_mode()
    with the model in eval mode (generate_rows does both).

    The rows live in a SlotKVCache (minidpo/slot_cache.py): row i in slot i, at its own
    length, so joining copies only the newcomers' prefilled columns and leaving only the
    rows that move down into freed slots. While every row has the same length and no
    padding (one add of equal prompts), decode steps need no attention mask.

    Static shapes (`static`, or `compile`: gpt-fast's design, for CUDA graphs): the cache
    has a power of two of slots and a multiple of STATIC_COLUMNS of columns, and every
    decode step runs over all of them (idle slots are padding), so the step's shapes change
    only when the cache grows. With `compile` the step goes through
    torch.compile(mode="reduce-overhead"): one graph per cache shape.
    """

    def __init__(self, model, tokenizer, *, stream: StreamCallback | None = None,
                 on_finish: FinishCallback | None = None, compile: bool = False, static: bool = False):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.stream, self.on_finish = stream, on_finish
        self.static = static or compile
        self.step_model = torch.compile(model, mode="reduce-overhead") if compile else model
        self.compiled = compile
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.rows: list[_Row] = []
        self.cache: SlotKVCache | None = None
        self.ragged = False  # rows differ in length or have padding: decode steps need a mask
        self.positions = torch.zeros(0, 1, dtype=torch.long, device=self.device)  # (B, 1) next position
        self.hidden = torch.zeros(0, model.config.hidden_size, dtype=self.dtype, device=self.device)  # (B, D)
        self.chooser = _TokenChooser(model.config.vocab_size, self.device)

    def add(self, prompt_ids: list[list[int]], params: list[SamplingParams], keys: list[Hashable]) -> None:
        """Prefill these prompts as one left-padded batch and join their rows to the batch."""
        B, P = len(prompt_ids), max(len(ids) for ids in prompt_ids)
        ids = torch.full((B, P), self.pad_id, dtype=torch.long)  # (B, P) left-padded prompts
        mask = torch.ones(B, P, dtype=torch.long)  # (B, P)
        for i, row_ids in enumerate(prompt_ids):
            ids[i, P - len(row_ids) :] = torch.tensor(row_ids)
            mask[i, : P - len(row_ids)] = 0
        ids, mask = ids.to(self.device), mask.to(self.device)
        rows = [_Row(key, self.tokenizer, len(r), p) for key, r, p in zip(keys, prompt_ids, params)]
        prefilled = KVCache(self.model.config, B, P, dtype=self.dtype, device=self.device)
        padded = bool((mask == 0).any())
        hidden = self.model(ids, attention_mask=mask if padded else None, kv_cache=prefilled)  # (B, P, D)
        # a row feeds back all but its last token: P + max_new_tokens - 1 columns
        self._reserve(len(self.rows) + B, P + max(p.max_new_tokens for p in params) - 1)
        self.ragged = padded or (bool(self.rows) and (self.ragged or P != self.cache.longest))
        self.cache.put(prefilled, mask.bool())
        self.positions = torch.cat([self.positions, mask.sum(-1, keepdim=True)])  # (B, 1)
        self.hidden = torch.cat([self.hidden, hidden[:, -1]])  # (B, D)
        self.chooser.extend(params, prompt_ids)
        self.rows += rows

    def step(self) -> None:
        """Sample the next token of every row, retire the rows that end, feed the others."""
        logits = self.model.lm_head(self.hidden).float()  # (B, V)
        next_ids, failed = self.chooser(logits, self.rows)  # (B,), (B,) bool
        logprobs = self._logprobs(logits, next_ids)
        for j, (row, token_id, bad) in enumerate(zip(self.rows, next_ids.tolist(), failed.tolist())):
            if bad:
                row.fail("the next-token distribution is not finite (NaN/inf logits or no allowed token)")
            else:
                row.add(token_id, logprobs.get(j))
            piece = row.take_stream_text()
            if piece and self.stream is not None:
                self.stream(row.key, piece)
        next_ids = self._retire(next_ids)
        if not self.rows:
            return
        window = self.model.config.sliding_window
        if self.static:
            self.hidden = self._static_step(next_ids, window)  # (B, D)
        else:
            mask = self.cache.decode_mask(window) if self.ragged else None  # (B, 1, 1, S)
            hidden = self.step_model(next_ids[:, None], attention_mask=mask, position_ids=self.positions,
                                     kv_cache=self.cache)  # fmt: skip
            self.hidden = hidden[:, -1]  # (B, D)
        self.positions = self.positions + 1

    def cancel(self, keys: set[Hashable]) -> None:
        """End the rows with these keys now (finish_reason "cancelled")."""
        for row in self.rows:
            if row.key in keys and row.finish_reason is None:
                row.finish_reason = "cancelled"
        self._retire(None)

    def _logprobs(self, logits: torch.Tensor, next_ids: torch.Tensor) -> dict[int, TokenLogprob]:
        """{batch index: TokenLogprob} for the rows that asked, from log_softmax of the raw logits."""
        wanted = [j for j, row in enumerate(self.rows) if row.params.logprobs is not None]
        if not wanted:
            return {}
        logp = logits[wanted].log_softmax(-1)  # (b, V) float32
        chosen = logp.gather(-1, next_ids[wanted][:, None].clamp(min=0))[:, 0]  # (b,)
        k = min(max(self.rows[j].params.logprobs for j in wanted), logp.shape[-1])
        top_lp, top_ids = logp.topk(k, dim=-1)  # (b, k)
        out = {}
        for n, j in enumerate(wanted):
            kj = self.rows[j].params.logprobs
            top = list(zip(top_ids[n, :kj].tolist(), top_lp[n, :kj].tolist()))
            out[j] = TokenLogprob(int(next_ids[j]), float(chosen[n]), top)
        return out

    def _static_step(self, next_ids: torch.Tensor, window: int | None) -> torch.Tensor:
        """Feed next_ids (B,) through the static-shape step over all slots; the new hidden states (B, D)."""
        B, pad = len(self.rows), self.cache.slots - len(self.rows)
        ids = F.pad(next_ids[:, None], (0, 0, 0, pad), value=self.pad_id)  # (slots, 1)
        positions = F.pad(self.positions, (0, 0, 0, pad))  # (slots, 1)
        mask = self.cache.decode_mask(window)  # (slots, 1, 1, width)
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        hidden = self.step_model(ids, attention_mask=mask, position_ids=positions, kv_cache=self.cache)
        return hidden[:B, -1]  # (B, D)

    def _reserve(self, rows: int, width: int) -> None:
        """A cache with room for this many rows and columns (grown, its rows copied, if not)."""
        width = _round_up(width, STATIC_COLUMNS)
        cache = self.cache
        if self.static:
            slots = 1 << (rows - 1).bit_length()
            shape = (max(slots, cache.slots), max(width, cache.width)) if cache else (slots, width)
            if cache is None or shape != (cache.slots, cache.width):
                self.cache = _static_cache(self.model, shape, self.dtype, self.device)
                if cache is None:
                    self.cache.reset()
                else:
                    self.cache.take(cache)
        elif cache is None:
            self.cache = SlotKVCache(self.model.config, rows, width, dtype=self.dtype, device=self.device)
        elif rows > cache.slots or width > cache.width:  # slots double, so that joins rarely copy
            slots = max(rows, 2 * cache.slots) if rows > cache.slots else cache.slots
            self.cache = cache.resized(slots, max(width, cache.width))

    def _shrink(self) -> None:
        """After rows left (dynamic cache only): give memory back once the rows left need at
        most a quarter of the columns or fill at most a quarter of the slots, down to half (room
        to come back without growing again at once: joins and leaves do not resize by turns)."""
        cache = self.cache
        lengths = cache.lengths[: len(self.rows)].tolist()
        most = max(n + r.budget + 1 for n, r in zip(lengths, self.rows))  # the most columns a row will reach
        need = _round_up(most, STATIC_COLUMNS)
        width = max(need, _round_up(cache.width // 2, STATIC_COLUMNS)) if need <= cache.width // 4 else cache.width
        slots = cache.slots // 2 if len(self.rows) <= cache.slots // 4 else cache.slots
        if (slots, width) != (cache.slots, cache.width):
            self.cache = cache.resized(slots, width)

    def _retire(self, next_ids: torch.Tensor | None) -> torch.Tensor | None:
        """Drop the rows that ended (telling on_finish), compacting the others into the first slots."""
        keep = [j for j, row in enumerate(self.rows) if row.finish_reason is None]
        for row in self.rows:
            if row.finish_reason is not None and self.on_finish is not None:
                self.on_finish(row.key, row.completion())
        if len(keep) == len(self.rows):
            return next_ids
        if keep:
            order = self.cache.keep(keep)
        else:  # the batch is empty: the next add starts afresh (a dynamic cache's memory goes back)
            order, self.ragged = [], False
            if self.static:
                self.cache.reset()
            else:
                self.cache = None
        kept = torch.tensor(order, dtype=torch.long, device=self.device)
        self.rows = [self.rows[j] for j in order]
        self.positions, self.hidden = self.positions[kept], self.hidden[kept]
        self.chooser.select_rows(kept)
        if self.rows and not self.static:
            self._shrink()
        return None if next_ids is None else next_ids[kept]


_STATIC_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its static SlotKVCache


def _static_cache(model, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> SlotKVCache:
    """The model's static cache of `shape` (slots, columns), kept from one batch to the next (one
    per model, as gpt-fast's setup_caches): a captured CUDA graph then finds its buffers at the
    same addresses and replays instead of recording again. One static batch per model at a time."""
    cache = _STATIC_CACHES.get(model)
    if cache is None or (cache.slots, cache.width, cache.k[0].dtype, cache.k[0].device) != (
        *shape, dtype, torch.device(device)):  # fmt: skip
        cache = _STATIC_CACHES[model] = SlotKVCache(model.config, *shape, dtype=dtype, device=device, static=True)
    return cache


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _prompt_ids(tokenizer, prompt, index: int) -> list[int]:
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise ValueError(f"prompt {index} is empty: give at least one token")
    return ids


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's penalty: seen tokens' logits divided by r when positive, multiplied when negative.

    logits (B, V) float; seen (B, V) bool; penalty (B, 1).
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)  # (B, V)
    return torch.where(seen, penalized, logits)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) with the tokens that top-k, then top-p, then min-p remove set to -inf.

    Per row: top_k (B,) long (0 = off), top_p (B,) (1 = off), min_p (B,) (0 = off). The
    most likely token always survives.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    rank = torch.arange(logits.shape[-1], device=logits.device)  # (V,)
    removed = (rank[None] >= top_k[:, None]) & (top_k[:, None] > 0)  # (B, V)
    probs = sorted_logits.masked_fill(removed, float("-inf")).softmax(-1)  # (B, V)
    mass_before = probs.cumsum(-1) - probs  # (B, V) mass of the more likely tokens
    removed |= mass_before >= top_p[:, None]
    removed |= probs < min_p[:, None] * probs[:, :1]
    removed[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(removed, float("-inf")))


def draw_tokens(probs: torch.Tensor, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of probs (b, V), drawn by inverting its CDF with one uniform number
    from the row's generator; and which rows (b,) bool are not a distribution (NaN, or no mass).

        u ~ U[0, 1),   token = min{ i : sum_{j <= i} p_j > u * sum_j p_j }

    in two levels, so that no pass over the whole vocabulary runs in float64: the sums s_k of
    blocks of DRAW_BLOCK tokens (a float32 reduction), their float64 cumsum, the block k whose
    cumulative sum first exceeds x = u * sum_k s_k, then the token inside block k by the
    float64 cumsum of its DRAW_BLOCK probabilities at x less the mass of the blocks before.
    u * total is kept below total and the token is kept at or before the block's last one
    with mass, so a zero-probability token is never drawn. One pass over the batch replaces
    a torch.multinomial call per row (about a millisecond each for a 49k vocabulary on a
    CPU core); the drawn distribution is exact to float32 rounding of the block sums.
    """
    b, V = probs.shape
    if V % DRAW_BLOCK:
        probs = F.pad(probs, (0, -V % DRAW_BLOCK))  # zeros: never drawn
    blocks = probs.view(b, -1, DRAW_BLOCK)  # (b, nb, blk)
    block_cdf = blocks.sum(-1).double().cumsum(-1)  # (b, nb)
    total = block_cdf[:, -1:]  # (b, 1)
    bad = ~torch.isfinite(total[:, 0]) | (total[:, 0] <= 0)  # (b,)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=g.device) for g in generators])  # (b,)
    x = torch.minimum(u[:, None].to(probs.device) * total, torch.nextafter(total, torch.zeros_like(total)))  # (b, 1)
    block = torch.searchsorted(block_cdf, x, right=True).clamp(max=blocks.shape[1] - 1)  # (b, 1)
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), 0.0)  # (b, 1)
    inside = blocks.gather(1, block[:, :, None].expand(-1, -1, DRAW_BLOCK))[:, 0].double()  # (b, blk)
    j = torch.searchsorted(inside.cumsum(-1), x - before, right=True)  # (b, 1)
    last = DRAW_BLOCK - 1 - (inside.flip(-1) > 0).long().argmax(-1, keepdim=True)  # (b, 1) last token with mass
    tokens = (block * DRAW_BLOCK + torch.minimum(j, last))[:, 0]  # (b,)
    return tokens.masked_fill(bad, 0), bad


class _TokenChooser:
    """Every row's sampling settings as tensors (B, ...), its generator and the tokens it has
    seen (for the repetition penalty); picks next tokens. Rows join (extend) and leave
    (select_rows) in step with the DecodeBatch."""

    def __init__(self, vocab_size: int, device):
        self.vocab_size, self.device = vocab_size, device
        self.params: list[SamplingParams] = []
        self.generators: list[torch.Generator | None] = []
        self.seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)  # (B, V)
        self._refresh()

    def extend(self, params: list[SamplingParams], prompt_ids: list[list[int]]) -> None:
        seen = torch.zeros(len(params), self.vocab_size, dtype=torch.bool, device=self.device)  # (b, V)
        for i, ids in enumerate(prompt_ids):
            seen[i, torch.tensor(ids, device=self.device)] = True
        self.seen = torch.cat([self.seen, seen])  # (B, V)
        self.params += params
        self.generators += [None if p.temperature < GREEDY_BELOW else _generator(p.seed, self.device) for p in params]
        self._refresh()

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (a 1-D index tensor)."""
        keep = rows.tolist()
        self.params = [self.params[i] for i in keep]
        self.generators = [self.generators[i] for i in keep]
        self.seen = self.seen[rows]
        self._refresh()

    def _refresh(self) -> None:
        params, device = self.params, self.device
        self.greedy = [i for i, g in enumerate(self.generators) if g is None]
        self.sampled = [i for i, g in enumerate(self.generators) if g is not None]
        self.greedy_rows = torch.tensor(self.greedy, dtype=torch.long, device=device)  # (g,)
        self.sampled_rows = torch.tensor(self.sampled, dtype=torch.long, device=device)  # (b,)
        drawn = [params[i] for i in self.sampled]  # temperature and filters matter to sampled rows only
        self.temperature = torch.tensor([p.temperature for p in drawn], device=device)[:, None]  # (b, 1)
        self.top_k = torch.tensor([min(p.top_k, self.vocab_size) for p in drawn], dtype=torch.long, device=device)
        self.top_p = torch.tensor([p.top_p for p in drawn], device=device)  # (b,)
        self.min_p = torch.tensor([p.min_p for p in drawn], device=device)  # (b,)
        self.penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]  # (B, 1)
        self.filters = any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in drawn)
        self.penalized = any(p.repetition_penalty != 1 for p in params)

    def __call__(self, logits: torch.Tensor, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """The next token (B,) of each row from its logits (B, V) float32, and which rows
        (B,) bool have no valid distribution."""
        logits = self._masked(logits, rows)
        if self.penalized:
            logits = apply_repetition_penalty(logits, self.seen, self.penalty)
        B = logits.shape[0]
        next_ids = torch.zeros(B, dtype=torch.long, device=self.device)  # (B,)
        failed = torch.zeros(B, dtype=torch.bool, device=self.device)  # (B,)
        if self.greedy:
            greedy = logits if len(self.greedy) == B else logits[self.greedy_rows]  # (g, V)
            best_ids = greedy.argmax(-1)  # (g,)
            best = greedy.gather(-1, best_ids[:, None])[:, 0]  # (g,): NaN where a row has one (argmax takes NaN)
            next_ids[self.greedy_rows] = best_ids
            failed[self.greedy_rows] = torch.isnan(best) | (best == float("-inf"))  # a NaN, or nothing allowed
        if self.sampled:
            z = (logits if len(self.sampled) == B else logits[self.sampled_rows]) / self.temperature  # (b, V)
            if self.filters:
                z = filter_logits(z, self.top_k, self.top_p, self.min_p)
            drawn, bad = draw_tokens(z.softmax(-1), [self.generators[i] for i in self.sampled])  # (b,), (b,)
            next_ids[self.sampled_rows] = drawn
            failed[self.sampled_rows] = bad
        self.seen[torch.arange(B, device=self.device), next_ids] = True
        return next_ids, failed

    def _masked(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Logits with each row's forbidden tokens at -inf: its constraint's, and its stop
        tokens while it has fewer than min_tokens."""
        masked = None
        for i, row in enumerate(rows):
            banned = row.banned_ids()
            constraint = row.params.constraint
            if not banned and constraint is None:
                continue
            if masked is None:
                masked = logits.clone()
            if constraint is not None:
                allowed = constraint.allowed(row.text).to(self.device)  # (V,)
                masked[i, : allowed.shape[0]].masked_fill_(~allowed, float("-inf"))
                masked[i, allowed.shape[0] :] = float("-inf")
            if banned:
                masked[i, torch.tensor(banned, device=self.device)] = float("-inf")
        return logits if masked is None else masked


def _generator(seed: int | None, device) -> torch.Generator:
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())  # reproducible under torch.manual_seed
    return torch.Generator(device=device).manual_seed(seed)


class _Row:
    """One sequence's host-side state: its tokens, its decoded text and how it stops."""

    def __init__(self, key: Hashable, tokenizer, prompt_tokens: int, params: SamplingParams):
        self.key, self.prompt_tokens, self.params = key, prompt_tokens, params
        eos = set() if params.ignore_eos else set(tokenizer.stop_token_ids)
        self.stop_ids = eos | {s for s in params.stop if isinstance(s, int)}
        self.stop_strings = [s for s in params.stop if isinstance(s, str)]
        self.decoder = tokenizer.decode_stream()
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []
        self.text = ""
        self.checked = 0  # text[:checked] holds no stop string
        self.streamed = 0  # text[:streamed] has been handed out
        self.finish_reason: str | None = None
        self.error: str | None = None

    @property
    def budget(self) -> int:
        """Cache columns this row may still write (its last token is never fed back)."""
        return self.params.max_new_tokens - len(self.token_ids) - 1

    def banned_ids(self) -> list[int]:
        return sorted(self.stop_ids) if len(self.token_ids) < self.params.min_tokens else []

    def add(self, token_id: int, logprob: TokenLogprob | None = None) -> None:
        """Take the next sampled token; set finish_reason when the row ends."""
        self.token_ids.append(token_id)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        stop_token = token_id in self.stop_ids
        if not stop_token:
            self.text += self.decoder.push(token_id)
        out_of_budget = len(self.token_ids) >= self.params.max_new_tokens
        if stop_token or out_of_budget:
            self.text += self.decoder.flush()
        if self._cut_at_stop_string() or stop_token:
            self.finish_reason = "stop"
        elif out_of_budget:
            self.finish_reason = "length"

    def fail(self, message: str) -> None:
        self.finish_reason, self.error = "error", message

    def _cut_at_stop_string(self) -> bool:
        hits = [
            i for s in self.stop_strings if (i := self.text.find(s, max(0, self.checked - len(s) + 1))) >= 0
        ]
        self.checked = len(self.text)
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def take_stream_text(self) -> str:
        """The text not handed out yet, less a tail that may still grow into a stop string."""
        end = len(self.text)
        if self.finish_reason is None:
            end -= max(
                (k for s in self.stop_strings for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0
            )
        piece = self.text[self.streamed : end]
        self.streamed = max(self.streamed, end)
        return piece

    def completion(self) -> Completion:
        return Completion(self.text, list(self.token_ids), self.finish_reason or "length", self.prompt_tokens,
                          self.logprobs, self.error)  # fmt: skip
