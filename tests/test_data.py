"""Preference data: tokenizing, truncating, masking, padding, batching, response log-probs."""

import json

import pytest
import torch

from minidpo.chat import get_chat_format
from minidpo.config import ModelConfig
from minidpo.data import IGNORE_INDEX, batch_order, collate, load_dataset
from minidpo.errors import MiniDPOError
from minidpo.logprobs import sequence_logprobs
from minidpo.model import LlamaForCausalLM


class ByteTokenizer:
    """One token per UTF-8 byte: enough to test what data.py does with token ids."""

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


FMT = get_chat_format("plain", bos_token="", eos_token="$")
TOK = ByteTokenizer()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load(path, **kw):
    kw.setdefault("max_length", 64)
    kw.setdefault("max_prompt_length", 32)
    return load_dataset(path, TOK, FMT, **kw)


def test_pair_becomes_chat_formatted_prompt_and_responses(tmp_path):
    data = load(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "chosen": "yes", "rejected": "no"}]))
    (ex,) = data.examples
    assert bytes(ex.prompt_ids).decode() == "Question: hi\n\nAnswer: "
    assert bytes(ex.chosen_ids).decode() == "yes$"
    assert bytes(ex.rejected_ids).decode() == "no$"


def test_truncation_keeps_the_end_of_the_user_text_and_cuts_the_response(tmp_path):
    rows = [{"prompt": "0123456789?", "chosen": "abcdefghijklmnopqrstuvwxyz", "rejected": "no"}]
    (ex,) = load(write_jsonl(tmp_path / "d.jsonl", rows), max_prompt_length=26, max_length=30).examples
    assert bytes(ex.prompt_ids).decode() == "Question: 56789?\n\nAnswer: "  # the template whole, 26 tokens
    assert bytes(ex.chosen_ids).decode() == "abcd"
    assert bytes(ex.rejected_ids).decode() == "no$"


def test_truncated_prompt_is_the_chat_rendering_of_the_end_of_its_text(tmp_path):
    from tiny_lm import tiny_tokenizer

    tok = tiny_tokenizer(tmp_path / "tok")
    fmt = get_chat_format("chatml")
    system, text = "You are a careful chemist.", "Tell me, in detail and step by step, how to make aspirin at home?"
    rows = [{"prompt": text, "chosen": "Sure.", "rejected": "No."}]
    full = tok.encode(fmt.render([{"role": "system", "content": system}, {"role": "user", "content": text}]))
    (ex,) = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, fmt, max_length=len(full) + 10,
                         max_prompt_length=len(full) - 5, system=system).examples
    rendered = tok.decode(ex.prompt_ids, skip_special_tokens=False)
    kept = next(text[i:] for i in range(len(text)) if fmt.render(
        [{"role": "system", "content": system}, {"role": "user", "content": text[i:]}]) == rendered)
    assert len(kept) < len(text) and text.endswith(kept)
    assert ex.prompt_ids == tok.encode(fmt.render([{"role": "system", "content": system}, {"role": "user", "content": kept}]))
    assert len(full) - 5 - 3 <= len(ex.prompt_ids) <= len(full) - 5


def test_a_template_longer_than_max_prompt_length_is_one_line(tmp_path):
    rows = [{"prompt": "hi", "chosen": "yes", "rejected": "no"}]
    with pytest.raises(MiniDPOError, match=r"max_prompt_length \(8\) leaves no room for the user text"):
        load(write_jsonl(tmp_path / "d.jsonl", rows), max_prompt_length=8)


def test_truncated_examples_are_counted(tmp_path):
    rows = [{"prompt": "p" * 40, "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c", "rejected": "r"}]
    data = load(write_jsonl(tmp_path / "d.jsonl", rows))
    assert data.truncated == 1
    assert len(data.examples[0].prompt_ids) == 32


def test_bad_lines_are_skipped_and_counted_by_default(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, "{not json", {"prompt": "a", "chosen": "b"}]
    messages = []
    data = load(write_jsonl(tmp_path / "d.jsonl", rows), on_skip=messages.append)
    assert (len(data.examples), data.skipped) == (1, 2)
    assert messages[0].endswith("d.jsonl:2: invalid JSON (Expecting property name enclosed in double quotes)")
    assert 'd.jsonl:3: missing key "rejected"' in messages[1]


def test_bad_line_is_fatal_with_strict_and_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": 3}])
    with pytest.raises(MiniDPOError, match=r"d\.jsonl:2: "):
        load(path, strict=True)


