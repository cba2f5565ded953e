"""PPO with a critic, done the way Xu et al. (2024, "Is DPO Superior to PPO for LLM Alignment?") found it must be.

    rlhf train configs/ppo_tiny.yaml

One iteration, as data (per rank; B rollouts, P prompt width, R response width):
  prompts -> generate with the policy (temperature, top-k, top-p)                 -> Rollout, [B, P + R]
  -> one scoring pass: old log-probs, reference log-probs, values V(s_t), score   -> [B, R] x 3, [B]
  -> per-token rewards: -beta * KL on every token, clipped score on the last one  -> [B, R]
  -> GAE -> advantages whitened over the whole rollout batch of all ranks, once   -> [B, R]
  -> ppo_epochs x num_minibatches optimizer steps of clipped policy + vf_coef * clipped value loss
  -> reference EMA after every optimizer step.
The paper's three factors are config values: ppo.adv_norm, the batch (ppo.rollout_batch_size with
ppo.num_minibatches) and ppo.ref_ema; configs/ppo_ablation_*.yaml walk through them one at a time.

Over several ranks an iteration is a function of (seed, iteration, weights) alone, whatever the world size:
- every rollout is sampled from its own seed, derived from the seed and its global index in the iteration (prompt
  position x samples_per_prompt + sample), not from the rank: different prompts and different samples of a prompt
  still get different streams, and a prompt draws the same response on any number of ranks (rollout.SeededSampler);
- minibatches are stratified over groups of num_minibatches consecutive rollouts (a group never straddles two ranks,
  see PPOConfig.validate_world), so the union of the ranks' minibatch k is the same rollouts at any world size;
- statistics (advantage whitening, value and score normalization, metrics) are reduced over all ranks.
Under ZeRO-3 the policy and critic are gathered once per rollout phase (Trainer.full_model), not per token, and the
reference is a whole copy on every rank.

With LoRA, ppo.shared_base runs the policy, the critic and the reference as adapters of one frozen base model
(ppo_shared.py): PolicyAndCritic's roles (actor, policy_logprobs, reference_logprobs, values) are then adapters, not models.

Metrics (means over all ranks). Once an iteration, in its first step: objective/scores (the reward sources' score),
objective/kl (per-token KL estimate summed over a response), objective/rlhf_reward (summed per-token rewards),
objective/kl_coef, reward/<source>, response/length_mean, response/eos_rate, critic/explained_variance,
time/generate_s, time/score_s; in its last step time/train_s. Every step: ppo/policy_loss, ppo/value_loss (token
means), ppo/clipfrac, ppo/approx_kl, ppo/ratio_mean, ppo/early_stop, ppo/vf_clipfrac,
critic/value_mean.
Samples: the first logging.log_samples rollouts of each iteration on rank 0 go to the run folder's samples.jsonl
(prompt, response, score, per-sequence KL, length) and, with wandb, to a table (tracking.log_samples_table).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, replace
from typing import Callable, ContextManager, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..data import BadRows, DataError, encode_prompt, prompt_text
from ..losses import ppo_policy_loss, ppo_value_loss
from ..models import (ema_update_, frozen_copy, keep_score_bias_, load_causal_lm, load_scalar_model,
                      position_ids_from_mask, saved_pretrained, token_logprobs, token_values, whole_loading)
from ..models.forward import _lm_parts, chunk_tokens, hidden_states
from ..ops import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController, RunningMeanStd, _sampling_logits,
                   all_reduce_sum_, gae, logprobs_from_logits, masked_mean, masked_sum, masked_whiten, soft_update_)
from ..rewards import build_reward
from ..rollout import SamplingConfig, generate
from ..rollout.hf import ignored_generation_settings
from ..tracking import SAMPLES_FILE, log_samples_table, write_samples
from .base import Algorithm, StepBatch
from .supervised import report_skipped

VALUE_VAR_FLOOR = 1e-2  # paper (ReaLHF ExponentialRunningMeanStd): the running variance of returns is kept >= 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# Rewards per token
# ---------------------------------------------------------------------------------------------------------------------


def final_scores(scores: Tensor, eos: Tensor, missing_eos_penalty: Optional[float] = None,
                 on_truncated: str = "bootstrap", truncated_score: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """(the score each response receives at its last token [B], whether it receives one [B] bool).

    A response that ended with EOS keeps its score. One cut at max_new_tokens:
    - missing_eos_penalty (>= 0, TRL's meaning): scored, with the penalty subtracted: score - penalty;
    - truncated_score: scored, with this fixed value in place of its score;
    - otherwise on_truncated="score" keeps its score, and "bootstrap" (paper) gives it none: the episode did not
      end, so GAE bootstraps from V(s_T) instead.
    Setting both missing_eos_penalty and truncated_score is refused (PPOConfig.validate).
    """
    truncated = ~eos.bool()
    everyone = torch.ones_like(truncated)
    if missing_eos_penalty is not None:
        return torch.where(truncated, scores - missing_eos_penalty, scores), everyone
    if truncated_score is not None:
        return torch.where(truncated, torch.full_like(scores, truncated_score), scores), everyone
    if on_truncated == "score":
        return scores, everyone
    return torch.where(truncated, torch.zeros_like(scores), scores), ~truncated


def token_rewards(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, scores: Tensor, scored: Tensor,
                  kl_coef: float, kl_estimator: str = "k1", reward_clip: float = 0.0) -> tuple[Tensor, Tensor]:
    """r_t = -kl_coef * KL_t on every response token, plus clip(score, +-reward_clip) on the last valid token of
    each scored response (reward_clip 0 = no clip).

    logprobs, ref_logprobs, mask: [B, R] right-padded; scores, scored: [B]. Returns (rewards, kl), [B, R] each,
    0 on padding; KL_t is the per-token estimator (KL_ESTIMATORS) of KL(pi || ref).
    """
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = torch.where(mask != 0, KL_ESTIMATORS[kl_estimator](logprobs, ref_logprobs), zero)
    if reward_clip > 0:
        scores = scores.clamp(-reward_clip, reward_clip)
    last = (mask.sum(1).long() - 1).clamp(min=0)
    bonus = torch.where(scored.bool(), scores.to(kl.dtype), zero)
    rewards = (-kl_coef * kl).scatter_add(1, last.unsqueeze(1), bonus.unsqueeze(1))
    return rewards, kl


# ---------------------------------------------------------------------------------------------------------------------
# Rank-independent sampling seeds, minibatches and statistics
# ---------------------------------------------------------------------------------------------------------------------


def rollout_seed(seed: int, index: int) -> int:
    """The sampling seed of the iteration's rollout at global position `index` (iterations continue the count, so
    no two rollouts of a run share a seed). A hash, so nearby indices give unrelated generator seeds."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # < 2**63


