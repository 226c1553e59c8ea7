"""Chat formats: how a conversation becomes the one string a chat model was trained on.

Each format is written in code, not Jinja, and renders exactly what the model's published
`chat_template` renders through transformers' `apply_chat_template(tokenize=False)`
(tests/test_chat.py checks that against the real templates):

    name     models                  one user turn + generation prompt
    chatml   SmolLM2, Qwen2          <|im_start|>system\\n{default}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n
    llama3   Llama-3 Instruct        <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n
    llama2   Llama-2 chat            <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST]
    mistral  Mistral Instruct v0.2   <s>[INST] {q} [/INST]
    plain    LibraChem reference     Question: {q}\\n\\nAnswer: (ends in a space)

After the reply (`end_of_turn`): chatml `<|im_end|>\\n`, llama3 `<|eot_id|>`, llama2
` </s>`, mistral `</s>`, plain the tokenizer's EOS. Where the template writes BOS
(llama3, llama2, mistral) it is part of the rendered text, and `Tokenizer.encode` parses it.

Sources: the chat_template strings in the tokenizer_config.json of HuggingFaceTB/
SmolLM2-135M-Instruct, Qwen/Qwen2-7B-Instruct, meta-llama/Meta-Llama-3-8B-Instruct,
meta-llama/Llama-2-7b-chat-hf and mistralai/Mistral-7B-Instruct-v0.2; the plain format is
the LibraChem reference code's prompt (arXiv 2501.13952).

Training and generation must agree on the boundary between prompt and response (the bug
TRL #2054 fixed: tokenizing prompt + response jointly and slicing at the prompt's length
can split a token across the boundary). `encode_prompt_response` therefore tokenizes the
two parts separately: the prompt ids are exactly what generation starts from, and the
training sequence is those ids followed by the response's.
"""

from __future__ import annotations

import re

from minidpo.errors import MiniDPOError

ROLES = ("system", "user", "assistant")
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN2_SYSTEM = "You are a helpful assistant."


def _check_messages(messages) -> list[dict]:
    """Validate a conversation: a non-empty list of {"role", "content": str}, system only first."""
    if not isinstance(messages, list) or not messages:
        raise MiniDPOError("a conversation must be a non-empty list of {'role', 'content'} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise MiniDPOError(
                f"message {i}: expected {{'role': one of {', '.join(ROLES)}, 'content': a string}}, got {m!r:.80}"
            )
        if m["role"] == "system" and i > 0:
            raise MiniDPOError(f"message {i}: a system message may only come first")
    return messages


