"""Guided decoding: logit masks that keep a reply inside a small language.

At each step the sampler asks a row's constraint which tokens may come next given the
text so far (sampler.TokenConstraint) and sets every other logit to -inf, so a greedy or
sampled reply is always a prefix of a valid output; once the output is complete, only the
stop tokens remain. This is the masking of Willard & Louf 2023 (arXiv 2307.09702,
"Efficient Guided Generation", the `outlines` library), done here without a precompiled
index: each step scans the vocabulary against a character automaton, cheaply, because
tokens are grouped by their first character and plain string tokens pass wholesale.

    ChoiceConstraint   the reply is exactly one of a few strings (vLLM's guided_choice)
    JsonConstraint     the reply is one JSON object (OpenAI's response_format json_object),
                       or one whose keys and value types a flat JSON schema fixes
                       (response_format json_schema: properties of type string, integer,
                       number, boolean or null, or a string enum), its properties in order

JSON is produced compact: no whitespace outside strings. A token's text is what it adds
after another token (decode([a, t]) less decode([a])), so SentencePiece's word-initial
spaces count; tokens that decode to part of a character are never allowed.
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch

NUMBER_END = {"z", "i", "f", "e"}  # number states where the number may end
CONTROL = {chr(c) for c in range(0x20)}
HEX = set("0123456789abcdefABCDEF")


class TokenTexts:
    """Each token's text and the token ids grouped by first character, for one tokenizer."""

    def __init__(self, tokenizer):
        anchor = tokenizer.encode("a")[-1]
        prefix = tokenizer.decode([anchor])
        self.vocab_size = tokenizer.vocab_size
        self.stop_ids = sorted(tokenizer.stop_token_ids)
        self.texts: list[str] = []
        self.by_first: dict[str, list[int]] = defaultdict(list)
        plain = []
        for t in range(self.vocab_size):
            full = tokenizer.decode([anchor, t])
            text = full[len(prefix) :] if full.startswith(prefix) else ""
            text = "" if "\ufffd" in text else text
            self.texts.append(text)
            if text:
                self.by_first[text[0]].append(t)
                if not ({'"', "\\"} | CONTROL) & set(text):
                    plain.append(t)
        self.plain = torch.tensor(plain, dtype=torch.long)  # tokens that keep a JSON string open
        self.plain_ids = frozenset(plain)

    def mask(self, ids) -> torch.Tensor:
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)  # (V,)
        allowed[torch.as_tensor(list(ids), dtype=torch.long)] = True
        return allowed


class ChoiceConstraint:
    """The reply is one of `choices` (non-empty strings)."""

    def __init__(self, texts: TokenTexts, choices: list[str]):
        self.texts, self.choices = texts, choices
        self.ids_of: dict[str, list[int]] = defaultdict(list)
        for t, text in enumerate(texts.texts):
            if text and any(text in c for c in choices):
                self.ids_of[text].append(t)

    def allowed(self, text: str) -> torch.Tensor:
        ids = set(self.texts.stop_ids) if text in self.choices else set()
        for choice in self.choices:
            if choice.startswith(text):
                rest = choice[len(text) :]
                for k in range(1, len(rest) + 1):
                    ids.update(self.ids_of.get(rest[:k], ()))
        return self.texts.mask(ids)


# ---- JSON as a character automaton
#
# A state is an immutable tuple (mode, stack, aux). mode: what may come next; stack: the
# open containers ("{" / "["); aux: inside a string, "" or the escape read so far; inside
# a number, its grammar state; inside a literal (true, false, null), the characters left.

TOP, VALUE, OBJ_FIRST, OBJ_KEY, COLON, AFTER, STR_KEY, STR_VAL, NUM, LIT, DONE = range(11)
LITERALS = {"t": "rue", "f": "alse", "n": "ull"}


def _value_done(stack: str) -> tuple:
    return (AFTER, stack, None) if stack else (DONE, "", None)


