"""Several processes on CPU (gloo): DDP invariance, DeepSpeed ZeRO-2/3 and FSDP2, each launched as a user would.

    torchrun --nproc_per_node 2 -m rlhf train CONFIG
    accelerate launch --config_file configs/accelerate/zero3.yaml -m rlhf train CONFIG     (zero2, fsdp likewise)

Every algorithm, on 2 ranks x micro-batch b, must equal 1 rank x micro-batch 2b (losses and final weights, to float
tolerance); under ZeRO-2/3 and FSDP it must also learn, export whole weights, and resume to the same run. PPO samples,
so its rollouts are made rank-independent in the product itself: each rollout draws from a seed of its global index
(rlhf.rollout.SeededSampler), and minibatches are stratified by global index (ppo.minibatch_rows). The tiny model is
really sharded under ZeRO-3: the Trainer scales the persistence threshold with the hidden size (64 -> 640 elements).
Two "nodes" on this host run the README's multi-node launch.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf.tracking import read_metrics
from tests.invariance import assert_adam_weights_close, reduction_rtol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
pytestmark = pytest.mark.slow
RECORD_ENV = "RLHF_TEST_RECORD"  # folder where record_reward writes each rank's (prompt, completion) pairs
SLEEP_ENV = "RLHF_TEST_SLEEP_S"  # seconds rank 1 stalls in sleepy_reward


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(config: dict, tmp_path, name: str, nproc: int = 1, accelerate_config: str | None = None,
            extra: list[str] = ()) -> list[str]:
    """Write the config and return the command line that runs it (1 process plain, 2 with torchrun or accelerate)."""
    config = {**config, "logging": {**config.get("logging", {}), "output_dir": str(tmp_path), "run_name": name,
                                    "progress": False}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    train = ["-m", "rlhf", "train", str(path), *extra]
    if accelerate_config:
        return [os.path.join(BIN, "accelerate"), "launch", "--config_file", os.path.join(ROOT, accelerate_config),
                "--num_processes", str(nproc), "--main_process_port", str(free_port()), *train]
    if nproc > 1:
        return [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
                *train]
    return [sys.executable, *train]


def run_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def launch(config: dict, tmp_path, name: str, nproc: int = 1, accelerate_config: str | None = None,
           extra: list[str] = (), env: dict | None = None) -> str:
    """Run the config to completion and return the run folder."""
    cmd = command(config, tmp_path, name, nproc, accelerate_config, extra)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env(**(env or {})), timeout=600, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return str(tmp_path / name)


def sft(model_dir, data, micro, steps=6, **optim):
    return {"algorithm": "sft", "seed": 0, "model": {"name_or_path": model_dir},
            "data": {"train": data, "max_length": 64, "max_prompt_length": 32},
            "optim": {"lr": 3e-3, "batch_size": 8, "micro_batch_size": micro, "max_steps": steps,
                      "scheduler": "constant", **optim}}


def losses(run: str) -> list[float]:
    return [r["train/loss"] for r in read_metrics(os.path.join(run, "metrics.jsonl")) if "train/loss" in r]


def weights(run: str, sub: str = "") -> dict[str, torch.Tensor]:
    return load_file(os.path.join(run, "final", sub, "model.safetensors"))


def assert_same_weights(a, b, atol=5e-5, sub: str = ""):
    """For runs with the same arithmetic (a run and its resumed self: same world size, engine, micro-batches), which
    only a resume that restores something inexactly can tell apart. Runs whose arithmetic differs: assert_equivalent."""
    wa = weights(a, sub) if isinstance(a, str) else a
    wb = weights(b, sub) if isinstance(b, str) else b
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4, msg=k)


def run_config(run: str) -> dict:
    with open(os.path.join(run, "config.yaml")) as f:
        return yaml.safe_load(f)


def assert_equivalent(a: str, b: str, model_dir: str, sub: str = ""):
    """Two runs of one config whose arithmetic differs (world size, micro-batch, engine); see tests/invariance.py.

    Exactly comparable, from equal starting weights: the gradient norm at step 1, to the rounding of the sums it went
    through (every token of the step's batch, the vocabulary's softmax, and per layer a hidden and an intermediate
    dot product). After the AdamW steps: the final weights, only to the gap AdamW allows between equal runs."""
    ca, model = run_config(a), json.load(open(os.path.join(model_dir, "config.json")))
    first = [next(r for r in read_metrics(os.path.join(run, "metrics.jsonl")) if r["step"] == 1) for run in (a, b)]
    if not sub:
        rows = 16  # the largest optimizer batch in this file: 8 pairs (chosen + rejected), or a PPO minibatch of 8
        rtol = reduction_rtol(rows * ca["data"]["max_length"], model["vocab_size"],
                              model["num_hidden_layers"] * (model["hidden_size"] + model["intermediate_size"]))
        norms = [r.get("optim/grad_norm") for r in first]
        assert norms[0] == pytest.approx(norms[1], rel=rtol) and norms[0] is not None, (norms, rtol)
    steps = [max(r["step"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))) for run in (a, b)]
    assert steps[0] == steps[1], steps
    lr = ca["ppo"]["critic_lr"] if sub == "critic" else ca["optim"]["lr"]
    assert ca["optim"]["weight_decay"] == 0  # what the gap assumes; the peak lr bounds every step's lr
    assert_adam_weights_close(weights(a, sub), weights(b, sub), lr, steps[0], msg=f"{a} vs {b} {sub}")


# --------------------------------------------------------------------------------------------------------------------
# Configs, reward fns the subprocesses import, one-process reference runs, a stop-and-resume helper
# --------------------------------------------------------------------------------------------------------------------


def e_fraction(completions) -> list[float]:
    return [10.0 * c.count("e") / max(len(c), 1) for c in completions]


def record_reward(prompts, completions, **columns):
    """10 x the fraction of 'e's; also appends this call's (prompt, completion) pairs to $RLHF_TEST_RECORD/rank<R>."""
    folder = os.environ.get(RECORD_ENV)
    if folder:
        with open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}.jsonl"), "a") as f:
            f.write(json.dumps(list(zip(prompts, completions))) + "\n")
    return e_fraction(completions)


