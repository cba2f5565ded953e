"""Typed run configuration: one dataclass per concern, loaded from YAML, overridden from the CLI.

    cfg = load_config("configs/sft_tiny.yaml", ["--optim.lr", "1e-4"])

Every field carries a one-line help (``field(metadata={"help": ...})``) that `rlhf train --help`
prints. Loading is strict: an unknown key fails and suggests the nearest valid one, a wrong
type fails naming the expected type, and the batch hierarchy is checked with the numbers.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union

import yaml

from .errors import ConfigError  # noqa: F401  (re-exported: `from rlhf.config import ConfigError`)


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (lists/dicts get a default_factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# ----------------------------------------------------------------------------------------------
# Sections shared by every algorithm
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name_or_path: str = opt("", "Hub name or local folder of the policy, loaded with from_pretrained.")
    tokenizer: Optional[str] = opt(None, "Tokenizer name or folder; defaults to name_or_path.")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "Weight dtype at load time.")
    trust_remote_code: bool = opt(False, "Allow custom modelling code from the model folder.")
    gradient_checkpointing: bool = opt(False, "Trade compute for activation memory.")
    disable_dropout: bool = opt(True, "Set every dropout probability to 0 (RLHF log-probs must be deterministic).")
    lora_r: int = opt(0, "LoRA rank; 0 trains all weights.")
    lora_alpha: int = opt(16, "LoRA scaling numerator.")
    lora_dropout: float = opt(0.0, "Dropout inside the LoRA adapters.")
    lora_target_modules: Union[Literal["all-linear"], list[str]] = opt(
        "all-linear", "Module names that get LoRA adapters, or all-linear: every linear layer but the output head "
        "(peft's meaning; fits any architecture).")
    attn_implementation: Optional[Literal["eager", "sdpa", "flex_attention", "flash_attention_2"]] = opt(
        None, "Attention kernel, passed to from_pretrained (None = transformers' choice for the model).")
    revision: Optional[str] = opt(None, "Hub branch, tag or commit of model.name_or_path (model and its tokenizer).")
    logprob_chunk_size: int = opt(1024, "Tokens per LM-head chunk when log-probs are computed from hidden states (0 = full logits).")
    pair_packing: Literal["auto", "varlen", "flex", "padded"] = opt(
        "auto", "Layout of DPO and reward-model pairs (prompt once per pair): varlen = all pairs of a micro-batch in "
        "one unpadded row, attended through torch's variable-length flash attention (each pair's rejected tokens "
        "over the prompt's keys and their own; no mask, no compile); flex = the same row attended through "
        "FlexAttention's block mask (compiled on first use); padded = one row per pair with a dense 4D mask; auto = on "
        "CUDA when attention is sdpa: varlen for bf16/fp16 weights on Ampere or newer, else flex for micro-batches "
        "that one row per pair would pad beyond 1.2x their tokens and padded otherwise; padded on the CPU. Under "
        "varlen SFT lays its rows end to end too (one attention document per row, no padding).")
    liger_kernels: Union[Literal["auto"], bool] = opt(
        "auto", "Liger's RMSNorm and SwiGLU kernels on this model only (llama, qwen2, ...): auto = on CUDA when liger-kernel is installed.")
    compile_layers: Union[Literal["auto"], bool] = opt(
        False, "torch.compile each decoder layer of the trained model (one compile shared by every layer: fewer, "
        "fused kernels and less host time per step; the first steps of each new shape or mode compile). auto = on "
        "CUDA; never under ZeRO-3 or FSDP, whose parameter hooks break the compiled graphs. Liger's kernels (auto) "
        "stay off under it: inductor fuses the same norms and activations.")
    compile_mode: Literal["default", "reduce-overhead"] = opt(
        "default", "torch.compile mode of model.compile_layers: reduce-overhead also captures each compiled layer in "
        "CUDA graphs (one per shape and mode; a replay costs no host time per kernel; each new length records a graph "
        "and keeps its memory pool). SFT, reward-model and DPO training.")
    fused_layers: Union[Literal["auto"], bool] = opt(
        "auto", "Fused LoRA linear layers and SwiGLU MLP tails (rlhf.models.fused_layers) that save less activation "
        "memory for backward, with the same values: auto = on, true = on and an error when nothing can be fused.")
    # A peft config object given as Trainer(peft_config=...): applied instead of the lora_* values (which then record
    # its r, alpha, dropout and target modules). Not a config value: never saved, never read from YAML.
    peft_config: ClassVar[Any] = None


@dataclass
class DataConfig:
    train: str = opt("", "Training data: a .jsonl/.json/.parquet file, a folder (of them, or written by "
                         "save_to_disk), or a hub dataset name.")
    eval: Optional[str] = opt(None, "Held-out data, same forms as train.")
    format: str = opt("auto", "Row format: auto, prompt_response, messages, text, preference, implicit_prompt, "
                              "hh-rlhf, pku-saferlhf, ultrafeedback, prompt.")
    train_split: str = opt("train", "Split name when loading a hub dataset or folder.")
    eval_split: str = opt("test", "Split name of the held-out data.")
    max_length: int = opt(512, "Maximum tokens of prompt + response.")
    max_prompt_length: int = opt(256, "Maximum tokens of the prompt.")
    limit: int = opt(0, "Use only the first N training rows (0 = all).")
    on_bad_row: Literal["error", "skip"] = opt("error", "What to do with a malformed row: stop naming it, or skip it and count it.")
    shuffle: bool = opt(True, "Shuffle every epoch (seeded).")
    num_proc: int = opt(1, "Processes that convert and tokenize rows (datasets.map num_proc).")
    cache_dir: str = opt("", "Folder of the tokenized-data cache (Arrow files keyed by data, tokenizer and options; "
                             "reused by the next run with the same ones); empty: <HF_DATASETS_CACHE>/rlhf-tokenized.")


@dataclass
class OptimConfig:
    lr: float = opt(1e-5, "Peak learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    adam_betas: list[float] = opt([0.9, 0.999], "AdamW betas.")
    adam_eps: float = opt(1e-8, "AdamW epsilon.")
    scheduler: Literal["constant", "linear", "cosine"] = opt("cosine", "Learning-rate schedule after warm-up.")
    warmup_ratio: float = opt(0.0, "Fraction of steps spent warming up linearly.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm (0 = off).")
    batch_size: int = opt(8, "Global batch: sequences (or pairs) per optimizer step, summed over ranks.")
    micro_batch_size: int = opt(8, "Sequences per forward pass on one rank.")
    epochs: int = opt(1, "Passes over the training data (when max_steps is 0).")
    max_steps: int = opt(0, "Optimizer steps to run; 0 derives it from epochs.")
    max_skipped_steps: int = opt(3, "Stop the run after this many optimizer steps in a row skipped for a non-finite "
                                    "loss, gradient norm or reward-model score.")

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank: batch_size = world x micro x accum."""
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise ConfigError(
                f"optim.batch_size={self.batch_size} is not divisible by world_size={world_size} x "
                f"optim.micro_batch_size={self.micro_batch_size} = {per_step}"
            )
        return self.batch_size // per_step


