"""Tokenizer: a model folder's tokenizer.json (HF `tokenizers`) or tokenizer.model (SentencePiece).

    tok = load_tokenizer("path/to/hf-folder")
    ids = tok.encode("<|im_start|>user\\nHi<|im_end|>\\n")   # specials in the text are parsed
    tok.decode(ids)                                          # specials skipped by default

`encode` never adds special tokens: what a sequence starts with is the chat format's
business (minidpo.chat). Special-token strings inside the text are parsed as special
tokens, as transformers does with split_special_tokens=False.

Special tokens and the chat template come from the files HF writes beside the vocabulary:
tokenizer_config.json (bos/eos/pad/unk_token, additional_special_tokens,
added_tokens_decoder, add_bos_token, chat_template), special_tokens_map.json,
chat_template.jinja and generation_config.json (eos_token_id, one id or a list). The
chat format is detected from the chat template (minidpo.chat.detect_chat_format) unless
tokenizer_config.json names one as "chat_format" or the caller overrides it. A chat template
whose Jinja tags do not nest or close (`jinja_syntax_error`) is refused on load, as is a
tokenizer with more ids than the embedding of the model beside it (config.json's vocab_size).

Decoding is faithful: no clean_up_tokenization_spaces, so decode(encode(text)) == text.
`StreamDecoder` turns a stream of ids into text for the sampler and the server, holding
back bytes until they form whole UTF-8 characters (byte-level BPE and SentencePiece's byte
fallback split multi-byte characters across tokens).
"""

from __future__ import annotations

import re
from pathlib import Path

from minidpo.chat import ChatFormat, detect_chat_format, get_chat_format
from minidpo.errors import MiniDPOError, ParameterError
from minidpo.io import read_json

