"""Chosen and rejected responses of a pair in one row, after one copy of their shared prompt.

    row i: [prompt_i, chosen_i, rejected_i, pad...]

A PairBatch holds 2B rows, each with its own copy of the prompt; this layout runs the prompt once per pair, so a
forward processes sum(P + C + R) tokens instead of sum(2P + C + R) (a quarter fewer at 256 + 256 + 256), and half the
rows. The rejected tokens must not see the chosen ones: a 4D attention mask gives each query the keys of its own
prompt, its own segment causally, and nothing else; position ids restart after the prompt for the rejected segment,
so every token sees exactly the context and positions it has in its own row. The first response token of either
segment is predicted from the last prompt token's hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# attention kernels that take an arbitrary 4D mask (flash-attention takes none)
MASKABLE = ("sdpa", "eager")


@dataclass
class SharedPrefixBatch:
    """B pairs, one row each.

    input_ids, position_ids: [B, L]; mask: [B, 1, L, L] bool, True where query l may attend key k
    source, target: [N] flat indices into [B * L]: the hidden state at `source` predicts the token at `target`, for
    every response token of every pair (chosen tokens first within a pair, then rejected)
    owner: [N] which of the 2B sequences (chosen i -> i, rejected i -> B + i) a response token belongs to
    last: [2B] flat index of the last token of chosen i (i) and rejected i (B + i)
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor
    owner: torch.Tensor
    last: torch.Tensor

    def to(self, device) -> "SharedPrefixBatch":
        return SharedPrefixBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


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


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
               pad_id: int = 0) -> SharedPrefixBatch:
    """The shared-prefix layout of a PairBatch's rows (built on the CPU: a few list operations per pair)."""
    pairs = split_pair_rows(input_ids, attention_mask, response_mask)
    B = len(pairs)
    L = max(len(p) + len(c) + len(r) for p, c, r in pairs)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    segment = torch.full((B, L), -1, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, -1 padding
    source, target, owner, last = [], [], [], [0] * (2 * B)
    for i, (p, c, r) in enumerate(pairs):
        P, C, R = len(p), len(c), len(r)
        ids[i, :P + C + R] = torch.tensor(p + c + r)
        pos[i, :P + C] = torch.arange(P + C)
        pos[i, P + C:P + C + R] = torch.arange(P, P + R)
        segment[i, :P], segment[i, P:P + C], segment[i, P + C:P + C + R] = 0, 1, 2
        base = i * L
        for start, n, seq in ((P, C, i), (P + C, R, B + i)):
            src = [base + P - 1] + [base + start + j for j in range(n - 1)]
            source += src[:n]
            target += [base + start + j for j in range(n)]
            owner += [seq] * n
            last[seq] = base + start + n - 1 if n else base + P - 1
    q, k = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    # a query sees the prompt and its own segment (causally); padding keys are never seen, and a padding query sees
    # itself only (a row with no keys would give NaN in softmax)
    mask = causal & (k >= 0) & ((k == 0) | (k == q))
    mask |= torch.eye(L, dtype=torch.bool) & (q < 0)
    return SharedPrefixBatch(ids, pos, mask[:, None], torch.tensor(source, dtype=torch.long),
                             torch.tensor(target, dtype=torch.long), torch.tensor(owner, dtype=torch.long),
                             torch.tensor(last, dtype=torch.long))