def json_step(state: tuple, ch: str, *, integer: bool = False) -> tuple | None:
    """The state after `ch`, or None if `ch` cannot come next. integer: numbers without . or e."""
    mode, stack, aux = state
    if mode == TOP:
        return (OBJ_FIRST, "{", None) if ch == "{" else None
    if mode == VALUE:
        if ch == "{":
            return (OBJ_FIRST, stack + "{", None)
        if ch == "[":
            return (VALUE, stack + "[", "first")  # aux "first": "]" may close it at once
        if ch == "]" and aux == "first":
            return _value_done(stack[:-1])
        if ch == '"':
            return (STR_VAL, stack, "")
        if ch == "-":
            return (NUM, stack, "m")
        if ch.isdigit() and ch.isascii():
            return (NUM, stack, "z" if ch == "0" else "i")
        if ch in LITERALS:
            return (LIT, stack, LITERALS[ch])
        return None
    if mode in (OBJ_FIRST, OBJ_KEY):
        if ch == '"':
            return (STR_KEY, stack, "")
        return _value_done(stack[:-1]) if ch == "}" and mode == OBJ_FIRST else None
    if mode == COLON:
        return (VALUE, stack, None) if ch == ":" else None
    if mode == AFTER:
        if ch == ",":
            return (OBJ_KEY, stack, None) if stack[-1] == "{" else (VALUE, stack, None)
        if ch == {"{": "}", "[": "]"}[stack[-1]]:
            return _value_done(stack[:-1])
        return None
    if mode in (STR_KEY, STR_VAL):
        if aux == "":
            if ch == '"':
                return (COLON, stack, None) if mode == STR_KEY else _value_done(stack)
            if ch == "\\":
                return (mode, stack, "\\")
            return None if ch in CONTROL else state
        if aux == "\\":
            if ch == "u":
                return (mode, stack, "\\u")
            return (mode, stack, "") if ch in '"\\/bfnrt' else None
        if ch not in HEX:
            return None
        return (mode, stack, "" if len(aux) == 5 else aux + ch)  # "\\u" + 4 hex digits
    if mode == NUM:
        nxt = _number_step(aux, ch, integer)
        if nxt is not None:
            return (NUM, stack, nxt)
        return json_step(_value_done(stack), ch) if aux in NUMBER_END else None
    if mode == LIT:
        if ch != aux[0]:
            return None
        return (LIT, stack, aux[1:]) if len(aux) > 1 else _value_done(stack)
    return None  # DONE


def _number_step(s: str, ch: str, integer: bool) -> str | None:
    """RFC 8259's number: -? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?"""
    digit = ch.isdigit() and ch.isascii()
    if s == "m":
        return ("z" if ch == "0" else "i") if digit else None
    if s in ("i", "f", "e") and digit:
        return s
    if s in ("z", "i") and ch == "." and not integer:
        return "f0"
    if s in ("z", "i", "f") and ch in "eE" and not integer:
        return "e0"
    if s == "f0":
        return "f" if digit else None
    if s == "e0":
        return "e1" if ch in "+-" else "e" if digit else None
    if s == "e1":
        return "e" if digit else None
    return None


