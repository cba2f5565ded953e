"""Faults a run must survive or refuse cleanly: non-finite values, reused run folders, damaged checkpoints, stop
signals, a full disk; and optim/lr logged as the rate of the step it is logged with."""

from __future__ import annotations

import errno
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from rlhf import checkpoints as ckpt
from rlhf.cli import main as cli_main
from rlhf.config import ConfigError, to_dict
from rlhf.tracking import read_metrics
from rlhf.trainer import CheckpointError, DiskFullError, NonFiniteError, Trainer
from tests.conftest import FIXTURES, PAIR_OPTIM, sft_config, train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pair_config(algorithm, model_dir, prefs_file, out, **over):
    return train_config(algorithm, model_dir, prefs_file, out, PAIR_OPTIM, **over)


def run_dir(cfg) -> str:
    return os.path.join(cfg.logging.output_dir, cfg.logging.run_name)


def all_finite(folder: str) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(os.path.join(folder, "model.safetensors")).values())


def write_yaml(cfg, path) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f)
    return str(path)


@pytest.fixture(scope="module")
def nan_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model with one NaN in its final norm: every forward from it gives a NaN loss."""
    out = tmp_path_factory.mktemp("nan") / "llama"
    shutil.copytree(tiny_model_dir, out)
    weights = load_file(out / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return str(out)


# --------------------------------------------------------------------------------------------------------------------
# Non-finite values: skipped steps, a stop after K of them in a row, nothing non-finite written
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sft", "reward"])
def test_nan_in_the_initial_weights_stops_after_k_skipped_steps(algorithm, nan_model_dir, sft_file, prefs_file,
                                                                tmp_path, capsys):
    kw = dict(optim__max_steps=6, optim__max_skipped_steps=2)
    cfg = (sft_config(nan_model_dir, sft_file, str(tmp_path), **kw) if algorithm == "sft"
           else pair_config("reward", nan_model_dir, prefs_file, str(tmp_path), **kw))
    with pytest.raises(NonFiniteError, match=r"stopped at step 2: 2 optimizer steps in a row had a non-finite loss"):
        Trainer(cfg).train()
    run = run_dir(cfg)
    assert not os.path.exists(os.path.join(run, "final"))
    assert ckpt.list_checkpoints(os.path.join(run, "checkpoints")) == []
    assert [r["train/skipped_steps"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))] == [1, 2]
    assert "step 1: non-finite loss" in capsys.readouterr().out  # each skip says so


def test_nan_weight_checkpoint_is_refused_and_the_skip_is_counted(nan_model_dir, sft_file, tmp_path):
    cfg = sft_config(nan_model_dir, sft_file, str(tmp_path), optim__max_steps=4, logging__save_every=1)
    with pytest.raises(NonFiniteError, match=r"refusing to write checkpoint .*step_000001 at step 1: parameters "
                                             r"hold NaN or infinite values \(model.norm.weight\); last finite "
                                             r"checkpoint: none"):
        Trainer(cfg).train()
    records = read_metrics(os.path.join(run_dir(cfg), "metrics.jsonl"))
    assert records[0]["train/skipped_steps"] == 1 and records[0]["train/loss"] == "nan"


def test_a_huge_learning_rate_stops_with_exit_1_and_writes_nothing_non_finite(tiny_model_dir, sft_file, tmp_path,
                                                                             capsys):
    # AdamW with lr 1e3 and weight decay 0.05 multiplies the weights by (1 - 1e3 * 0.05) = -49 every step: they
    # overflow within a few steps, and the gradient norm turns NaN first
    cfg = sft_config(tiny_model_dir, sft_file, str(tmp_path), optim__lr=1e3, optim__weight_decay=0.05,
                     optim__max_steps=30, logging__save_every=2)
    assert cli_main(["train", write_yaml(cfg, tmp_path / "sft.yaml")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and err[0].startswith("error: stopped at step ") and "non-finite grad norm" in err[0]
    run = run_dir(cfg)
    assert not os.path.exists(os.path.join(run, "final"))
    found = ckpt.list_checkpoints(os.path.join(run, "checkpoints"))
    assert found and all(all_finite(folder) for folder, _ in found)
    assert read_metrics(os.path.join(run, "metrics.jsonl"))[-1]["train/skipped_steps"] == 3  # the default K


def test_dpo_with_a_huge_learning_rate_never_writes_non_finite_weights(tiny_model_dir, prefs_file, tmp_path):
    cfg = pair_config("dpo", tiny_model_dir, prefs_file, str(tmp_path), optim__lr=1e3, optim__weight_decay=0.05,
                      optim__max_steps=30, logging__save_every=2, dpo__reference="precomputed")
    with pytest.raises(NonFiniteError, match="optimizer steps in a row had a non-finite"):
        Trainer(cfg).train()
    found = ckpt.list_checkpoints(os.path.join(run_dir(cfg), "checkpoints"))
    assert found and all(all_finite(folder) for folder, _ in found)
    assert not os.path.exists(os.path.join(run_dir(cfg), "final"))


def test_weights_turning_nan_are_never_written_and_the_last_good_checkpoint_stays(tiny_model_dir, sft_file, tmp_path,
                                                                                  monkeypatch):
    cfg = sft_config(tiny_model_dir, sft_file, str(tmp_path), optim__max_steps=4, logging__save_every=2,
                     logging__keep_checkpoints=1)
    trainer = Trainer(cfg)

    def poison(model, step):  # a finite step whose update still leaves a NaN in the weights (e.g. under DeepSpeed)
        if step == 4:
            with torch.no_grad():
                trainer.accelerator.unwrap_model(model).model.norm.weight[0] = float("nan")
        return {}
    monkeypatch.setattr(trainer.algorithm, "after_step", poison)
    with pytest.raises(NonFiniteError, match=r"refusing to write checkpoint .*step_000004 .*last finite checkpoint: "
                                             r".*step_000002"):
        trainer.train()
    checkpoints = os.path.join(run_dir(cfg), "checkpoints")
    assert [os.path.basename(f) for f, _ in ckpt.list_checkpoints(checkpoints)] == ["step_000002"]
    assert ckpt.verify(os.path.join(checkpoints, "step_000002")) is None
    assert sorted(os.listdir(checkpoints)) == ["step_000002"]  # no .tmp left behind
    assert not os.path.exists(os.path.join(run_dir(cfg), "final"))


def test_ppo_skips_steps_with_non_finite_reward_model_scores_and_stops(tiny_model_dir, nan_model_dir, sft_file,
                                                                       tmp_path):
    from tests.test_ppo import ppo_config

    # a reward model gone wrong (a NaN in its weights) scores every response NaN
    cfg = ppo_config(tiny_model_dir, sft_file, str(tmp_path), ppo__reward_model=nan_model_dir, ppo__reward_fns=[],
                     ppo__iterations=2, optim__max_skipped_steps=2)
    with pytest.raises(NonFiniteError, match=r"stopped at step 2: 2 optimizer steps in a row had a non-finite .*"
                                             r"objective/scores"):
        Trainer(cfg).train()
    assert not os.path.exists(os.path.join(run_dir(cfg), "final"))


def test_reward_calibration_refuses_non_finite_statistics(tiny_model_dir, prefs_file, tmp_path):
    trainer = Trainer(pair_config("reward", tiny_model_dir, prefs_file, str(tmp_path)))
    algo = trainer.algorithm
    model = algo.build_model()
    algo._export_scores = torch.tensor([0.5, float("nan"), 1.5], dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"reward normalization: 1 of 3 train response scores are not finite "
                                             r"\(mean nan, std nan\); refusing to fold"):
        algo.save_model(model, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


# --------------------------------------------------------------------------------------------------------------------
# optim/lr: the rate the logged step used
# --------------------------------------------------------------------------------------------------------------------


def test_logged_lr_is_the_rate_the_step_used(tiny_model_dir, sft_file, tmp_path):
    cfg = sft_config(tiny_model_dir, sft_file, str(tmp_path), optim__max_steps=6, optim__warmup_ratio=0.34,
                     optim__scheduler="cosine")
    Trainer(cfg).train()
    # warm-up int(0.34 * 6) = 2 steps; step k (from 1) uses the schedule at index s = k - 1:
    #   s < 2: lr * s / 2 -> 0, 0.5 lr
    #   s >= 2: lr * 0.5 * (1 + cos(pi * (s - 2) / 4)) -> lr, 0.8536 lr, 0.5 lr, 0.1464 lr
    lr = 3e-3
    expected = [0.0, 0.5 * lr] + [lr * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(2, 6)]
    logged = [r["optim/lr"] for r in read_metrics(os.path.join(run_dir(cfg), "metrics.jsonl")) if "optim/lr" in r]
    assert logged == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# Run folders
# --------------------------------------------------------------------------------------------------------------------


def test_a_new_run_into_a_used_run_folder_is_refused_with_exit_2(tiny_model_dir, sft_file, tmp_path, capsys):
    cfg = sft_config(tiny_model_dir, sft_file, str(tmp_path), optim__max_steps=2)
    Trainer(cfg).train()
    with pytest.raises(ConfigError, match=r"run folder .*run already holds a run .*--resume .*--overwrite"):
        Trainer(cfg)
    path = write_yaml(cfg, tmp_path / "sft.yaml")
    capsys.readouterr()
    assert cli_main(["train", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: config: run folder {run_dir(cfg)} already holds a run")


def test_overwrite_replaces_the_run_and_its_shorter_checkpoints_are_kept(tiny_model_dir, sft_file, tmp_path):
    long = sft_config(tiny_model_dir, sft_file, str(tmp_path), optim__max_steps=6, logging__save_every=2)
    Trainer(long).train()
    short = sft_config(tiny_model_dir, sft_file, str(tmp_path), optim__max_steps=4, logging__save_every=2)
    Trainer(short, overwrite=True).train()
    checkpoints = os.path.join(run_dir(short), "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["step_000002", "step_000004"]
    assert [r["step"] for r in read_metrics(os.path.join(run_dir(short), "metrics.jsonl"))] == [1, 2, 3, 4]


def test_default_run_names_are_unique(tiny_model_dir, sft_file, tmp_path):
    # two runs of one config started in the same second (here: in the same process) get folders of their own
    folders = {Trainer(sft_config(tiny_model_dir, sft_file, str(tmp_path), logging__run_name="")).run_dir
               for _ in range(2)}
    assert len(folders) == 2 and all(os.path.basename(f).startswith("sft-") for f in folders)


def test_resume_with_other_settings_names_every_key_that_differs(tiny_model_dir, sft_file, tmp_path):
    cfg = sft_config(tiny_model_dir, sft_file, str(tmp_path), optim__max_steps=2)
    Trainer(cfg).train()
    other = sft_config(tiny_model_dir, sft_file, str(tmp_path), optim__max_steps=2, optim__lr=1e-4,
                       logging__log_every=2)
    other.seed = 1
    with pytest.raises(ConfigError) as e:
        Trainer(other, resume=True)
    message = str(e.value)
    assert "optim.lr: 0.003 in the checkpoint, 0.0001 now" in message and "seed: 0 in the checkpoint, 1 now" in message
    assert "logging.log_every" not in message  # where and how often a run logs may change
    # a longer run continues the same one
    Trainer(sft_config(tiny_model_dir, sft_file, str(tmp_path), optim__max_steps=3), resume=True).train()
    assert [r["step"] for r in read_metrics(os.path.join(run_dir(cfg), "metrics.jsonl"))] == [1, 2, 3]


# --------------------------------------------------------------------------------------------------------------------
# Damaged checkpoints: resume falls back to the previous good one, naming what is wrong in one line
# --------------------------------------------------------------------------------------------------------------------

DAMAGE_KW = dict(optim__max_steps=4, logging__save_every=2)


@pytest.fixture(scope="module")
def two_checkpoints(tiny_model_dir, tmp_path_factory) -> str:
    """A finished run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("damage")
    Trainer(sft_config(tiny_model_dir, os.path.join(FIXTURES, "sft.jsonl"), str(out), **DAMAGE_KW)).train()
    return str(out)


