"""Writing and reading a run's checkpoints and its final model: what the Trainer keeps apart from its loop.

A checkpoint folder is a model and a resume point at once:

    checkpoints/step_000040/
        config.json  model.safetensors  tokenizer*  ...   the model, written by the algorithm's save_model (the code
                                                          that writes final/): from_pretrained(folder) loads it.
                                                          LoRA: adapter_config.json + adapter_model.safetensors,
                                                          which rlhf's loaders put over their base. PPO: the policy
                                                          here, the critic in critic/. Reward model: the calibrated
                                                          scorer.
        state/      what resume reads: the trained weights, optimizer, schedule and RNG states (accelerate's
                    save_state; under DeepSpeed each rank's shards, under FSDP its sharded or full state dict)
        trainer_state.pt  trainer_state.json  config.yaml  manifest.json (written last; rlhf/checkpoints.py)

A model with frozen parameters (LoRA: model.lora_r > 0) keeps only its trainable ones in state/: the adapters and
heads, their optimizer state, the schedule and RNG. The frozen base is not written; resume rebuilds the model from
the config (the base from model.name_or_path, the adapters drawn from the seed as at the start) and loads the saved
tensors over it, refusing a checkpoint whose tensors are not exactly the model's trainable ones. Under DeepSpeed
that is the engine's `exclude_frozen_parameters`; without it, accelerate's save-state hooks drop the frozen tensors
from its weights and load the rest. FSDP keeps accelerate's own state dict (frozen weights included).

Full fine-tuning keeps the weights twice: state/ holds them as training state (under DeepSpeed in the engine's
layout, which the HF files cannot replace) and the model files hold them as saved by save_model, which may differ
from the training state (a reward model's calibration is folded into its head). A resume never depends on the
model files, so what save_model writes can change without breaking resumes.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch

from . import checkpoints as ckpt
from .checkpoints import CheckpointError, DiskFullError, NonFiniteError
from .config import save_config
from .tracking import SAMPLES_FILE, truncate_metrics

if TYPE_CHECKING:
    from .trainer import Trainer

STATE_DIR = "state"  # accelerate's save_state inside a checkpoint folder
TRAINER_STATE = "trainer_state.pt"


# ----------------------------------------------------------------------------------------------
# Which tensors a checkpoint keeps
# ----------------------------------------------------------------------------------------------


def has_frozen(model: torch.nn.Module) -> bool:
    """Whether the model trains only part of its parameters (LoRA): its checkpoints then keep only that part."""
    return any(not p.requires_grad for p in model.parameters())


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _keep_trainable(models: list, weights: list, output_dir: str) -> None:
    """accelerate save-state pre-hook: each model's weights reduced to its trainable parameters (in place)."""
    for i, (model, state) in enumerate(zip(models, weights)):
        if has_frozen(model):
            keep = set(trainable_names(model))
            weights[i] = {k: v for k, v in state.items() if k in keep}


def _load_trainable(models: list, input_dir: str) -> None:
    """accelerate load-state pre-hook: load trainable-only weights over the rebuilt model and take the model off
    accelerate's list (its strict load would miss the frozen base). Full weights are left to accelerate."""
    from safetensors.torch import load_file

    for i, model in reversed(list(enumerate(models))):
        if not has_frozen(model):
            continue
        name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
        path = os.path.join(input_dir, name)
        if not os.path.exists(path):
            raise CheckpointError(f"{path} is missing: the checkpoint holds no trainable weights for this model")
        _checked_load(path, load_file(path), model)
        del models[i]


def _checked_load(source: str, saved: dict, model: torch.nn.Module) -> None:
    """Load a trainable-only state dict over `model`: it must hold every trainable parameter and nothing the model
    lacks (frozen tensors it holds, as checkpoints written before _without_frozen_aliases do, are loaded too)."""
    missing = set(trainable_names(model)) - set(saved)
    unknown = set(saved) - set(model.state_dict())

    def few(names):
        names = sorted(names)
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if missing or unknown:
        parts = ([f"missing {few(missing)}"] if missing else []) + ([f"not in this model: {few(unknown)}"]
                                                                   if unknown else [])
        raise CheckpointError(f"{source}: its tensors are not this model's trainable parameters ({'; '.join(parts)})"
                              f"; was it written with other model.lora_* settings?")
    model.load_state_dict(saved, strict=False)


