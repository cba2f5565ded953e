"""LoRA at 7B on one GPU: shared-base PPO (memory and where the time goes), LoRA DPO next to TRL, full fine-tuning PPO
next to shared-base LoRA PPO at 1.5B, and the rollout engine's speed with and without LoRA adapters.

    python benchmarks/bench_lora.py --out /tmp/bench_lora                  # 7B and 1.5B rows (an H200, ~25 min)
    python benchmarks/bench_lora.py --shapes 1.5b --rows ppo-shared,gen     # some rows
    python benchmarks/bench_lora.py --tiny                                   # every row on a CPU, a tiny shape (<2 min)

Models: Qwen2.5 shapes from benchmarks/bench_rollout.SHAPES (7B: vocabulary 152,064, hidden 3,584, 28 layers,
intermediate 18,944, 28 heads, 4 KV heads; 1.5B: vocabulary 151,936, hidden 1,536, 28 layers, intermediate 8,960,
12 heads, 2 KV heads, tied embeddings), random init, saved in bf16 with save_pretrained next to bench_train's
word-level tokenizer (every word one token, so lengths are exact). Random weights almost never sample EOS: every
response runs to --new-tokens.
Rows (each in its own process: its own CUDA context, its own peak; one failing row prints its error and the others
still run):
  ppo-shared  PPO with ppo.shared_base, LoRA r=16 all-linear, EMA reference adapter (ref_ema 0.001), --rollouts
              rollouts of --new-tokens from --prompt-len-token prompts, --iterations iterations, 4 minibatches;
              time/generate_s, time/score_s, time/train_s of the last iteration, peak GPU memory
  ppo-full    the same PPO with full fine-tuning (policy, critic and reference: three whole models) -- --full-shapes
  dpo-rlhf    rlhf DPO, LoRA r=16 all-linear, dpo.reference adapter, 8 pairs x (256 prompt + 256 + 256) tokens
  dpo-trl     TRL's DPOTrainer with the same peft LoraConfig (its reference: the adapter-disabled model), same rows
  gen         the static engine (CUDA graph) generating --rollouts x --new-tokens with the bare model, then with the
              same model wrapped with a LoRA r=16 adapter (unmerged, as PPO's actor generates), its adapters grouped
              (the engine's default) and per module (group_lora=False): tokens/s and ratios
Prints a markdown table and writes it, with results.json, to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_rollout import SHAPES as ROLLOUT_SHAPES  # noqa: E402
from benchmarks.bench_train import (build_tokenizer, draw_lengths, measure, peak_bytes, step_tokens,  # noqa: E402
                                    summarize, sync, write_prompts, write_rows, write_table)

SHAPES = {**ROLLOUT_SHAPES,
          "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, tie_word_embeddings=True, vocab_size=40000)}
ROWS = ["ppo-shared", "ppo-full", "dpo-rlhf", "dpo-trl", "gen"]
LORA = {"lora_r": 16, "lora_alpha": 32, "lora_target_modules": "all-linear"}


def random_reward(prompts, completions, **columns):
    """A cheap deterministic score (the benchmark measures speed and memory, not learning)."""
    return [(len(c) % 13) / 13.0 for c in completions]


# ---------------------------------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------------------------------


def build_folder(shape: str, out: str) -> dict:
    """{'lm': model folder, 'tokenizer': tokenizer folder} of `shape`, built once (random init, bf16)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    paths = {"lm": os.path.join(out, f"qwen2-{shape}"), "tokenizer": os.path.join(out, "tokenizer")}
    if all(os.path.exists(os.path.join(p, "config.json")) or os.path.exists(os.path.join(p, "tokenizer.json"))
           for p in paths.values()):
        return paths
    tok = build_tokenizer()
    kw = dict(SHAPES[shape])
    kw.setdefault("vocab_size", 151936)
    cfg = Qwen2Config(**kw, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        lm = Qwen2ForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    lm.save_pretrained(paths["lm"])
    tok.save_pretrained(paths["tokenizer"])
    del lm
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Workers: one row in this process
# ---------------------------------------------------------------------------------------------------------------------


def _no_saving():
    from rlhf import Trainer

    Trainer.save_checkpoint = lambda self: None  # writing GBs of weights is neither measured nor needed
    Trainer.save_final = lambda self: None


def run_ppo(spec: dict) -> dict:
    import torch

    from rlhf import Trainer
    from rlhf.config import config_from_dict

    _no_saving()
    gpu = torch.cuda.is_available()
    P, N, n = spec["prompt_len"], spec["new_tokens"], spec["rollouts"]
    shared = spec["job"] == "ppo-shared"
    cfg = {
        "algorithm": "ppo", "seed": 0, "mixed_precision": "bf16" if gpu else "no",
        "model": {"name_or_path": spec["models"]["lm"], "tokenizer": spec["models"]["tokenizer"],
                  "dtype": "bfloat16" if gpu else "float32",
                  "gradient_checkpointing": spec["grad_ckpt"], **(LORA if shared else {})},
        "data": {"train": spec["prompts"], "max_length": P + N, "max_prompt_length": P, "shuffle": False},
        "optim": {"lr": 1e-6, "scheduler": "constant", "warmup_ratio": 0.0, "max_grad_norm": 1.0},
        "logging": {"output_dir": spec["run_dir"], "run_name": "run", "progress": False, "log_every": 1},
        "ppo": {"shared_base": shared, "ref_ema": 0.001, "reward_fns": ["benchmarks.bench_lora:random_reward"],
                "critic_init": "policy", "critic_lr": 1e-6, "iterations": spec["iterations"],
                "rollout_batch_size": n, "num_minibatches": 4, "micro_batch_size": spec["micro_batch"],
                "rollout_micro_batch_size": spec["score_batch"], "max_new_tokens": N, "on_truncated": "score"},
    }
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(config_from_dict(cfg))
    trainer.train()
    records = [json.loads(line) for line in open(os.path.join(spec["run_dir"], "run", "metrics.jsonl"))]
    its = [r for r in records if "time/generate_s" in r]
    last = its[-1]
    train = [r["time/train_s"] for r in records if "time/train_s" in r][-1]
    trainable = sum(q.numel() for q in trainer.model.parameters() if q.requires_grad)
    return {"generate_s": last["time/generate_s"], "score_s": last["time/score_s"], "train_s": train,
            "gen_tok_s": n * last["response/length_mean"] / last["time/generate_s"],
            "trainable": trainable, "peak_bytes": peak_bytes()}


def run_dpo(spec: dict) -> dict:
    """bench_train's own rlhf / TRL DPO workers, with LoRA r=16 all-linear switched on in each."""
    from benchmarks import bench_train

    if spec["job"] == "dpo-rlhf":
        import rlhf.config

        plain = rlhf.config.config_from_dict

        def with_lora(values):
            values["model"].update(LORA)
            values["dpo"]["reference"] = "adapter"  # the adapter-disabled policy: no second copy
            return plain(values)
        rlhf.config.config_from_dict = with_lora
        return bench_train.run_rlhf(spec)
    import trl
    from peft import LoraConfig

    peft_config = LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], target_modules="all-linear",
                             lora_dropout=0.0, task_type="CAUSAL_LM")
    trl.DPOTrainer = functools.partial(trl.DPOTrainer, peft_config=peft_config)
    return bench_train.run_trl(spec)


