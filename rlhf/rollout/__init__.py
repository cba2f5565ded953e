"""Rollout engines behind one interface; `generate` is the convenience entry point."""

from __future__ import annotations

from typing import Optional, Sequence

from ..data.templates import Prompt, encode_prompt
from .base import Engine, Rollout, SamplingConfig, join_rollouts, response_mask_from_ids
from .hf import HFEngine
from .static import StaticEngine, unsupported

ENGINES = {"hf": HFEngine, "static": StaticEngine}
ENGINE_CHOICES = ("auto", *ENGINES)


def resolve_engine(name: str, model) -> str:
    """'auto': the static engine on CUDA for a model it supports, else hf (the only engine used on CPU by default)."""
    if name != "auto":
        return name
    on_cuda = next(model.parameters()).device.type == "cuda"
    return "static" if on_cuda and unsupported(model) is None else "hf"


def generate(model, tokenizer, prompts: Sequence[Prompt] = (), sampling: Optional[SamplingConfig] = None,
             batch_size: int = 32, prompt_ids: Optional[Sequence[Sequence[int]]] = None,
             engine: str = "hf", seeds: Optional[Sequence[int]] = None) -> Rollout:
    """Sample one response per prompt (text/messages, or pre-tokenized `prompt_ids`); with `seeds` (one per prompt)
    each response depends only on its prompt and seed, whatever the batch, rank or world size."""
    if prompt_ids is None:
        prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    return ENGINES[resolve_engine(engine, model)]().generate(model, tokenizer, prompt_ids, sampling or SamplingConfig(), batch_size,
                                      seeds=seeds)


__all__ = ["ENGINES", "ENGINE_CHOICES", "Engine", "HFEngine", "StaticEngine", "resolve_engine", "unsupported", "Rollout", "SamplingConfig", "generate", "join_rollouts",
           "response_mask_from_ids"]
