"""minidpo.tokenizer: parity with transformers, special tokens from the config files, streaming, errors."""

import json

import pytest
import sentencepiece as spm
from tokenizer_helpers import (
    CORPUS,
    hf_fast_tokenizer,
    write_bpe_folder,
    write_sentencepiece_folder,
)

from minidpo.errors import MiniDPOError
from minidpo.tokenizer import load_tokenizer

SMOLLM2_TOKENS = dict(
    bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>", pad_token="<|im_end|>"
)
PARITY_TEXTS = [
    *CORPUS,
    "2,4,6-trinitrotoluene C7H5N3O6 at 1234567890 K; 0.000001 mol; 10^23 atoms",
    "O=C(C)Oc1ccccc1C(=O)O >> [13CH3][N+](=O)[O-] @@ /\\ %10",
    "<|im_start|>system\nYou are SmolLM.<|im_end|>\n<|im_start|>user\nHi 👋🏽<|im_end|>\n<|im_start|>assistant\n",
    "  leading and trailing spaces  \n\n\ttabs\r\nand CRLF  ",
    "zero-width\u200bjoiner \u2028 line sep; combining e\u0301; RTL \u05e9\u05dc\u05d5\u05dd",
    "for i in range(10):\n\tprint(f'{i:03d}')  # comment <|endoftext|>",
    "",
]


def test_encode_and_decode_equal_transformers_on_varied_corpus(bpe, tmp_path):
    hf = hf_fast_tokenizer(bpe, **SMOLLM2_TOKENS)
    tok = load_tokenizer(write_bpe_folder(tmp_path, bpe, **SMOLLM2_TOKENS))
    for text in PARITY_TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False) == text


def test_special_token_strings_in_text_are_parsed_as_single_ids(bpe, tmp_path):
    tok = load_tokenizer(write_bpe_folder(tmp_path, bpe, **SMOLLM2_TOKENS))
    ids = tok.encode("a<|im_start|>b<|im_end|>")
    assert tok.token_to_id("<|im_start|>") in ids and tok.token_to_id("<|im_end|>") == ids[-1]
    assert tok.decode(ids) == "ab"


def test_special_token_ids_come_from_tokenizer_config(bpe, tmp_path):
    tok = load_tokenizer(write_bpe_folder(tmp_path, bpe, **SMOLLM2_TOKENS))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        bpe.token_to_id("<|im_start|>"),
        bpe.token_to_id("<|im_end|>"),
        bpe.token_to_id("<|im_end|>"),
    )
    assert tok.unk_token_id == bpe.token_to_id("<|endoftext|>")
    assert tok.vocab_size == bpe.get_vocab_size() and tok.id_to_token(tok.eos_token_id) == "<|im_end|>"
    assert tok.token_to_id("no-such-token-here") is None


def test_pad_token_falls_back_to_eos(bpe, tmp_path):
    tok = load_tokenizer(write_bpe_folder(tmp_path, bpe, eos_token="</s>"))
    assert tok.pad_token_id == tok.eos_token_id == bpe.token_to_id("</s>")


def test_special_tokens_map_and_generation_config_fill_in(bpe, tmp_path):
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<|begin_of_text|>"}})
    )
    eot, end = bpe.token_to_id("<|eot_id|>"), bpe.token_to_id("<|end_of_text|>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot, end]}))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.bos_token_id == bpe.token_to_id("<|begin_of_text|>")
    assert tok.eos_token_id == eot and {eot, end} <= tok.stop_token_ids


def test_stop_token_ids_are_eos_and_end_of_turn_tokens(bpe, tmp_path):
    tok = load_tokenizer(write_bpe_folder(tmp_path, bpe, eos_token="</s>"))
    names = ["</s>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>"]
    assert tok.stop_token_ids == {bpe.token_to_id(t) for t in names}


def test_encode_never_adds_bos_even_when_the_tokenizer_would(bpe, tmp_path):
    from tokenizers import processors

    bos = bpe.token_to_id("<|begin_of_text|>")
    with_bos = type(bpe).from_str(bpe.to_str())
    with_bos.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tok = load_tokenizer(
        write_bpe_folder(tmp_path, with_bos, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    )
    assert tok.encode("Hello")[0] != bos
    assert tok.add_bos_token  # the post-processor adds it to plain text, which the plain chat format follows


def test_chat_format_is_detected_from_the_template_and_overridable(bpe, tmp_path):
    template = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
    folder = write_bpe_folder(tmp_path, bpe, chat_template=template, **SMOLLM2_TOKENS)
    assert load_tokenizer(folder).chat_format.name == "chatml"
    assert load_tokenizer(folder, chat_format="plain").chat_format.name == "plain"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_format": "llama3"}))
    assert load_tokenizer(folder).chat_format.name == "llama3"


def test_chat_template_in_named_list_form_is_read(bpe, tmp_path):
    bpe.save(str(tmp_path / "tokenizer.json"))
    templates = [{"name": "tool_use", "template": "<|im_start|>"}, {"name": "default", "template": "[INST]"}]
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "</s>", "chat_template": templates})
    )
    assert load_tokenizer(tmp_path).chat_format.name == "mistral"


