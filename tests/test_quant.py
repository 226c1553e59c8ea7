"""NF4 (minidpo/quant.py, kernels/nf4.py): the codebooks, the quantizer, bitsandbytes as the oracle,
the PyTorch dequantization against float64, and NF4Linear's forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from minidpo.errors import ParameterError
from minidpo.quant import NF4_CODE, NF4Linear, NF4Weight, check_quantize, linear, scale_code_values

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd sizes: partial last 64-block, odd element counts, several 256-groups of scales (the last partial).
SHAPES = [(1, 1), (7, 13), (64, 64), (3, 1000), (300, 97), (513, 257)]


def weight(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def unpacked_codes(w: NF4Weight) -> torch.Tensor:
    """(n,) int64: the 4-bit code of every element, high nibble first."""
    return torch.stack([w.codes >> 4, w.codes & 15], 1).view(-1)[: w.shape.numel()].long()


def dequantize_float64(w: NF4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """The dequantization formula in float64 from the stored codes, and the size of its terms,
    |code| * (|s2 * a2| + |offset|), which bounds what float32 rounding may change."""
    code = torch.tensor(NF4_CODE, dtype=torch.float64)
    scale_code = scale_code_values().double()
    b = torch.arange(w.scale_codes.numel())
    product = scale_code[w.scale_codes.long()] * w.scale_absmax.double()[b // 256]
    offset = w.scale_offset.double()
    n = w.shape.numel()
    levels = code[unpacked_codes(w)]
    values = levels * (product + offset).repeat_interleave(64)[:n]
    terms = levels.abs() * (product.abs() + offset.abs()).repeat_interleave(64)[:n]
    return values.view(w.shape), terms.view(w.shape)


def test_nf4_levels_are_the_normal_quantiles_with_an_exact_zero():
    delta = 1 - (1 / 30 + 1 / 32) / 2
    positive = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64))[:-1]
    negative = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64))[:-1]
    derived = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    derived = derived / derived.max()
    table = torch.tensor(NF4_CODE, dtype=torch.float64)
    assert (table - derived).abs().max() < 2e-7
    assert NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[15] == 1.0


def test_scale_map_has_256_sorted_distinct_values_in_minus_one_one():
    values = scale_code_values()
    assert values.shape == (256,) and values.dtype == torch.float32
    assert bool((values[1:] > values[:-1]).all())
    assert 0.0 in values and values[-1] == 1.0 and -1 < values[0] < -0.99
    assert values[127] == 0.0 and values[128] == pytest.approx(0.55e-6)  # finest resolution next to zero


def test_storage_is_4_127_bits_a_weight():
    w = NF4Weight.quantize(weight((256, 1024)))
    n = 256 * 1024
    assert w.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert w.nbytes * 8 / n == pytest.approx(4.127, abs=1e-3)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_code_is_the_nearest_level_of_the_weight_over_its_block_absmax(shape):
    w = weight(shape, seed=1)
    q = NF4Weight.quantize(w)
    flat = F.pad(w.double().view(-1), (0, -w.numel() % 64)).view(-1, 64)
    absmax = flat.abs().amax(1, keepdim=True)
    levels = torch.tensor(NF4_CODE, dtype=torch.float64)
    nearest = ((flat / absmax).unsqueeze(-1) - levels).abs().argmin(-1).view(-1)[: w.numel()]
    assert torch.equal(unpacked_codes(q), nearest)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_dequantization_equals_the_float64_formula(shape, dtype):
    q = NF4Weight.quantize(weight(shape, seed=2))
    out = q.dequantize(dtype)
    assert out.dtype == dtype and out.shape == shape
    expected, terms = dequantize_float64(q)
    if dtype == torch.float32:  # three float32 roundings (s2 * a2, + offset, * code)
        assert bool(((out.double() - expected).abs() <= 2**-23 * terms).all())
    else:
        assert torch.equal(out, q.dequantize(torch.float32).to(dtype))


def test_dequantization_error_is_at_most_half_the_widest_level_gap():
    w = weight((128, 640), seed=3)
    q = NF4Weight.quantize(w)
    absmax = w.view(-1, 64).abs().amax(1, keepdim=True)
    err = (q.dequantize() - w).view(-1, 64).abs() / absmax
    widest = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:]))
    assert float(err.max()) <= widest / 2 + 0.01  # + the 8-bit error of the scale itself


def test_an_all_zero_block_dequantizes_to_the_scale_offset_times_zero():
    w = weight((4, 64), seed=4)
    w[1] = 0.0
    out = NF4Weight.quantize(w).dequantize()
    assert torch.equal(out[1], torch.zeros(64))


# ---- bitsandbytes as the oracle (test extra)


@pytest.fixture(scope="module")
def bnb():
    functional = pytest.importorskip("bitsandbytes.functional")
    return functional


def bnb_quantize(bnb, w):
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    return packed, state


def test_scale_map_is_bitsandbytes_dynamic_map(bnb):
    assert torch.equal(scale_code_values(), bnb.create_dynamic_map(signed=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(1024, 1000)], ids=str)
def test_codes_scales_and_offset_equal_bitsandbytes(bnb, shape, dtype):
    w = weight(shape, dtype, seed=5)
    packed, state = bnb_quantize(bnb, w)
    ours = NF4Weight.quantize(w)
    assert torch.equal(ours.codes, packed.view(-1))  # every 4-bit code, bit for bit
    assert torch.equal(ours.scale_absmax, state.state2.absmax)
    assert torch.equal(ours.scale_offset, state.offset)
    assert torch.equal(torch.tensor(NF4_CODE), state.code)
    # 8-bit scale codes: ours are the nearest map value; bitsandbytes' CPU quantizer finds them by
    # an approximate binary search that now and then (about 0.2%) picks the second nearest. (In a
    # group whose scales all equal the offset, a2 = 0 and any code gives the same value.)
    live = ours.scale_absmax[torch.arange(ours.scale_codes.numel()) // 256] > 0
    differ = (ours.scale_codes != state.absmax) & live
    assert int(differ.sum()) <= max(1, differ.numel() // 100)
    if differ.any():
        blocks = differ.nonzero().view(-1)
        absmax = w.float().view(-1).abs()
        absmax = F.pad(absmax, (0, -absmax.numel() % 64)).view(-1, 64).amax(1)
        centered = (absmax - ours.scale_offset).double()[blocks]
        x = centered / ours.scale_absmax.double()[blocks // 256]
        values = scale_code_values().double()
        assert bool(((x - values[ours.scale_codes[blocks].long()]).abs()
                     < (x - values[state.absmax[blocks].long()]).abs()).all())  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES + [(1024, 1000)], ids=str)
def test_dequantized_values_equal_bitsandbytes_bit_for_bit(bnb, shape):
    w = weight(shape, seed=6)
    packed, state = bnb_quantize(bnb, w)
    theirs = NF4Weight(packed.view(-1), state.absmax, state.state2.absmax, state.offset, shape, torch.float32)
    ours = NF4Weight.quantize(w)
    same_codes = torch.equal(ours.scale_codes, state.absmax)
    for dtype in DTYPES:
        state.dtype = dtype
        expected = bnb.dequantize_4bit(packed, state)
        assert torch.equal(theirs.dequantize(dtype), expected)
        if same_codes:
            assert torch.equal(ours.dequantize(dtype), expected)


# ---- NF4Linear


def test_nf4_linear_forward_and_gradients_equal_a_dense_linear_of_the_dequantized_weight():
    dense = torch.nn.Linear(96, 40)
    layer = NF4Linear.from_linear(dense)
    layer.bias.requires_grad_(True)
    w = layer.weight.dequantize()
    x = torch.randn(3, 5, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    bias_ref = dense.bias.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), F.linear(x_ref, w, bias_ref)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-6, atol=1e-7)
    assert torch.allclose(layer.bias.grad, bias_ref.grad, rtol=1e-6, atol=1e-6)
    assert list(layer.parameters()) == [layer.bias]  # the NF4 weight is buffers, never trained


def test_nf4_linear_saves_no_dense_weight_for_the_backward():
    layer = NF4Linear.from_linear(torch.nn.Linear(256, 512, bias=False))
    x = torch.randn(2, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        layer(x).sum().backward()
    assert all(n < 256 * 512 for n in saved)


def test_autocast_sets_the_compute_dtype():
    layer = NF4Linear.from_linear(torch.nn.Linear(64, 32))
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, layer.weight, layer.bias)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), layer(x), rtol=0.02, atol=0.02)


def test_a_dtype_cast_changes_the_compute_dtype_but_not_the_stored_format():
    layer = NF4Linear.from_linear(torch.nn.Linear(64, 32))
    before = {name: t.clone() for name, t in layer.weight.named_buffers()}
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert all(torch.equal(t, before[name]) for name, t in layer.weight.named_buffers())
    assert layer.weight.dequantize().dtype == torch.bfloat16


def test_an_unknown_quantization_names_the_parameter():
    check_quantize(None)
    check_quantize("nf4")
    with pytest.raises(ParameterError, match="quantize 'int8' is not supported"):
        check_quantize("int8")
