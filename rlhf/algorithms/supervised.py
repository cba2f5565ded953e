"""Pieces shared by the algorithms that learn from a fixed dataset (SFT, reward model, DPO)."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from ..data.batching import StepBatcher
from ..models.loading import mark_step
from ..ops import all_reduce_sum_
from .base import StepBatch


def make_batcher(trainer, examples: list, collate: Callable) -> StepBatcher:
    cfg = trainer.cfg
    try:
        return StepBatcher(examples, cfg.optim.micro_batch_size, trainer.grad_accum, trainer.world_size,
                           trainer.rank, cfg.seed, cfg.data.shuffle, collate)
    except ValueError as e:
        from ..config import ConfigError

        raise ConfigError(f"data.train: {e}") from None


def load_pair_examples(trainer, which: str, opts, bad, dropped: dict) -> list:
    """Tokenized preference pairs of data.train or data.eval ('train' / 'eval'), from the file or hub dataset the
    config names, or from the dataset object given to the Trainer (Trainer.rows)."""
    from ..data.preference import encode_rows, load_pairs

    d = trainer.cfg.data
    if trainer.objects.dataset(which) is not None:
        return encode_rows(trainer.rows(which), trainer.tokenizer, opts, bad, dropped)
    return load_pairs(getattr(d, which), trainer.tokenizer, opts, bad, getattr(d, f"{which}_split"),
                      d.limit if which == "train" else 0, dropped)


def total_steps(cfg, batcher: StepBatcher) -> int:
    return cfg.optim.max_steps or cfg.optim.epochs * batcher.steps_per_epoch


def step_stream(batcher: StepBatcher, start_step: int) -> Iterator[StepBatch]:
    step = start_step
    while True:
        yield StepBatch(batcher.micro_batches(step))
        step += 1


def report_skipped(trainer, bad, name: str) -> dict:
    """Print and return the count of rows skipped under data.on_bad_row=skip: nothing drops silently."""
    if bad.skipped:
        trainer.print(f"{name}: {bad.summary()}")
    return {f"data/{name}_skipped_rows": len(bad.skipped)}


DROP_REASONS = {"pku_both_unsafe": "PKU-SafeRLHF pairs whose responses are both unsafe (pku_both_unsafe: drop)"}


def report_dropped(trainer, dropped: dict[str, int], name: str) -> dict:
    """Print one line per reason rows were left out by choice, and return their counts as metrics."""
    out = {}
    for reason, count in dropped.items():
        trainer.print(f"{name}: dropped {count} {DROP_REASONS.get(reason, reason)}")
        out[f"data/{name}_dropped_{reason}"] = count
    return out


@torch.no_grad()
def sharded_eval(trainer, model, items: list, micro_batch_size: int, collate: Callable, keys: Sequence[str],
                 sums: Callable) -> dict[str, float]:
    """Means over the whole eval set, each rank scoring a strided share in micro-batches.

    sums(model, batch) -> (per-key sums over the batch's units, in `keys` order; the number of units).
    Shares may differ in size between ranks (the model holds whole weights here); the sums are reduced.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(len(keys) + 1, device=trainer.device)
    share = items[trainer.rank::trainer.world_size]
    for i in range(0, len(share), micro_batch_size):
        mark_step(model)
        with trainer.accelerator.autocast():
            values, count = sums(model, collate(share[i:i + micro_batch_size]))
        totals += torch.stack([torch.as_tensor(v, device=trainer.device).float() for v in values]
                              + [torch.tensor(float(count), device=trainer.device)])
    model.train(was_training)
    totals = all_reduce_sum_(totals)
    count = totals[-1].clamp(min=1)
    return {f"eval/{k}": (totals[i] / count).item() for i, k in enumerate(keys)}
