"""Forward passes shared by every algorithm and the evaluation harness.

Left- or right-padded batches both work: position ids are derived from the attention mask.

Log-probs of a causal LM come from its hidden states, not from its logits: the model runs through its wrapper (DDP,
DeepSpeed, FSDP, peft) with `logits_to_keep=1`, a forward hook on the decoder keeps the final hidden states, and the
LM head is applied in chunks of `logprob_chunk_size` tokens, only at the positions asked for. A chunk's logits live in
the model's dtype, are upcast to float32 one chunk at a time, and are recomputed in backward (activation checkpointing
per chunk), so neither the [B, T, V] logits nor their float32 copy ever exist: at a 152k vocabulary that copy alone
is 0.6 MB per token. Models whose logits are not plainly `lm_head(last_hidden_state)` (soft-capped or scaled logits,
a LoRA-wrapped head, custom code without `logits_to_keep`) take the plain full-logits path, as does a chunk size of 0.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..ops import entropy_from_logits, logprobs_from_logits, masked_sum

# Tokens per LM-head chunk. The working set of one chunk is ~20 bytes x chunk x V (bf16 logits, their float32 copy,
# softmax and gradient in backward): 1024 x 152k gives ~3 GB, while chunks of 1024 rows still keep the head's
# matmul efficient (M = 1024 against N = V).
DEFAULT_CHUNK_TOKENS = 1024


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] positions counting only real tokens, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _unwrap(model):
    """The transformers model inside distributed wrappers (DDP, DeepSpeed: `.module`) and peft."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "peft_config") and hasattr(model, "base_model"):
        model = model.base_model.model  # adapters stay active: they are injected in place
    return model


def chunk_tokens(model) -> int:
    """The LM-head chunk size set on the model at load time (model.logprob_chunk_size), else the default."""
    n = getattr(_unwrap(model), "logprob_chunk_size", None)
    return DEFAULT_CHUNK_TOKENS if n is None else int(n)


def _lm_parts(model):
    """(decoder, lm_head) when the model's logits are exactly lm_head(decoder(...)[0]); None otherwise."""
    inner = _unwrap(model)
    cfg = getattr(inner, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    get_decoder = getattr(inner, "get_decoder", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    # a plain Linear only: a LoRA-wrapped or otherwise modified head keeps the model's own forward
    if get_decoder is None or type(head) is not torch.nn.Linear:
        return None
    try:
        decoder = get_decoder()
        takes_keep = "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return None
    if not isinstance(decoder, torch.nn.Module) or decoder is inner or not takes_keep:
        return None
    return decoder, head


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, module: torch.nn.Module,
                  position_ids: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
    """The output (first element) of `module`, a submodule of `model`, from one forward of the whole `model`.

    The forward goes through `model` itself, wrappers included, so DDP and DeepSpeed see it and sync gradients, and
    ZeRO-3/FSDP gather the weights the way they do for any forward.
    """
    captured: list[torch.Tensor] = []

    def keep(_m, _i, out):
        captured.append(out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out)

    handle = module.register_forward_hook(keep)
    try:
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
              **kwargs)
    finally:
        handle.remove()
    return captured[-1]


def _head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, temperature: float,
                   top_k: int, top_p: float, return_entropy: bool):
    logits = head(hidden)  # the module itself: ZeRO-3 gathers its weight inside its forward
    if temperature == 1.0 and top_k <= 0 and top_p >= 1.0 and not return_entropy:
        # no filter: logprobs_from_logits' arithmetic (z_y - logsumexp(z) in float32) with at most one float32 copy
        # of the chunk (none on CUDA, compiled) instead of its three (label gather, filtered copy, label scatter)
        picked, lse = _fused(_pick_and_lse)(logits, labels)
        return picked - lse
    logp = logprobs_from_logits(logits[None], labels[None], temperature=temperature, top_k=top_k, top_p=top_p)[0]
    if return_entropy:
        return logp, entropy_from_logits(logits[None], temperature=temperature)[0]
    return logp


