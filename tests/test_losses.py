# Run: .venv/bin/python -m pytest -q tests/test_losses.py
"""rlhf.losses against numbers worked by hand; the arithmetic is in the comments."""

import pytest
import torch

from rlhf.losses import DPO_LOSSES, bradley_terry_loss, dpo_loss, ppo_policy_loss, ppo_value_loss

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), atol=tol, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# DPO family. One pair: pi_c = -1, pi_r = -3, ref_c = -2, ref_r = -2.5
#   h = (-1 - -2) - (-3 - -2.5) = 1 - (-0.5) = 1.5; beta = 0.1 -> beta*h = 0.15
#   -logsig(0.15) = ln(1 + e^-0.15) = 0.6209570;  -logsig(-0.15) = ln(1 + e^0.15) = 0.7709570
#   rewards: chosen 0.1 * 1 = 0.1, rejected 0.1 * -0.5 = -0.05
# --------------------------------------------------------------------------------------------------------------------

PAIR = (t([-1.0]), t([-3.0]), t([-2.0]), t([-2.5]))


def test_dpo_sigmoid_by_hand():
    losses, chosen, rejected = dpo_loss(*PAIR, beta=0.1)
    close(losses, [0.6209570])
    close(chosen, [0.1])
    close(rejected, [-0.05])


def test_cdpo_label_smoothing_by_hand():
    # .9 * 0.6209570 + .1 * 0.7709570 = 0.5588613 + 0.0770957 = 0.6359570
    close(dpo_loss(*PAIR, beta=0.1, label_smoothing=0.1)[0], [0.6359570])


def test_robust_by_hand():
    # (.9 * 0.6209570 - .1 * 0.7709570) / (1 - .2) = (0.5588613 - 0.0770957) / .8 = 0.6022070
    close(dpo_loss(*PAIR, beta=0.1, loss_type="robust", label_smoothing=0.1)[0], [0.6022070])
    close(dpo_loss(*PAIR, beta=0.1, loss_type="robust")[0], [0.6209570])  # eps = 0 is plain DPO


def test_hinge_by_hand():
    # pair 0: relu(1 - .15) = .85; pair 1: h = (0 - -10) - (-10 - 0) = 20 -> relu(1 - 2) = 0
    pc, pr, rc, rr = t([-1.0, 0.0]), t([-3.0, -10.0]), t([-2.0, -10.0]), t([-2.5, 0.0])
    close(dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge")[0], [0.85, 0.0])


def test_ipo_by_hand():
    # (h - 1/(2 beta))^2 = (1.5 - 1/0.2)^2 = (1.5 - 5)^2 = 12.25; rewards still beta * (pi - ref)
    losses, chosen, rejected = dpo_loss(*PAIR, beta=0.1, loss_type="ipo")
    close(losses, [12.25])
    close(chosen, [0.1])
    close(rejected, [-0.05])


def test_reference_free_by_hand():
    # ref terms dropped: h = -1 - -3 = 2 -> -logsig(0.2) = ln(1 + e^-0.2) = 0.5981389; rewards .1*-1, .1*-3
    losses, chosen, rejected = dpo_loss(*PAIR, beta=0.1, reference_free=True)
    close(losses, [0.5981389])
    close(chosen, [-0.1])
    close(rejected, [-0.3])


def test_dpo_rewards_are_detached_and_loss_has_grad():
    pc = t([-1.0]).requires_grad_()
    losses, chosen, _ = dpo_loss(pc, *PAIR[1:])
    assert losses.requires_grad and not chosen.requires_grad
    losses.sum().backward()
    # d/dpi_c -logsig(beta h) = -beta * sigmoid(-beta h) = -.1 * sigmoid(-.15) = -.1 * 0.4625702 = -0.0462570
    close(pc.grad, [-0.0462570])


def test_dpo_validation():
    with pytest.raises(ValueError, match="sigmoid.*") as err:
        dpo_loss(*PAIR, loss_type="kto")
    assert all(name in str(err.value) for name in DPO_LOSSES)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*PAIR, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*PAIR, label_smoothing=-0.1)
    assert set(DPO_LOSSES) == {"sigmoid", "robust", "hinge", "ipo"}


# --------------------------------------------------------------------------------------------------------------------
# Bradley-Terry
# --------------------------------------------------------------------------------------------------------------------


def test_bradley_terry_by_hand():
    chosen, rejected = t([2.0, 0.0]), t([1.0, 1.0])
    # diffs [1, -1]: ln(1 + e^-1) = 0.3132617, ln(1 + e^1) = 1.3132617 -> mean 0.8132617
    loss, stats = bradley_terry_loss(chosen, rejected)
    close(loss, 0.8132617)
    close(stats["accuracy"], 0.5)  # only pair 0 ranks chosen above rejected
    close(stats["margin"], 0.0)  # (1 + -1) / 2
    # margin [.5, 0]: diffs [.5, -1]: ln(1 + e^-.5) = 0.4740770, 1.3132617 -> mean 0.8936693
    loss, stats = bradley_terry_loss(chosen, rejected, margin=t([0.5, 0.0]))
    close(loss, 0.8936693)
    close(stats["margin"], 0.0)  # the stat is the raw score gap, without the target margin