def _split_alternating(messages: list[dict], format_name: str) -> tuple[str | None, list[dict]]:
    """(system or None, the rest), checking that the rest alternate user/assistant from a user."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    for i, m in enumerate(turns):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise MiniDPOError(
                f"the {format_name} chat format needs user and assistant messages to alternate, "
                f"starting with user (after an optional system message)"
            )
    return system, turns


class ChatFormat:
    """A chat format. Subclasses set `name` and write `render` and `response_text`.

    bos_token / eos_token are the tokenizer's strings, as the Jinja templates receive them;
    None means the format's usual ones.
    """

    name = ""
    default_bos = ""
    default_eos = ""

    def __init__(
        self, bos_token: str | None = None, eos_token: str | None = None, default_system: str | None = None
    ):
        self.bos_token = self.default_bos if bos_token is None else bos_token
        self.eos_token = self.default_eos if eos_token is None else eos_token
        self.default_system = default_system

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as one string; with add_generation_prompt, ready for the reply."""
        raise NotImplementedError

    def response_text(self, content: str) -> str:
        """What follows the generation prompt in a rendered assistant turn (reply + end_of_turn)."""
        raise NotImplementedError

    @property
    def end_of_turn(self) -> str:
        """The text the template appends after an assistant reply."""
        return self.response_text("")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Strings that end a reply when generated as text (for back ends that stop on text)."""
        return tuple(s for s in (self.end_of_turn.strip(),) if s)

    def __repr__(self) -> str:
        system = "" if self.default_system is None else f", default_system={self.default_system!r}"
        return f"{type(self).__name__}(bos_token={self.bos_token!r}, eos_token={self.eos_token!r}{system})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    __hash__ = None


class ChatML(ChatFormat):
    """ChatML (SmolLM2, Qwen2): `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.

    When the first message is not a system message the template injects its default
    system prompt (SmolLM2: SMOLLM2_SYSTEM, Qwen2: QWEN2_SYSTEM). Contents are not stripped.
    """

    name = "chatml"

    def render(self, messages, add_generation_prompt=True):
        messages = _check_messages(messages)
        if self.default_system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def response_text(self, content):
        return f"{content}<|im_end|>\n"


class Llama3(ChatFormat):
    """Llama-3 Instruct: BOS, then `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`.

    Contents are stripped of surrounding whitespace (the template's `| trim`); no default
    system prompt.
    """

    name = "llama3"
    default_bos = "<|begin_of_text|>"

    def render(self, messages, add_generation_prompt=True):
        messages = _check_messages(messages)
        text = self.bos_token + "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
            for m in messages
        )
        return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")

    def response_text(self, content):
        return f"{content.strip()}<|eot_id|>"


class Llama2(ChatFormat):
    """Llama-2 chat: `<s>[INST] {user} [/INST] {assistant} </s>` per exchange.

    A system message goes inside the first user turn as `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n`;
    turn contents are stripped; the template has no generation prompt (a prompt ends with
    ` [/INST]`). The space before the reply is not part of `response_text`: Meta's
    reference tokenizes each reply on its own, and SentencePiece's dummy prefix writes
    that space as the `▁` of the reply's first piece.
    """

    name = "llama2"
    default_bos = "<s>"
    default_eos = "</s>"

    def render(self, messages, add_generation_prompt=True):
        system, turns = _split_alternating(_check_messages(messages), self.name)
        text = ""
        for i, m in enumerate(turns):
            content = m["content"]
            if i == 0 and system is not None:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            if m["role"] == "user":
                text += f"{self.bos_token}[INST] {content.strip()} [/INST]"
            else:
                text += " " + self.response_text(content)
        return text

    def response_text(self, content):
        return f"{content.strip()} {self.eos_token}"


class Mistral(ChatFormat):
    """Mistral Instruct v0.2: `<s>[INST] {user} [/INST]{assistant}</s>...`, contents as given.

    The v0.2 template rejects system messages; here a system message is put before the
    first user message with a blank line, as Mistral's later templates do.
    """

    name = "mistral"
    default_bos = "<s>"
    default_eos = "</s>"

    def render(self, messages, add_generation_prompt=True):
        system, turns = _split_alternating(_check_messages(messages), self.name)
        text = self.bos_token
        for i, m in enumerate(turns):
            content = f"{system}\n\n{m['content']}" if i == 0 and system is not None else m["content"]
            text += f"[INST] {content} [/INST]" if m["role"] == "user" else self.response_text(content)
        return text

    def response_text(self, content):
        return f"{content}{self.eos_token}"


class Plain(ChatFormat):
    """The LibraChem reference prompt: `Question: {prompt}\\n\\nAnswer: {reply}{eos}`.

    No chat template: the reference tokenizes this text with the model's tokenizer, which
    adds BOS where the tokenizer adds one to plain text (load_tokenizer passes bos_token
    only then). A system message, if any, comes first followed by a blank line.
    """

    name = "plain"

    def render(self, messages, add_generation_prompt=True):
        messages = _check_messages(messages)
        text = self.bos_token
        for m in messages:
            if m["role"] == "system":
                text += f"{m['content']}\n\n"
            elif m["role"] == "user":
                text += f"Question: {m['content']}\n\n"
            else:
                text += "Answer: " + self.response_text(m["content"])
        return text + ("Answer: " if add_generation_prompt else "")

    def response_text(self, content):
        return f"{content}{self.eos_token}"

    @property
    def stop_strings(self):
        return (*super().stop_strings, "\n\nQuestion:")


FORMATS = {cls.name: cls for cls in (ChatML, Llama3, Llama2, Mistral, Plain)}
# named presets: (format, default system prompt)
PRESETS = {"smollm2": ("chatml", SMOLLM2_SYSTEM), "qwen2": ("chatml", QWEN2_SYSTEM)}


def get_chat_format(
    name: str,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    default_system: str | None = None,
) -> ChatFormat:
    """A chat format by name: chatml, llama3, llama2, mistral, plain, or a preset (smollm2, qwen2)."""
    if name in PRESETS:
        name, preset_system = PRESETS[name]
        default_system = preset_system if default_system is None else default_system
    if name not in FORMATS:
        raise MiniDPOError(f"unknown chat format {name!r}; choose one of {', '.join([*FORMATS, *PRESETS])}")
    return FORMATS[name](bos_token=bos_token, eos_token=eos_token, default_system=default_system)


# '<|im_start|>system\n{default}<|im_end|>' inside a template string literal (newline real or escaped)
_CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)((?:[^'\"\\{}]|\\.)*?)<\|im_end\|>")


def detect_chat_format(
    chat_template: str | None, *, bos_token: str | None = None, eos_token: str | None = None
) -> ChatFormat:
    """The chat format a Jinja chat_template renders, recognised by its marker tokens.

    `<|im_start|>` -> chatml (with the default system prompt found in the template),
    `<|start_header_id|>` -> llama3, `[INST]` with `<<SYS>>` -> llama2, `[INST]` -> mistral,
    anything else (or no template) -> plain.
    """
    template = chat_template or ""
    if "<|im_start|>" in template:
        match = _CHATML_DEFAULT_SYSTEM.search(template)
        system = None
        if match:
            system = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), match.group(1))
        return ChatML(bos_token=bos_token, eos_token=eos_token, default_system=system)
    if "<|start_header_id|>" in template:
        name = "llama3"
    elif "[INST]" in template:
        name = "llama2" if "<<SYS>>" in template else "mistral"
    else:
        name = "plain"
    return FORMATS[name](bos_token=bos_token, eos_token=eos_token)


def encode_prompt_response(
    tok, fmt: ChatFormat, prompt: str, response: str, system: str | None = None
) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) of one exchange; prompt_ids + response_ids is the training sequence.

    prompt_ids = encode(render([system?, user], add_generation_prompt=True)): exactly what
    generation starts from (BOS included where the template writes it);
    response_ids = encode(fmt.response_text(response)): the reply and its end of turn.
    """
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": prompt})
    prompt_ids = tok.encode(fmt.render(messages, add_generation_prompt=True))
    response_ids = tok.encode(fmt.response_text(response))
    return prompt_ids, response_ids
