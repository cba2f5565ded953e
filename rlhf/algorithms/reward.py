"""Reward modelling: a scalar head read at each sequence's last real token, trained with the Bradley-Terry loss.

    rlhf train configs/rm_tiny.yaml

The model is AutoModelForSequenceClassification with one label (a causal-LM checkpoint gets a fresh head).
Chosen and rejected rows of a micro-batch share one forward. After training, scores are calibrated to mean 0,
std 1 on a reference set (the chosen and rejected responses of data.train, or of data.eval): the scale is folded
into the score head's weight; the head of transformers' sequence-classification models (Llama, Qwen2, ...) has no
bias, so the shift is saved as `config.score_bias`, which `rlhf.load_reward_model` (and `apply_score_bias_`) restore
as a bias on load and plain transformers ignores.
The statistics go to <final>/reward_normalization.json and a loading note to <final>/README.md. PPO then reads
calibrated scores.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
from torch import nn

from ..config import ConfigError, RewardSection
from ..data import BadRows
from ..data.preference import PairBatch, PairExample, PairOptions, collate_pairs
from ..losses import bradley_terry_loss
from ..models import is_peft, load_scalar_model
from ..models.adapters import HEAD_KEY, save_adapter
from ..models.forward import _unwrap, pair_scores
from ..models.loading import NORMALIZATION_FILE
from ..ops import all_reduce_sum_
from .base import Algorithm
from .supervised import (load_pair_examples, make_batcher, report_dropped, report_skipped, sharded_eval, step_stream,
                         total_steps)

EVAL_KEYS = ("loss", "reward/accuracy", "reward/margin")


def fold_normalization(head: nn.Linear, mean: float, std: float) -> nn.Linear:
    """A new head computing (head(h) - mean) / std: weight / std, bias (bias - mean) / std."""
    folded = nn.Linear(head.in_features, head.out_features, bias=True, device=head.weight.device,
                       dtype=head.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(head.weight / std)
        old_bias = head.bias if head.bias is not None else torch.zeros_like(folded.bias)
        folded.bias.copy_((old_bias - mean) / std)
    return folded


def pair_objective(r: RewardSection, chosen: torch.Tensor, rejected: torch.Tensor,
                   margin: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(Bradley-Terry loss summed over the B pairs, batch-mean stats) from [B] chosen and rejected scores.

    With reward.margin the row margins m enter as -log sigmoid(r_c - r_r - m); reward.center_coef adds
    coef * (r_c + r_r)^2 per pair (TRL's center_rewards_coefficient), keeping scores near 0 during training.
    """
    loss, stats = bradley_terry_loss(chosen, rejected, margin.to(chosen.device) if r.margin else None)
    total = loss * chosen.numel()
    if r.center_coef:
        total = total + r.center_coef * ((chosen + rejected) ** 2).sum()
    return total, {"reward/accuracy": stats["accuracy"], "reward/margin": stats["margin"]}


