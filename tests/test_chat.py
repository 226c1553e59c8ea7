"""minidpo.chat: renders equal the real Jinja chat templates; the prompt/response token boundary.

The template strings below are the published `chat_template`s of each model's
tokenizer_config.json (test oracles only; the library renders in code).
"""

import pytest
import sentencepiece as spm
from tokenizer_helpers import (
    hf_fast_tokenizer,
    write_sentencepiece_folder,
)

from minidpo.chat import (
    QWEN2_SYSTEM,
    SMOLLM2_SYSTEM,
    detect_chat_format,
    encode_prompt_response,
    get_chat_format,
)
from minidpo.errors import MiniDPOError
from minidpo.tokenizer import load_tokenizer

# HuggingFaceTB/SmolLM2-135M-Instruct
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen/Qwen2-7B-Instruct
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# meta-llama/Llama-2-7b-chat-hf
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# mistralai/Mistral-7B-Instruct-v0.2
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# model: (template, special tokens as in its tokenizer_config.json, detected format)
MODELS = {
    "smollm2": (SMOLLM2_TEMPLATE, dict(bos_token="<|im_start|>", eos_token="<|im_end|>"), "chatml"),
    "qwen2": (QWEN2_TEMPLATE, dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), "chatml"),
    "llama3": (LLAMA3_TEMPLATE, dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"), "llama3"),
    "llama2": (LLAMA2_TEMPLATE, dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"), "llama2"),
    "mistral": (MISTRAL_TEMPLATE, dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"), "mistral"),
}
SYSTEM = {"role": "system", "content": "You are a careful chemistry tutor."}
USER = {"role": "user", "content": "What is the boiling point of water?"}
ASSISTANT = {"role": "assistant", "content": "The boiling point of water is 100 °C at 1 atm."}
CONVERSATIONS = [
    [USER],
    [SYSTEM, USER],
    [USER, ASSISTANT],
    [SYSTEM, USER, ASSISTANT, {"role": "user", "content": "And of ethanol (CCO)?"}],
    [
        {"role": "user", "content": "  padded\tquestion \n"},
        {"role": "assistant", "content": "\n padded answer  "},
    ],
    [{"role": "user", "content": ""}],
]


def loaded(model, bpe, folder):
    """(transformers' tokenizer with the real template, ours loaded from what it saved)."""
    template, tokens, _ = MODELS[model]
    hf = hf_fast_tokenizer(bpe, chat_template=template, **tokens)
    hf.save_pretrained(folder)
    return hf, load_tokenizer(folder)


@pytest.mark.parametrize("model", MODELS)
def test_render_equals_apply_chat_template_with_the_real_template(model, bpe, tmp_path):
    hf, tok = loaded(model, bpe, tmp_path)
    assert tok.chat_format.name == MODELS[model][2]
    for messages in CONVERSATIONS:
        if model == "mistral" and messages[0]["role"] == "system":
            continue  # the v0.2 template rejects system messages
        for add_generation_prompt in (True, False):
            expected = hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert tok.chat_format.render(messages, add_generation_prompt) == expected, messages


def test_default_system_prompt_is_read_from_the_template():
    assert detect_chat_format(SMOLLM2_TEMPLATE).default_system == SMOLLM2_SYSTEM
    assert detect_chat_format(QWEN2_TEMPLATE).default_system == QWEN2_SYSTEM
    escaped = SMOLLM2_TEMPLATE.replace("system\nYou", "system\\nYou")  # the newline written as \n in Jinja
    assert detect_chat_format(escaped).default_system == SMOLLM2_SYSTEM
    generic = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>'}}{% endfor %}"
    assert detect_chat_format(generic).default_system is None


def test_detect_chat_format_by_marker_tokens():
    assert [detect_chat_format(t).name for t in (None, "", "{{ messages }}")] == ["plain"] * 3
    assert [detect_chat_format(MODELS[m][0]).name for m in MODELS] == [MODELS[m][2] for m in MODELS]


def test_presets_equal_the_detected_formats():
    assert get_chat_format("smollm2") == detect_chat_format(SMOLLM2_TEMPLATE)
    assert get_chat_format("qwen2") == detect_chat_format(QWEN2_TEMPLATE)
    with pytest.raises(MiniDPOError, match="unknown chat format 'vicuna'; choose one of chatml, llama3"):
        get_chat_format("vicuna")


def test_plain_format_is_the_reference_prompt():
    fmt = get_chat_format("plain", eos_token="</s>")
    assert fmt.render([USER]) == f"Question: {USER['content']}\n\nAnswer: "
    assert fmt.render([USER, ASSISTANT], add_generation_prompt=False) == (
        f"Question: {USER['content']}\n\nAnswer: {ASSISTANT['content']}</s>"
    )
    assert fmt.end_of_turn == "</s>" and "\n\nQuestion:" in fmt.stop_strings


def test_end_of_turn_and_stop_strings_per_format():
    ends = {name: get_chat_format(name).end_of_turn for name in ("chatml", "llama3", "llama2", "mistral")}
    assert ends == {"chatml": "<|im_end|>\n", "llama3": "<|eot_id|>", "llama2": " </s>", "mistral": "</s>"}
    assert get_chat_format("chatml").stop_strings == ("<|im_end|>",)


@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral", "plain"])
def test_assistant_turn_is_generation_prompt_plus_response_text(name):
    fmt = get_chat_format(name, eos_token="</s>")
    for reply in ("Table salt.", " spaced reply \n"):
        rendered = fmt.render([USER, {"role": "assistant", "content": reply}], add_generation_prompt=False)
        assert rendered == fmt.render([USER]) + fmt.response_text(reply)


@pytest.mark.parametrize("model", MODELS)
def test_prompt_ids_are_exactly_what_generation_starts_from(model, bpe, tmp_path):
    _, tok = loaded(model, bpe, tmp_path)
    fmt = tok.chat_format
    prompt_ids, response_ids = encode_prompt_response(tok, fmt, USER["content"], ASSISTANT["content"])
    assert prompt_ids == tok.encode(fmt.render([USER], add_generation_prompt=True))
    assert response_ids == tok.encode(fmt.response_text(ASSISTANT["content"]))
    first = (
        tok.token_to_id("<|im_start|>") if fmt.name == "chatml" else tok.bos_token_id
    )  # BOS once, if templated
    assert prompt_ids[0] == first and prompt_ids[1] != first
    if model != "llama2":  # Llama-2's space before the reply is SentencePiece's (next test)
        full = tok.decode(prompt_ids + response_ids, skip_special_tokens=False)
        assert full == fmt.render([USER, ASSISTANT], add_generation_prompt=False)


def test_chatml_split_encoding_equals_encoding_the_whole_conversation(bpe, tmp_path):
    _, tok = loaded("smollm2", bpe, tmp_path)
    for reply in ("The answer is 42.", " leading space", "\nnewline first", "CCO 日本 🧪", ""):
        prompt_ids, response_ids = encode_prompt_response(
            tok, tok.chat_format, "Hi?", reply, system="Be brief."
        )
        conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
        whole = tok.encode(
            tok.chat_format.render([*conversation, {"role": "assistant", "content": reply}], False)
        )
        assert prompt_ids + response_ids == whole, reply


def test_joint_tokenization_would_break_the_prompt_prefix(bpe, tmp_path):
    """TRL #2054: "Answer: " alone ends in a lone space token; joined with the reply it merges."""
    _, tok = loaded("smollm2", bpe, tmp_path)
    fmt = get_chat_format("plain")
    prompt_ids, response_ids = encode_prompt_response(tok, fmt, USER["content"], "The answer")
    joint = tok.encode(fmt.render([USER]) + "The answer")
    assert joint[: len(prompt_ids)] != prompt_ids
    assert tok.decode(joint) == tok.decode(prompt_ids + response_ids)


@pytest.mark.parametrize("system", [None, "Answer in one sentence."])
def test_llama2_ids_equal_meta_reference_tokenization(system, sp_model, tmp_path):
    """Meta's llama chat_completion: [BOS] + sp.encode("[INST] {q} [/INST] {a} ") + [EOS]."""
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    tok = load_tokenizer(write_sentencepiece_folder(tmp_path, sp_model, {"chat_template": LLAMA2_TEMPLATE}))
    question, answer = "What is NaCl?", " Table salt. "
    prompt_ids, response_ids = encode_prompt_response(tok, tok.chat_format, question, answer, system=system)
    user = question if system is None else f"<<SYS>>\n{system}\n<</SYS>>\n\n{question}"
    assert prompt_ids == [1, *sp.encode(f"[INST] {user} [/INST]")]
    assert prompt_ids + response_ids == [1, *sp.encode(f"[INST] {user} [/INST] {answer.strip()} "), 2]


def test_bad_conversations_raise_one_line_errors():
    chatml = get_chat_format("chatml")
    with pytest.raises(MiniDPOError, match="non-empty list"):
        chatml.render([])
    with pytest.raises(MiniDPOError, match="message 0: expected"):
        chatml.render([{"role": "tool", "content": "x"}])
    with pytest.raises(MiniDPOError, match="message 1: expected"):
        chatml.render([USER, {"role": "assistant", "content": None}])
    with pytest.raises(MiniDPOError, match="message 1: a system message may only come first"):
        chatml.render([USER, SYSTEM])
    with pytest.raises(
        MiniDPOError, match="mistral chat format needs user and assistant messages to alternate"
    ):
        get_chat_format("mistral").render([USER, USER])
