"""The sampler: KV-cached batched greedy equals plain recompute; filters, seeds and stops."""

import math

import pytest
import torch
from tiny_lm import tiny_model, tiny_model_folder

from minidpo.sampler import (
    SamplingParams,
    apply_repetition_penalty,
    draw_tokens,
    filter_logits,
    generate,
    generate_rows,
    render_chat,
)


def prompts_of_lengths(tok, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor(sorted(set(range(tok.vocab_size)) - tok.stop_token_ids))
    return [allowed[torch.randint(len(allowed), (n,), generator=g)].tolist() for n in lengths]


def greedy_by_recompute(model, tok, prompt_ids, max_new_tokens):
    """The reference: the whole sequence through the model for every token, no cache, no padding."""
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model.lm_head(model(torch.tensor([ids]))[:, -1]).argmax(-1))
            out.append(token)
            if token in tok.stop_token_ids:
                break
            ids.append(token)
    return out


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 6, "model_type": "mistral"}], ids=["llama", "window"])
def test_cached_batched_greedy_equals_recompute_without_cache(tok, overrides):
    model = tiny_model(tok.vocab_size, seed=1, **overrides)
    prompts = prompts_of_lengths(tok, [3, 11, 7, 1])
    got = generate(model, tok, prompts, max_new_tokens=12)
    for prompt, completion in zip(prompts, got):
        assert completion.token_ids == greedy_by_recompute(model, tok, prompt, 12)
        assert completion.prompt_tokens == len(prompt)


def test_each_row_of_a_padded_batch_equals_running_it_alone(model, tok):
    prompts = prompts_of_lengths(tok, [9, 2, 5], seed=1)
    batch = generate(model, tok, prompts, max_new_tokens=10)
    for prompt, completion in zip(prompts, batch):
        assert completion == generate(model, tok, [prompt], max_new_tokens=10)[0]


def test_top_k_1_equals_greedy(model, tok):
    prompts = prompts_of_lengths(tok, [4, 8])
    greedy = generate(model, tok, prompts, max_new_tokens=8)
    top1 = generate(model, tok, prompts, max_new_tokens=8, temperature=1.5, top_k=1, seed=7)
    assert [c.token_ids for c in top1] == [c.token_ids for c in greedy]


# A hand-made distribution, deliberately out of order: p = 0.10 0.50 0.05 0.20 0.15
PROBS = torch.tensor([[0.10, 0.50, 0.05, 0.20, 0.15]])


def kept(top_k=0, top_p=1.0, min_p=0.0):
    logits = filter_logits(PROBS.log(), torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def test_top_k_keeps_the_k_most_likely():
    assert kept(top_k=2) == {1, 3}
    assert kept(top_k=0) == {0, 1, 2, 3, 4}


def test_top_p_keeps_the_most_likely_until_their_mass_reaches_p():
    assert kept(top_p=0.45) == {1}  # 0.50 alone reaches 0.45
    assert kept(top_p=0.6) == {1, 3}  # 0.50 + 0.20
    assert kept(top_p=0.8) == {1, 3, 4}  # 0.50 + 0.20 + 0.15
    assert kept(top_k=2, top_p=0.75) == {1, 3}  # top-p sees top-k's renormalised 5/7, 2/7
    assert kept(top_k=2, top_p=0.7) == {1}


def test_min_p_keeps_tokens_above_a_fraction_of_the_most_likely():
    assert kept(min_p=0.25) == {1, 3, 4}  # threshold 0.125
    assert kept(min_p=0.5) == {1}  # threshold 0.25
    assert kept(min_p=1.0) == {1}


def test_filters_apply_per_row():
    logits = PROBS.log().expand(3, 5)
    out = filter_logits(logits, torch.tensor([1, 0, 0]), torch.tensor([1.0, 0.6, 1.0]), torch.tensor([0.0, 0.0, 0.25]))
    assert torch.isfinite(out).sum(-1).tolist() == [1, 2, 3]


def test_repetition_penalty_equals_transformers():
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, generator=g)
    seen_ids = torch.randint(50, (2, 12), generator=g)
    seen = torch.zeros(2, 50, dtype=torch.bool).scatter(1, seen_ids, True)
    ours = apply_repetition_penalty(logits, seen, torch.tensor([[1.3], [1.3]]))
    ref = transformers.RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, logits.clone())
    assert torch.allclose(ours, ref)


def test_same_seed_gives_the_same_samples(model, tok):
    prompts = prompts_of_lengths(tok, [4, 6])
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_p=0.95)
    a = generate(model, tok, prompts, seed=123, **kwargs)
    b = generate(model, tok, prompts, seed=123, **kwargs)
    c = generate(model, tok, prompts, seed=124, **kwargs)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_a_rows_samples_do_not_depend_on_its_batch(model, tok):
    prompts = prompts_of_lengths(tok, [4, 6, 3])
    params = [SamplingParams(max_new_tokens=10, temperature=1.0, seed=s) for s in (5, 6, 7)]
    batch = generate_rows(model, tok, prompts, params)
    alone = generate_rows(model, tok, prompts[1:2], params[1:2])
    assert batch[1].token_ids == alone[0].token_ids