class RewardModeling(Algorithm):
    progress_keys = ("train/loss", "reward/accuracy")

    def __init__(self, cfg, trainer):
        super().__init__(cfg, trainer)
        d, r, tok = cfg.data, cfg.reward, trainer.tokenizer
        if r.normalize and r.normalize_on == "eval" and not d.eval:
            raise ConfigError("reward.normalize_on='eval' needs data.eval")
        opts = PairOptions.from_config(d, r.pku_preference, need_margin=r.margin, pku_both_unsafe=r.pku_both_unsafe)
        self.bad, bad_eval = BadRows(d.on_bad_row), BadRows(d.on_bad_row)
        dropped, dropped_eval = {}, {}
        self.train_pairs = load_pair_examples(trainer, "train", opts, self.bad, dropped)
        self.eval_pairs = load_pair_examples(trainer, "eval", opts, bad_eval, dropped_eval) if d.eval else []
        self.skipped = report_skipped(trainer, self.bad, "train")
        self.skipped.update(report_dropped(trainer, dropped, "train"))
        if d.eval:
            self.skipped.update(report_skipped(trainer, bad_eval, "eval"))
            self.skipped.update(report_dropped(trainer, dropped_eval, "eval"))
        self.collate = collate_pairs(tok.pad_token_id)
        self.batcher = make_batcher(trainer, self.train_pairs, self.collate)
        self._export_scores: Optional[torch.Tensor] = None  # [2N] all ranks' normalization scores (prepare_export)

    def build_model(self):
        return load_scalar_model(self.cfg.model.name_or_path, self.cfg.model, self.trainer.tokenizer,
                                 trainable=True, field="model.name_or_path", model=self.trainer.objects.model)

    def total_steps(self) -> int:
        return total_steps(self.cfg, self.batcher)

    def steps(self, start_step):
        return step_stream(self.batcher, start_step)

    # --- the objective -------------------------------------------------------------------------
    def scores(self, model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """([B] chosen scores, [B] rejected scores), read at each response's last token, from one forward
        (one row per pair, the prompt once, where the attention kernel allows)."""
        return pair_scores(model, batch.input_ids, batch.attention_mask, batch.response_mask).float().chunk(2)

    def loss_weight(self, batch: PairBatch) -> float:
        return float(batch.num_pairs)

    def loss(self, model, batch: PairBatch):
        return pair_objective(self.cfg.reward, *self.scores(model, batch), batch.margin)

    def after_step(self, model, step):
        return dict(self.skipped) if step == 1 else {}

    def evaluates(self) -> bool:
        return bool(self.eval_pairs)

    def evaluate(self, model) -> dict:
        if not self.eval_pairs:
            return {}

        def sums(model, batch):
            loss, stats = pair_objective(self.cfg.reward, *self.scores(model, batch), batch.margin)
            n = batch.num_pairs
            return [loss.float(), stats["reward/accuracy"] * n, stats["reward/margin"] * n], n
        return sharded_eval(self.trainer, model, self.eval_pairs, self.cfg.optim.micro_batch_size, self.collate,
                            EVAL_KEYS, sums)

    # --- calibration and export ------------------------------------------------------------------
    @torch.no_grad()
    def score_responses(self, model, pairs: list[PairExample]) -> torch.Tensor:
        """[2N] scores of every chosen and rejected response of `pairs` (this process only)."""
        was_training = model.training
        model.eval()
        out, mb = [], self.cfg.optim.micro_batch_size
        for i in range(0, len(pairs), mb):
            with self.trainer.accelerator.autocast():
                out += [s.cpu() for s in self.scores(model, self.collate(pairs[i:i + mb]))]
        model.train(was_training)
        return torch.cat(out).double() if out else torch.zeros(0, dtype=torch.float64)

    def _normalization_pairs(self) -> list[PairExample]:
        r = self.cfg.reward
        pairs = self.train_pairs if r.normalize_on == "train" else self.eval_pairs
        if not pairs:
            raise ConfigError(f"reward.normalize_on={r.normalize_on!r}: no pairs left to normalize on")
        return pairs

    def prepare_export(self, model) -> None:
        """Every rank scores a strided share of the normalization set; all ranks get all the scores."""
        self._export_scores = None
        if not self.cfg.reward.normalize:
            return
        t = self.trainer
        pairs = self._normalization_pairs()
        scores = self.score_responses(model, pairs[t.rank::t.world_size])
        if t.world_size > 1:  # the ranks' scores one after another, in rank order: zeros outside this rank's slot
            sizes = [2 * len(pairs[r::t.world_size]) for r in range(t.world_size)]
            table = torch.zeros(sum(sizes), dtype=torch.float64, device=t.device)
            start = sum(sizes[:t.rank])
            table[start:start + sizes[t.rank]] = scores.to(t.device, torch.float64)
            scores = all_reduce_sum_(table).cpu()
        self._export_scores = scores

    def save_model(self, model, out_dir: str) -> None:
        """Save with the normalization folded in; runs on the main process only (after prepare_export on all).

        A whole model is written as transformers writes it, its score shift in config.score_bias. A LoRA reward
        model is written as a peft sequence-classification adapter (adapter_config.json, adapter_model.safetensors
        with the LoRA factors and the trained score head), as LoRA SFT and DPO runs are: megabytes, not the base.
        rlhf's loaders (load_reward_model, ppo.reward_model, the evaluation) put it over its base, and with
        ppo.shared_base it can start the critic (critic_init: reward_model) or score as an adapter of the policy's
        base (ppo.reward_adapter). Its shift lives in NORMALIZATION_FILE ("score_bias"); `rlhf export` writes it
        merged with the shift in config.score_bias."""
        r = self.cfg.reward
        lora = is_peft(model)
        target = _unwrap(model) if lora else model
        head = target.score.modules_to_save[model.active_adapter] if lora else target.score
        if not r.normalize:
            if lora:
                self._save_adapter(model, out_dir, None)
            else:
                super().save_model(target, out_dir)
            return
        scores = self._export_scores
        if scores is None:  # called outside Trainer.save_final: one process scores everything
            scores = self.score_responses(model, self._normalization_pairs())
        mean, std = scores.mean().item(), scores.std(unbiased=False).clamp(min=1e-6).item()
        bad = int((~torch.isfinite(scores)).sum())
        if bad or not (math.isfinite(mean) and math.isfinite(std)):  # folding NaN would make every score NaN
            from ..checkpoints import NonFiniteError

            raise NonFiniteError(f"reward normalization: {bad} of {scores.numel()} {r.normalize_on} response scores "
                                 f"are not finite (mean {mean:.4g}, std {std:.4g}); refusing to fold them into the "
                                 f"score head")
        folded = fold_normalization(head, mean, std)
        shift = float(folded.bias.item())
        if lora:
            self._save_adapter(model, out_dir, folded.weight.to(head.weight.dtype))
        else:
            # The scale folds into score.weight. The shift cannot fold into the weights: no score head of a
            # transformers sequence-classification model has a bias (checked for 5.24: all are Linear(bias=False)),
            # and from_pretrained drops a saved score.bias. It lives in config.score_bias, which rlhf's loaders
            # (load_reward_model, load_scalar_model) restore as the head's bias and which final/README.md tells
            # plain transformers users to add.
            saved_head = nn.Linear(head.in_features, head.out_features, bias=False, device=head.weight.device,
                                   dtype=head.weight.dtype)
            saved_head.weight = folded.weight
            previous = getattr(target.config, "score_bias", None)
            target.score, target.config.score_bias = saved_head, shift
            try:
                super().save_model(target, out_dir)
            finally:  # the live model keeps training-time scores
                target.score, target.config.score_bias = head, previous
                if previous is None:
                    del target.config.score_bias
        stats = {"mean": mean, "std": std, "count": scores.numel(), "set": r.normalize_on,
                 "data": self.cfg.data.train if r.normalize_on == "train" else self.cfg.data.eval,
                 "score_bias": shift,
                 "note": "raw score s -> (s - mean) / std: the scale is folded into score.weight, the shift is "
                         "config.score_bias (rlhf.load_reward_model adds it; plain transformers does not)"}
        with open(os.path.join(out_dir, NORMALIZATION_FILE), "w") as f:
            json.dump(stats, f, indent=2)
        with open(os.path.join(out_dir, "README.md"), "w") as f:
            f.write(loading_note(shift, adapter_base=getattr(model.peft_config[model.active_adapter],
                                                             "base_model_name_or_path", None) if lora else None))
        self.trainer.print(f"reward normalization: mean {mean:.4g}, std {std:.4g} on {scores.numel()} "
                           f"{r.normalize_on} responses: scale folded into the score head, shift in "
                           f"config.score_bias={shift:.4g} (load with rlhf.load_reward_model)")


    def _save_adapter(self, model, out_dir: str, head_weight: Optional[torch.Tensor]) -> None:
        save_adapter(model, model.active_adapter, out_dir, extra=None if head_weight is None else {HEAD_KEY: head_weight})
        self.trainer.tokenizer.save_pretrained(out_dir)


def loading_note(score_bias: float, adapter_base: Optional[str] = None) -> str:
    """final/README.md of a calibrated reward model: how to get its calibrated scores, with rlhf or without.
    adapter_base: the base of a LoRA reward model (the folder is then a peft adapter)."""
    head = ("# Reward model (rlhf)\n\n"
            "Scores are calibrated to mean 0, std 1 on the responses of the calibration set (reward_normalization.json), "
            "read at each sequence's last non-pad token. The score head has no bias, so only the scale is folded into "
            "the score head's weight; ")
    use = ("```python\nfrom rlhf import load_reward_model\n"
           "model = load_reward_model(path)  # model(**batch).logits[:, 0] is the calibrated score\n```\n\n")
    if adapter_base is not None:
        return (head + f"the shift ({score_bias:.6g}) is `score_bias` in reward_normalization.json. This folder is a "
                f"LoRA adapter (peft, with the score head in modules_to_save) over `{adapter_base}`. Load with\n\n"
                + use + "or merge it into a plain transformers folder (with the shift in `config.score_bias`): "
                "`rlhf export PATH MERGED`; or, with transformers and peft alone, add the shift:\n\n"
                f"```python\nbase = AutoModelForSequenceClassification.from_pretrained({adapter_base!r}, num_labels=1)\n"
                "model = PeftModel.from_pretrained(base, path)\n"
                f"score = model(**batch).logits[:, 0] + {score_bias!r}\n```\n")
    return (head + f"the shift ({score_bias:.6g}) is `config.score_bias`, which transformers does not read: a plain "
            "`AutoModelForSequenceClassification.from_pretrained` gives every score minus it. Load with\n\n" + use +
            "or, with transformers alone, add the shift:\n\n"
            "```python\nmodel = AutoModelForSequenceClassification.from_pretrained(path)\n"
            "score = model(**batch).logits[:, 0] + model.config.score_bias\n```\n")
