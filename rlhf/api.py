"""The Python API: Python objects given to the Trainer in place of what the config names by path (TRL's shape).

    from rlhf import Trainer
    Trainer("configs/dpo_tiny.yaml", model=model, ref_model=ref, tokenizer=tok, train_dataset=ds).train()
    Trainer({"algorithm": "ppo", ...}, model=policy, reward_fns=[my_reward], callbacks=[Printer()]).train()

`config` is a TrainConfig, a dict of config values, or a YAML path; objects override their config field:
  model            model.name_or_path    a PreTrainedModel, trained in place; the steps after loading (log-prob
                                         chunking, dropout off, gradient checkpointing, LoRA, Liger) apply to it,
                                         at its own dtype and device. Reward modelling trains a one-output sequence
                                         classifier in place; a causal LM becomes one with a fresh head (see PPO's
                                         critic below), leaving the object as it was
  tokenizer        model.tokenizer       (TRL's `processing_class` is the same argument); without one, a model
                                         object takes its tokenizer from model.tokenizer, else the config's
                                         model.name_or_path, else the object's own `name_or_path` (from_pretrained's)
  train_dataset,   data.train,           a datasets.Dataset or a list of dicts in any row format; rows get the file
  eval_dataset     data.eval             rows' validation, errors name "train_dataset:N: field 'X'" (data/objects.py)
  ref_model        (DPO, PPO)            the reference in place of a copy of the initial policy: frozen, eval mode.
                                         DPO: with dpo.reference 'copy' it scores every step, with 'precomputed' it
                                         computes the cached log-probs; 'adapter' has no use for one (refused)
  reward_model     ppo.reward_model      a one-output sequence classifier; it reads the policy's tokens unless
  reward_tokenizer                       reward_tokenizer differs from the policy's (then it scores the texts)
  reward_fns       ppo.reward_fns        callables fn(prompts, completions, **columns) -> list[float], each entered
                                         as '<object: NAME>' (NAME: its __name__) after the config's own; weighted
                                         by ppo.reward_weights like those, and logged as reward/NAME
  peft_config      model.lora_*          a peft LoraConfig applied instead of the lora_* values (which record its
                                         r, alpha, dropout and target modules); it turns LoRA on. PPO's shared base
                                         (ppo.shared_base, model objects refused there) builds its adapters from
                                         those recorded values
  callbacks        -                     objects with any of on_train_begin(trainer), on_log(trainer, metrics),
                                         on_step_end(trainer, step), on_save(trainer, checkpoint_path),
                                         on_train_end(trainer, result); setting trainer.should_stop = True stops the
                                         run after the step (at the next step a checkpoint can be written), with a
                                         checkpoint, final/ and the closing evaluation as at a normal end
A field given by an object holds '<object: ClassName>' in the run folder's config.yaml, which also starts with a
comment naming every object. With an object model, model.name_or_path may be empty. A TrainConfig passed in is
filled in place (as the Trainer always resolved mixed_precision in it).

PPO's critic when its source (critic_init=policy: the policy; reward_model: the reward model) is given as an
object: the object is written once to a temporary folder with save_pretrained and read back as a sequence classifier
(rlhf.models.saved_pretrained), so the critic starts from the same weights and draws the same fresh head as from a
path, for any architecture, and shares no tensor with the policy or the reward model.

Resume: pass the same config and objects again, loaded as they were at the start of the run, not the objects the
interrupted run trained in place (the checkpoint restores the trained weights; a frozen reference copy is taken from
the model before that, and LoRA would wrap an already wrapped model). A config whose field holds '<object: ...>'
(e.g. the run folder's config.yaml) needs that object passed again. DPO's cached reference log-probs (dpo.reference
precomputed) are keyed by '<object: ClassName>', not by the object's weights: resume reuses them. Objects are tested
on one process; under ZeRO-3 and FSDP load the models from paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from .config import (ConfigError, TrainConfig, config_from_dict, is_object_placeholder, load_config, object_name,
                     object_placeholder)


def as_config(config: Union[TrainConfig, dict, str, os.PathLike]) -> TrainConfig:
    """A TrainConfig from a config, a dict of values or a YAML path; validated later, once objects fill it in."""
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return config_from_dict(config, validate=False)
    if isinstance(config, (str, os.PathLike)):
        return load_config(os.fspath(config), validate=False)
    raise ConfigError(f"Trainer(config): expected a TrainConfig, a dict of config values or a YAML path, got "
                      f"{type(config).__name__}")


@dataclass
class TrainerObjects:
    """What the Trainer was given as objects (None / empty: read from the config's paths)."""

    model: Any = None
    ref_model: Any = None
    reward_model: Any = None
    reward_tokenizer: Any = None
    tokenizer: Any = None
    train_dataset: Any = None
    eval_dataset: Any = None
    reward_fns: list[Callable] = field(default_factory=list)
    peft_config: Any = None
    callbacks: list[Any] = field(default_factory=list)

    def dataset(self, which: str) -> Any:
        return {"train": self.train_dataset, "eval": self.eval_dataset}[which]

    def apply(self, cfg: TrainConfig) -> None:
        """Enter the objects into `cfg` (placeholders, LoRA values) and refuse what does not fit its algorithm;
        a placeholder left in `cfg` without its object is refused too. cfg.validate() runs after."""
        m, d, algo = cfg.model, cfg.data, cfg.algorithm
        for name in ("model", "ref_model", "reward_model"):
            obj = getattr(self, name)
            if obj is not None and not (hasattr(obj, "config") and hasattr(obj, "parameters")):
                raise ConfigError(f"{name}=: expected a transformers PreTrainedModel, got {type(obj).__name__}")
        if self.model is not None:
            source = "" if is_object_placeholder(m.name_or_path) else m.name_or_path
            if self.tokenizer is None and not m.tokenizer:
                m.tokenizer = source or getattr(self.model, "name_or_path", "") or ""
                if not m.tokenizer:
                    raise ConfigError("model= given without a tokenizer: pass tokenizer= (or processing_class=), or "
                                      "set model.tokenizer to a tokenizer folder or hub name")
            m.name_or_path = object_placeholder(self.model)
        if self.tokenizer is not None:
            m.tokenizer = object_placeholder(self.tokenizer)
        for which in ("train", "eval"):
            if self.dataset(which) is not None:
                setattr(d, which, object_placeholder(self.dataset(which)))
        if self.ref_model is not None:
            if algo not in ("dpo", "ppo"):
                raise ConfigError(f"ref_model=: algorithm {algo} has no reference model (dpo and ppo have one)")
            if algo == "dpo" and (cfg.dpo.reference == "adapter" or cfg.dpo.reference_free):
                raise ConfigError(f"ref_model= with dpo.reference={cfg.dpo.reference!r}, dpo.reference_free="
                                  f"{cfg.dpo.reference_free}: set dpo.reference to 'copy' or 'precomputed' to use it")
        if (self.reward_model is not None or self.reward_fns or self.reward_tokenizer is not None) and algo != "ppo":
            raise ConfigError(f"reward_model=, reward_tokenizer=, reward_fns=: PPO's reward sources; algorithm is "
                              f"{algo}")
        if self.reward_tokenizer is not None and self.reward_model is None:
            raise ConfigError("reward_tokenizer= belongs to a reward_model= object; pass both")
        if algo == "ppo" and cfg.ppo.shared_base:
            models = [n for n in ("model", "ref_model", "reward_model") if getattr(self, n) is not None]
            if models:
                raise ConfigError(f"{', '.join(n + '=' for n in models)} with ppo.shared_base=true: the shared base "
                                  f"and its adapters are built from model.name_or_path and ppo.reward_model paths; "
                                  f"pass those paths, or set ppo.shared_base: false")
        if self.reward_model is not None:
            cfg.ppo.reward_model = object_placeholder(self.reward_model)
        if algo == "ppo":
            self._apply_reward_fns(cfg)
        if self.peft_config is not None:
            self._apply_peft(cfg)
        # placeholders of an earlier run's objects (its config.yaml) need those objects again
        given = {"model.name_or_path": self.model, "model.tokenizer": self.tokenizer,
                 "data.train": self.train_dataset, "data.eval": self.eval_dataset}
        if algo == "ppo":
            given["ppo.reward_model"] = self.reward_model
        for key, obj in given.items():
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            if obj is None and is_object_placeholder(value):
                arg = {"model.name_or_path": "model", "model.tokenizer": "tokenizer", "data.train": "train_dataset",
                       "data.eval": "eval_dataset", "ppo.reward_model": "reward_model"}[key]
                raise ConfigError(f"{key}={value!r}: the config records a Python object given to an earlier run; "
                                  f"pass it again as Trainer({arg}=...), or set {key} to a path")

    def _apply_reward_fns(self, cfg: TrainConfig) -> None:
        p = cfg.ppo
        names = [object_placeholder(fn) for fn in self.reward_fns]
        for fn, name in zip(self.reward_fns, names):
            if not callable(fn):
                raise ConfigError(f"reward_fns=: expected callables fn(prompts, completions, **columns) -> "
                                  f"list[float], got {type(fn).__name__}")
            if names.count(name) > 1:
                raise ConfigError(f"reward_fns=: two callables named {object_name(fn)!r}; give them distinct "
                                  f"__name__s (metrics are logged as reward/<name>)")
        missing = [f for f in p.reward_fns if is_object_placeholder(f) and f not in names]
        if missing:
            raise ConfigError(f"ppo.reward_fns holds {', '.join(missing)}: callables given to an earlier run; pass "
                              f"them again as Trainer(reward_fns=[...])")
        p.reward_fns = list(p.reward_fns) + [n for n in names if n not in p.reward_fns]

    def _apply_peft(self, cfg: TrainConfig) -> None:
        lora, m = self.peft_config, cfg.model
        if not isinstance(getattr(lora, "r", None), int) or lora.r <= 0:
            raise ConfigError(f"peft_config=: expected a peft LoraConfig with r > 0, got {type(lora).__name__}")
        targets = lora.target_modules
        m.lora_r, m.lora_alpha, m.lora_dropout = lora.r, lora.lora_alpha, lora.lora_dropout
        m.lora_target_modules = (sorted(targets) if isinstance(targets, (set, list, tuple))
                                 else targets if isinstance(targets, str) else object_placeholder(lora))
        m.peft_config = lora

    def header(self) -> str:
        """Comment lines for the run folder's config.yaml naming the objects given ('' when none)."""
        parts = []
        for name in ("model", "ref_model", "reward_model", "reward_tokenizer", "tokenizer", "train_dataset",
                     "eval_dataset", "peft_config"):
            obj = getattr(self, name)
            if obj is not None:
                size = f" ({len(obj)} rows)" if name.endswith("dataset") and hasattr(obj, "__len__") else ""
                parts.append(f"{name}={object_name(obj)}{size}")
        for name in ("reward_fns", "callbacks"):
            if getattr(self, name):
                parts.append(f"{name}=[{', '.join(object_name(o) for o in getattr(self, name))}]")
        return f"# Python objects given to Trainer: {', '.join(parts)}\n" if parts else ""


def trainer_objects(model=None, ref_model=None, reward_model=None, reward_tokenizer=None, tokenizer=None,
                    processing_class=None, train_dataset=None, eval_dataset=None, reward_fns=None, peft_config=None,
                    callbacks=None) -> TrainerObjects:
    if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
        raise ConfigError("tokenizer= and processing_class= are one argument (TRL's name is processing_class); "
                          "pass one")
    return TrainerObjects(model, ref_model, reward_model, reward_tokenizer,
                          tokenizer if tokenizer is not None else processing_class, train_dataset, eval_dataset,
                          list(reward_fns or []), peft_config, list(callbacks or []))


def call_back(callbacks: list, event: str, trainer, *args) -> None:
    """Call `event` (e.g. 'on_log') on every callback that defines it, with the trainer first."""
    for cb in callbacks:
        fn = getattr(cb, event, None)
        if callable(fn):
            fn(trainer, *args)

