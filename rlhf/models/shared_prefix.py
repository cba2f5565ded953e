"""Chosen and rejected responses of a pair after one copy of their shared prompt, in one of two layouts.

    padded (one row per pair):  row i: [prompt_i, chosen_i, rejected_i, pad...]
    flat (all pairs in one row): [prompt_0, chosen_0, rejected_0, prompt_1, chosen_1, rejected_1, ..., pad...]

A PairBatch holds 2B rows, each with its own copy of the prompt; these layouts run the prompt once per pair, so a
forward processes sum(P + C + R) tokens instead of sum(2P + C + R) (a quarter fewer at 256 + 256 + 256). The rejected
tokens must not see the chosen ones: each query sees the keys of its own prompt and its own segment causally, and
nothing else; position ids restart after the prompt for the rejected segment, so every token sees exactly the context
and positions it has in its own row. The first response token of either segment is predicted from the last prompt
token's hidden state.

The padded layout hands the model a dense [B, 1, L, L] mask (SDPA or eager attention). The flat layout has no padding
between pairs, only up to a multiple of FlexAttention's block size at the end, and hands the model a BlockMask built
from the same rule (`pair_mask_mod`): FlexAttention skips the blocks no query sees (other pairs, the chosen segment for
rejected queries) and keeps its fused kernel, where SDPA with an arbitrary mask leaves its flash kernel. With
model.pair_packing=varlen the flat layout runs instead through torch's variable-length flash attention
(`varlen_attn`, CUDA, 16-bit; no mask and no compile): each pair is two attention documents, its prompt and chosen tokens over themselves (causal),
and its rejected tokens over the prompt's keys followed by their own (causal, aligned at the bottom right), so the
queries stay in row order and only the keys are gathered (`PairVarlen`).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

# SDPA for every forward, flex_attention for a BlockMask (the flat pair layout): the attention implementation a model
# takes for model.pair_packing=flex (sdpa_or_flex_attention)
SDPA_FLEX = "rlhf_sdpa_flex"
# attention kernels that take an arbitrary 4D mask (flash-attention takes none)
MASKABLE = ("sdpa", "eager", SDPA_FLEX)
# FlexAttention's block size: the flat row's length is a multiple of it
FLEX_BLOCK = 128
# model.pair_packing=auto takes the flat layout for a micro-batch when the padded one would hold more than this many
# times its real tokens. On an H200 at the Qwen2.5-0.5B shape (BENCHMARKS.md, training run D) a DPO step of 8 equal
# pairs (no padding) took 0.105 s padded and 0.126 s flat; with lengths as in UltraFeedback (padded 1.67x the real
# tokens) 0.217 s padded and 0.135 s flat: the two break even near 1.2x.
FLAT_ABOVE_PADDING = 1.2


def pair_mask_mod(document: torch.Tensor, segment: torch.Tensor):
    """The attention rule of both layouts as a FlexAttention mask_mod over [R, L] per-position tensors.

    document: the pair a position belongs to (-1 padding); segment: 0 prompt, 1 chosen, 2 rejected, -1 padding. A query
    sees earlier keys of its own pair that are prompt or in its own segment; padding is a document of its own and sees
    the padding before it (a query with no keys would give NaN in softmax).
    """

    def mask_mod(b, h, q, kv):
        seg_kv = segment[b, kv]
        return (q >= kv) & (document[b, q] == document[b, kv]) & ((seg_kv == 0) | (seg_kv == segment[b, q]))

    return mask_mod


@dataclass
class PairVarlen:
    """The flat layout as documents of torch's variable-length attention. Queries are the row's L positions in order;
    document 2i is pair i's prompt and chosen tokens over their own keys, document 2i+1 its rejected tokens over the
    prompt's keys and then their own, and a last document the padding up to L over itself. Causal masking aligns each
    document's last query with its last key, so rejected token j sees the prompt and rejected tokens 0..j.

    key_index: [K] row positions of the keys, document after document; cu_q, cu_k: [D + 1] int32 offsets of the
    documents' queries and keys; max_q, max_k: the longest document of each.
    """

    key_index: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int

    def to(self, device) -> "PairVarlen":
        return PairVarlen(self.key_index.to(device), self.cu_q.to(device), self.cu_k.to(device), self.max_q,
                          self.max_k)

    @classmethod
    def of(cls, lengths: list[tuple[int, int, int]], L: int) -> "PairVarlen":
        """From (prompt, chosen, rejected) token counts of the pairs laid end to end in a row of L positions."""
        keys, q_lens, k_lens, o = [], [], [], 0
        for P, C, R in lengths:
            keys += [range(o, o + P + C), range(o, o + P), range(o + P + C, o + P + C + R)]
            q_lens += [P + C, R]
            k_lens += [P + C, P + R]
            o += P + C + R
        if L > o:  # padding: a document of its own
            keys.append(range(o, L))
            q_lens.append(L - o)
            k_lens.append(L - o)
        index = torch.tensor([k for r in keys for k in r], dtype=torch.long)
        cu_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        cu_k = torch.tensor([0] + k_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return cls(index, cu_q, cu_k, max(q_lens), max(k_lens))

    @classmethod
    def rows(cls, lengths: list[int]) -> "PairVarlen":
        """Whole rows of these token counts laid end to end (SFT's flat layout): each row one document over its own
        keys, causal."""
        total = sum(lengths)
        cu = torch.tensor([0] + list(lengths), dtype=torch.int32).cumsum(0, dtype=torch.int32)
        longest = max(lengths, default=0)
        return cls(torch.arange(total), cu, cu.clone(), longest, longest)


@dataclass
class SharedPrefixBatch:
    """B pairs in R rows of L tokens (padded: R = B; flat: R = 1, L a multiple of FLEX_BLOCK, or with varlen
    documents the pairs' tokens exactly).

    input_ids, position_ids, document, segment: [R, L] (document, segment: see pair_mask_mod)
    source, target: [N] flat indices into [R * L]: the hidden state at `source` predicts the token at `target`, for
    every response token of every pair (chosen tokens first within a pair, then rejected)
    owner: [N] which of the 2B sequences (chosen i -> i, rejected i -> B + i) a response token belongs to
    last: [2B] flat index of the last token of chosen i (i) and rejected i (B + i)
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    document: torch.Tensor
    segment: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor
    owner: torch.Tensor
    last: torch.Tensor
    flat: bool = False
    varlen: Optional["PairVarlen"] = None  # the flat layout's attention documents (pack_pairs(varlen=True))

    def to(self, device) -> "SharedPrefixBatch":
        tensors = (getattr(self, f).to(device) for f in self.__dataclass_fields__ if f not in ("flat", "varlen"))
        return SharedPrefixBatch(*tensors, flat=self.flat,
                                 varlen=None if self.varlen is None else self.varlen.to(device))

    @property
    def mask(self) -> torch.Tensor:
        """[R, 1, L, L] bool, True where query l may attend key k."""
        R, L = self.segment.shape
        ar = torch.arange(L, device=self.segment.device)
        b = torch.arange(R, device=self.segment.device)[:, None, None, None]
        return pair_mask_mod(self.document, self.segment)(b, None, ar[:, None], ar)

    def block_mask(self):
        """The flat layout's BlockMask. On CUDA create_block_mask is compiled (block by block, never the [L, L] mask):
        a new L recompiles it, and after the second torch's automatic dynamic shapes keep L symbolic, so with L a
        multiple of FLEX_BLOCK the compiles stay few (the same holds for flex_attention itself)."""
        from torch.nn.attention.flex_attention import create_block_mask

        R, L = self.segment.shape
        if R != 1:
            raise ValueError(f"a block mask is built for the flat layout (one row), not for {R} rows")
        device = self.segment.device
        return create_block_mask(pair_mask_mod(self.document, self.segment), B=None, H=None, Q_LEN=L, KV_LEN=L,
                                 device=device, _compile=device.type == "cuda")


def split_pair_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor):
    """[(prompt, chosen, rejected)] token lists from a PairBatch's 2B right-padded rows (chosen rows first)."""
    B = input_ids.shape[0] // 2
    lengths = attention_mask.sum(1).tolist()
    # response_mask[:, t] marks target t + 1: the prompt is everything before the first marked target
    prompt_len = [int(r.nonzero()[0]) + 1 if r.any() else n for r, n in zip(response_mask, lengths)]
    out = []
    for i in range(B):
        c, r = i, B + i
        p = prompt_len[c]
        if prompt_len[r] != p or not torch.equal(input_ids[c, :p], input_ids[r, :p]):
            raise ValueError(f"pair {i}: chosen and rejected rows do not share their prompt")
        ids_c, ids_r = input_ids[c].tolist(), input_ids[r].tolist()
        out.append((ids_c[:p], ids_c[p:lengths[c]], ids_r[p:lengths[r]]))
    return out


def flat_pays(sizes: list[int]) -> bool:
    """Whether pairs of these token counts take the flat layout under model.pair_packing=auto: when one row per pair
    would pad them to more than FLAT_ABOVE_PADDING times their tokens."""
    return len(sizes) * max(sizes) > FLAT_ABOVE_PADDING * sum(sizes)


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
               pad_id: int = 0, flat: Union[bool, Literal["auto"]] = False,
               varlen: bool = False) -> SharedPrefixBatch:
    """The padded (one row per pair) or flat (one row) layout of a PairBatch's rows (built on the CPU: a few list
    operations per pair); flat="auto" chooses by the padding the padded layout would add (flat_pays). varlen: a flat
    batch also gets its PairVarlen documents."""
    pairs = split_pair_rows(input_ids, attention_mask, response_mask)
    B = len(pairs)
    sizes = [len(p) + len(c) + len(r) for p, c, r in pairs]
    if flat == "auto":
        flat = flat_pays(sizes)
    if flat:
        rows, starts = [0] * B, [sum(sizes[:i]) for i in range(B)]
        L = sum(sizes) if varlen else -(-sum(sizes) // FLEX_BLOCK) * FLEX_BLOCK  # FlexAttention's blocks
    else:
        rows, starts, L = list(range(B)), [0] * B, max(sizes)
    ids = torch.full((rows[-1] + 1, L), pad_id, dtype=torch.long)
    pos = torch.zeros_like(ids)
    document, segment = torch.full_like(ids, -1), torch.full_like(ids, -1)
    source, target, owner, last = [], [], [], [0] * (2 * B)
    for i, ((p, c, r), row, o) in enumerate(zip(pairs, rows, starts)):
        P, C, R = len(p), len(c), len(r)
        ids[row, o:o + P + C + R] = torch.tensor(p + c + r)
        pos[row, o:o + P + C] = torch.arange(P + C)
        pos[row, o + P + C:o + P + C + R] = torch.arange(P, P + R)
        document[row, o:o + P + C + R] = i
        segment[row, o:o + P], segment[row, o + P:o + P + C], segment[row, o + P + C:o + P + C + R] = 0, 1, 2
        base = row * L + o
        for start, n, seq in ((P, C, i), (P + C, R, B + i)):
            src = [base + P - 1] + [base + start + j for j in range(n - 1)]
            source += src[:n]
            target += [base + start + j for j in range(n)]
            owner += [seq] * n
            last[seq] = base + start + n - 1 if n else base + P - 1
    documents = PairVarlen.of([(len(p), len(c), len(r)) for p, c, r in pairs], L) if flat and varlen else None
    return SharedPrefixBatch(ids, pos, document, segment, torch.tensor(source, dtype=torch.long),
                             torch.tensor(target, dtype=torch.long), torch.tensor(owner, dtype=torch.long),
                             torch.tensor(last, dtype=torch.long), flat=bool(flat), varlen=documents)


# ---------------------------------------------------------------------------------------------------------------------
# The attention implementation of the flat layout: SDPA, and flex_attention for a BlockMask
# ---------------------------------------------------------------------------------------------------------------------


def _varlen_params() -> Optional[frozenset]:
    """The keyword names of torch's varlen_attn, None where torch has none. Its forms differ by release: is_causal or
    window_size for causal masking, with or without scale and enable_gqa (_varlen_call adapts to each)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


VARLEN_PARAMS = _varlen_params()
# the forward keywords that carry a PairVarlen to the attention function (through transformers' **kwargs)
VARLEN_KWARGS = ("pair_key_index", "pair_cu_q", "pair_cu_k", "pair_max_q", "pair_max_k")


def varlen_kwargs(documents: PairVarlen) -> dict:
    return dict(zip(VARLEN_KWARGS, (documents.key_index, documents.cu_q, documents.cu_k, documents.max_q,
                                    documents.max_k)))


def varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     scale: Optional[float]) -> torch.Tensor:
    """What varlen_attn computes with causal masking aligned at each document's bottom right, one SDPA call per
    document: the CPU's path (tests) and float32's (flash attention takes 16-bit inputs only).
    q [Tq, H, D], k and v [Tk, Hkv, D] -> [Tq, H, D]."""
    out = []
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for d in range(len(bounds_q) - 1):
        (qs, qe), (ks, ke) = bounds_q[d:d + 2], bounds_k[d:d + 2]
        n, m = qe - qs, ke - ks
        if n == 0:
            continue
        allowed = torch.arange(m, device=q.device)[None] <= torch.arange(n, device=q.device)[:, None] + (m - n)
        o = torch.nn.functional.scaled_dot_product_attention(
            q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1), v[ks:ke].transpose(0, 1), attn_mask=allowed,
            scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        out.append(o.transpose(0, 1))
    return torch.cat(out)


def pair_varlen_attention(query, key, value, key_index, cu_q, cu_k, max_q: int, max_k: int,
                          scale: Optional[float]):
    """Attention of the flat pair layout from its PairVarlen documents. query [1, H, L, D], key and value
    [1, Hkv, L, D] (transformers' layout) -> ([1, L, H, D], None), as transformers' attention functions return."""
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1).index_select(0, key_index)
    v = value[0].transpose(0, 1).index_select(0, key_index)
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return varlen_reference(q, k, v, cu_q, cu_k, scale)[None], None
    from torch.nn.attention.varlen import varlen_attn

    return _varlen_call(varlen_attn, VARLEN_PARAMS, q, k, v, cu_q, cu_k, max_q, max_k, scale)[None], None


def _varlen_call(varlen_attn, params: frozenset, q, k, v, cu_q, cu_k, max_q: int, max_k: int,
                 scale: Optional[float]) -> torch.Tensor:
    """varlen_attn(q [Tq, H, D], k and v [Tk, Hkv, D]) causal, in the keywords this form of it takes: window_size
    (-1, 0) or is_causal; enable_gqa, else the key-value heads repeated; scale, else q pre-scaled against the
    kernel's own 1/sqrt(D)."""
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    kwargs: dict = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = H != Hkv
    elif H != Hkv:
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None:
        q = q * (scale * D ** 0.5)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def flex_available() -> bool:
    """Whether torch has FlexAttention and transformers can run it."""
    from transformers.utils import is_torch_flex_attn_available

    return is_torch_flex_attn_available()


def sdpa_or_flex_attention(module, query, key, value, attention_mask, **kwargs):
    """The flat pair layout's attention from its PairVarlen documents (VARLEN_KWARGS) or its BlockMask (transformers'
    flex_attention_forward); transformers' sdpa_attention_forward for any other mask: generation, SFT and PPO
    forwards run exactly as with attn_implementation="sdpa".

    flex_attention_forward runs flex_attention compiled (one compile, shared by every layer and model; the kernel is
    fast only compiled). On the CPU, where inductor would take ~20 s per new shape, the compile is skipped and torch's
    eager reference implementation runs (tests); it has no backward there (see rlhf.models.forward._pair_inputs).
    """
    from torch.nn.attention.flex_attention import BlockMask

    if kwargs.get(VARLEN_KWARGS[0]) is not None:  # the flat layout's PairVarlen documents: no mask
        documents = [kwargs.pop(name) for name in VARLEN_KWARGS]
        return pair_varlen_attention(query, key, value, *documents, scale=kwargs.get("scaling"))
    if not isinstance(attention_mask, BlockMask):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    from transformers.integrations.flex_attention import flex_attention_forward

    eager = torch.compiler.set_stance("force_eager") if query.device.type == "cpu" else contextlib.nullcontext()
    with eager:
        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_sdpa_flex(model) -> bool:
    """Switch a transformers model from SDPA to SDPA_FLEX (registered with transformers on first use, with SDPA's mask
    function); False when the model's code cannot switch its attention (custom code without AttentionInterface)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SDPA_FLEX, sdpa_or_flex_attention)
    AttentionMaskInterface.register(SDPA_FLEX, sdpa_mask)
    model.set_attn_implementation(SDPA_FLEX)
    return model.config._attn_implementation == SDPA_FLEX
