"""Named LoRA adapters on one frozen base, and which of them a forward runs.

One peft model can carry several adapters (PPO's shared base: "actor", "critic", "reference"). peft's own switch,
`set_adapter`, also rewrites `requires_grad` (the active adapter trainable, every other one frozen), and leaving
`disable_adapter()` calls it again; PPO trains two adapters in the same optimizer step, so neither is used here.
`using_adapter(model, name)` sets only what the LoRA layers read in their forward (the active adapter, the disabled
flag) and puts it back on exit; which parameters train is fixed once, when the model is built.

Activation checkpointing recomputes a block's forward during backward, when another adapter may be active (PPO's
loss adds the actor's and the critic's forwards and backpropagates once). `recompute_with_same_adapters` is a
`context_fn` for torch's non-reentrant checkpoint: it snapshots the adapter state at forward time and restores it
around the recomputation, so the gradient of each forward belongs to the adapter that ran it.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional

import torch

BASE = None  # using_adapter(model, BASE): every adapter off, the base model's own outputs
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # next to loading.ADAPTER_CONFIG in a peft adapter folder
HEAD_KEY = "base_model.model.score.weight"  # where a peft sequence-classification adapter keeps its score head


def tuner_layers(model: torch.nn.Module) -> list:
    """The peft layers (LoRA Linear, ...) inside `model`, found once and cached on it."""
    cached = model.__dict__.get("_rlhf_tuner_layers")
    if cached is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        cached = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        model.__dict__["_rlhf_tuner_layers"] = cached  # a plain attribute: not a submodule, never saved
    return cached


def _state(layers: list) -> list[tuple]:
    return [(layer._active_adapter, layer._disable_adapters) for layer in layers]


def _set_state(layers: list, state: list[tuple]) -> None:
    for layer, (active, disabled) in zip(layers, state):
        layer._active_adapter, layer._disable_adapters = active, disabled


@contextmanager
def using_adapter(model: torch.nn.Module, name: Optional[str]) -> Iterator[torch.nn.Module]:
    """Within the block every LoRA layer of `model` runs adapter `name` alone (BASE = None: no adapter); trainability
    (`requires_grad`) is left as it is. Yields `model`. Nests: the previous state comes back on exit."""
    layers = tuner_layers(model)
    if not layers:
        raise ValueError("using_adapter: the model has no LoRA layers")
    # a layer without adapter `name` (adapters of different target modules) runs its base alone: peft's LoRA forward
    # skips an active adapter the layer does not have
    if name is not None and not any(name in m._get_available_adapters() for m in layers):
        raise ValueError(f"using_adapter: no LoRA layer has an adapter '{name}' (adapters here: "
                         f"{sorted(set().union(*(m._get_available_adapters() for m in layers)))})")
    saved = _state(layers)
    _set_state(layers, [([name], False) if name is not None else (active, True) for active, _ in saved])
    try:
        yield model
    finally:
        _set_state(layers, saved)


def recompute_with_same_adapters(model_holder: list):
    """A `context_fn` for torch.utils.checkpoint (non-reentrant): the recomputation in backward runs with the adapter
    state of the forward it recomputes. model_holder: a list whose first element is the peft model (it exists only
    after activation checkpointing is switched on, on the model inside it)."""
    def context_fn():
        if not model_holder:
            return nullcontext(), nullcontext()
        layers = tuner_layers(model_holder[0])
        at_forward = _state(layers)

        @contextmanager
        def as_at_forward():
            now = _state(layers)
            _set_state(layers, at_forward)
            try:
                yield
            finally:
                _set_state(layers, now)
        return nullcontext(), as_at_forward()
    return context_fn


def adapter_parameters(model: torch.nn.Module, name: str) -> dict[str, torch.nn.Parameter]:
    """{parameter name with the adapter's name taken out: parameter} of adapter `name`, in module order, so two
    adapters of one model line up key by key (an EMA of one into the other, a copy)."""
    tag = f".{name}."
    out = {n.replace(tag, ".", 1): p for n, p in model.named_parameters() if tag in n and ".lora_" in n}
    if not out:
        raise ValueError(f"adapter '{name}' has no parameters in this model")
    return out


def copy_adapter_(model: torch.nn.Module, source: str, target: str) -> None:
    """Adapter `target` <- adapter `source`, tensor by tensor."""
    src, tgt = adapter_parameters(model, source), adapter_parameters(model, target)
    if src.keys() != tgt.keys():
        raise ValueError(f"adapters '{source}' and '{target}' have different layouts")
    with torch.no_grad():
        for key, p in tgt.items():
            p.copy_(src[key])


def merged_state_dict(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The state dict of the transformers model inside peft `model` with adapter `name` merged (W + scale * B @ A per
    adapted layer, in float32, then rounded once to W's dtype) and its modules_to_save copies (a reward model's score
    head) in place of the originals, built tensor by tensor on the CPU: the live model is not touched (peft's
    in-place merge and unmerge would not give a half-precision base back bit for bit) and no second copy of the model
    is made on its device."""
    from .forward import _unwrap

    inner, layers = _unwrap(model), {id(m) for m in tuner_layers(model)}
    deltas = {}
    for module_name, module in inner.named_modules():
        if id(module) in layers and name in module._get_available_adapters():
            deltas[module_name + ".weight"] = module.get_delta_weight(name)
    saved_copy = f".modules_to_save.{name}."
    state = inner.state_dict()
    replaced = {key.split(saved_copy)[0] for key in state if saved_copy in key}
    out = {}
    for key, value in state.items():
        if ".lora_" in key or (".modules_to_save." in key and saved_copy not in key):
            continue
        if ".original_module." in key and key.split(".original_module.")[0] in replaced:
            continue
        clean = key.replace(".base_layer.", ".").replace(saved_copy, ".").replace(".original_module.", ".")
        value = value.detach()
        if clean in deltas:
            value = (value.float() + deltas[clean].float()).to(value.dtype)
        out[clean] = value.cpu().clone()
    return out


def save_adapter(lm: torch.nn.Module, name: str, out_dir: str, extra: Optional[dict] = None, **config_changes) -> None:
    """Adapter `name` in peft's layout at the top of out_dir: adapter_config.json + adapter_model.safetensors
    (tensor names without the adapter's name, as PeftModel.save_pretrained writes the "default" adapter; its
    modules_to_save copies, a reward model's score head, under HEAD_KEY). `extra` tensors are added or replace
    theirs; `config_changes` are set on the saved copy of the adapter's config."""
    import copy
    import os

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = get_peft_model_state_dict(lm, adapter_name=name)
    tensors.update(extra or {})
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(out_dir, ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    config = copy.deepcopy(lm.peft_config[name])
    config.inference_mode = True
    for key, value in config_changes.items():
        setattr(config, key, value)
    config.save_pretrained(out_dir)
