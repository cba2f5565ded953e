"""What an algorithm supplies to the Trainer. It owns no loop, optimizer or logger.

The Trainer asks for the trainable model, then for each optimizer step a `StepBatch` of this
rank's micro-batches; it calls `loss` on each micro-batch and normalizes the summed losses by the
step's global `loss_weight` (tokens, pairs, ...), so gradient accumulation and the number of ranks
do not change the objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch

if TYPE_CHECKING:
    from ..trainer import Trainer


@dataclass
class StepBatch:
    """Micro-batches of one optimizer step on this rank, plus metrics already reduced over ranks."""

    micro_batches: list[Any]
    metrics: dict[str, float] = field(default_factory=dict)


class Algorithm:
    progress_keys: tuple[str, ...] = ("train/loss",)

    def __init__(self, cfg, trainer: "Trainer"):
        self.cfg, self.trainer = cfg, trainer

    # --- set-up -------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def prepared(self, model: torch.nn.Module) -> None:
        """Called once the model is wrapped for distributed training (build frozen models here)."""

    def total_steps(self) -> int:
        raise NotImplementedError

    # --- the step -------------------------------------------------------------------------------
    def steps(self, start_step: int) -> Iterator[StepBatch]:
        raise NotImplementedError

    def loss_weight(self, micro_batch: Any) -> float:
        """This micro-batch's share of the step's normalizer (e.g. its number of loss tokens)."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, micro_batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss summed over the micro-batch's units, per-micro-batch mean stats)."""
        raise NotImplementedError

    def after_step(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        return {}

    def can_checkpoint(self, step: int) -> bool:
        return True

    # --- evaluation and export -----------------------------------------------------------------
    def evaluates(self) -> bool:
        """Whether `evaluate` has anything to do (else the Trainer does not gather a ZeRO-3 model for it)."""
        return False

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out metrics reduced over ranks; `model` is unwrapped with whole weights (Trainer.full_model)."""
        return {}

    def prepare_export(self, model: torch.nn.Module) -> None:
        """Runs on every rank just before `save_model`, on the unwrapped model with whole weights: work that needs
        every rank (forwards of a sharded model, statistics over all ranks' data) goes here."""

    def save_model(self, model: torch.nn.Module, out_dir: str) -> None:
        """Write the trained model so `from_pretrained(out_dir)` loads it. Runs on the main process only."""
        model.save_pretrained(out_dir)
        self.trainer.tokenizer.save_pretrained(out_dir)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
