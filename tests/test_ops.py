# Run: .venv/bin/python -m pytest -q tests/test_ops.py
"""rlhf.ops against numbers worked by hand (arithmetic in the comments) and against plain-Python references."""

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rlhf.ops import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    RunningMeanStd,
    all_reduce_sum_,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_k1,
    kl_k2,
    kl_k3,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    soft_update_,
)

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), atol=tol, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# masked reductions
# --------------------------------------------------------------------------------------------------------------------

X = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
M = [[1, 1, 0], [1, 0, 0]]


def test_masked_sum_and_mean_by_hand():
    x, m = t(X), t(M)
    close(masked_sum(x, m), 7.0)  # 1 + 2 + 4
    close(masked_mean(x, m), 7.0 / 3)  # 7 / 3 valid
    close(masked_sum(x, m, dim=1), [3.0, 4.0])  # row 0: 1 + 2, row 1: 4
    close(masked_mean(x, m, dim=1), [1.5, 4.0])  # 3 / 2, 4 / 1
    close(masked_mean(x, m.bool()), 7.0 / 3)  # bool masks work too


def test_masked_mean_empty_is_zero_and_padding_cannot_leak():
    x = t([[1.0, float("nan"), float("-inf")]])
    m = t([[1, 0, 0]])
    close(masked_mean(x, m), 1.0)  # NaN / -inf in padding are selected out, not multiplied by 0
    close(masked_mean(x, torch.zeros_like(m)), 0.0)  # 0 / clamp(0, min=1) = 0, not NaN
    close(masked_mean(t(X), t([[0, 0, 0], [1, 1, 0]]), dim=1), [0.0, 4.5])  # empty row -> 0; (4 + 5) / 2


def test_masked_mean_bf16_counts_exactly():
    # one 1.0 among 257 tokens: sum = 1 exactly, but a bf16 count rounds 257 to 256 (1/256 = .00390625);
    # counting in float32 gives 1/257 = .0038911, whose nearest bf16 is .0038910 != .00390625
    x = torch.zeros(257, dtype=torch.bfloat16)
    x[0] = 1
    got = masked_mean(x, torch.ones(257))
    assert got.dtype == torch.bfloat16 and got.item() == torch.tensor(1 / 257).bfloat16().item() != 1 / 256


def test_masked_var_by_hand():
    # valid 1, 2, 4: mean 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9
    x, m = t(X), t(M)
    close(masked_var(x, m), 42 / 9 / 3)  # population: 14/9
    close(masked_var(x, m, unbiased=True), 42 / 9 / 2)  # 7/3


def test_all_reduce_sum_is_noop_without_process_group():
    x = t([1.0, 2.0])
    assert all_reduce_sum_(x) is x
    close(x, [1.0, 2.0])


def test_masked_whiten_by_hand():
    # valid 1, 2, 4 (99 is padding): mean 7/3, population var 14/9, std sqrt(14/9) = 1.2472191
    # (1 - 7/3) / 1.2472191 = -1.0690450; (2 - 7/3) / 1.2472191 = -0.2672612; (4 - 7/3) / 1.2472191 = 1.3363062
    x, m = t([[1.0, 2.0, 4.0, 99.0]]), t([[1, 1, 1, 0]])
    close(masked_whiten(x, m, eps=0.0), [[-1.0690450, -0.2672612, 1.3363062, 0.0]])
    # shift_mean=False adds 7/3 back: 1.2642884, 2.0660721, 3.6696395; padding stays 0
    close(masked_whiten(x, m, shift_mean=False, eps=0.0), [[1.2642884, 2.0660721, 3.6696395, 0.0]])
    # default eps 1e-5: 1 / sqrt(14/9 + 1e-5) differs from 1/sqrt(14/9) by ~3e-6 relative
    close(masked_whiten(x, m)[0, 2], 1.3363062 / math.sqrt(1 + 1e-5 * 9 / 14))
    w = masked_whiten(torch.randn(4, 7), torch.ones(4, 7))
    close(w.mean(), 0.0, 1e-6)
    close(w.var(unbiased=False), 1.0, 1e-4)


# --------------------------------------------------------------------------------------------------------------------
# log-probs and entropy
# --------------------------------------------------------------------------------------------------------------------