def sleepy_reward(prompts, completions, **columns):
    """Rank 1 stalls here (inside PPO's rollout) while rank 0 goes on to the rollout's all-reduce."""
    if os.environ.get("RANK") == "1":
        time.sleep(float(os.environ.get(SLEEP_ENV, "0")))
    return e_fraction(completions)


def pairs(algorithm, model_dir, data, eval_data, micro, steps=4, **section):
    """Reward model or DPO on the preference fixture; 5 eval pairs split 3/2 over two ranks (uneven on purpose)."""
    return {"algorithm": algorithm, "seed": 0, "model": {"name_or_path": model_dir},
            "data": {"train": data, "eval": eval_data, "max_length": 64, "max_prompt_length": 32},
            "optim": {"lr": 1e-2, "batch_size": 8, "micro_batch_size": micro, "max_steps": steps,
                      "scheduler": "constant"},
            "logging": {"eval_every": 1, "save_every": steps // 2},
            {"reward": "reward", "dpo": "dpo"}[algorithm]: section}


def ppo(model_dir, prompts, rm_dir, micro, reward="record_reward", iterations=2):
    """8 prompts x 2 samples = 16 rollouts = 2 minibatches of 8 = (2 ranks x micro 2 | 1 rank x micro 4) x accum 2;
    2 epochs, so 4 steps an iteration. Reward model (also the critic's start) + a programmatic reward; EMA
    reference, score normalization: every piece that talks across ranks or lives in a checkpoint."""
    return {"algorithm": "ppo", "seed": 0, "model": {"name_or_path": model_dir},
            "data": {"train": prompts, "max_length": 64, "max_prompt_length": 32, "shuffle": False},
            "optim": {"lr": 3e-3, "scheduler": "constant"},
            "logging": {"save_every": 4},
            "ppo": {"reward_model": rm_dir, "reward_fns": [f"tests.test_distributed:{reward}"],
                    "reward_weights": [0.5, 1.0], "critic_init": "reward_model", "critic_lr": 3e-3,
                    "iterations": iterations, "rollout_batch_size": 8, "samples_per_prompt": 2,
                    "num_minibatches": 2, "ppo_epochs": 2, "micro_batch_size": micro, "rollout_micro_batch_size": 4,
                    "max_new_tokens": 8, "on_truncated": "score", "ref_ema": 0.1, "reward_norm": True}}


@pytest.fixture(scope="module")
def eval_pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    with open(os.path.join(ROOT, "tests", "fixtures", "data", "prefs.jsonl")) as f:
        path.write_text("".join(f.readlines()[:5]))
    return str(path)


@pytest.fixture(scope="module")
def ppo_files(tiny_model_dir, tmp_path_factory):
    """(prompts, reward model): two prompts alternating, so both ranks see both (ranks must still sample
    differently); a reward model with a fresh scalar head on the tiny model."""
    from rlhf.models import load_scalar_model, load_tokenizer

    folder = tmp_path_factory.mktemp("ppo")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n"
                               for p in ["What color is the sky?", "Tell me the color of the orange."] * 4))
    tok = load_tokenizer(tiny_model_dir)
    torch.manual_seed(1)
    rm = load_scalar_model(tiny_model_dir, tokenizer=tok)
    rm.config.score_bias = 0.3  # as `rlhf train` calibrates it: the bias is restored on load (into ZeRO-3 shards)
    rm.save_pretrained(str(folder / "rm"))
    tok.save_pretrained(str(folder / "rm"))
    return str(prompts), str(folder / "rm")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Reference runs on one process, each run once per module and shared by the DDP and ZeRO tests; what
    record_reward sees goes to <run>.records/."""
    out, done = tmp_path_factory.mktemp("one"), {}

    def run(name: str, config: dict) -> str:
        if name not in done:
            os.makedirs(out / f"{name}.records")
            done[name] = launch(config, out, name, env={RECORD_ENV: str(out / f"{name}.records")})
        return done[name]
    return run


def records(folder) -> dict[str, list]:
    return {name[:-len(".jsonl")]: [json.loads(line) for line in open(os.path.join(folder, name))]
            for name in sorted(os.listdir(folder))}


def straight_then_resumed(config: dict, tmp_path, acc: str, resume_step: int | None, env: dict | None = None):
    """Run to the end (checkpoints at resume_step and the end), keep its losses and final weights, then resume the
    same run folder from the resume_step checkpoint and run to the end again: the two must be the same run."""
    run = launch(config, tmp_path, "run", nproc=2, accelerate_config=acc, env=env)
    straight = {"losses": losses(run), "metrics": read_metrics(os.path.join(run, "metrics.jsonl")),
                "final": {sub: weights(run, sub) for sub in ("", "critic")
                          if os.path.exists(os.path.join(run, "final", sub, "model.safetensors"))}}
    if resume_step is None:
        return run, straight
    checkpoint = os.path.join(run, "checkpoints", f"step_{resume_step:06d}")
    launch(config, tmp_path, "run", nproc=2, accelerate_config=acc, extra=["--resume", checkpoint], env=env)
    torch.testing.assert_close(losses(run), straight["losses"], atol=1e-5, rtol=1e-5)
    for sub, w in straight["final"].items():
        assert_same_weights(run, w, sub=sub)
    return run, straight


STAGES = ["zero2", "zero3", "fsdp"]  # accelerate configs: DeepSpeed ZeRO-2/3, FSDP2


# --------------------------------------------------------------------------------------------------------------------
# SFT: DDP and ZeRO-2/3
# --------------------------------------------------------------------------------------------------------------------


def test_ddp_two_ranks_equal_one_rank_with_double_micro_batch(tiny_model_dir, sft_file, one_process, tmp_path):
    one = one_process("sft", sft(tiny_model_dir, sft_file, micro=4))
    two = launch(sft(tiny_model_dir, sft_file, micro=2), tmp_path, "two", nproc=2)
    torch.testing.assert_close(losses(one), losses(two), atol=1e-5, rtol=1e-5)
    assert_equivalent(one, two, tiny_model_dir)


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_sft_learns_saves_and_resumes(stage, tiny_model_dir, sft_file, one_process, tmp_path):
    # stopped at step 3 and resumed to 6 (constant schedule): the same run as the straight one
    cfg = {**sft(tiny_model_dir, sft_file, micro=2), "logging": {"save_every": 3}}
    run, straight = straight_then_resumed(cfg, tmp_path, f"configs/accelerate/{stage}.yaml", resume_step=3)
    ls = straight["losses"]
    assert ls[-1] < 0.9 * ls[0], ls
    # same global batch on one process without DeepSpeed: same losses, same whole weights in final/
    single = one_process("sft", sft(tiny_model_dir, sft_file, micro=4))
    torch.testing.assert_close(ls, losses(single), atol=1e-4, rtol=1e-4)
    assert_equivalent(single, run, tiny_model_dir)


def test_two_nodes_equal_one_process(tiny_model_dir, sft_file, one_process, tmp_path):
    """The README's multi-node launch, two "nodes" on this host: the same accelerate command on each, differing only
    in --machine_rank, one process per node, DeepSpeed's standard (torchrun) multi-node launcher, ZeRO-3."""
    config = {**sft(tiny_model_dir, sft_file, micro=2), "logging": {"output_dir": str(tmp_path), "run_name": "nodes",
                                                                   "progress": False}}
    (tmp_path / "nodes.yaml").write_text(yaml.safe_dump(config))
    port, procs = free_port(), []
    for rank in (0, 1):
        cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file",
               os.path.join(ROOT, "configs/accelerate/zero3.yaml"), "--num_machines", "2", "--num_processes", "2",
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--deepspeed_multinode_launcher", "standard", "-m", "rlhf", "train", str(tmp_path / "nodes.yaml")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                      env=run_env(RLHF_COLLECTIVE_TIMEOUT_S="120")))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    run = str(tmp_path / "nodes")
    single = one_process("sft", sft(tiny_model_dir, sft_file, micro=4))
    torch.testing.assert_close(losses(run), losses(single), atol=1e-4, rtol=1e-4)
    assert_equivalent(single, run, tiny_model_dir)


