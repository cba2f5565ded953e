# Run: .venv/bin/python -m pytest -q tests/test_reward.py
"""Reward modelling glue: the score at the last real token, margins, centring, the normalization folded into the
saved head (by hand and after save + reload), and learning on held-out pairs of the shipped preference set."""

import json
import math
import os
import time
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import PAIR_OPTIM, train_config
from rlhf import Trainer
from rlhf.cli import main as cli_main
from rlhf.algorithms.reward import NORMALIZATION_FILE, fold_normalization, pair_objective
from rlhf.models.loading import apply_score_bias_
from rlhf.config import RewardSection
from rlhf.data import DataError
from rlhf.models import load_scalar_model
from tests.test_dpo import heldout_split, testbed_model_dir  # noqa: F401  (a fixture)

HUB = os.path.join(os.path.dirname(__file__), "fixtures", "hub")


def rm_config(model_dir, train, out, **over):
    return train_config("reward", model_dir, train, out, PAIR_OPTIM, **over)


def test_score_is_read_at_the_last_real_token(tiny_model_dir, prefs_file, tmp_path):
    trainer = Trainer(rm_config(tiny_model_dir, prefs_file, str(tmp_path)))
    algo = trainer.algorithm
    model = algo.build_model()
    batch = algo.collate(algo.train_pairs[:4])
    assert (batch.attention_mask == 0).any()  # rows of different lengths: some are padded
    chosen, rejected = algo.scores(model, batch)
    with torch.no_grad():  # each row alone, unpadded: the classifier's own pooling reads its last token
        alone = [model(input_ids=row[mask.bool()][None]).logits[0, 0]
                 for row, mask in zip(batch.input_ids, batch.attention_mask)]
    torch.testing.assert_close(torch.cat([chosen, rejected]), torch.stack(alone), atol=1e-5, rtol=1e-5)


def test_fold_normalization_by_hand():
    head = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, -1.0]]))
    folded = fold_normalization(head, mean=3.0, std=2.0)
    # raw score of h = [1, 1] is 2 - 1 = 1; calibrated (1 - 3) / 2 = -1
    # folded: weight [2, -1] / 2 = [1, -0.5], bias (0 - 3) / 2 = -1.5 -> 1 - 0.5 - 1.5 = -1
    torch.testing.assert_close(folded.weight, torch.tensor([[1.0, -0.5]]))
    torch.testing.assert_close(folded.bias, torch.tensor([-1.5]))
    torch.testing.assert_close(folded(torch.tensor([1.0, 1.0])), torch.tensor([-1.0]))
    # a head that already has a bias b: (w.h + b - mean) / std; b = 1 -> (1 + 1 - 3) / 2 = -0.5
    biased = fold_normalization(folded, mean=-1.0, std=0.5)  # re-calibrating a calibrated head composes
    torch.testing.assert_close(biased(torch.tensor([1.0, 1.0])), torch.tensor([0.0]))  # (-1 + 1) / 0.5


def test_apply_score_bias_is_idempotent():
    model = torch.nn.Module()
    model.score = torch.nn.Linear(2, 1, bias=False)
    model.config = SimpleNamespace(score_bias=-1.5)
    apply_score_bias_(model)
    apply_score_bias_(model)
    assert model.score.bias.tolist() == [-1.5]


def test_margin_and_centring_by_hand():
    chosen, rejected = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    # plain: 2 * -ln sigmoid(1) = 2 * 0.313262 = 0.626523
    loss, stats = pair_objective(RewardSection(), chosen, rejected, None)
    torch.testing.assert_close(loss, torch.tensor(0.626523), atol=1e-6, rtol=0)
    assert stats["reward/accuracy"].item() == 1.0 and stats["reward/margin"].item() == 1.0
    # margin m = [1, 0]: -ln sigmoid(0) - ln sigmoid(1) = 0.693147 + 0.313262 = 1.006409
    loss, _ = pair_objective(RewardSection(margin=True), chosen, rejected, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor(1.006409), atol=1e-6, rtol=0)
    # centring 0.5: + 0.5 * ((1 + 0)^2 + (2 + 1)^2) = 5 -> 5.626523
    loss, _ = pair_objective(RewardSection(center_coef=0.5), chosen, rejected, None)
    torch.testing.assert_close(loss, torch.tensor(5.626523), atol=1e-6, rtol=0)


def test_ultrafeedback_margins_reach_the_batch(tiny_model_dir, tmp_path):
    cfg = rm_config(tiny_model_dir, os.path.join(HUB, "ultrafeedback_binarized"), str(tmp_path),
                    data__train_split="train_prefs", optim__batch_size=3, optim__micro_batch_size=3,
                    reward__margin=True)
    algo = Trainer(cfg).algorithm
    assert algo.collate(algo.train_pairs).margin.tolist() == [5.0, 6.5, 8.5]  # score_chosen - score_rejected


def test_margin_on_rows_without_one_fails_naming_the_row(tiny_model_dir, prefs_file, tmp_path):
    with pytest.raises(DataError, match=r"prefs.jsonl:1: field 'margin': missing \(reward.margin is on\)"):
        Trainer(rm_config(tiny_model_dir, prefs_file, str(tmp_path), reward__margin=True))


