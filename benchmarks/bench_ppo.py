"""A PPO iteration against TRL's `RLOOTrainer`, at the Qwen2.5-0.5B shape, on one GPU, in one command.

    python benchmarks/bench_ppo.py --out /tmp/bench_ppo                   # RLOO and PPO at 0.5B, PPO 1.5B x 512
    python benchmarks/bench_ppo.py --runs rlhf-ppo --iterations 2          # ours only, a quick check
    python benchmarks/bench_ppo.py --shape tiny --runs rlhf-ppo,trl-rloo --prompt-len 16 --new-tokens 8  # CPU check

Set-up (the same for both trainers): the random-init Qwen2.5-shaped causal LM and reward model of
benchmarks/bench_train.py (vocabulary 151,936, bf16 weights, bf16 autocast), its word-level tokenizer, 16 prompts of
128 tokens per iteration with 4 samples each (64 rollouts), 256 new tokens at temperature 1 without top-k / top-p,
4 optimizer steps of 16 rollouts per iteration, one epoch, the reward model's score as the reward, a KL penalty to
a reference model (RLOO: beta 0.05, a frozen reference loaded beside the policy; ours: kl_coef 0.05, an EMA
reference and a critic initialized from the reward model, trained with its own AdamW).
The random models almost never sample EOS, so every rollout runs to 256 tokens and both do equal generation work.

Measured per run, in its own process: seconds per iteration (the median of the iterations after the first, which
pays compilation and CUDA-graph capture), split where the trainer reports it (ours: generate, score, train;
RLOO: step times only, generation happens inside its first step of each iteration), generated tokens/s over the
generation time (RLOO: over the iteration), and peak GPU memory (torch.cuda.max_memory_allocated).
The `rlhf-ppo-1.5b-512` run is ours alone at the Qwen2.5-1.5B shape with 512 rollouts per iteration (512 prompts x 1
sample, 4 minibatches), the paper's large batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_train import build_models, measure, peak_bytes, write_prompts, write_table  # noqa: E402

RUNS = ["trl-rloo", "rlhf-ppo", "rlhf-ppo-1.5b-512"]


def run_rlhf(spec: dict) -> dict:
    from rlhf import Trainer
    from rlhf.config import config_from_dict

    Trainer.save_checkpoint = lambda self: None  # writing GBs of weights is neither measured nor needed
    Trainer.save_final = lambda self: None
    n, spp = spec["prompts"], spec["samples"]
    cfg = {
        "algorithm": "ppo", "seed": 0, "mixed_precision": "bf16" if spec["cuda"] else "no",
        "model": {"compile_layers": spec.get("compile_layers", False), "name_or_path": spec["models"]["lm"], "dtype": "bfloat16" if spec["cuda"] else "float32",
                  "tokenizer": spec["models"]["tokenizer"]},
        "data": {"train": spec["data"], "max_prompt_length": spec["prompt_len"],
                 "max_length": spec["prompt_len"] + spec["new_tokens"], "shuffle": False},
        "optim": {"lr": 1e-6, "scheduler": "constant", "warmup_ratio": 0.0, "max_grad_norm": 1.0},
        "logging": {"output_dir": spec["run_dir"], "run_name": "run", "progress": False, "log_every": 1,
                    "log_samples": 0},
        "ppo": {"reward_model": spec["models"]["rm"], "critic_init": "reward_model", "critic_lr": 1e-6,
                "iterations": spec["iterations"], "rollout_batch_size": n, "samples_per_prompt": spp,
                "num_minibatches": 4, "ppo_epochs": 1, "micro_batch_size": spec["micro"],
                "rollout_micro_batch_size": spec["rollout_micro"], "max_new_tokens": spec["new_tokens"],
                "temperature": 1.0, "top_k": 0, "top_p": 1.0, "kl_coef": 0.05, "ref_ema": 0.001,
                "engine": spec["engine"]},
    }
    Trainer(config_from_dict(cfg)).train()
    records = [json.loads(line) for line in open(os.path.join(spec["run_dir"], "run", "metrics.jsonl"))]
    its = [r for r in records if "time/generate_s" in r]
    ends = [r for r in records if "time/train_s" in r]
    out = {"generate_s": [r["time/generate_s"] for r in its], "score_s": [r["time/score_s"] for r in its],
           "train_s": [r["time/train_s"] for r in ends], "peak_bytes": peak_bytes(),
           "length": [r.get("response/length_mean") for r in its]}
    out["iteration_s"] = [g + s + t for g, s, t in zip(out["generate_s"], out["score_s"], out["train_s"])]
    return out


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    tok = AutoTokenizer.from_pretrained(spec["models"]["tokenizer"])
    rows = [json.loads(line) for line in open(spec["data"])]
    n, spp = spec["prompts"], spec["samples"]
    rollouts = n * spp
    per_step = rollouts // 4
    steps = spec["iterations"] * 4
    args = RLOOConfig(
        output_dir=os.path.join(spec["run_dir"], "trl"), per_device_train_batch_size=per_step,
        gradient_accumulation_steps=1, num_generations=spp, generation_batch_size=rollouts, max_steps=steps,
        max_completion_length=spec["new_tokens"], temperature=1.0, top_k=0, top_p=1.0, beta=0.05,
        learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to="none", bf16=spec["cuda"], gradient_checkpointing=False, disable_tqdm=True,
        seed=0, num_iterations=1, shuffle_dataset=False, use_cpu=not spec["cuda"],
        model_init_kwargs={"dtype": torch.bfloat16 if spec["cuda"] else torch.float32})
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if not marks:
                marks.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    trainer = RLOOTrainer(model=spec["models"]["lm"], reward_funcs=[spec["models"]["rm"]], args=args,
                          train_dataset=Dataset.from_list(rows[:n] * spec["iterations"]), processing_class=tok,
                          reward_processing_classes=[tok], callbacks=[Clock()])
    trainer.train()
    step_s = [b - a for a, b in zip(marks, marks[1:])]
    its = [sum(step_s[i:i + 4]) for i in range(0, len(step_s) - 3, 4)]
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    return {"iteration_s": its, "step_s": step_s, "peak_bytes": peak_bytes(), "length": lengths}


def worker(spec: dict) -> None:
    fn = run_trl if spec["run"].startswith("trl") else run_rlhf
    print("RESULT " + json.dumps(fn(spec)), flush=True)


def summarize(run: str, res: dict, rollouts: int, new_tokens: int) -> dict:
    if "error" in res:
        return {"run": run, **res}
    later = res["iteration_s"][1:] or res["iteration_s"]
    it = statistics.median(later)
    out = {"run": run, "iteration_s": it, "peak_gb": res["peak_bytes"] / 1e9, "rollouts": rollouts}
    if "generate_s" in res:
        k = len(res["iteration_s"]) - len(later)
        for part in ("generate_s", "score_s", "train_s"):
            out[part] = statistics.median(res[part][k:])
        out["gen_tok_s"] = rollouts * new_tokens / out["generate_s"]
    else:
        out["gen_tok_s"] = rollouts * new_tokens / it  # an upper bound on RLOO's generation speed
    out["length"] = res["length"][-1] if res.get("length") else None
    return out


def table(rows: list[dict]) -> str:
    ref = next((r for r in rows if r["run"] == "trl-rloo" and "iteration_s" in r), None)
    lines = ["| run | rollouts | s / iteration | generate s | score s | train s | generated tokens/s | peak GB | "
             "time vs RLOO | peak vs RLOO |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | | error: {r['error']} | | | | | | | |")
            continue
        part = lambda k: f"{r[k]:.2f}" if k in r else ""  # noqa: E731
        vs = (f"{r['iteration_s'] / ref['iteration_s']:.2f}x", f"{r['peak_gb'] / ref['peak_gb']:.2f}x") \
            if ref and r is not ref and r["rollouts"] == ref["rollouts"] else ("", "")
        lines.append(f"| {r['run']} | {r['rollouts']} | {r['iteration_s']:.2f} | {part('generate_s')} | "
                     f"{part('score_s')} | {part('train_s')} | {r['gen_tok_s']:,.0f} | {r['peak_gb']:.1f} | "
                     f"{vs[0]} | {vs[1]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/bench_ppo")
    ap.add_argument("--shape", default="0.5B", help="the shape of the trl-rloo and rlhf-ppo runs (tiny: CPU check)")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated, of " + ",".join(RUNS))
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--engine", default="auto", help="ppo.engine of our runs")
    ap.add_argument("--compile-layers", action="store_true", help="model.compile_layers: true in our runs")
    ap.add_argument("--timeout", type=int, default=400, help="seconds per run")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))
    import torch

    cuda = torch.cuda.is_available()
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for run in a.runs.split(","):
        big = run == "rlhf-ppo-1.5b-512"
        shape = "1.5B" if big else a.shape
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); "
                        f"from benchmarks.bench_train import build_models; build_models({shape!r}, {a.out!r})"],
                       env=env, check=True)
        prompts, samples = (512, 1) if big else (16, 4)
        spec = {"run": run, "models": build_models(shape, a.out), "cuda": cuda, "prompts": prompts,
                "samples": samples, "iterations": a.iterations, "prompt_len": a.prompt_len,
                "new_tokens": a.new_tokens, "data": write_prompts(prompts, a.prompt_len, a.out),
                "micro": 16, "rollout_micro": 64, "engine": a.engine, "compile_layers": a.compile_layers,
                "run_dir": os.path.join(a.out, run)}
        t0 = time.time()
        res = summarize(run, measure(spec, a.timeout, script=__file__), prompts * samples, a.new_tokens)
        print(f"{run}: {json.dumps(res)} (wall {time.time() - t0:.0f} s)", flush=True)
        rows.append(res)
    write_table(table(rows), a.out)


if __name__ == "__main__":
    main()
