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
    def _attend_cached(q, K, V, r, h, n_keys, scale, L, KV: tl.constexpr, D: tl.constexpr, d,
                       GP: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr):
        """The online softmax of q [GP, DP] over row r's cached keys [0, n_keys) of KV head h, in blocks of BLOCK_N:
        (running max, running sum, unnormalized output)."""
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.full([GP], 0.0, tl.float32)
        acc = tl.full([GP, DP], 0.0, tl.float32)
        for start in range(0, n_keys, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            kmask = n < n_keys
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
        return m_i, l_i, acc

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
        m_i, l_i, acc = _attend_cached(q, K, V, r, h, used, scale, L, KV, D, d, GP, DP, BLOCK_N)
        out = acc / l_i[:, None]
        tl.store(O + ((r * G + g[:, None]) * KV + h) * D + d[None, :], out.to(O.dtype.element_ty), mask=qmask)


if triton is not None:

    @triton.jit
    def _decode_attention_rope(Q, K, V, COS, SIN, KC, VC, O, USED, scale, L, sq, sk, sv, sc, ss, so,
                               KV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                               DP: tl.constexpr, BLOCK_N: tl.constexpr):
        """One decode step's attention with its rotary embedding and cache write. Row r, KV head h:
        Q [b, (KV * G) * D], K, V [b, KV * D] the step's projections (row strides sq, sk, sv; heads h * G + g share
        KV head h); COS, SIN [b, D] (row strides sc, ss) the row's rotary tables at its position; KC, VC
        [rows * L, KV, D] the cache, whose slot r * L + USED[r] - 1 receives the rotated key and the value; the
        queries, rotated, attend to the row's USED[r] - 1 cached keys and the new one (taken from registers, not read
        back); O [b, (KV * G) * D] (row stride so)."""
        r = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        g = tl.arange(0, GP)
        d = tl.arange(0, DP)
        dm = d < D
        half = D // 2
        d2 = tl.where(d < half, d + half, d - half)  # rotate_half: (-x[half:], x[:half])
        sign = tl.where(d < half, -1.0, 1.0)
        cos = tl.load(COS + r * sc + d, mask=dm, other=0.0).to(tl.float32)
        sin = tl.load(SIN + r * ss + d, mask=dm, other=0.0).to(tl.float32)
        qmask = (g[:, None] < G) & dm[None, :]
        qrow = Q + r * sq + (h * G + g[:, None]) * D
        q = tl.load(qrow + d[None, :], mask=qmask, other=0.0).to(tl.float32)
        q2 = tl.load(qrow + d2[None, :], mask=qmask, other=0.0).to(tl.float32)
        q = (q * cos[None, :] + sign[None, :] * q2 * sin[None, :]).to(KC.dtype.element_ty)
        krow = K + r * sk + h * D
        kn = tl.load(krow + d, mask=dm, other=0.0).to(tl.float32)
        kn2 = tl.load(krow + d2, mask=dm, other=0.0).to(tl.float32)
        kn = (kn * cos + sign * kn2 * sin).to(KC.dtype.element_ty)
        vn = tl.load(V + r * sv + h * D + d, mask=dm, other=0.0).to(VC.dtype.element_ty)
        cached = tl.load(USED + r) - 1
        slot = ((r * L + cached) * KV + h) * D + d
        tl.store(KC + slot, kn, mask=dm)
        tl.store(VC + slot, vn, mask=dm)
        m_i, l_i, acc = _attend_cached(q, KC, VC, r, h, cached, scale, L, KV, D, d, GP, DP, BLOCK_N)
        s_new = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * scale  # the new key, from registers
        m_new = tl.maximum(m_i, s_new)
        p_new = tl.exp(s_new - m_new)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + p_new
        acc = acc * alpha[:, None] + p_new[:, None] * vn.to(tl.float32)[None, :]
        out = acc / l_i[:, None]
        tl.store(O + r * so + (h * G + g[:, None]) * D + d[None, :], out.to(O.dtype.element_ty), mask=qmask)

    @torch.library.custom_op("rlhf::decode_attention_rope", mutates_args=("k_cache", "v_cache"))
    def _decode_attention_rope_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                                  sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, used: torch.Tensor,
                                  G: int, max_len: int, scale: float, block_n: int, num_warps: int) -> torch.Tensor:
        b = used.shape[0]
        kv, d = k_cache.shape[1:]
        q, k, v, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, cos, sin))
        out = torch.empty((b, kv * G * d), dtype=q.dtype, device=q.device)
        _decode_attention_rope[(b, kv)](q, k, v, cos, sin, k_cache, v_cache, out, used, scale, max_len,
                                        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), sin.stride(0),
                                        out.stride(0), KV=kv, G=G, GP=max(16, triton.next_power_of_2(G)), D=d,
                                        DP=max(16, triton.next_power_of_2(d)), BLOCK_N=block_n, num_warps=num_warps)
        return out

    @_decode_attention_rope_op.register_fake
    def _(q, k, v, cos, sin, k_cache, v_cache, used, G, max_len, scale, block_n, num_warps):
        kv, d = k_cache.shape[1:]
        return q.new_empty((used.shape[0], kv * G * d))

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
    (128: Qwen2.5-1.5B and 7B) take 64 keys and 4 warps, Triton's default width, for tiles twice as wide: 7.3 us a
    layer at the Qwen2.5-1.5B shape, batch 64, against 11.2 with 32 keys and one warp and 15.6 for flash attention
    (rollout run 7).
    """
    block_n, num_warps = _tile(k_cache.shape[-1], block_n, num_warps)
    return _decode_attention_op(q, k_cache, v_cache, used, G, max_len, float(scale), block_n, num_warps)


def _tile(head_dim: int, block_n: Optional[int], num_warps: Optional[int]) -> tuple[int, int]:
    small = head_dim <= 64
    return block_n or (32 if small else 64), num_warps or (1 if small else 4)


def decode_attention_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, used: torch.Tensor, G: int, max_len: int,
                          scale: float, block_n: Optional[int] = None,
                          num_warps: Optional[int] = None) -> torch.Tensor:
    """One decode step's attention from its projections: [b, heads * head_dim], in q's dtype.

    q [b, heads * head_dim], k, v [b, kv_heads * head_dim] (views of one stacked product are fine: rows may have
    any stride, columns must be contiguous); cos, sin [b, head_dim], the rotary tables at each row's position (what
    the model's rotary embedding gives; applied as rotate_half models do: x cos + rotate_half(x) sin, in float32,
    rounded once to the cache's dtype). Writes the rotated key and the value to row r's slot used[r] - 1 of
    k_cache, v_cache [b * max_len, kv_heads, head_dim] (the varlen layout: a row's token at position p in slot p),
    and attends over its slots [0, used[r]). The step's rotary embedding, cache writes and query layout are thus
    one kernel with the attention, where the unfused step runs them as element-wise kernels around
    decode_attention. Tiles as decode_attention's."""
    block_n, num_warps = _tile(k_cache.shape[-1], block_n, num_warps)
    return _decode_attention_rope_op(q, k, v, cos, sin, k_cache, v_cache, used, G, max_len, float(scale), block_n,
                                     num_warps)