def test_fsdp1_config_is_refused_at_start_up(tiny_model_dir, sft_file, tmp_path):
    acc = tmp_path / "accelerate_fsdp1.yaml"
    acc.write_text(open(os.path.join(ROOT, "configs/accelerate/fsdp.yaml")).read().replace("fsdp_version: 2",
                                                                                             "fsdp_version: 1"))
    cmd = command(sft(tiny_model_dir, sft_file, micro=2), tmp_path, "fsdp1", nproc=2, accelerate_config=str(acc))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env(), timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    assert "error: config: FSDP: fsdp_config.fsdp_version is 1 in the accelerate config; set it to 2" in proc.stderr


# --------------------------------------------------------------------------------------------------------------------
# PPO's rank-independent sampler (in process)
# --------------------------------------------------------------------------------------------------------------------


def test_seeded_sampler_draws_from_the_filtered_distribution_row_by_row():
    """The rank-independent sampler PPO uses: Gumbel-max on the temperature/top-k filtered logits. 20k rows with one
    seed each give the softmax of the filtered logits (filtered tokens never); a row's draw ignores its batch."""
    from rlhf.ops import _sampling_logits
    from rlhf.rollout import SamplingConfig
    from rlhf.rollout.hf import SeededSampler

    sampling = SamplingConfig(temperature=0.7, top_k=3)
    logits = torch.tensor([[1.0, 0.5, -0.2, 2.0, 0.9]])
    n = 20_000
    draws = SeededSampler(range(n), sampling, torch.device("cpu"))(None, logits.expand(n, -1)).argmax(-1)
    freq = torch.bincount(draws, minlength=5).double() / n
    expected = _sampling_logits(logits, 0.7, 3, 1.0, upcast=True).softmax(-1)[0].double()
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)
    assert freq[2] == freq[1] == 0  # the two tokens below the top 3
    alone = SeededSampler(range(100, 103), sampling, torch.device("cpu"))(None, logits.expand(3, -1)).argmax(-1)
    torch.testing.assert_close(alone, draws[100:103])