@dataclass
class LoggingConfig:
    output_dir: str = opt("runs", "Parent folder of run folders.")
    run_name: str = opt("", "Run folder name; default '<algorithm>-<timestamp>-<random suffix>'.")
    log_every: int = opt(1, "Log metrics every N optimizer steps.")
    log_samples: int = opt(8, "PPO (and the pipeline's DPO-Iter rounds): sampled responses per iteration written to samples.jsonl (prompt, response, score, per-sequence KL summed over tokens, length) and, for PPO with wandb among the trackers, logged as a wandb.Table; 0 = off. Several ranks: rank 0's first N rollouts.")
    eval_every: int = opt(0, "Evaluate every N optimizer steps (0 = only at the end, if there is eval data).")
    eval_testbed: str = opt("", "Also run the evaluation harness on this testbed's held-out prompts at each evaluation (assistant, code).")
    eval_limit: int = opt(64, "Held-out prompts the harness evaluates during training (0 = all).")
    eval_max_new_tokens: int = opt(48, "Response length cap of the harness during training.")
    save_every: int = opt(0, "Checkpoint every N optimizer steps (0 = only at the end).")
    keep_checkpoints: int = opt(2, "How many recent checkpoints to keep (0 = keep all).")
    trackers: list[Literal["wandb", "tensorboard"]] = opt([], "Extra trackers on top of metrics.jsonl.")
    project: str = opt("", "wandb project; empty: $WANDB_PROJECT, else 'rlhf' (the entity is $WANDB_ENTITY's).")
    group: str = opt("", "wandb group: runs of one comparison share it; empty: $WANDB_RUN_GROUP.")
    tags: list[str] = opt([], "wandb tags; empty: $WANDB_TAGS (comma-separated).")
    progress: bool = opt(True, "Show a progress bar.")


# ----------------------------------------------------------------------------------------------
# Algorithm sections
# ----------------------------------------------------------------------------------------------


@dataclass
class SFTSection:
    loss_on: Literal["assistant", "last_turn", "all"] = opt("assistant", "Trained tokens: every assistant turn of a conversation (as TRL's assistant-only loss), only the final reply, or every token (prompt included).")


@dataclass
class RewardSection:
    margin: bool = opt(False, "Use the row's 'margin' column (ultrafeedback: score_chosen - score_rejected) in the Bradley-Terry loss.")
    normalize: bool = opt(True, "After training, fold a shift/scale into the score head so scores have mean 0, std 1 on the normalize_on set (also saved to reward_normalization.json).")
    normalize_on: Literal["train", "eval"] = opt("train", "Reference set of the normalization: the chosen and rejected responses of data.train or of data.eval.")
    center_coef: float = opt(0.0, "Penalty on the squared mean score, keeping scores centred during training.")
    pku_preference: Literal["better", "safer"] = opt("better", "PKU-SafeRLHF rows: the chosen response is better_response_id (helpfulness) or safer_response_id.")
    pku_both_unsafe: Literal["drop", "keep"] = opt("drop", "PKU-SafeRLHF rows with pku_preference 'safer' whose two responses are both unsafe (is_response_0_safe, is_response_1_safe false): drop them (counted and logged) or keep them as ordinary pairs.")

    def __post_init__(self) -> None:
        if self.center_coef < 0:
            raise ConfigError(f"reward.center_coef={self.center_coef}: expected >= 0")


