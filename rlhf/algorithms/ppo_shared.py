"""PPO on one frozen base model: actor, critic and reference are LoRA adapters of it (ppo.shared_base).

    rlhf train configs/ppo_lora_shared_tiny.yaml

Roles (one peft model, `SharedBaseActorCritic.lm`, with named adapters; `rlhf.models.adapters.using_adapter` picks
the one a forward runs, so scoring, the loss and generation cannot mix them up):
  actor      adapter "actor" (trainable, optimizer group 0, optim.lr); generates and gives the policy log-probs.
  critic     adapter "critic" + `value_head`, a Linear hidden -> 1 on the base's last hidden state (trainable, group 1,
             ppo.critic_lr). critic_init=policy: a fresh adapter and a fresh head, N(0, initializer_range) as a
             fresh scalar head is drawn (loading.draw_fresh_head_). critic_init=reward_model: ppo.reward_model must
             be a LoRA reward-model folder on the same base (peft adapter_config.json + adapter_model.safetensors
             with the score head, as the reward trainer writes a LoRA run and `save_shared_base` writes
             final/critic/); the adapter and the head's weight start from it (a calibration shift is left out:
             the value head has no bias and learns any offset).
  reference  ppo.ref_ema = 0 (and no ppo.ref_reset_every): the base with every adapter off, no copy at all.
             Otherwise adapter "reference" (frozen), updated after every optimizer step by ops.soft_update_:
             A_ref <- eta A_actor + (1 - eta) A_ref and B_ref <- eta B_actor + (1 - eta) B_ref. This is the EMA done
             in adapter space: B_ref @ A_ref is NOT the EMA of the products B @ A (the product of averages is not the
             average of products); it is what "reference EMA" means under ppo.shared_base. A half-precision adapter
             keeps a float32 master of the adapter tensors, as the full-model reference does.
  reward     a separate reward model (ppo.reward_model through rlhf.rewards), as without shared_base; or, with
             ppo.reward_adapter, the LoRA reward model ppo.reward_model as adapter "reward" + its score head (both
             frozen; a calibrated model's shift, from its reward_normalization.json, as the head's bias) on the
             shared base (`AdapterReward`): no second model at all.

Not supported (refused at start-up): ZeRO-3 and FSDP (the adapters are small: DDP or ZeRO-1/2 hold them whole),
critic_init=reward_model with a full (merged) reward-model folder. Gradients of the actor and the critic flow in
the same backward (PPO's loss adds both forwards); activation checkpointing recomputes each block with the adapter
it ran with (adapters.recompute_with_same_adapters).

Export (final/): the actor adapter in peft's format at the top level (PeftModel.from_pretrained(base, final)), the
tokenizer; final/critic/: the critic adapter with its value head as a peft sequence-classification adapter
(modules_to_save: score), loadable onto AutoModelForSequenceClassification(base, num_labels=1); with
ppo.export_merged, final/merged/: the base with the actor merged in, a plain from_pretrained folder.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import types
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..models import load_causal_lm
from ..models.adapters import (ADAPTER_WEIGHTS, BASE, HEAD_KEY, adapter_parameters, copy_adapter_,
                               merged_state_dict, recompute_with_same_adapters, save_adapter, using_adapter)
from ..models.forward import _unwrap, hidden_states
from ..models.loading import (ADAPTER_CONFIG, adapter_score_bias, apply_fused, compile_model_layers, compiles_layers,
                              draw_fresh_head_, liger_setting)
from ..ops import soft_update_
from .ppo import PolicyAndCritic, reference_logprobs, response_logprobs

ACTOR, CRITIC, REFERENCE, REWARD = "actor", "critic", "reference", "reward"


class SharedBaseActorCritic(PolicyAndCritic):
    """Actor and critic as adapters of one peft model `lm`, plus the critic's `value_head` (see the module doc)."""

    def __init__(self, lm: nn.Module, value_head: nn.Linear, sampling):
        nn.Module.__init__(self)
        self.lm, self.value_head = lm, value_head
        self.temperature, self.top_k, self.top_p = sampling.temperature, sampling.top_k, sampling.top_p

    @contextmanager
    def actor(self) -> Iterator[nn.Module]:
        with using_adapter(self.lm, ACTOR) as lm:
            yield lm

    def policy_logprobs(self, input_ids: Tensor, attention_mask: Tensor, prompt_width: int) -> Tensor:
        with using_adapter(self.lm, ACTOR):
            return response_logprobs(self.lm, input_ids, attention_mask, prompt_width, self.temperature,
                                     self.top_k, self.top_p)

    def reference_logprobs(self, reference: "AdapterReference", input_ids: Tensor, attention_mask: Tensor,
                           prompt_width: int) -> Tensor:
        """The reference's log-probs on the actor's sampling support: the same module under the reference's
        adapter choice (adapters off, or the EMA adapter) and under the actor's."""
        return reference_logprobs(self.lm, self.lm, input_ids, attention_mask, prompt_width, self.temperature,
                                  self.top_k, self.top_p, policy_scope=lambda: using_adapter(self.lm, ACTOR),
                                  reference_scope=lambda: using_adapter(self.lm, reference.adapter))

    def values(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, T] float32 V(s_t) = value_head(last hidden state at t) with the critic adapter: what a
        sequence-classification critic's score head gives at every position (models.forward.token_values)."""
        return self.head_outputs(CRITIC, self.value_head, input_ids, attention_mask)

    def head_outputs(self, adapter: str, head: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, T] float32 head(last hidden state) at every position, with adapter `adapter` active."""
        with using_adapter(self.lm, adapter):
            decoder = _unwrap(self.lm).get_decoder()
            hidden = hidden_states(self.lm, input_ids, attention_mask, decoder, logits_to_keep=1)
        return head(hidden).squeeze(-1).float()


# ---------------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------------


def _lora_config(model_cfg, base_path: str, task: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(r=model_cfg.lora_r, lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout,
                      target_modules=model_cfg.lora_target_modules, task_type=task,
                      base_model_name_or_path=base_path)


def _enable_checkpointing(base: nn.Module, holder: list) -> None:
    kwargs = {"use_reentrant": False, "context_fn": recompute_with_same_adapters(holder)}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.config.use_cache = False


def needs_reference_adapter(ppo) -> bool:
    return ppo.ref_ema > 0 or ppo.ref_reset_every > 0


def _lora_reward_model(path: str, base_path: str):
    """(LoraConfig, {adapter tensor name: tensor}, head weight, score shift or None) of a LoRA reward-model folder
    (the shift of a calibrated one, from its reward_normalization.json)."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    folder = os.path.expanduser(path)
    config = LoraConfig.from_pretrained(folder)
    rm_base = config.base_model_name_or_path
    if rm_base and os.path.realpath(os.path.expanduser(rm_base)) != os.path.realpath(os.path.expanduser(base_path)):
        raise ConfigError(f"ppo.reward_model: the LoRA reward model '{path}' was trained on base '{rm_base}', not "
                          f"on model.name_or_path='{base_path}'; its adapter fits only its own base, so it can "
                          f"neither start the critic adapter (set ppo.critic_init: policy) nor score as an adapter of "
                          f"this base (set ppo.reward_adapter: false)")
    weights_file = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights_file):
        raise ConfigError(f"ppo.reward_model: '{path}' has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    weights = load_file(weights_file)
    if HEAD_KEY not in weights:
        raise ConfigError(f"ppo.reward_model: '{path}': {ADAPTER_WEIGHTS} has no score head ('{HEAD_KEY}'); "
                          f"expected a sequence-classification LoRA adapter (modules_to_save: score)")
    config = copy.deepcopy(config)
    config.task_type, config.modules_to_save, config.inference_mode = "CAUSAL_LM", None, False
    config.base_model_name_or_path = base_path
    return config, weights, weights.pop(HEAD_KEY), adapter_score_bias(path)


def build_shared_base(cfg, tokenizer, sampling, trainer=None) -> SharedBaseActorCritic:
    """One base model (frozen) with adapters actor, critic (and reference, see needs_reference_adapter) and a value
    head. Only the actor and critic adapters and the head require gradients."""
    from peft import get_peft_model

    m, p = cfg.model, cfg.ppo
    if trainer is not None and (trainer.zero_stage == 3 or trainer.fsdp):
        raise ConfigError("ppo.shared_base=true: not supported under DeepSpeed ZeRO-3 or FSDP (the base is frozen "
                          "and the adapters are small: run it on one GPU, with DDP, or with ZeRO-1/2)")
    rm_source = (_lora_reward_model(p.reward_model, m.name_or_path)
                 if p.critic_init == "reward_model" or p.reward_adapter else None)
    critic_source = rm_source if p.critic_init == "reward_model" else None
    compiled = compiles_layers(m.compile_layers)  # the base's layers, with every adapter inside them
    base = load_causal_lm(dataclasses.replace(m, liger_kernels=liger_setting(m, compiled)), tokenizer,
                          trainable=False)  # eval, frozen, dropout off
    holder: list = []
    if m.gradient_checkpointing:
        _enable_checkpointing(base, holder)
    lora = _lora_config(m, m.name_or_path)
    lm = get_peft_model(base, lora, adapter_name=ACTOR)
    lm.add_adapter(CRITIC, critic_source[0] if critic_source else copy.deepcopy(lora))
    if needs_reference_adapter(p):
        lm.add_adapter(REFERENCE, copy.deepcopy(lora))
        copy_adapter_(lm, ACTOR, REFERENCE)
    holder.append(lm)
    inner = _unwrap(lm)
    dtype = next(base.parameters()).dtype
    head = nn.Linear(inner.config.hidden_size, 1, bias=False, dtype=dtype)
    if critic_source:
        _, tensors, head_weight, _ = critic_source  # the critic's head has no bias: values learn any offset
        _load_adapter_(lm, CRITIC, tensors, p.reward_model)
        with torch.no_grad():
            head.weight.copy_(head_weight.reshape(head.weight.shape))
    else:
        draw_fresh_head_(types.SimpleNamespace(score=head, config=inner.config), torch.random.get_rng_state())
    if p.reward_adapter:  # after the draws above, so they do not depend on it
        lm.add_adapter(REWARD, copy.deepcopy(rm_source[0]))
        _load_adapter_(lm, REWARD, rm_source[1], p.reward_model)
    apply_fused(lm, m.fused_layers)  # the fused forwards read the active adapter at each call
    if compiled:
        compile_model_layers(lm, m)
    # trainability is set here once; using_adapter never changes it (peft's set_adapter would)
    lm.requires_grad_(False)
    for name in (ACTOR, CRITIC):
        for q in adapter_parameters(lm, name).values():
            q.requires_grad_(True)
    lm.train()
    pair = SharedBaseActorCritic(lm, head, sampling)
    if p.reward_adapter:  # frozen: a submodule so that it follows the model to its device, never trained
        shift = rm_source[3]  # a calibrated reward model's shift, as its loaders add it (apply_score_bias_)
        pair.reward_head = nn.Linear(inner.config.hidden_size, 1, bias=shift is not None,
                                     dtype=dtype).requires_grad_(False)
        with torch.no_grad():
            pair.reward_head.weight.copy_(rm_source[2].reshape(pair.reward_head.weight.shape))
            if shift is not None:
                pair.reward_head.bias.fill_(shift)
    return pair


def _load_adapter_(lm: nn.Module, name: str, tensors: dict, source: str) -> None:
    params = adapter_parameters(lm, name)
    if params.keys() != tensors.keys():
        missing, extra = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
        raise ConfigError(f"'{source}': its adapter tensors do not match adapter '{name}' "
                          f"({len(missing)} missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]})")
    with torch.no_grad():
        for key, q in params.items():
            if q.shape != tensors[key].shape:
                raise ConfigError(f"'{source}': {key} has shape {tuple(tensors[key].shape)}, expected "
                                  f"{tuple(q.shape)} (another LoRA rank or base?)")
            q.copy_(tensors[key])


# ---------------------------------------------------------------------------------------------------------------------
# The reward adapter
# ---------------------------------------------------------------------------------------------------------------------


class AdapterReward:
    """rlhf.rewards.ModelReward's part for a LoRA reward model on the shared base (ppo.reward_adapter): [B] scores
    at each row's last real token, from adapter "reward" and its score head. Bound to the model once it is built
    (`bind`); it reads the policy's tokens (one base, one tokenizer)."""

    name = "model"
    shares_tokenizer = True

    def __init__(self, tokenizer, batch_size: int):
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.pair: Optional[SharedBaseActorCritic] = None

    def bind(self, pair: SharedBaseActorCritic) -> None:
        self.pair = pair

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        from ..models.forward import last_token_index

        if self.pair is None:
            raise RuntimeError("AdapterReward: no model bound yet (PPO.build_model binds it)")
        parts = []
        for i in range(0, len(input_ids), self.batch_size):
            x, m = input_ids[i:i + self.batch_size], attention_mask[i:i + self.batch_size]
            values = self.pair.head_outputs(REWARD, self.pair.reward_head, x, m)
            parts.append(values.gather(1, last_token_index(m).unsqueeze(1)).squeeze(1))
        return torch.cat(parts).float()


# ---------------------------------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------------------------------


class AdapterReference:
    """The reference policy of a shared base: adapters off, or adapter "reference" = EMA of the actor adapter's
    LoRA factors (see the module doc), with a float32 master when the adapter is in half precision."""

    def __init__(self, pair: SharedBaseActorCritic, has_adapter: bool):
        self.adapter = REFERENCE if has_adapter else BASE
        self.tensors: list[Tensor] = []
        self.actor: list[Tensor] = []
        self.master: Optional[list[Tensor]] = None
        if has_adapter:
            ref, act = adapter_parameters(pair.lm, REFERENCE), adapter_parameters(pair.lm, ACTOR)
            self.names = list(ref)
            self.tensors, self.actor = list(ref.values()), [act[k] for k in ref]
            if any(q.dtype != torch.float32 for q in self.tensors):
                self.master = [q.detach().float().clone() for q in self.tensors]

    @torch.no_grad()
    def update(self, eta: float) -> None:
        """reference <- eta * actor + (1 - eta) * reference, tensor by tensor of the adapters (eta 1: a reset)."""
        if self.adapter is BASE:
            raise RuntimeError("the adapters-off reference has nothing to update (ppo.ref_ema = 0)")
        soft_update_(self.master if self.master is not None else self.tensors, self.actor, eta)
        if self.master is not None:
            soft_update_(self.tensors, self.master, 1.0)

    def state_dict(self) -> dict:
        if self.adapter is BASE:
            return {}
        state = {"names": self.names, "tensors": [q.detach().cpu().clone() for q in self.tensors]}
        if self.master is not None:
            state["master"] = [q.detach().cpu().clone() for q in self.master]
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if self.adapter is BASE:
            return
        if state.get("names") != self.names:
            raise RuntimeError("checkpoint: the reference adapter's tensors do not match this model's")
        for q, v in zip(self.tensors, state["tensors"], strict=True):
            q.copy_(v)
        if self.master is not None:
            for q, v in zip(self.master, state.get("master") or [t.float() for t in state["tensors"]], strict=True):
                q.copy_(v)


# ---------------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------------


def save_shared_base(pair: SharedBaseActorCritic, out_dir: str, tokenizer, export_merged: bool = False) -> None:
    lm = pair.lm
    save_adapter(lm, ACTOR, out_dir)
    tokenizer.save_pretrained(out_dir)
    critic_dir = os.path.join(out_dir, "critic")
    save_adapter(lm, CRITIC, critic_dir, extra={HEAD_KEY: pair.value_head.weight}, task_type="SEQ_CLS",
                  modules_to_save=["score"])
    tokenizer.save_pretrained(critic_dir)
    with open(os.path.join(critic_dir, "value_head.json"), "w") as f:
        json.dump({"note": f"the value head is '{HEAD_KEY}' in {ADAPTER_WEIGHTS}: load onto "
                           "AutoModelForSequenceClassification.from_pretrained(base, num_labels=1) with "
                           "PeftModel.from_pretrained(model, this folder)"}, f, indent=2)
    if export_merged:
        merged = os.path.join(out_dir, "merged")
        inner = _unwrap(lm)
        inner.save_pretrained(merged, state_dict=merged_state_dict(lm, ACTOR))
        tokenizer.save_pretrained(merged)