def minibatch_rows(num_rollouts: int, num_minibatches: int, first: int, count: int,
                   generator: torch.Generator) -> Tensor:
    """[num_minibatches, count // num_minibatches] local row indices of each minibatch, for the rank holding the
    global rollouts first .. first + count - 1 of num_rollouts.

    Each group of num_minibatches consecutive rollouts sends one random member to every minibatch; the draw is
    keyed by global position (the same `generator` state on every rank), and `first` and `count` are multiples of
    num_minibatches, so minibatch k is the same set of rollouts at any world size.
    """
    K = num_minibatches
    if first % K or count % K:
        raise ValueError(f"rows {first}..{first + count} of a rank must be whole groups of {K}")
    keys = torch.rand(num_rollouts, generator=generator)[first:first + count].view(-1, K)
    pick = keys.argsort(dim=1)  # pick[g, k]: the row of group g that goes to minibatch k
    return (torch.arange(0, count, K)[:, None] + pick).T


def global_explained_variance(count: float, r_sum: float, r_sq: float, e_sum: float, e_sq: float) -> float:
    """1 - Var[R - V] / Var[R] from token count and the sums of R, R^2, R - V, (R - V)^2 (NaN when Var[R] = 0)."""
    n = max(count, 1.0)
    var_r = r_sq / n - (r_sum / n) ** 2
    var_e = e_sq / n - (e_sum / n) ** 2
    return 1.0 - var_e / var_r if var_r > 0 else math.nan


# ---------------------------------------------------------------------------------------------------------------------
# Log-probs of the sampling distribution
# ---------------------------------------------------------------------------------------------------------------------


