# Run: .venv/bin/python -m pytest -q tests/test_dpo.py
"""DPO glue: sequence log-probs by hand, every reference mode through the Trainer, resume, learning on held-out pairs.

The loss formulas themselves are checked in tests/test_losses.py and, model-level, in tests/test_dpo_trl_model.py.
"""

import json
import math
import os
import time

import pytest
import torch

from tests.conftest import PAIR_OPTIM, train_config
from rlhf import Trainer
from rlhf.algorithms.dpo import REF_CACHE, DPO, pair_objective
from rlhf.config import ConfigError, DPOSection
from rlhf.data.preference import PairExample, collate_pairs
from rlhf.models.forward import sequence_logprobs
from rlhf.tracking import read_metrics

ROOT = os.path.dirname(os.path.dirname(__file__))
SHIPPED_PREFS = os.path.join(ROOT, "data", "assistant", "prefs.jsonl")


def dpo_config(model_dir, train, out, **over):
    return train_config("dpo", model_dir, train, out, PAIR_OPTIM, **over)


# ------------------------------------------------------------------------------------------------
# Exact: log-probs summed and length-averaged over response tokens, and the pair objective, by hand
# ------------------------------------------------------------------------------------------------


class Bigram(torch.nn.Module):
    """logits[b, t] = log P[input_ids[b, t]]: the next-token distribution depends on the current token only."""

    def __init__(self, probs):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(probs).log())

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return type("Out", (), {"logits": self.table[input_ids]})


# P(next | current) over a 3-token vocabulary
POLICY = Bigram([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]])
UNIFORM = Bigram([[1 / 3] * 3] * 3)


def hand_batch():
    # prompt [0]; chosen [1, 2, 0]; rejected [2, 1] (right-padded by one)
    return collate_pairs(pad_id=1)([PairExample([0], [1, 2, 0], [2, 1])])


def test_pair_batch_layout():
    b = hand_batch()
    assert b.input_ids.tolist() == [[0, 1, 2, 0], [0, 2, 1, 1]]  # chosen row, then rejected row
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert b.response_mask.tolist() == [[1, 1, 1], [1, 1, 0]]  # targets input_ids[:, 1:]


def test_sequence_logprobs_summed_and_averaged_by_hand():
    b = hand_batch()
    sums, lengths = sequence_logprobs(POLICY, b.input_ids, b.attention_mask, b.response_mask)
    # chosen:   P(1|0) P(2|1) P(0|2) = .25 * .25 * 1/3  -> sum = 2 ln .25 + ln 1/3 = -3.871201, mean /3 = -1.290400
    # rejected: P(2|0) P(1|2)        = .25 * 1/3        -> sum = ln .25 + ln 1/3   = -2.484907, mean /2 = -1.242453
    # (the padded position of the rejected row is masked out)
    torch.testing.assert_close(sums, torch.tensor([-3.871201, -2.484907]), atol=1e-6, rtol=0)
    assert lengths.tolist() == [3.0, 2.0]
    torch.testing.assert_close(sums / lengths, torch.tensor([-1.290400, -1.242453]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss_type, expected_loss", [
    # summed: h = (-3.871201 - 3 ln 1/3) - (-2.484907 - 2 ln 1/3) = ln .75 = -0.287682
    #         sigmoid: -ln sigmoid(0.1 * h) = ln(1 + e^0.0287682) = 0.707635
    ("sigmoid", 0.707635),
    # averaged: h = (-1.290400 - ln 1/3) - (-1.242453 - ln 1/3) = ln(.75) / 6 = -0.047947
    #         ipo: (h - 1 / (2 * 0.1))^2 = (-0.047947 - 5)^2 = 25.481769
    ("ipo", 25.481769),
    # hinge:  relu(1 - 0.1 * ln .75) = 1.028768
    ("hinge", 1.028768),
])
def test_pair_objective_by_hand(loss_type, expected_loss):
    b = hand_batch()
    logps, lengths = sequence_logprobs(POLICY, b.input_ids, b.attention_mask, b.response_mask)
    ref, _ = sequence_logprobs(UNIFORM, b.input_ids, b.attention_mask, b.response_mask)
    losses, stats = pair_objective(DPOSection(beta=0.1, loss_type=loss_type), logps, lengths, ref)
    torch.testing.assert_close(losses, torch.tensor([expected_loss]), atol=1e-5, rtol=0)
    # rewards come from SUMMED log-probs for every loss type: 0.1 * (sum - ref sum)
    torch.testing.assert_close(stats["rewards/chosen"], torch.tensor([0.1 * 2 * math.log(0.75)]))
    torch.testing.assert_close(stats["rewards/rejected"], torch.tensor([0.1 * math.log(0.75)]))
    assert stats["rewards/accuracies"].item() == 0.0
    torch.testing.assert_close(stats["logps/chosen"], torch.tensor([-3.871201]))


