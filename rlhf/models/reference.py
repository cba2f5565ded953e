"""Reference models: a frozen copy, the LoRA base with adapters disabled, or an EMA of the policy.

Under ZeRO-3 or FSDP the policy's parameters are shards: a copy is built anew (`rebuild`, from the checkpoint) and
filled from the gathered policy, and an EMA update gathers each policy parameter before reading it. The reference
itself is a whole model on every rank (it has no optimizer state to shard, and PPO's EMA needs it whole to save and
update).
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch

from ..ops import soft_update_
from .sharded import is_sharded, whole_tensor


def frozen_copy(model: torch.nn.Module, rebuild: Optional[Callable[[], torch.nn.Module]] = None) -> torch.nn.Module:
    """A detached copy in eval mode with no gradients (call on the unwrapped model).

    A ZeRO-3 or FSDP model cannot be deep-copied (that copies empty shards and DeepSpeed's hooks): `rebuild()` must then
    return a fresh module of the same structure (e.g. the policy loaded again from its checkpoint, LoRA included),
    which takes the policy's current values, gathered one parameter at a time. The rebuilt copy lands on the device
    of the policy's first parameter."""
    if any(is_sharded(p) for p in model.parameters()):
        if rebuild is None:
            raise ValueError("frozen_copy of a sharded (ZeRO-3, FSDP) model needs `rebuild` "
                             "(a module of the same structure)")
        device = next(model.parameters()).device
        ref = rebuild().to(device)
        ema_update_(ref, model, 1.0)
    else:
        ref = copy.deepcopy(model)
        if any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()):
            from .loading import compile_layers

            compile_layers(ref)  # model.compile_layers: a module's copy drops its compiled call
    ref.eval().requires_grad_(False)
    return ref


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def adapters_disabled(model: torch.nn.Module):
    """Context in which a LoRA policy computes its base model's outputs: a reference with no second copy."""
    if not is_peft(model):
        raise ValueError("reference 'adapter' needs a LoRA policy (model.lora_r > 0)")
    return model.disable_adapter()


@torch.no_grad()
def ema_update_(reference: torch.nn.Module, policy: torch.nn.Module, eta: float) -> None:
    """theta_ref <- eta * theta_policy + (1 - eta) * theta_ref (eta=1 resets the reference).

    ZeRO-3 and FSDP policy parameters are gathered one at a time (peak memory: one whole tensor), so every rank must
    call this together; call it outside any block that has already gathered them (deepspeed forbids nesting)."""
    targets, sources = list(reference.parameters()), list(policy.parameters())
    if not any(is_sharded(p) for p in sources):
        soft_update_(targets, sources, eta)
        return
    if len(targets) != len(sources):
        raise ValueError(f"ema_update_: the reference has {len(targets)} parameters, the policy {len(sources)}")
    for tgt, src in zip(targets, sources):
        with whole_tensor(src) as whole:
            soft_update_([tgt], [whole], eta)