@dataclass
class DPOSection:
    beta: float = opt(0.1, "Strength of the KL constraint to the reference.")
    loss_type: str = opt("sigmoid", "sigmoid, robust, hinge or ipo (ipo compares length-averaged log-probs).")
    label_smoothing: float = opt(0.0, "Probability that a label is flipped (cDPO with sigmoid, robust DPO with robust).")
    reference_free: bool = opt(False, "Drop the reference model (implicit uniform reference).")
    reference: Literal["copy", "adapter", "precomputed"] = opt(
        "precomputed", "Reference: a frozen copy, the LoRA base with adapters off, or log-probs precomputed once and cached."
    )
    precompute_batch_size: int = opt(0, "Pairs per forward of the reference precompute (no gradients are kept, so it fits more than a training micro-batch; fewer, larger forwards); 0 = 4 x optim.micro_batch_size.")
    ref_update_every: int = opt(0, "Soft-update the reference every N steps (0 = never; 1 with ref_update_alpha gives an EMA); needs reference 'copy'.")
    ref_update_alpha: float = opt(0.6, "ref <- alpha * policy + (1 - alpha) * ref at each reference update.")
    pku_preference: Literal["better", "safer"] = opt("better", "PKU-SafeRLHF rows: the chosen response is better_response_id (helpfulness) or safer_response_id.")
    pku_both_unsafe: Literal["drop", "keep"] = opt("drop", "PKU-SafeRLHF rows with pku_preference 'safer' whose two responses are both unsafe (is_response_0_safe, is_response_1_safe false): drop them (counted and logged) or keep them as ordinary pairs.")

    def __post_init__(self) -> None:
        from .losses import DPO_LOSSES

        if self.loss_type not in DPO_LOSSES:
            raise ConfigError(f"dpo.loss_type={self.loss_type!r}: expected one of {', '.join(DPO_LOSSES)}")
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta={self.beta}: expected > 0")
        robust = self.loss_type == "robust"  # its 1 / (1 - 2 eps) is infinite at 0.5
        if not (0 <= self.label_smoothing and (self.label_smoothing < 0.5 if robust else self.label_smoothing <= 0.5)):
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing}: expected in [0, 0.5{')' if robust else ']'} "
                              f"for loss_type {self.loss_type!r}")
        if self.ref_update_every < 0:
            raise ConfigError(f"dpo.ref_update_every={self.ref_update_every}: expected >= 0")
        if self.ref_update_every and (self.reference != "copy" or self.reference_free):
            raise ConfigError(f"dpo.ref_update_every={self.ref_update_every} soft-updates a reference copy: it needs "
                              f"dpo.reference='copy' and dpo.reference_free=false (got reference={self.reference!r}, "
                              f"reference_free={self.reference_free})")
        if not 0 < self.ref_update_alpha <= 1:
            raise ConfigError(f"dpo.ref_update_alpha={self.ref_update_alpha}: expected in (0, 1]")


@dataclass
class PPOSection:
    # reward sources
    reward_model: str = opt("", "Folder of a trained reward model (scalar score at the last token); with a tokenizer of its own it reads the texts.")
    reward_fns: list[str] = opt([], "Programmatic rewards as 'module:callable' import paths: fn(prompts, completions, **columns) -> list[float].")
    reward_weights: list[float] = opt([], "Weights of [reward_model, *reward_fns] in the summed score (default all 1).")
    # batching: rollout_batch_size x samples_per_prompt = num_minibatches x minibatch; minibatch = world x micro x accum
    iterations: int = opt(100, "PPO iterations (rollout + update phases).")
    rollout_batch_size: int = opt(512, "Prompts per iteration, over all ranks (paper: 512; the small-batch baseline 64).")
    samples_per_prompt: int = opt(1, "Responses sampled per prompt.")
    num_minibatches: int = opt(4, "Optimizer steps per PPO epoch; the rollout batch is split into this many.")
    ppo_epochs: int = opt(1, "Passes over the rollout batch.")
    micro_batch_size: int = opt(8, "Sequences per forward on one rank when training.")
    rollout_micro_batch_size: int = opt(32, "Sequences per forward on one rank when generating and scoring.")
    # objective
    clip_eps: float = opt(0.2, "Policy ratio clip.")
    value_clip_eps: float = opt(0.2, "Value clip around the rollout values (0 = off).")
    vf_coef: float = opt(0.1, "Weight of the value loss.")
    gamma: float = opt(1.0, "Discount.")
    lam: float = opt(1.0, "GAE lambda.")
    kl_coef: float = opt(0.1, "Per-token KL penalty coefficient beta.")
    kl_estimator: Literal["k1", "k2", "k3"] = opt("k1", "Per-token KL estimator in the reward.")
    adaptive_kl: bool = opt(False, "Adapt kl_coef toward kl_target.")
    kl_target: float = opt(6.0, "Target KL of the adaptive controller.")
    kl_horizon: int = opt(10000, "Horizon of the adaptive controller.")
    reward_clip: float = opt(20.0, "Clip the score to +-reward_clip (0 = off).")
    reward_norm: bool = opt(False, "Normalize scores by a running mean/std.")
    value_norm: bool = opt(True, "Learn values in a running-normalized return space.")
    value_norm_decay: float = opt(0.99995, "Decay of the running return statistics.")
    value_norm_clip: float = opt(5.0, "Clip normalized returns to +-value_norm_clip (paper: 5).")
    adv_norm: bool = opt(True, "Normalize advantages over the whole rollout batch (all ranks).")
    on_truncated: Literal["bootstrap", "score"] = opt(
        "bootstrap", "Responses cut at max_new_tokens without EOS: 'bootstrap' = no score, GAE bootstraps from "
        "V(s_T) (paper); 'score' = scored like finished ones. missing_eos_penalty or truncated_score, when set, "
        "overrides both.")
    missing_eos_penalty: Optional[float] = opt(None, "Subtracted from the score of responses that hit max_new_tokens without EOS, as in TRL: a positive number penalizes them (None = see on_truncated).")
    truncated_score: Optional[float] = opt(None, "Score given instead of the reward to responses that hit max_new_tokens without EOS (None = see on_truncated); not together with missing_eos_penalty.")
    ratio_bound: float = opt(5.0, "Zero the policy loss of a micro-batch whose mean ratio exceeds this (0 = off).")
    # reference
    ref_ema: float = opt(0.0, "Reference EMA eta after every optimizer step (0 = frozen reference; paper: 0.001).")
    ref_reset_every: int = opt(0, "Reset the reference to the policy every N iterations (0 = never).")
    # one base model for every role (LoRA)
    shared_base: bool = opt(False, "One frozen base model with LoRA adapters for the actor, the critic (+ a value head) "
                                   "and the EMA reference (ref_ema > 0; else adapters off); needs model.lora_r > 0.")
    export_merged: bool = opt(False, "With shared_base: also write final/merged/, the base with the actor adapter "
                                     "merged in (a plain from_pretrained folder).")
    reward_adapter: bool = opt(False, "With shared_base: ppo.reward_model (a LoRA reward model of the same base) scores "
                                      "as adapter 'reward' + its score head on the shared base, not as a second model.")
    # critic
    critic_init: Literal["reward_model", "policy"] = opt("reward_model", "Initialize the critic from the reward model or the policy.")
    critic_lr: float = opt(5e-6, "Critic learning rate (actor: optim.lr).")
    critic_warmup_iters: int = opt(0, "Iterations that train only the critic; the policy, its AdamW state and its "
                                      "learning-rate schedule (which starts after them) are untouched.")
    # sampling
    max_new_tokens: int = opt(256, "Maximum response tokens.")
    temperature: float = opt(1.0, "Sampling temperature; also applied to every training log-prob.")
    top_k: int = opt(200, "Top-k filter (0 = off); also applied to every training log-prob.")
    top_p: float = opt(0.9, "Top-p filter (1 = off); also applied to every training log-prob.")
    engine: Literal["auto", "hf", "static"] = opt(
        "auto", "Rollout engine: 'static' (static KV cache, decode steps replayed from a CUDA graph, sampling on the "
        "device), 'hf' (transformers' generate), or 'auto' = static on CUDA for the models it runs (Llama, Qwen2, "
        "Qwen3, Mistral), hf otherwise and on CPU.")


