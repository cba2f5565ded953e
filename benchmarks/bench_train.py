"""SFT, reward-model and DPO training throughput, peak memory and loss: rlhf next to TRL (with and without Liger),
on the same random-init Qwen2.5-shaped models, rows, batch, precision and lengths, on one GPU, in one command.

    python benchmarks/bench_train.py --out /tmp/bench_train                       # everything (~15 min on an H200)
    python benchmarks/bench_train.py --shapes 0.5B --steps 4 --trainers rlhf-dpo,trl-dpo   # a quick smoke run

Models: Qwen2Config with the real shapes of Qwen2.5-0.5B and 1.5B (vocabulary 151,936, tied embeddings), random
weights drawn once per shape and saved with save_pretrained, bf16 weights; a causal LM and a sequence-classification
copy of the same body with one fixed score head, so every reward trainer starts from the same head. The tokenizer is
word-level over "t0".."t31999": every word is one token, so lengths are exact.
Workloads: `fixed` = every pair 256 prompt + 256 chosen + 256 rejected tokens; `variable` = lengths drawn from
lognormals (prompt median 150, responses median 250, tails to ~1,000), cut so prompt + response + EOS <= 1,024.
Batch: 8 pairs per step for DPO and the reward model; 16 rows per step for SFT (prompt + chosen and prompt + rejected
of the same 8 pairs). No gradient checkpointing, bf16, constant learning rate, no shuffling (TRL: sequential
sampler), so every trainer sees the same rows in the same order.
Measured: tokens/s = real tokens (prompt + chosen + rejected words, + one EOS per response) of the steps after the
warm-up, over their step time (CUDA-synchronized); rlhf's DPO with `reference: precomputed` also pays the
precompute time (its steady-state per-batch time: the first batch's warm-up and any later compile left out, like the
warm-up steps; the compile seconds are reported apart), in proportion to the steps counted. With --profile the
profiled steps are left out of tokens/s too.
Steady tokens/s: the same over the counted steps that took at most 3x their median (a compile, or a first meeting of
a new padded length, left out for every trainer alike), with how many were left out. Peak = torch.cuda.max_memory_allocated over the whole run, each
trainer in its own process. Loss = the last step's training loss.
rlhf runs with its Trainer's optimizer (AdamW, fused on CUDA); checkpoint and final export are skipped (not timed
either way).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = 32000
SHAPES = {  # Qwen2.5 configs (hidden, layers, heads, kv heads, intermediate)
    "0.5B": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864),
    "1.5B": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128),  # for checking the script on a CPU
}
TRAINERS = ["rlhf-sft", "trl-sft", "trl-sft-liger", "rlhf-reward", "trl-reward", "trl-reward-liger",
            "rlhf-dpo", "trl-dpo", "trl-dpo-liger"]
# An rlhf trainer name may end in variant suffixes, each setting one model option over the defaults:
VARIANTS = {
    "padded": {"pair_packing": "padded"},  # one row per pair, dense 4D mask (what the default, auto, does with
    # equal-length pairs; with pairs of different lengths it lays them out as flex does)
    "varlen": {"pair_packing": "varlen"},  # every micro-batch flat, through torch's varlen flash attention
    "flex": {"pair_packing": "flex"},  # every pair of a micro-batch in one unpadded row, FlexAttention block mask
    "nofused": {"fused_layers": False},  # the model's own MLP (and LoRA) layers instead of rlhf's fused ones
    "noliger": {"liger_kernels": False},
    "compile": {"compile_layers": True},  # torch.compile per decoder layer (Liger's kernels then off)
    "graphs": {"compile_layers": True, "compile_mode": "reduce-overhead"},  # compiled layers in CUDA graphs
    "chunk512": {"logprob_chunk_size": 512},  # LM-head chunks of 512 tokens instead of 1,024
}
MAX_LENGTH = 1024
LR = 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# Models, tokenizer and rows
# ---------------------------------------------------------------------------------------------------------------------


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + [f"t{i}" for i in range(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_models(shape: str, out: str) -> dict:
    """{'lm': folder, 'rm': folder} for `shape`, built on the GPU once and reused."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    # the tokenizer has a folder of its own: next to a qwen2 config.json, AutoTokenizer would load it as a Qwen2
    # (byte-level BPE) tokenizer and drop the word-level model
    paths = {"lm": os.path.join(out, f"qwen2-{shape}"), "rm": os.path.join(out, f"qwen2-{shape}-rm"),
             "tokenizer": os.path.join(out, "tokenizer")}
    if all(os.path.exists(os.path.join(p, "config.json")) for p in paths.values()):
        return paths
    tok = build_tokenizer()
    cfg = Qwen2Config(vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                      rope_theta=1000000.0, rms_norm_eps=1e-6, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, num_labels=1, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        lm = Qwen2ForCausalLM._from_config(cfg, dtype=torch.bfloat16)
        rm = Qwen2ForSequenceClassification._from_config(cfg, dtype=torch.bfloat16)
    rm.model.load_state_dict(lm.model.state_dict())
    lm.save_pretrained(paths["lm"])
    rm.save_pretrained(paths["rm"])
    tok.save_pretrained(paths["tokenizer"])
    return paths


def draw_lengths(workload: str, n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) word counts of n pairs; each response gets one EOS on top."""
    if workload == "fixed":
        return [(256, 256, 256)] * n
    rng = random.Random(seed)

    def lognormal(median: float, sigma: float, cap: int) -> int:
        return max(8, min(cap, round(math.exp(math.log(median) + sigma * rng.gauss(0, 1)))))
    out = []
    for _ in range(n):
        p = lognormal(150, 0.8, 1000)  # P(prompt > 1,000) ~ 1%
        room = MAX_LENGTH - p - 1  # the EOS
        out.append((p, min(lognormal(250, 0.6, 1000), room), min(lognormal(250, 0.6, 1000), room)))
    return out


def write_prompts(n: int, words: int, out: str, seed: int = 2) -> str:
    """n prompt rows of `words` random words (one token each) in a JSONL file, for the PPO benchmarks."""
    rng = random.Random(seed)
    path = os.path.join(out, f"prompts-{n}x{words}.jsonl")
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": " ".join(f"t{rng.randrange(WORDS)}" for _ in range(words))}) + "\n")
    return path


def write_rows(lengths, out: str, seed: int = 1) -> str:
    rng = random.Random(seed)

    def words(n):
        return " ".join(f"t{rng.randrange(WORDS)}" for _ in range(n))
    path = os.path.join(out, "pairs.jsonl")
    with open(path, "w") as f:
        for p, c, r in lengths:
            # responses start with a space: TRL tokenizes prompt + completion as one string
            f.write(json.dumps({"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)}) + "\n")
    return path


def step_tokens(kind: str, lengths, batch_pairs: int, steps: int) -> list[int]:
    """Real tokens of each step: prompt + chosen + rejected (+ EOS each); SFT rows count their prompt twice."""
    per_pair = [(2 * p if kind == "sft" else p) + c + r + 2 for p, c, r in lengths]
    return [sum(per_pair[s * batch_pairs:(s + 1) * batch_pairs]) for s in range(steps)]


# ---------------------------------------------------------------------------------------------------------------------
# Workers: one trainer in this process
# ---------------------------------------------------------------------------------------------------------------------


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_bytes() -> int:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def profile_steps(trainer_cls, path: str, first: int = 3, count: int = 3) -> list[int]:
    """Write torch.profiler's top CUDA ops over optimizer steps first .. first + count - 1 (where time goes) to
    `path`; returns those steps' 0-based indices, which the profiler slows and tokens/s leaves out."""
    import torch

    step = trainer_cls._optimizer_step
    state = {"n": 0}

    def profiled(self, *a, **k):
        state["n"] += 1
        if state["n"] == first:
            state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
            state["prof"].__enter__()
        out = step(self, *a, **k)
        if state["n"] == first + count - 1 and "prof" in state:
            sync()
            state["prof"].__exit__(None, None, None)
            with open(path, "w") as f:
                f.write(state["prof"].key_averages().table(sort_by="cuda_time_total", row_limit=30,
                                                           max_name_column_width=70))
        return out
    trainer_cls._optimizer_step = profiled
    return list(range(first - 1, first - 1 + count))


def variant_options(name: str) -> dict:
    """The model options of an rlhf trainer name's suffixes: rlhf-dpo-flex-nofused -> pair_packing flex, no fusing."""
    out = {}
    for part in name.split("-")[2:]:
        if part not in VARIANTS:
            raise SystemExit(f"trainer {name!r}: unknown variant {part!r}; known: {', '.join(VARIANTS)}")
        out.update(VARIANTS[part])
    return out


def precompute_time(batches: list[tuple[float, int]]) -> dict:
    """The reference precompute's steady-state seconds for all its (seconds, tokens) batches: all its tokens at the
    throughput of its batches after the first, leaving out those over 4x their median seconds per token as compiles
    (the first batch, and FlexAttention's second compile when a second length makes it length-generic), which the
    warm-up steps leave out of every trainer's figure as well. Batches are sorted longest first, so their sizes differ:
    hence per token, not per batch."""
    seconds = [s for s, _ in batches]
    if len(batches) < 2:
        return {"precompute_s": sum(seconds), "compile_s": 0.0, "precompute_batches_s": seconds}
    cut = 4 * statistics.median(s / n for s, n in batches[1:])
    steady = [(s, n) for s, n in batches[1:] if s / n <= cut]
    steady_s = sum(n for _, n in batches) * sum(s for s, _ in steady) / sum(n for _, n in steady)
    return {"precompute_s": steady_s, "compile_s": sum(seconds) - steady_s, "precompute_batches_s": seconds}


def run_rlhf(spec: dict) -> dict:
    import torch

    from rlhf import Trainer
    from rlhf.algorithms.dpo import DPO
    from rlhf.config import config_from_dict

    Trainer.save_checkpoint = lambda self: None  # writing GBs of weights is neither measured nor needed
    Trainer.save_final = lambda self: None
    # The precompute's micro-batches are timed one by one: its first one also pays the process's one-time warm-up
    # (CUDA context, Triton compiles), which TRL pays in its first steps, and that is left out as they are.
    batches, scoring = [], []
    table, forward = DPO.reference_table, DPO.forward

    def timed_forward(self, model, batch):
        if not scoring:
            return forward(self, model, batch)
        sync()
        t0 = time.perf_counter()
        out = forward(self, model, batch)
        sync()
        batches.append((time.perf_counter() - t0, int(batch.attention_mask.sum())))
        return out

    def timed_table(self, model):
        scoring.append(True)
        try:
            return table(self, model)
        finally:
            scoring.clear()
    DPO.forward, DPO.reference_table = timed_forward, timed_table
    profiled = profile_steps(Trainer, os.path.join(spec["run_dir"], "profile.txt")) if spec.get("profile") else []

    kind, B = spec["kind"], spec["pairs"]
    data = spec["data"]
    if kind == "sft":  # prompt + chosen and prompt + rejected rows, in pair order
        data = os.path.join(spec["run_dir"], "sft.jsonl")
        with open(spec["data"]) as f, open(data, "w") as g:
            for line in f:
                row = json.loads(line)
                for key in ("chosen", "rejected"):
                    g.write(json.dumps({"prompt": row["prompt"], "response": row[key]}) + "\n")
    batch = 2 * B if kind == "sft" else B
    cfg = {
        "algorithm": {"sft": "sft", "reward": "reward", "dpo": "dpo"}[kind], "seed": 0, "mixed_precision": "bf16",
        "model": {"name_or_path": spec["models"]["rm" if kind == "reward" else "lm"], "dtype": "bfloat16",
                  "tokenizer": spec["models"]["tokenizer"],
                  **variant_options(spec.get("trainer", ""))},
        "data": {"train": data, "max_length": MAX_LENGTH, "max_prompt_length": MAX_LENGTH - 1, "shuffle": False},
        "optim": {"lr": LR, "batch_size": batch, "micro_batch_size": batch, "max_steps": spec["steps"],
                  "scheduler": "constant", "warmup_ratio": 0.0, "max_grad_norm": 1.0},
        "logging": {"output_dir": spec["run_dir"], "run_name": "run", "progress": False, "log_every": 1},
    }
    if kind == "dpo":
        cfg["dpo"] = {"beta": 0.1, "reference": "precomputed"}
    if kind == "reward":
        cfg["reward"] = {"normalize": False}
    shutil.rmtree(os.path.join(spec["run_dir"], "run"), ignore_errors=True)  # a rerun into the same --out
    trainer = Trainer(config_from_dict(cfg))
    full_collections = gc_pauses()
    trainer.train()
    records = [json.loads(line) for line in open(os.path.join(spec["run_dir"], "run", "metrics.jsonl"))]
    steps = [r for r in records if "time/step_s" in r]
    from torch._dynamo.utils import counters

    return {"step_s": [r["time/step_s"] for r in steps], "loss": [r["train/loss"] for r in steps],
            **precompute_time(batches), "profiled": profiled, "peak_bytes": peak_bytes(),
            "gc_full_s": full_collections, "compiled_graphs": counters["stats"]["unique_graphs"]}


def gc_pauses() -> list:
    """A list that collects the duration of every full (generation 2) garbage collection from now on: what a step
    that takes far longer than its neighbours may have spent there."""
    import gc

    pauses, start = [], [0.0]

    def record(phase, info):
        if info["generation"] == 2:
            if phase == "start":
                start[0] = time.perf_counter()
            else:
                pauses.append(round(time.perf_counter() - start[0], 4))
    gc.callbacks.append(record)
    return pauses


def run_trl(spec: dict) -> dict:
    import dataclasses

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    kind, B, liger = spec["kind"], spec["pairs"], spec["liger"]
    rows = [json.loads(line) for line in open(spec["data"])]
    common = dict(output_dir=os.path.join(spec["run_dir"], "trl"), gradient_accumulation_steps=1,
                  max_steps=spec["steps"], learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                  weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none",
                  bf16=True, gradient_checkpointing=False, disable_tqdm=True, seed=0, use_liger_kernel=liger,
                  dataloader_num_workers=0, model_init_kwargs={"dtype": torch.bfloat16}, max_length=MAX_LENGTH)
    if kind == "sft":
        from trl import SFTConfig as Config, SFTTrainer as TrainerCls

        data = Dataset.from_list([{"prompt": r["prompt"], "completion": r[k]} for r in rows
                                  for k in ("chosen", "rejected")])
        common["per_device_train_batch_size"] = 2 * B
    elif kind == "reward":
        from trl import RewardConfig as Config, RewardTrainer as TrainerCls

        data = Dataset.from_list(rows)
        common["per_device_train_batch_size"] = B
        # a scalar-head model has no LM head for Liger's fused loss to replace: its layer kernels only
        common["liger_kernel_config"] = {"fused_linear_cross_entropy": False, "cross_entropy": False}
    else:
        from trl import DPOConfig as Config, DPOTrainer as TrainerCls

        data = Dataset.from_list(rows)
        common.update(per_device_train_batch_size=B, beta=0.1)
    if not torch.cuda.is_available():  # checking the script on a CPU
        common.update(bf16=False, use_cpu=True)
    names = {f.name for f in dataclasses.fields(Config)}
    if "train_sampling_strategy" in names:
        common["train_sampling_strategy"] = "sequential"
    args = Config(**{k: v for k, v in common.items() if k in names})
    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            times.append(time.perf_counter() - self.t0)

    model = spec["models"]["rm" if kind == "reward" else "lm"]
    tok = AutoTokenizer.from_pretrained(spec["models"]["tokenizer"])
    trainer = TrainerCls(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[StepTimer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_s": times, "loss": losses, "precompute_s": 0.0, "peak_bytes": peak_bytes()}


def worker(spec: dict) -> None:
    os.makedirs(spec["run_dir"], exist_ok=True)
    out = run_rlhf(spec) if spec["trainer"].startswith("rlhf") else run_trl(spec)
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------------


def write_table(md: str, out: str) -> None:
    """Print a markdown table and write it to <out>/table.md."""
    print(md)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(md + "\n")


def measure(spec: dict, timeout: int, script: str = __file__) -> dict:
    """Run `script --worker spec` in a fresh process (its own CUDA context and peak memory); its RESULT line."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stdout[-1500:] + "\n" + proc.stderr[-3000:]).strip()
        print(tail, file=sys.stderr)
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1][:200]}
    out = json.loads(lines[-1][7:])
    out["wall_s"] = time.time() - t0
    return out


def summarize(res: dict, tokens: list[int], warmup: int) -> dict:
    if "error" in res:
        return res
    n = len(res["step_s"])
    counted = [i for i in range(min(warmup, n - 1), n) if i not in res.get("profiled", ())]

    def tok_s(steps: list[int]) -> float:
        seconds = sum(res["step_s"][i] for i in steps) + res["precompute_s"] * len(steps) / n
        return sum(tokens[i] for i in steps) / max(seconds, 1e-9)
    # steady: the counted steps without stalls (over 3x their median: a compile, a first meeting of a new length),
    # what a long run converges to if those do not recur; tok_s is end to end over the counted steps
    cut = 3 * statistics.median(res["step_s"][i] for i in counted)
    steady = [i for i in counted if res["step_s"][i] <= cut]
    return {**res, "tok_s": tok_s(counted), "steady_tok_s": tok_s(steady), "stalled_steps": len(counted) - len(steady),
            "peak_gb": res["peak_bytes"] / 1e9, "final_loss": res["loss"][-1] if res["loss"] else float("nan")}


def table(results: list[dict]) -> str:
    lines = ["| workload | shape | trainer | tokens/s | peak GB | loss at last step | tokens/s vs best TRL | peak vs best TRL "
             "| steady tokens/s (stalled steps left out) | steady vs best TRL |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['shape']} | {r['trainer']} | error: {r['error']} | | | | | | |")
            continue
        peers = [p for p in results if p.get("kind") == r["kind"] and p["shape"] == r["shape"]
                 and p["workload"] == r["workload"] and p["trainer"].startswith("trl") and "tok_s" in p]
        best = max(peers, key=lambda p: p["tok_s"]) if peers else None
        ratio = f"{r['tok_s'] / best['tok_s']:.2f}x ({best['trainer']})" if best else ""
        mem = f"{r['peak_gb'] / best['peak_gb']:.2f}x" if best and best["peak_gb"] else ""
        steady = max(peers, key=lambda p: p["steady_tok_s"]) if peers else None
        steady_ratio = f"{r['steady_tok_s'] / steady['steady_tok_s']:.2f}x ({steady['trainer']})" if steady else ""
        lines.append(f"| {r['workload']} | {r['shape']} | {r['trainer']} | {r['tok_s']:,.0f} | {r['peak_gb']:.1f} | "
                     f"{r['final_loss']:.5f} | {ratio} | {mem} | {r['steady_tok_s']:,.0f} ({r['stalled_steps']}) | "
                     f"{steady_ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/bench_train", help="folder for models, data, runs and the table")
    ap.add_argument("--shapes", default="0.5B,1.5B", help=f"comma-separated, of {','.join(SHAPES)}")
    ap.add_argument("--workloads", default="fixed,variable", help="comma-separated: fixed, variable")
    ap.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated, of " + ",".join(TRAINERS))
    ap.add_argument("--variable-trainers", default="rlhf-dpo,rlhf-dpo-padded,trl-dpo,trl-dpo-liger",
                    help="the trainers that also run the variable workload")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s")
    ap.add_argument("--pairs", type=int, default=8, help="pairs per step (SFT: twice as many rows)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per trainer run")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of rlhf's steps 3-5")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    os.makedirs(args.out, exist_ok=True)
    trainers = args.trainers.split(",")
    results = []
    for shape in args.shapes.split(","):
        t0 = time.time()
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); "
                        f"from benchmarks.bench_train import build_models; build_models({shape!r}, {args.out!r})"],
                       env=env, check=True)
        models = build_models(shape, args.out)
        print(f"models {shape}: {time.time() - t0:.0f} s", flush=True)
        for workload in args.workloads.split(","):
            lengths = draw_lengths(workload, args.steps * args.pairs)
            wdir = os.path.join(args.out, f"{shape}-{workload}")
            os.makedirs(wdir, exist_ok=True)
            data = write_rows(lengths, wdir)
            for name in trainers:
                if workload != "fixed" and name not in args.variable_trainers.split(","):
                    continue
                kind = name.split("-")[1]
                spec = {"trainer": name, "kind": kind, "liger": name.startswith("trl") and name.endswith("liger"), "steps": args.steps,
                        "pairs": args.pairs, "data": data, "models": models,
                        "run_dir": os.path.join(wdir, name), "profile": args.profile}
                res = summarize(measure(spec, args.timeout), step_tokens(kind, lengths, args.pairs, args.steps),
                                args.warmup)
                res.update(trainer=name, kind=kind, shape=shape, workload=workload)
                results.append(res)
                brief = ("error: " + res["error"]) if "error" in res else (
                    f"{res['tok_s']:,.0f} tok/s, peak {res['peak_gb']:.1f} GB, loss {res['final_loss']:.5f}, "
                    f"wall {res['wall_s']:.0f} s, steps {[round(x, 3) for x in res['step_s']]}, "
                    f"precompute {res.get('precompute_s', 0):.2f} s (+ {res.get('compile_s', 0):.1f} s compiling), "
                    f"full collections {res.get('gc_full_s', [])}")
                print(f"{shape} {workload} {name}: {brief}", flush=True)
                with open(os.path.join(args.out, "results.json"), "w") as f:
                    json.dump(results, f, indent=1)
    write_table(table(results), args.out)


if __name__ == "__main__":
    main()
