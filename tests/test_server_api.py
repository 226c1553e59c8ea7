"""The vLLM-style API (issue 19), through the official `openai` client against the real server:
/v1/completions, logprobs, n, seed, min_tokens, ignore_eos, guided decoding, continuous batching."""

import json
import threading
import time

import pytest
import torch

from minidpo.guided import JsonConstraint, TokenTexts
from minidpo.sampler import SamplingParams, generate, generate_rows, render_chat
from minidpo.server import serve_in_thread

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "Is water wet?"}]
FIXED = {"ignore_eos": True}  # the tiny random model then always writes max_tokens tokens


@pytest.fixture(scope="module")
def server(model, tok):
    with serve_in_thread(model, tok, model_name="tiny", max_batch_size=8, max_total_tokens=512) as server:
        yield server


@pytest.fixture(scope="module")
def api(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def chat_ids(tok, messages=MESSAGES) -> list[int]:
    return tok.encode(render_chat(tok, messages))


def test_completions_equal_the_sampler_on_the_raw_prompt(api, model, tok):
    reply = api.completions.create(model="tiny", prompt="Question: what is salt?\n\nAnswer:", max_tokens=8,
                                   temperature=0)  # fmt: skip
    expected = generate(model, tok, ["Question: what is salt?\n\nAnswer:"], max_new_tokens=8)[0]
    assert reply.object == "text_completion"
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.completion_tokens == expected.completion_tokens


def test_completions_take_a_list_of_prompts_and_stream_the_same_text(api):
    prompts = ["The sky is", "Salt is made of"]
    whole = api.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0, extra_body=FIXED)
    assert [c.index for c in whole.choices] == [0, 1]
    alone = [api.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0, extra_body=FIXED) for p in prompts]
    assert [c.text for c in whole.choices] == [a.choices[0].text for a in alone]
    streamed = ["", ""]
    for chunk in api.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0, stream=True,
                                        extra_body=FIXED):  # fmt: skip
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == [c.text for c in whole.choices]


def test_completions_refuse_echo(api):
    with pytest.raises(openai.BadRequestError, match="echo"):
        api.completions.create(model="tiny", prompt="hi", max_tokens=2, echo=True)


def recomputed_logprobs(model, prompt_ids, token_ids) -> torch.Tensor:
    """log_softmax of the model's logits over prompt + reply, float64: (reply tokens, V)."""
    with torch.no_grad():
        hidden = model(torch.tensor([prompt_ids + token_ids]))  # (1, T, D)
        logits = model.lm_head(hidden).double()[0, len(prompt_ids) - 1 : -1]  # (n, V)
    return logits.log_softmax(-1)


def test_chat_logprobs_equal_log_softmax_of_a_recompute(api, model, tok):
    reply = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0.8, seed=11,
                                        logprobs=True, top_logprobs=3, extra_body=FIXED)  # fmt: skip
    params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=11, ignore_eos=True)
    token_ids = generate_rows(model, tok, [chat_ids(tok)], [params])[0].token_ids
    logp = recomputed_logprobs(model, chat_ids(tok), token_ids)
    content = reply.choices[0].logprobs.content
    assert len(content) == len(token_ids) == 6
    for entry, token_id, row in zip(content, token_ids, logp):
        assert entry.token == tok.decode([token_id], skip_special_tokens=False)
        assert entry.logprob == pytest.approx(float(row[token_id]), abs=1e-4)
        top = row.topk(3)
        assert [e.token for e in entry.top_logprobs] == [tok.decode([i], skip_special_tokens=False) for i in top.indices]
        assert [e.logprob for e in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_completion_logprobs_k(api, model, tok):
    prompt = "Water boils at"
    reply = api.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=2,
                                   extra_body=FIXED)  # fmt: skip
    lp = reply.choices[0].logprobs
    token_ids = generate_rows(model, tok, [prompt], [SamplingParams(max_new_tokens=4, ignore_eos=True)])[0].token_ids
    logp = recomputed_logprobs(model, tok.encode(prompt), token_ids)
    assert lp.token_logprobs == pytest.approx([float(row[t]) for row, t in zip(logp, token_ids)], abs=1e-4)
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == reply.choices[0].text


def test_n_samples_are_independent_and_choice_i_uses_seed_plus_i(api):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.0, extra_body=FIXED)
    three = api.chat.completions.create(n=3, seed=5, **kwargs)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.usage.completion_tokens == 24
    singles = [api.chat.completions.create(seed=5 + i, **kwargs).choices[0].message.content for i in range(3)]
    assert [c.message.content for c in three.choices] == singles
    assert len(set(singles)) > 1


def test_seed_reproduces_completions(api):
    kwargs = dict(model="tiny", prompt="Acids are", max_tokens=8, temperature=1.0, seed=9)
    assert api.completions.create(**kwargs).choices[0].text == api.completions.create(**kwargs).choices[0].text


def test_min_tokens_and_ignore_eos_give_fixed_lengths(api, tok):
    eos = tok.decode([tok.eos_token_id], skip_special_tokens=False)
    for extra in ({"min_tokens": 12}, {"ignore_eos": True}):
        reply = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=1.0, seed=2,
                                            stop=[eos], extra_body=extra)  # fmt: skip
        assert reply.usage.completion_tokens == 12, extra
        assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize("temperature", [0, 1.0, 2.0])
def test_guided_choice_answers_one_of_the_choices(api, temperature):
    for seed in range(3):
        reply = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=temperature,
                                            seed=seed, extra_body={"guided_choice": ["yes", "no", "not sure"]})  # fmt: skip
        assert reply.choices[0].message.content in ("yes", "no", "not sure")
        assert reply.choices[0].finish_reason == "stop"