def test_stop_string_cuts_the_text_exactly(model, tok):
    prompt = prompts_of_lengths(tok, [5], seed=3)
    full = generate(model, tok, prompt, max_new_tokens=30, temperature=1.0, seed=0)[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    pieces = []
    cut = generate(model, tok, prompt, max_new_tokens=30, temperature=1.0, seed=0, stop=[stop],
                   stream=lambda row, text: pieces.append(text))[0]  # fmt: skip
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == "stop"
    assert "".join(pieces) == cut.text
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]


def test_stop_token_id_ends_the_row_and_stays_out_of_the_text(model, tok):
    prompt = prompts_of_lengths(tok, [5], seed=3)
    full = generate(model, tok, prompt, max_new_tokens=12)[0]
    stop_id = full.token_ids[4]
    cut = generate(model, tok, prompt, max_new_tokens=12, stop=[stop_id])[0]
    n = full.token_ids.index(stop_id) + 1
    assert cut.token_ids == full.token_ids[:n]
    assert cut.finish_reason == "stop"
    assert cut.text == tok.decode(full.token_ids[: n - 1])


def test_finish_reason_and_counts(model, tok):
    prompts = prompts_of_lengths(tok, [3, 5])
    out = generate(model, tok, prompts, max_new_tokens=6)
    for prompt, c in zip(prompts, out):
        assert c.prompt_tokens == len(prompt)
        assert c.completion_tokens == len(c.token_ids) <= 6
        ended_on_stop = c.token_ids[-1] in tok.stop_token_ids
        assert c.finish_reason == ("stop" if ended_on_stop else "length")
        assert ended_on_stop or c.completion_tokens == 6


def test_streamed_pieces_add_up_to_each_rows_text(model, tok):
    prompts = prompts_of_lengths(tok, [3, 9, 4])
    streamed, finished = ["", "", ""], {}
    out = generate(model, tok, prompts, max_new_tokens=15, temperature=1.0, seed=1,
                   stream=lambda row, text: streamed.__setitem__(row, streamed[row] + text),
                   on_finish=finished.__setitem__)  # fmt: skip
    assert streamed == [c.text for c in out]
    assert [finished[i] for i in range(3)] == out


def test_text_prompts_and_chat_rendering(model, tok):
    messages = [{"role": "user", "content": "What is NaCl?"}]
    text = render_chat(tok, messages)
    assert text.endswith("<|im_start|>assistant\n")
    by_text = generate(model, tok, [text], max_new_tokens=5)[0]
    by_ids = generate(model, tok, [tok.encode(text)], max_new_tokens=5)[0]
    assert by_text == by_ids


def test_invalid_settings_raise_value_error():
    for bad in (dict(max_new_tokens=0), dict(top_p=0.0), dict(temperature=-1.0), dict(stop=("",))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


@pytest.mark.slow
def test_greedy_on_smollm2_equals_transformers(smollm2_dir):
    transformers = pytest.importorskip("transformers")
    from minidpo.checkpoint import load_model
    from minidpo.tokenizer import load_tokenizer

    model, _ = load_model(smollm2_dir)
    tok = load_tokenizer(smollm2_dir)
    questions = ["What is the boiling point of water?", "Name one noble gas."]
    prompts = [tok.encode(render_chat(tok, [{"role": "user", "content": q}])) for q in questions]
    ours = generate(model, tok, prompts, max_new_tokens=16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for prompt, completion in zip(prompts, ours):
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                          eos_token_id=sorted(tok.stop_token_ids), pad_token_id=tok.pad_token_id)  # fmt: skip
        assert completion.token_ids == out[0, len(prompt) :].tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_decode_equals_eager_on_cuda(tok):
    model = tiny_model(tok.vocab_size, seed=2).cuda()
    prompts = prompts_of_lengths(tok, [3, 11, 7])
    eager = generate(model, tok, prompts, max_new_tokens=16)
    compiled = generate(model, tok, prompts, max_new_tokens=16, compile=True)
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]


def test_kept_tokens_are_renormalised():
    # The nucleus of PROBS at p = 0.6 has mass 0.7: its tokens become 5/7 and 2/7.
    probs = filter_logits(PROBS.log(), torch.tensor([0]), torch.tensor([0.6]), torch.tensor([0.0])).softmax(-1)
    assert math.isclose(probs[0, 1].item(), 5 / 7, rel_tol=1e-6)
    assert math.isclose(probs[0, 3].item(), 2 / 7, rel_tol=1e-6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("model"))


