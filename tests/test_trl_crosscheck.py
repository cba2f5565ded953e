# Run: .venv/bin/python -m pytest -q tests/test_trl_crosscheck.py
"""Our DPO and Bradley-Terry losses against TRL's own trainers on the same log-probs / scores.

TRL computes these losses inside trainer methods that also run the model forward. We build a trainer with
`__new__` (no model loading, no datasets), give it only the attributes its loss method reads, and feed it a stub
model whose outputs carry the log-probs we chose. If a TRL release renames those internals the tests fail loudly
at the stub, which is the signal to re-read TRL, not a bug in our losses.
"""

import collections
from types import SimpleNamespace

import pytest
import torch

from rlhf.losses import bradley_terry_loss, dpo_loss

trl = pytest.importorskip("trl")
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.reward_trainer import RewardTrainer  # noqa: E402

B, BETA = 4, 0.1


class _StubPolicy:
    """Returns fixed per-token log-probs in the fields DPOTrainer._compute_loss reads from the model output."""

    training = True

    def __init__(self, per_token_logps):  # [2B, T-1]: the rows are [chosen..., rejected...]
        self.per_token_logps = per_token_logps

    def __call__(self, **kwargs):
        shape = self.per_token_logps.shape
        return SimpleNamespace(
            log_probs=self.per_token_logps,
            entropy=torch.zeros(shape),
            mean_logits=torch.zeros(shape),
            is_top1=torch.zeros(shape, dtype=torch.bool),
        )


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def trl_dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, lengths, loss_type, label_smoothing=0.0):
    """TRL's mean DPO loss and its logged rewards/chosen, rewards/rejected for one batch of summed logps.

    Each completion's summed log-prob sits in its first completion token (the rest 0), and `lengths` sets the
    completion mask, which TRL's ipo uses to length-average.
    """
    n, T = policy_chosen.numel(), int(lengths.max()) + 1
    per_token = torch.zeros(2 * n, T - 1)
    per_token[:, 0] = torch.cat([policy_chosen, policy_rejected])
    completion_mask = (torch.arange(T)[None, :] >= 1) & (torch.arange(T)[None, :] <= lengths[:, None])
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.__dict__.update(
        model=_StubPolicy(per_token),
        accelerator=_accelerator(),
        beta=BETA,
        loss_types=[loss_type],
        loss_weights=[1.0],
        label_smoothing=label_smoothing,
        f_divergence_type="reverse_kl",
        ld_alpha=None,
        use_weighting=False,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * n, T, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, T, dtype=torch.long),
        "completion_mask": completion_mask.long(),
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    metrics = trainer._metrics["train"]
    return loss, metrics["rewards/chosen"][-1], metrics["rewards/rejected"][-1]


def random_logps(seed):
    g = torch.Generator().manual_seed(seed)
    logps = [-(torch.rand(B, generator=g) * 15 + 1) for _ in range(4)]  # summed logps of 1..16 nats
    lengths = torch.randint(1, 9, (2 * B,), generator=g)  # completion lengths, chosen rows then rejected rows
    return logps, lengths


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_loss_matches_trl(loss_type, seed):
    (pc, pr, rc, rr), lengths = random_logps(seed)
    label_smoothing = 0.2 if loss_type == "robust" else 0.0
    trl_loss, trl_chosen, trl_rejected = trl_dpo(pc, pr, rc, rr, lengths, loss_type, label_smoothing)
    if loss_type == "ipo":
        # our ipo takes length-averaged logps; TRL divides the summed log-ratios by the completion lengths itself
        len_c, len_r = lengths[:B].float(), lengths[B:].float()
        ours = dpo_loss(pc / len_c, pr / len_r, rc / len_c, rr / len_r, beta=BETA, loss_type="ipo")[0]
        _, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=BETA)  # TRL logs rewards from the summed logps
    else:
        ours, chosen, rejected = dpo_loss(pc, pr, rc, rr, BETA, loss_type, label_smoothing)
    torch.testing.assert_close(ours.mean(), trl_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chosen.mean().item(), trl_chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rejected.mean().item(), trl_rejected, atol=1e-5, rtol=1e-5)


def test_label_smoothed_sigmoid_matches_trl_aot_on_single_pairs():
    # TRL 1.16's "sigmoid" ignores label_smoothing; its "aot" loss applies cDPO smoothing to a margin built from
    # batch-sorted log-ratios, and with one pair per batch the sort is the identity, so aot == cDPO per pair.
    (pc, pr, rc, rr), lengths = random_logps(3)
    ours = dpo_loss(pc, pr, rc, rr, beta=BETA, label_smoothing=0.1)[0]
    for i in range(B):
        one = slice(i, i + 1)
        trl_loss, _, _ = trl_dpo(pc[one], pr[one], rc[one], rr[one], lengths[[i, B + i]], "aot", 0.1)
        torch.testing.assert_close(ours[i], trl_loss, atol=1e-5, rtol=1e-5)


class _StubRewardModel:
    training = False  # eval mode: TRL skips its token counting

    def __init__(self, scores):  # [2B]: chosen then rejected
        self.scores = scores

    def __call__(self, **kwargs):
        return SimpleNamespace(logits=self.scores[:, None])


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_matches_trl_reward_trainer(with_margin):
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(B, generator=g) * 2, torch.randn(B, generator=g) * 2
    margin = torch.rand(B, generator=g) if with_margin else None
    trainer = RewardTrainer.__new__(RewardTrainer)
    trainer.__dict__.update(
        model=_StubRewardModel(torch.cat([chosen, rejected])),
        accelerator=_accelerator(),
        args=SimpleNamespace(center_rewards_coefficient=None),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {"attention_mask": torch.ones(2 * B, 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    loss, stats = bradley_terry_loss(chosen, rejected, margin)
    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=1e-6)
    metrics = trainer._metrics["eval"]
    torch.testing.assert_close(stats["accuracy"].item(), metrics["accuracy"][-1])
    torch.testing.assert_close(stats["margin"].item(), metrics["margin"][-1], atol=1e-6, rtol=1e-6)
