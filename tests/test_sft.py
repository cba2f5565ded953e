"""SFT end to end through the Trainer: learning, resume, accumulation invariance, trackers, CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import sft_config
from tests.invariance import assert_adam_weights_close, reduction_rtol
from rlhf import Trainer
from rlhf.tracking import read_metrics


def final_weights(run_dir):
    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


def test_sft_loss_falls_and_run_folder_is_complete(tiny_model_dir, sft_file, tmp_path):
    cfg = sft_config(tiny_model_dir, sft_file, str(tmp_path), optim__max_steps=16, logging__save_every=8)
    Trainer(cfg).train()
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    for key in ("optim/lr", "optim/grad_norm", "time/step_s", "train/tokens"):
        assert key in records[-1]
    assert (run / "config.yaml").exists()
    assert sorted(os.listdir(run / "checkpoints")) == ["step_000008", "step_000016"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(run / "final")
    AutoTokenizer.from_pretrained(run / "final")


class Interrupt(Exception):
    pass


def test_interrupted_then_resumed_run_equals_uninterrupted(tiny_model_dir, sft_file, tmp_path):
    kw = dict(optim__max_steps=8, logging__save_every=3, optim__warmup_ratio=0.25)
    Trainer(sft_config(tiny_model_dir, sft_file, str(tmp_path / "a"), **kw)).train()

    cfg = sft_config(tiny_model_dir, sft_file, str(tmp_path / "b"), **kw)
    trainer = Trainer(cfg)
    steps = trainer.algorithm.steps

    def interrupted(start):  # the process dies while computing step 5 (last checkpoint: step 3)
        for i, batch in enumerate(steps(start)):
            if start + i == 4:
                raise Interrupt
            yield batch
    trainer.algorithm.steps = interrupted
    with pytest.raises(Interrupt):
        trainer.train()
    assert os.listdir(tmp_path / "b" / "run" / "checkpoints") == ["step_000003"]
    Trainer(sft_config(tiny_model_dir, sft_file, str(tmp_path / "b"), **kw), resume=True).train()

    a, b = final_weights(tmp_path / "a" / "run"), final_weights(tmp_path / "b" / "run")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    la = [r["train/loss"] for r in read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")]
    lb = [r["train/loss"] for r in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")]
    assert la == lb  # one clean record per step, the same numbers


def test_grad_accumulation_invariance(tiny_model_dir, sft_file, tmp_path):
    """micro-batch 2 x accumulation 4 trains the same model as micro-batch 8 x 1: the same loss and gradient norm at
    step 1 (equal weights, sums in another order), and weights within what AdamW allows (tests/invariance.py)."""
    runs, first = {}, {}
    for micro in (2, 8):
        out = tmp_path / f"m{micro}"
        cfg = sft_config(tiny_model_dir, sft_file, str(out), optim__micro_batch_size=micro, optim__max_steps=3)
        Trainer(cfg).train()
        runs[micro] = final_weights(out / "run")
        first[micro] = read_metrics(out / "run" / "metrics.jsonl")[0]
    model = json.load(open(os.path.join(tiny_model_dir, "config.json")))
    # the step's 8 rows of 64 tokens, the vocabulary's softmax, per layer a hidden and an intermediate dot product
    rtol = reduction_rtol(8 * cfg.data.max_length, model["vocab_size"],
                          model["num_hidden_layers"] * (model["hidden_size"] + model["intermediate_size"]))
    for key in ("train/loss", "optim/grad_norm"):
        assert first[2][key] == pytest.approx(first[8][key], rel=rtol), (key, rtol)
    assert cfg.optim.weight_decay == 0  # the gap below assumes it; the peak lr bounds every step's lr
    assert_adam_weights_close(runs[2], runs[8], cfg.optim.lr, cfg.optim.max_steps)


def test_trackers_tensorboard_and_offline_wandb(tiny_model_dir, sft_file, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = sft_config(tiny_model_dir, sft_file, str(tmp_path), optim__max_steps=2,
                     logging__trackers=["tensorboard", "wandb"])
    Trainer(cfg).train()
    assert os.environ["WANDB_MODE"] == "offline"
    run = tmp_path / "run"
    events = [f for _, _, fs in os.walk(run) for f in fs if f.startswith("events.out.tfevents")]
    assert events, "no TensorBoard event file"
    assert any(d.startswith("offline-run") for d in os.listdir(run / "wandb"))
    assert (run / "metrics.jsonl").exists()


@pytest.mark.slow
def test_cli_train_tiny_config(tiny_model_dir, sft_file, tmp_path):
    """`rlhf train CONFIG` as a user runs it, in a subprocess."""
    path = tmp_path / "sft.yaml"
    path.write_text(f"""algorithm: sft
model:
  name_or_path: {tiny_model_dir}
data:
  train: {sft_file}
  max_length: 64
  max_prompt_length: 32
optim:
  lr: 3.0e-3
  batch_size: 8
  micro_batch_size: 8
  max_steps: 4
logging:
  output_dir: {tmp_path}/runs
  run_name: cli
""")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "rlhf", "train", str(path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(read_metrics(tmp_path / "runs" / "cli" / "metrics.jsonl")) == 4


def test_eval_harness_runs_as_a_training_callback(tiny_model_dir, sft_file, tmp_path):
    cfg = sft_config(tiny_model_dir, sft_file, str(tmp_path), optim__max_steps=2, logging__eval_every=1,
                     logging__eval_testbed="assistant", logging__eval_limit=4, logging__eval_max_new_tokens=4)
    Trainer(cfg).train()
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/assistant/gold/reward" in r]
    assert [r["step"] for r in evals] == [1, 2]  # every eval_every steps, and at the end
    for r in evals:
        assert -2.0 <= r["eval/assistant/gold/reward"] <= 2.0 and r["eval/assistant/length/tokens"] <= 4