def test_generate_command_prints_the_greedy_completion(model_dir, capsys):
    from minidpo.checkpoint import load_model
    from minidpo.cli import main
    from minidpo.tokenizer import load_tokenizer

    model, _ = load_model(model_dir)
    tok = load_tokenizer(model_dir, chat_format="chatml")
    prompt = render_chat(tok, [{"role": "user", "content": "Hello"}])
    expected = generate(model, tok, [prompt], max_new_tokens=6, stop=tok.chat_format.stop_strings)[0]
    args = ["generate", "--model", str(model_dir), "--chat-format", "chatml", "--prompt", "Hello", "--max-new-tokens", "6"]
    assert main(args) == 0
    assert capsys.readouterr().out == expected.text + "\n"


def test_chat_command_keeps_the_conversation_until_reset(model_dir, monkeypatch, capsys):
    import io

    import minidpo.sampler
    from minidpo.cli import main
    from minidpo.tokenizer import load_tokenizer

    prompts = []
    real_generate = minidpo.sampler.generate

    def recording_generate(model, tok, batch, **kwargs):
        prompts.append(batch[0])
        return real_generate(model, tok, batch, **kwargs)

    monkeypatch.setattr(minidpo.sampler, "generate", recording_generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAgain\n/reset\nThird\n"))
    args = ["chat", "--model", str(model_dir), "--chat-format", "chatml", "--temperature", "0", "--max-new-tokens", "4"]
    assert main(args) == 0  # ends at end of input (Ctrl-D)
    tok = load_tokenizer(model_dir, chat_format="chatml")
    first, second, third = (tok.decode(p, skip_special_tokens=False) for p in prompts)
    assert second.startswith(first) and "Again" in second
    assert third == render_chat(tok, [{"role": "user", "content": "Third"}])
    assert capsys.readouterr().out.count("> ") == 5


def test_generate_leaves_the_models_training_mode_as_it_was(model, tok):
    model.train()
    generate(model, tok, prompts_of_lengths(tok, [3]), max_new_tokens=2)
    assert model.training
    model.eval()


def test_a_bare_prompt_instead_of_a_list_is_refused(model, tok):
    for bare in ("Hello", [5, 6, 7]):
        with pytest.raises(TypeError, match="wrap a single prompt in a list"):
            generate(model, tok, bare, max_new_tokens=2)


def test_drawn_tokens_follow_the_distribution_and_skip_zero_probabilities():
    # p = 0.10 0 0.50 0.05 0 0.20 0.15 0: 20000 draws, one row each, from a seeded generator
    p = torch.tensor([0.10, 0.0, 0.50, 0.05, 0.0, 0.20, 0.15, 0.0])
    g = torch.Generator().manual_seed(0)
    n = 20000
    tokens, bad = draw_tokens(p.expand(n, -1), [g] * n)
    assert not bad.any()
    freq = torch.bincount(tokens, minlength=8).double() / n
    assert freq[1] == 0 and freq[4] == 0 and freq[7] == 0
    sigma = (p.double() * (1 - p.double()) / n).sqrt()
    assert ((freq - p.double()).abs() <= 5 * sigma + 1e-12).all(), freq


def test_drawing_from_unnormalised_or_broken_rows():
    g = torch.Generator().manual_seed(1)
    probs = torch.tensor([[0.0, 0.0, 2.0], [float("nan"), 0.5, 0.5], [0.0, 0.0, 0.0]])
    tokens, bad = draw_tokens(probs, [g, g, g])
    assert tokens[0] == 2  # the only token with mass
    assert bad.tolist() == [False, True, True]
    assert tokens[1:].tolist() == [0, 0]



def test_draws_across_blocks_and_a_partial_last_block():
    # V = 700: two full blocks of 256 and a partial one; a third of the tokens without mass
    g = torch.Generator().manual_seed(2)
    p = torch.rand(700, generator=g) ** 4
    p[torch.randperm(700, generator=g)[:230]] = 0
    p[-1] = 0.05  # the very last token has mass
    p = p / p.sum()
    n = 60000
    tokens, bad = draw_tokens(p.expand(n, -1), [g] * n)
    assert not bad.any()
    freq = torch.bincount(tokens, minlength=700).double() / n
    assert (freq[p == 0] == 0).all()
    sigma = (p.double() * (1 - p.double()) / n).sqrt()
    assert ((freq - p.double()).abs() <= 5 * sigma + 1 / n).all()
    blocks = [slice(0, 256), slice(256, 512), slice(512, 700)]
    for b in blocks:  # the mass per block, where rounding would show first
        assert abs(freq[b].sum() - p[b].double().sum()) < 5 * (0.25 / n) ** 0.5
