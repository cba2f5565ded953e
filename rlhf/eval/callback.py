"""The evaluation harness as a training callback: greedy responses to a testbed's held-out prompts,
scored by its gold judge, logged as `eval/<testbed>/<metric>` at each evaluation.

    logging: {eval_every: 50, eval_testbed: assistant, eval_limit: 64}
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch

HEADLINE = ("gold/reward", "gold/helpfulness", "gold/harm", "gold/safety_rate", "code/pass@1", "length/tokens",
            "distinct/2")


def generative_policy(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The causal LM inside what an algorithm trains (PPO holds policy and critic); None for a reward model."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    model = getattr(model, "policy", model)
    return model if hasattr(model, "generate") and hasattr(model, "get_output_embeddings") and \
        model.get_output_embeddings() is not None else None


@torch.no_grad()
def testbed_metrics(trainer, model: torch.nn.Module) -> dict[str, float]:
    """Run on the main process only; other ranks return {} (metrics are logged by rank 0)."""
    log = trainer.cfg.logging
    if not log.eval_testbed or not trainer.is_main:
        return {}
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
        inner = inner.module
    # PPO's roles: the shared-base actor-critic generates with its actor adapter (ppo_shared), the pair with its policy
    with inner.actor() if hasattr(inner, "actor") and callable(inner.actor) else nullcontext(model) as actor:
        return _testbed_metrics(trainer, actor)


def _testbed_metrics(trainer, model: torch.nn.Module) -> dict[str, float]:
    log = trainer.cfg.logging
    policy = generative_policy(model)
    if policy is None:
        return {}
    from .runner import EvalSettings, evaluate_model

    settings = EvalSettings(testbed=log.eval_testbed, max_new_tokens=log.eval_max_new_tokens, limit=log.eval_limit,
                            seed=trainer.cfg.seed, batch_size=64)
    # sampling in the harness must not move the training RNG streams
    state = torch.random.get_rng_state()
    try:
        metrics, _ = evaluate_model(policy, trainer.tokenizer, settings)
    finally:
        torch.random.set_rng_state(state)
    return {f"eval/{log.eval_testbed}/{k}": v for k, v in metrics.items() if k in HEADLINE}
