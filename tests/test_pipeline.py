"""The demo pipeline end to end at toy scale: every stage, both testbeds, the report."""

import json
import os

import pytest
import yaml

from rlhf.config import ConfigError
from rlhf.pipeline import Pipeline, load_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def toy_config(tmp_path) -> str:
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "pipeline_demo.yaml")))
    cfg["output_dir"] = str(tmp_path / "demo")
    cfg["data_root"] = os.path.join(ROOT, "data")
    cfg["model"].update(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64, vocab_size=600)
    for name, stage in cfg["stages"].items():
        if name != "ppo":  # PPO's length is ppo.iterations (set below); it refuses optim.max_steps
            stage["optim"]["max_steps"] = 2
        stage.setdefault("logging", {})["progress"] = False
    cfg["stages"]["ppo"]["ppo"].update(iterations=1, rollout_batch_size=16, micro_batch_size=4,
                                        rollout_micro_batch_size=16, max_new_tokens=8)
    cfg["per_testbed"]["code"]["ppo"]["ppo"]["max_new_tokens"] = 8
    cfg["dpo_iter"].update(rounds=1, samples_per_prompt=4, max_new_tokens=8, prompts=32)
    cfg["stages"]["dpo_iter"]["optim"].update(batch_size=4, micro_batch_size=4)
    cfg["eval"].update(max_new_tokens=8, limit=8)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_pipeline_runs_every_stage_and_writes_the_report(tmp_path):
    cfg = load_pipeline(toy_config(tmp_path))
    report = Pipeline(cfg, log=lambda *a: None).run()
    text = open(report).read()
    for label in ("SFT", "DPO", "DPO-Iter", "PPO"):
        assert f"| {label} | 1 |" in text
    summary = json.load(open(os.path.join(os.path.dirname(report), "summary.json")))
    assert "assistant/gold/reward" in summary["header"] and "code/pass@1" in summary["header"]
    for testbed in ("assistant", "code"):
        for method in ("sft", "dpo", "ppo"):
            assert os.path.exists(tmp_path / "demo" / testbed / method / "eval" / testbed / "eval.json")
    pngs = [f for f in os.listdir(os.path.dirname(report)) if f.endswith(".png")]
    assert "reward_vs_kl_assistant.png" in pngs and "curves_ppo.png" in pngs


def test_unknown_method_is_a_config_error(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("methods: [sft, rlhf]\n")
    with pytest.raises(ConfigError, match="methods: 'rlhf': expected one of sft, dpo, dpo_iter, ppo"):
        load_pipeline(str(path))


def test_unknown_key_is_a_config_error(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("sedd: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'sedd'; did you mean 'seed'"):
        load_pipeline(str(path))


def test_seeds_run_the_pipeline_once_per_seed_and_report_mean_and_std(tmp_path, monkeypatch):
    """--seeds: one pipeline per seed in <output_dir>/seed<N> with that seed, then one report whose cells are the
    mean ± sample std over the seeds (computed here by hand). The stages are stubbed: each writes an eval.json
    whose gold reward is a function of the seed."""
    import json
    import os

    from rlhf import pipeline as pl

    seen = []

    def fake_run(self):
        seen.append((self.cfg.seed, self.cfg.output_dir))
        self.runs = []
        for label, offset in (("SFT", 0.0), ("PPO", 1.0)):
            run = os.path.join(self.cfg.output_dir, label.lower())
            os.makedirs(os.path.join(run, "eval", "assistant"), exist_ok=True)
            with open(os.path.join(run, "eval", "assistant", "eval.json"), "w") as f:
                json.dump({"testbed": "assistant", "metrics": {"gold/reward": offset + 0.5 * self.cfg.seed}}, f)
            self.runs.append((label, run))
        return os.path.join(self.cfg.output_dir, "report", "report.md")

    monkeypatch.setattr(pl.Pipeline, "run", fake_run)
    cfg = pl.load_pipeline("configs/pipeline_demo.yaml")
    cfg.output_dir = str(tmp_path / "headline")
    report = pl.run_seeds(cfg, [0, 1, 3], log=lambda *_: None)
    assert seen == [(s, str(tmp_path / "headline" / f"seed{s}")) for s in (0, 1, 3)]
    text = open(report).read()
    # gold rewards 0, 0.5, 1.5 (SFT) and 1, 1.5, 2.5 (PPO): mean 0.667 / 1.667, sample std 0.764 for both
    assert "| SFT | 3 | 0.667 ± 0.764 |" in text and "| PPO | 3 | 1.667 ± 0.764 |" in text
    with pytest.raises(SystemExit):
        pl.cli(["configs/pipeline_demo.yaml", "--seeds", "0,0"])
