"""LoRA: low-rank adapters on the linear layers of a frozen model, in PEFT's file layout.

LoRA (Hu et al. 2021, arXiv 2106.09685) trains a rank-r update of a frozen weight W0:

    y = W0 x + b + s * B A dropout(x),    A: (r, in), B: (out, r),   s = alpha / r

A starts Kaiming-uniform (a = sqrt 5, as nn.Linear and PEFT), B starts at zero, so the
adapted model equals the base model before the first step. rsLoRA (Kalajdzievski 2023,
arXiv 2312.03732) uses s = alpha / sqrt(r), which keeps the update's scale stable in r.

`LoRALinear` keeps the base layer's `weight` and `bias` as its own parameters, so the
model's state-dict names do not change (…q_proj.weight) and the adapter adds
…q_proj.lora_A.weight / …q_proj.lora_B.weight beside them. Its `disabled` flag turns the
update off: DPO's reference model is the same weights under `adapters_disabled(model)`
(the torchtune design), with no second copy in memory. `merge` folds s B A into W0 and
`unmerge` takes it out again; `merge_lora` merges and swaps every LoRALinear back to a
plain nn.Linear for export.

Files (PEFT's layout, so adapters move between minidpo and PEFT both ways):
    adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, ...
    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight / lora_B.weight
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from minidpo.errors import MiniDPOError, ParameterError
from minidpo.io import atomic_dir, atomic_write_json, read_json
from minidpo.quant import NF4Linear, NF4Weight, linear

ALL_LINEAR = "all-linear"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
OUTPUT_LAYER = "lm_head"  # never adapted by "all-linear", as in PEFT
PEFT_KEYS = {"alpha": "lora_alpha", "dropout": "lora_dropout"}  # LoRAConfig's names -> adapter_config.json's


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj")  # or "all-linear"
    use_rslora: bool = False

    def __post_init__(self):
        if self.r < 1:
            raise ParameterError(f"r must be >= 1, got {self.r}", "r")
        if not 0 <= self.dropout < 1:
            raise ParameterError(f"dropout must be in [0, 1), got {self.dropout}", "dropout")
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            self.target_modules = tuple(t.strip() for t in self.target_modules.split(",") if t.strip())
        elif not isinstance(self.target_modules, str):
            self.target_modules = tuple(self.target_modules)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Module):
    """A frozen nn.Linear (or NF4Linear, QLoRA) plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Linear | NF4Linear, config: LoRAConfig):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.use_rslora = config.r, config.alpha, config.use_rslora
        self.scale = config.scale
        # float32 master weights (float64 on a float64 base)
        kwargs = {"device": base.weight.device, "dtype": torch.promote_types(base.weight.dtype, torch.float32)}
        self.lora_A = nn.Linear(self.in_features, config.r, bias=False, **kwargs)
        self.lora_B = nn.Linear(config.r, self.out_features, bias=False, **kwargs)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.disabled = False
        self.merged = False
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)  # (..., out); the weight may be NF4 (QLoRA)
        if self.disabled or self.merged:
            return y
        a = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
        return y + (self.scale * self.lora_B(a)).to(y.dtype)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """s B A, the update to W0, in float32. Shape (out, in)."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            if isinstance(self.weight, NF4Weight):  # QLoRA: merge into the dequantized weight
                self.weight = nn.Parameter(self.weight.dequantize(), requires_grad=False)
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _is_target(name: str, module: nn.Module, targets: tuple[str, ...] | str) -> bool:
    if not isinstance(module, (nn.Linear, NF4Linear)):
        return False
    leaf = name.rsplit(".", 1)[-1]
    if targets == ALL_LINEAR:
        return leaf != OUTPUT_LAYER
    return leaf in targets or name in targets


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def apply_lora(model: nn.Module, config: LoRAConfig, *, only: set[str] | None = None) -> list[str]:
    """Freeze `model` and wrap its targeted nn.Linear layers in LoRALinear.

    `only` (module names) overrides the targets, as when loading an adapter file. Returns
    the wrapped module names; raises MiniDPOError when nothing matched.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    targets = config.target_modules if only is None else tuple(only)
    names = [name for name, module in model.named_modules() if _is_target(name, module, targets)]
    if not names:
        shown = targets if isinstance(targets, str) else ",".join(targets)
        raise ParameterError(f"target_modules {shown!r} matched no linear layer of the model", "target_modules")
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), config))
    return names


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear layers back."""
    for name, layer in list(lora_layers(model)):
        layer.merge()
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight = layer.weight
        plain.bias = layer.bias
        _replace(model, name, plain)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its base weights: every LoRA update is switched off inside the block."""
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise RuntimeError("adapters_disabled needs unmerged adapters; call unmerge() first")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was


def lora_config_of(model: nn.Module) -> LoRAConfig:
    """The LoRAConfig that describes the adapters in `model` (targets = their leaf names)."""
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers")
    first = layers[0][1]
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    targets = tuple(sorted({name.rsplit(".", 1)[-1] for name, _ in layers}))
    return LoRAConfig(r=first.r, alpha=first.alpha, dropout=dropout, target_modules=targets, use_rslora=first.use_rslora)


def adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's key names, float32, contiguous.

    `tensors` (full tensors by parameter name: a sharded model's, gathered) replaces the
    layers' own weights.
    """
    out = {}
    for name, layer in lora_layers(model):
        for part in ("lora_A", "lora_B"):
            weight = getattr(layer, part).weight if tensors is None else tensors[f"{name}.{part}.weight"]
            out[f"{PEFT_PREFIX}{name}.{part}.weight"] = weight.detach().float().contiguous().cpu()
    return out


def save_adapter(
    model: nn.Module, out_dir: str | Path, *, base_model_name_or_path: str | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model's adapters to `out_dir` in PEFT's layout (atomically, as one folder); `tensors` as above."""
    config = lora_config_of(model)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": list(config.target_modules),
        "use_rslora": config.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(adapter_state_dict(model, tensors), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        atomic_write_json(tmp / ADAPTER_CONFIG, peft_config)
    return out_dir


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# adapter_config.json values read_adapter takes: (key, accepts(value), what it must be)
_ADAPTER_VALUES = (
    ("r", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    ("lora_alpha", _is_number, "a finite number"),
    ("lora_dropout", _is_number, "a number in [0, 1)"),
    ("target_modules", lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, str) for t in v)),
     "a string or a list of strings"),
    ("use_rslora", lambda v: isinstance(v, bool), "true or false"),
)


def read_adapter(adapter_dir: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """Read a PEFT LoRA adapter folder: its config and {module name: {"A"|"B": tensor}}."""
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    raw = read_json(config_path)
    if not isinstance(raw, dict) or raw.get("peft_type", "LORA") != "LORA":
        raise MiniDPOError(f"{config_path}: not a LoRA adapter (peft_type must be LORA)")
    for key, ok in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if raw.get(key, ok) != ok:
            raise MiniDPOError(f"{config_path}: {key}={raw[key]!r} is not supported (only {key}={ok!r})")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if raw.get(key):
            raise MiniDPOError(f"{config_path}: {key} is not supported; remove it or re-save the adapter without it")
    if not weights_path.exists():
        if (adapter_dir / "adapter_model.bin").exists():
            raise MiniDPOError(f"{adapter_dir}: only adapter_model.bin (pickle) found; save the adapter as safetensors")
        raise MiniDPOError(f"{weights_path}: file not found")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise MiniDPOError(f"{weights_path}: not a readable safetensors file ({e})") from None
    for key, accepts, what in _ADAPTER_VALUES:
        if raw.get(key) is not None and not accepts(raw[key]):
            raise MiniDPOError(f'{config_path}: "{key}" must be {what}, got {raw[key]!r}')
    targets = raw.get("target_modules") or ()
    try:
        config = LoRAConfig(
            r=int(raw.get("r", 8)),
            alpha=float(raw.get("lora_alpha", 8)),
            dropout=float(raw.get("lora_dropout", 0.0)),
            target_modules=targets if isinstance(targets, str) else tuple(targets),
            use_rslora=bool(raw.get("use_rslora", False)),
        )
    except ParameterError as e:  # named as the file's keys
        raise MiniDPOError(f"{config_path}: {e.renamed(lambda name: PEFT_KEYS.get(name, name))}") from None
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise MiniDPOError(f"{weights_path}: unexpected tensor {key!r} (expected {PEFT_PREFIX}<module>.lora_A/B.weight)")
        if not tensor.is_floating_point():
            raise MiniDPOError(f"{weights_path}: tensor {key!r} has dtype {str(tensor.dtype)[6:]}, expected a float")
        if not torch.isfinite(tensor).all():
            raise MiniDPOError(f"{weights_path}: tensor {key!r} holds NaN or inf values; the adapter is damaged")
        module, part = key[len(PEFT_PREFIX) : -len(".weight")].rsplit(".", 1)
        weights.setdefault(module, {})[part[-1]] = tensor
    return config, weights


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir: str | Path) -> LoRAConfig:
    """Wrap the modules named in a PEFT adapter and load its weights into `model`."""
    config, weights = read_adapter(adapter_dir)
    weights_path = Path(adapter_dir) / ADAPTER_WEIGHTS
    modules = dict(model.named_modules())
    for name, parts in weights.items():
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, NF4Linear, LoRALinear)):
            raise MiniDPOError(f"{weights_path}: adapter for {name!r}, which is not a linear layer of this model")
        if set(parts) != {"A", "B"}:
            raise MiniDPOError(f"{weights_path}: {name} needs both lora_A and lora_B")
        expected_a, expected_b = (config.r, module.in_features), (module.out_features, config.r)
        if tuple(parts["A"].shape) != expected_a or tuple(parts["B"].shape) != expected_b:
            raise MiniDPOError(
                f"{weights_path}: {name} has lora_A {tuple(parts['A'].shape)} / lora_B {tuple(parts['B'].shape)}, "
                f"expected {expected_a} / {expected_b} (r={config.r}); is this adapter for another model?"
            )
    if any(True for _ in lora_layers(model)):
        raise MiniDPOError("the model already has LoRA adapters; load the adapter into a fresh model")
    apply_lora(model, config, only=set(weights))
    for name, layer in lora_layers(model):
        layer.lora_A.weight.copy_(weights[name]["A"])
        layer.lora_B.weight.copy_(weights[name]["B"])
    return config
