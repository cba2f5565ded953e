"""Tolerances for invariance tests (2 ranks == 1 rank, micro-batch x accumulation, one engine == another), derived
from the arithmetic instead of tuned on one machine.

Two such runs compute the same sums in a different order, so every gradient element differs by float rounding.
AdamW moves a weight by lr * m_hat / (sqrt(v_hat) + eps): where a gradient element is near zero (|g| ~ its
rounding), the two runs can move that weight by anything up to the bound below, in opposite directions. Weights
after Adam steps are therefore equal only within 2 * lr * sum_t B_t, whatever the machine; what is exactly
comparable is the gradient before the first step (its norm, logged at step 1) and the losses, which depend on such
weights only through their near-zero gradients (first order: dL = g . dw).
"""

from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps


def adam_step_bound(t: int, betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """B_t: the largest |m_hat_t / sqrt(v_hat_t)| any gradient sequence can give at step t (eps only shrinks it).

    m_t = (1-b1) sum_s b1^(t-s) g_s and v_t = (1-b2) sum_s b2^(t-s) g_s^2, so by Cauchy-Schwarz
    |m_t| <= (1-b1) sqrt(sum_j (b1^2/b2)^j / (1-b2)) sqrt(v_t), j = 0..t-1; with the bias corrections
    m_hat = m_t / (1-b1^t) and v_hat = v_t / (1-b2^t) this is B_t below (B_1 = 1: the first step is lr * sign(g)).
    """
    b1, b2 = betas
    geometric = sum((b1 * b1 / b2) ** j for j in range(t))
    return (1 - b1) / (1 - b1 ** t) * math.sqrt((1 - b2 ** t) / (1 - b2) * geometric)


def adam_weight_gap(lr: float, steps: int, betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """Largest possible |w_a - w_b| of one element after `steps` AdamW steps (no weight decay) from equal weights:
    each run moves it by at most lr * B_t at step t, in whatever direction its own rounding picked."""
    return 2 * lr * sum(adam_step_bound(t, betas) for t in range(1, steps + 1))


def assert_adam_weights_close(wa: dict, wb: dict, lr: float, steps: int, msg: str = "") -> None:
    """Same keys and shapes, and every element within the AdamW gap: catches missing or misassembled shards, an
    unfolded normalization, a weight left untrained on one side beyond what steps of lr can explain."""
    gap = adam_weight_gap(lr, steps)
    assert wa.keys() == wb.keys(), msg
    for k in wa:
        assert wa[k].shape == wb[k].shape, (msg, k)
        worst = (wa[k].float() - wb[k].float()).abs().max().item() if wa[k].numel() else 0.0
        assert worst <= gap, f"{msg} {k}: |dw| = {worst:.3g} > {gap:.3g} = 2 lr sum_t B_t over {steps} steps"


def reduction_rtol(*lengths: int) -> float:
    """Relative tolerance of a float32 result reached through sums of these lengths: a sum of n terms carries at most
    n * eps of rounding relative to the sum of its magnitudes (first order), and the errors of successive reductions
    add. Used for quantities computed from equal weights, e.g. the loss and gradient norm at step 1."""
    return EPS32 * sum(lengths)