def _pick_and_lse(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_y, logsumexp(z)) per row of one chunk's logits [n, V], in float32 for half-precision logits."""
    zf = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z  # float64 stays
    return zf.gather(-1, labels.unsqueeze(-1)).squeeze(-1), torch.logsumexp(zf, dim=-1)


def _logit_grad(z: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, labels: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """d(sum_i g_i log p_i(y_i))/dz = g * (onehot(y) - softmax(z)) for one chunk [n, V], computed in lse's dtype and
    returned in `dtype` (the matmuls'). The one-hot term is a comparison, not a scatter, so that compiled this is one
    pass over the logits (read in their dtype, written in `dtype`); g - p g is the same float as (-p g) + g."""
    g = g.to(lse.dtype).unsqueeze(-1)
    p_g = torch.exp(z.to(lse.dtype) - lse.unsqueeze(-1)) * g
    onehot = torch.arange(z.shape[-1], device=z.device) == labels.unsqueeze(-1)
    return torch.where(onehot, g - p_g, -p_g).to(dtype)


_FUSED: dict = {}


def _fused(fn):
    """fn compiled (one kernel per pass over a chunk's logits: the float32 copies never exist) on CUDA where no
    gradient flows through it (the custom Function's forward and backward, no-grad scoring); fn itself elsewhere
    (CPU, a checkpointed chunk that backward differentiates), and after a compile failure, which is reported once."""
    name = fn.__name__
    if name not in _FUSED:
        _FUSED[name] = torch.compile(fn, dynamic=True)

    def call(z, *args):
        if not z.is_cuda or _FUSED[name] is None or (torch.is_grad_enabled() and z.requires_grad):
            return fn(z, *args)
        try:
            return _FUSED[name](z, *args)
        except Exception as e:  # noqa: BLE001 - a compiler failure must not stop training
            print(f"LM-head log-probs: torch.compile of {name} failed ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200]}); running it eagerly")
            _FUSED[name] = None
            return fn(z, *args)
    return call


class _PlainHeadLogprob(torch.autograd.Function):
    """log softmax(hidden W^T + b)[labels] of one chunk, no temperature or filter (SFT, DPO), float32 for half-precision
    logits. Saves only hidden and the [n] log-sum-exp; backward recomputes the chunk's logits and turns them into
    their gradient g * (onehot(y) - softmax(z)) (_logit_grad). This is the checkpointed chunk's arithmetic (same
    matmuls in the same dtypes, the same float32 softmax) with fewer passes over the [chunk, V] logits, which at a
    150k vocabulary are most of the head's GPU time. On CUDA those passes are compiled (_pick_and_lse, _logit_grad):
    one read of the bf16 logits in forward, one read and one write in backward, with no float32 copy; eagerly (CPU)
    the float32 temporaries of a chunk exist one after another."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, dtype):
        z = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        picked, lse = _fused(_pick_and_lse)(z, labels)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.dtype = dtype
        return picked - lse

    @staticmethod
    def backward(ctx, g):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        dtype = ctx.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        z = F.linear(h, w, None if bias is None else bias.to(dtype))
        gz = _fused(_logit_grad)(z, lse, g, labels, dtype)
        gh = (gz @ w).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        gw = (gz.t() @ h).to(weight.dtype) if ctx.needs_input_grad[1] else None
        gb = gz.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return gh, gw, gb, None, None


def logprobs_from_hidden(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                         top_k: int = 0, top_p: float = 1.0, return_entropy: bool = False,
                         chunk_size: int = DEFAULT_CHUNK_TOKENS):
    """[N] log pi(labels | hidden) (and [N] entropies) with logits = head(hidden), chunk by chunk.

    hidden [N, H], labels [N]. Each chunk is exactly ops.logprobs_from_logits of head(chunk), so temperature, top-k
    and top-p act as in sampling and the numbers equal the full-logits path up to the head's matmul rounding.
    With gradients on, each chunk is checkpointed: backward recomputes its logits, so only one chunk's [chunk, V]
    logits are alive at any time, in forward and in backward (not under ZeRO-3, see below).
    """
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    # DeepSpeed ZeRO-3 does not gather a partitioned head weight again when backward recomputes a chunk (seen with a
    # frozen LoRA base: the recomputed weight is the empty partition), so there each chunk keeps its logits instead
    recompute = grad and not any(hasattr(p, "ds_id") for p in head.parameters())
    # _PlainHeadLogprob stands in for a recomputed chunk of a plain Linear head (not one wrapped by an adapter)
    plain = (recompute and type(head) is torch.nn.Linear and temperature == 1.0 and top_k <= 0 and top_p >= 1.0
             and not return_entropy)
    if plain:
        from .fused_layers import compute_dtypes

        dtype = compute_dtypes(hidden.device.type, hidden.dtype, None)[0]
    logps, entropies = [], []
    for start in range(0, hidden.shape[0], max(chunk_size, 1)):
        args = (head, hidden[start:start + chunk_size], labels[start:start + chunk_size], temperature, top_k, top_p,
                return_entropy)
        if plain:
            logps.append(_PlainHeadLogprob.apply(args[1], head.weight, head.bias, args[2], dtype))
            continue
        # nothing random happens in the head (dropout is off), so no RNG state needs stashing per chunk
        out = (checkpoint(_head_logprobs, *args, use_reentrant=False, preserve_rng_state=False) if recompute
               else _head_logprobs(*args))
        logp, entropy = out if return_entropy else (out, None)
        logps.append(logp)
        entropies.append(entropy)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return (empty, empty) if return_entropy else empty
    logp = torch.cat(logps)
    return (logp, torch.cat(entropies)) if return_entropy else logp


def _full_logits_logprobs(model, input_ids, attention_mask, temperature, top_k, top_p, return_entropy):
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    logits = out.logits[:, :-1].float()
    logp = logprobs_from_logits(logits, input_ids[:, 1:], temperature=temperature, top_k=top_k, top_p=top_p)
    if return_entropy:
        return logp, entropy_from_logits(logits, temperature=temperature)
    return logp


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, return_entropy: bool = False,
                   positions: Optional[torch.Tensor] = None):
    """[B, T-1] log p(input_ids[:, t+1] | input_ids[:, :t+1]) under the sampling distribution (float32).

    temperature/top_k/top_p must equal the ones used to sample, or PPO's importance ratio is biased.
    positions [B, T-1] (optional, 0/1 or bool): compute only where it is set (e.g. response tokens); elsewhere the
    result is 0 (and the entropy 0). Without it every position is computed.
    """
    parts = _lm_parts(model)
    chunk = chunk_tokens(model)
    if parts is None or chunk <= 0:
        out = _full_logits_logprobs(model, input_ids, attention_mask, temperature, top_k, top_p, return_entropy)
        if positions is None:
            return out
        keep = positions != 0
        zero = torch.zeros((), dtype=torch.float32, device=input_ids.device)
        if return_entropy:
            return torch.where(keep, out[0], zero), torch.where(keep, out[1], zero)
        return torch.where(keep, out, zero)
    decoder, head = parts
    hidden = hidden_states(model, input_ids, attention_mask, decoder, logits_to_keep=1)[:, :-1]
    labels = input_ids[:, 1:]
    B, T1 = labels.shape
    if positions is None:
        result = logprobs_from_hidden(head, hidden.reshape(B * T1, -1), labels.reshape(-1), temperature, top_k,
                                      top_p, return_entropy, chunk)
        return tuple(r.view(B, T1) for r in result) if return_entropy else result.view(B, T1)
    keep = positions != 0
    result = logprobs_from_hidden(head, hidden[keep], labels[keep], temperature, top_k, top_p, return_entropy, chunk)

    def scatter(values: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(B, T1, dtype=values.dtype, device=values.device)
        return dense.masked_scatter(keep, values)

    return tuple(scatter(r) for r in result) if return_entropy else scatter(result)


def flat_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        positions: torch.Tensor) -> torch.Tensor:
    """token_logprobs(model, input_ids, attention_mask, positions=positions) with the B rows laid end to end in one
    unpadded row (model.pair_packing varlen): each row is one document of the variable-length attention, over its own
    tokens only, with positions from 0, so it gives each row's log-probs as padded rows do, without computing the
    padding. Rows may sit on the CPU (the layout is built there) and are moved to the model's device. [B, T-1] float32,
    0 off `positions`."""
    from .shared_prefix import PairVarlen

    parts = _lm_parts(model)
    chunk = chunk_tokens(model)
    device = next(_unwrap(model).parameters()).device
    if parts is None or chunk <= 0:
        return token_logprobs(model, input_ids.to(device), attention_mask.to(device), positions=positions.to(device))
    real = attention_mask.cpu().bool()
    ids, positions = input_ids.cpu(), positions.cpu()
    mask, extra = _varlen_inputs(PairVarlen.rows(real.sum(1).tolist()), device)
    flat_ids = ids[real][None].to(device)
    flat_positions = position_ids_from_mask(real.long())[real][None].to(device)
    B, T = ids.shape
    index = real.flatten().cumsum(0).view(B, T) - 1  # flat position of each real token
    keep = (positions != 0) & real[:, :-1] & real[:, 1:]
    decoder, head = parts
    hidden = hidden_states(model, flat_ids, mask, decoder, position_ids=flat_positions, logits_to_keep=1,
                           **extra)[0]
    logp = logprobs_from_hidden(head, hidden[index[:, :-1][keep].to(device)], ids[:, 1:][keep].to(device),
                                chunk_size=chunk)
    keep = keep.to(device)
    return torch.zeros(B, T - 1, dtype=logp.dtype, device=device).masked_scatter(keep, logp)


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] scalar head of a sequence-classification model at every position (V(s_t) reads position t).

    The forward goes through `model` itself, wrappers included, so DDP/DeepSpeed see it and sync
    gradients; the per-position head outputs are taken with a hook before the model pools them.
    A sequence-classification model has no LM head: the only vocabulary-sized weight it touches is the embedding.
    """
    head = _unwrap(model).score
    return hidden_states(model, input_ids, attention_mask, head).squeeze(-1).float()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last real token, for right- or left-padded rows."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def scalar_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] reward-model score read at the last real token of each row."""
    values = token_values(model, input_ids, attention_mask)
    idx = last_token_index(attention_mask)
    return values.gather(1, idx.unsqueeze(1)).squeeze(1)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] summed log-prob of each row's response tokens, [B] their count).

    response_mask [B, T-1] is aligned with token_logprobs: 1 where input_ids[:, t+1] is a response token; only those
    positions go through the LM head. The length-averaged log-prob (IPO, SimPO-style losses) is sum / count.clamp(min=1).
    """
    logp = token_logprobs(model, input_ids, attention_mask, positions=response_mask)
    mask = response_mask.to(logp.dtype)
    return masked_sum(logp, mask, dim=-1), mask.sum(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Pairs (DPO, reward model): the prompt once per pair, one row per pair or all in one (rlhf.models.shared_prefix)
# ---------------------------------------------------------------------------------------------------------------------


def shares_prefix(model) -> bool:
    """Whether the model takes the shared-prefix layouts: an attention kernel with arbitrary 4D masks (sdpa, eager)."""
    from .shared_prefix import MASKABLE

    inner = _unwrap(model)
    impl = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    return impl in MASKABLE and getattr(inner, "shared_prefix", True)


def pair_layout(model) -> str:
    """How pairs are laid out: "varlen" (every micro-batch flat, torch's varlen flash attention), "flex" (every
    micro-batch flat, FlexAttention), "auto" (flat through FlexAttention when it pays, shared_prefix.flat_pays) or
    "padded": model.pair_packing as resolved at load time; flat layouts need the SDPA_FLEX attention."""
    from .shared_prefix import SDPA_FLEX

    inner = _unwrap(model)
    layout = getattr(inner, "pair_packing", "padded")
    flat = layout in ("varlen", "flex", "auto") and inner.config._attn_implementation == SDPA_FLEX
    return layout if flat else "padded"


def _pair_inputs(model, packed) -> tuple[Any, dict]:
    """The attention mask of a packed batch in the form the attention kernel reads, and the forward's extra keywords.

    The flat layout with PairVarlen documents: _varlen_inputs. The flat layout otherwise: its BlockMask. The padded
    one: a dense mask, bool (True = attend) for sdpa and additive for eager. torch's flex_attention has no backward on
    the CPU, so there a flat batch that needs gradients hands SDPA the same rule as a dense [1, 1, L, L] mask."""
    from .shared_prefix import SDPA_FLEX

    inner = _unwrap(model)
    device = packed.input_ids.device
    if packed.varlen is not None:
        return _varlen_inputs(packed.varlen, device)
    if packed.flat:
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in inner.parameters())
        if device.type != "cpu" or not needs_grad:
            return packed.block_mask(), {}
    mask = packed.mask
    if inner.config._attn_implementation in ("sdpa", SDPA_FLEX):
        return mask, {}
    dtype = next(inner.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min), {}


def _varlen_inputs(documents, device) -> tuple[torch.Tensor, dict]:
    """(attention mask, forward keywords) of a row attended through shared_prefix.PairVarlen documents: a [1, 1, 1, 1]
    placeholder (a 4D mask passes transformers' mask building untouched) and the documents as keywords
    (shared_prefix.VARLEN_KWARGS)."""
    from .shared_prefix import varlen_kwargs

    return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device), varlen_kwargs(documents.to(device))


def _packed(model, input_ids, attention_mask, response_mask, device):
    from .shared_prefix import pack_pairs

    pad = getattr(_unwrap(model).config, "pad_token_id", None) or 0
    layout = pair_layout(model)
    flat = "auto" if layout == "auto" else layout in ("flex", "varlen")
    return pack_pairs(input_ids.cpu(), attention_mask.cpu(), response_mask.cpu(), pad, flat,
                      varlen=layout == "varlen").to(device)


def pair_sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logprobs of a PairBatch's 2B rows (chosen rows first): ([2B] summed response log-probs, [2B] counts).

    With a maskable attention kernel each pair runs with its prompt once (shared_prefix: one row per pair, or all
    pairs in one row for model.pair_packing=flex); otherwise as the 2B rows themselves. Rows may sit on the CPU: they
    are packed there and moved to the model's device.
    """
    device = next(_unwrap(model).parameters()).device
    if not shares_prefix(model):
        return sequence_logprobs(model, input_ids.to(device), attention_mask.to(device), response_mask.to(device))
    packed = _packed(model, input_ids, attention_mask, response_mask, device)
    mask, extra = _pair_inputs(model, packed)
    labels = packed.input_ids.reshape(-1)[packed.target]
    parts = _lm_parts(model)
    chunk = chunk_tokens(model)
    if parts is None or chunk <= 0:
        out = model(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                    use_cache=False, **extra)
        logits = out.logits.reshape(-1, out.logits.shape[-1])[packed.source].float()
        logp = logprobs_from_logits(logits[None], labels[None])[0]
    else:
        decoder, head = parts
        hidden = hidden_states(model, packed.input_ids, mask, decoder, position_ids=packed.position_ids,
                               logits_to_keep=1, **extra)
        logp = logprobs_from_hidden(head, hidden.reshape(-1, hidden.shape[-1])[packed.source], labels,
                                    chunk_size=chunk)
    n = packed.last.numel()
    sums = torch.zeros(n, dtype=logp.dtype, device=device).index_add(0, packed.owner, logp)
    counts = torch.bincount(packed.owner, minlength=n).to(logp.dtype)
    return sums, counts


def pair_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor) -> torch.Tensor:
    """[2B] reward-model scores of a PairBatch's rows (chosen rows first), read at each response's last token."""
    device = next(_unwrap(model).parameters()).device
    if not shares_prefix(model):
        return scalar_scores(model, input_ids.to(device), attention_mask.to(device))
    packed = _packed(model, input_ids, attention_mask, response_mask, device)
    mask, extra = _pair_inputs(model, packed)
    values = hidden_states(model, packed.input_ids, mask, _unwrap(model).score, position_ids=packed.position_ids,
                           **extra)
    return values.reshape(-1)[packed.last].float()