# logits [0, ln 2, ln 4] -> softmax = [1, 2, 4] / 7
LOGITS3 = [[[0.0, math.log(2.0), math.log(4.0)]]]


def lp(label, **kw):
    return logprobs_from_logits(t(LOGITS3), torch.tensor([[label]]), **kw)[0, 0].item()


def test_logprobs_no_filter_and_temperature_by_hand():
    close(lp(2), math.log(4 / 7))  # -0.5596158
    close(lp(0), math.log(1 / 7))
    # temperature 2: logits / 2 = [0, ln sqrt2, ln 2] -> weights [1, 1.4142136, 2], sum 4.4142136
    # p(2) = 2 / 4.4142136 = 0.4530818, log = -0.7916825
    close(lp(2, temperature=2.0), -0.7916825)


def test_logprobs_top_k_by_hand():
    # top_k=2 keeps tokens 1, 2 (weights 2, 4): p(2) = 4/6, p(1) = 2/6
    close(lp(2, top_k=2), math.log(4 / 6))
    close(lp(1, top_k=2), math.log(2 / 6))
    # a label the filter cut joins the support (it was sampled): {0, 1, 2}, p(0) = 1 / (1 + 2 + 4)
    close(lp(0, top_k=2), math.log(1 / 7))
    close(lp(2, top_k=5), math.log(4 / 7))  # k >= V keeps everything


def test_logprobs_top_p_by_hand():
    # probs [1/7, 2/7, 4/7] = [.142857, .285714, .571429]
    close(lp(2, top_p=0.5), 0.0)  # 4/7 >= .5 alone -> only token 2 survives, p = 1
    close(lp(1, top_p=0.5), math.log(2 / 6))  # the cut label 1 joins {2}: 2 / (2 + 4)
    close(lp(2, top_p=0.6), math.log(4 / 6))  # 4/7 < .6 <= 6/7 -> {2, 1} survive, renormalized
    close(lp(0, top_p=0.6), math.log(1 / 7))  # the cut label 0 joins {2, 1}: 1 / (1 + 2 + 4)
    close(lp(0, top_p=0.9), math.log(1 / 7))  # 6/7 = .857 < .9 -> all three survive
    # temperature first: T=2 gives probs [1, 1.4142, 2] / 4.4142 = [.2265, .3204, .4531]; top_p .5 now keeps {2, 1}
    # p(2) = 2 / (2 + 1.4142136) = 0.5857864, log = -0.5348000
    close(lp(2, temperature=2.0, top_p=0.5), -0.5348000)
    # top-k then top-p: k=2 leaves [2, 4]/6 = [.333, .667]; top_p .6 keeps token 2 alone
    close(lp(2, top_k=2, top_p=0.6), 0.0)


def test_logprobs_plain_path_matches_log_softmax_and_bf16_is_upcast():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    close(logprobs_from_logits(logits, labels), ref, 1e-5)
    bf = logits.bfloat16()
    out = logprobs_from_logits(bf, labels)
    assert out.dtype == torch.float32  # bf16 log-probs would add ~0.4% noise to every PPO ratio
    close(out, torch.log_softmax(bf.float(), -1).gather(-1, labels[..., None])[..., 0], 1e-5)


def test_logprobs_filtered_path_has_finite_gradients():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 9, requires_grad=True)
    labels = logits.detach().argmax(-1)  # the argmax always survives the filters, as a sampled token does
    out = logprobs_from_logits(logits, labels, temperature=0.8, top_k=4, top_p=0.7)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, labels, temperature=0.0)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 10, 0.9), (1.0, 0, 0.8), (1.3, 5, 1.0), (1.0, 0, 1.0)])
def test_logprobs_match_transformers_sampling_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(1)
    B, T, V = 2, 4, 40
    logits = torch.randn(B, T, V) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    warped = warpers(None, logits.reshape(B * T, V).clone()).reshape(B, T, V)
    expected = torch.log_softmax(warped, dim=-1)  # [B, T, V], -inf where the sampler can never go
    # ours for every label at once: repeat each position V times with labels 0..V-1
    every = logits[:, :, None, :].expand(B, T, V, V).reshape(B, T * V, V)
    labels = torch.arange(V).repeat(B, T).reshape(B, T * V)
    ours = logprobs_from_logits(every, labels, temperature=temperature, top_k=top_k, top_p=top_p).reshape(B, T, V)
    # a label the sampler could draw has exactly the warped log-prob; one it cannot draw joins the support
    assert torch.isfinite(ours).all()
    finite = torch.isfinite(expected)
    close(ours[finite], expected[finite], 1e-5)


