"""Whole weights out of DeepSpeed ZeRO-3 shards: for generation, scoring, reference updates and export.

Under ZeRO-3 each rank holds a flat slice of every parameter (`p.data` is empty) and DeepSpeed's per-module hooks
all-gather a module's weights around each of its forwards. That suits training, where every rank runs the same
forwards in step. It does not suit generation (one all-gather per module per token, and a hang as soon as ranks stop
at different lengths), nor work that only some ranks do (uneven evaluation shares, an export on rank 0), nor a
reference model built from the policy. DeepSpeed is imported here only when ZeRO-3 is on.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch


def zero_stage(accelerator) -> int:
    """The ZeRO stage of an accelerate run (0 without DeepSpeed)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage or 0) if plugin is not None else 0


def is_sharded(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextmanager
def gathered(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """The ZeRO-3 parameters among `params` whole on this rank for the block, read-only (modifier_rank=None: changes
    are dropped on exit). A collective: every rank must enter with the same parameters. No-op for plain tensors."""
    params = [p for p in params if is_sharded(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


@contextmanager
def whole_loading(accelerator) -> Iterator[None]:
    """from_pretrained inside the block loads whole weights. With a ZeRO-3 plugin active, transformers otherwise loads
    straight into partitions (deepspeed.zero.Init), which only a DeepSpeed engine can run: right for the trained
    model, wrong for a frozen reference or reward model that lives whole on every rank."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def _offload(engine):
    """The object holding the engine's ZeRO-3 module hooks (DeepSpeedZeRoOffload)."""
    optimizer = engine.optimizer
    return optimizer.parameter_offload if hasattr(optimizer, "parameter_offload") else optimizer


@contextmanager
def whole_model(engine) -> Iterator[torch.nn.Module]:
    """Yield a ZeRO-3 engine's module with every parameter gathered ONCE for the block and DeepSpeed's per-module hooks
    lifted, so forwards inside run locally: any number per rank, no collective per module or token. The hooks come
    back and the parameters are re-partitioned on exit. Entering is a collective (every rank must enter). The same
    recipe as deepspeed.runtime.zero.stage3.unwrap_model_for_generation and TRL's, with the hooks restored on error.
    Peak memory: the whole model on every rank for the block."""
    offload = _offload(engine)
    root, params = offload.module, list(engine.module.parameters())
    with gathered(params):
        for p in params:
            p.ds_active_sub_modules.clear()  # else re-partitioning on exit refuses "active" parameters
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        # The root module's start-of-forward hook checks, by a collective, that ranks traced the same modules: with
        # ranks running different numbers of forwards it would hang or pair with another collective. Off as well.
        start_of_forward = root._forward_pre_hooks.get(offload.fwd_pre_hook.id)
        offload.fwd_pre_hook.remove()
        try:
            yield engine.module
        finally:
            if start_of_forward is not None:
                offload.fwd_pre_hook = root.register_forward_pre_hook(start_of_forward, prepend=True)
            offload._register_deepspeed_module(root)
