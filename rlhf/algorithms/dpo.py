"""Direct Preference Optimization and its variants (cDPO, robust, hinge, IPO) against one of three references.

    rlhf train configs/dpo_tiny.yaml

Each micro-batch runs chosen and rejected rows through ONE policy forward ([2B, T], see PairBatch); the summed
response log-probs (length-averaged for IPO) become per-pair losses through rlhf.losses.dpo_loss. The reference
log-probs (dpo.reference) come from
  copy         a frozen copy of the initial policy; soft-updated ref <- a * policy + (1 - a) * ref every
               dpo.ref_update_every steps when that is > 0 (1 = an EMA; TR-DPO syncs every 512 steps with a = .6)
  adapter      the LoRA policy itself with its adapters disabled: no second copy in memory
  precomputed  one pass of the initial policy over the train + eval pairs before training, cached in
               <run>/ref_logps.pt and reused on resume
A ref_model object given to the Trainer (rlhf.api) takes the place of the initial policy in 'copy' and
'precomputed'. Or the reference log-probs are dropped (dpo.reference_free). Metrics carry TRL's names:
rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected}, and eval/ versions of them and of the loss on
data.eval.
"""

from __future__ import annotations

import hashlib
import os

import torch

from ..config import ConfigError, DPOSection
from ..data import BadRows
from ..data.preference import PairBatch, PairOptions, collate_pairs, number_pairs
from ..losses import dpo_loss
from ..models import adapters_disabled, ema_update_, frozen_copy, load_causal_lm, whole_loading
from ..models.forward import pair_sequence_logprobs
from ..models.loading import mark_step
from ..ops import all_reduce_sum_
from .base import Algorithm
from .supervised import (load_pair_examples, make_batcher, report_dropped, report_skipped, sharded_eval, step_stream,
                         total_steps)

REF_CACHE = "ref_logps.pt"
EVAL_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected")


# ----------------------------------------------------------------------------------------------
# References: each maps a batch to the reference's summed response log-probs [2B]
# ----------------------------------------------------------------------------------------------


class CopyReference:
    """A frozen copy of the initial policy (the only reference that soft updates can move); whole on every rank,
    also under ZeRO-3 (rebuilt from the checkpoint and filled from the gathered policy)."""

    def __init__(self, algo: "DPO", model):
        def rebuild():
            with whole_loading(algo.trainer.accelerator):
                return algo.build_model()
        given = algo.given_reference()
        self.model = given if given is not None else frozen_copy(algo.unwrap(model), rebuild=rebuild)

    @torch.no_grad()
    def logps(self, algo: "DPO", policy, batch: PairBatch) -> torch.Tensor:
        return algo.forward(self.model, batch)[0]


class AdapterReference:
    """The LoRA policy's base model: the policy's own forward with its adapters switched off."""

    def __init__(self, algo: "DPO", model):
        pass  # DPO.__init__ has checked model.lora_r > 0

    @torch.no_grad()
    def logps(self, algo: "DPO", policy, batch: PairBatch) -> torch.Tensor:
        base = algo.unwrap(policy)
        with adapters_disabled(base):
            return algo.forward(base, batch)[0]


class PrecomputedReference:
    """Log-probs of the initial policy, computed in one pass before training (or read back on resume)."""

    def __init__(self, algo: "DPO", model):
        given = algo.given_reference()
        self.table = algo.reference_table(model if given is None else given)  # [N, 2]: (chosen, rejected) per pair

    def logps(self, algo: "DPO", policy, batch: PairBatch) -> torch.Tensor:
        rows = self.table[batch.index]
        return torch.cat([rows[:, 0], rows[:, 1]]).to(algo.trainer.device)


REFERENCES = {"copy": CopyReference, "adapter": AdapterReference, "precomputed": PrecomputedReference}


def pair_tokens(e) -> int:
    return len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids)


