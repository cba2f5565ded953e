# Run: .venv/bin/python -m pytest -q tests/test_samples.py
"""Rollout samples: PPO writes its first logging.log_samples rollouts of every iteration to samples.jsonl (and to a
wandb table through the tracker), resume drops the samples of undone iterations, and 0 turns it off."""

import json
import os

import pytest

from rlhf.tracking import SAMPLE_COLUMNS, log_samples_table, read_metrics
from tests.test_ppo import e_fraction_reward, ppo_config, run


def samples(run_dir):
    path = os.path.join(run_dir, "samples.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_ppo_writes_the_first_n_rollouts_of_every_iteration(tiny_model_dir, sft_file, tmp_path):
    # 16 rollouts an iteration, 2 steps an iteration. With log_samples 16 every rollout is written, so their means
    # must be the iteration's logged means.
    records = run(ppo_config(tiny_model_dir, sft_file, str(tmp_path / "all"), logging__log_samples=16))
    rows = samples(tmp_path / "all" / "run")
    assert len(rows) == 2 * 16
    its = {r["step"]: r for r in records if "objective/scores" in r}
    assert sorted(its) == [1, 3]
    for row in rows:
        assert set(row) == set(SAMPLE_COLUMNS)
        assert row["step"] == 1 + 2 * row["iteration"]
        # the score is the programmatic reward of exactly the written response text
        assert row["score"] == pytest.approx(e_fraction_reward([row["prompt"]], [row["response"]])[0], abs=1e-6)
        assert 1 <= row["length"] <= 8  # ppo.max_new_tokens
        assert row["prompt"] and isinstance(row["response"], str)
    for step, metrics in its.items():
        group = [r for r in rows if r["step"] == step]
        mean = lambda key: sum(r[key] for r in group) / len(group)  # noqa: E731
        assert mean("score") == pytest.approx(metrics["objective/scores"], abs=1e-5)
        assert mean("kl") == pytest.approx(metrics["objective/kl"], abs=1e-5)
        assert mean("length") == pytest.approx(metrics["response/length_mean"], abs=1e-5)
    assert all(r["kl"] == 0.0 for r in rows if r["iteration"] == 0)  # the reference is the policy at iteration 0
    assert any(r["kl"] != 0.0 for r in rows if r["iteration"] == 1)

    # log_samples 3: the first 3 rollouts of each iteration, the same ones (same seed)
    run(ppo_config(tiny_model_dir, sft_file, str(tmp_path / "three"), logging__log_samples=3))
    three = samples(tmp_path / "three" / "run")
    assert three == [r for r in rows if r["iteration"] == 0][:3] + [r for r in rows if r["iteration"] == 1][:3]

    # log_samples 0: off
    run(ppo_config(tiny_model_dir, sft_file, str(tmp_path / "off"), logging__log_samples=0, ppo__iterations=1))
    assert not os.path.exists(tmp_path / "off" / "run" / "samples.jsonl")


@pytest.mark.slow
def test_resume_drops_the_samples_of_undone_iterations(tiny_model_dir, sft_file, tmp_path):
    # 2 iterations with a checkpoint after each; resuming from the first redoes iteration 1, whose samples (step 3)
    # must be written once, not twice
    common = dict(logging__log_samples=4, logging__save_every=2, logging__keep_checkpoints=0)
    run(ppo_config(tiny_model_dir, sft_file, str(tmp_path), **common))
    folder = tmp_path / "run"
    before = samples(folder)
    assert [r["step"] for r in before] == [1] * 4 + [3] * 4
    run(ppo_config(tiny_model_dir, sft_file, str(tmp_path), **common),
        resume=str(folder / "checkpoints" / "step_000002"))
    after = samples(folder)
    assert [r["step"] for r in after] == [1] * 4 + [3] * 4
    assert after == before  # the redone iteration samples the same responses
    assert [r["step"] for r in read_metrics(folder / "metrics.jsonl")] == [1, 2, 3, 4]


class FakeTracker:
    def __init__(self):
        self.logged = []

    def log(self, values, step=None):
        self.logged.append((values, step))


def test_samples_table_goes_through_the_tracker():
    wandb = pytest.importorskip("wandb")
    tracker = FakeTracker()
    records = [{"step": 3, "iteration": 1, "prompt": "Say hi.", "response": "hi", "score": 0.5, "kl": 0.25,
                "length": 2},
               {"step": 3, "iteration": 1, "prompt": "Name a fruit.", "response": "pear", "score": 2.5, "kl": -0.1,
                "length": 3}]
    log_samples_table(tracker, records, step=3)
    ((values, step),) = tracker.logged
    assert step == 3 and list(values) == ["samples"]
    table = values["samples"]
    assert isinstance(table, wandb.Table)
    assert table.columns == list(SAMPLE_COLUMNS)
    assert table.data == [[3, 1, "Say hi.", "hi", 0.5, 0.25, 2], [3, 1, "Name a fruit.", "pear", 2.5, -0.1, 3]]
    log_samples_table(tracker, [], step=4)  # nothing to log: no empty table
    assert len(tracker.logged) == 1


@pytest.mark.slow
def test_dpo_iter_rounds_write_their_labelled_samples(tiny_model_dir, tmp_path):
    # 2 rounds of 6 prompts x 4 samples labelled by a (random) reward model; log_samples 8 = the first 2 prompts'
    # samples in full, so each prompt's best and worst can be checked against the pairs the round trained on
    import yaml

    from rlhf.models import load_scalar_model, load_tokenizer
    from rlhf.pipeline import Pipeline, load_pipeline

    rm_dir = str(tmp_path / "rm")
    rm = load_scalar_model(tiny_model_dir)
    rm.save_pretrained(rm_dir)
    load_tokenizer(tiny_model_dir).save_pretrained(rm_dir)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "demo"), "data_root": os.path.join(root, "data"), "testbeds": ["assistant"],
        "stages": {"dpo_iter": {"algorithm": "dpo", "data": {"max_length": 96, "max_prompt_length": 48},
                                "optim": {"lr": 1e-2, "batch_size": 2, "micro_batch_size": 2, "max_steps": 2},
                                "logging": {"progress": False, "log_samples": 8}}},
        "dpo_iter": {"rounds": 2, "samples_per_prompt": 4, "max_new_tokens": 8, "prompts": 6}}))
    pipeline = Pipeline(load_pipeline(str(path)), log=lambda *a: None)
    pipeline.dpo_iter("assistant", str(tmp_path / "demo"), tiny_model_dir, rm_dir)
    for r in (1, 2):
        rows = samples(tmp_path / "demo" / "dpo_iter" / f"round{r}")
        assert len(rows) == 8 and {row["iteration"] for row in rows} == {r}
        assert all(set(row) == set(SAMPLE_COLUMNS) - {"step"} for row in rows)
        assert all(1 <= row["length"] <= 8 for row in rows)
        with open(tmp_path / "demo" / "dpo_iter" / f"pairs_round{r}.jsonl") as f:
            pairs = {p["prompt"]: p for p in map(json.loads, f)}
        shown = list(dict.fromkeys(row["prompt"] for row in rows))
        assert len(shown) == 2 and any(prompt in pairs for prompt in shown)
        for prompt in shown:
            group = sorted((row["score"], row["response"]) for row in rows if row["prompt"] == prompt)
            assert len(group) == 4
            if prompt in pairs:  # the round's pair is this prompt's best and worst sample by the logged score
                assert (pairs[prompt]["chosen"], pairs[prompt]["rejected"]) == (group[-1][1], group[0][1])
        kls = [row["kl"] for row in rows]
        if r == 1:
            assert kls == [0.0] * 8  # round 1 samples from the SFT model itself
        else:
            assert any(k != 0.0 for k in kls)  # round 2 samples from round 1's DPO model


@pytest.mark.slow
def test_ppo_sends_the_samples_to_the_wandb_tracker(tiny_model_dir, sft_file, tmp_path, monkeypatch):
    # wandb among the trackers, with a stand-in for accelerate's wandb tracker (no wandb run is started)
    from accelerate import Accelerator

    from rlhf.trainer import Trainer

    tracker = FakeTracker()
    monkeypatch.setattr(Trainer, "_init_trackers", lambda self: None)
    monkeypatch.setattr(Accelerator, "get_tracker",
                        lambda self, name, unwrap=False: tracker if name == "wandb" else None)
    run(ppo_config(tiny_model_dir, sft_file, str(tmp_path), logging__log_samples=2, logging__trackers=["wandb"]))
    tables = [(values["samples"], step) for values, step in tracker.logged]
    assert [step for _, step in tables] == [1, 3]
    rows = samples(tmp_path / "run")
    for table, step in tables:
        written = [[r[c] for c in SAMPLE_COLUMNS] for r in rows if r["step"] == step]
        assert table.data == written and len(written) == 2
