"""The sampler's DecodeBatch, as the server drives it: rows join mid-batch, fail or are
cancelled alone, and each row's tokens equal running it alone."""

import copy
import dataclasses

import pytest
import torch

from minidpo.sampler import DecodeBatch, SamplingParams, generate_rows


def prompts_of_lengths(tok, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor(sorted(set(range(tok.vocab_size)) - tok.stop_token_ids))
    return [allowed[torch.randint(len(allowed), (n,), generator=g)].tolist() for n in lengths]


def alone(model, tok, prompt, params):
    return generate_rows(model, tok, [prompt], [params])[0]


def run(model, tok, arrivals: dict, cancel_at: dict | None = None):
    """Drive a DecodeBatch: arrivals {step: [(key, prompt, params)]}, cancel_at {step: {keys}}."""
    done, streamed = {}, {}
    batch = DecodeBatch(model, tok, stream=lambda k, t: streamed.__setitem__(k, streamed.get(k, "") + t),
                        on_finish=done.__setitem__)  # fmt: skip
    with torch.inference_mode():
        for step in range(200):
            if step in arrivals:
                keys, prompts, params = zip(*arrivals[step])
                batch.add(list(prompts), list(params), list(keys))
            if cancel_at and step in cancel_at:
                batch.cancel(cancel_at[step])
            if batch.rows:
                batch.step()
            elif step > max(arrivals):
                break
    return done, streamed


def test_rows_joining_mid_batch_equal_running_alone(model, tok):
    prompts = prompts_of_lengths(tok, [4, 9, 2, 14, 6, 3], seed=3)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (12, 5, 9, 7, 10, 4)]
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)
    arrivals = {0: [(0, prompts[0], params[0])], 2: [(1, prompts[1], params[1]), (2, prompts[2], params[2])],
                3: [(3, prompts[3], params[3])], 7: [(4, prompts[4], params[4]), (5, prompts[5], sampled)]}  # fmt: skip
    done, streamed = run(model, tok, arrivals)
    for key, prompt, p in (item for items in arrivals.values() for item in items):
        expected = alone(model, tok, prompt, p)
        assert done[key].token_ids == expected.token_ids, key
        assert done[key].text == expected.text == streamed.get(key, "")
        assert done[key].finish_reason == "length"


def test_a_poisoned_row_fails_alone_and_eight_others_succeed(model, tok):
    prompts = prompts_of_lengths(tok, [5] * 9, seed=4)
    good = SamplingParams(max_new_tokens=6, temperature=1.0, seed=1)
    poisoned = SamplingParams(max_new_tokens=6, temperature=1.0, repetition_penalty=1e-300)  # 0 in float32
    done, _ = run(model, tok, {0: [(i, p, poisoned if i == 4 else good) for i, p in enumerate(prompts)]})
    assert done[4].finish_reason == "error" and "not finite" in done[4].error
    for i in set(range(9)) - {4}:
        assert done[i].finish_reason in ("stop", "length") and done[i].error is None
        assert done[i].token_ids == alone(model, tok, prompts[i], good).token_ids


def test_a_cancelled_row_leaves_and_the_others_go_on(model, tok):
    prompts = prompts_of_lengths(tok, [3, 8, 5], seed=5)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    done, _ = run(model, tok, {0: [(i, p, params) for i, p in enumerate(prompts)]}, cancel_at={3: {1}})
    assert done[1].finish_reason == "cancelled" and done[1].completion_tokens == 3
    for i in (0, 2):
        assert done[i].token_ids == alone(model, tok, prompts[i], params).token_ids


def test_min_tokens_and_ignore_eos_fix_the_length(model, tok):
    (prompt,) = prompts_of_lengths(tok, [4], seed=6)
    first = alone(model, tok, prompt, SamplingParams(max_new_tokens=1)).token_ids[0]  # greedy's first token
    as_stop = SamplingParams(max_new_tokens=9, stop=(first,))
    assert alone(model, tok, prompt, as_stop).completion_tokens == 1
    held = alone(model, tok, prompt, dataclasses.replace(as_stop, min_tokens=6))
    assert held.completion_tokens >= 6 and first not in held.token_ids[:6]
    eos_tok = copy.copy(tok)
    eos_tok.stop_token_ids = {first}  # now the tokenizer's own eos
    assert alone(model, eos_tok, prompt, SamplingParams(max_new_tokens=9)).completion_tokens == 1
    ignoring = alone(model, eos_tok, prompt, SamplingParams(max_new_tokens=9, ignore_eos=True))
    assert ignoring.completion_tokens == 9 and ignoring.token_ids[0] == first


def test_logprobs_equal_log_softmax_of_a_recompute(model, tok):
    (prompt,) = prompts_of_lengths(tok, [6], seed=7)
    out = alone(model, tok, prompt, SamplingParams(max_new_tokens=5, temperature=1.0, seed=3, logprobs=3,
                                                    ignore_eos=True))  # fmt: skip
    ids = prompt + out.token_ids
    with torch.no_grad():
        logp = model.lm_head(model(torch.tensor([ids]))).double().log_softmax(-1)[0]  # (T, V)
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    for t, lp in enumerate(out.logprobs):
        row = logp[len(prompt) - 1 + t]  # (V,)
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
        top = row.topk(3)
        assert [i for i, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
