"""Preference losses: DPO and its variants, as one function over sequence log-probs.

Every loss here reads four numbers per pair: the policy's and the reference's summed
log-probs of the chosen (w) and rejected (l) responses. With the log-ratios
    h_w = log pi(y_w|x) - log ref(y_w|x),   h_l = log pi(y_l|x) - log ref(y_l|x),
    d   = h_w - h_l
the losses (mean over pairs) are:

- sigmoid (DPO; Rafailov et al. 2023, arXiv 2305.18290):
      L = -log sigma(beta d)
  With label smoothing eps (conservative DPO, cDPO; Mitchell 2023, "A note on DPO with
  noisy preferences"): the label is flipped with probability eps,
      L = -(1 - eps) log sigma(beta d) - eps log sigma(-beta d)
- robust (rDPO; Chowdhury et al. 2024, arXiv 2403.00409): an unbiased estimate of the
  clean loss under label noise eps < 1/2,
      L = [(1 - eps)(-log sigma(beta d)) - eps(-log sigma(-beta d))] / (1 - 2 eps)
- hinge (SLiC-HF, Zhao et al. 2023, arXiv 2305.10425; RSO, Liu et al. 2023, arXiv
  2309.06657):
      L = max(0, 1 - beta d)
- ipo (IPO; Azar et al. 2023, arXiv 2310.12036, eq. 17), with each log-ratio divided by
  its response's token count n as TRL does (confirmed by the IPO authors):
      L = (h_w / n_w - h_l / n_l - 1 / (2 beta))^2
- simpo (SimPO; Meng et al. 2024, arXiv 2405.14734): reference-free and
  length-normalized, with a target margin gamma,
      L = -log sigma(beta (log pi(y_w|x) / n_w - log pi(y_l|x) / n_l) - gamma)
  (label smoothing mixes in the flipped term as in cDPO).

`reference_free=True` sets both reference log-probs to zero (an implicit uniform
reference, as TRL's flag). `rpo_alpha` adds RPO's NLL term on the chosen responses
(Pang et al. 2024, arXiv 2404.19733): alpha * (-sum log pi(y_w|x) / sum n_w), the
token-mean negative log-likelihood over the batch.

Means over more than one micro-batch: the pair mean and the token mean divide by the
batch's own pairs and tokens unless `pair_count` / `chosen_token_count` (SFT:
`token_count`) give those of the whole optimizer step. A trainer passes the step's, so
the micro-batch losses add up to the step's loss, weighted by pairs and tokens, as one
large batch would be (gradient accumulation over per-batch means would instead weight a
short sequence's tokens more; transformers fixed this in 4.46).

Metrics follow TRL's names and meanings, detached: rewards are beta * h (for SimPO beta
times the length-normalized log-prob, as TRL's CPO trainer reports), accuracy is the
share of pairs with reward_w > reward_l, margins the mean of reward_w - reward_l, logps the
mean summed policy log-probs. Every metric is a mean over `metrics["count"]` pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minidpo.errors import ParameterError

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo")

# Losses that read the token counts of the responses.
LENGTH_NORMALIZED = ("ipo", "simpo")


def is_reference_free(loss_type: str, reference_free: bool = False) -> bool:
    """Whether the loss needs no reference log-probs at all (so no reference pass is run)."""
    return reference_free or loss_type == "simpo"


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    simpo_gamma: float = 0.5,
    rpo_alpha: float | None = None,
    pair_count: int | None = None,
    chosen_token_count: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | int]]:
    """The mean preference loss over B pairs and its detached metrics.

    All log-prob arguments are (B,) summed log-probs; `chosen_lengths`/`rejected_lengths`
    are (B,) response token counts, needed by ipo, simpo and rpo_alpha. `pair_count` and
    `chosen_token_count` replace the denominators B and sum(chosen_lengths) (see above).
    """
    check_loss_options(loss_type, beta, label_smoothing)
    needs_lengths = loss_type in LENGTH_NORMALIZED or rpo_alpha is not None
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type={loss_type!r} (or rpo_alpha) needs chosen_lengths and rejected_lengths")

    if loss_type == "simpo":
        chosen_scores = policy_chosen_logps / chosen_lengths.clamp(min=1)  # (B,)
        rejected_scores = policy_rejected_logps / rejected_lengths.clamp(min=1)  # (B,)
    elif reference_free:
        chosen_scores, rejected_scores = policy_chosen_logps, policy_rejected_logps
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type={loss_type!r} needs reference log-probs (or reference_free=True)")
        chosen_scores = policy_chosen_logps - ref_chosen_logps  # (B,)
        rejected_scores = policy_rejected_logps - ref_rejected_logps  # (B,)
    d = chosen_scores - rejected_scores  # (B,)

    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
    elif loss_type == "robust":
        losses = ((1 - eps) * -F.logsigmoid(beta * d) - eps * -F.logsigmoid(-beta * d)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    elif loss_type == "ipo":
        normalized = chosen_scores / chosen_lengths.clamp(min=1) - rejected_scores / rejected_lengths.clamp(min=1)
        losses = (normalized - 1 / (2 * beta)) ** 2
    else:  # simpo
        z = beta * d - simpo_gamma
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    loss = losses.sum() / (losses.shape[0] if pair_count is None else pair_count)

    if rpo_alpha is not None:
        tokens = chosen_lengths.sum().clamp(min=1) if chosen_token_count is None else chosen_token_count
        loss = loss + rpo_alpha * (-policy_chosen_logps.sum() / tokens)

    with torch.no_grad():
        chosen_rewards = beta * chosen_scores.detach().double()  # (B,)
        rejected_rewards = beta * rejected_scores.detach().double()  # (B,)
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy_chosen_logps.detach().double().mean(),
            "logps/rejected": policy_rejected_logps.detach().double().mean(),
            "count": int(policy_chosen_logps.shape[0]),
        }
    return loss, metrics


def check_loss_options(loss_type: str, beta: float, label_smoothing: float) -> None:
    """Reject a loss configuration that cannot train, naming the option to change."""
    if loss_type not in LOSS_TYPES:
        raise ParameterError(f"loss_type {loss_type!r} is unknown; choose one of {', '.join(LOSS_TYPES)}", "loss_type")
    if not beta > 0:
        raise ParameterError(f"beta must be > 0, got {beta}", "beta")
    if loss_type == "robust" and not 0 <= label_smoothing < 0.5:
        raise ParameterError(f"label_smoothing must be in [0, 0.5) for the robust loss, got {label_smoothing}", "label_smoothing")
    if not 0 <= label_smoothing <= 0.5:
        raise ParameterError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}", "label_smoothing")
    if label_smoothing and loss_type in ("hinge", "ipo"):
        raise ParameterError(f"label_smoothing has no meaning for the {loss_type} loss; leave it at 0", "label_smoothing")


def sft_loss(
    logps: torch.Tensor, lengths: torch.Tensor, *, token_count: int | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor | int]]:
    """Supervised fine-tuning: the token-mean negative log-likelihood of the responses.

        L = -sum_i log pi(y_i|x_i) / sum_i n_i

    `logps` (B,) are summed response log-probs, `lengths` (B,) their token counts;
    `token_count` replaces sum_i n_i by the optimizer step's (see above). The only metric
    is the batch's token count.
    """
    tokens = int(lengths.sum().item())
    return -logps.sum() / max(1, tokens if token_count is None else token_count), {"count": tokens}
