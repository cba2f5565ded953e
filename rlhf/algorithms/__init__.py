"""One file per algorithm. Each turns batches into losses and stats; none owns a loop.

ALGORITHMS maps the config's `algorithm` name to a loader of its class, imported lazily so a run
of one algorithm never imports another's dependencies.
"""

from __future__ import annotations

import importlib


def _lazy(module: str, name: str):
    return lambda: getattr(importlib.import_module(f"{__name__}.{module}"), name)


ALGORITHMS = {
    "sft": _lazy("sft", "SFT"),
    "reward": _lazy("reward", "RewardModeling"),
    "dpo": _lazy("dpo", "DPO"),
    "ppo": _lazy("ppo", "PPO"),
}