# --------------------------------------------------------------------------------------------------------------------
# DDP (torchrun over gloo): 2 ranks x micro b == 1 rank x micro 2b
# --------------------------------------------------------------------------------------------------------------------


def test_dpo_ddp_two_ranks_equal_one_rank(tiny_model_dir, prefs_file, eval_pairs, one_process, tmp_path):
    section = {"reference": "precomputed"}
    one = one_process("dpo-precomputed", pairs("dpo", tiny_model_dir, prefs_file, eval_pairs, 4, **section))
    two = launch(pairs("dpo", tiny_model_dir, prefs_file, eval_pairs, 2, **section), tmp_path, "two", nproc=2)
    torch.testing.assert_close(losses(two), losses(one), atol=1e-5, rtol=1e-5)
    assert_equivalent(one, two, tiny_model_dir)
    # reduced before logging, and written by rank 0 only: one record per step, equal eval metrics
    rec_one, rec_two = (read_metrics(os.path.join(r, "metrics.jsonl")) for r in (one, two))
    assert [r["step"] for r in rec_two] == [r["step"] for r in rec_one]
    for a, b in zip(rec_one, rec_two):
        for k in a:
            if k.startswith(("eval/", "rewards/", "logps/")):
                assert a[k] == pytest.approx(b[k], abs=1e-4), (a["step"], k)


