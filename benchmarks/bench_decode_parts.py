"""The parts of one static-engine decode step, each timed on its own at a real shape (one CUDA GPU).

    python benchmarks/bench_decode_parts.py --batch 512 --filled 256      # Qwen2.5-0.5B shape, 256 cache slots filled
    python benchmarks/bench_decode_parts.py --shape 1.5b --batch 64

What a step is made of, per layer and per step: the decode attention over each row's filled cache slots (flash
attention's varlen kernel, rlhf's Triton kernel at several tile sizes, and the masked product over the whole cache
as a reference), the projections' matrix products, the LM head's, and the sampler (compiled, with and without
top-k/top-p), with the bytes and FLOPs each one moves and the bound they imply on this device. Each part is captured
20 times in one CUDA graph and the graph replayed, so launch overhead is not in the figures, as in the engine.
The attention kernels are also checked against the reference product (bf16 tolerance).
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.bench_rollout import SHAPES  # noqa: E402
from rlhf.rollout.base import SamplingConfig  # noqa: E402
from rlhf.rollout.static import _varlen_decode, sample_tokens  # noqa: E402

VOCAB = 151936
HBM_BYTES_S = 4.8e12
PEAK_FLOPS = 790e12


def graph_time(fn, repeat: int = 20, replays: int = 5) -> float:
    """Seconds of one fn() call, from a CUDA graph of `repeat` calls replayed `replays` times (median)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(repeat):
            fn()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / repeat)
    return sorted(times)[len(times) // 2]


def rope_parts(add, B, heads, kv, d, L, used, kv_bytes) -> None:
    """One layer's rotary embedding, cache writes and attention from the stacked q/k/v product: compiled around the
    Triton kernel (the engine's varlen-triton step) against the one kernel that does all of it (varlen-triton-rope)."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from rlhf.rollout.triton_decode import decode_attention, decode_attention_rope

    dev, bf, G = used.device, torch.bfloat16, heads // kv
    qkv = torch.randn(B, (heads + 2 * kv) * d, device=dev, dtype=bf)
    q, k, v = qkv.split([heads * d, kv * d, kv * d], dim=-1)
    ang = (used.long() - 1)[:, None].float() * (1e6 ** (-torch.arange(0, d, 2, device=dev).float() / d))[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos().to(bf), torch.cat([ang, ang], -1).sin().to(bf)
    kc, vc = torch.randn(B * L, kv, d, device=dev, dtype=bf), torch.randn(B * L, kv, d, device=dev, dtype=bf)
    slots = torch.arange(B, device=dev) * L + used.long() - 1
    scale = d ** -0.5

    def unfused():
        qr, kr = apply_rotary_pos_emb(q.view(B, 1, heads, d).transpose(1, 2), k.view(B, 1, kv, d).transpose(1, 2),
                                      cos[:, None], sin[:, None])
        kc.index_copy_(0, slots, kr.transpose(1, 2).reshape(B, kv, d))
        vc.index_copy_(0, slots, v.reshape(B, kv, d))
        qg = qr.reshape(B, kv, G, d).transpose(1, 2).reshape(B * G, kv, d)
        o = decode_attention(qg, kc, vc, used, G, L, scale)
        return o.view(B, G, kv, d).transpose(1, 2).reshape(B, -1)

    compiled = torch.compile(unfused)
    add("rope, cache writes and attention: compiled around the Triton kernel", graph_time(compiled), kv_bytes)
    fused = lambda: decode_attention_rope(q, k, v, cos, sin, kc, vc, used, G, L, scale)  # noqa: E731
    add("rope, cache writes and attention: one Triton kernel (varlen-triton-rope)", graph_time(fused), kv_bytes)
    a, b = compiled().float(), fused().float()
    print(f"rope parts: fused against compiled, max |diff| {float((a - b).abs().max()):.3e}")


def sampler_sweep(add, logits, seeds, step, want) -> None:
    """The Triton sampler's partials kernel alone at other chunk / block / warp settings, and with the hardware's
    approximate logarithm; each setting's tokens are checked against the torch sampler's (want)."""
    from rlhf.rollout import triton_sample as ts
    from rlhf.rollout.static import row_keys

    B, V = logits.shape
    key = row_keys(seeds, step)
    for chunk, block, warps, fast in ((4096, 1024, 4, False), (4096, 2048, 4, False), (4096, 4096, 8, False),
                                      (2048, 2048, 4, False), (2048, 1024, 4, False), (8192, 2048, 8, False),
                                      (1024, 1024, 4, False), (4096, 1024, 4, True), (2048, 2048, 4, True)):
        nc = -(-V // chunk)
        best = torch.empty((B, nc), dtype=torch.float32, device=logits.device)
        idx = torch.empty((B, nc), dtype=torch.int32, device=logits.device)
        mx, sm = torch.empty_like(best), torch.empty_like(best)

        def fn(chunk=chunk, block=block, warps=warps, fast=fast, nc=nc, best=best, idx=idx, mx=mx, sm=sm):
            ts._sample_partials[(B, nc)](logits, key, best, idx, mx, sm, V, 1.0, logits.stride(0), nc, SCALE=False,
                                         SAMPLE=True, CHUNK_=chunk, BLOCK_=block, FAST=fast, num_warps=warps)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"sampler partials chunk {chunk} block {block}: {type(e).__name__}: {str(e)[:200]}")
            continue
        tok = idx.gather(-1, best.argmax(-1, keepdim=True)).squeeze(-1).long()
        label = f"sampler partials: chunk {chunk} block {block} warps {warps}{' fast log' if fast else ''}"
        add(label, graph_time(fn), 2.0 * B * V)
        print(f"{label}: {int((tok == want).sum())} of {B} tokens equal to the torch sampler's")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="0.5b", choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--filled", type=int, default=256, help="mean filled cache slots per row (ragged by +-64)")
    ap.add_argument("--max-len", type=int, default=384, help="cache slots per row")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode_parts.py needs a CUDA device")
    torch.manual_seed(0)
    dev, bf = torch.device("cuda"), torch.bfloat16
    cfg = SHAPES[a.shape]
    H, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, I, V, B, L = H // heads, cfg["intermediate_size"], cfg.get("vocab_size", VOCAB), a.batch, a.max_len
    G = heads // kv
    rows = []

    def add(name, seconds, bytes_=0.0, flops=0.0):
        bound = max(bytes_ / HBM_BYTES_S, flops / PEAK_FLOPS)
        rows.append((name, seconds * 1e6, bound * 1e6, bound / seconds if seconds else 0.0))

    # attention, one layer
    used = (a.filled + torch.randint(-64, 65, (B,), device=dev)).clamp(1, L).int()
    q = torch.randn(B * G, kv, d, device=dev, dtype=bf)
    kc = torch.randn(B * L, kv, d, device=dev, dtype=bf)
    vc = torch.randn(B * L, kv, d, device=dev, dtype=bf)
    scale = d ** -0.5
    kv_bytes = float(used.sum().item()) * kv * d * 2 * 2
    ref = _varlen_decode(q, kc, vc, used, G, L, scale, "reference").float()
    out = {}
    for name, fn in [("attention: flash varlen", lambda: _varlen_decode(q, kc, vc, used, G, L, scale, "flash")),
                     ("attention: masked whole cache (reference)",
                      lambda: _varlen_decode(q, kc, vc, used, G, L, scale, "reference"))]:
        add(name, graph_time(fn), kv_bytes)
        out[name] = fn().float()
    try:
        from rlhf.rollout.triton_decode import decode_attention
        for bn in (32, 64, 128):
            for nw in (1, 2, 4):
                name = f"attention: triton block_n={bn} warps={nw}"
                fn = lambda bn=bn, nw=nw: decode_attention(q, kc, vc, used, G, L, scale, block_n=bn, num_warps=nw)
                add(name, graph_time(fn), kv_bytes)
                out[name] = fn().float()
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"triton kernel: {type(e).__name__}: {e}")
    for name, o in out.items():
        print(f"{name}: max |diff| against the reference {float((o - ref).abs().max()):.3e}")
    try:
        rope_parts(add, B, heads, kv, d, L, used, kv_bytes)
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"rope parts: {type(e).__name__}: {e}")

    # matrix products, one layer, and the LM head
    x = torch.randn(B, H, device=dev, dtype=bf)
    xi = torch.randn(B, I, device=dev, dtype=bf)
    for name, (n, k) in {"qkv projection (stacked)": ((heads + 2 * kv) * d, H), "o projection": (H, H),
                         "gate+up projection (stacked)": (2 * I, H), "down projection": (H, I),
                         "LM head": (V, H)}.items():
        w = torch.randn(n, k, device=dev, dtype=bf) * 0.02
        inp = xi if k == I else x
        add(name, graph_time(lambda w=w, inp=inp: torch.nn.functional.linear(inp, w)),
            2.0 * n * k + 2.0 * B * (n + k), 2.0 * B * n * k)

    # the sampler
    logits = torch.randn(B, V, device=dev, dtype=bf) * 3
    seeds = torch.randint(0, 2 ** 62, (B,), device=dev)
    step = torch.zeros((), dtype=torch.long, device=dev)
    for label, kw in (("sampler (compiled), no filter", {}), ("sampler (compiled), top_k 200 top_p 0.9",
                                                               {"top_k": 200, "top_p": 0.9})):
        sc = SamplingConfig(**kw)
        fn = torch.compile(lambda sc=sc: sample_tokens(logits, seeds, step, sc))
        add(label, graph_time(fn), 2.0 * B * V)
    try:
        from rlhf.rollout.triton_sample import available
        if available():
            sc = SamplingConfig()
            fn = torch.compile(lambda: sample_tokens(logits, seeds, step, sc, kernel=True))
            add("sampler (Triton pass), no filter", graph_time(fn), 2.0 * B * V)
            a_tok, _ = fn()
            b_tok, _ = torch.compile(lambda: sample_tokens(logits, seeds, step, sc))()
            print(f"Triton sampler: {int((a_tok == b_tok).sum())} of {B} tokens equal to the torch sampler's")
            sampler_sweep(add, logits, seeds, step, b_tok)
            sc = SamplingConfig(top_k=200, top_p=0.9)
            fn = torch.compile(lambda: sample_tokens(logits, seeds, step, sc, kernel=True, topk_kernel=True))
            add("sampler (Triton top-k), top_k 200 top_p 0.9", graph_time(fn), 2.0 * B * V)
            from rlhf.rollout.triton_topk import topk_candidates
            add("top-k 216 over the vocabulary, Triton radix select", graph_time(lambda: topk_candidates(logits, 216)),
                2.0 * B * V)
            same = torch.equal(topk_candidates(logits, 216)[0], torch.topk(logits, 216).values)
            print(f"Triton top-k: values equal to torch.topk's: {same}")
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"triton sampler: {type(e).__name__}: {e}")

    def int64_sampler(logits, seeds, step):  # the no-filter sampler with the finalizer over the vocabulary in int64
        from rlhf.rollout.static import _M32, _fmix32
        sd = seeds.long()
        h = _fmix32(_fmix32(_fmix32(sd & _M32) ^ ((sd >> 32) & _M32)) ^ (step & _M32))
        h = _fmix32(h.unsqueeze(-1) ^ torch.arange(V, device=dev))
        z = logits.float()
        pick = (z - torch.log(-torch.log(((h >> 8).float() + 0.5) / (1 << 24)))).argmax(-1, keepdim=True)
        return pick, z.gather(-1, pick) - torch.logsumexp(z, -1, keepdim=True)
    fn = torch.compile(lambda: int64_sampler(logits, seeds, step))
    add("sampler (compiled), no filter, int64 finalizer", graph_time(fn), 2.0 * B * V)
    fn = torch.compile(lambda: torch.logsumexp(logits.float(), -1))
    add("logsumexp over the vocabulary (compiled)", graph_time(fn), 2.0 * B * V)
    fn = torch.compile(lambda: torch.topk(logits, 216, dim=-1))
    add("top-k 216 over the vocabulary", graph_time(fn), 2.0 * B * V)

    print(f"\nshape {a.shape}, batch {B}, filled slots {a.filled} +-64 of {L}; bound = max(bytes / 4.8 TB/s, "
          f"FLOPs / 790 TFLOP/s)\n")
    print("| part | us | bound us | share of bound |\n|---|---|---|---|")
    for name, us, bound, frac in rows:
        print(f"| {name} | {us:.1f} | {bound:.1f} | {frac:.2f} |")


if __name__ == "__main__":
    main()
