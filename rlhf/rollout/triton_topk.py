"""The top-k candidates of half-precision logits by a radix select in Triton, for the static engine's sampler.

sample_tokens with top-k draws among the k (+ ties) largest logits, which it takes with torch.topk over the
vocabulary: 643 us a step for 512 rows of 151,936 bf16 logits on an H200, 90% of the filtered sampler's time
(BENCHMARKS.md rollout run 6), where reading the logits once takes 32 us. Here the K largest of each row come from
four passes over the logits, each a few thousand programs (a row's chunk of CHUNK logits each):

1. a histogram of each logit's high byte (the top 8 bits of its 16-bit key, a bijection of bf16/fp16 bits that
   orders as the values do), summed over a row's chunks: the bin that holds the K-th largest;
2. a histogram of the low byte of the logits in that bin: the K-th largest key itself, tau;
3. per chunk, how many keys are above tau and how many equal it;
4. each chunk writes the indices of its keys above tau, and of its keys equal to tau while they are among the
   first (K - count above) of the row (index order), at offsets from the chunk counts.

The candidates are then ordered by value, largest first, ties by index (a stable sort of K values). That is
torch.topk's result where no tie crosses the K-th place; where one does, torch.topk keeps an unspecified subset
of the tied logits and this keeps the lowest indices. Every step has static shapes and no host synchronization,
so the CUDA graph captures it. Only bf16 and fp16 logits (16-bit keys: two 8-bit digits).

Triton is optional, as for triton_decode.py; `available()` says whether it is installed.
"""

import torch

try:  # the kernels' source refers to `tl` as a module global
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = tl = None