def test_entropy_by_hand():
    # probs [1, 2, 4]/7: H = ln 7 - (2/7 ln 2 + 4/7 ln 4) = ln 7 - 10/7 ln 2 = 1.9459101 - 0.9902102 = 0.9556999
    close(entropy_from_logits(t(LOGITS3)), [[0.9556999]])
    # temperature 2: weights [1, sqrt2, 2] / 4.4142136 -> H = -sum p ln p
    p = torch.tensor([1.0, math.sqrt(2.0), 2.0], dtype=D) / (3 + math.sqrt(2.0))
    close(entropy_from_logits(t(LOGITS3), temperature=2.0), [[-(p * p.log()).sum().item()]])


# --------------------------------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    close(kl_k1(logp, ref), [0.6931472])  # ln .5 - ln .25 = ln 2
    close(kl_k2(logp, ref), [0.2402265])  # 0.5 * ln(2)^2 = 0.5 * 0.4804530
    close(kl_k3(logp, ref), [0.1931472])  # exp(ln .25 - ln .5) - 1 - (ln .25 - ln .5) = .5 - 1 + ln 2
    close(kl_k3(logp, logp), [0.0])  # identical policies -> 0
    assert KL_ESTIMATORS == {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def test_kl_k3_is_nonnegative():
    torch.manual_seed(0)
    a, b = torch.randn(1000, dtype=D) * 3, torch.randn(1000, dtype=D) * 3
    assert (kl_k3(a, b) >= 0).all() and (kl_k2(a, b) >= 0).all()


# --------------------------------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------------------------------


def gae_reference(rewards, values, lengths, gamma, lam, next_values):
    """Plain nested loops: per row, walk back from the last valid token."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        last = 0.0
        for i in reversed(range(lengths[b])):
            nv = values[b][i + 1] if i + 1 < lengths[b] else next_values[b]
            delta = rewards[b][i] + gamma * nv - values[b][i]
            last = delta + gamma * lam * (last if i + 1 < lengths[b] else 0.0)
            adv[b][i] = last
            ret[b][i] = last + values[b][i]
    return adv, ret


def test_gae_worked_by_hand():
    # T=3, EOS-terminated row (next value 0), gamma .9, lam .8 (gamma * lam = .72)
    # t=2: delta = 1 + .9*0 - .7 = .3;            A2 = .3
    # t=1: delta = 0 + .9*.7 - .6 = .03;          A1 = .03 + .72*.3 = .246
    # t=0: delta = 0 + .9*.6 - .5 = .04;          A0 = .04 + .72*.246 = .21712
    # returns = A + V = [.71712, .846, 1.0]
    # row 1: same rewards/values, length 2 (t=2 padding holds NaN), bootstrapped with next value 2.0:
    # t=1: delta = 0 + .9*2 - .6 = 1.2;           A1 = 1.2
    # t=0: delta = 0 + .9*.6 - .5 = .04;          A0 = .04 + .72*1.2 = .904
    rewards = t([[0.0, 0.0, 1.0], [0.0, 0.0, float("nan")]])
    values = t([[0.5, 0.6, 0.7], [0.5, 0.6, float("nan")]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8, next_values=t([0.0, 2.0]))
    close(adv, [[0.21712, 0.246, 0.3], [0.904, 1.2, 0.0]])
    close(ret, [[0.71712, 0.846, 1.0], [1.404, 1.8, 0.0]])
    adv0, _ = gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=0.8)  # next_values None == zeros
    close(adv0, adv[:1])


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95), (0.5, 0.0), (0.99, 0.7)])
def test_gae_matches_loop_reference(gamma, lam):
    torch.manual_seed(0)
    B, T = 5, 7
    lengths = [7, 4, 1, 0, 6]  # row 0 full length (truncated -> bootstrapped), row 3 empty
    next_values = [1.5, 0.0, 0.0, 0.0, -0.7]  # row 4 also bootstrapped; the others ended with EOS
    rewards, values = torch.randn(B, T, dtype=D), torch.randn(B, T, dtype=D)
    mask = torch.zeros(B, T, dtype=D)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        rewards[b, n:] = 1e6  # padding garbage must not leak into valid positions
        values[b, n:] = -1e6
    exp_adv, exp_ret = gae_reference(rewards.tolist(), values.tolist(), lengths, gamma, lam, next_values)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, next_values=t(next_values))
    close(adv, exp_adv, 1e-9)
    close(ret, exp_ret, 1e-9)


# --------------------------------------------------------------------------------------------------------------------
# EMA, explained variance, controllers
# --------------------------------------------------------------------------------------------------------------------


def test_soft_update_by_hand():
    target, source = [torch.ones(3)], [torch.full((3,), 2.0)]
    soft_update_(target, source, alpha=0.001)
    close(target[0], [1.001] * 3)  # .001 * 2 + .999 * 1
    soft_update_(target, source, alpha=0.001)
    close(target[0], [1.001999] * 3)  # .001 * 2 + .999 * 1.001 = .002 + .999999

    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    soft_update_(a, b, alpha=1.0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # exact copy
    assert all(p.requires_grad and p.grad_fn is None for p in a.parameters())  # still trainable leaves, no graph

    bf = nn.Linear(4, 3).to(torch.bfloat16)
    soft_update_(bf, b, alpha=1.0)  # source cast to the target's dtype
    assert bf.weight.dtype == torch.bfloat16 and torch.equal(bf.weight, b.weight.bfloat16())
    with pytest.raises(ValueError):
        soft_update_(a, nn.Linear(4, 2), alpha=0.5)


def test_explained_variance_by_hand():
    returns, mask = t([[1.0, 2.0, 3.0, 50.0]]), t([[1, 1, 1, 0]])
    # residual R - V = [0, 0, -1]: mean -1/3, var (1/9 + 1/9 + 4/9) / 3 = 2/9; var R = 2/3 -> 1 - (2/9)/(2/3) = 2/3
    close(explained_variance(t([[1.0, 2.0, 4.0, 0.0]]), returns, mask), 2 / 3)
    close(explained_variance(returns, returns, mask), 1.0)
    assert torch.isnan(explained_variance(returns, t([[5.0] * 4]), t([[1, 0, 0, 0]])))  # var R = 0: undefined


def test_kl_controllers_by_hand():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(12.0, n_steps=100)  # e = clip(12/6 - 1, +-.2) = .2 -> .1 * (1 + .2 * 100/10000) = .1002
    close(c.value, 0.1002)
    c.update(5.4, n_steps=1000)  # e = 5.4/6 - 1 = -.1 -> .1002 * (1 - .1 * 1000/10000) = .1002 * .99 = .099198
    close(c.value, 0.099198)
    d = AdaptiveKLController(1.0, 1.0, 1.0)
    d.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert d.value == c.value and d.target == 6.0 and d.horizon == 10000
    f = FixedKLController(0.05)
    f.update(100.0, 10)
    assert f.value == 0.05
    f.load_state_dict({"value": 0.2})
    assert f.value == 0.2


# --------------------------------------------------------------------------------------------------------------------
# RunningMeanStd
# --------------------------------------------------------------------------------------------------------------------


def test_running_mean_std_cumulative_by_hand():
    rms = RunningMeanStd()
    assert rms.mean == 0.0 and rms.var == 1.0  # identity before any data
    rms.update(t([[1.0, 2.0, 99.0]]), mask=t([[1, 1, 0]]))
    rms.update(t([4.0]))
    # seen 1, 2, 4: mean 7/3, population var 14/9 (see test_masked_var_by_hand)
    close(rms.mean, 7 / 3)
    close(rms.var, 14 / 9)
    close(rms.std, math.sqrt(14 / 9 + 1e-5))
    close(rms.normalize(t([4.0])), [(4 - 7 / 3) / math.sqrt(14 / 9 + 1e-5)])
    x = torch.randn(5, dtype=D)
    close(rms.denormalize(rms.normalize(x)), x, 1e-12)
    restored = RunningMeanStd(decay=0.3)
    restored.load_state_dict(json.loads(json.dumps(rms.state_dict())))  # plain floats: JSON round trip
    assert (restored.mean, restored.var, restored.count, restored.decay) == (rms.mean, rms.var, 3, None)


def test_running_mean_std_matches_concatenation():
    torch.manual_seed(0)
    chunks = [torch.randn(n, dtype=D) * 3 + 1 for n in (5, 1, 17, 8)]
    rms = RunningMeanStd()
    for c in chunks:
        rms.update(c)
    allx = torch.cat(chunks)
    close(rms.mean, allx.mean(), 1e-12)
    close(rms.var, allx.var(unbiased=False), 1e-12)


def test_running_mean_std_exponential_by_hand():
    rms = RunningMeanStd(decay=0.5)
    rms.update(t([2.0]))
    # E[x]: .5*0 + .5*2 = 1, E[x^2]: .5*4 = 2, debias 1 - .5 = .5 -> mean 2, E[x^2] 4, var 0
    close(rms.mean, 2.0)
    close(rms.var, 0.0)
    rms.update(t([3.0, 5.0]))  # batch mean 4, batch E[x^2] (9 + 25)/2 = 17
    # E[x]: .5*1 + .5*4 = 2.5, E[x^2]: .5*2 + .5*17 = 9.5, debias .5*.5 + .5 = .75
    # mean = 2.5/.75 = 10/3; var = 9.5/.75 - (10/3)^2 = 12.6667 - 11.1111 = 1.5556 (= 14/9)
    close(rms.mean, 10 / 3)
    close(rms.var, 14 / 9)
    floored = RunningMeanStd(decay=0.5, var_floor=2.0)
    floored.load_state_dict({**rms.state_dict(), "var_floor": 2.0})
    close(floored.var, 2.0)  # 14/9 < 2 -> clamped (the paper clamps at 1e-2)


# --------------------------------------------------------------------------------------------------------------------
# Distributed: two gloo ranks must see the statistics of the concatenated batch
# --------------------------------------------------------------------------------------------------------------------


def _full_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=g, dtype=D) * 2 + 0.5
    lengths = [6, 2, 4, 1, 5]
    mask = torch.zeros(5, 6, dtype=D)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return x, mask


RANK_ROWS = [slice(0, 2), slice(2, 5)]  # rank 0: 2 rows, 8 tokens; rank 1: 3 rows, 10 tokens


def _distributed_worker(rank, tmpdir):
    dist.init_process_group("gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=2)
    try:
        x, mask = _full_batch()
        rows = RANK_ROWS[rank]
        out = {"whiten": masked_whiten(x[rows], mask[rows], distributed=True)}
        out["whiten_noshift"] = masked_whiten(x[rows], mask[rows], shift_mean=False, distributed=True)
        for name, decay in (("rms", None), ("rms_ema", 0.9)):
            rms = RunningMeanStd(decay=decay)
            rms.update(x[rows], mask[rows], distributed=True)
            rms.update(x[rows] * 3 - 1, mask[rows], distributed=True)
            out[name] = rms.state_dict()
        torch.save(out, os.path.join(tmpdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_whiten_and_running_stats_equal_single_process(tmp_path):
    mp.spawn(_distributed_worker, args=(str(tmp_path),), nprocs=2, join=True)
    x, mask = _full_batch()
    whole = masked_whiten(x, mask)
    whole_noshift = masked_whiten(x, mask, shift_mean=False)
    expected = {}
    for name, decay in (("rms", None), ("rms_ema", 0.9)):
        rms = RunningMeanStd(decay=decay)
        rms.update(x, mask)
        rms.update(x * 3 - 1, mask)
        expected[name] = rms.state_dict()
    for rank, rows in enumerate(RANK_ROWS):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        close(got["whiten"], whole[rows], 1e-12)
        close(got["whiten_noshift"], whole_noshift[rows], 1e-12)
        for name in expected:
            assert got[name]["count"] == expected[name]["count"] == 36  # 18 valid tokens x 2 updates
            for key in ("mean", "second", "debias"):
                close(got[name][key], expected[name][key], 1e-10)
