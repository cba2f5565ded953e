"""Rollout speed: the static-cache CUDA-graph engine against transformers' `generate` (dynamic and static cache),
at real model shapes, in one run on one GPU.

    python benchmarks/bench_rollout.py                                   # Qwen2.5-0.5B shape, batch 64 and 512
    python benchmarks/bench_rollout.py --shape 1.5b --batches 512 --engines static
    python benchmarks/bench_rollout.py --batches 8 --new-tokens 32       # a quick smoke run

Models are built from the Qwen2.5 configs (random init, bf16, vocabulary 151,936) with no download; prompts are
random token ids of --prompt-len tokens, and EOS is set to an id the model never samples in practice, so every row
generates --new-tokens tokens and the engines do equal work. Each engine samples at temperature 1 with no top-k /
top-p (what every engine supports alike); the static engine is also timed with PPO's defaults (top-k 200, top-p 0.9)
(`static-ppo`). `static` is the engine's own choice (on a bf16 model on a CUDA GPU with Triton installed: the varlen
cache layout through rlhf's Triton decode-attention kernel, reading each row's filled slots); `static-masked` keeps
the left-padded layout and its masked attention, reading the whole KV cache at every step (`static-whole` is the
same) or only its filled 64-slot blocks (`static-blocks`). `static-stacked` runs the q/k/v and gate/up projections as one product each over weights
stacked for the call (the engine's default on CUDA when the copy fits in a tenth of free memory), `static-unstacked`
as separate products; `static-autotune` compiles the decode step with inductor's matrix-product autotuning;
`static-triton` names the Triton kernel explicitly, `static-flash` decodes the varlen layout with flash attention's
varlen kernel instead; `static-tsample` samples with the engine's Triton pass over the vocabulary
(`sampler="triton"`, the engine's choice on CUDA where Triton is installed; with top-k, as in `static-tsample-ppo`,
its candidates from a Triton radix select), `static-torchsample` with torch operations compiled into the step;
`static-rope` runs the rotary embedding and the cache writes inside the Triton attention kernel
(`attention="varlen-triton-rope"`); `static-cprefill` compiles the prefill's element-wise parts
(`compile_prefill=True`).

The decode bound of one step is the larger of (weights + the KV cache read at the step's length) / HBM bandwidth and
2 x parameters x batch / peak bf16 FLOP/s; the bound for the run is the batch times the steps over the sum of the
steps' bounds. Prints a markdown table (and writes it to --out).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {  # Qwen2.5 configs: hidden, layers, heads, kv heads, intermediate, tied embeddings
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, tie_word_embeddings=False, vocab_size=152064),
}
HBM_BYTES_PER_S = 4.8e12  # H200
PEAK_FLOPS = 790e12  # H200 dense bf16, as measured on this machine with an 8192^3 matrix product


class _Tok:
    """The few tokenizer members the engines use (random ids need no vocabulary)."""

    def __init__(self, vocab: int):
        self.pad_token_id, self.eos_token_id, self.vocab = 0, vocab - 1, vocab

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["" for _ in range(len(ids))]


def build(shape: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kw = dict(SHAPES[shape])
    kw.setdefault("vocab_size", 151936)
    cfg = Qwen2Config(**kw, max_position_embeddings=4096, rope_theta=1e6)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    return model, cfg


def decode_bound(model, cfg, batch: int, prompt_len: int, new_tokens: int) -> float:
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = params * 2
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 2  # bytes, k and v in bf16
    total = 0.0
    for step in range(new_tokens):
        mem = (weight_bytes + batch * (prompt_len + step) * kv_per_token) / HBM_BYTES_PER_S
        flops = 2 * params * batch / PEAK_FLOPS
        total += max(mem, flops)
    return batch * new_tokens / total


def run_engine(name: str, model, tok, prompts, new_tokens: int, sampling_kw: dict, phases: bool = False,
               prefill_batch: int = 64):
    """Seconds for one generation of every prompt (after one warm-up call at the same shapes). phases (static
    engines): also (seconds, the engine's phase times) of one more call, timed phase by phase."""
    from rlhf.rollout import SamplingConfig
    from rlhf.rollout.static import StaticEngine

    if name.startswith("static"):
        s = SamplingConfig(max_new_tokens=new_tokens, **sampling_kw)
        seeds = list(range(len(prompts)))
        timed, times = False, {}

        def call():
            # static: the engine's defaults; the masked layout reads the whole cache every step (static-masked,
            # static-whole) or its filled 64-slot blocks only (static-blocks, kv_block 64), whatever the batch
            masked = any(k in name for k in ("masked", "whole", "blocks"))
            attention = ("masked" if masked else "varlen-triton-rope" if "rope" in name else "varlen-triton"
                         if "triton" in name else "varlen" if "flash" in name else "auto")
            engine = StaticEngine(kv_block=64 if "blocks" in name else 0, attention=attention, timed=timed,
                                  compile_prefill="cprefill" in name,
                                  stack_projections={"stacked": True, "unstacked": False}.get(name.split("-")[-1]),
                                  autotune="autotune" in name,
                                  sampler="triton" if "tsample" in name else "torch" if "torchsample" in name else "auto")
            out = engine.generate(model, tok, prompts, s, batch_size=prefill_batch, seeds=seeds)
            times.update(engine.times)
            return out
    else:
        ids = torch.tensor(prompts, device="cuda")
        mask = torch.ones_like(ids)
        cache = {"hf-dynamic": None, "hf-static": "static"}[name]

        def call():
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                  cache_implementation=cache)
    call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = call()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    width = out.response_ids.shape[1] if hasattr(out, "response_ids") else out.shape[1] - len(prompts[0])
    if width != new_tokens:
        raise RuntimeError(f"{name}: generated {width} tokens per row, expected {new_tokens}")
    if phases and name.startswith("static"):
        timed = True
        t0 = time.perf_counter()
        call()
        return seconds, (time.perf_counter() - t0, dict(times))
    return seconds, None


