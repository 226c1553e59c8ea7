"""Import a llama.cpp GGUF file as an HF-format folder minidpo (and transformers) can load.

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2/")
    # -> smollm2/config.json, model.safetensors, tokenizer.json, tokenizer_config.json

The file is read with the `gguf` package (ggml-org/llama.cpp, gguf-py). What the import
undoes, from llama.cpp's convert_hf_to_gguf.py:
- names: token_embd -> model.embed_tokens, blk.N.attn_q -> model.layers.N.self_attn.q_proj,
  ffn_gate -> mlp.gate_proj, attn_norm -> input_layernorm, ffn_norm ->
  post_attention_layernorm, output_norm -> model.norm, output -> lm_head (absent: tied);
- quantization: every tensor is dequantized to float32 (gguf.quants) and cast to `dtype`;
  the result is the exact function the quantized file computes, in full precision;
- the Q/K row order: llama.cpp interleaves the two rotary halves of each head,
      w.reshape(n_head, 2, hd / 2, D).swapaxes(1, 2)       # HF (rotate-half) -> GGUF
  so the inverse is w.reshape(n_head, hd / 2, 2, D).swapaxes(1, 2), with K using the
  key/value head count;
- the config: llama.* metadata keys -> config.json; Llama 3.x rope scaling is stored only
  as the per-frequency factors of rope_freqs.weight, from which "llama3" parameters are
  recovered and checked;
- the tokenizer: tokenizer.ggml.tokens/merges/token_type -> a byte-level BPE tokenizer.json
  (control tokens become special tokens); tokenizer.ggml.pre names the pre-tokenizer,
  e.g. "smollm" = digits split one by one, then GPT-2's byte-level regex (as in SmolLM2's
  own tokenizer.json), "llama-bpe" = Llama 3's split regex.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from minidpo.checkpoint import parse_size, write_weights
from minidpo.config import ModelConfig
from minidpo.errors import MiniDPOError
from minidpo.io import atomic_dir, atomic_write, atomic_write_json, check_output_dir

# Dequantized by gguf.quants; tests/test_gguf.py checks each against an independent decoder.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (each \p{N} character alone first?, split regex; None = GPT-2's, built
# into ByteLevel). Names and rules from llama.cpp's llama-vocab.cpp.
PRE_TOKENIZERS = {
    "default": (False, None),
    "gpt-2": (False, None),
    "smollm": (True, None),
    "starcoder": (True, None),
    "refact": (True, None),
    "llama-bpe": (False, _LLAMA3_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT),
    "llama-v3": (False, _LLAMA3_SPLIT),
    "smaug-bpe": (False, _LLAMA3_SPLIT),
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    *,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Convert a llama-architecture GGUF into an HF-format folder `out_dir` (replaced atomically;
    it may not be a file, nor a folder of other files)."""
    path = Path(gguf_path)
    check_output_dir(out_dir, "out_dir", replaces="config.json")
    parse_size(max_shard_size)  # a bad size fails before the slow part
    reader = open_gguf(path)
    meta = _Metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise MiniDPOError(
            f'{path}: general.architecture is "{arch}"; minidpo imports llama-architecture GGUFs only'
        )

    tensors = {t.name: t for t in reader.tensors}
    config = gguf_config(meta, tensors, dtype)
    tokenizer, tokenizer_config = gguf_tokenizer(meta)
    state = {}
    for name, t in tensors.items():
        if name == "rope_freqs.weight":
            continue  # folded into config.rope_scaling
        hf_name = hf_tensor_name(name, path)
        w = dequantize(t, path).to(dtype)  # (out, in) or (D,)
        if hf_name.endswith("q_proj.weight"):
            w = unpermute_qk(w, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = unpermute_qk(w, config.num_key_value_heads)
        state[hf_name] = w

    with atomic_dir(out_dir) as tmp:
        write_weights(state, tmp, max_shard_size=max_shard_size)
        atomic_write_json(tmp / "config.json", config.to_dict())
        atomic_write(tmp / "tokenizer.json", tokenizer.to_str(pretty=True))
        atomic_write_json(tmp / "tokenizer_config.json", tokenizer_config)
    return Path(out_dir)


def open_gguf(path: Path):
    """A gguf.GGUFReader for `path`; a missing, foreign or truncated file is a one-line error."""
    from gguf import GGUFReader

    if not path.is_file():
        raise MiniDPOError(f"{path}: file not found")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, ... on malformed bytes
        raise MiniDPOError(
            f"{path}: not a readable GGUF file ({str(e).strip() or type(e).__name__})"
        ) from None


class _Metadata:
    """GGUF key/value metadata with one-line errors naming the file and key."""

    _REQUIRED = object()

    def __init__(self, reader, path: Path):
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default=_REQUIRED):
        field = self.fields.get(key)
        if field is None:
            if default is self._REQUIRED:
                raise MiniDPOError(f"{self.path}: metadata key {key} is missing")
            return default
        return field.contents()


def hf_tensor_name(name: str, path: Path) -> str:
    """llama.cpp tensor name -> HF name ("blk.3.ffn_up.weight" -> "model.layers.3.mlp.up_proj.weight")."""
    stem, _, kind = name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    raise MiniDPOError(f"{path}: tensor {name!r} has no counterpart in a Llama model (is this a llama GGUF?)")