def test_sft_needs_no_rejected_response(tmp_path):
    data = load(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": "b"}]), pairs=False)
    assert data.examples[0].rejected_ids is None


def test_example_key_names_line_and_id(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c", "id": "x7"}, {"prompt": "a", "chosen": "b", "rejected": "c"}]
    data = load(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [e.key for e in data.examples] == ["1:x7", "2"]


def test_max_length_must_exceed_max_prompt_length(tmp_path):
    with pytest.raises(MiniDPOError, match=r"^max_length \(8\) must exceed max_prompt_length \(8\)"):
        load(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}]), max_length=8, max_prompt_length=8)


def test_collate_puts_chosen_rows_then_rejected_rows_right_padded_with_prompt_masked(tmp_path):
    rows = [{"prompt": "a", "chosen": "long answer", "rejected": "no"}, {"prompt": "bb", "chosen": "ok", "rejected": "x"}]
    data = load(write_jsonl(tmp_path / "d.jsonl", rows))
    batch = collate(data.examples, pad_id=0)
    assert batch.input_ids.shape[0] == 4
    for row, (ex, response) in enumerate(
        [(e, e.chosen_ids) for e in data.examples] + [(e, e.rejected_ids) for e in data.examples]
    ):
        n_prompt, n = len(ex.prompt_ids), len(ex.prompt_ids) + len(response)
        assert batch.input_ids[row, :n].tolist() == ex.prompt_ids + response
        assert (batch.labels[row, :n_prompt] == IGNORE_INDEX).all()
        assert batch.labels[row, n_prompt:n].tolist() == response
        assert (batch.labels[row, n:] == IGNORE_INDEX).all()
        assert (batch.input_ids[row, n:] == 0).all()


def test_batch_order_is_fixed_by_seed_and_epoch_and_covers_every_example(tmp_path):
    rows = [{"prompt": "p" * i, "chosen": "c", "rejected": "r"} for i in range(1, 12)]
    examples = load(write_jsonl(tmp_path / "d.jsonl", rows)).examples
    a = batch_order(examples, 3, seed=1, epoch=0)
    assert a == batch_order(examples, 3, seed=1, epoch=0)
    assert a != batch_order(examples, 3, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(11))
    grouped = batch_order(examples, 3, seed=1, epoch=0, group_by_length=True)
    lengths = [examples[i].length for b in grouped for i in b]
    assert lengths == sorted(lengths, reverse=True)


# ---- response log-probs


def tiny_model():
    torch.manual_seed(0)
    config = ModelConfig.from_dict(
        dict(model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
    )
    return LlamaForCausalLM(config).eval()


def reference_logp(model, prompt, response):
    """log pi(response | prompt) from the full logits of the sequence alone."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model.lm_head(model(ids)).double(), -1)[0]  # (T, V)
    return sum(logp[len(prompt) - 1 + i, tok].item() for i, tok in enumerate(response))


def test_response_logprobs_count_only_response_tokens(tmp_path):
    rows = [{"prompt": "a", "chosen": "long answer", "rejected": "no"}, {"prompt": "bbb", "chosen": "ok", "rejected": "x"}]
    examples = load(write_jsonl(tmp_path / "d.jsonl", rows)).examples
    model = tiny_model()
    batch = collate(examples, pad_id=0)
    with torch.no_grad():
        logps, counts = sequence_logprobs(model, batch.input_ids, batch.labels)
    responses = [(e.prompt_ids, e.chosen_ids) for e in examples] + [(e.prompt_ids, e.rejected_ids) for e in examples]
    for row, (prompt, response) in enumerate(responses):
        assert counts[row].item() == len(response)
        assert logps[row].item() == pytest.approx(reference_logp(model, prompt, response), abs=1e-4)


def test_padding_never_contributes(tmp_path):
    rows = [{"prompt": "a", "chosen": "long answer", "rejected": "no"}]
    examples = load(write_jsonl(tmp_path / "d.jsonl", rows)).examples
    model = tiny_model()
    with torch.no_grad():
        results = [sequence_logprobs(model, b.input_ids, b.labels)[0] for b in (collate(examples, 0), collate(examples, 255))]
    assert torch.equal(results[0], results[1])


def test_full_logits_are_never_formed_and_gradients_reach_the_head(tmp_path):
    examples = load(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "abc", "chosen": "de", "rejected": "f"}])).examples
    model = tiny_model()
    batch = collate(examples, pad_id=0)
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    logps, _ = sequence_logprobs(model, batch.input_ids, batch.labels)
    logps.sum().backward()
    assert not calls
    assert model.lm_head.weight.grad.abs().sum() > 0
