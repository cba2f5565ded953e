"""DPO data preparation: rlhf's cached `datasets.map` next to TRL's DPOTrainer dataset preparation, on one file.

    python benchmarks/bench_data.py --rows 100000 --out /tmp/bench_data        # ~10 min on 2 CPU cores
    nice python benchmarks/bench_data.py --rows 1000000 --out /tmp/bench_data  # the full size

Data: N synthetic preference rows {prompt, chosen, rejected} as JSONL, seeded: prompts of 50-70 words, responses of
100-140 words (each starting with a space, as TRL's text rows do), words "t0".."t31999". Tokenizer: word-level over those words (every word one token; built with
`tokenizers`, saved with save_pretrained and loaded with from_pretrained), no chat template.
Measured, each in a fresh child process (`os.wait4` gives its rusage; peak RSS = ru_maxrss, the largest single
process of its tree, so num_proc workers are not summed):
  rlhf  `load_pairs` (rlhf.data.preference): read the JSONL, tokenize through the cached map into the Arrow-backed
        pairs DPO trains on; data.num_proc 1 and 2; cold (empty cache folder) and warm (the same folder again).
  TRL   `datasets.load_dataset("json")` then `DPOTrainer._prepare_dataset` (TRL 1.16: add EOS, tokenize prompt,
        prompt + chosen, prompt + rejected, drop prompts over max_length), called on a stand-in trainer without a
        model; dataset_num_proc 1 and 2; cold (empty datasets cache) and warm.
Both with max_length 512 (nothing is cut: rows have at most 70 + 140 tokens + EOS). Time = wall seconds of the
preparation inside the child (interpreter start and imports excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = 32000
MAX_LENGTH, MAX_PROMPT_LENGTH = 512, 128


def build_tokenizer(out: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if not os.path.exists(os.path.join(out, "tokenizer.json")):
        vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + [f"t{i}" for i in range(WORDS)])}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                unk_token="<unk>").save_pretrained(out)
    return out


def write_rows(path: str, n: int, seed: int = 0) -> str:
    import numpy as np

    if os.path.exists(path):
        return path
    rng = np.random.default_rng(seed)
    words = [f"t{i}" for i in range(WORDS)]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for start in range(0, n, 10_000):
            m = min(10_000, n - start)
            lengths = rng.integers([50, 100, 100], [71, 141, 141], size=(m, 3))
            ids = rng.integers(0, WORDS, size=int(lengths.sum())).tolist()
            lines, pos = [], 0
            for p, c, r in lengths.tolist():
                prompt = " ".join([words[i] for i in ids[pos:pos + p]])
                chosen = " " + " ".join([words[i] for i in ids[pos + p:pos + p + c]])  # TRL joins prompt +
                rejected = " " + " ".join([words[i] for i in ids[pos + p + c:pos + p + c + r]])  # response as text
                pos += p + c + r
                lines.append(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
            f.writelines(lines)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# Children: one preparation each, printing one JSON line
# ----------------------------------------------------------------------------------------------


def child_rlhf(data: str, tokenizer: str, cache: str, num_proc: int) -> dict:
    import datasets  # noqa: F401  imported before the clock starts, as in child_trl
    from transformers import AutoTokenizer

    from rlhf.data import BadRows
    from rlhf.data.preference import PairOptions, load_pairs

    tok = AutoTokenizer.from_pretrained(tokenizer)
    start = time.perf_counter()
    pairs = load_pairs(data, tok, PairOptions(max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH,
                                              num_proc=num_proc, cache_dir=cache), BadRows())
    seconds = time.perf_counter() - start
    last = pairs[len(pairs) - 1]
    return {"seconds": seconds, "pairs": len(pairs),
            "tokens": len(last.prompt_ids) + len(last.chosen_ids) + len(last.rejected_ids)}


def child_trl(data: str, tokenizer: str, cache: str, num_proc: int) -> dict:
    from types import SimpleNamespace

    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    args = DPOConfig(output_dir=os.path.join(cache, "out"), max_length=MAX_LENGTH, dataset_num_proc=num_proc,
                     report_to=[], use_cpu=True, bf16=False)
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=data, split="train", cache_dir=cache)
    ds = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), ds, tok, args, "train")
    seconds = time.perf_counter() - start
    last = ds[len(ds) - 1]
    return {"seconds": seconds, "pairs": len(ds),
            "tokens": len(last["prompt_ids"]) + len(last["chosen_ids"]) + len(last["rejected_ids"])}


CHILDREN = {"rlhf": child_rlhf, "trl": child_trl}


def measure(which: str, data: str, tokenizer: str, cache: str, num_proc: int) -> dict:
    """Run one preparation in a fresh process; its result plus the peak RSS (GiB) of its process tree's largest."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--data", data, "--tokenizer", tokenizer,
           "--cache", cache, "--num-proc", str(num_proc)]
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{which} num_proc={num_proc} failed (status {status})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_gib"] = usage.ru_maxrss / 2**20  # KiB on Linux
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--out", default="/tmp/bench_data")
    ap.add_argument("--num-proc", default="1,2", help="comma-separated num_proc values")
    ap.add_argument("--which", default="rlhf,trl")
    ap.add_argument("--child", choices=list(CHILDREN))
    ap.add_argument("--data")
    ap.add_argument("--tokenizer")
    ap.add_argument("--cache")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args.data, args.tokenizer, args.cache, int(args.num_proc))))
        return
    os.makedirs(args.out, exist_ok=True)
    tokenizer = build_tokenizer(os.path.join(args.out, "tokenizer"))
    start = time.perf_counter()
    data = write_rows(os.path.join(args.out, f"prefs-{args.rows}.jsonl"), args.rows)
    print(f"data: {data} ({os.path.getsize(data) / 2**20:.0f} MiB, written in {time.perf_counter() - start:.0f} s)",
          flush=True)
    rows = []
    for n in (int(v) for v in args.num_proc.split(",")):
        for which in args.which.split(","):
            cache = os.path.join(args.out, f"cache-{which}-{args.rows}-np{n}")
            shutil.rmtree(cache, ignore_errors=True)
            for state in ("cold", "warm"):
                r = measure(which, data, tokenizer, cache, n)
                rows.append((which, n, state, r))
                print(f"{which} num_proc={n} {state}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB, "
                      f"{r['pairs']} pairs", flush=True)
            shutil.rmtree(cache, ignore_errors=True)
    print(f"\n{args.rows:,} rows, max_length {MAX_LENGTH}\n")
    print("| preparation | num_proc | cache | wall s | rows/s | peak RSS GiB |")
    print("|---|---|---|---|---|---|")
    for which, n, state, r in rows:
        name = "rlhf load_pairs" if which == "rlhf" else "TRL load_dataset + DPOTrainer._prepare_dataset"
        print(f"| {name} | {n} | {state} | {r['seconds']:.1f} | {args.rows / r['seconds']:,.0f} | "
              f"{r['peak_rss_gib']:.2f} |")


if __name__ == "__main__":
    main()