def time_generation(model, tok, prompts, new_tokens: int, group_lora: bool = True) -> float:
    """Seconds of one static-engine generation of every prompt, after one warm-up call at the same shapes."""
    from rlhf.rollout import SamplingConfig, StaticEngine

    import torch

    s = SamplingConfig(max_new_tokens=new_tokens, top_k=200, top_p=0.9)  # PPO's defaults
    seeds = list(range(len(prompts)))
    gpu = torch.cuda.is_available()

    def call():  # under bf16 autocast, as PPO generates (peft keeps the adapters in float32)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
            return StaticEngine(group_lora=group_lora).generate(model, tok, prompts, s, batch_size=64, seeds=seeds)
    call()
    sync()
    t0 = time.perf_counter()
    call()
    sync()
    return time.perf_counter() - t0


def run_gen(spec: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.models.adapters import using_adapter

    gpu = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(spec["models"]["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(spec["models"]["lm"], dtype=torch.bfloat16 if gpu else torch.float32)
    model.to("cuda" if gpu else "cpu").eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 32000, (spec["rollouts"], spec["prompt_len"]), generator=g).tolist()
    N = spec["new_tokens"]
    bare = time_generation(model, tok, prompts, N)
    lm = get_peft_model(model, LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], lora_dropout=0.0,
                                          target_modules=LORA["lora_target_modules"], task_type="CAUSAL_LM"),
                        adapter_name="actor").eval()
    with torch.no_grad():  # B != 0, as for a trained actor (the cost is the same either way)
        for n, q in lm.named_parameters():
            if "lora_B" in n:
                q.normal_(0.0, 1e-3)
    with using_adapter(lm, "actor"):
        lora = time_generation(lm, tok, prompts, N)
        ungrouped = time_generation(lm, tok, prompts, N, group_lora=False) if spec.get("ungrouped") else None
    tokens = len(prompts) * N
    # ratio: LoRA tokens/s over bare tokens/s (= bare seconds over LoRA seconds)
    out = {"bare_tok_s": tokens / bare, "lora_tok_s": tokens / lora, "ratio": bare / lora, "peak_bytes": peak_bytes()}
    if ungrouped:
        out.update(ungrouped_tok_s=tokens / ungrouped, ungrouped_ratio=bare / ungrouped)
    return out


def worker(spec: dict) -> None:
    os.makedirs(spec["run_dir"], exist_ok=True)
    job = spec["job"]
    out = run_ppo(spec) if job.startswith("ppo") else run_dpo(spec) if job.startswith("dpo") else run_gen(spec)
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------------


