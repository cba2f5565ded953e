"""The optimizer, built once for every algorithm.

On CUDA, AdamW runs fused (one kernel over all parameters per step): faster than the default multi-tensor
("foreach") implementation, and without its temporary copies of parameter-sized tensors, which at 1B+ parameters
are gigabytes of peak memory. The update is the same AdamW.
"""

from __future__ import annotations

import torch

from .distributed import _use_deepspeed

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make_adamw(groups: list[dict], optim_cfg, device) -> torch.optim.AdamW:
    """torch.optim.AdamW over `groups` with optim.{lr, adam_betas, adam_eps, weight_decay}, fused when training runs
    on a CUDA `device`.

    The optimizer is built before the model is moved (accelerate's prepare moves parameters in place, so the
    optimizer keeps them): the choice follows the device training runs on, not where the parameters are now.
    Elsewhere (CPU, DeepSpeed) the default implementation is kept.
    """
    params = [p for g in groups for p in g["params"]]
    # under DeepSpeed the ZeRO optimizer steps this one over its own flat partitions, on the CPU under ZeRO-Offload:
    # the default implementation is left to it there
    fused = (torch.device(device).type == "cuda" and not _use_deepspeed()
             and all(p.dtype in FUSED_DTYPES for p in params))
    o = optim_cfg
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.adam_betas), eps=o.adam_eps,
                             weight_decay=o.weight_decay, **({"fused": True} if fused else {}))
