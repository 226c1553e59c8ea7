"""Hugging Face-format checkpoint folders: load into a model, save from one.

A folder holds config.json and the weights as safetensors, either one model.safetensors
or shards named by model.safetensors.index.json:

    {"metadata": {"total_size": <bytes>}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors", ...}}

Tensor names are HF's (model.layers.N.self_attn.q_proj.weight, ...), which are minidpo's
module names, so a state dict maps one to one. A model with tied embeddings stores no
lm_head.weight. Loading never holds two copies of the weights: the model is built on the
meta device (shapes, no storage) and each tensor read from a shard is cast, moved and
assigned in place of its meta parameter, one at a time. Format: huggingface/safetensors
and transformers' `save_pretrained` (the shard and index naming).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minidpo.config import ModelConfig
from minidpo.errors import MiniDPOError
from minidpo.io import atomic_dir, atomic_write_json, check_output_dir, read_json

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Files a tokenizer may consist of (tokenizers, sentencepiece and transformers' own).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# Non-persistent buffers that old transformers versions wrote into checkpoints.
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")


# ---- loading


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    config: ModelConfig | None = None,
    quantize: str | None = None,
):
    """Load an HF-format folder into a LlamaForCausalLM with `dtype` weights on `device`.

    Returns (model, config). Floating-point tensors are cast to `dtype` whatever the file
    stores (fp32, fp16 or bf16). `config` overrides the folder's config.json. With
    quantize="nf4" every linear layer but lm_head becomes a frozen NF4Linear (minidpo.quant)
    computing in `dtype`, each weight quantized on `device` as it is read.
    """
    from minidpo.model import LlamaForCausalLM
    from minidpo.quant import check_quantize, is_quantizable, quantize_layer

    check_quantize(quantize)

    folder = Path(path)
    if not folder.is_dir():
        raise MiniDPOError(f"{folder}: model folder not found (expected config.json + model.safetensors)")
    if config is None:
        if not (folder / "config.json").is_file():
            raise MiniDPOError(
                f"{folder / 'config.json'}: file not found; is {folder} an HF-format model folder?"
            )
        config = ModelConfig.from_file(folder / "config.json")
    device = torch.device(device)

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = model.state_dict(keep_vars=True)  # name -> meta parameter or persistent buffer
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)

    loaded: set[str] = set()
    for file, names in _weight_files(folder):
        for name, tensor in _read_tensors(file, names):
            if _IGNORED_KEYS.match(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
                continue
            if name not in expected:
                raise MiniDPOError(
                    f"{file}: unexpected tensor {name!r} (not part of a {config.model_type} model with this "
                    f"config.json; is the checkpoint for another architecture?)"
                )
            target = expected[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise MiniDPOError(
                    f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies "
                    f"{tuple(target.shape)} (do config.json and the weights belong together?)"
                )
            _check_values(file, name, tensor, target)
            owner_name, _, attr = name.rpartition(".")
            if quantize and attr == "weight" and is_quantizable(owner_name, model.get_submodule(owner_name)):
                quantize_layer(model, owner_name, tensor.to(device), dtype)
            else:
                _assign(
                    model, name, tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
                )
            loaded.add(name)

    missing = [name for name in expected if name not in loaded]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MiniDPOError(
            f"{folder}: checkpoint has no tensor {missing[0]!r}{more} (incomplete download, or config.json of another model?)"
        )
    model.tie_weights()
    model.eval()
    return model, config


def _weight_files(folder: Path) -> list[tuple[Path, list[str] | None]]:
    """The safetensors files of a folder, each with the names the index assigns to it (None: all)."""
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise MiniDPOError(f'{index_path}: key "weight_map" is missing or empty')
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            if not (folder / file).is_file():
                raise MiniDPOError(
                    f"{index_path}: shard {file!r} (holding {names[0]!r}) is missing from {folder}"
                )
        return [(folder / file, names) for file, names in by_file.items()]
    if (folder / WEIGHTS_NAME).is_file():
        return [(folder / WEIGHTS_NAME, None)]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise MiniDPOError(
            f"{folder}: has only pickle weights (*.bin/*.pt); minidpo reads safetensors only "
            f"(convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise MiniDPOError(f"{folder / WEIGHTS_NAME}: file not found (and no {INDEX_NAME})")


def _read_tensors(file: Path, names: list[str] | None):
    """Yield (name, CPU tensor) from one safetensors file; corrupt files become MiniDPOError."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            if names is not None:
                absent = [n for n in names if n not in keys]
                if absent:
                    raise MiniDPOError(
                        f"{file}: tensor {absent[0]!r} named in {INDEX_NAME} is not in this shard"
                    )
            for name in keys if names is None else names:
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise MiniDPOError(f"{file}: corrupt or truncated safetensors file ({_first_line(e)})") from None