def dequantize(t, path: Path) -> torch.Tensor:
    """One GGUF tensor as a float32 torch tensor in HF shape (rows, columns)."""
    from gguf import quants

    qtype = t.tensor_type.name
    if qtype not in SUPPORTED_TYPES:
        raise MiniDPOError(
            f"{path}: tensor {t.name!r} has type {qtype}; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    values = quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
    values = np.array(values, dtype=np.float32, copy=not values.flags.writeable or values.dtype != np.float32)
    return torch.from_numpy(values.reshape(shape))


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of each head's rotary halves in a Q or K projection."""
    out, d = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, hd // 2, 2, d).swapaxes(1, 2).reshape(out, d)  # (n_heads * hd, D)


def gguf_config(meta: _Metadata, tensors: dict, dtype: torch.dtype) -> ModelConfig:
    """The ModelConfig the llama.* metadata describes."""
    heads = meta.get("llama.attention.head_count")
    hidden = meta.get("llama.embedding_length")
    head_dim = meta.get("llama.attention.key_length", hidden // heads if heads else None)
    rope_dim = meta.get("llama.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise MiniDPOError(
            f"{meta.path}: llama.rope.dimension_count {rope_dim} != head dim {head_dim} (partial rotary)"
        )
    rope_theta = _f32(meta.get("llama.rope.freq_base", 10000.0))
    tokens = meta.get("tokenizer.ggml.tokens", None)
    vocab = meta.get("llama.vocab_size", len(tokens) if tokens else None)
    if vocab is None:
        raise MiniDPOError(
            f"{meta.path}: metadata key llama.vocab_size is missing (and no tokenizer.ggml.tokens)"
        )

    scaling_type = meta.get("llama.rope.scaling.type", "none")
    if "rope_freqs.weight" in tensors:
        freqs = dequantize(tensors["rope_freqs.weight"], meta.path)
        rope_scaling = _llama3_rope_scaling(freqs, rope_theta, head_dim, meta.path)
    elif scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": _f32(meta.get("llama.rope.scaling.factor"))}
    elif scaling_type == "none":
        rope_scaling = None
    else:
        raise MiniDPOError(
            f'{meta.path}: llama.rope.scaling.type "{scaling_type}" is not supported (none, linear)'
        )

    try:
        return ModelConfig(
            model_type="llama",
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=meta.get("llama.feed_forward_length"),
            num_hidden_layers=meta.get("llama.block_count"),
            num_attention_heads=heads,
            num_key_value_heads=meta.get("llama.attention.head_count_kv", heads),
            head_dim=head_dim,
            rms_norm_eps=_f32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=meta.get("llama.context_length", 2048),
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id", None),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id", None),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id", None),
            torch_dtype=str(dtype).removeprefix("torch."),
        )
    except MiniDPOError as e:  # a metadata value out of range, named by its config.json key
        raise MiniDPOError(f"{meta.path}: {e}") from None


def _f32(x: float) -> float:
    """The shortest decimal that round-trips a float32 from the file (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _llama3_rope_scaling(factors: torch.Tensor, theta: float, head_dim: int, path: Path) -> dict:
    """Recover Llama 3.x's rope_scaling from the per-frequency factors llama.cpp stores.

    Llama 3.1/3.2 stretch wavelengths longer than original_max_position_embeddings /
    low_freq_factor by `factor`, leave those shorter than .../high_freq_factor alone, and
    interpolate in between. The file keeps only the result; the largest factor is `factor`
    and the other three are Meta's published values (1, 4, 8192), checked against the file.
    """
    scaling = {
        "rope_type": "llama3",
        "factor": _f32(factors.max().item()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
    wavelen = 2 * math.pi / inv_freq
    old_ctx, lo, hi, factor = (
        scaling["original_max_position_embeddings"],
        scaling["low_freq_factor"],
        scaling["high_freq_factor"],
        scaling["factor"],
    )
    smooth = ((old_ctx / wavelen - lo) / (hi - lo)).clamp(0, 1)
    expected = 1 / ((1 - smooth) / factor + smooth)  # 1 for short wavelengths, `factor` for long ones
    if factors.shape != expected.shape or not torch.allclose(factors.double(), expected, rtol=1e-3):
        raise MiniDPOError(
            f"{path}: rope_freqs.weight does not match Llama 3's rope scaling; cannot import it"
        )
    return scaling


def gguf_tokenizer(meta: _Metadata):
    """(tokenizers.Tokenizer, tokenizer_config.json dict) from the tokenizer.ggml.* metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise MiniDPOError(
            f'{meta.path}: tokenizer.ggml.model is "{kind}"; minidpo imports byte-level BPE ("gpt2") tokenizers only'
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise MiniDPOError(
            f'{meta.path}: tokenizer.ggml.pre "{pre}" is not known to minidpo (known: {", ".join(PRE_TOKENIZERS)})'
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    token_types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    split_digits, split_regex = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    if split_regex is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(split_regex), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, token_types) if k == _CONTROL]
    )
    tok.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, k in zip(tokens, token_types)
            if k == _USER_DEFINED
        ]
    )

    def token(key):
        i = meta.get(key, None)
        return (tokens[i], i) if i is not None and 0 <= i < len(tokens) else (None, None)

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    bos, bos_id = token("tokenizer.ggml.bos_token_id")
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": bos,
        "eos_token": token("tokenizer.ggml.eos_token_id")[0],
        "pad_token": token("tokenizer.ggml.padding_token_id")[0],
        "unk_token": token("tokenizer.ggml.unknown_token_id")[0],
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get("llama.context_length", 2048),
    }
    template = meta.get("tokenizer.chat_template", None)
    if template is not None:
        config["chat_template"] = template
    return tok, config
