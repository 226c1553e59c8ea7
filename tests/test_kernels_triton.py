"""The Triton log-prob kernels, run by Triton's CPU interpreter (TRITON_INTERPRET=1).

Triton fixes interpret mode when it is imported (its own library functions are decorated then),
so a test run without TRITON_INTERPRET=1 runs this file again in a fresh process with it set;
there the kernels are checked to really be interpreted. The compiled path gets its own check:
both kernels are compiled for sm_90 with the ptxas bundled in the Triton wheel, no GPU needed.
Outputs are poisoned with NaN before each launch, so an element never written fails the test.
"""

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from minidpo.kernels import (  # noqa: E402
    linear_token_logprobs,
    linear_token_logprobs_reference,
    logprobs_triton,  # noqa: E402
    token_logprobs,
)
from minidpo.kernels import logprobs as logprobs_module  # noqa: E402
from test_kernels import (  # noqa: E402
    DTYPES,
    EXTREME_GRAD_TOL,
    GRAD_TOL,
    LOGP_TOL,
    assert_rel_close,
    check_linear_against_unfused,
    linear_case,
    logprobs_float64,
    make_case,
    oracle_grad,
)

INTERPRETED = type(tl.cdiv).__name__ == "InterpretedFunction"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in a TRITON_INTERPRET=1 process")
needs_compiler = pytest.mark.skipif(INTERPRETED, reason="Triton was imported in interpret mode")


@needs_compiler
def test_triton_kernels_pass_under_the_interpreter_in_a_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" in run.stdout  # the interpreted tests ran


@pytest.fixture
def interpreted_kernels():
    assert type(logprobs_triton._token_logprobs_forward_kernel).__name__ == "InterpretedFunction"
    assert logprobs_module.row_kernels_for(torch.zeros(1)) is logprobs_triton.TRITON_ROWS
    return logprobs_triton


def run_rows(kernels, logits, targets, grad_logp, scale=1.0, block_v=None):
    """Forward then backward through the launchers, every output poisoned with NaN first."""
    n, vocab = logits.shape
    logp = torch.full((n,), float("nan"), device=logits.device)
    lse = torch.full((n,), float("nan"), device=logits.device)
    grad_logits = torch.full((n, vocab), float("nan"), dtype=logits.dtype, device=logits.device)
    kernels.forward_rows(logits, targets, logp, lse, -100, scale, block_v=block_v)
    kernels.backward_rows(logits, targets, lse, grad_logp, grad_logits, -100, scale, block_v=block_v)
    return logp, lse, grad_logits


CASES = [(n, vocab, dtype, None) for n in (1, 37) for vocab in (1, 7, 1000) for dtype in DTYPES]
CASES += [(9, 1000, torch.bfloat16, 128)]  # several blocks and a partial last one
CASES += [(3, 50257, dtype, None) for dtype in DTYPES]  # the GPT-2 vocabulary: 13 blocks of 4096


