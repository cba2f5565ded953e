"""Several processes on CPU (gloo): DDP invariance and DeepSpeed ZeRO-2/3, each launched as a user would.

    torchrun --nproc_per_node 2 -m rlhf train CONFIG
    accelerate launch --config_file configs/accelerate/zero3.yaml -m rlhf train CONFIG
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf.tracking import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: dict, tmp_path, name: str, nproc: int = 1, accelerate_config: str | None = None,
           extra: list[str] = ()) -> str:
    """Write the config, run it (1 process plain, 2 with torchrun or accelerate), return the run folder."""
    config = {**config, "logging": {**config.get("logging", {}), "output_dir": str(tmp_path), "run_name": name,
                                    "progress": False}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    train = ["-m", "rlhf", "train", str(path), *extra]
    if accelerate_config:
        cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file", os.path.join(ROOT, accelerate_config),
               "--num_processes", str(nproc), "--main_process_port", str(free_port()), *train]
    elif nproc > 1:
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *train]
    else:
        cmd = [sys.executable, *train]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return str(tmp_path / name)


def sft(model_dir, data, micro, steps=4, **optim):
    return {"algorithm": "sft", "seed": 0, "model": {"name_or_path": model_dir},
            "data": {"train": data, "max_length": 64, "max_prompt_length": 32},
            "optim": {"lr": 3e-3, "batch_size": 8, "micro_batch_size": micro, "max_steps": steps,
                      "scheduler": "constant", **optim}}


def losses(run: str) -> list[float]:
    return [r["train/loss"] for r in read_metrics(os.path.join(run, "metrics.jsonl")) if "train/loss" in r]


def weights(run: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(run, "final", "model.safetensors"))


def assert_same_weights(a: str, b: str, atol=5e-5):
    # Adam divides by sqrt(v): float noise in near-zero gradients moves weights by ~1e-5 at lr 3e-3
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4, msg=k)


def test_ddp_two_ranks_equal_one_rank_with_double_micro_batch(tiny_model_dir, sft_file, tmp_path):
    one = launch(sft(tiny_model_dir, sft_file, micro=4), tmp_path, "one", nproc=1)
    two = launch(sft(tiny_model_dir, sft_file, micro=2), tmp_path, "two", nproc=2)
    torch.testing.assert_close(losses(one), losses(two), atol=1e-5, rtol=1e-5)
    assert_same_weights(one, two)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_sft_learns_saves_and_resumes(stage, tiny_model_dir, sft_file, tmp_path):
    acc = f"configs/accelerate/{stage}.yaml"
    cfg = sft(tiny_model_dir, sft_file, micro=2, steps=6)
    straight = launch(cfg, tmp_path, "straight", nproc=2, accelerate_config=acc)
    ls = losses(straight)
    assert ls[-1] < 0.9 * ls[0], ls
    # same global batch on one process without DeepSpeed: same losses
    single = launch(sft(tiny_model_dir, sft_file, micro=4, steps=6), tmp_path, "single")
    torch.testing.assert_close(ls, losses(single), atol=1e-4, rtol=1e-4)
    # stop after 3 steps, then resume to 6 (constant schedule, so the two runs are the same run)
    launch({**cfg, "optim": {**cfg["optim"], "max_steps": 3}}, tmp_path, "resumed", nproc=2, accelerate_config=acc)
    resumed = launch(cfg, tmp_path, "resumed", nproc=2, accelerate_config=acc, extra=["--resume"])
    torch.testing.assert_close(losses(resumed), ls, atol=1e-5, rtol=1e-5)
    assert_same_weights(straight, resumed)