def pair_objective(d: DPOSection, logps: torch.Tensor, lengths: torch.Tensor,
                   ref_logps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-pair losses [B], per-pair stats [B]) from [2B] summed response log-probs and lengths, chosen rows first.

    IPO compares length-averaged log-probs (sum / length); every other loss the sums. Rewards beta * (pi - ref)
    are reported from the summed log-probs for every loss type, as TRL does.
    """
    averaged = d.loss_type == "ipo"
    n = lengths.clamp(min=1) if averaged else 1
    losses, chosen, rejected = dpo_loss(*(logps / n).chunk(2), *(ref_logps / n).chunk(2), beta=d.beta,
                                        loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                                        reference_free=d.reference_free)
    if averaged:
        _, chosen, rejected = dpo_loss(*logps.chunk(2), *ref_logps.chunk(2), beta=d.beta,
                                       reference_free=d.reference_free)
    logps_chosen, logps_rejected = logps.detach().chunk(2)
    return losses, {
        "rewards/chosen": chosen, "rewards/rejected": rejected,
        "rewards/accuracies": (chosen > rejected).float(), "rewards/margins": chosen - rejected,
        "logps/chosen": logps_chosen, "logps/rejected": logps_rejected,
    }


class DPO(Algorithm):
    progress_keys = ("train/loss", "rewards/accuracies")

    def __init__(self, cfg, trainer):
        super().__init__(cfg, trainer)
        if cfg.dpo.reference == "adapter" and not cfg.dpo.reference_free and cfg.model.lora_r <= 0:
            raise ConfigError("dpo.reference='adapter' needs a LoRA policy: set model.lora_r > 0")
        d, tok = cfg.data, trainer.tokenizer
        opts = PairOptions.from_config(d, cfg.dpo.pku_preference, pku_both_unsafe=cfg.dpo.pku_both_unsafe)
        self.bad, bad_eval = BadRows(d.on_bad_row), BadRows(d.on_bad_row)
        dropped, dropped_eval = {}, {}
        self.train_pairs = load_pair_examples(trainer, "train", opts, self.bad, dropped)
        self.eval_pairs = load_pair_examples(trainer, "eval", opts, bad_eval, dropped_eval) if d.eval else []
        number_pairs(self.train_pairs, self.eval_pairs)  # positions key the precomputed reference table
        self.skipped = report_skipped(trainer, self.bad, "train")
        self.skipped.update(report_dropped(trainer, dropped, "train"))
        if d.eval:
            self.skipped.update(report_skipped(trainer, bad_eval, "eval"))
            self.skipped.update(report_dropped(trainer, dropped_eval, "eval"))
        self.collate = collate_pairs(tok.pad_token_id)
        self.batcher = make_batcher(trainer, self.train_pairs, self.collate)
        self.reference = None  # built in prepared(), from the initial policy

    # --- set-up ---------------------------------------------------------------------------------
    def unwrap(self, model):
        return self.trainer.accelerator.unwrap_model(model)

    def build_model(self):
        return load_causal_lm(self.cfg.model, self.trainer.tokenizer, model=self.trainer.objects.model)

    def given_reference(self):
        """The reference model given as an object (Trainer(ref_model=...)), frozen on the device; else None."""
        given = self.trainer.objects.ref_model
        if given is None:
            return None
        ref = load_causal_lm(self.cfg.model, self.trainer.tokenizer, trainable=False, model=given)
        return ref.to(self.trainer.device)

    def prepared(self, model) -> None:
        if not self.cfg.dpo.reference_free:
            self.reference = REFERENCES[self.cfg.dpo.reference](self, model)

    def total_steps(self) -> int:
        return total_steps(self.cfg, self.batcher)

    def steps(self, start_step):
        return step_stream(self.batcher, start_step)

    # --- the objective -------------------------------------------------------------------------
    def forward(self, model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """([2B] summed response log-probs, [2B] response lengths) from one forward of chosen + rejected rows
        (one row per pair, the prompt once, where the attention kernel allows)."""
        return pair_sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_mask)

    def pair_losses(self, model, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(per-pair losses [B], per-pair stats [B]) of the policy `model` against the reference."""
        logps, lengths = self.forward(model, batch)
        ref_logps = self.reference.logps(self, model, batch) if self.reference else torch.zeros_like(logps)
        return pair_objective(self.cfg.dpo, logps, lengths, ref_logps)

    def loss_weight(self, batch: PairBatch) -> float:
        return float(batch.num_pairs)

    def loss(self, model, batch: PairBatch):
        losses, stats = self.pair_losses(model, batch)
        return losses.sum(), {k: v.mean() for k, v in stats.items()}

    def after_step(self, model, step):
        d = self.cfg.dpo
        if d.ref_update_every and step % d.ref_update_every == 0:
            with self.trainer.phase("reference update"):  # gathers the policy's shards under ZeRO-3
                ema_update_(self.reference.model, self.unwrap(model), d.ref_update_alpha)
        return dict(self.skipped) if step == 1 else {}

    # --- the precomputed reference ---------------------------------------------------------------
    def _fingerprint(self) -> str:
        """What the cached log-probs depend on: the initial model, its precision and every pair's tokens."""
        h = hashlib.sha256()
        m = self.cfg.model
        h.update(repr((m.name_or_path, m.dtype, m.lora_r, self.cfg.mixed_precision)).encode())
        for e in self.train_pairs + self.eval_pairs:
            h.update(repr((e.prompt_ids, e.chosen_ids, e.rejected_ids)).encode())
        return h.hexdigest()

    def reference_table(self, model) -> torch.Tensor:
        """[N, 2] summed (chosen, rejected) log-probs of the initial policy for every train + eval pair.

        Called before a checkpoint is loaded, so `model` still holds the initial weights; on resume the cache
        written at the start of the run is reused when it matches the data and model.
        """
        path = os.path.join(self.trainer.run_dir, REF_CACHE)
        key = self._fingerprint()
        if self.trainer.resume_from and os.path.exists(path):
            cached = torch.load(path, weights_only=True)
            if cached["fingerprint"] == key:
                self.trainer.print(f"reference log-probs: reusing {path}")
                return cached["logps"]
            self.trainer.print(f"reference log-probs: {path} belongs to other pairs or another model; recomputing")
        with self.trainer.phase("reference precompute"):
            table = self._score_pairs(model)
        if self.trainer.is_main:
            torch.save({"fingerprint": key, "logps": table}, path)
        self.trainer.print(f"reference log-probs: {len(table)} pairs computed once, cached in {path}")
        return table

    @torch.no_grad()
    def _score_pairs(self, model) -> torch.Tensor:
        """Each rank scores a strided share; one all-reduce of a table zero outside a rank's rows gives every rank
        all of them (exactly: each row is summed with zeros)."""
        t = self.trainer
        examples = self.train_pairs + self.eval_pairs
        mb = self.cfg.dpo.precompute_batch_size or 4 * self.cfg.optim.micro_batch_size
        # longest first: similar lengths share a forward (less padding), and the largest one comes first, so a
        # batch size too large for the device fails at once, not at the end of the pass
        share = sorted(examples[t.rank::t.world_size], key=pair_tokens, reverse=True)
        table = torch.zeros(len(examples), 2, dtype=torch.float64, device=t.device)
        with t.full_model(model) as policy:  # ranks' shares differ in size: whole weights, no per-forward gathers
            was_training = policy.training
            policy.eval()
            for i in range(0, len(share), mb):
                batch = self.collate(share[i:i + mb])
                mark_step(policy)
                with t.accelerator.autocast():
                    chosen, rejected = self.forward(policy, batch)[0].float().chunk(2)
                table[batch.index.to(t.device)] = torch.stack([chosen, rejected], 1).double()
            policy.train(was_training)
        return all_reduce_sum_(table).float().cpu()

    # --- evaluation and state --------------------------------------------------------------------
    def evaluates(self) -> bool:
        return bool(self.eval_pairs)

    def evaluate(self, model) -> dict:
        if not self.eval_pairs:
            return {}

        def sums(model, batch):
            losses, stats = self.pair_losses(model, batch)
            stats["loss"] = losses
            return [stats[k].float().sum() for k in EVAL_KEYS], len(losses)
        return sharded_eval(self.trainer, model, self.eval_pairs, self.cfg.optim.micro_batch_size, self.collate,
                            EVAL_KEYS, sums)

    def state_dict(self) -> dict:
        if self.cfg.dpo.ref_update_every:  # a moving reference is part of the training state
            return {"reference": self.reference.model.state_dict()}
        return {}

    def load_state_dict(self, state: dict) -> None:
        if "reference" in state:
            self.reference.model.load_state_dict(state["reference"])