def test_json_object_output_is_json_so_far(api, tok):
    constraint = JsonConstraint(TokenTexts(tok))
    for seed in range(3):
        reply = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=1.0, seed=seed,
                                            response_format={"type": "json_object"})  # fmt: skip
        content = reply.choices[0].message.content
        assert content.startswith("{") and constraint.read(content) is not None, content
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(content), dict)


def test_json_schema_output_parses_and_matches_the_schema(api):
    schema = {"type": "object", "properties": {"safe": {"type": "boolean"}, "label": {"enum": ["acid", "base"]},
                                               "note": {"type": "null"}}}  # fmt: skip
    for seed in range(3):
        reply = api.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=80, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}},
        )  # fmt: skip
        value = json.loads(reply.choices[0].message.content)
        assert list(value) == ["safe", "label", "note"]
        assert isinstance(value["safe"], bool) and value["label"] in ("acid", "base") and value["note"] is None


def test_an_unsupported_schema_gets_400(api):
    schema = {"type": "object", "properties": {"items": {"type": "array"}}}
    with pytest.raises(openai.BadRequestError, match="array"):
        api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4,
                                    response_format={"type": "json_schema", "json_schema": {"schema": schema}})  # fmt: skip


def test_a_request_joins_the_running_batch_and_equals_running_alone(server, api):
    """A short request sent while a long one decodes finishes first, token-identical to alone;
    its stream works although it joined mid-batch."""
    question = [{"role": "user", "content": "Name a salt."}]
    alone = api.chat.completions.create(model="tiny", messages=question, max_tokens=6, temperature=0, extra_body=FIXED)
    steps = server.worker.steps
    finished = {}

    def long_request():
        api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=400, temperature=0, extra_body=FIXED)
        finished["long"] = time.monotonic()

    thread = threading.Thread(target=long_request)
    thread.start()
    while server.worker.steps < steps + 5:  # the long request is decoding
        time.sleep(0.005)
    chunks = list(api.chat.completions.create(model="tiny", messages=question, max_tokens=6, temperature=0,
                                              stream=True, extra_body=FIXED))  # fmt: skip
    finished["short"] = time.monotonic()
    thread.join(60)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == alone.choices[0].message.content
    assert finished["short"] < finished["long"]
    assert max(server.worker.batch_sizes) >= 2


def test_the_judge_gets_a_guided_yes_or_no_from_minidpo_serve(server):
    from minidpo.eval.judge import LLMJudge
    from minidpo.gen.client import ChatClient

    judge = LLMJudge(ChatClient(server.url, "tiny"), max_reasks=0, max_tokens=5)
    verdicts = [judge.describes_a_way(f"How is salt {i} made?", "By evaporation.") for i in range(3)]
    assert all(v.label in ("yes", "no") and v.replies[0] in ("Yes", "No") for v in verdicts)
    assert judge.grade("How is salt made?", "By evaporation.").label in ("1", "2", "3", "4", "5")


def test_the_judge_asks_without_guided_choice_once_an_endpoint_refuses_it():
    from fake_openai import FakeOpenAI, Reply, Status
    from minidpo.eval.judge import LLMJudge
    from minidpo.gen.client import ChatClient

    refusal = '{"error": {"message": "Unrecognized request argument supplied: guided_choice"}}'
    with FakeOpenAI() as fake:
        fake.script(Status(400, body=refusal), Reply("No"), Reply("Yes"))
        judge = LLMJudge(ChatClient(fake.url, "judge", sleep=lambda s: None))
        assert judge.describes_a_way("q", "a").label == "no"
        assert judge.describes_a_way("q", "a").label == "yes"
    assert [("guided_choice" in body) for body in fake.requests] == [True, False, False]
    assert fake.requests[0]["guided_choice"] == ["Yes", "No"]


def test_streamed_logprobs_come_whole_with_the_last_chunk(api):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
                  extra_body=FIXED)  # fmt: skip
    whole = api.chat.completions.create(**kwargs).choices[0].logprobs.content
    chunks = [c for c in api.chat.completions.create(stream=True, **kwargs) if c.choices]
    streamed = [entry for c in chunks if c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole]
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].choices[0].logprobs is not None


def test_static_batching_makes_a_newcomer_wait_for_the_running_batch(model, tok):
    """The benchmark's baseline (--static-batching): the short request sent while a long one
    decodes is admitted only once the long one has ended, and gives the same text."""
    question = [{"role": "user", "content": "Name a salt."}]
    with serve_in_thread(model, tok, model_name="tiny", max_batch_size=8, static_batching=True) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
        alone = client.chat.completions.create(model="tiny", messages=question, max_tokens=6, temperature=0,
                                               extra_body=FIXED)  # fmt: skip
        steps = server.worker.steps

        def long_request():
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60, temperature=0,
                                           extra_body=FIXED)  # fmt: skip

        thread = threading.Thread(target=long_request)
        thread.start()
        while server.worker.steps < steps + 5:  # the long request is decoding
            time.sleep(0.005)
        short = client.chat.completions.create(model="tiny", messages=question, max_tokens=6, temperature=0,
                                               extra_body=FIXED)  # fmt: skip
        steps_taken = server.worker.steps - steps
        thread.join(60)
    assert short.choices[0].message.content == alone.choices[0].message.content
    assert steps_taken >= 60 + 6  # one after the other: continuous batching would take 60
    assert max(server.worker.batch_sizes) == 1