def test_ppo_ddp_two_ranks_equal_one_rank_and_ranks_sample_differently(tiny_model_dir, ppo_files, one_process,
                                                                          tmp_path):
    prompts, rm = ppo_files
    (tmp_path / "records").mkdir()
    one = one_process("ppo", ppo(tiny_model_dir, prompts, rm, 4))
    two = launch(ppo(tiny_model_dir, prompts, rm, 2), tmp_path, "two", nproc=2,
                 env={RECORD_ENV: str(tmp_path / "records")})
    # the rollouts: one rank's responses are ranks 0 and 1's, in order (per-rollout seeds, not per-rank ones) ...
    single, split = records(one + ".records")["rank0"], records(tmp_path / "records")
    assert len(single) == 2 and [a + b for a, b in zip(split["rank0"], split["rank1"])] == single
    # ... and ranks holding the same prompts still sample different responses, as do two samples of one prompt
    for prompt in ("What color is the sky?", "Tell me the color of the orange."):
        by_rank = [{c for p, c in split[r][0] if p == prompt} for r in ("rank0", "rank1")]
        assert len(by_rank[0]) == len(by_rank[1]) == 4 and not by_rank[0] & by_rank[1], by_rank
    # the training: advantages whitened and values/scores normalized over all ranks, minibatches by global index
    torch.testing.assert_close(losses(two), losses(one), atol=1e-5, rtol=1e-4)
    assert_equivalent(one, two, tiny_model_dir)
    assert_equivalent(one, two, tiny_model_dir, sub="critic")
    assert [r["step"] for r in read_metrics(os.path.join(two, "metrics.jsonl"))] == list(range(1, 9))


# --------------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2/3 (accelerate launch): learns, equals one process, exports whole weights, resumes
# --------------------------------------------------------------------------------------------------------------------