def response_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_width: int) -> Tensor:
    """[B, R, V] float32 logits predicting the response tokens input_ids[:, P:] (P = prompt_width). The full-logits
    path, for models whose head the chunked path cannot take (models.forward._lm_parts)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.logits[:, prompt_width - 1:-1].float()


def _response_positions(attention_mask: Tensor, prompt_width: int) -> Tensor:
    """[B, T-1] 1 where the label input_ids[:, t+1] is a response token (token_logprobs' `positions`)."""
    positions = torch.zeros_like(attention_mask[:, 1:])
    positions[:, prompt_width - 1:] = attention_mask[:, prompt_width:]
    return positions


def response_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_width: int,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """[B, R] log-probs of the response tokens input_ids[:, P:] under the sampling distribution, 0 on padding.

    Through models.forward.token_logprobs: the LM head runs on the response positions only, in chunks, so the
    [B, R, V] float32 logits never exist (at a 152k vocabulary they are 0.6 MB per token)."""
    logp = token_logprobs(model, input_ids, attention_mask, temperature, top_k, top_p,
                          positions=_response_positions(attention_mask, prompt_width))
    return logp[:, prompt_width - 1:]


def support_logprobs(logits: Tensor, support_logits: Tensor, labels: Tensor, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """log-probs of labels under softmax(logits / temperature) renormalized over the tokens that the sampling filter
    (top-k, top-p) keeps from support_logits.

    The reference is scored on the policy's sampling support (ReaLHF's logits mask): a sampled token is always in
    it, so the KL penalty stays finite, and it is exactly 0 while reference == policy. Filtering the reference by
    its own top-k/top-p would give -inf (an infinite KL) to every sampled token outside the reference's nucleus.
    logits, support_logits: [B, T, V]; labels [B, T] -> [B, T]. Row by row to bound the extra memory.
    """
    rows = []
    for z, s, y in zip(logits, support_logits, labels):
        dropped = _sampling_logits(s, temperature, top_k, top_p, upcast=True) == float("-inf")
        dropped = dropped.scatter(-1, y.unsqueeze(-1), False)  # the sampled token is always in the support
        rows.append(logprobs_from_logits(z.masked_fill(dropped, float("-inf"))[None], y[None], temperature)[0])
    return torch.stack(rows)


@torch.no_grad()
def reference_logprobs(policy: nn.Module, reference: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                       prompt_width: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       policy_scope: Callable[[], ContextManager] = nullcontext,
                       reference_scope: Callable[[], ContextManager] = nullcontext) -> Tensor:
    """[B, R] support_logprobs of the response tokens under `reference` on `policy`'s sampling support, 0 on
    padding, without [B, R, V] logits: both models' final hidden states are taken at the response positions and
    both heads run chunk by chunk (models.forward's chunk size), support_logprobs on each chunk.

    Without top-k / top-p the support is the whole vocabulary: the reference's own log-probs, no policy pass.
    A model whose head the chunked path cannot take (models.forward._lm_parts) is scored on full logits.
    policy_scope / reference_scope: contexts each model's forwards run in (the shared base's adapter choice, for one
    module that plays both roles)."""
    P = prompt_width
    if top_k <= 0 and top_p >= 1.0:
        with reference_scope():
            return response_logprobs(reference, input_ids, attention_mask, P, temperature)
    parts = [_lm_parts(policy), _lm_parts(reference)]
    chunk = min(chunk_tokens(policy), chunk_tokens(reference))
    labels = input_ids[:, P:]
    if None in parts or chunk <= 0:
        with reference_scope():
            ref_logits = response_logits(reference, input_ids, attention_mask, P)
        with policy_scope():
            pol_logits = response_logits(policy, input_ids, attention_mask, P)
        return on_response(support_logprobs(ref_logits, pol_logits, labels, temperature, top_k, top_p),
                           attention_mask[:, P:])
    keep = attention_mask[:, P:] != 0
    hidden = []
    for m, scope, (decoder, _) in zip((policy, reference), (policy_scope, reference_scope), parts):
        with scope():  # the heads are plain Linear modules (_lm_parts): no adapter acts in them
            hidden.append(hidden_states(m, input_ids, attention_mask, decoder, logits_to_keep=1)[:, P - 1:-1][keep])
    y = labels[keep]
    out = []
    for i in range(0, len(y), chunk):
        z_pol, z_ref = (head(h[i:i + chunk])[None] for (_, head), h in zip(parts, hidden))
        out.append(support_logprobs(z_ref, z_pol, y[None, i:i + chunk], temperature, top_k, top_p)[0])
    values = torch.cat(out) if out else torch.zeros(0, device=input_ids.device)
    return torch.zeros(keep.shape, dtype=torch.float32, device=input_ids.device).masked_scatter(keep, values.float())


def on_response(logprobs: Tensor, response_mask: Tensor) -> Tensor:
    """0 on padding: a pad label outside the top-k/top-p filter has log-prob -inf, and -inf - (-inf) in the ratio
    would send NaN gradients back through the masked-out positions."""
    return torch.where(response_mask != 0, logprobs, torch.zeros((), dtype=logprobs.dtype, device=logprobs.device))


class ScheduleAfter:
    """A learning-rate factor schedule(step - start) that begins at step `start` (0 before): the policy's schedule
    under critic warm-up. A class, not a closure, so LambdaLR's state_dict can save it."""

    def __init__(self, schedule, start: int):
        self.schedule, self.start = schedule, start

    def __call__(self, step: int) -> float:
        return self.schedule(step - self.start) if step >= self.start else 0.0


class PolicyAndCritic(nn.Module):
    """Policy and critic in one module, so the Trainer's one optimizer and accelerate.prepare hold both.

    Every forward goes through a role: `actor()` (the model that generates), `policy_logprobs`,
    `reference_logprobs`, `values`; the
    shared-base variant (ppo_shared.SharedBaseActorCritic) runs the same roles as adapters of one base."""

    def __init__(self, policy: nn.Module, critic: nn.Module, sampling: SamplingConfig):
        super().__init__()
        self.policy, self.critic = policy, critic
        self.temperature, self.top_k, self.top_p = sampling.temperature, sampling.top_k, sampling.top_p

    @contextmanager
    def actor(self) -> Iterator[nn.Module]:
        """The model to generate with."""
        yield self.policy

    def policy_logprobs(self, input_ids: Tensor, attention_mask: Tensor, prompt_width: int) -> Tensor:
        """[B, R] log-probs of the response tokens under the sampling distribution, 0 on padding."""
        return response_logprobs(self.policy, input_ids, attention_mask, prompt_width, self.temperature, self.top_k,
                                 self.top_p)

    def reference_logprobs(self, reference: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                           prompt_width: int) -> Tensor:
        """[B, R] the reference's log-probs of the response tokens on the policy's sampling support, 0 on padding."""
        return reference_logprobs(self.policy, reference, input_ids, attention_mask, prompt_width, self.temperature,
                                  self.top_k, self.top_p)

    def values(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, T] V(s_t) at every position t."""
        return token_values(self.critic, input_ids, attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, prompt_width: int) -> tuple[Tensor, Tensor]:
        """(log-probs [B, R] of the response tokens under the sampling distribution, 0 on padding;
        values V(s_t) [B, R])."""
        logp = self.policy_logprobs(input_ids, attention_mask, prompt_width)
        values = self.values(input_ids, attention_mask)[:, prompt_width - 1:-1]
        return logp, values


# ---------------------------------------------------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PromptRow:
    ids: list[int]  # the encoded prompt (chat template applied)
    text: str  # the prompt as reward fns receive it
    columns: dict  # the row's other fields, passed to reward fns by name
    chat: Union[str, list] = ""  # the prompt as the data gives it (text or messages), for a reward model's own template


@dataclass
class PPOBatch:
    """Scored rollouts of one rank, or a micro-batch of them. P = prompt width, R = response width.

    input_ids, attention_mask: [B, P + R] left-padded prompt, right-padded response
    response_mask:             [B, R] 1 on response tokens up to and including EOS
    old_logprobs:              [B, R] log-probs of the sampling distribution at rollout time
    old_values:                [B, R] critic output V(s_t) at rollout time (normalized space with ppo.value_norm)
    advantages:                [B, R] GAE advantages (whitened over the rollout batch with ppo.adv_norm)
    returns:                   [B, R] value targets (normalized and clipped with ppo.value_norm)
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    old_logprobs: Tensor
    old_values: Tensor
    advantages: Tensor
    returns: Tensor
    prompt_width: int
    train_policy: bool = True  # False during critic warm-up

    def select(self, idx: Tensor) -> "PPOBatch":
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})


