"""Rollouts on a static KV cache: one batched prefill, then decode steps replayed from a captured CUDA graph.

The engine drives the model's own modules (embedding, norms, q/k/v/o projections, MLPs, LM head, rotary
embedding) with its own attention over a preallocated cache, so it reads the live weights with no copy (ZeRO-3 /
FSDP whole-weight blocks hand it whole parameters). LoRA adapters act unmerged: a plain adapter's A and B matrices
are stacked per group of projections that share an input (q/k/v, gate/up) for the call, the rest run inside their
projection modules (merged adapters, other variants). Decoder-only models of the Llama family (llama, qwen2, qwen3,
mistral) are supported; `unsupported()` says why another model is not, and the caller falls back to the HF engine.

Sampling happens on the device inside the graph. The logits are filtered exactly as training log-probs filter them
(ops._sampling_logits: temperature, top-k, top-p), then the Gumbel-max trick picks a token with noise from a
counter-based hash of (row seed, step, token id): a row's tokens depend on its seed and its own logits only, never
on the rows it shares a batch, a rank or a world size with. No generator state is kept, so nothing is synchronized
with the host per token; the loop checks for "every row has emitted EOS" every `check_every` steps.

On a CPU the same code runs eagerly (no graph): tests compare it with a full forward there.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..data.batching import attention_mask, pad
from ..models.forward import _unwrap, position_ids_from_mask
from ..models.fused_layers import compute_dtypes, lora_parts
from ..models.fused_layers import is_swiglu_mlp as _is_swiglu_mlp
from ..ops import _sampling_logits
from .base import Rollout, SamplingConfig, response_mask_from_ids

SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "mistral")
_M32 = 0xFFFFFFFF
# top-k takes this many extra candidates so that logits tied with the k-th survive, as in ops._top_k_filter
_TIE_SLACK = 16


def unsupported(model) -> Optional[str]:
    """None when the engine can run this model, else the reason it cannot."""
    lm = _unwrap(model)
    cfg = getattr(lm, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        return f"model type {kind!r} (the static engine runs {', '.join(SUPPORTED_TYPES)})"
    base = getattr(lm, "model", None)
    if not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) or not hasattr(lm, "lm_head"):
        return f"{type(lm).__name__} does not have the Llama-family module layout"
    rope = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "linear", "llama3", "yarn"):
        return f"rope type {rope.get('rope_type')!r} depends on the sequence length"
    return None


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding values in [0, 2^32): a bijection that mixes bits."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _fmix32_bits(h: torch.Tensor) -> torch.Tensor:
    """_fmix32 on int32 tensors that hold the 32 bits of the unsigned value: the same bits out.

    A product of int32s keeps its low 32 bits (two's complement wraps, as an unsigned product does), and a right
    shift of an int32 copies the sign bit in, so each shift is masked to its unsigned result. This is the form the
    sampler runs over the vocabulary: a GPU has no 64-bit integer multiplier, and the int64 form costs several
    instructions per product.
    """
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * (0x85EBCA6B - (1 << 32))
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * (0xC2B2AE35 - (1 << 32))
    return h ^ ((h >> 16) & 0xFFFF)


def hash_uniform(seeds: torch.Tensor, step: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[B, K] uniforms in (0, 1), a pure function of (seed [B], step [] or [B], token id [B, K] or [K]).

    Counter-based: no state advances, so the draw of a row at a step is the same in any batch and on any device.
    The row's key (seed and step) is mixed in int64, where products of two 32-bit values wrap in int64 before the
    mask (the low 32 bits are exact either way); the per-token finalizer, B x K of them, runs on the same 32 bits
    held in int32 (_fmix32_bits). Token ids are below 2^31.
    """
    h = _fmix32_bits(row_keys(seeds, step).unsqueeze(-1) ^ token_ids.to(torch.int32))
    return (((h >> 8) & 0xFFFFFF).float() + 0.5) * (1.0 / (1 << 24))


def row_keys(seeds: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """[B] int32: the 32 bits of the hash of (seed, step) that hash_uniform mixes each token id into."""
    seeds = seeds.long()
    h = _fmix32(_fmix32(seeds & _M32) ^ ((seeds >> 32) & _M32))
    h = _fmix32(h ^ (step.long() & _M32))
    return torch.where(h >= 1 << 31, h - (1 << 32), h).to(torch.int32)  # the same 32 bits, signed


def sample_tokens(logits: torch.Tensor, seeds: torch.Tensor, step: torch.Tensor, sampling: SamplingConfig,
                  kernel: bool = False, topk_kernel: bool = False):
    """([B] token, [B] its float32 log-prob under the filtered distribution) from logits [B, V] of any float dtype.

    The filter is ops._sampling_logits on the float32 logits, the one training log-probs apply. With top-k, only
    the k (+ ties) best logits are candidates, so the nucleus sort and the noise cover k columns instead of the
    vocabulary; the selection runs in the logits' own dtype (the float32 cast is exact and keeps their order, so
    bf16 logits give the same candidates from half the bytes, in half the radix passes). Greedy (do_sample false)
    takes the argmax and reports its log-prob under the same filtered distribution. kernel: without top-k and top-p,
    one Triton pass over the vocabulary does the same (rollout/triton_sample.py; the caller checks that Triton is
    installed). topk_kernel: with top-k, the candidates of bf16/fp16 logits come from a radix select in Triton
    (rollout/triton_topk.py) instead of torch.topk: the same values, and where ties cross the k + 16-th place, the
    lowest token ids among them.
    """
    s = sampling
    if kernel and s.top_k <= 0 and s.top_p >= 1.0:
        from .triton_sample import sample_full_vocabulary

        return sample_full_vocabulary(logits, row_keys(seeds, step), s.temperature, s.do_sample)
    V = logits.shape[-1]
    if s.top_k > 0 and s.top_k + _TIE_SLACK < V:
        if topk_kernel and logits.dtype in (torch.bfloat16, torch.float16):
            from .triton_topk import topk_candidates

            cand, ids = topk_candidates(logits, s.top_k + _TIE_SLACK)
        else:
            cand, ids = torch.topk(logits, s.top_k + _TIE_SLACK, dim=-1)
    else:
        cand, ids = logits, None
    z = _sampling_logits(cand, s.temperature, s.top_k, s.top_p, upcast=True)
    if s.do_sample:
        vocab = ids if ids is not None else torch.arange(V, device=logits.device)
        u = hash_uniform(seeds, step, vocab)
        score = z - torch.log(-torch.log(u))
    else:
        score = z
    pick = score.argmax(-1, keepdim=True)
    logp = (z.gather(-1, pick) - torch.logsumexp(z, dim=-1, keepdim=True)).squeeze(-1)
    token = (ids.gather(-1, pick) if ids is not None else pick).squeeze(-1)
    return token, logp


def _lora_of(module) -> Optional[tuple]:
    """(A, B, scaling) of the one plain LoRA adapter `module` runs now, or None (no adapter, or one the grouped path
    does not take: several active, dropout, DoRA, merged, disabled, ZeRO-3 or DTensor weights)."""
    from peft.tuners.lora import Linear as LoraLinear

    if type(module) is not LoraLinear:
        return None
    parts = lora_parts(module)
    if parts is None or any(type(t.data) is not torch.Tensor for t in parts[2:4]):
        return None
    return parts[2], parts[3], parts[4]


class _LoraGroup:
    """Sibling projections that read one input (q, k, v; gate, up; or one alone), their LoRA adapters as one pair of
    matrix products: t = x [A_1; A_2; ...]^T, then t times the block-diagonal [B_1, B_2, ...]^T, split per projection
    and added, scaled, to each base output. peft's forward runs two products per projection and casts each float32
    adapter weight to the autocast dtype at every call; in a decode step, where every product is tiny, those
    kernels are most of what LoRA costs. The stacked weights are built once per generate call from the live
    adapters, in the dtype the products run in (the autocast dtype, else the adapters' own).

    The arithmetic is peft's: base(x) + (x A^T) B^T * scaling in the LoRA dtype, then cast to the base output's dtype;
    only the summation order of the products can differ (the zero blocks add exact zeros)."""

    def __init__(self, modules: list):
        self.modules = modules
        self.parts = [_lora_of(m) for m in modules]
        self.lora = [i for i, p in enumerate(self.parts) if p is not None]
        self.dtype, self.a, self.b = None, None, None

    def _stack(self, dtype: torch.dtype) -> None:
        parts = [self.parts[i] for i in self.lora]
        self.a = torch.cat([a.detach().to(dtype) for a, _, _ in parts])
        self.b = torch.block_diag(*[b.detach().to(dtype) for _, b, _ in parts])
        self.sizes = [b.shape[0] for _, b, _ in parts]
        self.dtype = dtype

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.lora:
            return [m(x) for m in self.modules]
        dtype = compute_dtypes(x.device.type, x.dtype, self.parts[self.lora[0]][0])[1]
        if dtype != self.dtype:
            self._stack(dtype)
        lora = F.linear(F.linear(x.to(dtype), self.a), self.b).split(self.sizes, dim=-1)
        out, j = [], 0
        for m, p in zip(self.modules, self.parts):
            if p is None:
                out.append(m(x))
                continue
            y = m.base_layer(x)
            out.append((y + lora[j] * p[2]).to(y.dtype))
            j += 1
        return out


def flash_varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's flash attention kernel can run a varlen decode here: a CUDA device of compute capability 8
    or newer, a half-precision cache, and an operator that takes per-sequence key lengths (seqused_k)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    if op is None or "seqused_k" not in str(op.default._schema):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def _varlen_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, used: torch.Tensor, G: int,
                   max_len: int, scale: float, impl: str = "flash") -> torch.Tensor:
    """One query per head and row over the rows' filled cache slots: [b * G, kv_heads, head_dim].

    q [b * G, kv_heads, head_dim]: sequence r's G queries are the G query heads that share each KV head.
    k_cache, v_cache [b * max_len, kv_heads, head_dim]: row r's keys are slots r * max_len + [0, used[r]).
    impl "flash": flash attention's varlen kernel reads only those slots (and no mask); "triton": rlhf's own Triton
    kernel (rollout/triton_decode.py) does, with the G queries of a KV head in one 16-row tile; "reference": the same
    product over the whole cache with a length mask, on any device (tests compare the layouts with it on a CPU).
    """
    b = used.shape[0]
    if impl == "triton":
        from .triton_decode import decode_attention

        return decode_attention(q, k_cache, v_cache, used, G, max_len, scale)
    if impl == "reference":
        kv, d = k_cache.shape[1:]
        k = k_cache.view(b, max_len, kv, d).transpose(1, 2)
        v = v_cache.view(b, max_len, kv, d).transpose(1, 2)
        mask = (torch.arange(max_len, device=used.device) < used[:, None])[:, None, None, :]
        o = F.scaled_dot_product_attention(q.view(b, G, kv, d).transpose(1, 2), k, v, attn_mask=mask, scale=scale)
        return o.transpose(1, 2).reshape(b * G, kv, d)
    cu_q = torch.arange(0, (b + 1) * G, G, dtype=torch.int32, device=q.device)
    cu_k = torch.arange(0, (b + 1) * max_len, max_len, dtype=torch.int32, device=q.device)
    return torch.ops.aten._flash_attention_forward(q, k_cache, v_cache, cu_q, cu_k, G, max_len, 0.0, False, False,
                                                   scale=scale, seqused_k=used)[0]


class _StackedLinear:
    """Plain linear projections that read one input (q, k, v; gate, up) as one matrix product over their weights
    stacked for the call: [b, in] x [sum of outs, in]^T, split per projection. At decode shapes (a few hundred rows)
    the separate products are narrow (the k and v projections of a grouped-query model have 128 outputs at the
    Qwen2.5-0.5B shape) and use the GPU poorly; the stacked one is one wide product. It costs a copy of those
    weights for the generate call."""

    def __init__(self, modules: list):
        self.sizes = [m.out_features for m in modules]
        self.weight = torch.cat([m.weight.detach() for m in modules])
        biases = [m.bias for m in modules]
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = torch.cat([b.detach() if b is not None else m.weight.new_zeros(m.out_features)
                                   for b, m in zip(biases, modules)])

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1))


