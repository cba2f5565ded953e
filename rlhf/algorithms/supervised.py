"""Pieces shared by the algorithms that learn from a fixed dataset (SFT, reward model, DPO)."""

from __future__ import annotations

from typing import Callable, Iterator

from ..data.batching import StepBatcher
from .base import StepBatch


def make_batcher(trainer, examples: list, collate: Callable) -> StepBatcher:
    cfg = trainer.cfg
    try:
        return StepBatcher(examples, cfg.optim.micro_batch_size, trainer.grad_accum, trainer.world_size,
                           trainer.rank, cfg.seed, cfg.data.shuffle, collate)
    except ValueError as e:
        from ..config import ConfigError

        raise ConfigError(f"data.train: {e}") from None


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