# ---------------------------------------------------------------------------------------------------------------------
# The algorithm
# ---------------------------------------------------------------------------------------------------------------------


class PPO(Algorithm):
    progress_keys = ("objective/scores", "objective/kl", "ppo/value_loss")

    def __init__(self, cfg, trainer):
        super().__init__(cfg, trainer)
        p = cfg.ppo
        self.prompts = self._load_prompts()
        given = trainer.objects  # Python objects in place of ppo.reward_model / reward_fns entries (rlhf.api)
        if p.reward_adapter:  # the reward model is an adapter of the shared base, bound in build_model
            from ..rewards import RewardSources, function_rewards
            from .ppo_shared import AdapterReward

            self.reward = RewardSources(AdapterReward(trainer.tokenizer, p.rollout_micro_batch_size),
                                        function_rewards(p.reward_fns, given.reward_fns), p.reward_weights)
        else:
            with whole_loading(trainer.accelerator):  # a frozen reward model is whole on every rank, also ZeRO-3
                self.reward = build_reward(p, cfg.model, trainer.tokenizer, trainer.device, model=given.reward_model,
                                           model_tokenizer=given.reward_tokenizer, fns=given.reward_fns)
        rm = self.reward.model
        if rm is not None and not rm.shares_tokenizer:
            if p.critic_init == "reward_model":
                raise ConfigError(
                    f"ppo.critic_init=reward_model: the reward model '{p.reward_model}' has a tokenizer of its own "
                    f"({len(rm.tokenizer)} tokens) that differs from the policy's ({len(trainer.tokenizer)} tokens); "
                    "the critic reads the policy's tokens, so set ppo.critic_init: policy")
            trainer.print(f"reward model {p.reward_model}: a tokenizer of its own ({len(rm.tokenizer)} tokens, the "
                          f"policy's {len(trainer.tokenizer)}); it scores the prompt and response texts")
        self.sampling = SamplingConfig(p.max_new_tokens, p.temperature, p.top_k, p.top_p)
        self.steps_per_iteration = p.num_minibatches * p.ppo_epochs
        self.kl_ctl = (AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl
                       else FixedKLController(p.kl_coef))
        self.value_stats = RunningMeanStd(decay=p.value_norm_decay, var_floor=VALUE_VAR_FLOOR)
        self.score_stats = RunningMeanStd()
        self.reference: Optional[nn.Module] = None
        self._order_cache: dict[int, list[int]] = {}
        self._train_start = time.time()

    def _load_prompts(self) -> list[PromptRow]:
        d, tok = self.cfg.data, self.trainer.tokenizer
        bad, out = BadRows(d.on_bad_row), []
        for row in self.trainer.rows("train"):
            try:
                prompt = row.get("prompt", (str, list))
                ids = encode_prompt(tok, prompt)
                if len(ids) > d.max_prompt_length:
                    raise row.fail("prompt", f"{len(ids)} tokens > data.max_prompt_length={d.max_prompt_length}")
            except DataError as e:
                bad(e)
                continue
            text = prompt if isinstance(prompt, str) else prompt_text(tok, prompt)
            out.append(PromptRow(ids, text, {k: v for k, v in row.data.items() if k != "prompt"}, prompt))
        self.skipped = report_skipped(self.trainer, bad, "train")
        if not out:
            raise DataError(d.train, 0, "prompt", "no usable prompt rows")
        return out

    # --- set-up -------------------------------------------------------------------------------
    def build_model(self) -> PolicyAndCritic:
        cfg, tok, given = self.cfg, self.trainer.tokenizer, self.trainer.objects
        if cfg.ppo.shared_base:
            from .ppo_shared import build_shared_base

            pair = build_shared_base(cfg, tok, self.sampling, self.trainer)
            self._name_ignored_generation_settings(pair.lm)
            if cfg.ppo.reward_adapter:
                self.reward.model.bind(pair)
            return pair
        from_rm = cfg.ppo.critic_init == "reward_model"
        # a critic from a model given as an object is read back from its save_pretrained folder, written before LoRA
        # wraps the policy: as from a path (rlhf.api)
        critic_copy = saved_pretrained(given.reward_model if from_rm else given.model)
        policy = load_causal_lm(cfg.model, tok, model=given.model)
        self._name_ignored_generation_settings(policy)
        critic = load_scalar_model(critic_copy.name if critic_copy is not None else cfg.ppo.reward_model if from_rm
                                   else cfg.model.name_or_path, cfg.model, tok, trainable=True,
                                   field="ppo.reward_model" if from_rm else "model.name_or_path")
        if critic_copy is not None:
            critic_copy.cleanup()
        return PolicyAndCritic(policy, critic, self.sampling)

    def _name_ignored_generation_settings(self, policy) -> None:
        cfg = self.cfg
        ignored = ignored_generation_settings(policy)
        if ignored:
            self.trainer.print(f"{cfg.model.name_or_path}: generation_config sets "
                               f"{', '.join(f'{k}={v}' for k, v in ignored.items())}; ignored: rollouts sample from "
                               "ppo.temperature, ppo.top_k and ppo.top_p alone, the distribution training scores")

    def param_groups(self, model: PolicyAndCritic) -> list[dict]:
        def trainable(params):
            return [q for q in params if q.requires_grad]
        if self.cfg.ppo.shared_base:
            from .ppo_shared import ACTOR, CRITIC, adapter_parameters

            actor = trainable(adapter_parameters(model.lm, ACTOR).values())
            critic = trainable(adapter_parameters(model.lm, CRITIC).values()) + trainable(model.value_head.parameters())
            return [{"params": actor}, {"params": critic, "lr": self.cfg.ppo.critic_lr}]
        return [{"params": trainable(model.policy.parameters())},
                {"params": trainable(model.critic.parameters()), "lr": self.cfg.ppo.critic_lr}]

    def prepared(self, model) -> None:
        if self.cfg.ppo.critic_warmup_iters:
            self._hold_policy_during_warmup()
        if self.cfg.ppo.shared_base:  # no copy: adapters off, or a reference adapter on the same base
            from .ppo_shared import AdapterReference, needs_reference_adapter

            self.reference = AdapterReference(self._pair(model), needs_reference_adapter(self.cfg.ppo))
            self.reference_master = None
            return

        def rebuild():
            with whole_loading(self.trainer.accelerator):
                return load_causal_lm(self.cfg.model, self.trainer.tokenizer)
        given = self.trainer.objects.ref_model  # Trainer(ref_model=...): frozen, in place of a copy of the policy
        self.reference = (frozen_copy(self._pair(model).policy, rebuild=rebuild) if given is None else
                          load_causal_lm(self.cfg.model, self.trainer.tokenizer, trainable=False,
                                         model=given).to(self.trainer.device))
        self.reference_master: Optional[nn.ParameterList] = None
        if self.cfg.ppo.ref_ema > 0 and any(q.dtype != torch.float32 for q in self.reference.parameters()):
            # A half-precision reference cannot hold increments of eta = 1e-3 (see ops.soft_update_), so the EMA
            # runs on a float32 master; the reference that scores stays at the policy's precision (a copy of the
            # master), or the KL would measure rounding: not 0 at the start, while reference == policy.
            self.reference_master = nn.ParameterList(
                [nn.Parameter(q.detach().float().clone(), requires_grad=False) for q in self.reference.parameters()])

    def _update_reference(self, pair: PolicyAndCritic, eta: float, gather: bool = True) -> None:
        """theta_ref <- eta * theta_policy + (1 - eta) * theta_ref on the float32 master when there is one, then the
        scoring reference <- the master at its own precision. gather=False when the policy is already whole.
        Shared base: the same on the reference adapter's tensors (ppo_shared.AdapterReference)."""
        if self.cfg.ppo.shared_base:
            self.reference.update(eta)
            return
        target = self.reference_master if self.reference_master is not None else self.reference
        (ema_update_ if gather else soft_update_)(target, pair.policy, eta)
        if self.reference_master is not None:
            soft_update_(self.reference, self.reference_master, 1.0)

    def warmup_steps(self) -> int:
        """Optimizer steps of the critic warm-up (ppo.critic_warmup_iters), which leave the policy untouched."""
        return self.cfg.ppo.critic_warmup_iters * self.steps_per_iteration

    def _hold_policy_during_warmup(self) -> None:
        """Critic warm-up must leave the policy's AdamW state and learning-rate schedule as a run without it would
        find them. The policy's loss is zeroed during warm-up (PPO.loss), but a zero gradient still advances AdamW's
        step count (its bias correction then shrinks or inflates the first real updates: 0.49x the intended size
        after 8 zero steps, 2x after 512) and applies weight decay, and the schedule would spend its warm-up and
        decay on steps that do not train the policy. So the policy's gradients are dropped (None: AdamW skips the
        parameter) before each warm-up step, and the policy's group (param_groups: group 0) follows the Trainer's
        schedule rebuilt over its own steps, starting when the warm-up ends."""
        trainer, warmup = self.trainer, self.warmup_steps()
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps the torch one
        if not isinstance(optimizer, torch.optim.Optimizer) or trainer.accelerator.distributed_type == "DEEPSPEED":
            trainer.print("ppo.critic_warmup_iters under DeepSpeed: the policy's loss is zeroed, but AdamW still "
                          "counts the warm-up steps for it (and its schedule runs through them)")
            return
        policy_params = optimizer.param_groups[0]["params"]

        def drop_policy_grads(opt, args, kwargs):
            if trainer.step < warmup:  # trainer.step counts the steps already taken
                for q in policy_params:
                    q.grad = None
        optimizer.register_step_pre_hook(drop_policy_grads)
        if not isinstance(trainer.scheduler, torch.optim.lr_scheduler.LambdaLR):  # transformers' schedules all are
            raise RuntimeError(f"ppo.critic_warmup_iters: cannot delay the policy's schedule on a "
                               f"{type(trainer.scheduler).__name__}; expected a LambdaLR")
        total = self.total_steps()
        scratch = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        own = trainer._scheduler(scratch, total - warmup).lr_lambdas[0]  # the configured schedule, policy steps
        trainer.scheduler.lr_lambdas[0] = ScheduleAfter(own, warmup)

    def _pair(self, model=None) -> PolicyAndCritic:
        return self.trainer.accelerator.unwrap_model(model if model is not None else self.trainer.model)

    def total_steps(self) -> int:
        return self.cfg.ppo.iterations * self.steps_per_iteration

    def can_checkpoint(self, step: int) -> bool:
        return step % self.steps_per_iteration == 0

    # --- the iteration --------------------------------------------------------------------------
    def _prompt_order(self, epoch: int) -> list[int]:
        if epoch not in self._order_cache:
            n = len(self.prompts)
            g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
            self._order_cache = {epoch: torch.randperm(n, generator=g).tolist() if self.cfg.data.shuffle
                                 else list(range(n))}
        return self._order_cache[epoch]

    def _iteration_prompts(self, iteration: int) -> tuple[list[PromptRow], list[int]]:
        """(this rank's share of the iteration's prompts, each repeated samples_per_prompt times; each rollout's
        sampling seed): a pure function of (seed, iteration), so a resumed run draws the same prompts, and of the
        rollouts' global positions, not of the rank, so any world size samples the same responses."""
        p, world, n = self.cfg.ppo, self.trainer.world_size, len(self.prompts)
        per_rank = p.rollout_batch_size // world
        start = iteration * p.rollout_batch_size + self.trainer.rank * per_rank
        rows = [self.prompts[self._prompt_order(pos // n)[pos % n]] for pos in range(start, start + per_rank)]
        spp = p.samples_per_prompt
        seeds = [rollout_seed(self.cfg.seed, pos * spp + j)
                 for pos in range(start, start + per_rank) for j in range(spp)]
        return [r for r in rows for _ in range(spp)], seeds

    @torch.no_grad()
    def _score_pass(self, pair: PolicyAndCritic, ids: Tensor, amask: Tensor, P: int):
        """(old log-probs, reference log-probs, values V(s_t) [B, R], V(s_T) after each row's last token [B])."""
        s, n, parts = self.sampling, self.cfg.ppo.rollout_micro_batch_size, []
        for i in range(0, len(ids), n):
            x, m = ids[i:i + n], amask[i:i + n]
            logp = pair.policy_logprobs(x, m, P)
            ref_logp = pair.reference_logprobs(self.reference, x, m, P)
            parts.append((logp, ref_logp, pair.values(x, m)[:, P - 1:]))  # V at positions P-1 .. P+R-1
        logp, ref_logp, values = (torch.cat(t) for t in zip(*parts))
        lengths = amask[:, P:].sum(1).long()
        return logp, ref_logp, values[:, :-1], values.gather(1, lengths.unsqueeze(1)).squeeze(1)

    @torch.no_grad()
    def _experience(self, iteration: int) -> tuple[PPOBatch, dict]:
        p, trainer, acc = self.cfg.ppo, self.trainer, self.trainer.accelerator
        rows, seeds = self._iteration_prompts(iteration)
        t0 = time.time()
        # generation and scoring on whole weights: under ZeRO-3 gathered once here, not per forward or token
        with trainer.full_model() as pair:
            if p.ref_reset_every and iteration and iteration % p.ref_reset_every == 0:
                self._update_reference(pair, 1.0, gather=False)  # the policy is whole in this block
            with acc.autocast():  # the same precision as the training forward, or the first ratio is not 1
                with pair.actor() as policy:
                    rollout = generate(policy, trainer.tokenizer, prompt_ids=[r.ids for r in rows],
                                       sampling=self.sampling, batch_size=p.rollout_micro_batch_size, seeds=seeds,
                                       engine=p.engine)
                t1 = time.time()
                dev, P = trainer.device, rollout.prompt_ids.shape[1]
                ids, amask = rollout.input_ids.to(dev), rollout.attention_mask.to(dev)
                mask, eos = rollout.response_mask.to(dev).float(), rollout.eos.to(dev)
                logp, ref_logp, values, next_values = self._score_pass(pair, ids, amask, P)
        columns = {k: [r.columns.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r.columns)}
        raw, per_source = self.reward(ids, amask, [r.text for r in rows], rollout.texts, columns,
                                      chats=[r.chat for r in rows], finished=eos.tolist())
        raw = raw.to(dev)
        t2 = time.time()

        scores, scored = final_scores(raw, eos, p.missing_eos_penalty, p.on_truncated, p.truncated_score)
        if p.reward_norm:
            self.score_stats.update(scores, scored, distributed=True)
            scores = self.score_stats.normalize(scores)
        kl_coef = self.kl_ctl.value
        rewards, kl = token_rewards(logp, ref_logp, mask, scores, scored, kl_coef, p.kl_estimator, p.reward_clip)
        if p.value_norm:  # the critic predicts normalized returns; GAE runs in return space
            values_r, next_r = self.value_stats.denormalize(values), self.value_stats.denormalize(next_values)
        else:
            values_r, next_r = values, next_values
        advantages, returns = gae(rewards, values_r, mask, p.gamma, p.lam,
                                  next_values=torch.where(scored, torch.zeros_like(next_r), next_r))
        returns_r = returns
        if p.adv_norm:  # once, over every token of the whole rollout batch on all ranks, before the minibatch split
            advantages = masked_whiten(advantages, mask, distributed=True)
        if p.value_norm:
            self.value_stats.update(returns, mask, distributed=True)
            returns = self.value_stats.normalize(returns).clamp(-p.value_norm_clip, p.value_norm_clip)

        batch = PPOBatch(ids, amask, mask, logp, values, advantages, returns, P,
                         train_policy=iteration >= p.critic_warmup_iters)
        # global means: sums over this rank's sequences, summed over ranks
        seq_kl, seq_reward = masked_sum(kl, mask, dim=1), masked_sum(rewards, mask, dim=1)
        self._log_samples(iteration, rows, rollout.texts, raw, seq_kl, mask.sum(1))
        names = ["objective/scores", "objective/kl", "objective/rlhf_reward", "response/length_mean",
                 "response/eos_rate"] + [f"reward/{k}" for k in per_source]
        sums = torch.stack([raw.sum(), seq_kl.sum(), seq_reward.sum(), mask.sum(), eos.float().sum()]
                           + [v.to(dev).sum() for v in per_source.values()]).double()
        count = torch.tensor(float(len(ids)), device=dev, dtype=torch.float64)
        # explained variance over every token of all ranks: moments of returns R and residuals R - V
        residual = returns_r - values_r
        moments = torch.stack([mask.sum(), masked_sum(returns_r, mask), masked_sum(returns_r ** 2, mask),
                               masked_sum(residual, mask), masked_sum(residual ** 2, mask)]).double()
        totals = all_reduce_sum_(torch.cat([sums, count[None], moments]))
        metrics = {k: (totals[i] / totals[len(names)]).item() for i, k in enumerate(names)}
        metrics["critic/explained_variance"] = global_explained_variance(*totals[len(names) + 1:].tolist())
        metrics["objective/kl_coef"] = kl_coef
        metrics["time/generate_s"], metrics["time/score_s"] = t1 - t0, t2 - t1
        if rollout.logprobs is not None:  # an engine that reports its sampling log-probs: how far scoring is from it
            gap = torch.stack([masked_sum((rollout.logprobs.to(dev) - logp).abs(), mask), mask.sum()]).double()
            gap = all_reduce_sum_(gap)
            metrics["rollout/sampler_logprob_gap"] = (gap[0] / gap[1].clamp(min=1)).item()
        self.kl_ctl.update(metrics["objective/kl"], p.rollout_batch_size * p.samples_per_prompt)
        return batch, metrics

    def _log_samples(self, iteration: int, rows: list[PromptRow], texts: list[str], scores: Tensor, seq_kl: Tensor,
                     lengths: Tensor) -> None:
        """The first logging.log_samples rollouts of this rank (rank 0 only) into samples.jsonl and, with wandb, a
        table. "step" is the step whose metrics.jsonl record holds this iteration's objective/* means, so resume
        drops the samples of undone iterations the way it drops their metrics."""
        n, trainer = self.cfg.logging.log_samples, self.trainer
        if n <= 0 or not trainer.is_main:
            return
        step = iteration * self.steps_per_iteration + 1
        records = [{"step": step, "iteration": iteration, "prompt": rows[i].text, "response": texts[i],
                    "score": float(scores[i]), "kl": float(seq_kl[i]), "length": int(lengths[i])}
                   for i in range(min(n, len(rows)))]
        write_samples(os.path.join(trainer.run_dir, SAMPLES_FILE), records)
        if "wandb" in self.cfg.logging.trackers:
            log_samples_table(trainer.accelerator.get_tracker("wandb"), records, step)

    def steps(self, start_step: int):
        p = self.cfg.ppo
        if start_step % self.steps_per_iteration:
            raise RuntimeError(f"PPO resumes only at an iteration boundary (every {self.steps_per_iteration} steps); "
                               f"got step {start_step}")
        micro, accum = p.micro_batch_size, self.trainer.grad_accum
        total = p.rollout_batch_size * p.samples_per_prompt
        for iteration in itertools.count(start_step // self.steps_per_iteration):
            with self.trainer.phase("rollout"):
                batch, metrics = self._experience(iteration)
            self._train_start = time.time()
            n = len(batch.input_ids)
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + iteration)  # the same on every rank
            for _ in range(p.ppo_epochs):
                rows = minibatch_rows(total, p.num_minibatches, self.trainer.rank * n, n, g)
                for idx in rows.to(batch.input_ids.device):
                    yield StepBatch([batch.select(idx[j * micro:(j + 1) * micro]) for j in range(accum)], metrics)
                    metrics = {}

    # --- the step -------------------------------------------------------------------------------
    def loss_weight(self, mb: PPOBatch) -> float:
        return float(mb.response_mask.sum())

    def loss(self, model, mb: PPOBatch):
        p = self.cfg.ppo
        logp, values = model(mb.input_ids, mb.attention_mask, mb.prompt_width)
        pg, pg_stats = ppo_policy_loss(logp, mb.old_logprobs, mb.advantages, mb.response_mask, p.clip_eps,
                                       ratio_bound=p.ratio_bound or None, reduction="sum")
        vf, vf_stats = ppo_value_loss(values, mb.old_values, mb.returns, mb.response_mask,
                                      clip_eps=p.value_clip_eps or None, reduction="sum")
        if not mb.train_policy:
            pg = pg * 0.0  # critic warm-up; the policy stays in the graph so every rank runs the same backward
        tokens = mb.response_mask.sum().clamp(min=1)
        # log-probs keep the sampled token in the top-k/top-p support (ops.logprobs_from_logits), so they are finite
        stats = {"ppo/policy_loss": pg.detach() / tokens, "ppo/value_loss": vf.detach() / tokens,
                 "ppo/clipfrac": pg_stats["clipfrac"],
                 "ppo/approx_kl": masked_mean(KL_ESTIMATORS["k3"](mb.old_logprobs, logp.detach()), mb.response_mask),
                 "ppo/ratio_mean": pg_stats["ratio_mean"], "ppo/early_stop": pg_stats["early_stop"],
                 "ppo/vf_clipfrac": vf_stats["vf_clipfrac"],
                 "critic/value_mean": masked_mean(values.detach(), mb.response_mask)}
        return pg + p.vf_coef * vf, stats

    def after_step(self, model, step: int) -> dict:
        p = self.cfg.ppo
        if p.ref_ema > 0:  # paper: theta_ref <- eta * theta_actor + (1 - eta) * theta_ref after every actor step
            with self.trainer.phase("reference update"):  # gathers the policy's shards under ZeRO-3
                self._update_reference(self._pair(model), p.ref_ema)
        out = dict(self.skipped) if step == 1 else {}
        if step % self.steps_per_iteration == 0:
            out["time/train_s"] = time.time() - self._train_start
        return out

    # --- export and resume ----------------------------------------------------------------------
    def save_model(self, model: PolicyAndCritic, out_dir: str) -> None:
        """The policy into out_dir and the critic into out_dir/critic, each loadable with from_pretrained (shared
        base: adapters in peft's format, see ppo_shared.save_shared_base)."""
        tok = self.trainer.tokenizer
        if self.cfg.ppo.shared_base:
            from .ppo_shared import save_shared_base

            save_shared_base(model, out_dir, tok, self.cfg.ppo.export_merged)
            return
        model.policy.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        keep_score_bias_(model.critic)  # the critic's trained bias, not the reward model's, on reload
        model.critic.save_pretrained(os.path.join(out_dir, "critic"))
        tok.save_pretrained(os.path.join(out_dir, "critic"))

    def state_dict(self) -> dict:
        p = self.cfg.ppo
        state = {"value_stats": self.value_stats.state_dict(), "score_stats": self.score_stats.state_dict(),
                 "kl_ctl": self.kl_ctl.state_dict()}
        if p.shared_base:  # the reference adapter's tensors (and float32 master) alone: megabytes, not the base
            state["reference_adapter"] = self.reference.state_dict()
        elif p.ref_ema > 0 or p.ref_reset_every > 0:  # otherwise the reference is the initial policy, rebuilt at start
            state["reference"] = {k: v.detach().cpu().clone() for k, v in self.reference.state_dict().items()}
            if self.reference_master is not None:
                state["reference_master"] = [q.detach().cpu().clone() for q in self.reference_master]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.value_stats.load_state_dict(state["value_stats"])
        self.score_stats.load_state_dict(state["score_stats"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        if self.cfg.ppo.shared_base:
            self.reference.load_state_dict(state.get("reference_adapter", {}))
            return
        if "reference" in state:
            self.reference.load_state_dict(state["reference"])
        if self.reference_master is not None:
            saved = state.get("reference_master") or [q.float() for q in self.reference.parameters()]
            with torch.no_grad():
                for q, v in zip(self.reference_master, saved, strict=True):
                    q.copy_(v)
