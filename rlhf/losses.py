"""Pure loss functions: the DPO family, the Bradley-Terry reward-model loss, and PPO's clipped policy and value losses.

Tensors in, (loss, stats) out; nothing here owns a model, an optimizer or a logger. Stats are detached tensors, so
the caller decides when to pay for a host sync. Shapes: B = sequences (pairs for DPO), T = response tokens.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf.ops import kl_k3, masked_mean, masked_sum

# ---------------------------------------------------------------------------------------------------------------------
# DPO family. Every variant maps the implicit-reward margin h (per pair) to a per-pair loss:
#   h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
# ---------------------------------------------------------------------------------------------------------------------


def _dpo_sigmoid(h: Tensor, beta: float, eps: float) -> Tensor:
    # DPO (Rafailov et al. eq. 7); eps > 0 is conservative DPO: the label is flipped with probability eps.
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def _dpo_robust(h: Tensor, beta: float, eps: float) -> Tensor:
    # Robust DPO (Chowdhury et al.): an unbiased loss under label-flip noise eps; the 1/(1-2eps) blows up at 0.5.
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def _dpo_hinge(h: Tensor, beta: float, eps: float) -> Tensor:
    # SLiC-style hinge on the scaled margin.
    return torch.relu(1 - beta * h)


def _dpo_ipo(h: Tensor, beta: float, eps: float) -> Tensor:
    # IPO (Azar et al. eq. 17): regress the margin to 1/(2 tau); tau = beta. h must come from length-averaged logps.
    return (h - 1 / (2 * beta)) ** 2


DPO_LOSSES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "sigmoid": _dpo_sigmoid,
    "robust": _dpo_robust,
    "hinge": _dpo_hinge,
    "ipo": _dpo_ipo,
}


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair DPO-family losses from sequence log-probs.

    h = (pi_c - ref_c) - (pi_r - ref_r)   (ref terms are 0 when reference_free)
      sigmoid: -(1-eps) logsig(beta h) - eps logsig(-beta h)          (eps = label_smoothing; eps > 0 is cDPO)
      robust:  [-(1-eps) logsig(beta h) + eps logsig(-beta h)] / (1 - 2 eps)      (needs eps < 0.5)
      hinge:   relu(1 - beta h)
      ipo:     (h - 1/(2 beta))^2
    All inputs [B]: SUMMED response log-probs, except for ipo where the caller passes length-AVERAGED ones.
    label_smoothing is ignored by hinge and ipo.
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); rewards = beta * (pi - ref), detached.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {sorted(DPO_LOSSES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    max_eps_ok = label_smoothing < 0.5 if loss_type == "robust" else label_smoothing <= 0.5
    if not (0.0 <= label_smoothing and max_eps_ok):
        bound = "[0, 0.5)" if loss_type == "robust" else "[0, 0.5]"
        raise ValueError(f"label_smoothing must lie in {bound} for loss_type {loss_type!r}, got {label_smoothing}")

    if reference_free:
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = DPO_LOSSES[loss_type](chosen_logratios - rejected_logratios, beta, label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# ---------------------------------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, margin: Optional[Tensor] = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry pairwise loss: mean_b -log sigmoid(r_c - r_r - m)  (m = margin, Llama-2 style; 0 if None).

    chosen_scores, rejected_scores, margin: [B]. Returns (scalar loss, stats) with stats "accuracy"
    (fraction of pairs with r_c > r_r) and "margin" (mean r_c - r_r), detached.
    """
    diff = chosen_scores - rejected_scores
    loss = -F.logsigmoid(diff if margin is None else diff - margin).mean()
    diff = diff.detach()
    return loss, {"accuracy": (diff > 0).float().mean(), "margin": diff.mean()}


# ---------------------------------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------------------------------

# "mean" averages over this batch's valid tokens; "sum" lets the caller divide by a token count it gathered over
# micro-batches and ranks, so the gradient equals that of the global token mean.
REDUCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mean": masked_mean, "sum": masked_sum}


def _reduction(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    if name not in REDUCTIONS:
        raise ValueError(f"unknown reduction {name!r}; valid: {sorted(REDUCTIONS)}")
    return REDUCTIONS[name]


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    ratio_bound: Optional[float] = None,
    reduction: str = "mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimize, per token:

        r_t = exp(logp_t - old_logp_t);   l_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps))

    reduced over valid tokens by `reduction` ("mean" or "sum"). All inputs [B, T].
    ratio_bound (paper: 5, ReaLHF's early_stop_imp_ratio): when the mean ratio over the tokens passed in (this
    rank's micro-batch) exceeds it, the batch is too far off-policy to trust, so the loss is multiplied by 0 (it
    stays in the graph, so every rank still runs the same backward) and stats["early_stop"] = 1. The decision is
    made on-device, without a host sync.
    Stats (detached): clipfrac (tokens where the clipped term is the active one), approx_kl (k3 estimate of
    KL(old || new) on tokens sampled from old), ratio_mean, ratio_max (-inf if no token is valid), early_stop.
    """
    reduce = _reduction(reduction)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = reduce(torch.maximum(unclipped, clipped), mask)

    with torch.no_grad():
        ratio_mean = masked_mean(ratio, mask)
        neg_inf = torch.full_like(ratio, float("-inf"))
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(kl_k3(old_logprobs, logprobs), mask),
            "ratio_mean": ratio_mean,
            "ratio_max": torch.where(mask != 0, ratio, neg_inf).max(),
            "early_stop": torch.zeros_like(ratio_mean),
        }
    if ratio_bound is not None:
        stop = (ratio_mean > ratio_bound).to(loss.dtype)
        loss = loss * (1 - stop)
        stats["early_stop"] = stop.detach()
    return loss, stats


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: Optional[float] = 0.2,
    reduction: str = "mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, per token:

        l_t = 0.5 * max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -eps, eps) - R_t)^2)

    so one update cannot move the critic's prediction more than eps from the rollout-time value.
    clip_eps=None gives the plain 0.5 * (V - R)^2. All inputs [B, T]; reduced over valid tokens.
    Stats (detached): vf_clipfrac (tokens where the clipped term is the larger), value_mean.
    """
    reduce = _reduction(reduction)
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        clipped = unclipped
    else:
        clipped = (old_values + torch.clamp(values - old_values, -clip_eps, clip_eps) - returns) ** 2
    loss = 0.5 * reduce(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask),
            "value_mean": masked_mean(values, mask),
        }
    return loss, stats
