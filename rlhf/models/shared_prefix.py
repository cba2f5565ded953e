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
rejected queries) and keeps its fused kernel, where SDPA with an arbitrary mask leaves its flash kernel.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal, Union

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
class SharedPrefixBatch:
    """B pairs in R rows of L tokens (padded: R = B; flat: R = 1, L a multiple of FLEX_BLOCK).

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

    def to(self, device) -> "SharedPrefixBatch":
        return SharedPrefixBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__ if f != "flat"),
                                 flat=self.flat)

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
               pad_id: int = 0, flat: Union[bool, Literal["auto"]] = False) -> SharedPrefixBatch:
    """The padded (one row per pair) or flat (one row) layout of a PairBatch's rows (built on the CPU: a few list
    operations per pair); flat="auto" chooses by the padding the padded layout would add (flat_pays)."""
    pairs = split_pair_rows(input_ids, attention_mask, response_mask)
    B = len(pairs)
    sizes = [len(p) + len(c) + len(r) for p, c, r in pairs]
    if flat == "auto":
        flat = flat_pays(sizes)
    if flat:
        rows, starts = [0] * B, [sum(sizes[:i]) for i in range(B)]
        L = -(-sum(sizes) // FLEX_BLOCK) * FLEX_BLOCK
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
    return SharedPrefixBatch(ids, pos, document, segment, torch.tensor(source, dtype=torch.long),
                             torch.tensor(target, dtype=torch.long), torch.tensor(owner, dtype=torch.long),
                             torch.tensor(last, dtype=torch.long), flat=bool(flat))


# ---------------------------------------------------------------------------------------------------------------------
# The attention implementation of the flat layout: SDPA, and flex_attention for a BlockMask
# ---------------------------------------------------------------------------------------------------------------------


def flex_available() -> bool:
    """Whether torch has FlexAttention and transformers can run it."""
    from transformers.utils import is_torch_flex_attn_available

    return is_torch_flex_attn_available()


def sdpa_or_flex_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' flex_attention_forward for a BlockMask (the flat pair layout), its sdpa_attention_forward for any
    other mask: generation, SFT and PPO forwards run exactly as with attn_implementation="sdpa".

    flex_attention_forward runs flex_attention compiled (one compile, shared by every layer and model; the kernel is
    fast only compiled). On the CPU, where inductor would take ~20 s per new shape, the compile is skipped and torch's
    eager reference implementation runs (tests); it has no backward there (see rlhf.models.forward._pair_mask).
    """
    from torch.nn.attention.flex_attention import BlockMask

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