def _check_values(file: Path, name: str, tensor: torch.Tensor, target: torch.Tensor) -> None:
    """A float where the model has a float, and no NaN or inf: one pass over each tensor at load
    time, so that a damaged checkpoint is named here instead of producing NaN losses later."""
    if target.is_floating_point() and not tensor.is_floating_point():
        raise MiniDPOError(
            f"{file}: tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected a float "
            f"(float32, bfloat16 or float16); minidpo loads unquantized safetensors checkpoints"
        )
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise MiniDPOError(f"{file}: tensor {name!r} holds NaN or inf values; the checkpoint is damaged")


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the (meta) parameter or buffer called `name`."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        owner._parameters[attr] = torch.nn.Parameter(
            tensor, requires_grad=owner._parameters[attr].requires_grad
        )
    else:
        owner._buffers[attr] = tensor


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---- saving


def save_model(
    model,
    path: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    tokenizer_from: str | Path | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` as an HF-format folder, replacing `path` atomically.

    config.json + model.safetensors, or shards + index when the weights exceed
    `max_shard_size` ("5GB" = 5e9 bytes, "2GiB" = 2 * 2**30, or an int). `dtype` casts the
    floating-point weights (default: as they are). `tokenizer_from` names a folder whose
    tokenizer files are copied along. `state` (full tensors by name: a sharded model's,
    gathered) replaces model.state_dict().
    """
    config: ModelConfig = model.config
    state = dict(model.state_dict() if state is None else state)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    saved_dtype = dtype or next(v.dtype for v in state.values() if v.is_floating_point())
    config_dict = config.to_dict() | {"torch_dtype": str(saved_dtype).removeprefix("torch.")}
    with atomic_dir(path) as tmp:
        write_weights(state, tmp, max_shard_size=max_shard_size, dtype=dtype)
        atomic_write_json(tmp / "config.json", config_dict)
        if tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, tmp)
    return Path(path)


def merge_adapter(
    model_dir: str | Path, adapter_dir: str | Path, out: str | Path, *, dtype: torch.dtype | None = None,
    quantize: str | None = None,
) -> Path:
    """Fold a LoRA adapter (PEFT layout) into its base model and write the result as a folder.

    The merge is done in float32; the weights are written in `dtype` (default: the base
    folder's own dtype, float32 when it names none), with the base folder's tokenizer files.
    quantize="nf4" is for an adapter trained on the NF4 base (QLoRA): it is merged into the
    dequantized weights, the model it was trained with, and every layer is written dense.
    `out` may not be a file, nor a folder of other files (it is replaced whole).
    """
    from minidpo.lora import load_adapter, merge_lora
    from minidpo.quant import dequantize_model

    check_output_dir(out, "out", replaces="config.json")
    model, config = load_model(model_dir, dtype=torch.float32, quantize=quantize)
    load_adapter(model, adapter_dir)
    dequantize_model(merge_lora(model))
    if dtype is None:
        stored = config.torch_dtype if config.torch_dtype in ("float32", "bfloat16", "float16") else "float32"
        dtype = getattr(torch, stored)
    return save_model(model, out, dtype=dtype, tokenizer_from=model_dir)


def write_weights(
    tensors: dict[str, torch.Tensor],
    folder: Path,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
) -> None:
    """Write `tensors` into `folder` as model.safetensors or as shards with an index.

    Tensors are grouped in their order into shards of at most `max_shard_size` bytes (a
    single larger tensor gets a shard of its own), as transformers' save_pretrained does.
    """
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    shard_bytes, total = 0, 0
    for name, t in tensors.items():
        size = t.numel() * (
            dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size()
        )
        if shards[-1] and shard_bytes + size > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size
        total += size
    n = len(shards)
    files = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for file, names in zip(files, shards):
        shard = {}
        for name in names:
            t = tensors[name].detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            shard[name] = t.to("cpu").contiguous()
            weight_map[name] = file
        save_file(shard, str(folder / file), metadata={"format": "pt"})
    if n > 1:
        atomic_write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


def parse_size(size: int | str) -> int:
    """Bytes in "5GB" (decimal), "2GiB" (binary), "100KB", "10MB" or an int."""
    if isinstance(size, int):
        size = str(size) + "B"
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", size.upper().replace("IB", "iB"))
    if m is None:
        raise MiniDPOError(f'shard size "{size}" is not understood (write e.g. 5GB, 500MB or 2GiB)')
    base = 1024 if m.group(3) else 1000
    limit = int(float(m.group(1)) * base ** "_KMGT".index(m.group(2) or "_"))
    if limit < 1:
        raise MiniDPOError(f'shard size "{size}" must be at least one byte (write e.g. 5GB, 500MB or 2GiB)')
    return limit


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files present in folder `src` into `dst`; returns their names."""
    src, dst = Path(src), Path(dst)
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not copied:
        raise MiniDPOError(f"{src}: no tokenizer files found (expected tokenizer.json or tokenizer.model)")
    for name in copied:
        shutil.copyfile(src / name, dst / name)
    return copied