def _plain_linears(modules: list) -> bool:
    return all(type(m) is torch.nn.Linear and type(m.weight.data) is torch.Tensor and m.weight.numel() > 0
               for m in modules)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm of Llama, Qwen2, Qwen3 and Mistral as a function of tensors (the module's forward)."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


_COMPILED: dict = {}  # compiled code, once per process: the decode step (by autotune) and the prefill functions


def _compiled_fn(fn):
    """fn through torch.compile with dynamic shapes, once per process (prefill shapes change with every call)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


class _PrefillOps:
    """The prefill's element-wise parts: the modules' own forwards, or (compiled) each as one small function compiled
    with dynamic shapes, where the eager modules run several kernels each over every prompt token (an RMSNorm in
    float32: seven; the rotary embedding: about ten). A function stands in for a module only where it gives the
    module's output bit for bit on a probe, so a model whose norm or activation differs keeps its own."""

    def __init__(self, rope, compiled: bool):
        self.compiled = compiled
        self.rope = _compiled_fn(rope) if compiled else rope
        self._same: dict = {}

    def _matches(self, module, fn, probe) -> bool:
        """Whether fn(*probe()) equals the module's output (module(p) or, given two tensors, module(p) * q) bit for
        bit; decided once per module class."""
        key = type(module)
        if key not in self._same:
            with torch.no_grad():
                args = probe()
                want = module(args[0]) if len(args) == 1 else module(args[0]) * args[1]
                self._same[key] = bool(torch.equal(want, fn(*args)))
        return self._same[key]

    def norm(self, module, x: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            eps, w = getattr(module, "variance_epsilon", None), getattr(module, "weight", None)
            if (isinstance(eps, float) and isinstance(w, torch.Tensor) and w.dim() == 1
                    and self._matches(module, lambda t: _rms_norm(t, w, eps),
                                      lambda: (torch.randn(2, w.shape[0], device=x.device, dtype=x.dtype),))):
                return _compiled_fn(_rms_norm)(x, w, eps)
        return module(x)

    def act_mul(self, act, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if self.compiled and self._matches(act, _silu_mul, lambda: tuple(torch.randn(2, 2, 8, device=g.device,
                                                                                     dtype=g.dtype))):
            return _compiled_fn(_silu_mul)(g, u)
        return act(g) * u


class _Decoder:
    """The model's modules over a static KV cache per layer, in one of two layouts (`attention`, below)."""

    def __init__(self, model, rows: int, max_len: int, group_lora: bool = True, attention: str = "masked",
                 stack: bool = False, sample_kernel: bool = False, topk_kernel: bool = False,
                 compile_prefill: bool = False):
        lm = _unwrap(model)
        self.sample_kernel = sample_kernel  # sample_tokens' Triton pass over the vocabulary (StaticEngine's sampler)
        self.topk_kernel = topk_kernel  # and its Triton top-k candidates
        # "masked": cache slots are the left-padded columns, attention masks them ([rows, kv_heads, max_len,
        # head_dim] per layer). "varlen" (and its -triton, -reference kernels): a row's token at position p lives in slot p, so its
        # keys are the first `used` slots of its row ([rows * max_len, kv_heads, head_dim] per layer) and decoding
        # reads only those, through flash attention's varlen kernel (or the same product, masked, as a reference)
        self.attention = attention
        self.varlen = attention != "masked"
        self.varlen_impl = {"varlen": "flash", "varlen-triton": "triton", "varlen-triton-rope": "triton",
                            "varlen-reference": "reference"}.get(attention)
        # varlen-triton-rope: a decode step's rotary embedding and cache write run inside the Triton attention kernel
        # (models without per-head q/k norms; the others take the varlen-triton path)
        self.fused_rope = attention == "varlen-triton-rope"
        self.lm, self.base = lm, lm.model
        cfg = lm.config
        self.layers = list(self.base.layers[: cfg.num_hidden_layers])
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.rope = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self.prefill_ops = _PrefillOps(self.rope, compile_prefill)
        self.step_ops = _PrefillOps(self.rope, False)  # the decode step: compiled whole, around the modules
        self.rows, self.max_len = rows, max_len
        self.k: list[Optional[torch.Tensor]] = [None] * len(self.layers)
        self.v: list[Optional[torch.Tensor]] = [None] * len(self.layers)
        # LoRA projections in groups (adapters as they are now, for this generate call); None: the modules' own
        # forwards (no LoRA, or group_lora off)
        self.qkv = self.o = self.gate_up = self.down = None
        if group_lora:
            groups = {"qkv": [[l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj] for l in self.layers],
                      "o": [[l.self_attn.o_proj] for l in self.layers]}
            if all(_is_swiglu_mlp(l.mlp, cfg) for l in self.layers):
                groups["gate_up"] = [[l.mlp.gate_proj, l.mlp.up_proj] for l in self.layers]
                groups["down"] = [[l.mlp.down_proj] for l in self.layers]
            groups = {k: [_LoraGroup(g) for g in v] for k, v in groups.items()}
            if any(g.lora for v in groups.values() for g in v):
                for k, v in groups.items():
                    setattr(self, k, v)
        if stack and self.qkv is None:  # no LoRA groups: plain projections stacked per input
            qkv = [[l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj] for l in self.layers]
            if all(_plain_linears(g) for g in qkv):
                self.qkv = [_StackedLinear(g) for g in qkv]
            if all(_is_swiglu_mlp(l.mlp, cfg) and _plain_linears([l.mlp.gate_proj, l.mlp.up_proj, l.mlp.down_proj])
                   for l in self.layers):
                self.gate_up = [_StackedLinear([l.mlp.gate_proj, l.mlp.up_proj]) for l in self.layers]
                self.down = [lambda x, m=l.mlp.down_proj: [m(x)] for l in self.layers]

    def _cache(self, i: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[i] is None:  # allocated at the first prefill, in the dtype the projections produce (autocast)
            shape = ((self.rows * self.max_len, self.kv_heads, self.head_dim) if self.varlen
                     else (self.rows, self.kv_heads, self.max_len, self.head_dim))
            self.k[i] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.v[i] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.k[i], self.v[i]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: Optional[torch.Tensor],
                rows: slice, kv_len: Optional[int] = None, used: Optional[torch.Tensor] = None,
                prefill: bool = False) -> torch.Tensor:
        """Logits [b, V] of the last position, in the LM head's dtype (sample_tokens takes them to float32).

        ids, positions [b, T]; rows: the cache rows of this batch.
        Masked layout: slots [T] cache slots the T tokens are written to; mask [b, 1, T, max_len] bool, True where a
        query may attend. kv_len: attention reads only the cache's first kv_len slots (every slot a query may attend
        must lie there); None reads all of it.
        Varlen layout: slots [b * T] indices into the flat cache (row * max_len + position). A prefill (used None)
        attends among its own T tokens under mask [b, 1, T, >= T]; a decode step (T = 1) attends to the first
        used[r] slots of each row r (int32 [b], its own slot included).
        prefill: a prompt forward (its element-wise parts through prefill_ops), not a decode step.
        """
        kv_len = self.max_len if kv_len is None else kv_len
        b, T = ids.shape
        G = self.heads // self.kv_heads
        h = self.base.embed_tokens(ids)
        cos, sin = self.base.rotary_emb(h, positions)
        # grouped-query attention without repeating the cache: the G query heads of a KV head become G x T rows
        if used is None:
            kv_len = T if self.varlen else kv_len
            mask = mask[..., :kv_len].unsqueeze(2).expand(b, 1, G, T, kv_len).reshape(b, 1, G * T, kv_len)
        ops = self.prefill_ops if prefill else self.step_ops
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            x = ops.norm(layer.input_layernorm, h)
            shape = (b, T, -1, self.head_dim)
            q, k, v = self.qkv[i](x) if self.qkv else (a.q_proj(x), a.k_proj(x), a.v_proj(x))
            if used is not None and self.fused_rope and not hasattr(a, "q_norm"):
                from .triton_decode import decode_attention_rope

                k_cache, v_cache = self._cache(i, v)
                o = decode_attention_rope(q.reshape(b, -1), k.reshape(b, -1), v.reshape(b, -1), cos.reshape(b, -1),
                                          sin.reshape(b, -1), k_cache, v_cache, used, G, self.max_len, a.scaling)
                h = h + self._attn_out(i, a, o.view(b, 1, -1))
                h = self._mlp(i, layer, h, ops)
                continue
            q, k, v = q.view(shape), k.view(shape), v.view(shape)
            if hasattr(a, "q_norm"):  # qwen3 normalizes each head before the rotation
                q, k = a.q_norm(q), a.k_norm(k)
            q, k = ops.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            # float32 rotary tables (float32 weights under autocast) would promote q and k; the cache and the
            # attention kernel take the projections' dtype, as autocast's attention would
            q, k = q.to(v.dtype), k.to(v.dtype)
            k_cache, v_cache = self._cache(i, k)
            if self.varlen:
                flat = (b * T, self.kv_heads, self.head_dim)
                k_cache.index_copy_(0, slots, k.transpose(1, 2).reshape(flat).to(k_cache.dtype))
                v_cache.index_copy_(0, slots, v.reshape(flat).to(v_cache.dtype))
            else:
                k_cache[rows].index_copy_(2, slots, k.to(k_cache.dtype))
                v_cache[rows].index_copy_(2, slots, v.transpose(1, 2).to(v_cache.dtype))
            if used is not None:  # varlen decode: the G query heads of a KV head are G queries of its sequence
                q = q.reshape(b, self.kv_heads, G, self.head_dim).transpose(1, 2).reshape(b * G, self.kv_heads, -1)
                o = _varlen_decode(q, k_cache, v_cache, used, G, self.max_len, a.scaling, self.varlen_impl)
                o = o.view(b, G, self.kv_heads, self.head_dim).transpose(1, 2).reshape(b, 1, -1)
            else:
                q = q.reshape(b, self.kv_heads, G * T, self.head_dim)
                if self.varlen:  # varlen prefill: the batch's own keys, in the masked layout
                    kk, vv = k, v.transpose(1, 2)
                else:
                    kk, vv = k_cache[rows, :, :kv_len], v_cache[rows, :, :kv_len]
                o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=a.scaling)
                o = o.reshape(b, self.heads, T, self.head_dim).transpose(1, 2).reshape(b, T, -1)
            h = h + self._attn_out(i, a, o)
            h = self._mlp(i, layer, h, ops)
        return self.lm.lm_head(self.base.norm(h[:, -1:]))[:, 0]

    def _attn_out(self, i: int, a, o: torch.Tensor) -> torch.Tensor:
        return self.o[i](o)[0] if self.o else a.o_proj(o)

    def _mlp(self, i: int, layer, h: torch.Tensor, ops: _PrefillOps) -> torch.Tensor:
        """h plus the layer's MLP of its post-attention norm."""
        x = ops.norm(layer.post_attention_layernorm, h)
        if self.gate_up:
            g, u = self.gate_up[i](x)
            return h + self.down[i](ops.act_mul(layer.mlp.act_fn, g, u))[0]
        return h + layer.mlp(x)


def _decode_step(dec: _Decoder, st: dict, seeds, sampling: SamplingConfig, tokens, logps, eos_id: int,
                 kv_len: Optional[int] = None) -> None:
    """One decode step on the state tensors, in place: attend (over the cache's first kv_len slots), sample,
    record, advance. Everything that varies between steps lives in tensors, so the step can be captured once per
    kv_len and replayed."""
    if dec.varlen:  # row r's token at position p goes to slot p and attends to slots [0, p]
        pos = st["pos"][:, 0]
        logits = dec.forward(st["cur"], st["pos"], st["base"] + pos, None, slice(None), used=(pos + 1).int())
    else:
        st["valid"].index_fill_(1, st["slot"], True)
        logits = dec.forward(st["cur"], st["pos"], st["slot"], st["valid"][:, None, None, :], slice(None), kv_len)
    tok, lp = sample_tokens(logits, seeds, st["step"], sampling, dec.sample_kernel, dec.topk_kernel)
    tokens.index_copy_(1, st["step"].view(1), tok.unsqueeze(1))
    logps.index_copy_(1, st["step"].view(1), lp.unsqueeze(1))
    st["done"] |= tok == eos_id
    st["cur"].copy_(tok.unsqueeze(1))
    st["pos"].add_(1)
    st["slot"].add_(1)
    st["step"].add_(1)




def _compiled_step(autotune: bool = False):
    """One compiled decode step per process (and mode): compiled code is cached on this function, so later rollouts
    (other batches, other prompt lengths: automatic dynamic shapes) reuse it instead of compiling again. autotune:
    inductor times Triton matrix-product templates against cuBLAS for each product's shape and keeps the faster
    (mode max-autotune-no-cudagraphs: the engine captures the graph itself), at minutes of compiling."""
    if autotune not in _COMPILED:
        _COMPILED[autotune] = torch.compile(_decode_step, mode="max-autotune-no-cudagraphs" if autotune else None)
    return _COMPILED[autotune]


class StaticEngine:
    """Static KV cache and CUDA-graph decoding (on CUDA; eager elsewhere).

    prefill_batch: prompts per prefill forward (the `batch_size` argument); every prompt of the call then decodes
    in one batch, which is what makes decoding fast. check_every: decode steps between checks for "all done".
    compile: on CUDA, the decode step goes through torch.compile first (norms, rotary embedding, activations, the
    hash sampler fuse into few kernels; a step of a 0.5B model is otherwise hundreds of tiny kernels), then the
    compiled step is captured in the graph. A step that fails to compile runs eagerly, with one notice. autotune:
    the step compiles with inductor's matrix-product autotuning (see _compiled_step); off by default.
    kv_block: attention reads the cache up to the filled length rounded up to a multiple of kv_block slots, not the
    whole cache; one graph is captured per such length (all in one memory pool). The KV cache is most of a decode
    step's memory traffic at large batches, and the filled part averages about (prompt + new / 2) of (prompt + new).
    0 (the default) reads the whole cache at every step (one graph). Blocks have not paid on an H200 at the
    Qwen2.5-0.5B shape (BENCHMARKS.md, rollout runs 3 and 4): 128-token prompts + 256 new tokens, batch 64: 0.52 s
    whole against 0.60 s in blocks of 64; batch 512, where a step's whole-cache read (2.4 GB) is 2.4x the weights'
    bytes: 1.21 s whole against 1.27 s in blocks.
    group_lora: LoRA adapters of sibling projections run as one pair of products per group (_LoraGroup); False runs
    each projection's own (peft) forward.
    attention: "masked" keeps the cache in left-padded columns and masks them at every step (the SDPA kernel then
    reads every slot, filled or not); "varlen" puts a row's token at position p in slot p and decodes through
    flash attention's varlen kernel, which reads each row's filled slots only and takes no mask; "varlen-triton"
    decodes the varlen layout with rlhf's own Triton kernel instead (rollout/triton_decode.py: the G query heads of
    a KV head in one small tile, each key read once; 21 us a layer against flash attention's 58 at the Qwen2.5-0.5B
    shape, batch 512, on an H200). "auto" (the default) picks varlen-triton on CUDA with a bf16/fp16 cache where
    Triton is installed, else varlen where `flash_varlen_available` (CUDA, Ampere or newer, a bf16/fp16 cache),
    masked elsewhere. "varlen-triton-rope" is varlen-triton with a decode step's rotary embedding, query layout and
    cache write inside the attention kernel (triton_decode.decode_attention_rope), where the compiled step
    otherwise runs them as three element-wise kernels a layer (about 8 us a layer at the shape above, BENCHMARKS.md
    rollout run 7); not measured on a GPU yet, so auto does not pick it. "varlen-reference" is the varlen layout
    with the masked product, on any device, for tests. kv_block applies to the masked layout only.
    compile_prefill: the prefill's norms, rotary embedding and SiLU products run as small functions compiled once
    per process with dynamic shapes (_PrefillOps), where the eager modules launch several kernels each over every
    prompt token: at the Qwen2.5-0.5B shape, 512 prompts of 128 tokens, those kernels were about 130 of the
    prefill's 203 ms of CUDA time (BENCHMARKS.md rollout run 7). Not measured yet, so off by default. With Liger's
    kernels on the model (PPO's policy on CUDA when liger-kernel is installed) its norms already run fused.
    timed: record the last rollout's phase times in `times` (prefill: the prompts' forwards and first draws;
    warmup: the decode steps before the graph and its capture; decode: the rest), synchronizing the device at each
    phase's end.
    sampler: "torch" draws with sample_tokens' torch operations, compiled into the step; "triton" draws without
    top-k/top-p in one Triton pass over the vocabulary (rollout/triton_sample.py: the same uniforms, the same
    argmax, so the same tokens), and with top-k takes bf16/fp16 candidates by a Triton radix select
    (rollout/triton_topk.py) in place of torch.topk (643 us of the filtered sampler's 726 at the shape below); it
    needs Triton. "auto" (the default) is the Triton pass on CUDA where Triton is installed (255 us a step against
    300 for the compiled torch operations at the Qwen2.5-0.5B shape, batch 512, on an H200: BENCHMARKS.md rollout
    run 7) with torch.topk for top-k (the radix select is not measured yet), torch elsewhere.

    stack_projections: plain (LoRA-free) q/k/v and gate/up projections run as one product per group over their
    weights stacked for the call (_StackedLinear): wider products at decode shapes, for a copy of those weights
    (about two thirds of the non-embedding weights of a SwiGLU model) held during the call. None (the default): on
    CUDA when that copy takes at most a tenth of the device's free memory (Qwen2.5-0.5B: 0.47 GB; on an H200 at
    that shape 1.10 s against 1.17 s at batch 512 and 0.51 s against 0.57 s at batch 64, BENCHMARKS.md rollout run
    5), off elsewhere.
    """

    ATTENTION = ("auto", "masked", "varlen", "varlen-triton", "varlen-triton-rope", "varlen-reference")

    def __init__(self, use_graph: Optional[bool] = None, check_every: int = 16, compile: Optional[bool] = None,
                 kv_block: int = 0, group_lora: bool = True, attention: str = "auto",
                 stack_projections: Optional[bool] = None, autotune: bool = False, sampler: str = "auto",
                 timed: bool = False, compile_prefill: bool = False):
        if sampler not in ("auto", "torch", "triton"):
            raise ValueError(f"static engine: sampler {sampler!r} is not one of auto, torch, triton")
        if sampler == "triton":
            from .triton_sample import available

            if not available():
                raise ValueError("static engine: sampler 'triton' needs Triton, which is not installed")
        self.sampler = sampler
        self.stack_projections = stack_projections
        self.autotune = autotune
        if attention not in self.ATTENTION:
            raise ValueError(f"static engine: attention {attention!r} is not one of {', '.join(self.ATTENTION)}")
        self.attention = attention
        self.use_graph = use_graph
        self.check_every = check_every
        self.compile = compile
        self.kv_block = kv_block
        self.group_lora = group_lora
        self.compile_error: Optional[str] = None  # why the last rollout's decode step ran eagerly, if it did
        self.timed = timed
        self.compile_prefill = compile_prefill
        # timed: the last rollout's phases in seconds (prefill, warm-up and capture, graph replays or eager steps),
        # each ended by a device synchronization (which the untimed engine does not pay)
        self.times: dict = {}

    @torch.no_grad()
    def generate(self, model, tokenizer, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                 batch_size: int = 32, seeds: Optional[Sequence[int]] = None) -> Rollout:
        reason = unsupported(model)
        if reason:
            raise ValueError(f"static engine: unsupported {reason}; use the hf engine")
        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
        device = next(model.parameters()).device
        triton_attention = self.attention.startswith("varlen-triton")
        kernels = [what for what, on in ((f"attention {self.attention!r}", triton_attention),
                                         ("sampler 'triton'", self.sampler == "triton")) if on]
        if kernels and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"static engine: {' and '.join(kernels)} run Triton kernels, which need a CUDA device "
                             f"(the model is on {device}); on a CPU they run only under Triton's interpreter "
                             "(TRITON_INTERPRET=1)")
        B, N = len(prompt_ids), sampling.max_new_tokens
        ids = pad(prompt_ids, tokenizer.pad_token_id, side="left").to(device)
        pmask = attention_mask(prompt_ids, side="left").to(device).bool()
        P = ids.shape[1]
        L = P + N
        if seeds is None:
            seed_t = torch.randint(0, 2**62, (B,), device=device)
        else:
            seed_t = torch.tensor([int(s) % 2**63 for s in seeds], dtype=torch.long, device=device)
        was_training = model.training
        model.eval()
        try:
            dec = _Decoder(model, B, L, self.group_lora, self._attention(model, device), self._stack(model, device),
                           sample_kernel=self._sample_kernel(device), topk_kernel=self.sampler == "triton",
                           compile_prefill=self.compile_prefill)
            tokens = torch.full((B, max(N, 1)), tokenizer.pad_token_id, dtype=torch.long, device=device)
            logps = torch.zeros((B, max(N, 1)), dtype=torch.float32, device=device)
            n_done = self._run(dec, ids, pmask, seed_t, sampling, tokens, logps, tokenizer.eos_token_id,
                               max(1, batch_size))
        finally:
            model.train(was_training)
        response, logps = tokens[:, :max(n_done, 1)], logps[:, :max(n_done, 1)]
        rmask, eos = response_mask_from_ids(response, tokenizer.eos_token_id)
        if N == 0:
            rmask, eos = torch.zeros_like(rmask), torch.zeros_like(eos)
        response = torch.where(rmask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
        texts = tokenizer.batch_decode(response, skip_special_tokens=True)
        return Rollout(ids, pmask.long(), response, rmask, eos, texts, logprobs=logps * rmask)

    def _stack(self, model, device: torch.device) -> bool:
        if self.stack_projections is not None:
            return self.stack_projections
        if device.type != "cuda":
            return False
        layers = _unwrap(model).model.layers
        names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
        stacked = 0
        for layer in layers:
            for name in names:
                try:
                    w = layer.get_submodule(name).weight
                except AttributeError:
                    continue
                if hasattr(w, "ds_numel"):  # ZeRO-3 partitions: the copy would be of whole gathered weights
                    return False
                stacked += w.numel() * w.element_size()
        return stacked <= torch.cuda.mem_get_info(device)[0] / 10

    def _sample_kernel(self, device: torch.device) -> bool:
        if self.sampler != "auto":
            return self.sampler == "triton"
        from .triton_sample import available

        return device.type == "cuda" and available()

    def _attention(self, model, device: torch.device) -> str:
        if self.attention != "auto":
            return self.attention
        # the cache holds what the k/v projections produce: the autocast dtype under autocast, else the weights'
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        else:
            dtype = _unwrap(model).model.embed_tokens.weight.dtype
        if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
            from .triton_decode import available

            if available():
                return "varlen-triton"
        return "varlen" if flash_varlen_available(device, dtype) else "masked"

    def _run(self, dec: _Decoder, ids, pmask, seeds, sampling, tokens, logps, eos_id: int, prefill_batch: int) -> int:
        """Fill tokens/logps [B, N] in place; returns how many steps were generated (all rows done may stop early)."""
        B, P = ids.shape
        N = sampling.max_new_tokens
        if N == 0:
            return 0
        device, L = ids.device, dec.max_len
        clock = self._clock(device)
        positions = position_ids_from_mask(pmask)
        # prefill: query t sees the real prompt tokens at slots <= t (itself always, so padded rows have no empty row)
        slot = torch.arange(L, device=device)
        causal = (slot[None, :] <= torch.arange(P, device=device)[:, None])  # [P, L]
        step0 = torch.zeros((), dtype=torch.long, device=device)
        for start in range(0, B, prefill_batch):
            r = slice(start, min(B, start + prefill_batch))
            valid = torch.zeros((r.stop - r.start, L), dtype=torch.bool, device=device)
            valid[:, :P] = pmask[r]
            mask = (causal[None] & valid[:, None, :]) | (slot[None, None, :] == torch.arange(P, device=device)[None, :, None])
            if dec.varlen:  # real tokens to slot = position; padding to the row's last slot, never read
                base = torch.arange(r.start, r.stop, device=device)[:, None] * L
                flat = base + torch.where(pmask[r], positions[r], L - 1)
                logits = dec.forward(ids[r], positions[r], flat.reshape(-1), mask.unsqueeze(1), r, prefill=True)
            else:
                logits = dec.forward(ids[r], positions[r], slot[:P], mask.unsqueeze(1), r, prefill=True)
            tok, lp = sample_tokens(logits, seeds[r], step0, sampling, dec.sample_kernel, dec.topk_kernel)
            tokens[r, 0], logps[r, 0] = tok, lp
        clock("prefill")
        # decode state, in tensors the graph reads and advances in place
        state = {
            "cur": tokens[:, :1].clone(),
            "pos": positions[:, -1:] + 1,
            "slot": torch.full((1,), P, dtype=torch.long, device=device),
            "step": torch.ones((), dtype=torch.long, device=device),
            "valid": torch.cat([pmask, torch.zeros((B, N), dtype=torch.bool, device=device)], dim=1),
            "done": tokens[:, 0] == eos_id,
            "base": torch.arange(B, device=device) * L,
        }

        on_cuda = device.type == "cuda"
        use_graph = self.use_graph if self.use_graph is not None else on_cuda
        compile = self.compile if self.compile is not None else on_cuda
        fn = _compiled_step(self.autotune) if compile else _decode_step
        args = (dec, state, seeds, sampling, tokens, logps, eos_id)

        def decode_step(kv_len: int) -> None:
            nonlocal fn
            try:
                fn(*args, kv_len)
            except Exception as e:  # noqa: BLE001 - a compiler failure must not stop the rollout
                if fn is _decode_step:
                    raise
                self.compile_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                print(f"static engine: torch.compile failed ({self.compile_error}); decoding eagerly")
                fn = _decode_step
                fn(*args, kv_len)

        block = self.kv_block if self.kv_block > 0 and not dec.varlen else L
        steps, graphs, warm, graphs_running = 1, {}, {}, False
        side = torch.cuda.Stream() if use_graph else None
        while steps < N:
            if steps % self.check_every == 0 and bool(state["done"].all()):
                break
            # this step writes slot P + steps - 1 and attends to the slots before it and itself
            kv_len = min(L, -(-(P + steps) // block) * block)
            graph = graphs.get(kv_len)
            if use_graph and graph is None and warm.get(kv_len, 0) >= 2:  # warm-up steps first (they compile)
                pool = next(iter(graphs.values())).pool() if graphs else None
                graph = graphs[kv_len] = self._capture(lambda: decode_step(kv_len), pool)
            if graph is not None:
                if not graphs_running:
                    clock("warmup")
                    graphs_running = True
                graph.replay()
            elif side is not None:  # warm-up on a side stream, as graph capture wants
                warm[kv_len] = warm.get(kv_len, 0) + 1
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    decode_step(kv_len)
                torch.cuda.current_stream().wait_stream(side)
            else:
                decode_step(kv_len)
            steps += 1
        clock("decode" if graphs_running else "warmup")
        return steps

    def _clock(self, device: torch.device):
        """clock(phase): the seconds since the last call go to times[phase] (nothing unless timed)."""
        self.times = {}
        if not self.timed:
            return lambda phase: None
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        last = [time.perf_counter()]

        def clock(phase: str) -> None:
            sync()
            now = time.perf_counter()
            self.times[phase] = self.times.get(phase, 0.0) + now - last[0]
            last[0] = now
        return clock

    @staticmethod
    def _capture(step_fn, pool=None):
        """Record one decode step (recording runs nothing: the steps so far were real, the replays are the rest).
        Graphs of one rollout share a memory pool: they never run at the same time."""
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            step_fn()
        return graph
