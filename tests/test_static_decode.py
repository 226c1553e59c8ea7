"""The static-shape decode (gpt-fast's design, for CUDA graphs) gives the dynamic path's tokens.

The slot KV cache (a row per slot, each at its own length) hands attention a view of the
rows' columns, or, static, the whole buffer; static decode steps all have the same shapes.
Eager, it must give exactly the dynamic path's tokens and (to float rounding) its hidden
states, each row those of running it alone; compiled (torch.compile, inductor's CPU
backend here), the same tokens with no graph break and no recompilation per step.
"""

import shutil

import pytest
import torch
from test_sampler import greedy_by_recompute, prompts_of_lengths
from tiny_lm import tiny_model

from minidpo.kv_cache import KVCache
from minidpo.sampler import STATIC_COLUMNS, DecodeBatch, SamplingParams, generate, generate_rows
from minidpo.slot_cache import SlotKVCache


def test_slot_cache_writes_each_row_at_its_own_column_and_moves_only_top_rows(model):
    config = model.config
    cache = SlotKVCache(config, 4, 8)
    for P in (3, 1, 5):  # three rows of different lengths, joined one by one
        prefilled = KVCache(config, 1, P)
        prefilled.update(0, torch.full((1, config.num_key_value_heads, P, config.head_dim), float(P)), torch.zeros(
            1, config.num_key_value_heads, P, config.head_dim))  # fmt: skip
        prefilled.advance(P)
        cache.put(prefilled, torch.ones(1, P, dtype=torch.bool))
    assert cache.rows == 3 and cache.lengths.tolist() == [3, 1, 5, 0] and cache.longest == 5
    new = torch.arange(3.0)[:, None, None, None].expand(3, config.num_key_value_heads, 1, config.head_dim)
    assert cache.columns(1) == (5, 6)
    keys, _ = cache.update(0, new, new)  # (3, nkv, 6, hd): a view, row i's new key at column lengths[i]
    assert keys.shape[2] == 6 and keys.data_ptr() == cache.k[0].data_ptr()
    assert [keys[i, 0, col, 0].item() for i, col in enumerate((3, 1, 5))] == [0.0, 1.0, 2.0]
    mask = cache.decode_mask()[:, 0, 0]  # (3, 6)
    assert mask.tolist() == [[c <= n for c in range(6)] for n in (3, 1, 5)]
    cache.advance(1)
    assert cache.lengths.tolist() == [4, 2, 6, 0]
    order = cache.keep([1, 2])  # row 0 leaves: row 2 moves into slot 0, row 1 stays
    assert (
        order == [2, 1] and cache.rows == 2 and cache.lengths.tolist() == [6, 2, 0, 0] and cache.longest == 6
    )
    assert cache.k[0][0, 0, :6, 0].tolist() == [5.0] * 5 + [2.0]
    with pytest.raises(ValueError, match="one token"):
        cache.columns(2)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize(
    "overrides", [{}, {"sliding_window": 5, "model_type": "mistral"}], ids=["llama", "window"]
)
def test_slot_cache_decode_equals_each_row_alone_step_by_step(tok, overrides, static):
    """Rows of different lengths (one left-padded) decode side by side in a slot cache; each
    row's hidden states equal running it alone with a plain KVCache, in float64."""
    model = tiny_model(tok.vocab_size, seed=3, **overrides).double()
    prompts = prompts_of_lengths(tok, [4, 7, 2], seed=0)
    steps = 6
    slots = SlotKVCache(model.config, 4, 16, dtype=torch.float64, static=static)
    alone, h_slot, h_alone, positions = [], [], [], []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt])  # (1, n)
            cache = KVCache(model.config, 1, 16, dtype=torch.float64)
            h_alone.append(model(ids, kv_cache=cache)[:, -1])  # (1, D)
            alone.append(cache)
            if i == 2:  # the last joins left-padded by two columns
                ids, real = (
                    torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], 1),
                    torch.tensor([[0, 0, 1, 1]]),
                )
                prefilled = KVCache(model.config, 1, 4, dtype=torch.float64)
                h = model(ids, attention_mask=real, kv_cache=prefilled)[:, -1]
                slots.put(prefilled, real.bool())
            else:
                prefilled = KVCache(model.config, 1, len(prompt), dtype=torch.float64)
                h = model(ids, kv_cache=prefilled)[:, -1]
                slots.put(prefilled, torch.ones(1, len(prompt), dtype=torch.bool))
            h_slot.append(h)
            positions.append(len(prompt))
        h_slot, h_alone = torch.cat(h_slot), torch.cat(h_alone)  # (3, D)
        positions = torch.tensor(positions)[:, None]  # (3, 1)
        B = slots.slots if static else 3
        for _ in range(steps):
            torch.testing.assert_close(h_slot, h_alone, rtol=1e-12, atol=1e-12)
            token = model.lm_head(h_alone).argmax(-1, keepdim=True)  # (3, 1)
            h_alone = torch.cat([model(token[i : i + 1], kv_cache=alone[i])[:, -1] for i in range(3)])
            ids = torch.nn.functional.pad(token, (0, 0, 0, B - 3))  # (B, 1) idle slots fed padding
            pos = torch.nn.functional.pad(positions, (0, 0, 0, B - 3))  # (B, 1)
            h_slot = model(ids, attention_mask=slots.decode_mask(model.config.sliding_window), position_ids=pos,
                           kv_cache=slots)[:3, -1]  # fmt: skip
            positions = positions + 1
    assert slots.lengths[:3].tolist() == [4 + steps, 7 + steps, 4 + steps]