def test_sentencepiece_encodes_text_between_specials_like_sentencepiece(sp_model, tmp_path):
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    tok = load_tokenizer(write_sentencepiece_folder(tmp_path, sp_model))
    text = "The boiling point of water is 100 °C, 日本語 🧪."
    assert tok.encode(f"<s>{text}</s>") == [1, *sp.encode(text), 2]
    assert tok.decode(tok.encode(f"<s>{text}</s>")) == text
    assert tok.decode([1, *sp.encode(text), 2], skip_special_tokens=False) == f"<s>{text}</s>"
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, 2)
    assert tok.vocab_size == sp.get_piece_size() and tok.id_to_token(1) == "<s>"
    assert tok.chat_format.name == "plain" and tok.add_bos_token


def test_sentencepiece_added_tokens_past_the_vocabulary(sp_model, tmp_path):
    added = {"500": {"content": "<pad>", "special": True}, "501": {"content": "<tool>", "special": False}}
    folder = write_sentencepiece_folder(
        tmp_path, sp_model, {"pad_token": "<pad>", "added_tokens_decoder": added}
    )
    tok = load_tokenizer(folder)
    assert tok.pad_token_id == 500 and tok.vocab_size == 502
    assert tok.encode("<pad><tool>") == [500, 501]
    assert tok.decode([500, 501]) == "<tool>" and tok.token_to_id("<tool>") == 501


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_stream_decoder_yields_only_whole_characters(kind, bpe, sp_model, tmp_path):
    if kind == "bpe":
        tok = load_tokenizer(write_bpe_folder(tmp_path, bpe, **SMOLLM2_TOKENS))
    else:
        tok = load_tokenizer(write_sentencepiece_folder(tmp_path, sp_model))
    text = "Hello 中文 🦀 Straße, NaCl 58.44 g/mol"  # characters outside the training corpus
    ids = tok.encode(text)
    stream = tok.decode_stream()
    chunks = [stream.push(i) for i in ids]
    assert "" in chunks  # multi-byte characters were held back until complete
    assert not any("\ufffd" in c for c in chunks)
    assert "".join(chunks) + stream.flush() == tok.decode(ids) == text


def test_stream_decoder_flush_returns_the_incomplete_tail(sp_model, tmp_path):
    tok = load_tokenizer(write_sentencepiece_folder(tmp_path, sp_model))
    first_byte = tok.encode("🦀")[1]  # after the dummy-prefix piece: <0xF0>
    stream = tok.decode_stream()
    assert stream.push(tok.encode("a")[0]) == "a"
    assert stream.push(first_byte) == ""
    assert stream.flush() == "\ufffd"


def test_missing_tokenizer_files_name_the_folder(tmp_path):
    with pytest.raises(MiniDPOError, match=f"{tmp_path}: no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(MiniDPOError, match="no such tokenizer file or folder"):
        load_tokenizer(tmp_path / "absent")


def test_corrupt_tokenizer_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(MiniDPOError, match=r"tokenizer\.json: not a valid tokenizer\.json") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)


def test_corrupt_tokenizer_model_names_the_file(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00not a sentencepiece model")
    with pytest.raises(MiniDPOError, match=r"tokenizer\.model: not a valid SentencePiece") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)


def test_corrupt_tokenizer_config_names_the_file(bpe, tmp_path):
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>",')
    with pytest.raises(MiniDPOError, match=r"tokenizer_config\.json:1: invalid JSON"):
        load_tokenizer(tmp_path)


def test_special_token_missing_from_vocabulary_names_the_key(sp_model, tmp_path):
    folder = write_sentencepiece_folder(tmp_path, sp_model, {"pad_token": "<pad>"})
    with pytest.raises(MiniDPOError, match=r"pad_token '<pad>' is not in the tokenizer's vocabulary"):
        load_tokenizer(folder)
