"""Whole weights out of DeepSpeed ZeRO-3 and FSDP2 shards: for generation, scoring, reference updates and export.

Under ZeRO-3 each rank holds a flat slice of every parameter (`p.data` is empty) and DeepSpeed's per-module hooks
all-gather a module's weights around each of its forwards. That suits training, where every rank runs the same
forwards in step. It does not suit generation (one all-gather per module per token, and a hang as soon as ranks stop
at different lengths), nor work that only some ranks do (uneven evaluation shares, an export on rank 0), nor a
reference model built from the policy. DeepSpeed is imported here only when ZeRO-3 is on.

FSDP2 (torch `fully_shard`, what accelerate's FSDP config with fsdp_version 2 builds) has the same shape: each rank
holds a DTensor shard of every parameter, and per-module hooks all-gather around forwards. `whole_fsdp_model` is its
gather-once block.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch


def zero_stage(accelerator) -> int:
    """The ZeRO stage of an accelerate run (0 without DeepSpeed): of an Accelerator or of its AcceleratorState."""
    plugin = getattr(getattr(accelerator, "state", accelerator), "deepspeed_plugin", None)
    return int(plugin.zero_stage or 0) if plugin is not None else 0


def is_sharded(param: torch.Tensor) -> bool:
    """A ZeRO-3 partition or an FSDP2 DTensor shard: reading it whole takes a collective."""
    return hasattr(param, "ds_id") or _is_dtensor(param)


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


@contextmanager
def whole_tensor(param: torch.Tensor) -> Iterator[torch.Tensor]:
    """`param` whole on this rank, read-only: a ZeRO-3 partition gathered, an FSDP2 shard all-gathered into a new
    tensor, anything else as it is. A collective for sharded parameters: every rank must call it together."""
    if _is_dtensor(param):
        yield param.full_tensor()
        return
    with gathered([param]):
        yield param


@contextmanager
def gathered(params: Iterable[torch.Tensor], write: bool = False) -> Iterator[None]:
    """The ZeRO-3 parameters among `params` whole on this rank for the block: read-only (changes are dropped on
    exit), or with `write` rank 0's changes partitioned back to every rank on exit. A collective: every rank must
    enter with the same parameters. No-op for plain tensors."""
    params = [p for p in params if is_sharded(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if write else None):
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


@contextmanager
def whole_fsdp_model(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """FSDP2's counterpart of `whole_model`: every FSDP module of `model` all-gathered ONCE for the block and kept
    whole after each forward, so forwards inside run locally (any number per rank, no collective per module or
    token); `state_dict()` (hence `save_pretrained`) inside reads the whole weights on any single rank. Resharded on
    exit. Entering is a collective (every rank must enter); use it between optimizer steps, not in a backward.
    With FSDP mixed precision the whole weights are in its param_dtype (the dtype the training forward sees)."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    groups = [g for m in modules for g in _fsdp_param_groups(m)]
    try:
        kept = [g.post_forward_mesh_info for g in groups]  # not None: reshard after each forward
    except AttributeError as e:  # torch's FSDP2 internals moved: say so instead of hanging in a collective later
        raise RuntimeError(f"whole_fsdp_model: this torch version's FSDP2 lacks {e.name!r}") from e
    for g in groups:
        g.post_forward_mesh_info = None
    lifted = []
    try:
        for m in modules:
            m.unshard()  # also FSDP's lazy init on first use, which registers the state-dict hooks lifted next
        # FSDP's state_dict pre-hook reshards (a DTensor state dict, whose full_tensor is a collective that a
        # rank-0-only export cannot run): lifted for the block, so state_dict returns the whole parameters.
        for g in groups:
            for m, h in g._module_to_pre_save_state_dict_hook_handle.items():
                if h.id in m._state_dict_pre_hooks:
                    lifted.append((m, h.id, m._state_dict_pre_hooks.pop(h.id)))
        yield model
    finally:
        for g, mesh_info in zip(groups, kept):
            g.post_forward_mesh_info = mesh_info
        for m in modules:
            m.reshard()
        for m, hook_id, hook in lifted:
            m._state_dict_pre_hooks[hook_id] = hook
        # forwards in the block were recorded for backward prefetching; the next training step starts afresh
        order = getattr(getattr(groups[0], "comm_ctx", None), "post_forward_order", None) if groups else None
        if order is not None:
            order.clear()
        for g in groups:
            if hasattr(g, "_post_forward_indices"):
                g._post_forward_indices.clear()


def _fsdp_param_groups(module) -> list:
    """An FSDP2 module's parameter groups: a list in torch 2.13 (`_fsdp_param_groups`), at most one in torch 2.11
    (`_fsdp_param_group`, None for a module that owns no parameters); both were run."""
    state = module._get_fsdp_state()
    if hasattr(state, "_fsdp_param_groups"):
        return list(state._fsdp_param_groups)
    if hasattr(state, "_fsdp_param_group"):
        group = state._fsdp_param_group
        return [group] if group is not None else []
    raise RuntimeError("whole_fsdp_model: this torch version's FSDP2 state has no parameter groups "
                       "(_fsdp_param_groups / _fsdp_param_group)")