def truncate(path, keep: float = 0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


DAMAGES = {  # state/ is what resume reads; the folder's top is the model (rlhf/checkpointing.py)
    "truncated model.safetensors": lambda c: truncate(os.path.join(c, "state", "model.safetensors")),
    "truncated optimizer.bin": lambda c: truncate(os.path.join(c, "state", "optimizer.bin")),
    "truncated scheduler state": lambda c: truncate(os.path.join(c, "state", "custom_checkpoint_0.pkl")),
    "missing trainer_state.pt": lambda c: os.remove(os.path.join(c, "trainer_state.pt")),
    "empty trainer_state.pt": lambda c: truncate(os.path.join(c, "trainer_state.pt"), 0),
    "flipped byte in model.safetensors": lambda c: flip_byte(os.path.join(c, "model.safetensors")),
    "missing manifest": lambda c: os.remove(os.path.join(c, ckpt.MANIFEST)),
}
EXPECTED_NOTICE = {
    "truncated model.safetensors": "model.safetensors has",
    "truncated optimizer.bin": "optimizer.bin has",
    "truncated scheduler state": "custom_checkpoint_0.pkl has",
    "missing trainer_state.pt": "trainer_state.pt is missing",
    "empty trainer_state.pt": "trainer_state.pt has 0 bytes",
    "flipped byte in model.safetensors": "model.safetensors has a different sha256",
    "missing manifest": "no manifest.json naming it",
}


def flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 10)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(damage, two_checkpoints, tiny_model_dir, sft_file,
                                                                  tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(two_checkpoints, out)
    DAMAGES[damage](str(out / "run" / "checkpoints" / "step_000004"))
    trainer = Trainer(sft_config(tiny_model_dir, sft_file, str(out), **DAMAGE_KW), resume=True)
    assert os.path.basename(trainer.resume_from) == "step_000002"
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resume:")]
    assert len(lines) == 1 and "step_000004" in lines[0] and EXPECTED_NOTICE[damage] in lines[0]


def test_resume_from_the_fallback_finishes_the_run(two_checkpoints, tiny_model_dir, sft_file, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(two_checkpoints, out)
    truncate(out / "run" / "checkpoints" / "step_000004" / "state" / "optimizer.bin")
    Trainer(sft_config(tiny_model_dir, sft_file, str(out), **DAMAGE_KW), resume=True).train()
    a = load_file(os.path.join(two_checkpoints, "run", "final", "model.safetensors"))
    b = load_file(out / "run" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # steps 3-4 redone from step 2: the same weights
    assert ckpt.verify(str(out / "run" / "checkpoints" / "step_000004")) is None  # rewritten whole


def test_a_stray_copy_of_a_checkpoint_is_not_taken_for_one(two_checkpoints, tiny_model_dir, sft_file, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(two_checkpoints, out)
    checkpoints = out / "run" / "checkpoints"
    shutil.copytree(checkpoints / "step_000002", checkpoints / "step_000020.bak")  # sorts after step_000004
    trainer = Trainer(sft_config(tiny_model_dir, sft_file, str(out), **DAMAGE_KW), resume=True)
    assert os.path.basename(trainer.resume_from) == "step_000004"


def test_every_checkpoint_damaged_is_one_line_and_exit_2(two_checkpoints, tiny_model_dir, sft_file, tmp_path,
                                                         capsys):
    out = tmp_path / "copy"
    shutil.copytree(two_checkpoints, out)
    for step in ("step_000002", "step_000004"):
        truncate(out / "run" / "checkpoints" / step / "state" / "model.safetensors")
    cfg = sft_config(tiny_model_dir, sft_file, str(out), **DAMAGE_KW)
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged"):
        Trainer(cfg, resume=True)
    capsys.readouterr()
    assert cli_main(["train", write_yaml(cfg, tmp_path / "sft.yaml"), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint: --resume: every checkpoint in")


def test_a_partial_last_metrics_line_is_dropped_on_resume(two_checkpoints, tiny_model_dir, sft_file, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(two_checkpoints, out)
    metrics = out / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "train/lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3, 4]
    Trainer(sft_config(tiny_model_dir, sft_file, str(out), optim__max_steps=5, logging__save_every=2),
            resume=True).train()
    assert "dropping a partial last line" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3, 4, 5]


def test_a_damaged_reference_cache_is_recomputed(tiny_model_dir, prefs_file, tmp_path, capsys):
    kw = dict(optim__max_steps=2, logging__save_every=1, dpo__reference="precomputed")
    cfg = pair_config("dpo", tiny_model_dir, prefs_file, str(tmp_path), **kw)
    Trainer(cfg).train()
    cache = os.path.join(run_dir(cfg), "ref_logps.pt")
    intact = torch.load(cache, weights_only=True)["logps"]
    truncate(cache)
    Trainer(pair_config("dpo", tiny_model_dir, prefs_file, str(tmp_path), **{**kw, "optim__max_steps": 3}),
            resume=True).train()
    out = capsys.readouterr().out
    assert "ref_logps.pt is damaged" in out and "recomputed" in out
    assert torch.equal(torch.load(cache, weights_only=True)["logps"], intact)


# --------------------------------------------------------------------------------------------------------------------
# Stop signals
# --------------------------------------------------------------------------------------------------------------------


def test_sigterm_checkpoints_the_step_exits_143_and_resumes_bit_identically(tiny_model_dir, sft_file, tmp_path):
    kw = dict(optim__max_steps=12, optim__warmup_ratio=0.1, logging__save_every=0)
    cfg = sft_config(tiny_model_dir, sft_file, str(tmp_path / "b"), **kw)
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf", "train", write_yaml(cfg, tmp_path / "b.yaml")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(run_dir(cfg), "metrics.jsonl")
    deadline = time.time() + 240
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        assert proc.poll() is None and time.time() < deadline, "the run ended before logging a step"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    found = ckpt.list_checkpoints(os.path.join(run_dir(cfg), "checkpoints"))
    assert len(found) == 1
    step = found[0][1]["step"]
    assert 1 <= step < 12 and f"stopped by SIGTERM at step {step}" in err
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, step + 1))

    Trainer(cfg, resume=True).train()
    Trainer(sft_config(tiny_model_dir, sft_file, str(tmp_path / "a"), **kw)).train()
    a = load_file(tmp_path / "a" / "run" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "run" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [r["train/loss"] for r in read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")]
    assert la == [r["train/loss"] for r in read_metrics(metrics)]


def test_sigint_checkpoints_the_step_and_exits_130_without_a_traceback(tiny_model_dir, sft_file, tmp_path,
                                                                       monkeypatch, capsys):
    from rlhf.algorithms.sft import SFT

    handler = signal.getsignal(signal.SIGINT)

    def interrupt_at_2(self, model, step):  # Ctrl-C arrives while step 2 runs
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return {}
    monkeypatch.setattr(SFT, "after_step", interrupt_at_2)
    cfg = sft_config(tiny_model_dir, sft_file, str(tmp_path), optim__max_steps=6)
    assert cli_main(["train", write_yaml(cfg, tmp_path / "sft.yaml")]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "stopped by SIGINT at step 2" in err
    assert [os.path.basename(f) for f, _ in ckpt.list_checkpoints(os.path.join(run_dir(cfg), "checkpoints"))] == \
        ["step_000002"]
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is given back


def test_a_stop_signal_mid_iteration_stops_ppo_at_the_iteration_boundary(tiny_model_dir, sft_file, tmp_path,
                                                                           monkeypatch):
    from rlhf.trainer import Interrupted
    from tests.test_ppo import ppo_config

    trainer = Trainer(ppo_config(tiny_model_dir, sft_file, str(tmp_path), ppo__iterations=3))
    per_iteration = trainer.algorithm.steps_per_iteration
    assert per_iteration > 1  # else there is no step inside an iteration to stop at
    after_step = trainer.algorithm.after_step

    def terminate_at_1(model, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return after_step(model, step)
    monkeypatch.setattr(trainer.algorithm, "after_step", terminate_at_1)
    with pytest.raises(Interrupted) as e:
        trainer.train()
    assert e.value.step == per_iteration and e.value.exit_code == 143
    found = ckpt.list_checkpoints(os.path.join(run_dir(trainer.cfg), "checkpoints"))
    assert [m["step"] for _, m in found] == [per_iteration]


def test_a_second_signal_exits_at_once(monkeypatch, capsys):
    from rlhf.trainer import StopSignals

    def exit_now(code):  # os._exit would end pytest itself
        raise SystemExit(code)
    monkeypatch.setattr(os, "_exit", exit_now)
    said = []
    signals = StopSignals(said.append)
    signals._handle(signal.SIGTERM, None)  # the first only asks the loop to stop after the step
    assert signals.signum == signal.SIGTERM and "finishing this step" in said[0]
    with pytest.raises(SystemExit) as e:
        signals._handle(signal.SIGTERM, None)
    assert e.value.code == 143 and "SIGTERM again: exiting now" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------------------------------


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_a_checkpoint_is_one_error_and_the_previous_checkpoint_stays(tiny_model_dir, sft_file,
                                                                                     tmp_path, monkeypatch):
    cfg = sft_config(tiny_model_dir, sft_file, str(tmp_path), optim__max_steps=4, logging__save_every=2)
    trainer = Trainer(cfg)
    real_save = torch.save

    def full_after_step_2(obj, f, *a, **k):
        if trainer.step >= 4:
            no_space()
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_after_step_2)
    with pytest.raises(DiskFullError, match=r"^no space left on device: .*step_000004 \(about \d+ bytes needed\)$"):
        trainer.train()
    checkpoints = os.path.join(run_dir(cfg), "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["step_000002"]  # no partial .tmp folder
    assert ckpt.verify(os.path.join(checkpoints, "step_000002")) is None


def test_disk_full_during_export_keeps_the_earlier_final(tiny_model_dir, sft_file, tmp_path, monkeypatch):
    cfg = sft_config(tiny_model_dir, sft_file, str(tmp_path), optim__max_steps=2)
    trainer = Trainer(cfg)
    trainer.train()
    final = os.path.join(run_dir(cfg), "final")
    before = load_file(os.path.join(final, "model.safetensors"))
    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", no_space)
    with pytest.raises(DiskFullError, match=r"^no space left on device: .*final \(about \d+ bytes needed\)$"):
        trainer.save_final()
    assert not os.path.exists(final + ".tmp")
    after = load_file(os.path.join(final, "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("error, full", [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"), True),
    (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), True),
    (OSError(errno.EACCES, "Permission denied"), False),
    (RuntimeError("size mismatch"), False),
])
def test_disk_full_errors_are_recognized(error, full):
    assert ckpt.is_disk_full(error) is full