# End-of-turn / end-of-document tokens that stop generation wherever they exist.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_content(value) -> str | None:
    """A token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _one_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class HFTokenizerModel:
    """tokenizer.json through the `tokenizers` library (BPE, byte-level BPE, Unigram, WordPiece)."""

    def __init__(self, path: Path, special_tokens: list[str]):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self.tk = RustTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for every parse error
            raise MiniDPOError(f"{path}: not a valid tokenizer.json ({_one_line(e)})") from None
        # As transformers does on load, the configured specials are parsed as such; unlike it,
        # none is added to the vocabulary (the model has no embedding for it).
        known = [t for t in special_tokens if self.tk.token_to_id(t) is not None]
        self.tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in known])

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(i)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def adds_bos(self, bos_id: int) -> bool:
        """Whether the post-processor puts BOS before plain text (Llama-3's TemplateProcessing)."""
        ids = self.tk.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == bos_id


class SentencePieceModel:
    """tokenizer.model through `sentencepiece` (Llama-2, Mistral), plus added tokens.

    Text between special tokens is encoded by SentencePiece, which writes its dummy-prefix
    `▁` at the start of each such piece of text, as Meta's reference tokenizer does for
    each string it encodes. Added tokens with ids past the SentencePiece vocabulary
    (tokenizer_config.json's added_tokens_decoder, e.g. a `<pad>` at 32000) are kept here.
    """

    def __init__(self, path: Path, special_tokens: list[str], added_tokens: dict[str, int]):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise MiniDPOError(
                f"{path}: not a valid SentencePiece tokenizer.model ({_one_line(e)})"
            ) from None
        self.added = {t: i for t, i in added_tokens.items() if i >= self.sp.get_piece_size()}
        self.added_ids = set(self.added.values())
        known = [t for t in special_tokens if self._in_sp(t) or t in self.added]
        self.special_ids = {self.token_to_id(t) for t in known}
        splitters = sorted({*known, *self.added}, key=len, reverse=True)
        self.splitter = re.compile("(" + "|".join(map(re.escape, splitters)) + ")") if splitters else None

    def _in_sp(self, piece: str) -> bool:
        i = self.sp.piece_to_id(piece)
        return self.sp.id_to_piece(i) == piece

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(self.splitter.split(text) if self.splitter else [text]):
            if i % 2:  # a special or added token
                ids.append(self.token_to_id(part))
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.special_ids or i in self.added_ids:
                pieces.append(self.sp.decode(run))
                run = []
                if not (skip_special_tokens and i in self.special_ids):
                    pieces.append(self.id_to_token(i))
            else:
                run.append(i)
        pieces.append(self.sp.decode(run))
        return "".join(pieces)

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        return self.sp.piece_to_id(token) if self._in_sp(token) else None

    def id_to_token(self, i: int) -> str | None:
        if 0 <= i < self.sp.get_piece_size():
            return self.sp.id_to_piece(i)
        return next((t for t, j in self.added.items() if j == i), None)

    @property
    def vocab_size(self) -> int:
        return max([self.sp.get_piece_size(), *(i + 1 for i in self.added.values())])

    def adds_bos(self, bos_id: int) -> bool:
        return True  # LlamaTokenizer's default when tokenizer_config.json says nothing


class Tokenizer:
    """Text <-> token ids plus the special tokens and chat format of one model."""

    def __init__(
        self,
        model,
        config: dict,
        *,
        generation_eos_ids: list[int],
        chat_template: str | None,
        chat_format: str | ChatFormat | None,
        source: str,
    ):
        self.model = model
        self.source = source
        ids = {}
        for key in SPECIAL_TOKEN_KEYS:
            token = config.get(key)
            ids[key] = None if token is None else model.token_to_id(token)
            if token is not None and ids[key] is None:
                raise MiniDPOError(f"{source}: {key} {token!r} is not in the tokenizer's vocabulary")
        self.bos_token, self.bos_token_id = config.get("bos_token"), ids["bos_token"]
        self.eos_token, self.eos_token_id = config.get("eos_token"), ids["eos_token"]
        self.unk_token, self.unk_token_id = config.get("unk_token"), ids["unk_token"]
        self.pad_token, self.pad_token_id = config.get("pad_token"), ids["pad_token"]
        if self.eos_token_id is None and generation_eos_ids:
            self.eos_token_id = generation_eos_ids[0]
            self.eos_token = model.id_to_token(self.eos_token_id)
        if self.pad_token_id is None:
            self.pad_token, self.pad_token_id = self.eos_token, self.eos_token_id
        add_bos = config.get("add_bos_token")
        self.add_bos_token = self.bos_token_id is not None and (
            add_bos if isinstance(add_bos, bool) else model.adds_bos(self.bos_token_id)
        )
        named = {model.token_to_id(t) for t in END_OF_TURN_TOKENS} - {None}
        self.stop_token_ids: set[int] = {*generation_eos_ids, *named} | ({self.eos_token_id} - {None})
        self.chat_template = chat_template
        try:
            self.chat_format = self.make_chat_format(chat_format or config.get("chat_format"))
        except MiniDPOError as e:  # an unknown name, from the caller or from tokenizer_config.json
            if chat_format is None:
                raise MiniDPOError(f"{source}: tokenizer_config.json: {e}") from None
            raise ParameterError(f"chat_format: {e}", "chat_format") from None

    def chat_format_or(self, override: str | ChatFormat | None) -> ChatFormat:
        """`override` as a ChatFormat (a name or a format), or this tokenizer's own when None."""
        return self.chat_format if override is None else self.make_chat_format(override)

    def make_chat_format(self, name_or_format: str | ChatFormat | None = None) -> ChatFormat:
        """This tokenizer's chat format: a ChatFormat as given, one by name, or the detected one."""
        if isinstance(name_or_format, ChatFormat):
            return name_or_format
        eos = self.eos_token or ""
        if name_or_format is None:
            fmt = detect_chat_format(self.chat_template, bos_token=self.bos_token or "", eos_token=eos)
        else:
            fmt = get_chat_format(name_or_format, bos_token=self.bos_token or "", eos_token=eos)
        if fmt.name == "plain" and not self.add_bos_token:
            fmt.bos_token = ""  # plain text gets BOS only from tokenizers that add it
        return fmt

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens added, special-token strings parsed."""
        return self.model.encode(text)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.model.decode([int(i) for i in ids], skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.model.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.model.id_to_token(int(i))

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, chat_format={self.chat_format.name!r})"
        )


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the new text, only in whole characters.

    It decodes a short window of ids twice, with and without the newest ones, and emits
    the difference, so spaces that depend on the previous token (SentencePiece's `▁`)
    come out right. A window ending in an incomplete UTF-8 sequence decodes to U+FFFD;
    its text is held back until the next id completes it, or until `flush()`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: context for the decode
        self.read_offset = 0  # ids before this have been emitted

    def _new_text(self) -> str:
        decode = lambda ids: self.tokenizer.decode(ids, self.skip_special_tokens)
        emitted = decode(self.ids[self.prefix_offset : self.read_offset])
        return decode(self.ids[self.prefix_offset :])[len(emitted) :]

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self._new_text()
        if not text or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes to U+FFFD)."""
        text = self._new_text()
        self.prefix_offset = self.read_offset = len(self.ids)
        return text


def _read_optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise MiniDPOError(f"{path}: expected a JSON object")
    return data


def _chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    """The default chat template: tokenizer_config.json's (a string or named list) or chat_template.jinja."""
    template, source = tokenizer_config.get("chat_template"), folder / "tokenizer_config.json"
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template, source = read_text(jinja), jinja
    if template is None:
        return None
    if not isinstance(template, str):
        raise MiniDPOError(f'{source}: "chat_template" must be a string, got {type(template).__name__}')
    problem = jinja_syntax_error(template)
    if problem is not None:
        raise MiniDPOError(f"{source}: chat_template is not valid Jinja ({problem}); fix it or remove it")
    return template


# Jinja statements that open a block, and the statement that closes each.
_JINJA_BLOCKS = {"for", "if", "macro", "call", "filter", "block", "with", "raw", "autoescape", "generation", "set"}
_JINJA_MIDDLE = {"elif": ("if",), "else": ("if", "for")}
_JINJA_ENDRAW = re.compile(r"\{%[-+]?\s*endraw\s*[-+]?%\}")
_BRACKETS = {"(": ")", "[": "]", "{": "}"}


def jinja_syntax_error(template: str) -> str | None:
    """The first structural mistake in a Jinja template, or None: a tag left open, brackets or
    quotes unbalanced inside a tag, a block statement (for, if, macro, ...) without its end, an
    end, elif or else out of place. Not a full parser: what it accepts may still fail to render,
    but a template it refuses is refused by Jinja too (tests/test_bad_inputs.py checks both ways)."""
    stack: list[str] = []
    pos = 0
    while (start := _next_tag(template, pos)) is not None:
        opener = template[start : start + 2]
        if opener == "{#":
            end = template.find("#}", start + 2)
            if end < 0:
                return "a {# comment is never closed"
            pos = end + 2
            continue
        end, problem = _tag_end(template, start + 2, "%}" if opener == "{%" else "}}")
        if problem is not None:
            return f"{problem} in {template[start : start + 40]!r}"
        body, pos = template[start + 2 : end].strip("-+ \t\n"), end + 2
        if opener == "{{":
            if not body:
                return "an empty {{ }}"
            continue
        word = body.split(None, 1)[0] if body else ""
        if word == "raw":  # the text up to {% endraw %} is not parsed
            if (m := _JINJA_ENDRAW.search(template, pos)) is None:
                return "{% raw %} has no {% endraw %}"
            pos = m.end()
        elif word in _JINJA_BLOCKS and not (word == "set" and "=" in body):
            stack.append(word)
        elif word in _JINJA_MIDDLE:
            if not stack or stack[-1] not in _JINJA_MIDDLE[word]:
                return f"{{% {word} %}} outside {' or '.join(_JINJA_MIDDLE[word])}"
        elif word.startswith("end"):
            if not stack or stack[-1] != word[3:]:
                expected = f"{{% end{stack[-1]} %}}" if stack else "no end tag"
                return f"{{% {word} %}} where {expected} was expected"
            stack.pop()
    if stack:
        return f"{{% {stack[-1]} %}} has no {{% end{stack[-1]} %}}"
    return None


def _next_tag(text: str, pos: int) -> int | None:
    """Where the next {% / {{ / {# opens at or after `pos`, or None."""
    found = [i for i in (text.find(d, pos) for d in ("{%", "{{", "{#")) if i >= 0]
    return min(found) if found else None


def _tag_end(text: str, i: int, closer: str) -> tuple[int, str | None]:
    """(index of the `closer` that ends a tag whose body starts at i, None), skipping string
    literals and brackets, or (-1, the problem) when the body is unbalanced or never closed."""
    closing: list[str] = []
    quote = None
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif not closing and text.startswith(closer, i):
            return i, None
        elif c in _BRACKETS:
            closing.append(_BRACKETS[c])
        elif c in ")]}":
            if not closing or closing.pop() != c:
                return -1, f"an unmatched {c!r}"
        i += 1
    if quote:
        return -1, "an unterminated string"
    return -1, f"a missing {closing[-1]!r}" if closing else "a tag that is never closed"


def read_text(path: Path) -> str:
    """A UTF-8 text file; a missing or non-UTF-8 file is a one-line MiniDPOError."""
    from minidpo.io import open_or_fail

    with open_or_fail(path, binary=True) as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MiniDPOError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def _model_vocab_size(folder: Path) -> int | None:
    """config.json's vocab_size when the folder is a model folder (None otherwise)."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        vocab = read_json(config).get("vocab_size")
    except (MiniDPOError, AttributeError):
        return None  # a bad config.json is reported when the model loads
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


def load_tokenizer(path_or_dir, chat_format: str | ChatFormat | None = None) -> Tokenizer:
    """Load a model folder's tokenizer (or a tokenizer.json / tokenizer.model file given directly)."""
    path = Path(path_or_dir)
    if path.is_dir():
        folder = path
        path = next((path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()), None)
        if path is None:
            raise MiniDPOError(
                f"{folder}: no tokenizer.json or tokenizer.model; copy the model's tokenizer files there"
            )
    elif path.is_file():
        folder = path.parent
    else:
        raise MiniDPOError(f"{path}: no such tokenizer file or folder")

    tokenizer_config = _read_optional_json(folder / "tokenizer_config.json")
    special_map = _read_optional_json(folder / "special_tokens_map.json")
    generation_config = _read_optional_json(folder / "generation_config.json")

    config = {
        key: _token_content(tokenizer_config.get(key, special_map.get(key))) for key in SPECIAL_TOKEN_KEYS
    }
    config["add_bos_token"] = tokenizer_config.get("add_bos_token")
    config["chat_format"] = tokenizer_config.get("chat_format")
    additional = (
        tokenizer_config.get("additional_special_tokens", special_map.get("additional_special_tokens")) or []
    )
    if not isinstance(additional, list):
        raise MiniDPOError(f'{folder}: "additional_special_tokens" must be a list, got {type(additional).__name__}')
    specials = [config[k] for k in SPECIAL_TOKEN_KEYS if config[k] is not None]
    specials += [_token_content(t) for t in additional if _token_content(t) is not None]
    added = {}  # added_tokens_decoder: {"32000": {"content": "<pad>", "special": true, ...}}
    decoder = tokenizer_config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise MiniDPOError(f'{folder / "tokenizer_config.json"}: "added_tokens_decoder" must be an object of id: token')
    for i, entry in decoder.items():
        if _token_content(entry) is not None:
            if not i.isdigit():
                raise MiniDPOError(
                    f'{folder / "tokenizer_config.json"}: "added_tokens_decoder" key {i!r} is not a token id'
                )
            added[_token_content(entry)] = int(i)
            if entry.get("special"):
                specials.append(entry["content"])

    if path.suffix == ".json":
        model = HFTokenizerModel(path, specials)
    else:
        model = SentencePieceModel(path, specials, added)

    model_vocab = _model_vocab_size(folder)
    if model_vocab is not None and model.vocab_size > model_vocab:
        raise MiniDPOError(
            f"{path}: the tokenizer has {model.vocab_size} ids but the model's vocab_size (config.json) is "
            f"{model_vocab}; ids past it have no embedding: use the tokenizer the model was trained with"
        )
    eos_ids = generation_config.get("eos_token_id")
    eos_ids = [i for i in (eos_ids if isinstance(eos_ids, list) else [eos_ids]) if isinstance(i, int)]
    return Tokenizer(
        model,
        config,
        generation_eos_ids=eos_ids,
        chat_template=_chat_template(folder, tokenizer_config),
        chat_format=chat_format,
        source=str(folder),
    )