# --------------------------------------------------------------------------------------------------------------------
# PPO policy loss. old logprobs 0, so r = exp(logp); clip_eps 0.2 -> clip range [0.8, 1.2]
#   tok  r    A    -A*r   -A*clip(r)  max    clipped term active?
#   a   1.5   1   -1.5    -1.2        -1.2   yes
#   b   0.9   1   -0.9    -0.9        -0.9   no
#   c   0.5  -1    0.5     0.8         0.8   yes
#   d   1.1  -2    2.2     2.2         2.2   no
#   (rows padded with r = 100, A = 5, mask 0)
#   mean = (-1.2 - .9 + .8 + 2.2) / 4 = .9 / 4 = .225; sum = .9; clipfrac = 2/4
#   ratio_mean = (1.5 + .9 + .5 + 1.1) / 4 = 1.0; ratio_max = 1.5 (padding excluded)
#   approx_kl = mean(r - 1 - ln r) = (.0945349 + .0053605 + .1931472 + .0046898) / 4 = .0744331
# --------------------------------------------------------------------------------------------------------------------


def policy_batch():
    ratio = t([[1.5, 0.9, 100.0], [0.5, 1.1, 100.0]])
    logp = ratio.log().requires_grad_()
    adv = t([[1.0, 1.0, 5.0], [-1.0, -2.0, 5.0]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    return logp, torch.zeros_like(ratio), adv, mask


def test_ppo_policy_loss_by_hand():
    logp, old, adv, mask = policy_batch()
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    close(loss, 0.225)
    close(stats["clipfrac"], 0.5)
    close(stats["ratio_mean"], 1.0)
    close(stats["ratio_max"], 1.5)
    close(stats["approx_kl"], 0.0744331)
    close(stats["early_stop"], 0.0)
    assert not any(v.requires_grad for v in stats.values())
    loss.backward()
    # d/dlogp of -A*r is -A*r / 4 where unclipped; 0 where the clipped (constant) term is active:
    # b: -1 * .9 / 4 = -.225; d: 2 * 1.1 / 4 = .55; a, c clipped; padding 0
    close(logp.grad, [[0.0, -0.225, 0.0], [0.0, 0.55, 0.0]])


def test_ppo_policy_loss_sum_reduction_by_hand():
    loss, _ = ppo_policy_loss(*policy_batch(), reduction="sum")
    close(loss, 0.9)  # -1.2 - .9 + .8 + 2.2
    with pytest.raises(ValueError, match="mean"):
        ppo_policy_loss(*policy_batch(), reduction="token")


def test_ppo_policy_loss_sum_over_micro_batches_equals_global_mean():
    # the reason "sum" exists: sum per micro-batch / global token count == mean over the whole batch
    torch.manual_seed(0)
    logp, old, adv = torch.randn(6, 5, dtype=D) * 0.3, torch.randn(6, 5, dtype=D) * 0.3, torch.randn(6, 5, dtype=D)
    mask = (torch.rand(6, 5) > 0.3).to(D)
    whole, _ = ppo_policy_loss(logp, old, adv, mask)
    parts = [ppo_policy_loss(logp[s], old[s], adv[s], mask[s], reduction="sum")[0] for s in (slice(0, 2), slice(2, 6))]
    close(sum(parts) / mask.sum(), whole, 1e-12)


def test_ppo_policy_loss_ratio_bound_early_stop():
    logp, old, adv, mask = policy_batch()
    loss, stats = ppo_policy_loss(logp, old, adv, mask, ratio_bound=5.0)  # mean ratio 1.0 <= 5: untouched
    close(loss, 0.225)
    close(stats["early_stop"], 0.0)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, ratio_bound=0.9)  # mean ratio 1.0 > .9: zeroed
    close(loss, 0.0)
    close(stats["early_stop"], 1.0)
    assert loss.requires_grad  # still in the graph: every rank runs the same backward
    loss.backward()
    close(logp.grad, torch.zeros_like(logp))


# --------------------------------------------------------------------------------------------------------------------
# PPO value loss. old values 0, clip_eps 0.2:
#   tok  V     R    (V-R)^2   V_clip  (V_clip-R)^2   max      clipped term larger?
#   a   0.5   1     .25       .2      .64            .64      yes
#   b   0.1   .5    .16       .1      .16            .16      no (equal)
#   c  -0.3   0     .09      -.2      .04            .09      no
#   d   0.05  1     .9025     .05     .9025          .9025    no
#   mean = .5 * (.64 + .16 + .09 + .9025) / 4 = .5 * 1.7925 / 4 = .2240625; sum = .5 * 1.7925 = .89625
#   unclipped: .5 * (.25 + .16 + .09 + .9025) / 4 = .5 * 1.4025 / 4 = .1753125
#   vf_clipfrac = 1/4; value_mean = (.5 + .1 - .3 + .05) / 4 = .0875
# --------------------------------------------------------------------------------------------------------------------


def value_batch():
    values = t([[0.5, 0.1, 9.0], [-0.3, 0.05, 9.0]])
    returns = t([[1.0, 0.5, -9.0], [0.0, 1.0, -9.0]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    return values, torch.zeros_like(values), returns, mask


def test_ppo_value_loss_by_hand():
    loss, stats = ppo_value_loss(*value_batch(), clip_eps=0.2)
    close(loss, 0.2240625)
    close(stats["vf_clipfrac"], 0.25)
    close(stats["value_mean"], 0.0875)
    close(ppo_value_loss(*value_batch(), clip_eps=0.2, reduction="sum")[0], 0.89625)
    loss, stats = ppo_value_loss(*value_batch(), clip_eps=None)
    close(loss, 0.1753125)
    close(stats["vf_clipfrac"], 0.0)
