"""Triton kernel for NF4 dequantization: one program per BLOCKS quantization blocks of 64 weights.

The math is in `nf4.py` (and the format in minidpo/quant.py); this file is the GPU side of
the same computation, matched bit for bit against the reference there. Each program:

    1. loads the 8-bit codes of its BLOCKS scales and rebuilds each absmax in float32,
       s2[q2] * a2 + offset (the double quantization undone);
    2. loads the BLOCKS x 32 bytes of its weights, splits every byte into its high and low
       nibble and looks both up in the 16-entry NF4 table;
    3. interleaves the two halves back into element order (high nibble first), multiplies by
       the block's absmax and stores BLOCKS x 64 values in the output dtype.

The kernel is compiled with fp fusion off, so step 1's product and sum round separately as in
bitsandbytes and the PyTorch reference (a fused multiply-add would differ in the last bit).

Bytes moved for n weights (b bytes per output element: 2 for bf16/fp16, 4 for fp32):
    read  n/2 (codes) + n/64 (scale codes) + 4n/16384 (scales of scales)
    write n*b
about 2.52n bytes for bf16 output, so the kernel is bandwidth-bound (a few flops and two
table lookups per weight). A Llama-3-8B decoder layer (218M weights) moves 550 MB: about
0.16 ms at 3.35 TB/s (H100 SXM datasheet); benchmarks/quant.py measures GB/s against a device
copy. Block counts and warps are a first guess, not yet tuned on a GPU.
"""

import triton
import triton.language as tl

from .nf4 import BLOCK_SIZE, SCALE_BLOCK_SIZE

BLOCKS = 32  # quantization blocks per program: 2048 weights


@triton.jit
def _nf4_dequantize_kernel(
    codes_ptr, scale_codes_ptr, scale_absmax_ptr, scale_offset_ptr, code_ptr, scale_code_ptr, out_ptr,
    numel,
    BLOCKS: tl.constexpr, BLOCK_SIZE: tl.constexpr, SCALE_BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    blocks = pid * BLOCKS + tl.arange(0, BLOCKS)  # (BLOCKS,) block indices
    n_blocks = tl.cdiv(numel, BLOCK_SIZE)
    live = blocks < n_blocks
    # 1. [Scales] absmax = s2[q2] * a2 + offset, float32
    q2 = tl.load(scale_codes_ptr + blocks, mask=live, other=0).to(tl.int32)
    a2 = tl.load(scale_absmax_ptr + blocks // SCALE_BLOCK_SIZE, mask=live, other=0.0)
    absmax = tl.load(scale_code_ptr + q2) * a2 + tl.load(scale_offset_ptr)  # (BLOCKS,)
    # 2. [Codes] two 4-bit codes a byte, high nibble first
    half: tl.constexpr = BLOCK_SIZE // 2
    byte_offs = blocks[:, None] * half + tl.arange(0, half)[None, :]  # (BLOCKS, 32)
    packed = tl.load(codes_ptr + byte_offs, mask=byte_offs < (numel + 1) // 2, other=0).to(tl.int32)
    high = tl.load(code_ptr + (packed >> 4))  # (BLOCKS, 32) float32
    low = tl.load(code_ptr + (packed & 15))  # (BLOCKS, 32) float32
    # 3. [Weights] interleave (high, low) pairs back into element order and scale
    values = tl.reshape(tl.join(high, low), (BLOCKS, BLOCK_SIZE)) * absmax[:, None]  # (BLOCKS, 64)
    offs = blocks[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]  # (BLOCKS, 64)
    tl.store(out_ptr + offs, values.to(out_ptr.dtype.element_ty), mask=offs < numel)


def dequantize_into(out, codes, scale_codes, scale_absmax, scale_offset, code, scale_code):
    """Launch the kernel: write the flat dequantized weight into `out` (numel,); all inputs contiguous, one device."""
    numel = out.numel()
    if numel == 0:
        return
    grid = (triton.cdiv(triton.cdiv(numel, BLOCK_SIZE), BLOCKS),)
    _nf4_dequantize_kernel[grid](
        codes, scale_codes, scale_absmax, scale_offset, code, scale_code, out, numel,
        BLOCKS=BLOCKS, BLOCK_SIZE=BLOCK_SIZE, SCALE_BLOCK_SIZE=SCALE_BLOCK_SIZE,
        num_warps=4, enable_fp_fusion=False,
    )
