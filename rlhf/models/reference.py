"""Reference models: a frozen copy, the LoRA base with adapters disabled, or an EMA of the policy."""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext

import torch

from ..ops import soft_update_


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A detached copy in eval mode with no gradients (call on the unwrapped model)."""
    ref = copy.deepcopy(model)
    ref.eval().requires_grad_(False)
    return ref


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def adapters_disabled(model: torch.nn.Module):
    """Context in which a LoRA policy computes its base model's outputs: a reference with no second copy."""
    if not is_peft(model):
        raise ValueError("reference 'adapter' needs a LoRA policy (model.lora_r > 0)")
    return model.disable_adapter()


def ema_update_(reference: torch.nn.Module, policy: torch.nn.Module, eta: float) -> None:
    """theta_ref <- eta * theta_policy + (1 - eta) * theta_ref (eta=1 resets the reference)."""
    soft_update_(reference, policy, eta)
