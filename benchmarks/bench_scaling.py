"""DPO and PPO throughput and loss agreement on 1 vs 2 GPUs (DDP, ZeRO-2, ZeRO-3, FSDP), and TRL's DPOTrainer
on the same model, data and batch as the competitor baseline, all in one run.

    python benchmarks/bench_scaling.py --out runs/bench --steps 12          # on a machine with 2 GPUs
    python benchmarks/bench_scaling.py --skip-dpo --ppo-precision no        # PPO losses across world sizes

PPO's rollouts are drawn from per-rollout seeds, so 1 and 2 GPUs sample the same responses up to float noise in the
logits; in bf16 that noise flips near-tie tokens and the runs part ways, in float32 (`--ppo-precision no`) they stay
together. Each PPO run records its responses, and the table says how many match the 1-GPU run's, token for token,
next to the largest loss difference.

A ~150M-parameter Llama-architecture model is built from a config (random weights; no hub), with the
tiny BPE tokenizer trained on the shipped testbeds. Preference rows are made long (about 256 prompt +
64 response tokens) by joining testbed rows, so the GPU has real work. Every run uses bf16 autocast and
the same global batch; tokens/s counts prompt+response tokens of both sequences of each pair.
Prints one table; paste it into BENCHMARKS.md with the device and date.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


RECORD_ENV = "RLHF_BENCH_RECORD"


def record_gold_reward(prompts, completions, **columns):
    """The assistant testbed's gold reward; also appends each rank's (prompt, response) pairs to $RLHF_BENCH_RECORD."""
    from rlhf.testbeds.assistant import gold_reward

    folder = os.environ.get(RECORD_ENV)
    if folder:
        with open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}.jsonl"), "a") as f:
            f.write(json.dumps(list(zip(prompts, completions))) + "\n")
    return gold_reward(prompts, completions, **columns)


def recorded(folder: str) -> list[list]:
    """Per reward call (one per iteration), the (prompt, response) pairs of all ranks in global rollout order."""
    ranks = sorted(os.listdir(folder))
    calls = [[json.loads(line) for line in open(os.path.join(folder, r))] for r in ranks]
    return [sum(parts, []) for parts in zip(*calls)]


def make_data(out: str, rows: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    src = [json.loads(l) for l in open(os.path.join(ROOT, "data", "assistant", "prefs.jsonl"))]
    path = os.path.join(out, "prefs_long.jsonl")
    with open(path, "w") as f:
        for _ in range(rows):
            picks = rng.sample(src, 24)
            prompt = " ".join(p["prompt"] + " " + p["chosen"] for p in picks[:20])
            chosen = " ".join(p["chosen"] for p in picks[20:])
            rejected = " ".join(p["rejected"] for p in picks[20:])
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return path


def make_model(out: str, hidden: int = 1024, layers: int = 12) -> str:
    sys.path.insert(0, ROOT)
    from rlhf.models.tiny import build_tiny_model, corpus_lines, train_tokenizer

    path = os.path.join(out, "model")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    files = [os.path.join(ROOT, "data", t, f"{s}.jsonl") for t in ("assistant", "code") for s in ("sft", "prefs")]
    tok = train_tokenizer(corpus_lines(files), vocab_size=1024)
    model = build_tiny_model(tok, hidden_size=hidden, layers=layers, heads=16, kv_heads=8,
                             intermediate_size=hidden * 11 // 4, max_positions=1024)
    tok.save_pretrained(path)
    model.save_pretrained(path)
    return path


def run(cmd: list[str], env: dict) -> float:
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.time() - t0


def ours(name: str, cfg: dict, out: str, nproc: int, accelerate_config: str | None, record: bool = False) -> dict:
    cfg = {**cfg, "logging": {"output_dir": out, "run_name": name, "progress": False, "save_every": 10_000}}
    path = os.path.join(out, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    folder = os.path.join(out, f"{name}.records")
    if record:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        env[RECORD_ENV] = folder
    env.pop("CUDA_VISIBLE_DEVICES", None)  # the TRL baseline narrows the parent's view to one GPU
    if nproc == 1:
        env["CUDA_VISIBLE_DEVICES"] = "0"
        cmd = [sys.executable, "-m", "rlhf", "train", path]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(ROOT, "configs", "accelerate", accelerate_config), "--num_processes", str(nproc),
               "-m", "rlhf", "train", path]
    wall = run(cmd, env)
    records = [json.loads(l) for l in open(os.path.join(out, name, "metrics.jsonl"))]
    steps = [r for r in records if "time/step_s" in r]
    return {"wall_s": wall, "step_s": [r["time/step_s"] for r in steps],
            "loss": [r.get("train/loss") for r in steps], "records": steps,
            "rollouts": recorded(folder) if record else None}


def trl_dpo(model: str, data: str, steps: int, batch: int, micro: int, max_length: int) -> dict:
    """TRL's DPOTrainer on one GPU, same model, rows, beta, batch and precision."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t = time.time()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.time() - self.t)

    tok = AutoTokenizer.from_pretrained(model)
    ds = load_dataset("json", data_files=data, split="train")
    ds = ds.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}],
                           "chosen": [{"role": "assistant", "content": r["chosen"]}],
                           "rejected": [{"role": "assistant", "content": r["rejected"]}]})
    args = DPOConfig(output_dir="/tmp/trl_dpo", per_device_train_batch_size=micro,
                     gradient_accumulation_steps=batch // micro, max_steps=steps, learning_rate=1e-5, beta=0.1,
                     bf16=True, logging_steps=1, report_to=[], save_strategy="no", max_length=max_length,
                     lr_scheduler_type="constant", dataloader_num_workers=0, seed=0)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model), args=args, train_dataset=ds,
                         processing_class=tok, callbacks=[Clock()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_s": times, "loss": losses}


def bench_dpo(a, model, data, stages, dpo, tokens_per_pair, max_length) -> None:
    results = {"dpo 1 GPU": ours("dpo_1gpu", dpo, a.out, 1, None)}
    for name in a.stages.split(","):
        if name:
            results[f"dpo 2 GPU {name}"] = ours(f"dpo_2gpu_{name.lower()}", dpo, a.out, 2, stages[name])
    if not a.skip_trl:
        # TRL's Trainer falls back to nn.DataParallel when it sees several GPUs; give it one, like our 1-GPU run
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"
        try:
            results["TRL DPOTrainer 1 GPU"] = trl_dpo(model, data, a.steps, a.batch, a.micro, max_length)
        except Exception as e:  # the baseline needs trl + datasets; report rather than lose our numbers
            print(f"TRL baseline failed: {type(e).__name__}: {e}", file=sys.stderr)

    print(f"\nDPO: global batch {a.batch} pairs, micro {a.micro}, ~{tokens_per_pair:.0f} tokens/pair, bf16")
    print("| run | median step s | pairs/s | tokens/s | scaling eff. | loss step 1 | loss last |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for name, r in results.items():
        step = median_after_warmup(r["step_s"])
        tps = a.batch * tokens_per_pair / step
        if name == "dpo 1 GPU":
            base = tps
        eff = f"{tps / (2 * base):.2f}" if base and "2 GPU" in name else ""
        print(f"| {name} | {step:.3f} | {a.batch / step:.1f} | {tps:,.0f} | {eff} | {r['loss'][0]:.5f} | {r['loss'][-1]:.5f} |")



def median_after_warmup(xs: list[float], warmup: int = 2) -> float:
    return statistics.median(xs[warmup:] if len(xs) > warmup + 1 else xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64, help="global pairs per optimizer step")
    ap.add_argument("--micro", type=int, default=8, help="pairs per forward on one GPU")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--skip-ppo", action="store_true")
    ap.add_argument("--skip-dpo", action="store_true")
    ap.add_argument("--hidden", type=int, default=1024, help="model width (1024 x 12 layers: ~150M parameters)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--stages", default="DDP,ZeRO-2,ZeRO-3", help="2-GPU runs to make (DDP, ZeRO-2, ZeRO-3, FSDP)")
    ap.add_argument("--ppo-precision", default="bf16", choices=["bf16", "no"], help="PPO's mixed_precision")
    ap.add_argument("--ppo-iterations", type=int, default=3)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    model, data = make_model(a.out, a.hidden, a.layers), make_data(a.out, rows=a.batch * (a.steps + 2))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    sample = [json.loads(l) for l in open(data)][:64]
    tokens_per_pair = statistics.mean(
        2 * len(tok(r["prompt"])["input_ids"]) + len(tok(r["chosen"])["input_ids"]) + len(tok(r["rejected"])["input_ids"])
        for r in sample)
    max_length = 512
    dpo = {"algorithm": "dpo", "seed": 0, "mixed_precision": "bf16", "model": {"name_or_path": model},
           "data": {"train": data, "max_length": max_length, "max_prompt_length": 448},
           "dpo": {"beta": 0.1, "reference": "copy"},
           "optim": {"lr": 1e-5, "batch_size": a.batch, "micro_batch_size": a.micro, "max_steps": a.steps,
                     "scheduler": "constant"}}
    stages = {"DDP": "ddp.yaml", "ZeRO-2": "zero2.yaml", "ZeRO-3": "zero3.yaml", "FSDP": "fsdp.yaml"}
    if not a.skip_dpo:
        bench_dpo(a, model, data, stages, dpo, tokens_per_pair, max_length)

    if not a.skip_ppo:
        bench_ppo(a, model, stages)


def bench_ppo(a, model: str, stages: dict) -> None:
    ppo = {"algorithm": "ppo", "seed": 0, "mixed_precision": a.ppo_precision, "model": {"name_or_path": model},
           "data": {"train": os.path.join(ROOT, "data", "assistant", "prompts_train.jsonl"),
                    "max_length": 256, "max_prompt_length": 64},
           "optim": {"lr": 1e-6, "scheduler": "constant"},
           "ppo": {"reward_fns": ["benchmarks.bench_scaling:record_gold_reward"], "critic_init": "policy",
                   "iterations": a.ppo_iterations, "rollout_batch_size": 128, "num_minibatches": 4,
                   "micro_batch_size": 16, "rollout_micro_batch_size": 64, "max_new_tokens": 64, "ref_ema": 0.001}}
    precision = {"no": "float32", "bf16": "bf16"}.get(a.ppo_precision, a.ppo_precision)
    print(f"\nPPO: 128 prompts/iteration, 64 new tokens, 4 minibatches, {precision}", flush=True)
    print("| run | iteration s (gen / score / train) | same responses as 1 GPU (it. 1 / all) | "
          "max abs loss diff vs 1 GPU | loss step 1 | loss last |")
    print("|---|---|---|---|---|---|", flush=True)
    runs = [("ppo 1 GPU", "ppo_1gpu", 1, None)] + [
        (f"ppo 2 GPU {name}", f"ppo_2gpu_{name.lower()}", 2, stages[name]) for name in a.stages.split(",") if name]
    base = None
    for label, run_name, nproc, acc in runs:
        r = ours(run_name, ppo, a.out, nproc, acc, record=True)
        firsts = [x for x in r["records"] if "time/generate_s" in x]
        last = firsts[-1]
        train = [x.get("time/train_s") for x in r["records"] if "time/train_s" in x][-1]
        total = last["time/generate_s"] + last["time/score_s"] + train
        base = base or r
        same_first = sum(x == y for x, y in zip(r["rollouts"][0], base["rollouts"][0]))
        same_all = sum(x == y for it, bit in zip(r["rollouts"], base["rollouts"]) for x, y in zip(it, bit))
        count = sum(len(it) for it in base["rollouts"])
        diff = max(abs(x - y) for x, y in zip(r["loss"], base["loss"]))
        print(f"| {label} | {total:.2f} ({last['time/generate_s']:.2f} / {last['time/score_s']:.2f} / {train:.2f}) "
              f"| {same_first}/{len(base['rollouts'][0])} / {same_all}/{count} | {diff:.2e} | {r['loss'][0]:.5f} | "
              f"{r['loss'][-1]:.5f} |", flush=True)

if __name__ == "__main__":
    main()