def profile(model, tok, cfg, batch: int, prompt_len: int, new_tokens: int) -> None:
    """Where a decode step's GPU time goes: each kernel's CUDA time in a generation of new_tokens tokens less its
    time in one of a single token (the prefill and first draw alone), over the decode steps between, after a warm-up
    call at each shape. Compiled step without the CUDA graph, so that each kernel shows."""
    from rlhf.rollout import SamplingConfig
    from rlhf.rollout.static import StaticEngine

    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(1, cfg.vocab_size - 1, (batch, prompt_len), generator=g).tolist()
    engine = StaticEngine(use_graph=False, compile=True)

    def kernels(s) -> dict:
        engine.generate(model, tok, prompts, s, batch_size=64, seeds=list(range(batch)))
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            engine.generate(model, tok, prompts, s, batch_size=64, seeds=list(range(batch)))
            torch.cuda.synchronize()
        out = {}
        for e in prof.key_averages():
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if us > 0:
                out[e.key] = (us, e.count)
        return out

    steps = new_tokens - 1
    for kw in ({}, {"top_k": 200, "top_p": 0.9}):
        full = kernels(SamplingConfig(max_new_tokens=new_tokens, **kw))
        first = kernels(SamplingConfig(max_new_tokens=1, **kw))
        rows = []
        for name, (us, n) in full.items():
            us0, n0 = first.get(name, (0.0, 0))
            if n > n0:
                rows.append(((us - us0) / steps, (n - n0) / steps, name))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        print(f"\nprofile: batch {batch}, {kw or 'no filters'}: {total:.0f} us of CUDA time a decode step "
              f"(compiled step without graph; a generation of {new_tokens} tokens less one of 1 token)")
        print("| us a step | share | calls a step | kernel |\n|---|---|---|---|")
        for us, n, name in rows[:30]:
            print(f"| {us:.1f} | {us / max(total, 1e-9):.3f} | {n:.1f} | {name[:110]} |")
        if not kw:
            total0 = sum(us for us, _ in first.values())
            print(f"\nprofile: batch {batch}, a generation of 1 token (the prefill in forwards of 64 prompts, and the "
                  f"first draw): {total0 / 1e3:.1f} ms of CUDA time")
            print("| ms | share | calls | kernel |\n|---|---|---|---|")
            for name, (us, n) in sorted(first.items(), key=lambda kv: -kv[1][0])[:15]:
                print(f"| {us / 1e3:.2f} | {us / max(total0, 1e-9):.3f} | {n} | {name[:110]} |")

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="0.5b", choices=list(SHAPES))
    ap.add_argument("--batches", default="64,512")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--engines", default="static,static-ppo,hf-dynamic,hf-static")
    ap.add_argument("--skip-hf-above", type=int, default=64, help="run transformers' generate only up to this batch")
    ap.add_argument("--out", default="runs/bench/rollout.md")
    ap.add_argument("--profile", type=int, default=0, metavar="BATCH",
                    help="also print torch.profiler's top CUDA kernels of the static engine at this batch (compiled "
                         "decode step, no CUDA graph, so each kernel shows)")
    ap.add_argument("--prefill-batch", type=int, default=64, help="static engines: prompts per prefill forward")
    ap.add_argument("--phases", action="store_true",
                    help="also time one more call of each static engine phase by phase (prefill; warm-up steps and "
                         "graph capture; replayed steps; the rest of the call)")
    a = ap.parse_args()
    model, cfg = build(a.shape)
    tok = _Tok(cfg.vocab_size)
    rows = []
    for batch in [int(b) for b in a.batches.split(",")]:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(1, cfg.vocab_size - 1, (batch, a.prompt_len), generator=g).tolist()
        bound = decode_bound(model, cfg, batch, a.prompt_len, a.new_tokens)
        for name in a.engines.split(","):
            if name.startswith("hf") and batch > a.skip_hf_above:
                continue
            kw = {"top_k": 200, "top_p": 0.9} if name.endswith("-ppo") else {}
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            seconds, timed = run_engine(name, model, tok, prompts, a.new_tokens, kw, a.phases, a.prefill_batch)
            tps = batch * a.new_tokens / seconds
            peak = torch.cuda.max_memory_allocated() / 2**30
            rows.append((a.shape, batch, name, seconds, tps, tps / bound, bound, peak))
            print(f"{a.shape} batch {batch} {name}: {seconds:.2f} s, {tps:,.0f} tokens/s, "
                  f"{100 * tps / bound:.1f}% of the decode bound ({bound:,.0f}), peak {peak:.1f} GiB", flush=True)
            if timed:
                total, t = timed
                steps = a.new_tokens - 1
                print(f"  phases of a timed call ({total:.3f} s): " + ", ".join(f"{k} {v:.3f} s" for k, v in t.items())
                      + f"; decode {1e3 * t.get('decode', 0) / max(steps - 2, 1):.2f} ms a replayed step; outside the "
                      f"phases {total - sum(t.values()):.3f} s", flush=True)
    if a.profile:
        profile(model, tok, cfg, a.profile, a.prompt_len, a.new_tokens)
    lines = ["| shape | batch | engine | s | generated tokens/s | fraction of decode bound | decode bound tokens/s | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {s} | {b} | {n} | {sec:.2f} | {tps:,.0f} | {frac:.3f} | {bd:,.0f} | {pk:.1f} |"
              for s, b, n, sec, tps, frac, bd, pk in rows]
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
