"""Reward sources for RL: a trained reward model, programmatic rewards, and a weighted sum of several.

A programmatic reward is named by an import path 'module:callable' and has the signature

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

where `columns` are the prompt rows' other dataset fields, each a list aligned with `prompts`
(e.g. the tests of a coding problem, or a gold answer). A reward model is a sequence-classification
checkpoint with one output; its score is read at the last real token (the EOS of a finished
response), so a reward model trained and calibrated by `rlhf train` (algorithm: reward) scores
exactly as it did in training. The reward model must share the policy's tokenizer.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Optional, Sequence

import torch

from .config import ConfigError, ModelConfig
from .models import load_scalar_model, scalar_scores

RewardFn = Callable[..., Sequence[float]]


def import_reward_fn(path: str, field: str = "ppo.reward_fns") -> RewardFn:
    """The callable named by 'package.module:name' (ConfigError naming the path when it cannot be imported)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{field}: '{path}': expected 'module:callable', e.g. 'rlhf.eval.code:execution_reward'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{field}: '{path}': cannot import module '{module_name}': {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{field}: '{path}': module '{module_name}' has no callable '{attr}'")
    return fn


class ModelReward:
    """A frozen reward model on the device; scores [B] at each row's last real token."""

    name = "model"

    def __init__(self, path: str, model_cfg: Optional[ModelConfig] = None, tokenizer=None,
                 device: Optional[torch.device] = None, batch_size: int = 32):
        cfg = ModelConfig(name_or_path=path, dtype=model_cfg.dtype if model_cfg else "float32",
                          trust_remote_code=model_cfg.trust_remote_code if model_cfg else False)
        self.model = load_scalar_model(path, cfg, tokenizer, trainable=False, field="ppo.reward_model")
        self.model.to(device or torch.device("cpu"))
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        parts = [scalar_scores(self.model, input_ids[i:i + self.batch_size].to(device),
                               attention_mask[i:i + self.batch_size].to(device))
                 for i in range(0, len(input_ids), self.batch_size)]
        return torch.cat(parts).float()


class FunctionReward:
    """A programmatic reward imported from 'module:callable'; checks what it returns."""

    def __init__(self, path: str):
        self.path, self.fn = path, import_reward_fn(path)
        self.name = path.partition(":")[2]

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> torch.Tensor:
        out = list(self.fn(list(prompts), list(completions), **columns))
        if len(out) != len(completions):
            raise ValueError(f"reward fn '{self.path}' returned {len(out)} scores for {len(completions)} completions")
        bad = [i for i, v in enumerate(out) if not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            raise ValueError(f"reward fn '{self.path}' returned a non-finite or non-numeric score at index {bad[0]}: "
                             f"{out[bad[0]]!r}")
        return torch.tensor(out, dtype=torch.float32)


class RewardSources:
    """score = sum_i w_i * source_i, over [reward model, *reward fns] (weights default to 1)."""

    def __init__(self, model: Optional[ModelReward] = None, fns: Sequence[FunctionReward] = (),
                 weights: Sequence[float] = ()):
        self.model, self.fns = model, list(fns)
        count = (model is not None) + len(self.fns)
        if count == 0:
            raise ConfigError("no reward source: give a reward model and/or reward fns")
        if weights and len(weights) != count:
            raise ConfigError(f"{len(weights)} reward weights for {count} reward sources")
        self.weights = list(weights) or [1.0] * count
        names = [f.name for f in self.fns]
        for fn in self.fns:  # two fns of one name (from different modules) are told apart by their full path
            if names.count(fn.name) > 1:
                fn.name = fn.path

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompts: list[str],
                 completions: list[str], columns: Optional[dict[str, list]] = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted score [B] on CPU, each source's own scores [B] keyed by its name).

        input_ids/attention_mask: [B, P + R] prompt and response (what the reward model reads);
        prompts, completions: B texts; columns: the prompt rows' other fields, B values each.
        """
        parts: dict[str, torch.Tensor] = {}
        if self.model is not None:
            parts[self.model.name] = self.model(input_ids, attention_mask).cpu()
        for fn in self.fns:
            parts[fn.name] = fn(prompts, completions, columns or {})
        total = sum(w * s for w, s in zip(self.weights, parts.values()))
        return total, parts


def build_reward(ppo: Any, model_cfg: Optional[ModelConfig] = None, tokenizer=None,
                 device: Optional[torch.device] = None) -> RewardSources:
    """The reward of a `PPOSection`: ppo.reward_model, ppo.reward_fns, ppo.reward_weights."""
    model = (ModelReward(ppo.reward_model, model_cfg, tokenizer, device, ppo.rollout_micro_batch_size)
             if ppo.reward_model else None)
    return RewardSources(model, [FunctionReward(p) for p in ppo.reward_fns], ppo.reward_weights)
