"""Settings that come from the ecosystem around a run: accelerate's mixed precision, wandb's environment variables,
TensorBoard's folder, and PPO refusing the optim keys it does not use."""

import os
import subprocess
import sys

import pytest
import yaml

from rlhf.cli import main
from rlhf.config import ConfigError, LoggingConfig
from rlhf.distributed import resolve_mixed_precision
from rlhf.tracking import wandb_settings
from rlhf.trainer import Trainer
from tests.conftest import sft_config
from tests.test_ppo import ppo_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("ours,env,expected", [
    (None, None, "no"),
    (None, "bf16", "bf16"),  # accelerate's config applies when the rlhf config sets none
    (None, "FP16", "fp16"),
    ("bf16", None, "bf16"),
    ("bf16", "no", "bf16"),  # accelerate launch exports 'no' when its config sets nothing
    ("fp16", "fp16", "fp16"),
])
def test_mixed_precision_resolution(ours, env, expected):
    assert resolve_mixed_precision(ours, {} if env is None else {"ACCELERATE_MIXED_PRECISION": env}) == expected


@pytest.mark.parametrize("ours,env", [("bf16", "fp16"), ("no", "bf16")])
def test_mixed_precision_conflict_names_both(ours, env):
    with pytest.raises(ConfigError, match=rf"mixed_precision='{ours}' in the rlhf config but '{env}' in the "
                                          rf"accelerate config \(ACCELERATE_MIXED_PRECISION\)"):
        resolve_mixed_precision(ours, {"ACCELERATE_MIXED_PRECISION": env})


def test_cli_mixed_precision_conflict_is_one_line(tmp_path, capsys, monkeypatch, tiny_model_dir, sft_file):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    path = tmp_path / "c.yaml"
    path.write_text(f"algorithm: sft\nmixed_precision: bf16\nmodel:\n  name_or_path: {tiny_model_dir}\ndata:\n"
                    f"  train: {sft_file}\nlogging:\n  output_dir: {tmp_path}/runs\n  progress: false\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'bf16' in the rlhf config but 'fp16' in the accelerate config" in err, err


@pytest.mark.slow
def test_accelerate_mixed_precision_applies_to_a_run(tmp_path, tiny_model_dir, sft_file):
    """Under `accelerate launch --mixed_precision bf16` (its environment variable here), a config without
    mixed_precision trains in bf16 and its run folder's config.yaml says so."""
    path = tmp_path / "c.yaml"
    path.write_text(f"algorithm: sft\nmodel:\n  name_or_path: {tiny_model_dir}\ndata:\n  train: {sft_file}\n"
                    f"  max_length: 64\n  max_prompt_length: 32\noptim:\n  batch_size: 4\n  micro_batch_size: 4\n"
                    f"  max_steps: 1\nlogging:\n  output_dir: {tmp_path}\n  run_name: run\n  progress: false\n")
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-m", "rlhf", "train", str(path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = yaml.safe_load(open(tmp_path / "run" / "config.yaml"))
    assert saved["mixed_precision"] == "bf16"


def test_wandb_environment_fills_what_the_config_leaves_empty():
    env = {"WANDB_PROJECT": "team-proj", "WANDB_ENTITY": "team", "WANDB_RUN_GROUP": "sweep-3",
           "WANDB_TAGS": "dpo, tiny,,lr-high"}
    assert wandb_settings(LoggingConfig(), env) == {"project": "team-proj", "entity": "team", "group": "sweep-3",
                                                    "tags": ["dpo", "tiny", "lr-high"]}
    # the config's own values come first
    ours = LoggingConfig(project="mine", group="g", tags=["a"])
    assert wandb_settings(ours, env) == {"project": "mine", "entity": "team", "group": "g", "tags": ["a"]}
    assert wandb_settings(LoggingConfig(), {}) == {"project": "rlhf", "entity": None, "group": None, "tags": None}


def test_tensorboard_logs_go_to_the_run_tensorboard_folder(tiny_model_dir, sft_file, tmp_path):
    cfg = sft_config(tiny_model_dir, sft_file, str(tmp_path), optim__max_steps=2, logging__trackers=["tensorboard"])
    Trainer(cfg).train()
    run = tmp_path / "run"
    found = [os.path.relpath(root, run) for root, _, files in os.walk(run)
             if any(f.startswith("events.out.tfevents") for f in files)]
    # the scalars in tensorboard/ itself; the config's hparams in a sub-folder that TensorBoard's add_hparams makes
    assert "tensorboard" in found and all(f.split(os.sep)[0] == "tensorboard" for f in found), found


@pytest.mark.parametrize("key,value,pointer", [
    ("max_steps", 10, "ppo.iterations"),
    ("epochs", 3, "ppo.ppo_epochs"),
    ("batch_size", 64, "ppo.rollout_batch_size"),
    ("micro_batch_size", 2, "ppo.micro_batch_size"),
])
def test_ppo_refuses_optim_keys_it_does_not_use(tmp_path, key, value, pointer):
    with pytest.raises(ConfigError, match=rf"optim.{key}={value}: PPO does not use it; set .*{pointer}"):
        ppo_config(str(tmp_path), "p.jsonl", str(tmp_path), **{f"optim__{key}": value})
    ppo_config(str(tmp_path), "p.jsonl", str(tmp_path))  # and without them the same config loads
