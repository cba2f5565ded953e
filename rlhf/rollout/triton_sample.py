"""The static engine's sampler over the whole vocabulary as one Triton pass: hash, Gumbel noise, argmax, log-sum-exp.

sample_tokens without top-k or top-p draws token = argmax(z - log(-log(u))) with z = logits / temperature and u the
counter-based uniforms of (row seed, step, token id), and reports z[token] - logsumexp(z). Compiled by inductor,
that is a reduction over 151,936 logits per row, one row to a program: 300 us a step at 512 rows on an H200
against 32 us for reading the bf16 logits once (BENCHMARKS.md, rollout run 6). Here each program takes one chunk of
a row (`CHUNK` logits), so a step has thousands of programs, and each reads its logits once for both reductions;
the chunks' partial results (best score and its token, the log-sum-exp's running max and sum) combine in a few
small torch operations.

The uniforms are bit for bit those of static.hash_uniform (the same finalizer on the same int32 bits), the argmax
takes the first maximum as torch's does, so the tokens are the torch sampler's wherever the two logarithms agree
to the last bit (libdevice's and torch's logf do on a GPU; a CPU test compares them through Triton's interpreter).

Triton is optional, as for triton_decode.py; `available()` says whether it is installed.
"""

import torch

from ..ops import _sampling_logits

try:  # the kernel's source refers to `tl` as a module global
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = tl = None

CHUNK = 4096
BLOCK = 2048  # 255 us at 512 rows x 151,936 on an H200, against 275 in blocks of 1024 (rollout run 7)


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _fmix32_bits(h):
        h = h ^ ((h >> 16) & 0xFFFF)
        h = h * -2048144789  # 0x85EBCA6B as an int32: the product keeps the low 32 bits
        h = h ^ ((h >> 13) & 0x7FFFF)
        h = h * -1028477387  # 0xC2B2AE35
        return h ^ ((h >> 16) & 0xFFFF)

    @triton.jit
    def _neg_log(x, FAST: tl.constexpr):
        """-log(x) for x in (0, 1]: libdevice's logf (torch's, to the last bit), or FAST the hardware's lg2.approx
        (a few ulps off; benchmarks only)."""
        if FAST:
            return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                             pack=1) * -0.6931471805599453
        else:
            return -tl.log(x)

    @triton.jit
    def _sample_partials(X, KEY, BEST, IDX, MAX, SUM, V, temperature, stride_x, NC,
                         SCALE: tl.constexpr, SAMPLE: tl.constexpr, CHUNK_: tl.constexpr, BLOCK_: tl.constexpr,
                         FAST: tl.constexpr = False):
        """Row r, chunk c: BEST/IDX the chunk's largest score and its first token id, MAX/SUM its log-sum-exp of z
        as max and sum of exp(z - max). A block's best score and its index come from one reduction."""
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        key = tl.load(KEY + r)
        best = float("-inf")
        idx = 0
        m = float("-inf")
        s = 0.0
        for start in range(c * CHUNK_, tl.minimum(c * CHUNK_ + CHUNK_, V), BLOCK_):
            t = start + tl.arange(0, BLOCK_)
            ok = t < V
            z = tl.load(X + r * stride_x + t, mask=ok, other=float("-inf")).to(tl.float32)
            if SCALE:
                z = z / temperature  # as torch divides: the same float32 quotients
            if SAMPLE:
                h = _fmix32_bits(key ^ t)
                u = (((h >> 8) & 0xFFFFFF).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
                score = tl.where(ok, z + _neg_log(_neg_log(u, FAST), FAST), float("-inf"))  # z - log(-log(u))
            else:
                score = z
            bm, bi = tl.max(score, 0, return_indices=True, return_indices_tie_break_left=True)
            idx = tl.where(bm > best, start + bi, idx)  # strictly greater: an earlier block keeps a tie
            best = tl.maximum(best, bm)
            zm = tl.max(z, 0)
            m_new = tl.maximum(m, zm)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a chunk of -inf so far sums to 0, not NaN
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe), 0)
            m = m_new
        out = r * NC + c
        tl.store(BEST + out, best)
        tl.store(IDX + out, idx)
        tl.store(MAX + out, m)
        tl.store(SUM + out, s)

    @torch.library.custom_op("rlhf::sample_partials", mutates_args=())
    def _sample_partials_op(logits: torch.Tensor, key: torch.Tensor, temperature: float,
                            sample: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        B, V = logits.shape
        nc = triton.cdiv(V, CHUNK)
        x = logits if logits.stride(-1) == 1 else logits.contiguous()
        best = torch.empty((B, nc), dtype=torch.float32, device=logits.device)
        idx = torch.empty((B, nc), dtype=torch.int32, device=logits.device)
        mx, sm = torch.empty_like(best), torch.empty_like(best)
        _sample_partials[(B, nc)](x, key, best, idx, mx, sm, V, temperature, x.stride(0), nc,
                                  SCALE=temperature != 1.0, SAMPLE=sample, CHUNK_=CHUNK, BLOCK_=BLOCK, num_warps=4)
        return best, idx, mx, sm

    @_sample_partials_op.register_fake
    def _(logits, key, temperature, sample):
        nc = -(-logits.shape[1] // CHUNK)
        f = logits.new_empty((logits.shape[0], nc), dtype=torch.float32)
        return f, logits.new_empty((logits.shape[0], nc), dtype=torch.int32), torch.empty_like(f), torch.empty_like(f)


def sample_full_vocabulary(logits: torch.Tensor, key: torch.Tensor, temperature: float, sample: bool):
    """([B] token, [B] float32 log-prob) for logits [B, V] (any float dtype) without top-k/top-p, key [B] int32: the
    row's hashed (seed, step) bits (static.row_keys). sample False: the argmax of the logits (greedy)."""
    best, idx, mx, sm = _sample_partials_op(logits, key, float(temperature), bool(sample))
    token = idx.gather(-1, best.argmax(-1, keepdim=True)).long()
    m = mx.amax(-1, keepdim=True)
    lse = m + torch.log((sm * torch.exp(mx - m)).sum(-1, keepdim=True))
    z = _sampling_logits(logits.gather(-1, token), temperature, 0, 1.0, upcast=True)
    return token.squeeze(-1), (z - lse).squeeze(-1)