def sampled_cases(tok):
    prompts = prompts_of_lengths(tok, [5, 12, 1, 8], seed=2)
    stop = sorted(tok.stop_token_ids)[:1] + [prompts[0][0]]  # some rows stop early, at different steps
    return [
        (prompts, dict(max_new_tokens=14, stop=stop)),
        (prompts, dict(max_new_tokens=14, temperature=0.9, top_p=0.8, top_k=20, repetition_penalty=1.3, seed=5)),
        (prompts[:1], dict(max_new_tokens=STATIC_COLUMNS + 3, temperature=1.1, min_p=0.05, seed=1)),
    ]


def test_static_eager_decode_is_token_identical_to_the_dynamic_path(tok):
    model = tiny_model(tok.vocab_size, seed=4)
    for prompts, options in sampled_cases(tok):
        runs, streamed = {}, {}
        for static in (False, True):
            pieces = streamed[static] = []
            runs[static] = generate(model, tok, prompts, static=static, **options,
                                    stream=lambda row, text, pieces=pieces: pieces.append((row, text)))  # fmt: skip
        assert runs[True] == runs[False], options
        assert streamed[True] == streamed[False]


def test_static_greedy_equals_recompute_without_cache(tok):
    model = tiny_model(tok.vocab_size, seed=5, sliding_window=6, model_type="mistral")
    prompts = prompts_of_lengths(tok, [3, 11, 7])
    for prompt, completion in zip(prompts, generate(model, tok, prompts, max_new_tokens=10, static=True)):
        assert completion.token_ids == greedy_by_recompute(model, tok, prompt, 10)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None, reason="no C++ compiler for inductor")
def test_compiled_decode_is_token_identical_without_graph_breaks_or_recompiles(tok):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(tok.vocab_size, seed=6)
    prompts = prompts_of_lengths(tok, [6, 2, 9], seed=3)
    options = dict(max_new_tokens=12, temperature=0.8, top_k=30, seed=11)
    eager = generate(model, tok, prompts, **options)
    compiled = generate(model, tok, prompts, compile=True, **options)
    assert compiled == eager
    frames = dict(counters["stats"])
    again = generate(model, tok, prompts[::-1], compile=True, **options)  # same shapes: no new compilation
    assert again == generate(model, tok, prompts[::-1], **options)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert frames["unique_graphs"] == 1 and dict(counters["stats"])["unique_graphs"] == 1


def run_joining(model, tok, static: bool):
    """Rows joining a running batch at different steps and leaving at different steps."""
    prompts = prompts_of_lengths(tok, [4, 9, 2, 6, 3], seed=7)
    done = {}
    with torch.inference_mode():
        batch = DecodeBatch(model, tok, on_finish=lambda key, c: done.__setitem__(key, c), static=static)
        batch.add(prompts[:2], [SamplingParams(max_new_tokens=n) for n in (5, 12)], [0, 1])
        for step in range(40):
            if step in (2, 6):  # a longer prompt than the running rows' columns, then shorter ones
                keys = [2, 3] if step == 2 else [4]
                batch.add([prompts[k] for k in keys], [SamplingParams(max_new_tokens=7 + k) for k in keys], keys)
            if batch.rows:
                batch.step()
    assert not batch.rows
    return [done[k] for k in range(5)]


def test_static_decode_with_rows_joining_and_leaving_equals_dynamic(tok):
    model = tiny_model(tok.vocab_size, seed=8)
    assert run_joining(model, tok, static=True) == run_joining(model, tok, static=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_decode_on_cuda_replays_cuda_graphs_and_gives_the_eager_tokens(tok):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(tok.vocab_size, seed=9).cuda()  # float32: the same tokens, not only close ones
    prompts = prompts_of_lengths(tok, [6, 2, 9], seed=4)
    options = dict(max_new_tokens=20, temperature=0.7, top_p=0.9, seed=2)
    eager = generate(model, tok, prompts, **options)
    assert generate(model, tok, prompts, compile=True, **options) == eager
    assert generate(model, tok, prompts, compile=True, **options) == eager  # replays
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_the_cache_shrinks_once_the_rows_that_needed_the_room_leave(tok):
    """A long request (300 tokens) and seven short ones share a batch; once the long one is
    cancelled and six short ones end, the cache gives back columns and slots, and the rows
    still running give the tokens they give alone."""
    model = tiny_model(tok.vocab_size, seed=9)
    prompts = prompts_of_lengths(tok, [5, 3, 8, 4, 6, 2, 7, 5], seed=4)
    budgets = [300, 4, 4, 4, 4, 4, 4, 20]
    done = {}
    with torch.inference_mode():
        batch = DecodeBatch(model, tok, on_finish=lambda key, c: done.__setitem__(key, c))
        batch.add(prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in budgets], list(range(8)))
        shapes = [(batch.cache.slots, batch.cache.width)]
        for step in range(25):
            if step == 2:
                batch.cancel({0})
            if batch.rows:
                batch.step()
                shapes.append((batch.cache.slots, batch.cache.width) if batch.rows else None)
    assert shapes[0] == (8, 320)  # 8 + 300 - 1 columns, rounded up to 64
    assert (8, 192) in shapes  # the rows left need at most 8 + 20 - 1 columns: half go back
    assert shapes[-2] == (4, 192)  # one row left in 8 slots: half the slots go back
    for k in range(1, 8):
        alone = generate_rows(model, tok, [prompts[k]], [SamplingParams(max_new_tokens=budgets[k], ignore_eos=True)])
        assert done[k] == alone[0]
