"""Dequantization of NF4 weights (QLoRA's 4-bit NormalFloat with double-quantized scales).

The format and its quantizer are in `minidpo/quant.py`; this file turns the stored codes
back into a dense weight. For element i of the flattened weight, in block b = i // 64 whose
8-bit scale code sits in scale block b // 256:

    absmax[b] = scale_code[scale_codes[b]] * scale_absmax[b // 256] + scale_offset    (float32)
    w[i]      = code[nibble(i)] * absmax[b]                                             (float32, then cast)

where nibble(i) is the high half of byte i // 2 for even i and the low half for odd i, `code`
the 16 NormalFloat values and `scale_code` the 256-entry 8-bit map of the scales. Every
product and sum is rounded to float32 separately (no fused multiply-add), as bitsandbytes
does, so the result is bit-identical to its `dequantize_4bit` in float32, bfloat16 and float16.

Two implementations sit side by side: the plain-PyTorch reference below, chunked over blocks
so that its int64 index temporaries stay small, and the Triton kernel in `nf4_triton.py`.
`dequantize_nf4` dispatches as `token_logprobs` does: Triton when the codes are on CUDA or
TRITON_INTERPRET=1 is set, the reference otherwise.
"""

import torch
import torch.nn.functional as F

from .logprobs import uses_triton

BLOCK_SIZE = 64  # weights per absmax scale
SCALE_BLOCK_SIZE = 256  # scales per float32 scale of the scales (double quantization)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Blocks per reference chunk: 2**16 blocks = 4M weights (32 MiB of int64 indices).
REFERENCE_CHUNK_BLOCKS = 1 << 16


def check_packed(codes, scale_codes, scale_absmax, scale_offset, numel: int, dtype: torch.dtype) -> None:
    """Raise ValueError unless the tensors are one consistent NF4 weight of `numel` elements."""
    blocks = -(-numel // BLOCK_SIZE)
    expected = {
        "codes": (codes, torch.uint8, (numel + 1) // 2),
        "scale_codes": (scale_codes, torch.uint8, blocks),
        "scale_absmax": (scale_absmax, torch.float32, -(-blocks // SCALE_BLOCK_SIZE)),
        "scale_offset": (scale_offset, torch.float32, 1),
    }
    for name, (t, want_dtype, want_numel) in expected.items():
        if t.dtype != want_dtype or t.numel() != want_numel or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous {want_dtype} tensor of {want_numel} elements for {numel} "
                f"weights, got {t.dtype} with {t.numel()}"
            )
        if t.device != codes.device:
            raise ValueError(f"{name} is on {t.device} but codes are on {codes.device}")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")


def dequantize_nf4_reference(codes, scale_codes, scale_absmax, scale_offset, code, scale_code, numel, dtype):
    """The flat dequantized weight (numel,) in `dtype`, computed with PyTorch ops (any device)."""
    check_packed(codes, scale_codes, scale_absmax, scale_offset, numel, dtype)
    blocks = scale_codes.numel()
    out = torch.empty(numel, dtype=dtype, device=codes.device)  # (n,)
    for start in range(0, blocks, REFERENCE_CHUNK_BLOCKS):
        stop = min(start + REFERENCE_CHUNK_BLOCKS, blocks)
        b = torch.arange(start, stop, device=codes.device)  # (B,) block indices
        absmax = scale_code[scale_codes[start:stop].long()] * scale_absmax[b // SCALE_BLOCK_SIZE]  # (B,) f32
        absmax = absmax + scale_offset  # a separate rounding, not fused with the product
        packed = codes[start * BLOCK_SIZE // 2 : stop * BLOCK_SIZE // 2]  # (<= B*32,) uint8
        packed = F.pad(packed, (0, (stop - start) * BLOCK_SIZE // 2 - packed.numel()))  # (B*32,)
        nibbles = torch.stack([packed >> 4, packed & 15], dim=1).view(stop - start, BLOCK_SIZE)  # (B, 64)
        values = code[nibbles.long()] * absmax[:, None]  # (B, 64) float32
        first, last = start * BLOCK_SIZE, min(stop * BLOCK_SIZE, numel)
        out[first:last] = values.view(-1)[: last - first]  # cast to dtype (round to nearest even)
    return out


def dequantize_nf4(codes, scale_codes, scale_absmax, scale_offset, code, scale_code, numel, dtype):
    """The flat dequantized weight (numel,) in `dtype`: Triton on CUDA (or interpreted), else the reference."""
    if uses_triton(codes):
        from . import nf4_triton

        check_packed(codes, scale_codes, scale_absmax, scale_offset, numel, dtype)
        out = torch.empty(numel, dtype=dtype, device=codes.device)  # (n,)
        nf4_triton.dequantize_into(out, codes, scale_codes, scale_absmax, scale_offset, code, scale_code)
        return out
    return dequantize_nf4_reference(codes, scale_codes, scale_absmax, scale_offset, code, scale_code, numel, dtype)