@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_reward_model(stage, tiny_model_dir, prefs_file, eval_pairs, one_process, tmp_path):
    section = {"normalize": True, "normalize_on": "eval"}  # calibrated on the 3/2-split eval pairs, by every rank
    one = one_process("rm", pairs("reward", tiny_model_dir, prefs_file, eval_pairs, 4, **section))
    run, straight = straight_then_resumed(pairs("reward", tiny_model_dir, prefs_file, eval_pairs, 2, **section),
                                          tmp_path, f"configs/accelerate/{stage}.yaml", resume_step=2)
    evals = [r["eval/loss"] for r in straight["metrics"] if "eval/loss" in r]
    assert evals[-1] < evals[0] - 0.01, evals  # learns: the held-out Bradley-Terry loss falls
    torch.testing.assert_close(straight["losses"], losses(one), atol=1e-4, rtol=1e-4)
    assert_equivalent(one, run, tiny_model_dir)  # whole weights in final/, normalization folded in as on one process
    from rlhf.models import load_scalar_model

    assert load_scalar_model(os.path.join(run, "final")).score.bias is not None  # loadable, calibration restored
    norm = [json.load(open(os.path.join(r, "final", "reward_normalization.json"))) for r in (one, run)]
    assert norm[0]["count"] == norm[1]["count"] == 10
    assert norm[1]["mean"] == pytest.approx(norm[0]["mean"], rel=1e-3)
    assert norm[1]["std"] == pytest.approx(norm[0]["std"], rel=1e-3)


@pytest.mark.parametrize("stage, reference", [("zero2", "copy"), ("zero3", "copy"), ("zero3", "precomputed"),
                                               ("fsdp", "copy"), ("fsdp", "precomputed")])
def test_deepspeed_dpo(stage, reference, tiny_model_dir, prefs_file, eval_pairs, one_process, tmp_path):
    # copy: a whole frozen copy, soft-updated from the gathered policy every 2 steps and saved in checkpoints;
    # precomputed: the reference pass over ranks' uneven shares (41 pairs) before training (its cache on resume is
    # test_dpo's; resume under ZeRO-3 is the copy's, with more state)
    copy = reference == "copy"
    section = {"reference": reference, **({"ref_update_every": 2, "ref_update_alpha": 0.5} if copy else {})}
    one = one_process(f"dpo-{reference}", pairs("dpo", tiny_model_dir, prefs_file, eval_pairs, 4, **section))
    run, straight = straight_then_resumed(pairs("dpo", tiny_model_dir, prefs_file, eval_pairs, 2, **section),
                                          tmp_path, f"configs/accelerate/{stage}.yaml", resume_step=2 if copy else None)
    ls = straight["losses"]
    evals = [r["eval/loss"] for r in straight["metrics"] if "eval/loss" in r]
    # learns: the policy starts as the reference (loss log 2) and ends below it on held-out pairs
    assert ls[0] == pytest.approx(math.log(2), abs=1e-6) and evals[-1] < math.log(2) - 0.005, (ls, evals)
    torch.testing.assert_close(ls, losses(one), atol=1e-4, rtol=1e-4)
    assert_equivalent(one, run, tiny_model_dir)


