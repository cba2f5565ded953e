"""Distributed plumbing of the Trainer: the process group, DeepSpeed and FSDP set-up, collective failures.

The Trainer's loop calls into this module and never branches on the engine itself; engines are imported where used,
so a CPU run never needs DeepSpeed.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Mapping, Optional

import torch

from .config import ConfigError, TrainConfig


class CollectiveError(RuntimeError):
    """A collective (all-reduce, barrier, all-gather) failed or timed out: some rank did not take part."""


def _is_collective_failure(e: BaseException) -> bool:
    """gloo raises a RuntimeError naming itself ("Timed out waiting ...", "Connection closed by peer"); NCCL and
    the c10d store raise torch.distributed.DistError subclasses."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "gloo", "nccl", "c10d", "timed out waiting", "connection closed by peer", "connection reset by peer"))


def _use_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _use_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def micro_batch_size(cfg: TrainConfig) -> int:
    ppo = getattr(cfg, "ppo", None)
    return ppo.micro_batch_size if ppo is not None else cfg.optim.micro_batch_size


def process_state(timeout: timedelta):
    """accelerate's PartialState, with the process group started (when several processes) with `timeout`.

    Several processes on a machine without GPUs (torchrun, accelerate launch): start the process group over gloo.
    Under DeepSpeed the Accelerator then wraps the model in DeepSpeed on top of it (CI's ZeRO tests run this way).
    The collective timeout is given to the first call that starts the process group (later ones reuse it)."""
    from accelerate import PartialState

    if _use_fsdp() and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError(f"FSDP: fsdp_config.fsdp_version is {os.environ.get('FSDP_VERSION', '1')} in the "
                          "accelerate config; set it to 2 (FSDP1 is not supported)")
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu_multi = multi and not torch.cuda.is_available()
    kwargs = {"timeout": timeout} if multi else {}
    state = PartialState(cpu=True, **kwargs) if cpu_multi else PartialState(**kwargs)
    if cpu_multi and _use_deepspeed():
        import deepspeed

        deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, timeout=timeout)
    if cpu_multi and _use_fsdp():
        # accelerate selects FSDP only on accelerators; torch's FSDP2 also shards over gloo on CPU (CI runs it so)
        from accelerate.utils import DistributedType

        state.distributed_type = DistributedType.MULTI_GPU  # the Accelerator below upgrades it to FSDP
    if multi:
        # a collective torch's watchdog aborts (inside DeepSpeed or FSDP; the trainer's own all-reduces raise a
        # CollectiveError instead): print where every thread of this rank stood then
        import faulthandler

        faulthandler.enable(all_threads=True)
    return state


def deepspeed_plugin(cfg: TrainConfig, grad_accum: int, world_size: int):
    """Under `accelerate launch` with a DeepSpeed config, batch numbers come from the rlhf config."""
    if not _use_deepspeed():
        return None
    from accelerate.utils import DeepSpeedPlugin

    clip = cfg.optim.max_grad_norm
    plugin = DeepSpeedPlugin(gradient_accumulation_steps=grad_accum, gradient_clipping=clip if clip > 0 else None)
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size(cfg)
    plugin.deepspeed_config["train_batch_size"] = micro_batch_size(cfg) * grad_accum * world_size
    return plugin


def fsdp_precision(accelerator, precision: str) -> None:
    """FSDP2 mixed precision: whole weights in half precision for forwards, as under DeepSpeed, but gradients
    reduced in float32 (as DDP does) and module outputs left as computed. accelerate's default policy also casts
    every module's output to half precision, which rounds PPO's log-probs (a ratio that is not 1 on the first
    step) and values, and a reward model's scores."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
        param_dtype=low, reduce_dtype=torch.float32)


def size_zero3(accelerator, model: torch.nn.Module) -> None:
    """ZeRO-3 keeps parameters below a size threshold whole on every rank; like transformers' "auto", scale it
    with the model (10 x hidden size: norms and biases stay whole, matrices are sharded). DeepSpeed's fixed
    default (1e5 elements) would leave a small model entirely unsharded."""
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("zero_optimization", {})
    hidden = next((m.config.hidden_size for m in model.modules()
                   if isinstance(getattr(getattr(m, "config", None), "hidden_size", None), int)), None)
    if hidden and zero.get("stage3_param_persistence_threshold", "auto") == "auto":
        zero["stage3_param_persistence_threshold"] = 10 * hidden


PRECISIONS = ("no", "bf16", "fp16")


def resolve_mixed_precision(ours: Optional[str], env: Optional[Mapping[str, str]] = None) -> str:
    """The run's mixed precision: the rlhf config's `mixed_precision`, else the accelerate config's (exported by
    `accelerate launch` as ACCELERATE_MIXED_PRECISION), else 'no'. accelerate launch exports 'no' when its config
    sets nothing, so its 'no' gives way to the rlhf config; any other disagreement is an error naming both."""
    env = os.environ if env is None else env
    theirs = (env.get("ACCELERATE_MIXED_PRECISION") or "").strip().lower() or None
    if theirs is not None and theirs not in PRECISIONS:
        raise ConfigError(f"ACCELERATE_MIXED_PRECISION={theirs!r} (the accelerate config's mixed_precision): expected "
                          f"one of {', '.join(PRECISIONS)}")
    if ours is None:
        return theirs or "no"
    if theirs not in (None, "no", ours):
        raise ConfigError(f"mixed_precision={ours!r} in the rlhf config but {theirs!r} in the accelerate config "
                          f"(ACCELERATE_MIXED_PRECISION); set one of them, or the same in both")
    return ours