def describe(r: dict) -> str:
    """One markdown row."""
    head = f"| {r['shape']} | {r['job']}{' (' + r['variant'] + ')' if r.get('variant') else ''} |"
    if "error" in r:
        return head + f" error: {r['error']} | | | | | |"
    peak = f"{r.get('peak_bytes', 0) / 1e9:.1f}"
    if r["job"].startswith("ppo"):
        return head + (f" {peak} | {r['generate_s']:.1f} / {r['score_s']:.1f} / {r['train_s']:.1f} | "
                       f"{r['gen_tok_s']:,.0f} gen | trainable {r['trainable'] / 1e6:,.1f} M | |")
    if r["job"].startswith("dpo"):
        return head + f" {peak} | | {r['tok_s']:,.0f} train | loss {r['final_loss']:.5f} | |"
    per_module = (f", {r['ungrouped_tok_s']:,.0f} LoRA per module" if "ungrouped_tok_s" in r else "",
                  f", {r['ungrouped_ratio']:.2f}x per module" if "ungrouped_ratio" in r else "")
    return head + (f" {peak} | | {r['bare_tok_s']:,.0f} bare, {r['lora_tok_s']:,.0f} LoRA grouped{per_module[0]} | "
                   f"LoRA / bare tokens/s {r['ratio']:.2f}x grouped{per_module[1]} | |")


def table(results: list[dict]) -> str:
    lines = ["| shape | row | peak GB | generate / score / train s (last iteration) | tokens/s | note | |",
             "|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [describe(r) for r in results])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/bench_lora", help="folder for models, data, runs and the table")
    ap.add_argument("--shapes", default="7b,1.5b", help=f"comma-separated, of {','.join(SHAPES)}")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated, of " + ",".join(ROWS))
    ap.add_argument("--full-shapes", default="1.5b", help="shapes that also run ppo-full (full fine-tuning PPO)")
    ap.add_argument("--rollouts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=8, help="PPO training sequences per forward")
    ap.add_argument("--score-batch", type=int, default=16, help="PPO scoring sequences per forward")
    ap.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in PPO")
    ap.add_argument("--dpo-steps", type=int, default=8)
    ap.add_argument("--dpo-variant", default="",
                    help="bench_train variant suffixes for the dpo-rlhf row, e.g. varlen-compile (model options)")
    ap.add_argument("--gen-per-module", action="store_true",
                    help="the gen row also times LoRA through each projection's own peft forward (a third compile)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per row")
    ap.add_argument("--tiny", action="store_true", help="every row on a CPU with a tiny shape (checks the script)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))
    if a.tiny:
        a.shapes, a.full_shapes, a.rollouts, a.prompt_len, a.new_tokens = "tiny", "tiny", 8, 16, 8
        a.dpo_steps, a.micro_batch, a.score_batch, a.iterations = 3, 2, 8, 1
    os.makedirs(a.out, exist_ok=True)
    results = []
    for shape in a.shapes.split(","):
        try:
            t0 = time.time()
            models = build_folder(shape, a.out)
            print(f"model {shape}: {time.time() - t0:.0f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on with the next shape
            results.append({"shape": shape, "job": "build", "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"{shape}: building the model failed: {e}", flush=True)
            continue
        prompts = write_prompts(a.rollouts, a.prompt_len, a.out)
        pairs = 8
        lengths = draw_lengths("fixed", a.dpo_steps * pairs)
        if a.tiny:
            lengths = [(16, 16, 16)] * len(lengths)
        pair_rows = write_rows(lengths, a.out)
        for job in a.rows.split(","):
            if job == "ppo-full" and shape not in a.full_shapes.split(","):
                continue
            spec = {"job": job, "models": models, "run_dir": os.path.join(a.out, f"{shape}-{job}"),
                    "prompts": prompts, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                    "rollouts": a.rollouts, "iterations": a.iterations, "micro_batch": a.micro_batch,
                    "score_batch": a.score_batch, "grad_ckpt": a.grad_ckpt, "ungrouped": a.gen_per_module,
                    # bench_train's DPO workers
                    "kind": "dpo", "pairs": pairs, "steps": a.dpo_steps, "data": pair_rows, "liger": False,
                    "profile": False, "trainer": "-".join(["rlhf-dpo"] + ([a.dpo_variant] if a.dpo_variant else []))}
            try:
                res = measure(spec, a.timeout, script=__file__)
                if job.startswith("dpo") and "error" not in res:
                    res = summarize(res, step_tokens("dpo", lengths, pairs, a.dpo_steps), warmup=2)
            except Exception as e:  # noqa: BLE001 - one row's failure must not lose the others
                res = {"error": f"{type(e).__name__}: {e}"[:300]}
            res.update(shape=shape, job=job)
            if job == "dpo-rlhf" and a.dpo_variant:
                res["variant"] = a.dpo_variant
            results.append(res)
            print(describe(res), flush=True)
            with open(os.path.join(a.out, "results.json"), "w") as f:
                json.dump(results, f, indent=1)
    write_table(table(results), a.out)


if __name__ == "__main__":
    main()