def test_config_validation():
    with pytest.raises(ConfigError, match="dpo.ref_update_every=1 .* needs dpo.reference='copy'"):
        DPOSection(reference="precomputed", ref_update_every=1)
    with pytest.raises(ConfigError, match="dpo.loss_type='kto': expected one of sigmoid, robust, hinge, ipo"):
        DPOSection(loss_type="kto")
    with pytest.raises(ConfigError, match=r"dpo.label_smoothing=0.5: expected in \[0, 0.5\)"):
        DPOSection(loss_type="robust", label_smoothing=0.5)


def test_adapter_reference_needs_lora(tiny_model_dir, prefs_file, tmp_path):
    with pytest.raises(ConfigError, match="needs a LoRA policy"):
        Trainer(dpo_config(tiny_model_dir, prefs_file, str(tmp_path), dpo__reference="adapter"))


# ------------------------------------------------------------------------------------------------
# Every reference mode through Trainer(cfg).train()
# ------------------------------------------------------------------------------------------------

MODES = {
    "precomputed": {},
    "copy": {"dpo__reference": "copy"},
    "copy-ema": {"dpo__reference": "copy", "dpo__ref_update_every": 1, "dpo__ref_update_alpha": 0.5},
    "adapter": {"dpo__reference": "adapter", "model__lora_r": 4},
    "reference-free-ipo": {"dpo__reference_free": True, "dpo__loss_type": "ipo"},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_reference_modes_train(tiny_model_dir, prefs_file, tmp_path, mode):
    cfg = dpo_config(tiny_model_dir, prefs_file, str(tmp_path), data__eval=prefs_file, **MODES[mode])
    trainer = Trainer(cfg)
    last = trainer.train()
    for key in ("train/loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "eval/loss", "eval/rewards/accuracies", "eval/logps/chosen"):
        assert math.isfinite(last[key]), key
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[0]["data/train_skipped_rows"] == 0
    assert (tmp_path / "run" / REF_CACHE).exists() == (mode == "precomputed")
    assert (tmp_path / "run" / "final" / ("adapter_config.json" if mode == "adapter" else "config.json")).exists()
    algo = trainer.algorithm
    if mode.startswith("copy"):  # a plain copy stays the initial policy; a soft-updated one moves halfway each step
        from transformers import AutoModelForCausalLM

        start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
        ref = algo.reference.model.state_dict()
        moved = any(not torch.equal(ref[k], start[k]) for k in ref)
        assert moved == (mode == "copy-ema")


def test_chosen_and_rejected_share_one_forward(tiny_model_dir, prefs_file, tmp_path):
    trainer = Trainer(dpo_config(tiny_model_dir, prefs_file, str(tmp_path), dpo__reference="copy"))
    algo = trainer.algorithm
    model = algo.build_model()
    algo.prepared(model)
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    batch = algo.collate(algo.train_pairs[:4])
    algo.loss(model, batch)
    # one call, one row per pair: chosen and rejected follow one copy of their prompt (rlhf.models.shared_prefix)
    assert len(calls) == 1 and calls[0][0] == 4


# ------------------------------------------------------------------------------------------------
# Resume: precomputed reference (cache reused) and soft-updated reference (state saved) are exact
# ------------------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("mode", ["precomputed", "copy-ema"])
def test_interrupted_then_resumed_equals_uninterrupted(tiny_model_dir, prefs_file, tmp_path, monkeypatch, mode):
    kw = dict(optim__max_steps=4, logging__save_every=2, **MODES[mode])
    Trainer(dpo_config(tiny_model_dir, prefs_file, str(tmp_path / "a"), **kw)).train()

    trainer = Trainer(dpo_config(tiny_model_dir, prefs_file, str(tmp_path / "b"), **kw))
    steps = trainer.algorithm.steps

    def interrupted(start):  # dies while computing step 4 (last checkpoint: step 2)
        for i, batch in enumerate(steps(start)):
            if start + i == 3:
                raise Interrupt
            yield batch
    trainer.algorithm.steps = interrupted
    with pytest.raises(Interrupt):
        trainer.train()

    if mode == "precomputed":  # resume must read the cache, not recompute it
        def no_recompute(self, model):
            raise AssertionError("reference log-probs recomputed on resume")
        monkeypatch.setattr(DPO, "_score_pairs", no_recompute)
    Trainer(dpo_config(tiny_model_dir, prefs_file, str(tmp_path / "b"), **kw), resume=True).train()

    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "run" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "run" / "final" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    la = [r["train/loss"] for r in read_metrics(tmp_path / "a" / "run" / "metrics.jsonl") if "train/loss" in r]
    lb = [r["train/loss"] for r in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl") if "train/loss" in r]
    assert la == lb and len(la) == 4


# ------------------------------------------------------------------------------------------------
# DPO learns: held-out pairs of the shipped preference set
# ------------------------------------------------------------------------------------------------


def heldout_split(tmp_path, n_train=1536, n_eval=200):
    """First n_train pairs to train on; of the last n_eval, those never seen in training."""
    src = SHIPPED_PREFS if os.path.exists(SHIPPED_PREFS) else os.path.join(ROOT, "tests", "fixtures", "data",
                                                                           "prefs.jsonl")
    rows = [json.loads(line) for line in open(src) if line.strip()]
    if len(rows) < n_train + n_eval:
        n_eval = len(rows) // 3
        n_train = len(rows) - n_eval
    train, held = rows[:n_train], rows[-n_eval:]
    seen = {json.dumps(r, sort_keys=True) for r in train}
    held = [r for r in held if json.dumps(r, sort_keys=True) not in seen]
    paths = {}
    for name, part in (("train", train), ("heldout", held)):
        paths[name] = str(tmp_path / f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return src, paths, len(train), len(held)


@pytest.fixture(scope="session")
def testbed_model_dir(tmp_path_factory):
    """The tiny Llama with its tokenizer trained on the shipped assistant corpus (the testbed's own words)."""
    from rlhf.models.tiny import init_tiny

    corpus = [os.path.join(ROOT, "data", "assistant", "sft.jsonl")]
    corpus = [p for p in corpus if os.path.exists(p)] or [os.path.join(ROOT, "tests", "fixtures", "data", "sft.jsonl")]
    out = str(tmp_path_factory.mktemp("tiny-testbed") / "llama")
    return init_tiny(out, corpus, arch="llama", vocab_size=512, hidden_size=64, layers=2, heads=4, kv_heads=2,
                     intermediate_size=128)


def test_dpo_lifts_heldout_reward_accuracy(testbed_model_dir, tmp_path, capsys):
    src, paths, n_train, n_held = heldout_split(tmp_path)
    cfg = dpo_config(testbed_model_dir, paths["train"], str(tmp_path), data__eval=paths["heldout"],
                     optim__lr=3e-3, optim__batch_size=16, optim__micro_batch_size=16, optim__max_steps=96,
                     optim__warmup_ratio=0.1, dpo__beta=0.2)
    t0 = time.time()
    last = Trainer(cfg).train()
    seconds = time.time() - t0
    acc = last["eval/rewards/accuracies"]
    with capsys.disabled():
        print(f"\nDPO held-out rewards/accuracies {acc:.3f} on {n_held} unseen pairs of {os.path.relpath(src, ROOT)} "
              f"(trained on {n_train} pairs, 96 steps x 16 pairs, {seconds:.1f}s)")
    assert acc >= 0.7, acc  # chance is 0.5 (and the untrained policy scores 0: all rewards are 0)
    assert last["eval/rewards/margins"] > 0


# ------------------------------------------------------------------------------------------------
# The reference precompute: larger no-grad batches, sorted by length, give each pair its own log-probs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precompute_batch_size", [0, 1, 5])
def test_precomputed_table_at_any_batch_size_equals_pairs_alone(tiny_model_dir, prefs_file, tmp_path,
                                                                 precompute_batch_size):
    cfg = dpo_config(tiny_model_dir, prefs_file, str(tmp_path), dpo__precompute_batch_size=precompute_batch_size)
    trainer = Trainer(cfg)
    algo = trainer.algorithm
    model = algo.build_model().to(trainer.device)
    pairs = algo.train_pairs
    assert len({len(e.chosen_ids) + len(e.prompt_ids) for e in pairs}) > 1  # lengths differ: padding varies by batch
    table = algo._score_pairs(model)
    assert table.shape == (len(pairs), 2)
    model.eval()
    with torch.no_grad():
        alone = torch.stack([algo.forward(model, algo.collate([e]))[0].float() for e in pairs])
    # float32 sums of <= ~100 log-probs of size ~7 (vocabulary 1,024), each within a few ulps across paddings
    torch.testing.assert_close(table, alone, rtol=1e-5, atol=1e-4)


def test_precompute_batch_size_trl_name_and_bounds():
    from rlhf.config import config_from_dict

    with pytest.raises(ConfigError, match="'precompute_ref_batch_size'.*here it is 'dpo.precompute_batch_size'"):
        config_from_dict({"algorithm": "dpo", "precompute_ref_batch_size": 16})
    assert config_from_dict({"algorithm": "dpo", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "dpo": {"precompute_batch_size": 16}}).dpo.precompute_batch_size == 16
    with pytest.raises(ConfigError, match="precompute_batch_size=-1"):
        config_from_dict({"algorithm": "dpo", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "dpo": {"precompute_batch_size": -1}})
