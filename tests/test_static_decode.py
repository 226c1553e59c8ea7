"""The static-shape decode (gpt-fast's design, for CUDA graphs) gives the dynamic path's tokens.

The static KV cache writes at a position tensor and hands attention the whole buffer with a
mask; each decode step has the same shapes. Eager, it must give exactly the dynamic path's
tokens and (to float rounding) its hidden states; compiled (torch.compile, inductor's CPU
backend here), the same tokens with no graph break and no recompilation per step.
"""

import shutil

import pytest
import torch
from test_sampler import greedy_by_recompute, prompts_of_lengths
from tiny_lm import tiny_model

from minidpo.kv_cache import KVCache
from minidpo.sampler import STATIC_COLUMNS, DecodeBatch, SamplingParams, generate


def test_static_cache_writes_at_its_position_and_returns_the_whole_buffer(model):
    cache = KVCache(model.config, 2, 8, static=True)
    k = torch.randn(2, model.config.num_key_value_heads, 3, model.config.head_dim)  # (B, nkv, T, hd)
    cache.advance(2)
    keys, values = cache.update(0, k, -k)
    assert keys.shape[2] == values.shape[2] == 8 and cache.columns(3)[1] == 8
    assert torch.equal(keys[:, :, 2:5], k) and torch.equal(values[:, :, 2:5], -k)
    assert not keys[:, :, :2].any() and not keys[:, :, 5:].any()
    cache.advance(3)
    assert cache.position.tolist() == [5]
    with pytest.raises(ValueError, match="static"):
        cache.select_rows(torch.tensor([0]))


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 5, "model_type": "mistral"}], ids=["llama", "window"])
def test_static_forward_equals_dynamic_forward_step_by_step(tok, overrides):
    model = tiny_model(tok.vocab_size, seed=3, **overrides).double()
    lengths, P, steps, max_len = [4, 7, 2], 7, 6, 16
    mask = torch.ones(3, max_len, dtype=torch.long)  # (B, max_len)
    ids = torch.zeros(3, P, dtype=torch.long)  # (B, P) left-padded
    for i, (n, prompt) in enumerate(zip(lengths, prompts_of_lengths(tok, lengths))):
        ids[i, P - n :], mask[i, : P - n] = torch.tensor(prompt), 0
    positions = (mask[:, :P].cumsum(-1) - 1).clamp(min=0)  # (B, P)
    dynamic = KVCache(model.config, 3, max_len, dtype=torch.float64)
    static = KVCache(model.config, 3, max_len, dtype=torch.float64, static=True)
    with torch.no_grad():
        h_dyn = model(ids, attention_mask=mask[:, :P], kv_cache=dynamic)  # (B, P, D)
        h_st = model(ids, attention_mask=mask, position_ids=positions, kv_cache=static)  # (B, P, D)
        next_pos = positions[:, -1:] + 1  # (B, 1)
        for step in range(steps):
            real = mask[:, :P].bool()  # padding queries' outputs are never used
            torch.testing.assert_close(h_st[real[:, -h_st.shape[1] :]] if step == 0 else h_st,
                                       h_dyn[real[:, -h_dyn.shape[1] :]] if step == 0 else h_dyn,
                                       rtol=1e-12, atol=1e-12)  # fmt: skip
            token = model.lm_head(h_dyn[:, -1]).argmax(-1, keepdim=True)  # (B, 1)
            h_dyn = model(token, attention_mask=mask[:, : dynamic.length + 1], position_ids=next_pos,
                          kv_cache=dynamic)  # fmt: skip
            h_st = model(token, attention_mask=mask, position_ids=next_pos, kv_cache=static)
            next_pos = next_pos + 1
    assert static.position.tolist() == [dynamic.length] == [P + steps]


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