def _deepspeed_checked_load(src: dict, dst: torch.nn.Module) -> None:
    """DeepSpeed's custom_load_fn for a checkpoint saved without frozen parameters."""
    _checked_load("the DeepSpeed checkpoint's module state", src, dst)


@contextmanager
def _hooks(acc) -> Iterator[None]:
    handles = [acc.register_save_state_pre_hook(_keep_trainable), acc.register_load_state_pre_hook(_load_trainable)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _deepspeed_partial(trainer: "Trainer") -> bool:
    from accelerate.utils import DistributedType

    return trainer.accelerator.distributed_type == DistributedType.DEEPSPEED and has_frozen(trainer.model)


@contextmanager
def _without_frozen_aliases(engine) -> Iterator[None]:
    """DeepSpeed's exclude_frozen_parameters drops the frozen names of named_parameters, which lists a tied weight
    once: the alias (lm_head.weight, tied to the embeddings) stays in the module state, a vocabulary-sized matrix.
    For the block, the engine's module_state_dict drops every frozen name."""
    frozen = {n for n, p in engine.module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    original = engine.module_state_dict

    def module_state_dict(*args, **kwargs):
        state = original(*args, **kwargs)
        if kwargs.get("exclude_frozen_parameters"):
            for name in frozen & set(state):
                del state[name]
        return state
    engine.module_state_dict = module_state_dict
    try:
        yield
    finally:
        del engine.module_state_dict  # the class's method again


def save_state(trainer: "Trainer", folder: str) -> None:
    """accelerate's save_state, the frozen base left out; every rank writes its part."""
    acc = trainer.accelerator
    with _hooks(acc):
        if _deepspeed_partial(trainer):
            with _without_frozen_aliases(trainer.model):
                acc.save_state(folder, exclude_frozen_parameters=True)
        else:
            acc.save_state(folder)


def load_state(trainer: "Trainer", folder: str) -> None:
    acc, extra = trainer.accelerator, {}
    if _deepspeed_partial(trainer):
        extra = {"load_module_strict": False, "custom_load_fn": _deepspeed_checked_load}
    with _hooks(acc):
        acc.load_state(folder, **extra)


def state_folder(checkpoint: str) -> str:
    """Where a checkpoint's training state lies: state/, or the folder itself (written before state/ existed)."""
    inner = os.path.join(checkpoint, STATE_DIR)
    return inner if os.path.isdir(inner) else checkpoint


# ----------------------------------------------------------------------------------------------
# Writing: every rank takes part, rank 0 writes the files
# ----------------------------------------------------------------------------------------------


def refuse_nonfinite(trainer: "Trainer", what: str) -> None:
    """Stop before writing weights that hold a NaN or an infinity (checked on every rank's shards)."""
    bad = ckpt.nonfinite_parameters(trainer.model)
    if not trainer._any_rank(bool(bad)):
        return
    good = ckpt.list_checkpoints(os.path.join(trainer.run_dir, "checkpoints"))
    names = ", ".join(n.removeprefix("module.") for n in bad[:3]) + (", ..." if len(bad) > 3 else "")
    raise NonFiniteError(f"refusing to write {what} at step {trainer.step}: parameters hold NaN or infinite values "
                         f"({names or 'on another rank'}); last finite checkpoint: "
                         f"{good[-1][0] if good else 'none'}")


def on_main(trainer: "Trainer", write: Callable[[], None], target: str, needed: Callable[[], int]) -> None:
    """Run `write` on rank 0; every rank learns whether it failed and raises too (none waits at a barrier for a
    rank that gave up). A full disk becomes one DiskFullError naming `target`."""
    error: Optional[BaseException] = None
    if trainer.is_main:
        try:
            write()
        except Exception as e:  # noqa: BLE001 - re-raised below, once the ranks agree
            error = e
    if not trainer._any_rank(error is not None):
        return
    if error is None:
        raise RuntimeError(f"writing {target} failed; see rank 0's error")
    if ckpt.is_disk_full(error):
        raise DiskFullError(f"no space left on device: {target} (about {needed()} bytes needed)") from error
    raise error


@contextmanager
def _exportable(trainer: "Trainer") -> Iterator[torch.nn.Module]:
    """The unwrapped model with whole weights, after the algorithm's export preparation (every rank)."""
    with trainer.full_model() as model:
        trainer.algorithm.prepare_export(model)  # every rank: e.g. the reward model's calibration scores
        yield model


def save_checkpoint(trainer: "Trainer") -> str:
    """The model (save_model), the training state, the step: written to a temp folder, verified by a manifest
    written last, then renamed. Older checkpoints beyond logging.keep_checkpoints are pruned after."""
    acc = trainer.accelerator
    folder = os.path.join(trainer.run_dir, "checkpoints")
    name = ckpt.checkpoint_name(trainer.step)
    final = os.path.join(folder, name)
    tmp = final + ".tmp"
    needed = lambda: ckpt.state_bytes(trainer.model, trainer.optimizer)  # noqa: E731
    with trainer.phase("checkpoint"):
        refuse_nonfinite(trainer, f"checkpoint {final}")
        if trainer.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        error = None
        try:
            save_state(trainer, os.path.join(tmp, STATE_DIR))  # under ZeRO each rank writes its own shards
        except Exception as e:  # noqa: BLE001 - a full disk on one rank must stop every rank
            if not ckpt.is_disk_full(e):
                raise
            error = e
        failed = trainer._any_rank(error is not None)  # also: every rank's shard and RNG state is on disk
        state = {"step": trainer.step, "algorithm": trainer.algorithm.state_dict(),
                 "skipped_steps": trainer.skipped_steps}

        with _exportable(trainer) as model:
            def finish():
                try:
                    if failed:
                        raise DiskFullError(f"no space left on device: {final} (about {needed()} bytes needed)")
                    trainer.algorithm.save_model(model, tmp)
                    torch.save(state, os.path.join(tmp, TRAINER_STATE))
                    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                        json.dump({"step": trainer.step}, f)
                    save_config(trainer.cfg, os.path.join(tmp, "config.yaml"))
                    ckpt.write_manifest(tmp, name, trainer.step, trainer.run_dir)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoints stay as they were
                    raise
                ckpt.replace_folder(tmp, final)
                ckpt.prune(folder, trainer.cfg.logging.keep_checkpoints)
            on_main(trainer, finish, final, needed)
        acc.wait_for_everyone()
    trainer.saved_step = trainer.step
    return final


def load_checkpoint(trainer: "Trainer", path: str) -> None:
    """Training state, step and algorithm state from a checkpoint, over the model the config rebuilt."""
    load_state(trainer, state_folder(path))
    state = torch.load(os.path.join(path, TRAINER_STATE), weights_only=False)
    trainer.step = state["step"]
    trainer.skipped_steps = state.get("skipped_steps", 0)
    trainer.algorithm.load_state_dict(state["algorithm"])
    if trainer.is_main:
        truncate_metrics(trainer.metrics.path, trainer.step, say=trainer.print)
        truncate_metrics(os.path.join(trainer.run_dir, SAMPLES_FILE), trainer.step, say=trainer.print)


def save_final(trainer: "Trainer") -> str:
    """final/: whole weights written by rank 0 (under ZeRO-3 gathered first), loadable with from_pretrained.
    Written to final.tmp and renamed: an earlier final/ is replaced only by a complete one."""
    out = os.path.join(trainer.run_dir, "final")
    with trainer.phase("final export"):
        refuse_nonfinite(trainer, "final/")
        trainer.accelerator.wait_for_everyone()
        with _exportable(trainer) as model:
            def write():
                with ckpt.atomic_folder(out, lambda: ckpt.state_bytes(model)) as tmp:
                    trainer.algorithm.save_model(model, tmp)
            on_main(trainer, write, out, lambda: ckpt.state_bytes(model))
        trainer.accelerator.wait_for_everyone()
    return out