def calibrated_scores(algo, final, pairs):
    """Scores of the pairs' responses under the saved model, loaded the way PPO loads a reward model."""
    model = load_scalar_model(str(final))  # the calibration shift is restored on load
    return algo.score_responses(model, pairs)


@pytest.mark.parametrize("lora", [0, 4])
def test_saved_model_outputs_calibrated_scores(tiny_model_dir, prefs_file, tmp_path, lora):
    trainer = Trainer(rm_config(tiny_model_dir, prefs_file, str(tmp_path), optim__max_steps=3, model__lora_r=lora))
    trainer.train()
    final = tmp_path / "run" / "final"
    stats = json.loads((final / NORMALIZATION_FILE).read_text())
    assert stats["count"] == 2 * len(trainer.algorithm.train_pairs) and stats["set"] == "train"
    scores = calibrated_scores(trainer.algorithm, final, trainer.algorithm.train_pairs)
    assert abs(scores.mean().item()) < 1e-4
    assert abs(scores.std(unbiased=False).item() - 1) < 1e-4
    # the live model still gives training-time (raw) scores, which the statistics describe
    raw = trainer.algorithm.score_responses(trainer.accelerator.unwrap_model(trainer.model),
                                            trainer.algorithm.train_pairs)
    torch.testing.assert_close((raw - stats["mean"]) / stats["std"], scores, atol=1e-4, rtol=1e-4)
    # the checkpoint of the last step is the same calibrated scorer (save_model writes both), and so is its export;
    # the same weights through the same arithmetic: 1e-6 allows only for a BLAS reduction order that varies
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000003"
    assert cli_main(["export", str(checkpoint), str(tmp_path / "exported")]) == 0
    for other in (checkpoint, tmp_path / "exported"):
        torch.testing.assert_close(calibrated_scores(trainer.algorithm, other, trainer.algorithm.train_pairs), scores,
                                   atol=1e-6, rtol=0)


def test_reward_model_gives_calibrated_scores_outside_rlhf(tiny_model_dir, prefs_file, tmp_path):
    # The score head (Llama) has no bias, so the calibration's shift cannot live in the weights: plain transformers
    # gives every score minus config.score_bias. rlhf.load_reward_model gives the calibrated scores, and so does the
    # one-line transformers recipe of final/README.md. Scores are read by each library's own pooling (transformers:
    # the last non-pad token of a right-padded batch).
    from transformers import AutoModelForSequenceClassification

    from rlhf import load_reward_model
    from rlhf.data.preference import collate_pairs

    trainer = Trainer(rm_config(tiny_model_dir, prefs_file, str(tmp_path), optim__max_steps=3))
    trainer.train()
    final = tmp_path / "run" / "final"
    batch = collate_pairs(trainer.tokenizer.pad_token_id)(trainer.algorithm.train_pairs[:8])
    rows = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    # rlhf's scores, as PPO reads them (mean 0, std 1: test_saved_model_outputs_calibrated_scores)
    with torch.no_grad():
        calibrated = torch.cat(trainer.algorithm.scores(load_scalar_model(str(final)), batch))
        ours = load_reward_model(str(final))(**rows).logits[:, 0]
        plain_model = AutoModelForSequenceClassification.from_pretrained(str(final)).eval()
        plain = plain_model(**rows).logits[:, 0]
    shift = plain_model.config.score_bias
    assert abs(shift) > 1e-3  # a real shift: plain scores are off by it
    torch.testing.assert_close(ours, calibrated, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain + shift, calibrated, atol=1e-5, rtol=0)
    note = (final / "README.md").read_text()
    assert "load_reward_model(path)" in note and "logits[:, 0] + model.config.score_bias" in note


def test_reward_model_learns_heldout_pairs(testbed_model_dir, tmp_path, capsys):  # noqa: F811
    src, paths, n_train, n_held = heldout_split(tmp_path)
    cfg = rm_config(testbed_model_dir, paths["train"], str(tmp_path), data__eval=paths["heldout"],
                    optim__lr=2e-3, optim__batch_size=16, optim__micro_batch_size=16, optim__max_steps=96,
                    optim__warmup_ratio=0.1, reward__normalize_on="eval")
    t0 = time.time()
    trainer = Trainer(cfg)
    last = trainer.train()
    seconds = time.time() - t0
    acc = last["eval/reward/accuracy"]
    with capsys.disabled():
        print(f"\nRM held-out accuracy {acc:.3f} on {n_held} unseen pairs of {os.path.relpath(src)} "
              f"(trained on {n_train} pairs, 96 steps x 16 pairs, {seconds:.1f}s)")
    assert acc >= 0.7, acc
    assert math.isfinite(last["eval/loss"]) and last["eval/reward/margin"] > 0
    # calibrated on the held-out responses (normalize_on: eval)
    scores = calibrated_scores(trainer.algorithm, tmp_path / "run" / "final", trainer.algorithm.eval_pairs)
    assert abs(scores.mean().item()) < 1e-4 and abs(scores.std(unbiased=False).item() - 1) < 1e-4