@pytest.mark.parametrize("stage", ["zero2", "zero3", "fsdp"])
def test_sharded_lora_dpo(stage, tiny_model_dir, prefs_file, eval_pairs, one_process, tmp_path):
    # LoRA adapters start at random (A) and zero (B): every rank must draw the same A, or FSDP, which shards each
    # rank's own values, trains a mix; the reference is the policy with its adapters off
    lora = {"lora_r": 8, "lora_alpha": 16, "lora_target_modules": ["q_proj", "v_proj"]}

    def config(micro):
        cfg = pairs("dpo", tiny_model_dir, prefs_file, eval_pairs, micro, reference="adapter")
        return {**cfg, "model": {**cfg["model"], **lora}}
    one = one_process("dpo-lora", config(4))
    run, _ = straight_then_resumed(config(2), tmp_path, f"configs/accelerate/{stage}.yaml", resume_step=2)
    torch.testing.assert_close(losses(run), losses(one), atol=1e-5, rtol=1e-5)
    if stage != "fsdp":  # DeepSpeed's exclude_frozen_parameters: the resume state holds no frozen base weight
        base = sum(t.numel() * t.element_size() for t in load_file(os.path.join(tiny_model_dir,
                                                                                "model.safetensors")).values())
        state = os.path.join(run, "checkpoints", "step_000002", "state")
        written = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(state) for n in names)
        # adapters, Adam, RNG pickles and DeepSpeed's scripts: a third of the base; a tied lm_head alone is 0.3 of it
        assert written < base / 2, (written, base)
    adapters = [load_file(os.path.join(r, "final", "adapter_model.safetensors")) for r in (one, run)]
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) == 8
    assert_adam_weights_close(adapters[1], adapters[0], run_config(one)["optim"]["lr"],
                              max(r["step"] for r in read_metrics(os.path.join(one, "metrics.jsonl"))))


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_ppo(stage, tiny_model_dir, ppo_files, one_process, tmp_path):
    prompts, rm = ppo_files
    one = one_process("ppo", ppo(tiny_model_dir, prompts, rm, 4))
    run, straight = straight_then_resumed(ppo(tiny_model_dir, prompts, rm, 2), tmp_path,
                                          f"configs/accelerate/{stage}.yaml", resume_step=4)
    # learns: within each iteration the second epoch over the same rollouts has lower policy and value losses
    steps = straight["metrics"]
    for it in (0, 1):
        first, second = steps[4 * it:4 * it + 2], steps[4 * it + 2:4 * it + 4]
        for key in ("ppo/policy_loss", "ppo/value_loss"):
            assert sum(r[key] for r in second) < sum(r[key] for r in first), (it, key)
    # the same run as one process (rollouts gathered once per phase under ZeRO-3), policy and critic whole
    torch.testing.assert_close(straight["losses"], losses(one), atol=1e-4, rtol=1e-4)
    assert_equivalent(one, run, tiny_model_dir)
    assert_equivalent(one, run, tiny_model_dir, sub="critic")
    from rlhf.config import ModelConfig
    from rlhf.models import load_causal_lm, load_scalar_model

    final = os.path.join(run, "final")
    assert load_causal_lm(ModelConfig(name_or_path=final)) is not None
    assert load_scalar_model(os.path.join(final, "critic")).score.bias is not None  # the critic kept the RM's bias


@pytest.mark.parametrize("stage", ["zero3", "fsdp"])
def test_sharded_bf16_ppo_first_ratio_is_one(stage, tiny_model_dir, ppo_files, tmp_path):
    """In bf16 the rollout's log-probs (whole weights, gathered once) and the first training forward (sharded) must
    agree exactly: ratio 1 and KL(old || new) 0 before any update. FSDP's default mixed precision, which casts module
    outputs to bf16, breaks this."""
    prompts, rm = ppo_files
    config = {**ppo(tiny_model_dir, prompts, rm, 2, iterations=1), "mixed_precision": "bf16"}
    run = launch(config, tmp_path, "bf16", nproc=2, accelerate_config=f"configs/accelerate/{stage}.yaml")
    first = read_metrics(os.path.join(run, "metrics.jsonl"))[0]
    assert first["ppo/ratio_mean"] == 1.0 and first["ppo/approx_kl"] == 0.0, first


