"""ModelConfig: the hyper-parameters of a Llama-family model, read from HF's config.json.

One dataclass covers the families minidpo supports, which differ only in a few switches:

    family    model_type   q/k/v bias   o bias   rope                       notes
    Llama 2   llama        no           no       theta 1e4                  tied or untied head
    Llama 3.x llama        no           no       theta 5e5, "llama3" scaling
    SmolLM2   llama        no           no       theta 1e5                  tied head
    Mistral   mistral      no           no       theta 1e4/1e6              optional sliding window
    Qwen2     qwen2        yes          no       theta 1e6                  optional sliding window

HF has stored RoPE settings two ways: transformers 4.x as top-level `rope_theta` +
`rope_scaling`, transformers 5.x as one `rope_parameters` dict; both are read.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minidpo.errors import MiniDPOError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    model_type: str = "llama"
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": 8.0, ...} or None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2: always)
    o_bias: bool = False  # bias on o_proj (Llama's attention_bias covers o_proj too)
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    extra: dict = field(default_factory=dict, repr=False)  # unknown keys, kept for round-trips

    def __post_init__(self):
        """Check every field's type and range (config.json's key names), so that a bad value
        is one line here rather than an error deep inside the model."""
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings"):  # fmt: skip
            _check(key, getattr(self, key), _is_int, "an integer >= 1", low=1)
        for key in ("head_dim", "sliding_window"):
            _check(key, getattr(self, key), _is_int, "an integer >= 1 or null", low=1, optional=True)
        for key in ("rms_norm_eps", "rope_theta"):
            _check(key, getattr(self, key), _is_number, "a number > 0", low=0, strict=True)
            setattr(self, key, float(getattr(self, key)))
        for key in ("tie_word_embeddings", "attention_bias", "o_bias", "mlp_bias"):
            _check(key, getattr(self, key), lambda v: isinstance(v, bool), "true or false")
        for key in ("bos_token_id", "pad_token_id"):  # -1 is an old way of writing "none"
            _check(key, getattr(self, key), _is_int, "a token id (an integer) or null", optional=True)
        eos = self.eos_token_id
        for i in eos if isinstance(eos, list) and eos else [eos]:
            _check("eos_token_id", i, _is_int, "a token id, a list of them, or null", optional=True)
        for key in ("hidden_act", "model_type"):
            _check(key, getattr(self, key), lambda v: isinstance(v, str), "a string")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise MiniDPOError(
                    f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim or fix one of them"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise MiniDPOError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise MiniDPOError(f'hidden_act "{self.hidden_act}" is not supported (only silu)')
        _check_rope_scaling(self.rope_scaling)

    # ---- HF config.json <-> ModelConfig

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from an HF config.json dict; `source` names the file in error messages."""
        if not isinstance(d, dict):
            raise MiniDPOError(f"{source}: expected a JSON object")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = d.get("architectures") or ["?"]
            raise MiniDPOError(
                f'{source}: model_type "{model_type}" ({arch[0]}) is not supported; '
                f"minidpo runs {', '.join(SUPPORTED_MODEL_TYPES)} models"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for key in required:
            if key not in d:
                raise MiniDPOError(f'{source}: key "{key}" is missing')

        rope = d.get("rope_parameters")
        if isinstance(rope, dict):  # transformers >= 5
            rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
            scaling = dict(rope)
        else:  # transformers 4.x
            rope_theta = d.get("rope_theta", 10000.0)
            scaling = d.get("rope_scaling") or {}
            if not isinstance(scaling, dict):
                raise MiniDPOError(f'{source}: key "rope_scaling" must be an object or null, got {scaling!r}')
            scaling = dict(scaling)
        scaling.pop("rope_theta", None)
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type", "default") == "default":
            scaling = None

        use_sliding = _get(d, "use_sliding_window", model_type == "mistral")
        known = {f.name for f in dataclasses.fields(cls)} | {"rope_parameters", "use_sliding_window"}
        try:
            return cls(
                model_type=model_type,
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=_get(d, "num_key_value_heads", d["num_attention_heads"]),
                head_dim=d.get("head_dim"),
                hidden_act=d.get("hidden_act", "silu"),
                rms_norm_eps=_get(d, "rms_norm_eps", 1e-6),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                max_position_embeddings=_get(d, "max_position_embeddings", 2048),
                tie_word_embeddings=_get(d, "tie_word_embeddings", False),
                attention_bias=True if model_type == "qwen2" else _get(d, "attention_bias", False),
                o_bias=model_type == "llama" and _get(d, "attention_bias", False),
                mlp_bias=_get(d, "mlp_bias", False),
                sliding_window=d.get("sliding_window") if use_sliding else None,
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
                pad_token_id=d.get("pad_token_id"),
                torch_dtype=d.get("torch_dtype") or d.get("dtype"),
                extra={k: v for k, v in d.items() if k not in known},
            )
        except MiniDPOError as e:
            raise MiniDPOError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        from minidpo.io import read_json

        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """An HF-compatible config.json dict (transformers 4.x and 5.x both read it)."""
        d = copy.deepcopy(self.extra)
        d.update(
            architectures=[{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[
                self.model_type
            ]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=copy.deepcopy(self.rope_scaling),
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.model_type == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        else:
            d.update(sliding_window=self.sliding_window, use_sliding_window=self.sliding_window is not None)
        if self.torch_dtype is not None:
            d["torch_dtype"] = self.torch_dtype
        return d

    @property
    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        D, F, L, V = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = D * q + 2 * D * kv + q * D + (q + 2 * kv if self.attention_bias else 0) + (D if self.o_bias else 0)
        mlp = 3 * D * F + ((2 * F + D) if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * D
        head = 0 if self.tie_word_embeddings else V * D
        return V * D + L * per_layer + D + head


def _get(d: dict, key: str, default):
    """d[key], or `default` when the key is absent or null (as transformers reads config.json)."""
    value = d.get(key)
    return default if value is None else value


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(key, value, kind, what: str, *, low=None, strict=False, optional=False) -> None:
    """Raise the one-line error `key "K" must be WHAT, got V` unless `value` is of `kind` and >= low
    (> low when `strict`); None passes when `optional`."""
    if value is None and optional:
        return
    if not kind(value) or (low is not None and (value <= low if strict else value < low)):
        raise MiniDPOError(f'key "{key}" must be {what}, got {value!r}')


def _check_rope_scaling(scaling) -> None:
    """rope_scaling: None, or a dict whose rope_type is supported and has that type's parameters."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise MiniDPOError(f'key "rope_scaling" must be an object or null, got {scaling!r}')
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise MiniDPOError(f'rope type "{rope_type}" is not supported (supported: {", ".join(SUPPORTED_ROPE_TYPES)})')
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(rope_type, ())
    for key in needed:
        _check(f"rope_scaling.{key}", scaling.get(key), _is_number, f"a number > 0 for {rope_type} rope scaling",
               low=0, strict=True)
    if rope_type == "llama3":
        _check("rope_scaling.original_max_position_embeddings", scaling.get("original_max_position_embeddings"),
               _is_int, "an integer >= 1 for llama3 rope scaling", low=1)
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise MiniDPOError("rope_scaling: high_freq_factor must exceed low_freq_factor")
