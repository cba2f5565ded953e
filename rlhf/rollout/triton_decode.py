"""A decode-attention kernel in Triton for the static engine's varlen cache layout.

One program per (row, KV head): the G query heads that share the KV head are one [G, head_dim] tile (padded to 16
rows for the tensor cores), and the program walks the row's filled cache slots in blocks of keys with an online
softmax in float32, reading each key and value once. Flash attention's varlen kernel, which the engine uses
otherwise, tiles the G queries into a 64- or 128-row block built for prefill-length queries.

Triton is optional (it comes with CUDA builds of torch); `available()` says whether it is installed. On a CPU the
kernel runs only under Triton's interpreter, in a process started with TRITON_INTERPRET=1 (Triton reads it when it is
first imported), which is how the tests check it without a GPU.
"""

from typing import Optional

import torch

try:  # the kernel's source refers to `tl` as a module global
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = tl = None


def available() -> bool:
    return triton is not None


if triton is not None:  # the kernel's constexpr parameters are annotated with triton's own type

    @triton.jit
    def _decode_attention(Q, K, V, O, USED, scale, L, KV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                          D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr):
        """Q, O [rows * G, KV, D]; K, V [rows * L, KV, D]; USED [rows] int32: row r attends to its slots [0, USED[r])."""
        r = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        g = tl.arange(0, GP)
        d = tl.arange(0, DP)
        qmask = (g[:, None] < G) & (d[None, :] < D)
        q = tl.load(Q + ((r * G + g[:, None]) * KV + h) * D + d[None, :], mask=qmask, other=0.0)
        used = tl.load(USED + r)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.full([GP], 0.0, tl.float32)
        acc = tl.full([GP, DP], 0.0, tl.float32)
        for start in range(0, used, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            kmask = n < used
            offs = ((r * L + n[:, None]) * KV + h) * D + d[None, :]
            kvmask = kmask[:, None] & (d[None, :] < D)
            k = tl.load(K + offs, mask=kvmask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(kmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + offs, mask=kvmask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(O + ((r * G + g[:, None]) * KV + h) * D + d[None, :], out.to(O.dtype.element_ty), mask=qmask)


if triton is not None:

    @torch.library.custom_op("rlhf::decode_attention", mutates_args=())
    def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, used: torch.Tensor,
                             G: int, max_len: int, scale: float, block_n: int, num_warps: int) -> torch.Tensor:
        """The kernel's launch as one operator: torch.compile keeps it whole in the compiled decode step (and the
        engine's CUDA graph captures its launch) instead of tracing the launcher's Python."""
        b = used.shape[0]
        kv, d = k_cache.shape[1:]
        q = q.contiguous()
        out = torch.empty_like(q)
        _decode_attention[(b, kv)](q, k_cache, v_cache, out, used, scale, max_len, KV=kv, G=G,
                                   GP=max(16, triton.next_power_of_2(G)), D=d, DP=max(16, triton.next_power_of_2(d)),
                                   BLOCK_N=block_n, num_warps=num_warps)
        return out

    @_decode_attention_op.register_fake
    def _(q, k_cache, v_cache, used, G, max_len, scale, block_n, num_warps):
        return torch.empty_like(q, memory_format=torch.contiguous_format)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, used: torch.Tensor, G: int,
                     max_len: int, scale: float, block_n: Optional[int] = None,
                     num_warps: Optional[int] = None) -> torch.Tensor:
    """[b * G, kv_heads, head_dim]: each of row r's G queries per KV head over the row's first used[r] slots.

    q [b * G, kv_heads, head_dim]; k_cache, v_cache [b * max_len, kv_heads, head_dim]; used [b] int32, each >= 1.
    The same contract as the engine's `_varlen_decode`. block_n keys a loop iteration and num_warps a program.
    None picks by head size: at the Qwen2.5-0.5B shape (head size 64, 7 query heads a KV head) on an H200, 32 keys
    and one warp took 21 us a layer at batch 512 with 256 +- 64 filled slots, 64 keys and 4 warps 24 us, flash
    attention's varlen kernel 58 (benchmarks/bench_decode_parts.py, BENCHMARKS.md rollout run 6). Larger heads
    (128: Qwen2.5-1.5B and 7B) take 64 keys and 4 warps, Triton's default width, for tiles twice as wide; they are
    not measured yet.
    """
    small = k_cache.shape[-1] <= 64
    block_n = block_n or (32 if small else 64)
    num_warps = num_warps or (1 if small else 4)
    return _decode_attention_op(q, k_cache, v_cache, used, G, max_len, float(scale), block_n, num_warps)
