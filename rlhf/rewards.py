"""Reward sources for RL: a trained reward model, programmatic rewards, and a weighted sum of several.

A programmatic reward is named by an import path 'module:callable' and has the signature

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

where `columns` are the prompt rows' other dataset fields, each a list aligned with `prompts`
(e.g. the tests of a coding problem, or a gold answer). A reward model is a sequence-classification
checkpoint with one output; its score is read at the last real token (the EOS of a finished
response), so a reward model trained and calibrated by `rlhf train` (algorithm: reward) scores
exactly as it did in training. A reward model with a tokenizer of its own (another vocabulary or chat
template than the policy's) reads the prompt and response texts encoded with its tokenizer and template, as
it would have in its own training; one that shares the policy's tokenizer reads the policy's tokens directly.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Optional, Sequence

import torch

from .config import ConfigError, ModelConfig, object_name, object_placeholder
from .data.batching import attention_mask as padding_mask, pad
from .data.templates import Prompt, encode_prompt, encode_response
from .models import ensure_pad_token, load_scalar_model, load_tokenizer, scalar_scores

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


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers turn text and chats into the same ids: vocabulary, chat template, pad and EOS."""
    return (a.get_vocab() == b.get_vocab() and getattr(a, "chat_template", None) == getattr(b, "chat_template", None)
            and a.pad_token_id == b.pad_token_id and a.eos_token_id == b.eos_token_id)


class ModelReward:
    """A frozen reward model on the device; scores [B] at each row's last real token.

    `tokenizer` is the policy's. When the reward model's folder carries a tokenizer that differs from it,
    `shares_tokenizer` is False and the texts are scored (`score_texts`) instead of the policy's tokens."""

    name = "model"

    def __init__(self, path: str, model_cfg: Optional[ModelConfig] = None, tokenizer=None,
                 device: Optional[torch.device] = None, batch_size: int = 32, model: Optional[torch.nn.Module] = None,
                 model_tokenizer=None):
        """`model`, `model_tokenizer`: a reward model (and its own tokenizer) given as objects (Trainer(reward_model=,
        reward_tokenizer=)) in place of loading `path`; without model_tokenizer it reads the policy's tokens."""
        cfg = ModelConfig(name_or_path=path, dtype=model_cfg.dtype if model_cfg else "float32",
                          trust_remote_code=model_cfg.trust_remote_code if model_cfg else False)
        own = None
        if model is not None:
            own = ensure_pad_token(model_tokenizer) if model_tokenizer is not None else None
        elif tokenizer is not None:
            try:
                own = load_tokenizer(path, field="ppo.reward_model", trust_remote_code=cfg.trust_remote_code)
            except ConfigError:  # a folder without tokenizer files reads the policy's tokens
                pass
        self.shares_tokenizer = own is None or same_tokenizer(own, tokenizer)
        self.tokenizer = tokenizer if self.shares_tokenizer else own
        self.model = load_scalar_model(path, cfg, self.tokenizer, trainable=False, field="ppo.reward_model",
                                       model=model)
        self.model.to(device or torch.device("cpu"))
        self.batch_size = batch_size

    @torch.no_grad()
    def score_texts(self, prompts: Sequence[Prompt], responses: Sequence[str],
                    finished: Optional[Sequence[bool]] = None) -> torch.Tensor:
        """[B] scores of prompt/response texts encoded with the reward model's tokenizer and chat template, as
        reward-model training encodes them; a finished response ends with EOS, an unfinished one (cut at the
        token limit) does not."""
        finished = [True] * len(responses) if finished is None else list(finished)
        tok = self.tokenizer
        seqs = [encode_prompt(tok, p) + encode_response(tok, r, add_eos=bool(f))
                for p, r, f in zip(prompts, responses, finished)]
        return self(pad(seqs, tok.pad_token_id), padding_mask(seqs))

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        parts = [scalar_scores(self.model, input_ids[i:i + self.batch_size].to(device),
                               attention_mask[i:i + self.batch_size].to(device))
                 for i in range(0, len(input_ids), self.batch_size)]
        return torch.cat(parts).float()


class FunctionReward:
    """A programmatic reward imported from 'module:callable', or given as a callable `fn` (then `path` is its
    '<object: name>' entry in ppo.reward_fns and `name` its __name__); checks what it returns."""

    def __init__(self, path: str, fn: Optional[RewardFn] = None):
        self.path, self.fn = path, fn if fn is not None else import_reward_fn(path)
        self.name = object_name(fn) if fn is not None else path.partition(":")[2]

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
                 completions: list[str], columns: Optional[dict[str, list]] = None,
                 chats: Optional[Sequence[Prompt]] = None, finished: Optional[Sequence[bool]] = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted score [B] on CPU, each source's own scores [B] keyed by its name).

        input_ids/attention_mask: [B, P + R] prompt and response in the policy's tokens (what a reward model that
        shares its tokenizer reads); prompts, completions: B texts; columns: the prompt rows' other fields, B values
        each; chats: the prompts as given in the data (text or messages) and finished: whether each response ended
        with EOS, for a reward model with a tokenizer of its own (default: `prompts`, all finished).
        """
        parts: dict[str, torch.Tensor] = {}
        if self.model is not None and self.model.shares_tokenizer:
            parts[self.model.name] = self.model(input_ids, attention_mask).cpu()
        elif self.model is not None:
            parts[self.model.name] = self.model.score_texts(chats or prompts, completions, finished).cpu()
        for fn in self.fns:
            parts[fn.name] = fn(prompts, completions, columns or {})
        total = sum(w * s for w, s in zip(self.weights, parts.values()))
        return total, parts


def build_reward(ppo: Any, model_cfg: Optional[ModelConfig] = None, tokenizer=None,
                 device: Optional[torch.device] = None, model: Optional[torch.nn.Module] = None,
                 model_tokenizer=None, fns: Sequence[RewardFn] = ()) -> RewardSources:
    """The reward of a `PPOSection`: ppo.reward_model, ppo.reward_fns, ppo.reward_weights. Objects given to the
    Trainer (rlhf.api) take the place of what these name: `model` (and `model_tokenizer`) of ppo.reward_model, each
    callable in `fns` of the ppo.reward_fns entry '<object: its name>'."""
    rm = (ModelReward(ppo.reward_model, model_cfg, tokenizer, device, ppo.rollout_micro_batch_size, model=model,
                      model_tokenizer=model_tokenizer) if ppo.reward_model else None)
    return RewardSources(rm, function_rewards(ppo.reward_fns, fns), ppo.reward_weights)


def function_rewards(paths: Sequence[str], fns: Sequence[RewardFn] = ()) -> list[FunctionReward]:
    """The programmatic rewards of ppo.reward_fns: each 'module:callable' imported, each '<object: name>' entry the
    callable of that name in `fns` (given to the Trainer, rlhf.api)."""
    given = {object_placeholder(fn): fn for fn in fns}
    return [FunctionReward(p, given.get(p)) for p in paths]