@needs_interpreter
@pytest.mark.parametrize("n, vocab, dtype, block_v", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_triton_values_and_gradients_match_float64(interpreted_kernels, n, vocab, dtype, block_v):
    logits, targets, grad_logp = make_case(n, vocab, dtype, seed=n * vocab)
    logp, lse, grad_logits = run_rows(interpreted_kernels, logits, targets, grad_logp, block_v=block_v)
    assert_rel_close(logp, logprobs_float64(logits, targets), LOGP_TOL)
    valid = targets != -100
    expected_lse = torch.where(valid, torch.logsumexp(logits.double(), dim=1), 0.0)
    assert_rel_close(lse, expected_lse, LOGP_TOL)
    assert grad_logits.dtype == dtype
    assert_rel_close(grad_logits, oracle_grad(logits, targets, grad_logp), GRAD_TOL[dtype])


@needs_interpreter
def test_triton_all_ignored_rows_write_zeros(interpreted_kernels):
    logits = torch.randn(5, 300) * 1e3
    logp, lse, grad_logits = run_rows(interpreted_kernels, logits, torch.full((5,), -100), torch.randn(5))
    assert torch.equal(logp, torch.zeros(5)) and torch.equal(lse, torch.zeros(5))
    assert torch.equal(grad_logits, torch.zeros(5, 300))


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_extreme_logits_give_finite_results(interpreted_kernels, dtype):
    logits = torch.randn(4, 33).to(dtype)
    logits[0, 5], logits[1, :] = 1e4, -1e4
    logits[2, 0], logits[2, 32] = 1e4, -1e4
    targets, grad_logp = torch.tensor([5, 3, 32, 0]), torch.ones(4)
    logp, _, grad_logits = run_rows(interpreted_kernels, logits, targets, grad_logp, block_v=16)
    assert_rel_close(logp, logprobs_float64(logits, targets), LOGP_TOL)
    assert_rel_close(grad_logits, oracle_grad(logits, targets, grad_logp), EXTREME_GRAD_TOL[dtype])


@needs_interpreter
def test_triton_scale_divides_logits_by_the_temperature(interpreted_kernels):
    logits, targets, grad_logp = make_case(37, 100, torch.float32)
    logp, _, grad_logits = run_rows(interpreted_kernels, logits, targets, grad_logp, scale=1 / 0.7)
    assert_rel_close(logp, logprobs_float64(logits, targets, scale=1 / 0.7), LOGP_TOL)
    assert_rel_close(grad_logits, oracle_grad(logits, targets, grad_logp, scale=1 / 0.7), 1e-5)


@needs_interpreter
def test_triton_follows_the_row_stride_and_may_write_the_gradient_over_the_logits(interpreted_kernels):
    wide, targets, grad_logp = make_case(9, 120, torch.float16)
    logits = wide[:, :100]  # (9, 100), row stride 120
    targets = targets.clamp(max=99)
    expected_grad = oracle_grad(logits, targets, grad_logp)
    logp, lse = torch.full((9,), float("nan")), torch.full((9,), float("nan"))
    interpreted_kernels.forward_rows(logits, targets, logp, lse, -100, 1.0, block_v=32)
    assert_rel_close(logp, logprobs_float64(logits, targets), LOGP_TOL)
    interpreted_kernels.backward_rows(logits, targets, lse, grad_logp, logits, -100, 1.0, block_v=32)
    assert_rel_close(logits, expected_grad, GRAD_TOL[torch.float16])


@pytest.fixture
def triton_launches(interpreted_kernels, monkeypatch):
    """Count the launches of the Triton row kernels made through the public functions."""
    calls = []
    counted = logprobs_module.RowKernels(
        lambda *a, **k: calls.append("forward") or interpreted_kernels.forward_rows(*a, **k),
        lambda *a, **k: calls.append("backward") or interpreted_kernels.backward_rows(*a, **k),
    )
    monkeypatch.setattr(interpreted_kernels, "TRITON_ROWS", counted)
    return calls


@needs_interpreter
def test_token_logprobs_runs_the_triton_kernels_under_the_interpreter(triton_launches):
    logits, targets, grad_logp = make_case(37, 1000, torch.bfloat16)
    x = logits.clone().requires_grad_()
    token_logprobs(x, targets).backward(grad_logp)
    assert triton_launches == ["forward", "backward"]
    assert_rel_close(x.grad, oracle_grad(logits, targets, grad_logp), GRAD_TOL[torch.bfloat16])


@needs_interpreter
def test_linear_with_triton_rows_equals_the_unfused_path(triton_launches):
    check_linear_against_unfused(linear_token_logprobs, chunk_size=16, scale=1 / 0.8)
    assert triton_launches.count("forward") == triton_launches.count("backward") == 3  # 45 rows / 16


@needs_interpreter
def test_linear_in_forward_with_triton_rows_equals_the_reference(triton_launches):
    hidden, weight, targets, grad_logp = linear_case()
    h = hidden.clone().requires_grad_()
    linear_token_logprobs(h, weight, targets, chunk_size=16, grad_mode="in_forward").backward(grad_logp)
    assert triton_launches == ["forward", "backward"] * 3  # both in the forward, chunk by chunk
    h_ref = hidden.clone().requires_grad_()
    linear_token_logprobs_reference(h_ref, weight, targets, chunk_size=16, grad_mode="recompute").backward(grad_logp)
    assert_rel_close(h.grad, h_ref.grad, 1e-5)


def compile_for_hopper(kernel, signature):
    """Compile a kernel to a cubin for sm_90 with the bundled ptxas; no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # What Triton assumes at a real launch of 16-byte aligned tensors with strides divisible by 16.
    aligned = [name for name, ty in signature.items() if ty.startswith("*") or "stride" in name]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=kernel, signature=signature, constexprs={"BLOCK_V": 4096}, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})


@needs_compiler
def test_kernels_compile_for_a_gpu_without_one(monkeypatch):
    # The interpreter runs Python, not the compiler: this catches what only the compiler rejects.
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    scalars = {"vocab_size": "i32", "ignore_index": "i32", "scale": "fp32", "BLOCK_V": "constexpr"}
    forward = compile_for_hopper(logprobs_triton._token_logprobs_forward_kernel, {
        "logits_ptr": "*bf16", "targets_ptr": "*i64", "logp_ptr": "*fp32", "lse_ptr": "*fp32",
        "stride_row": "i32", **scalars})
    backward = compile_for_hopper(logprobs_triton._token_logprobs_backward_kernel, {
        "logits_ptr": "*bf16", "targets_ptr": "*i64", "lse_ptr": "*fp32", "grad_logp_ptr": "*fp32",
        "grad_logits_ptr": "*bf16", "stride_logits_row": "i32", "stride_grad_row": "i32", **scalars})
    assert forward.asm["cubin"] and backward.asm["cubin"]


# ---- launch settings: the autotune (its logic here, its timings on a GPU below)


def test_candidates_are_never_wider_than_the_row_and_include_the_first_guess():
    assert logprobs_triton.candidates(7) == [(8, 4)]
    assert logprobs_triton.candidates(1000) == [(1024, 4)]
    assert logprobs_triton.candidates(128256) == list(logprobs_triton.CANDIDATES)


def test_given_block_or_cpu_tensors_use_the_first_guess_without_timing(monkeypatch):
    monkeypatch.setattr(logprobs_triton, "_autotune", lambda *a: pytest.fail("timed"))
    assert logprobs_triton.launch_settings("forward", torch.zeros(2, 50257)) == (4096, 8)
    assert logprobs_triton.launch_settings("backward", torch.zeros(2, 50257), block_v=128) == (128, 4)


def test_autotune_keeps_the_fastest_candidate_and_times_each_shape_once(monkeypatch):
    import triton.testing

    timed = []
    fake_ms = {(1024, 4): 3.0, (2048, 4): 2.0, (2048, 8): 1.5, (4096, 8): 1.7, (4096, 16): 2.5, (8192, 16): 9.0}

    def fake_bench(fn, **kwargs):
        fn()  # the launch below records which candidate it was
        return fake_ms[timed[-1]]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(logprobs_triton, "_launch_forward", lambda *a: timed.append(a[-2:]))
    monkeypatch.setattr(logprobs_triton, "_launch_backward", lambda *a: timed.append(a[-2:]))
    monkeypatch.setattr(logprobs_triton, "_tunable", lambda logits: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    monkeypatch.setattr(logprobs_triton, "_tuned", {})
    logits = torch.zeros(3, 50000, dtype=torch.bfloat16)
    assert logprobs_triton.launch_settings("backward", logits) == (2048, 8)
    assert set(timed[1:]) == set(logprobs_triton.candidates(50000))  # after one forward for the lse
    count = len(timed)
    assert logprobs_triton.launch_settings("backward", logits[:1]) == (2048, 8)  # cached: no new timing
    assert len(timed) == count
    logprobs_triton.launch_settings("forward", logits)  # another kernel: timed on its own
    assert len(timed) > count


# ---- on a GPU: the compiled kernels (python -m pytest -m gpu; benchmarks/gpu_check.sh runs them)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs CUDA (compiled Triton)")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n, vocab, dtype, block_v", CASES + [(5, 128256, torch.bfloat16, None)],
                         ids=lambda v: str(v).replace("torch.", ""))  # fmt: skip
def test_cuda_kernels_match_float64(n, vocab, dtype, block_v):
    if dtype != torch.bfloat16:  # autotuned in bfloat16 only: every tuning compiles up to 6 variants
        block_v = block_v or logprobs_triton.default_block_v(vocab)
    logits, targets, grad_logp = make_case(n, vocab, dtype, seed=n + vocab)
    logp, lse, grad_logits = run_rows(logprobs_triton, logits.cuda(), targets.cuda(), grad_logp.cuda(), block_v=block_v)
    assert_rel_close(logp.cpu(), logprobs_float64(logits, targets), LOGP_TOL)
    assert_rel_close(grad_logits.cpu(), oracle_grad(logits, targets, grad_logp), GRAD_TOL[dtype])


@pytest.mark.gpu
@needs_cuda
def test_every_autotune_candidate_computes_the_same_function_on_cuda():
    logits, targets, grad_logp = make_case(64, 50257, torch.bfloat16, seed=3)
    logits, targets, grad_logp = logits.cuda(), targets.cuda(), grad_logp.cuda()
    for block_v, warps in logprobs_triton.candidates(50257):
        logp, lse = torch.full((64,), float("nan"), device="cuda"), torch.full((64,), float("nan"), device="cuda")
        grad = torch.full_like(logits, float("nan"))
        logprobs_triton._launch_forward(logits, targets, logp, lse, -100, 1.0, block_v, warps)
        logprobs_triton._launch_backward(logits, targets, lse, grad_logp, grad, -100, 1.0, block_v, warps)
        assert_rel_close(logp.cpu(), logprobs_float64(logits.cpu(), targets.cpu()), LOGP_TOL)
        assert_rel_close(grad.cpu(), oracle_grad(logits.cpu(), targets.cpu(), grad_logp.cpu()), GRAD_TOL[torch.bfloat16])
    assert logprobs_triton.launch_settings("forward", logits) in logprobs_triton.candidates(50257)


@pytest.mark.gpu
@needs_cuda
def test_public_functions_run_triton_on_cuda_and_match_the_reference():
    assert logprobs_module.row_kernels_for(torch.zeros(1, device="cuda")) is logprobs_triton.TRITON_ROWS
    logits, targets, grad_logp = make_case(37, 1000, torch.bfloat16)
    x = logits.cuda().requires_grad_()
    token_logprobs(x, targets.cuda()).backward(grad_logp.cuda())
    assert_rel_close(x.grad.cpu(), oracle_grad(logits, targets, grad_logp), GRAD_TOL[torch.bfloat16])
    hidden, weight, targets, grad_logp = linear_case()
    h, h_ref = hidden.cuda().requires_grad_(), hidden.clone().requires_grad_()
    linear_token_logprobs(h, weight.cuda(), targets.cuda(), chunk_size=16).backward(grad_logp.cuda())
    linear_token_logprobs_reference(h_ref, weight, targets, chunk_size=16).backward(grad_logp)
    assert_rel_close(h.grad.cpu(), h_ref.grad, 1e-4)  # tf32 matmuls on the GPU