# ----------------------------------------------------------------------------------------------
# Run configs
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    algorithm: str = opt("", "sft, reward, dpo or ppo.")
    seed: int = opt(0, "Seed of everything (per-rank seeds derive from it).")
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = opt(
        None, "Autocast precision of forward passes; unset: the accelerate config's (accelerate launch exports it as "
        "ACCELERATE_MIXED_PRECISION), else 'no'. Resolved once at start-up; a different one in both is an error.")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Policy model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Data."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimizer and batch."})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"help": "Run folder and trackers."})

    def validate(self) -> None:
        """Static checks; the world-size dependent ones run in `validate_world`."""
        check_ranges(self)
        if not self.model.name_or_path:
            raise ConfigError("model.name_or_path: missing; expected a hub name or a local model folder")
        check_local_path("model.name_or_path", self.model.name_or_path, "a model folder (build one with `rlhf init-model`)")
        if self.model.tokenizer:
            check_local_path("model.tokenizer", self.model.tokenizer, "a tokenizer or model folder")
        if not self.data.train:
            raise ConfigError("data.train: missing; expected a .jsonl/.json/.parquet file, a folder, or a hub dataset name")
        for key in ("train", "eval"):
            if getattr(self.data, key):
                check_local_path(f"data.{key}", getattr(self.data, key), "a .jsonl/.json/.parquet file or a folder",
                                 folder=False)
        if self.data.format not in DATA_FORMATS:
            raise ConfigError(f"data.format={self.data.format!r}: expected one of {', '.join(DATA_FORMATS)}")
        if len(self.optim.adam_betas) != 2:
            raise ConfigError(f"optim.adam_betas={self.optim.adam_betas}: expected a list of 2 floats in [0, 1)")
        if self.model.lora_r > 0 and not self.model.lora_target_modules:
            raise ConfigError(f"model.lora_target_modules=[]: expected at least one module name when model.lora_r="
                              f"{self.model.lora_r} > 0")
        if self.data.max_prompt_length >= self.data.max_length:
            raise ConfigError(f"data.max_prompt_length={self.data.max_prompt_length} must be < data.max_length={self.data.max_length}")
        log = self.logging
        if log.eval_testbed:
            from .eval.runner import TESTBED_CHOICES  # the harness would otherwise refuse it at the first evaluation

            if log.eval_testbed not in TESTBED_CHOICES:
                raise ConfigError(f"logging.eval_testbed={log.eval_testbed!r}: expected one of "
                                  f"{', '.join(TESTBED_CHOICES)}, or '' (no harness during training)")
        check_output_dir(os.path.join(log.output_dir, log.run_name) if log.run_name else log.output_dir,
                         "logging.output_dir/run_name" if log.run_name else "logging.output_dir")

    def validate_world(self, world_size: int) -> None:
        self.optim.grad_accum(world_size)


@dataclass
class SFTConfig(TrainConfig):
    algorithm: str = opt("sft", "Which algorithm this config runs.")
    sft: SFTSection = field(default_factory=SFTSection, metadata={"help": "SFT options."})


@dataclass
class RewardConfig(TrainConfig):
    algorithm: str = opt("reward", "Which algorithm this config runs.")
    reward: RewardSection = field(default_factory=RewardSection, metadata={"help": "Reward-model options."})


@dataclass
class DPOConfig(TrainConfig):
    algorithm: str = opt("dpo", "Which algorithm this config runs.")
    dpo: DPOSection = field(default_factory=DPOSection, metadata={"help": "DPO options."})