class JsonConstraint:
    """The reply is a JSON object: any (schema None) or the flat schema's, keys in order."""

    def __init__(self, texts: TokenTexts, schema: dict | None = None):
        self.texts = texts
        self.parts = None if schema is None else flat_schema_parts(schema)

    # A schema reply is a sequence of parts: literal text ('{"name":') and typed values.
    # The state is (part index, what was read of it: a prefix of the literal, or a JSON state).

    def _start(self) -> tuple:
        return (TOP, "", None) if self.parts is None else self._enter(0)

    def _enter(self, i: int) -> tuple:
        part = self.parts[i] if i < len(self.parts) else None
        return ("part", i, "" if part is None or isinstance(part, str) or part[0] == "enum" else (VALUE, "", None))

    def _step(self, state: tuple, ch: str) -> tuple | None:
        if self.parts is None:
            return json_step(state, ch)
        _, i, read = state
        if i == len(self.parts):
            return None
        part = self.parts[i]
        if isinstance(part, str):  # a literal
            read += ch
            if not part.startswith(read):
                return None
            return self._enter(i + 1) if read == part else ("part", i, read)
        kind, options = part
        if kind == "enum":
            read += ch
            if not any(o.startswith(read) for o in options):
                return None
            return self._enter(i + 1) if read in options else ("part", i, read)
        if read[0] == VALUE and ch not in options:  # the value's first character fixes its type
            return None
        nxt = json_step(read, ch, integer=kind == "integer")
        if nxt is None and read[0] == NUM and read[2] in NUMBER_END:  # the number ended: ch begins the next part
            return self._step(self._enter(i + 1), ch)
        if nxt is None:
            return None
        return self._enter(i + 1) if nxt[0] == DONE else ("part", i, nxt)

    def complete(self, state: tuple) -> bool:
        """Whether a state from read() ends a whole output."""
        return state[0] == DONE if self.parts is None else state[1] == len(self.parts)

    def read(self, text: str) -> tuple | None:
        """The state after `text`, or None if no valid output starts with it."""
        state = self._start()
        for ch in text:
            state = self._step(state, ch)
            if state is None:
                return None
        return state

    def _in_string(self, state: tuple) -> bool:
        json_state = state if self.parts is None else state[2] if isinstance(state[2], tuple) else None
        return json_state is not None and json_state[0] in (STR_KEY, STR_VAL) and json_state[2] == ""

    def allowed(self, text: str) -> torch.Tensor:
        state = self.read(text)
        if state is None:
            return torch.zeros(self.texts.vocab_size, dtype=torch.bool)
        ids: set[int] = set(self.texts.stop_ids) if self.complete(state) else set()
        plain = self._in_string(state)
        for first, candidates in self.texts.by_first.items():
            after_first = self._step(state, first)
            if after_first is None:
                continue
            for t in candidates:
                token_text = self.texts.texts[t]
                if plain and t in self.texts.plain_ids:
                    continue  # allowed wholesale below
                s = after_first
                for ch in token_text[1:]:
                    s = self._step(s, ch)
                    if s is None:
                        break
                else:
                    ids.add(t)
        mask = self.texts.mask(ids)
        if plain:
            mask[self.texts.plain] = True
        return mask


def flat_schema_parts(schema: dict) -> list:
    """A flat object schema as parts: literal strings and (kind, first characters) or
    ("enum", encoded options). ValueError naming what is not supported."""
    if not isinstance(schema, dict) or schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
        raise ValueError("the schema must be {'type': 'object', 'properties': {...}}")
    properties = schema["properties"]
    if not properties:
        raise ValueError("the schema has no properties")
    first = {"string": '"', "integer": "-0123456789", "number": "-0123456789", "boolean": "tf", "null": "n"}
    parts, sep = [], "{"
    for name, spec in properties.items():
        parts.append(f"{sep}{json.dumps(name, ensure_ascii=False)}:")
        sep = ","
        if not isinstance(spec, dict):
            raise ValueError(f"property {name!r}: its schema must be an object")
        if "enum" in spec:
            options = spec["enum"]
            if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
                raise ValueError(f"property {name!r}: only a non-empty enum of strings is supported")
            parts.append(("enum", [json.dumps(o, ensure_ascii=False) for o in options]))
        elif spec.get("type") in first:
            parts.append((spec["type"], first[spec["type"]]))
        else:
            raise ValueError(f"property {name!r}: type {spec.get('type')!r} is not supported in a flat schema "
                             f"(string, integer, number, boolean, null or a string enum)")  # fmt: skip
    parts.append("}")
    return parts
