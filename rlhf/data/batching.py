"""Padding collators and the deterministic step batcher shared by the supervised algorithms."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import torch


def _lengths_and_keep(seqs: Sequence[Sequence[int]], side: str) -> tuple[int, torch.Tensor]:
    """(the longest length, [B, T] bool: True at each sequence's own columns once padded on `side`)."""
    width = max(len(s) for s in seqs)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    cols = torch.arange(width)
    return width, (cols < lengths[:, None]) if side == "right" else (cols >= (width - lengths)[:, None])


def pad(seqs: Sequence[Sequence[int]], value: int, side: str = "right") -> torch.Tensor:
    """[B, T] tensor of the sequences padded to the longest.

    One tensor of all the values, placed through a mask (row-major, so each row's columns take its values in
    order): 512 prompts of 128 tokens in about 8 ms, where a copy per row took about 25 on a 2-core CPU."""
    width, keep = _lengths_and_keep(seqs, side)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    if all(isinstance(s, (list, tuple)) for s in seqs):
        flat = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.long)
    else:
        flat = torch.cat([torch.as_tensor(s).reshape(-1).long() for s in seqs])
    out[keep] = flat
    return out


def attention_mask(seqs: Sequence[Sequence[int]], side: str = "right") -> torch.Tensor:
    return _lengths_and_keep(seqs, side)[1].long()


class StepBatcher:
    """Optimizer step -> this rank's micro-batches, a pure function of (seed, step).

    Each epoch is a seeded permutation; a global batch of `world x micro x accum` examples is cut
    into micro-batches, micro-batch i of rank r taking slice (i * world + r). Because the batches
    depend only on the step number, resuming at step s needs no saved iterator.
    """

    def __init__(self, examples: list, micro_batch_size: int, grad_accum: int, world_size: int, rank: int,
                 seed: int, shuffle: bool, collate: Callable[[list], Any]):
        self.examples, self.micro, self.accum = examples, micro_batch_size, grad_accum
        self.world, self.rank, self.seed, self.shuffle, self.collate = world_size, rank, seed, shuffle, collate
        self.global_batch = micro_batch_size * grad_accum * world_size
        self.steps_per_epoch = len(examples) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(examples)} examples are fewer than one global batch of {self.global_batch} "
                             f"(world {world_size} x micro {micro_batch_size} x accum {grad_accum})")

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def micro_batches(self, step: int) -> list:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)[within * self.global_batch:(within + 1) * self.global_batch]
        out = []
        for i in range(self.accum):
            start = (i * self.world + self.rank) * self.micro
            out.append(self.collate([self.examples[j] for j in order[start:start + self.micro]]))
        return out