@dataclass
class PPOConfig(TrainConfig):
    algorithm: str = opt("ppo", "Which algorithm this config runs.")
    ppo: PPOSection = field(default_factory=PPOSection, metadata={"help": "PPO options."})

    def validate(self) -> None:
        super().validate()
        if self.model.compile_mode != "default":
            raise ConfigError(f"model.compile_mode={self.model.compile_mode}: not for PPO, whose compiled layers serve "
                              f"the actor, the critic, the scoring passes and the rollout engine in turn (CUDA graphs "
                              f"of them are untested); set model.compile_mode: default")
        p = self.ppo  # single-field ranges are checked by super().validate() (RANGES)
        # PPO's length and batches are its own (iterations of rollouts, split into minibatches): these optim keys
        # would be silently ignored, so they are refused with where to look instead
        unused = {"max_steps": "ppo.iterations (rollout + update phases)",
                  "epochs": "ppo.iterations, and ppo.ppo_epochs for passes over each rollout batch",
                  "batch_size": "ppo.rollout_batch_size, ppo.samples_per_prompt and ppo.num_minibatches",
                  "micro_batch_size": "ppo.micro_batch_size and ppo.rollout_micro_batch_size"}
        defaults = OptimConfig()
        for key, instead in unused.items():
            if getattr(self.optim, key) != getattr(defaults, key):
                raise ConfigError(f"optim.{key}={getattr(self.optim, key)}: PPO does not use it; set {instead}")
        if p.reward_model:
            check_local_path("ppo.reward_model", p.reward_model, "a reward-model folder")
        if p.missing_eos_penalty is not None and p.missing_eos_penalty < 0:
            raise ConfigError(f"ppo.missing_eos_penalty={p.missing_eos_penalty}: expected >= 0 (it is subtracted "
                              f"from the score; to give truncated responses a fixed score set ppo.truncated_score)")
        if p.missing_eos_penalty is not None and p.truncated_score is not None:
            raise ConfigError(f"ppo.missing_eos_penalty={p.missing_eos_penalty} and ppo.truncated_score="
                              f"{p.truncated_score}: set one (subtract a penalty, or replace the score), not both")
        sources = ([p.reward_model] if p.reward_model else []) + list(p.reward_fns)
        if not sources:
            raise ConfigError("ppo: no reward source; set ppo.reward_model (a reward-model folder) and/or "
                              "ppo.reward_fns ('module:callable' paths)")
        if p.reward_weights and len(p.reward_weights) != len(sources):
            raise ConfigError(f"ppo.reward_weights has {len(p.reward_weights)} weights for {len(sources)} reward "
                              f"sources {sources}; expected one per source (reward_model first)")
        if p.critic_init == "reward_model" and not p.reward_model:
            raise ConfigError("ppo.critic_init=reward_model needs ppo.reward_model; set ppo.critic_init: policy")
        if p.shared_base and self.model.lora_r <= 0:
            raise ConfigError(f"ppo.shared_base=true needs LoRA adapters on the base: model.lora_r={self.model.lora_r}; "
                              f"set model.lora_r > 0 (e.g. 16), or ppo.shared_base: false")
        if p.export_merged and not p.shared_base:
            raise ConfigError("ppo.export_merged=true applies to ppo.shared_base=true (final/ of a separate-model "
                              "run is already a whole model); set ppo.shared_base: true or drop ppo.export_merged")
        if p.reward_adapter and not (p.shared_base and p.reward_model and os.path.isfile(
                os.path.join(os.path.expanduser(p.reward_model), "adapter_config.json"))):
            raise ConfigError(f"ppo.reward_adapter=true needs ppo.shared_base=true (got {str(p.shared_base).lower()}) "
                              f"and ppo.reward_model a LoRA reward-model folder of the same base (a peft folder with "
                              f"adapter_config.json; got '{p.reward_model}')")
        if p.shared_base and p.critic_init == "reward_model" and p.reward_model and os.path.isdir(
                os.path.expanduser(p.reward_model)) and not os.path.isfile(
                os.path.join(os.path.expanduser(p.reward_model), "adapter_config.json")):
            raise ConfigError(f"ppo.shared_base=true with ppo.critic_init=reward_model: ppo.reward_model="
                              f"'{p.reward_model}' is a whole model, not a LoRA adapter of model.name_or_path; the "
                              f"critic adapter can start only from a LoRA reward model (a peft folder with "
                              f"adapter_config.json and the score head). Set ppo.critic_init: policy")
        if self.data.max_prompt_length + p.max_new_tokens > self.data.max_length:
            raise ConfigError(f"data.max_prompt_length={self.data.max_prompt_length} + ppo.max_new_tokens="
                              f"{p.max_new_tokens} exceeds data.max_length={self.data.max_length}")

    def validate_world(self, world_size: int) -> None:
        """rollout_batch_size x samples_per_prompt = rollouts = num_minibatches x minibatch;
        minibatch = world_size x micro_batch_size x grad_accum; every rank holds whole prompts."""
        p = self.ppo
        rollouts = p.rollout_batch_size * p.samples_per_prompt
        per_step = world_size * p.micro_batch_size
        numbers = (f"ppo.rollout_batch_size={p.rollout_batch_size} x ppo.samples_per_prompt={p.samples_per_prompt} "
                   f"= {rollouts} rollouts per iteration = ppo.num_minibatches={p.num_minibatches} x minibatch, "
                   f"minibatch = world_size={world_size} x ppo.micro_batch_size={p.micro_batch_size} x grad_accum")
        if rollouts % p.num_minibatches:
            raise ConfigError(f"batch hierarchy: {rollouts} rollouts do not split into {p.num_minibatches} "
                              f"minibatches ({numbers})")
        minibatch = rollouts // p.num_minibatches
        if minibatch % per_step:
            raise ConfigError(f"batch hierarchy: a minibatch of {minibatch} rollouts is not a multiple of "
                              f"world_size x micro_batch_size = {per_step} ({numbers})")
        if p.rollout_batch_size % world_size:
            raise ConfigError(f"batch hierarchy: {p.rollout_batch_size} prompts do not split evenly over "
                              f"world_size={world_size} ranks ({numbers})")

    def grad_accum(self, world_size: int) -> int:
        p = self.ppo
        return p.rollout_batch_size * p.samples_per_prompt // p.num_minibatches // (world_size * p.micro_batch_size)


