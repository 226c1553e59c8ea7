import math

import pytest
import torch

from minidpo.errors import MiniDPOError
from minidpo.losses import dpo_loss, sft_loss


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def closed_form(loss_type, pc, pr, rc, rr, nc, nr, beta, eps, gamma):
    """The per-pair loss in float64 Python arithmetic, written from the papers."""
    d = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * logsigmoid(beta * d) - eps * logsigmoid(-beta * d)
    if loss_type == "robust":
        return ((1 - eps) * -logsigmoid(beta * d) + eps * logsigmoid(-beta * d)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * d)
    if loss_type == "ipo":
        return ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    if loss_type == "simpo":
        z = beta * (pc / nc - pr / nr) - gamma
        return -(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z)
    raise AssertionError(loss_type)


def make_inputs(seed=0, batch=5):
    g = torch.Generator().manual_seed(seed)
    logps = [(-20 * torch.rand(batch, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(4)]
    lengths = [torch.randint(1, 30, (batch,), generator=g).double() for _ in range(2)]
    return logps, lengths


def mean_closed_form(loss_type, logps, lengths, beta, eps, gamma):
    rows = zip(*[t.tolist() for t in logps], *[t.tolist() for t in lengths])
    values = [closed_form(loss_type, *row, beta, eps, gamma) for row in rows]
    return sum(values) / len(values)


def numeric_grad(loss_type, logps, lengths, beta, eps, gamma, h=1e-6):
    grads = []
    for k, t in enumerate(logps):
        g = torch.zeros_like(t)
        for i in range(t.numel()):
            shifted = [x.detach().clone() for x in logps]
            shifted[k][i] += h
            up = mean_closed_form(loss_type, shifted, lengths, beta, eps, gamma)
            shifted[k][i] -= 2 * h
            down = mean_closed_form(loss_type, shifted, lengths, beta, eps, gamma)
            g[i] = (up - down) / (2 * h)
        grads.append(g)
    return grads


@pytest.mark.parametrize(
    "loss_type,eps",
    [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0), ("simpo", 0.1)],
)
def test_loss_matches_float64_closed_form_in_value_and_gradient(loss_type, eps):
    beta, gamma = 0.7, 0.3
    logps, lengths = make_inputs()
    loss, _ = dpo_loss(
        *logps,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=eps,
        chosen_lengths=lengths[0],
        rejected_lengths=lengths[1],
        simpo_gamma=gamma,
    )
    expected = mean_closed_form(loss_type, logps, lengths, beta, eps, gamma)
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)

    loss.backward()
    for tensor, numeric in zip(logps, numeric_grad(loss_type, logps, lengths, beta, eps, gamma)):
        got = torch.zeros_like(numeric) if tensor.grad is None else tensor.grad
        torch.testing.assert_close(got, numeric, rtol=1e-5, atol=1e-7)


def test_sigmoid_with_beta_0_1_on_zero_log_ratio_is_ln_2():
    logps = torch.tensor([-12.5, -3.0])
    loss, metrics = dpo_loss(logps, logps - 1, logps, logps - 1, loss_type="sigmoid", beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["rewards/margins"].item() == 0
    assert metrics["rewards/accuracies"].item() == 0


def test_reference_free_equals_zero_reference():
    logps, _ = make_inputs(1)
    zero = torch.zeros(5, dtype=torch.float64)
    free, _ = dpo_loss(logps[0], logps[1], None, None, reference_free=True)
    explicit, _ = dpo_loss(logps[0], logps[1], zero, zero)
    assert free.item() == explicit.item()


def test_rpo_adds_token_mean_nll_of_chosen():
    logps, lengths = make_inputs(2)
    base, _ = dpo_loss(*logps, chosen_lengths=lengths[0], rejected_lengths=lengths[1])
    with_rpo, _ = dpo_loss(*logps, chosen_lengths=lengths[0], rejected_lengths=lengths[1], rpo_alpha=0.5)
    nll = -logps[0].sum().item() / lengths[0].sum().item()
    assert with_rpo.item() == pytest.approx(base.item() + 0.5 * nll, rel=1e-12)


def test_metrics_use_trl_names_and_meanings_with_count():
    pc, pr = torch.tensor([-1.0, -4.0, -2.0]), torch.tensor([-3.0, -1.0, -2.5])
    rc, rr = torch.tensor([-2.0, -2.0, -2.0]), torch.tensor([-2.0, -2.0, -2.0])
    _, m = dpo_loss(pc, pr, rc, rr, beta=0.5)
    chosen, rejected = 0.5 * (pc - rc), 0.5 * (pr - rr)
    assert m["count"] == 3
    assert m["rewards/chosen"].item() == pytest.approx(chosen.mean().item())
    assert m["rewards/rejected"].item() == pytest.approx(rejected.mean().item())
    assert m["rewards/accuracies"].item() == pytest.approx(2 / 3)
    assert m["rewards/margins"].item() == pytest.approx((chosen - rejected).mean().item())
    assert m["logps/chosen"].item() == pytest.approx(pc.mean().item())
    assert m["logps/rejected"].item() == pytest.approx(pr.mean().item())


def test_unknown_loss_type_is_a_one_line_error_naming_the_parameter():
    x = torch.zeros(1)
    with pytest.raises(MiniDPOError, match="^loss_type 'nope' is unknown"):
        dpo_loss(x, x, x, x, loss_type="nope")


def test_pair_and_token_counts_make_micro_batch_losses_add_up_to_the_whole():
    logps = torch.tensor([-3.0, -9.0, -1.0]), torch.tensor([-4.0, -2.0, -8.0])
    lengths = torch.tensor([3, 7, 2]), torch.tensor([5, 1, 4])
    options = dict(rpo_alpha=0.5, beta=0.2)
    whole, _ = dpo_loss(*logps, *(-x for x in logps), chosen_lengths=lengths[0], rejected_lengths=lengths[1], **options)
    parts = [
        dpo_loss(*(x[s] for x in logps), *(-x[s] for x in logps), chosen_lengths=lengths[0][s],
                 rejected_lengths=lengths[1][s], pair_count=3, chosen_token_count=12, **options)[0]
        for s in (slice(0, 1), slice(1, 3))
    ]
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-6)
    sft_parts = [sft_loss(logps[0][s], lengths[0][s], token_count=12)[0] for s in (slice(0, 2), slice(2, 3))]
    assert sum(sft_parts).item() == pytest.approx(sft_loss(logps[0], lengths[0])[0].item(), rel=1e-6)


def test_sft_loss_is_token_mean_nll_with_token_count():
    loss, m = sft_loss(torch.tensor([-6.0, -2.0]), torch.tensor([3, 1]))
    assert loss.item() == pytest.approx(2.0)
    assert m["count"] == 4
