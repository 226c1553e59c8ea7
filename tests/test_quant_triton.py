"""The Triton NF4 dequantization kernel, run by Triton's CPU interpreter (TRITON_INTERPRET=1).

As in test_kernels_triton.py, a run without TRITON_INTERPRET=1 runs this file again in a fresh
process with it set (Triton fixes interpret mode when imported), and the compiled path is checked
by compiling the kernel for sm_90 with the ptxas bundled in the Triton wheel, no GPU needed.
Outputs are poisoned with NaN before each launch, so an element never written fails the test.
"""

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from minidpo.kernels import nf4 as nf4_module  # noqa: E402
from minidpo.kernels import nf4_triton  # noqa: E402
from test_quant import DTYPES, SHAPES, dequantize_float64, weight  # noqa: E402

from minidpo.quant import NF4Linear, NF4Weight, code_tables  # noqa: E402

INTERPRETED = type(tl.cdiv).__name__ == "InterpretedFunction"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in a TRITON_INTERPRET=1 process")
needs_compiler = pytest.mark.skipif(INTERPRETED, reason="Triton was imported in interpret mode")


@needs_compiler
def test_nf4_kernel_passes_under_the_interpreter_in_a_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" in run.stdout  # the interpreted tests ran


def run_kernel(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    assert type(nf4_triton._nf4_dequantize_kernel).__name__ == "InterpretedFunction"
    out = torch.full((q.shape.numel(),), float("nan"), dtype=dtype)
    nf4_triton.dequantize_into(out, q.codes, q.scale_codes, q.scale_absmax, q.scale_offset, *code_tables(q.device))
    return out.view(q.shape)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(37, 4099)], ids=str)
def test_kernel_matches_the_reference_and_float64(shape, dtype):
    q = NF4Weight.quantize(weight(shape, seed=7))
    out = run_kernel(q, dtype)
    reference = nf4_module.dequantize_nf4_reference(
        q.codes, q.scale_codes, q.scale_absmax, q.scale_offset, *code_tables(q.device), q.shape.numel(), dtype
    ).view(shape)
    expected, terms = dequantize_float64(q)
    if dtype == torch.bfloat16:
        # The interpreter truncates float32 to bfloat16 where a GPU rounds to nearest even
        # (checked on the compiled code below): at most one bfloat16 step apart.
        assert bool(((out.float() - reference.float()).abs() <= reference.float().abs() * 2**-7).all())
    else:
        assert torch.equal(out, reference)
    if dtype == torch.float32:
        assert bool(((out.double() - expected).abs() <= 2**-23 * terms).all())


@needs_interpreter
def test_dequantize_and_nf4_linear_run_the_kernel_under_the_interpreter(monkeypatch):
    launches = []
    launch = nf4_triton.dequantize_into
    monkeypatch.setattr(nf4_triton, "dequantize_into", lambda *a: launches.append(1) or launch(*a))
    layer = NF4Linear.from_linear(torch.nn.Linear(70, 33))
    x = torch.randn(4, 70, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert len(launches) == 2  # forward and backward each dequantize once
    w = nf4_module.dequantize_nf4_reference(layer.weight.codes, layer.weight.scale_codes, layer.weight.scale_absmax,
                                            layer.weight.scale_offset, *code_tables(x.device), 70 * 33, torch.float32)  # fmt: skip
    assert torch.equal(y, torch.nn.functional.linear(x, w.view(33, 70), layer.bias))


def compile_for_hopper(out_type: str):
    """Compile the kernel to PTX and a cubin for sm_90 with the bundled ptxas; no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = nf4_triton._nf4_dequantize_kernel
    signature = {"codes_ptr": "*u8", "scale_codes_ptr": "*u8", "scale_absmax_ptr": "*fp32",
                 "scale_offset_ptr": "*fp32", "code_ptr": "*fp32", "scale_code_ptr": "*fp32",
                 "out_ptr": f"*{out_type}", "numel": "i32",
                 "BLOCKS": "constexpr", "BLOCK_SIZE": "constexpr", "SCALE_BLOCK_SIZE": "constexpr"}  # fmt: skip
    aligned = [name for name, ty in signature.items() if ty.startswith("*")]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    constexprs = {"BLOCKS": nf4_triton.BLOCKS, "BLOCK_SIZE": 64, "SCALE_BLOCK_SIZE": 256}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "enable_fp_fusion": False})  # fmt: skip


@needs_compiler
def test_kernel_compiles_for_a_gpu_without_fused_multiply_adds_and_rounds_bf16_to_nearest():
    for out_type in ("fp32", "bf16", "fp16"):
        compiled = compile_for_hopper(out_type)
        assert compiled.asm["cubin"]
        ptx = compiled.asm["ptx"]
        assert "fma." not in ptx  # s2 * a2 + offset rounds twice, as the reference
        if out_type == "bf16":
            assert "cvt.rn.bf16" in ptx  # round to nearest even, as torch's .to(bfloat16)
