"""NF4: QLoRA's 4-bit NormalFloat weights with double-quantized scales (Dettmers et al. 2023, arXiv 2305.14314).

The format is bitsandbytes' `quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)`,
and the codes and dequantized values here equal its own bit for bit (tests/test_quant.py).

Codebook. Pretrained weights are close to normally distributed, so the 16 levels are quantiles
of N(0, 1), equally likely for a normal weight, with an exact zero. With Phi^-1 the normal
quantile function and delta = 1 - (1/30 + 1/32) / 2 = 0.9677083 (halfway between the outermost
quantile positions for 15 and 16 levels, which keeps the end levels finite):

    8 positive levels   Phi^-1(p) for the first 8 of 9 points p evenly spaced from delta to 1/2
    7 negative levels   -Phi^-1(p) for the first 7 of 8 points p evenly spaced from delta to 1/2
    and 0; all 16 are divided by Phi^-1(delta), so that they span [-1, 1].

`NF4_CODE` holds them as float32 (QLoRA's published table, within 1.2e-7 of the formula).

Quantization of a weight of n elements, flattened row-major (a block may straddle rows):

    block b             elements 64b .. 64b+63 (the last one zero-padded)
    absmax[b]           max |w| over the block, float32
    code of w           the index of the NF4 level nearest to w * (1 / absmax[b]) (clamped to
                        [-1, 1]); a value exactly halfway between two levels takes the lower one
    storage             two codes a byte, element 2j in the high nibble of byte j

Double quantization of the scales (block 256), which saves 0.37 bits a weight:

    offset              mean of all absmax[b], float32
    a2[c]               max |absmax[b] - offset| over scale block c = b // 256, float32
    scale code of b     the index of the value of the 8-bit map nearest to (absmax[b] - offset) / a2[c],
                        the lower one on a tie

The 8-bit map is bitsandbytes' signed "dynamic" data type (Dettmers 2016, arXiv 1511.04561):
for each e = 0..6, the 2**e magnitudes 10**(e-6) * m, m the midpoints of 2**e + 1 points evenly
spaced on [0.1, 1]; with their negatives, 0 and 1 that is 256 values (so the most negative
is -0.993, not -1). Dequantization, w = code[q] * (map[q2] * a2 + offset), is kernels/nf4.py (PyTorch
reference and Triton kernel).

Storage: 4 + 8/64 + 32/(64*256) = 4.127 bits a weight, against 16 for bf16.

QLoRA trains LoRA adapters on the frozen NF4 base. `NF4Linear` is a linear layer whose forward
dequantizes its weight to the compute dtype (autocast's, else the input's) and multiplies;
its backward dequantizes again for dL/dx = dL/dy W, so no dense weight outlives the layer's
own forward or backward. LoRA wraps an NF4Linear as it wraps an nn.Linear (minidpo.lora), and
merging adds s B A to the dequantized weight. Embeddings, norms and lm_head are not quantized.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from minidpo.errors import ParameterError
from minidpo.kernels.nf4 import BLOCK_SIZE, SCALE_BLOCK_SIZE, dequantize_nf4

QUANTIZATIONS = ("nf4",)
NOT_QUANTIZED = "lm_head"  # the output layer keeps the model's dtype (it may be the tied embedding)

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# Blocks quantized at a time: 2**16 blocks = 4M weights (about 50 MiB of float32/int64 temporaries).
QUANTIZE_CHUNK_BLOCKS = 1 << 16


def scale_code_values() -> torch.Tensor:
    """The 256 sorted float32 values of the signed 8-bit dynamic map."""
    magnitudes = []
    for e in range(7):
        points = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)  # (2**e + 1,)
        magnitudes.append((points[:-1] + points[1:]) / 2 * 10.0 ** (e - 6))  # (2**e,)
    m = torch.cat(magnitudes)  # (127,)
    return torch.cat([-m, m, torch.tensor([0.0, 1.0])]).sort().values  # (256,)


@functools.cache
def code_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(NF4 levels (16,), 8-bit scale map (256,)), float32 on `device`."""
    return torch.tensor(NF4_CODE, device=device), scale_code_values().to(device)


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ParameterError(f"quantize {quantize!r} is not supported; use {' or '.join(QUANTIZATIONS)}", "quantize")