CONFIGS: dict[str, type[TrainConfig]] = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig, "ppo": PPOConfig}


# ----------------------------------------------------------------------------------------------
# Ranges, paths and the output folder, checked at start-up
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """The interval a numeric field must lie in; NaN never does."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return bool(above and below)

    def __str__(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else str(x)
        if self.low == -math.inf and self.high == math.inf:
            return "a finite number"
        if self.high == math.inf:
            return f"{'>' if self.open_low else '>='} {num(self.low)}"
        return f"in {'(' if self.open_low else '['}{num(self.low)}, {num(self.high)}{')' if self.open_high else ']'}"


ANY, NONNEG, POS = Bound(), Bound(0), Bound(0, open_low=True)
UNIT, UNIT_OPEN = Bound(0, 1), Bound(0, 1, open_high=True)

# Every int and float field of every section, with the values that make sense for it. A list field's bound applies to
# each element; None (an unset optional) is always allowed. tests/test_bad_input.py checks that no numeric field is
# missing here, so a new field gets its range when it is added.
RANGES: dict[str, Bound] = {
    "seed": Bound(0, 2**31 - 1),  # numpy's seed must stay below 2**32 after adding the rank
    "model.lora_r": NONNEG, "model.lora_alpha": POS, "model.lora_dropout": UNIT_OPEN, "model.logprob_chunk_size": NONNEG,
    "data.max_length": POS, "data.max_prompt_length": POS, "data.limit": NONNEG, "data.num_proc": POS,
    "optim.lr": POS, "optim.weight_decay": NONNEG, "optim.adam_betas": UNIT_OPEN, "optim.adam_eps": POS,
    "optim.warmup_ratio": UNIT_OPEN, "optim.max_grad_norm": NONNEG, "optim.batch_size": POS,
    "optim.micro_batch_size": POS, "optim.epochs": POS, "optim.max_steps": NONNEG,
    "optim.max_skipped_steps": POS,
    "logging.log_every": POS, "logging.log_samples": NONNEG,
    "logging.eval_every": NONNEG, "logging.eval_limit": NONNEG,
    "logging.eval_max_new_tokens": POS, "logging.save_every": NONNEG, "logging.keep_checkpoints": NONNEG,
    "reward.center_coef": NONNEG,
    "dpo.beta": POS, "dpo.label_smoothing": Bound(0, 0.5), "dpo.ref_update_every": NONNEG,
    "dpo.precompute_batch_size": NONNEG, "dpo.ref_update_alpha": Bound(0, 1, open_low=True),
    "ppo.reward_weights": ANY, "ppo.iterations": POS, "ppo.rollout_batch_size": POS, "ppo.samples_per_prompt": POS,
    "ppo.num_minibatches": POS, "ppo.ppo_epochs": POS, "ppo.micro_batch_size": POS,
    "ppo.rollout_micro_batch_size": POS, "ppo.clip_eps": POS, "ppo.value_clip_eps": NONNEG, "ppo.vf_coef": NONNEG,
    "ppo.gamma": UNIT, "ppo.lam": UNIT, "ppo.kl_coef": NONNEG, "ppo.kl_target": POS, "ppo.kl_horizon": POS,
    "ppo.reward_clip": NONNEG, "ppo.value_norm_decay": UNIT_OPEN, "ppo.value_norm_clip": POS,
    "ppo.missing_eos_penalty": NONNEG, "ppo.truncated_score": ANY, "ppo.ratio_bound": NONNEG, "ppo.ref_ema": UNIT,
    "ppo.ref_reset_every": NONNEG,
    "ppo.critic_lr": POS, "ppo.critic_warmup_iters": NONNEG, "ppo.max_new_tokens": POS, "ppo.temperature": POS,
    "ppo.top_k": NONNEG, "ppo.top_p": Bound(0, 1, open_low=True),
}

DATA_FORMATS = ("auto", "prompt_response", "messages", "text", "preference", "implicit_prompt", "hh-rlhf",
                "pku-saferlhf", "ultrafeedback", "prompt")


def check_ranges(cfg: Any) -> None:
    """Raise a ConfigError naming the first field of `cfg` outside its RANGES bound (sections it lacks are skipped)."""
    for key, bound in RANGES.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part, None)
        values = value if isinstance(value, list) else [value]
        for i, v in enumerate(values):
            if v is not None and v not in bound:
                where = f"{key}[{i}]" if isinstance(value, list) else key
                raise ConfigError(f"{where}={v}: expected {bound}")


def looks_local(path: str) -> bool:
    """Hub ids are 'name' or 'org/name'. A path starting with '.', '/' or '~', with more than one '/', or whose parent
    folder exists here ('runs/nope' next to a 'runs/' folder) is meant as a local path: when it is missing, say so
    at once instead of asking the hub for it."""
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        return True
    parent = os.path.dirname(path)
    return bool(parent) and os.path.isdir(os.path.expanduser(parent))


OBJECT_MARK = "<object: "


def object_placeholder(obj: Any) -> str:
    """What a config field holds when the Trainer was given a Python object in its place (rlhf.api):
    '<object: Qwen2ForCausalLM>' for a model, '<object: my_reward>' for a function (its __name__)."""
    return f"{OBJECT_MARK}{object_name(obj)}>"


def object_name(obj: Any) -> str:
    """A function's __name__ (a functools.partial's: its function's), else the object's class name."""
    fn = getattr(obj, "func", obj)  # functools.partial
    if isinstance(fn, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        return fn.__name__
    return type(obj).__name__


def is_object_placeholder(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(OBJECT_MARK) and value.endswith(">")


def check_local_path(key: str, path: str, expected: str, folder: bool = True) -> None:
    """A value that looks like a local path (see `looks_local`) must exist (and be a folder, when `folder`)."""
    if not looks_local(path):
        return
    full = os.path.expanduser(path)
    if not os.path.exists(full):
        raise ConfigError(f"{key}: '{path}' does not exist; expected {expected}")
    if folder and not os.path.isdir(full):
        raise ConfigError(f"{key}: '{path}' is a file; expected {expected}")


def check_output_dir(path: str, key: str = "logging.output_dir") -> None:
    """The run folder `path` must be creatable and writable: the nearest part of it that exists is a writable
    folder (makedirs creates the rest). Checked at start-up so a bad folder fails in one line, before any loading."""
    if not path:
        raise ConfigError(f"{key}='': expected a folder path")
    existing = os.path.abspath(os.path.expanduser(path))
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    where = "" if existing == os.path.abspath(os.path.expanduser(path)) else f" ('{existing}')"
    if not os.path.isdir(existing):
        raise ConfigError(f"{key}: '{path}'{where} is a file, not a folder; expected a folder to write run folders in")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: '{path}'{where} is not writable; expected a folder to write run folders in")


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key given twice in one mapping (plain YAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable) or key == "<<":  # the base class reports or merges these
                continue
            line = key_node.start_mark.line + 1
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (lines {first[key]} and {line}); expected each key once",
                    key_node.start_mark)
            first[key] = line
        return super().construct_mapping(node, deep)


# ----------------------------------------------------------------------------------------------
# Loading, overrides and type checking
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}={value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}={value!r}: expected {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r}: expected {_type_name(tp)}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r}: expected {_type_name(tp)}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r}: expected bool (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r}: expected int")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int too large for a float
                pass
        elif isinstance(value, str):  # YAML reads "1e-5" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):  # .nan/.inf would poison the run silently
            return number
        raise ConfigError(f"{where}={value!r}: expected {'a finite float' if number is not None else 'float'}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}={value!r}: expected str")
    return value


@dataclass(frozen=True)
class Alias:
    """Where a TRL/transformers TrainingArguments name lives here: `key`, or `ppo` in a PPO config (whose length and
    batches are counted in iterations and rollouts), with a note when the meaning differs."""

    key: str
    note: str = ""
    ppo: str = ""


# TRL/transformers names a user brings along, and ours. One table: unknown-key errors read it, and a test checks that
# every target is a key of some config.
TRL_NAMES: dict[str, Alias] = {
    "learning_rate": Alias("optim.lr"),
    "per_device_train_batch_size": Alias("optim.micro_batch_size", ppo="ppo.micro_batch_size"),
    "gradient_accumulation_steps": Alias(
        "optim.batch_size", "accumulation is derived: optim.batch_size = world_size x optim.micro_batch_size x "
        "accumulation", ppo="ppo.num_minibatches"),
    "num_train_epochs": Alias("optim.epochs", ppo="ppo.iterations"),
    "max_steps": Alias("optim.max_steps", ppo="ppo.iterations"),
    "total_episodes": Alias("ppo.iterations", "episodes = iterations x rollout_batch_size x samples_per_prompt"),
    "warmup_ratio": Alias("optim.warmup_ratio"),
    "warmup_steps": Alias("optim.warmup_ratio", "a fraction of the steps"),
    "lr_scheduler_type": Alias("optim.scheduler"),
    "weight_decay": Alias("optim.weight_decay"),
    "max_grad_norm": Alias("optim.max_grad_norm"),
    "adam_beta1": Alias("optim.adam_betas", "a list [beta1, beta2]"),
    "adam_beta2": Alias("optim.adam_betas", "a list [beta1, beta2]"),
    "adam_epsilon": Alias("optim.adam_eps"),
    "output_dir": Alias("logging.output_dir", "the parent of run folders; the run folder is output_dir/run_name"),
    "run_name": Alias("logging.run_name"),
    "logging_steps": Alias("logging.log_every"),
    "save_steps": Alias("logging.save_every"),
    "eval_steps": Alias("logging.eval_every"),
    "save_total_limit": Alias("logging.keep_checkpoints"),
    "report_to": Alias("logging.trackers"),
    "seed": Alias("seed", "at the top level"),
    "bf16": Alias("mixed_precision", "bf16: true is mixed_precision: bf16"),
    "fp16": Alias("mixed_precision", "fp16: true is mixed_precision: fp16"),
    "gradient_checkpointing": Alias("model.gradient_checkpointing"),
    "model_name_or_path": Alias("model.name_or_path"),
    "sft_model_path": Alias("model.name_or_path"),
    "torch_dtype": Alias("model.dtype"),
    "dtype": Alias("model.dtype"),
    "trust_remote_code": Alias("model.trust_remote_code"),
    "attn_implementation": Alias("model.attn_implementation"),
    "model_revision": Alias("model.revision"),
    "use_peft": Alias("model.lora_r", "LoRA is on when model.lora_r > 0"),
    "lora_r": Alias("model.lora_r"),
    "lora_alpha": Alias("model.lora_alpha"),
    "lora_dropout": Alias("model.lora_dropout"),
    "lora_target_modules": Alias("model.lora_target_modules"),
    "dataset_name": Alias("data.train"),
    "dataset_train_split": Alias("data.train_split"),
    "dataset_test_split": Alias("data.eval_split"),
    "max_length": Alias("data.max_length"),
    "max_seq_length": Alias("data.max_length"),
    "max_prompt_length": Alias("data.max_prompt_length"),
    "max_completion_length": Alias("data.max_length", "prompt + completion; the completion gets data.max_length - "
                                   "data.max_prompt_length", ppo="ppo.max_new_tokens"),
    "assistant_only_loss": Alias("sft.loss_on", "assistant_only_loss: true is sft.loss_on: assistant"),
    "completion_only_loss": Alias("sft.loss_on", "completion_only_loss: true is sft.loss_on: last_turn, false is all"),
    "center_rewards_coefficient": Alias("reward.center_coef"),
    "beta": Alias("dpo.beta", ppo="ppo.kl_coef"),
    "loss_type": Alias("dpo.loss_type"),
    "label_smoothing": Alias("dpo.label_smoothing"),
    "reference_free": Alias("dpo.reference_free"),
    "precompute_ref_log_probs": Alias("dpo.reference", "precompute_ref_log_probs: true is dpo.reference: precomputed"),
    "precompute_ref_batch_size": Alias("dpo.precompute_batch_size"),
    "sync_ref_model": Alias("dpo.ref_update_every", "0 = never"),
    "ref_model_sync_steps": Alias("dpo.ref_update_every"),
    "ref_model_mixup_alpha": Alias("dpo.ref_update_alpha"),
    "reward_model_path": Alias("ppo.reward_model"),
    "kl_coef": Alias("ppo.kl_coef"),
    "kl_estimator": Alias("ppo.kl_estimator"),
    "cliprange": Alias("ppo.clip_eps"),
    "cliprange_value": Alias("ppo.value_clip_eps"),
    "vf_coef": Alias("ppo.vf_coef"),
    "gamma": Alias("ppo.gamma"),
    "lam": Alias("ppo.lam"),
    "num_ppo_epochs": Alias("ppo.ppo_epochs"),
    "num_mini_batches": Alias("ppo.num_minibatches"),
    "local_rollout_forward_batch_size": Alias("ppo.rollout_micro_batch_size"),
    "response_length": Alias("ppo.max_new_tokens"),
    "missing_eos_penalty": Alias("ppo.missing_eos_penalty"),
    "temperature": Alias("ppo.temperature"),
}


def _trl_hint(values: dict, cls: type, algorithm: str, prefix: str = "") -> None:
    """Raise the TRL-name hint for the first unknown key of `values` (at any depth) that TRL_NAMES knows; other
    unknown keys are left to `_build`, which suggests the nearest valid name."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key in hints:
            if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
                _trl_hint(value, hints[key], algorithm, where)
            continue
        alias = TRL_NAMES.get(str(key))
        if alias is not None:
            ours = alias.ppo if algorithm == "ppo" and alias.ppo else alias.key
            note = f" ({alias.note})" if alias.note and ours == alias.key else ""
            raise ConfigError(f"unknown key '{where}' (a TRL/transformers name); here it is '{ours}'{note}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{(prefix + '.' if prefix else '') + close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown key '{where}'{hint}")
        kwargs[key] = _coerce(value, hints[key], where)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict:
    """['--optim.lr', '1e-5', '--logging.trackers=[wandb]'] -> nested dict, values parsed as YAML."""
    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override '{arg}': expected --section.key VALUE")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if arg[2:] in TRL_NAMES and (i + 1 >= len(args) or args[i + 1].startswith("--")):
                # a TRL boolean flag (--bf16, --gradient_checkpointing): read as true, so the config's
                # unknown-key check names our key for it instead of a parse error
                _set_dotted(tree, arg[2:], True)
                i += 1
                continue
            if i + 1 >= len(args):
                raise ConfigError(f"override '{arg}': missing value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        try:
            value = yaml.load(raw, Loader=StrictLoader)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"override --{key} {raw!r}: invalid YAML value: {problem}") from None
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(values: dict, source: str = "<dict>", validate: bool = True) -> TrainConfig:
    """Build the algorithm's config from nested values; `validate=False` checks only keys and types (as for
    `rlhf train CONFIG --help`, which must work before the config's model and data exist)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(values).__name__}")
    algo = values.get("algorithm")
    if not isinstance(algo, str) or algo not in CONFIGS:
        raise ConfigError(f"{source}: algorithm={algo!r}: expected one of {', '.join(CONFIGS)}")
    try:
        _trl_hint(values, CONFIGS[algo], algo)
        cfg = _build(CONFIGS[algo], values)
        if validate:
            cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_config(path: str, overrides: Optional[list[str]] = None, validate: bool = True) -> TrainConfig:
    """Read a YAML file, apply `--a.b value` overrides and validate (see `config_from_dict`)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); expected a UTF-8 YAML file") from None
    try:
        values = yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        position = getattr(e, "position", None)  # a reader error (a control character) has a character index
        line = f":{mark.line + 1}" if mark else f":{text[:position].count(chr(10)) + 1}" if position is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    values = _merge(values, parse_overrides(overrides or []))
    return config_from_dict(values, source=path, validate=validate)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str, header: str = "") -> None:
    """The config as YAML; `header`: comment lines written above it (e.g. the Python objects a run was given)."""
    with open(path, "w") as f:
        f.write(header)
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def help_lines(cls: type, prefix: str = "", current: Any = None, names: Optional[list[str]] = None) -> list[str]:
    """`--section.key (type, default): help` lines for the CLI; with `current` (a config of `cls`) each line also
    gives the value there when it differs from the default. `names`: only these fields of `cls`."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        value = getattr(current, f.name) if current is not None else None
        if dataclasses.is_dataclass(tp):
            lines += help_lines(tp, name + ".", value)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        changed = current is not None and value != default
        shown = f"value {value!r}; default {default!r}" if changed else f"default {default!r}"
        lines.append(f"  --{name} ({_type_name(tp)}, {shown}): {f.metadata.get('help', '')}")
    return lines


def own_sections(cls: type) -> list[str]:
    """The fields an algorithm's config adds to TrainConfig's shared ones (its own section, e.g. ['ppo'])."""
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    return [f.name for f in dataclasses.fields(cls) if f.name not in shared]