CHUNK = 4096
BINS = 512  # 256 digit values and one bin (256) for logits outside the pass (tl.histogram wants a power of two)


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _keys(X16, r, c, V, stride, CHUNK_: tl.constexpr):
        """(token ids, in-range mask, 16-bit keys as int32) of row r's chunk c: a negative value's bits inverted, a
        positive value's sign bit set, so keys order as the values do."""
        t = c * CHUNK_ + tl.arange(0, CHUNK_)
        ok = t < V
        bits = tl.load(X16 + r * stride + t, mask=ok, other=0).to(tl.int32) & 0xFFFF
        key = tl.where((bits & 0x8000) != 0, (~bits) & 0xFFFF, bits | 0x8000)
        return t, ok, key

    @triton.jit
    def _hist_high(X16, H, V, stride, NC, CHUNK_: tl.constexpr, BINS_: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        t, ok, key = _keys(X16, r, c, V, stride, CHUNK_)
        h = tl.histogram(tl.where(ok, key >> 8, 256), BINS_)
        tl.store(H + (r * NC + c) * BINS_ + tl.arange(0, BINS_), h)

    @triton.jit
    def _hist_low(X16, HIGH, H, V, stride, NC, CHUNK_: tl.constexpr, BINS_: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        t, ok, key = _keys(X16, r, c, V, stride, CHUNK_)
        high = tl.load(HIGH + r)
        h = tl.histogram(tl.where(ok & ((key >> 8) == high), key & 0xFF, 256), BINS_)
        tl.store(H + (r * NC + c) * BINS_ + tl.arange(0, BINS_), h)

    @triton.jit
    def _count(X16, TAU, CNT, V, stride, NC, CHUNK_: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        t, ok, key = _keys(X16, r, c, V, stride, CHUNK_)
        tau = tl.load(TAU + r)
        out = CNT + (r * NC + c) * 2
        tl.store(out, tl.sum((ok & (key > tau)).to(tl.int32), 0))
        tl.store(out + 1, tl.sum((ok & (key == tau)).to(tl.int32), 0))

    @triton.jit
    def _compact(X16, TAU, OFF, GT, NEED, OUT, V, stride, NC, so, CHUNK_: tl.constexpr):
        """OFF [rows, NC, 2]: the row's keys above / equal to tau in the chunks before this one; GT [rows] its keys
        above tau; NEED [rows] how many of its keys equal to tau fill it to K. OUT [rows, >= K] int64 token ids,
        row stride so: columns [0, K) receive them."""
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        t, ok, key = _keys(X16, r, c, V, stride, CHUNK_)
        tau = tl.load(TAU + r)
        gt = ok & (key > tau)
        eq = ok & (key == tau)
        off = OFF + (r * NC + c) * 2
        pos_gt = tl.load(off) + tl.cumsum(gt.to(tl.int32), 0) - 1
        rank_eq = tl.load(off + 1) + tl.cumsum(eq.to(tl.int32), 0) - 1
        keep_eq = eq & (rank_eq < tl.load(NEED + r))
        pos = tl.where(gt, pos_gt, tl.load(GT + r) + rank_eq)
        tl.store(OUT + r * so + pos, t.to(tl.int64), mask=gt | keep_eq)

    def _pick(hist: torch.Tensor, want: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hist [B, 256] counts by digit; want [B] >= 1: (the digit d that holds the want-th largest, how many lie
        above d)."""
        above = hist.flip(-1).cumsum(-1).flip(-1)  # above[:, d]: how many have a digit >= d
        digit = (above >= want[:, None]).sum(-1) - 1
        higher = torch.cat([above[:, 1:], torch.zeros_like(above[:, :1])], dim=-1)  # how many have a digit > d
        return digit, higher.gather(-1, digit[:, None]).squeeze(-1)

    def _select(logits: torch.Tensor, k: int, out: torch.Tensor) -> None:
        """Write the token ids of each row's k largest logits, in index order, to out[:, :k] (out [B, >= k] int64)."""
        B, V = logits.shape
        x = logits if logits.stride(-1) == 1 else logits.contiguous()
        x16 = x.view(torch.int16)
        nc = triton.cdiv(V, CHUNK)
        dev = logits.device
        grid = (B, nc)
        hist = torch.empty((B, nc, BINS), dtype=torch.int32, device=dev)
        _hist_high[grid](x16, hist, V, x.stride(0), nc, CHUNK_=CHUNK, BINS_=BINS, num_warps=8)
        want = torch.full((B,), k, dtype=torch.long, device=dev)
        high, above_high = _pick(hist[..., :256].sum(1), want)
        high32 = high.to(torch.int32)
        _hist_low[grid](x16, high32, hist, V, x.stride(0), nc, CHUNK_=CHUNK, BINS_=BINS, num_warps=8)
        low, above_low = _pick(hist[..., :256].sum(1), want - above_high)
        tau = (high * 256 + low).to(torch.int32)
        gt = above_high + above_low  # keys above tau: fewer than k
        counts = torch.empty((B, nc, 2), dtype=torch.int32, device=dev)
        _count[grid](x16, tau, counts, V, x.stride(0), nc, CHUNK_=CHUNK, num_warps=8)
        offsets = (counts.cumsum(1) - counts).to(torch.int32)
        _compact[grid](x16, tau, offsets, gt.to(torch.int32), (k - gt).to(torch.int32), out, V, x.stride(0), nc,
                       out.stride(0), CHUNK_=CHUNK, num_warps=8)

    @torch.library.custom_op("rlhf::topk_candidates", mutates_args=())
    def _topk_op(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.empty((logits.shape[0], k), dtype=torch.long, device=logits.device)
        _select(logits, k, idx)
        values, order = logits.gather(-1, idx).sort(dim=-1, descending=True, stable=True)
        return values, idx.gather(-1, order)

    @_topk_op.register_fake
    def _(logits, k):
        return logits.new_empty((logits.shape[0], k)), logits.new_empty((logits.shape[0], k), dtype=torch.long)


def topk_candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, token ids) [B, k] of the k largest of bf16/fp16 logits [B, V] (k <= V), largest first, ties by
    index: torch.topk(logits, k) up to which tied logits it keeps at the k-th place (module docstring)."""
    if logits.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"topk_candidates: {logits.dtype} logits; the radix select takes bf16 or fp16")
    return _topk_op(logits, int(k))
