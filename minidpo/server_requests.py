"""Request bodies of the OpenAI-compatible server: parsed, validated, turned into rows.

Everything a client sends is checked here before it reaches the model thread, and every
refusal is a RequestError that the server sends as OpenAI's error object,
{"error": {"message", "type", "param", "code"}}, naming the field (`param`) at fault:

- the body: UTF-8 JSON (no NaN/Infinity, integers of at most 100 digits, finite floats,
  bounded nesting), a JSON object;
- text fields (messages' content, prompt, stop, guided_choice): strings that are valid
  Unicode (no unpaired surrogate such as "\\ud800");
- guided decoding: guided_choice (strings) or response_format json_object / a flat
  json_schema (guided.py says which schemas);
- sampling values: finite and in range (temperature [0, 2], top_p (0, 1], min_p [0, 1],
  top_k -1 or 0 (off) up to 2**31 - 1, repetition_penalty [0.01, 10], seed [0, 2**63 - 1],
  n [1, max_batch_size]), so no row can poison the batch it runs in;
- the context: prompt + max_tokens within the model's context (400 context_length_exceeded).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from minidpo.errors import MiniDPOError
from minidpo.guided import ChoiceConstraint, JsonConstraint, TokenTexts
from minidpo.sampler import SamplingParams

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_INT_DIGITS = 100
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 64


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def kind(self) -> str:
        if self.status == 401:
            return "authentication_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> RequestError:
    return RequestError(400, message, param=param, code=code)


# ---- the body


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits is too long (at most {MAX_INT_DIGITS})")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} overflows a float")
    return value


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body (RequestError 400 if it is not one)."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant, parse_int=_bounded_int, parse_float=_finite_float)
    except RecursionError:
        raise invalid("the body is nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError and the limits above
        raise invalid(f"the body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object", code="invalid_json")
    return body


# ---- fields


def text(value, param: str) -> str:
    """A string field, refused if it is not a string or not valid Unicode."""
    if not isinstance(value, str):
        raise invalid(f"'{param}' must be a string, got {type(value).__name__}", param, "invalid_type")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"'{param}' is not valid Unicode (an unpaired surrogate)", param) from None
    return value


def number(body: dict, key: str, lo: float, hi: float, default: float, *, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"'{key}' must be a number, got {type(value).__name__}", key, "invalid_type")
    if not (lo < value if lo_open else lo <= value) or not value <= hi:  # NaN fails both
        raise invalid(f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", key)
    return float(value)


def integer(body: dict, key: str, lo: int, hi: int, default: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{key}' must be an integer, got {type(value).__name__}", key, "invalid_type")
    if not lo <= value <= hi:
        raise invalid(f"'{key}' must be in [{lo}, {hi}], got {value}", key)
    return value


def boolean(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"'{key}' must be a boolean, got {type(value).__name__}", key, "invalid_type")
    return value


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list", "messages", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise invalid(f"messages[{i}].role {role!r:.40} is not one of {', '.join(ROLES)}", f"messages[{i}].role")
        out.append({"role": ROLES[role], "content": _content(m.get("content"), f"messages[{i}].content")})
    return out


def _content(content, param: str) -> str:
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content
    ):
        return "".join(text(part["text"], param) for part in content)
    if not isinstance(content, str):
        raise invalid(f"{param} must be a string or a list of text parts", param, "invalid_type")
    return text(content, param)


def parse_prompts(body: dict) -> list[str]:
    """/v1/completions' prompt: a string or a non-empty list of strings."""
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise invalid("'prompt' must be a non-empty string or a list of them", "prompt", "invalid_type")
    return [text(p, "prompt") for p in prompts]


def parse_stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 16:
        raise invalid("'stop' must be a non-empty string or a list of up to 16", "stop", "invalid_type")
    return tuple(text(s, "stop") for s in stops)


def parse_logprobs(body: dict, *, chat: bool) -> int | None:
    """How many top log-probs each token wants (None: no log-probs).

    Chat: logprobs (bool) + top_logprobs (0..20); completions: logprobs (0..20)."""
    if not chat:
        return integer(body, "logprobs", 0, MAX_TOP_LOGPROBS, None)
    top = integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None)
    if not boolean(body, "logprobs"):
        if top is not None:
            raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return None
    return top or 0


def parse_constraint(body: dict, token_texts: Callable[[], TokenTexts]):
    """The guided-decoding constraint that guided_choice or response_format asks for, or None."""
    choices, fmt = body.get("guided_choice"), body.get("response_format")
    if choices is not None:
        if fmt is not None and fmt != {"type": "text"}:
            raise invalid("give guided_choice or response_format, not both", "guided_choice")
        if not isinstance(choices, list) or not 0 < len(choices) <= MAX_CHOICES or \
                not all(isinstance(c, str) and c for c in choices):  # fmt: skip
            raise invalid(f"'guided_choice' must be a list of 1 to {MAX_CHOICES} non-empty strings", "guided_choice")
        return ChoiceConstraint(token_texts(), [text(c, "guided_choice") for c in choices])
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonConstraint(token_texts())
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        try:
            return JsonConstraint(token_texts(), schema)
        except ValueError as e:
            raise invalid(f"response_format.json_schema.schema: {e}", "response_format") from None
    raise invalid("'response_format' must be {'type': 'text' | 'json_object' | 'json_schema', ...}", "response_format")


def row_params(body: dict, *, n: int, max_tokens: int, stop: tuple[str, ...], logprobs: int | None,
               constraint=None) -> list[SamplingParams]:  # fmt: skip
    """One SamplingParams per choice (choice i seeded seed + i)."""
    top_k = integer(body, "top_k", -1, 2**31 - 1, 0)
    seed = integer(body, "seed", 0, 2**63 - 1, None)
    min_tokens = integer(body, "min_tokens", 0, max_tokens, 0)
    common = dict(
        max_new_tokens=max_tokens,
        temperature=number(body, "temperature", 0, 2, 1.0),
        top_p=number(body, "top_p", 0, 1, 1.0, lo_open=True),
        top_k=max(top_k, 0),
        min_p=number(body, "min_p", 0, 1, 0.0),
        repetition_penalty=number(body, "repetition_penalty", 0.01, 10, 1.0),
        stop=stop,
        min_tokens=min_tokens,
        ignore_eos=boolean(body, "ignore_eos"),
        logprobs=logprobs,
        constraint=constraint,
    )
    return [SamplingParams(seed=None if seed is None else (seed + i) % 2**63, **common) for i in range(n)]


def max_tokens(body: dict, prompt_tokens: int, *, context: int, default: int) -> int:
    """The reply budget: max_completion_tokens or max_tokens, or `default` cut to what fits."""
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    requested = integer(body, key, 1, 2**63 - 1, None)
    room = context - prompt_tokens
    if room < 1 or (requested is not None and requested > room):
        raise RequestError(
            400,
            f"this model's maximum context is {context} tokens; the prompt takes {prompt_tokens}"
            + (f" and {key} asks for {requested} more: lower {key} or shorten the prompt" if room >= 1 else
               ", leaving no room for a reply: shorten the prompt"),
            param=key if room >= 1 else "prompt",
            code="context_length_exceeded",
        )  # fmt: skip
    return requested or min(default, room)


def encode(tokenizer, prompt: str, param: str) -> list[int]:
    try:
        ids = tokenizer.encode(prompt)
    except MiniDPOError as e:
        raise invalid(str(e), param) from None
    if not ids:
        raise invalid(f"'{param}' encodes to no tokens", param)
    return ids