@torch.no_grad()
def _quantize_blocks(flat: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed 4-bit codes ((n + 1) // 2,) uint8 and block absmax (blocks,) float32 of a flat weight."""
    n = flat.numel()
    blocks = -(-n // BLOCK_SIZE)
    midpoints = (code[:-1] + code[1:]) / 2  # (15,) decision boundaries
    codes = torch.empty(blocks * BLOCK_SIZE // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=flat.device)
    for start in range(0, blocks, QUANTIZE_CHUNK_BLOCKS):
        stop = min(start + QUANTIZE_CHUNK_BLOCKS, blocks)
        x = flat[start * BLOCK_SIZE : stop * BLOCK_SIZE].float()
        x = F.pad(x, (0, (stop - start) * BLOCK_SIZE - x.numel())).view(stop - start, BLOCK_SIZE)  # (B, 64)
        a = x.abs().amax(dim=1)  # (B,)
        scaled = (x * (1.0 / a.clamp(min=1e-38))[:, None]).clamp(-1, 1)  # (B, 64)
        q = torch.bucketize(scaled, midpoints).to(torch.uint8)  # (B, 64), a tie goes to the lower level
        codes[start * BLOCK_SIZE // 2 : stop * BLOCK_SIZE // 2] = ((q[:, 0::2] << 4) | q[:, 1::2]).view(-1)
        absmax[start:stop] = a
    return codes[: (n + 1) // 2].clone(), absmax


@torch.no_grad()
def _quantize_scales(absmax: torch.Tensor, scale_code: torch.Tensor):
    """Double quantization: (8-bit codes (blocks,), a2 (groups,) float32, offset () float32)."""
    offset = absmax.mean()  # ()
    n = absmax.numel()
    groups = -(-n // SCALE_BLOCK_SIZE)
    centered = F.pad(absmax - offset, (0, groups * SCALE_BLOCK_SIZE - n)).view(groups, SCALE_BLOCK_SIZE)
    a2 = centered.abs().amax(dim=1)  # (G,)
    normed = torch.where(a2[:, None] > 0, centered / a2[:, None], 0.0).view(-1)[:n]  # (blocks,) in [-1, 1]
    left = (torch.searchsorted(scale_code, normed, right=True) - 1).clamp(0, scale_code.numel() - 2)  # (blocks,)
    closer = (normed - scale_code[left + 1]).abs() < (normed - scale_code[left]).abs()  # a tie stays left
    return (left + closer).to(torch.uint8), a2, offset


class NF4Weight(nn.Module):
    """A frozen weight stored as NF4 (see the module docstring); `dequantize()` gives it back dense.

    Buffers: codes ((n + 1) // 2,) uint8, scale_codes (blocks,) uint8, scale_absmax (groups,)
    float32, scale_offset () float32. `dtype` is the default dtype of `dequantize()`. Moving
    the module (`.to(device)`, `.cuda()`) moves the buffers; a dtype cast (`.to(torch.bfloat16)`,
    `.half()`) changes only that default, never the stored format.
    """

    def __init__(self, codes, scale_codes, scale_absmax, scale_offset, shape, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scale_codes", scale_codes)
        self.register_buffer("scale_absmax", scale_absmax)
        self.register_buffer("scale_offset", scale_offset)
        self.shape, self.dtype = torch.Size(shape), dtype

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype | None = None) -> NF4Weight:
        """Quantize a float tensor on its own device; `dtype` defaults to the tensor's."""
        code, scale_code = code_tables(weight.device)
        codes, absmax = _quantize_blocks(weight.detach().reshape(-1), code)
        scale_codes, scale_absmax, offset = _quantize_scales(absmax, scale_code)
        return cls(codes, scale_codes, scale_absmax, offset, weight.shape, dtype or weight.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight, shape `self.shape`, in `dtype` (default `self.dtype`)."""
        code, scale_code = code_tables(self.codes.device)
        flat = dequantize_nf4(self.codes, self.scale_codes, self.scale_absmax, self.scale_offset, code, scale_code,
                              self.shape.numel(), dtype or self.dtype)  # fmt: skip
        return flat.view(self.shape)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, device=self.codes.device))  # where (and as what) a float32 tensor goes
        for name, t in self._buffers.items():
            self._buffers[name] = t.to(probe.device)
        if probe.dtype != torch.float32:
            self.dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, dtype={self.dtype}, nbytes={self.nbytes}"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _NF4Matmul(torch.autograd.Function):
    """y = x W^T + b with W dequantized in the forward and again in the backward (never saved)."""

    @staticmethod
    def forward(ctx, x, weight: NF4Weight, bias):
        dtype = _compute_dtype(x)
        ctx.weight, ctx.dtype, ctx.x_dtype = weight, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x.to(dtype), weight.dequantize(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y.to(ctx.dtype) @ ctx.weight.dequantize(ctx.dtype)).to(ctx.x_dtype)  # (..., in)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(ctx.bias_dtype)  # (out,)
        return grad_x, None, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor | NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b for a dense weight (F.linear) or an NF4Weight."""
    if isinstance(weight, NF4Weight):
        return _NF4Matmul.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class NF4Linear(nn.Module):
    """A frozen linear layer with an NF4 weight: y = x dequantize(W)^T + b."""

    def __init__(self, weight: NF4Weight, bias: nn.Parameter | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        if bias is not None:
            bias.requires_grad_(False)

    @classmethod
    def from_linear(cls, layer: nn.Linear, dtype: torch.dtype | None = None) -> NF4Linear:
        return cls(NF4Weight.quantize(layer.weight, dtype), layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


def is_quantizable(name: str, module: nn.Module) -> bool:
    """Whether `quantize="nf4"` stores this module as NF4: every nn.Linear but the output layer."""
    return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] != NOT_QUANTIZED


def quantize_layer(model: nn.Module, name: str, weight: torch.Tensor, dtype: torch.dtype) -> None:
    """Put an NF4Linear holding `weight` (quantized) in place of the linear layer `name`, keeping its bias."""
    layer = model.get_submodule(name)
    model.set_submodule(name, NF4Linear(NF4Weight.quantize(weight, dtype), layer.bias))


def quantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Quantize every quantizable linear layer of an already loaded model, in place."""
    for name, module in list(model.named_modules()):
        if is_quantizable(name, module):
            quantize_layer(model, name, module.weight, dtype or module.weight.dtype)
    return model


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Put plain nn.Linear layers, with the dequantized weights, back in place of every NF4Linear."""
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight = nn.Parameter(module.weight.dequantize(), requires_grad=False)
            plain.bias = module.bias
            model.set_submodule(name, plain)
    return model