SHARDED_GENERATE = """
import sys, torch
from torch.distributed.tensor import DTensor
from rlhf.config import load_config
from rlhf.data import encode_prompt
from rlhf.rollout import SamplingConfig, generate
from rlhf.trainer import Trainer


def sharded(w):  # a ZeRO-3 partition is empty outside its block; an FSDP2 DTensor holds half the rows here
    return w.numel() == 0 if hasattr(w, "ds_id") else isinstance(w, DTensor) and w.to_local().shape[0] < w.shape[0]


t = Trainer(load_config(sys.argv[1], []))
model = t.algorithm.build_model()
if t.zero_stage == 3:
    t._size_zero3(model)
t.model, optimizer = t.accelerator.prepare(model, t._optimizer(model))
inner = t.accelerator.unwrap_model(t.model)
assert sharded(inner.model.embed_tokens.weight)  # really sharded outside the block
ids = [encode_prompt(t.tokenizer, "What color is the sky?")] * (1 + 2 * t.rank)
with t.full_model() as whole:
    assert not sharded(whole.model.embed_tokens.weight) and whole.model.embed_tokens.weight.shape[0] == 512
    out = generate(whole, t.tokenizer, prompt_ids=ids, sampling=SamplingConfig(max_new_tokens=4 + 8 * t.rank),
                   batch_size=1, seeds=list(range(len(ids))))
    if t.rank == 1:  # what a rank-0-only export reads: whole tensors, no collective
        state = whole.state_dict()
        assert not any(isinstance(v, DTensor) for v in state.values())
        assert state["model.embed_tokens.weight"].shape[0] == 512
assert sharded(inner.model.embed_tokens.weight)  # re-sharded
x = torch.tensor(ids[:1])
loss = t.model(input_ids=x, labels=x).loss  # the per-module hooks are back: training goes on
t.accelerator.backward(loss)
optimizer.step()
print(f"rank {t.rank}: {len(ids)} generate calls, {int(out.response_mask.sum())} tokens, then loss {loss.item():.4f}")
t.accelerator.end_training()  # destroys the process group, as `rlhf train` does
# and, as `rlhf train` does, frees the models while the interpreter is whole: gloo work still holding their tensors
# can otherwise abort the process during interpreter exit
del t, model, inner, whole, optimizer, loss
import gc
gc.collect()
"""


@pytest.mark.parametrize("stage", ["zero3", "fsdp"])
def test_sharded_generation_gathers_once_not_per_token(stage, tiny_model_dir, sft_file, tmp_path):
    """Inside Trainer.full_model ranks generate different numbers of sequences and tokens (1 x 4 vs 3 x 12): with a
    collective per forward (ZeRO-3's or FSDP's per-module all-gathers, or transformers' synced_gpus) this would
    deadlock."""
    script, config = tmp_path / "generate.py", tmp_path / "sft.yaml"
    script.write_text(SHARDED_GENERATE)
    config.write_text(yaml.safe_dump({**sft(tiny_model_dir, sft_file, micro=2),
                                      "logging": {"output_dir": str(tmp_path), "run_name": "gen"}}))
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file",
           os.path.join(ROOT, f"configs/accelerate/{stage}.yaml"), "--num_processes", "2", "--main_process_port",
           str(free_port()), str(script), str(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=run_env(RLHF_COLLECTIVE_TIMEOUT_S="30"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 0: 1 generate calls" in proc.stdout and "rank 1: 3 generate calls" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------------------------------------------------
# A rank that stops taking part: a named failure, not a hang
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL needs 2 GPUs"))])
def test_stalled_rank_fails_with_a_timeout_naming_the_phase(backend, tiny_model_dir, ppo_files, tmp_path):
    """On NCCL a plain all-reduce returns at once and the rank would then wait for its peer in the next host sync,
    with no timeout (torch's watchdog only logs one); the trainer's all-reduces wait with the timeout instead."""
    prompts, rm = ppo_files
    cmd = command(ppo(tiny_model_dir, prompts, rm, 2, reward="sleepy_reward", iterations=1), tmp_path, "stall",
                  nproc=2)
    # NCCL builds its communicator inside the first collective: leave that more than 5 s
    timeout = {"gloo": 5, "nccl": 20}[backend]
    env = {"CUDA_VISIBLE_DEVICES": ""} if backend == "gloo" else {}
    stall = 90  # seconds the sleepy rank sleeps in its reward function
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=180,
                          env=run_env(RLHF_COLLECTIVE_TIMEOUT_S=str(timeout), **{SLEEP_ENV: str(stall)}, **env))
    elapsed = time.time() - t0
    assert proc.returncode != 0
    assert "CollectiveError: collective failed during rollout (step 0, rank 0 of 2)" in proc.stderr, \
        proc.stderr[-3000:]
    assert f"RLHF_COLLECTIVE_TIMEOUT_S={timeout}s" in proc.stderr
    # Waiting for the stall would end after start-up + the stall, so under `stall` seconds in all means the timeout
    # ended it, however long two ranks take to start on a loaded machine (40-50 s seen on 2 busy cores).
    assert elapsed < stall, elapsed
