"""The Trainer: one loop for every algorithm, on accelerate (CPU, one GPU, many GPUs, DeepSpeed).

    from rlhf import Trainer, SFTConfig
    Trainer(cfg).train()          # or: rlhf train configs/sft_tiny.yaml [--resume | --overwrite] [--optim.lr 1e-4]
    Trainer("configs/dpo_tiny.yaml", model=model, ref_model=ref, train_dataset=ds, callbacks=[cb]).train()

Python objects (models, tokenizer, datasets, reward callables, a peft LoraConfig, callbacks) can take the place of
what the config names by path: rlhf/api.py.

It owns the accelerator, the optimizer and schedule, gradient accumulation and clipping, the run
folder (config.yaml, metrics.jsonl, checkpoints/, final/), trackers, progress and resume. The
algorithm (rlhf/algorithms/) only turns micro-batches into losses and stats.

Several processes: only rank 0 writes logs, metrics and reports; metrics are reduced over ranks first. The
Trainer names what it is doing (`phase`): a collective that a rank never joins fails after
RLHF_COLLECTIVE_TIMEOUT_S seconds (default 1800) with a CollectiveError naming the phase, instead of hanging.
Under DeepSpeed ZeRO-3 and FSDP, `full_model` gives whole weights for generation, scoring, evaluation and export.

Faults: a step whose loss, gradient norm or reward-model score is not finite is skipped (the weights and optimizer
state stay), and optim.max_skipped_steps of them in a row stop the run; no checkpoint or final/ is ever written with
a non-finite weight. SIGTERM and SIGINT finish the current step, write a checkpoint and stop (exit 143 / 130 from
`rlhf train`). Checkpoints carry a manifest (rlhf/checkpoints.py) that resume verifies; what they hold (the model as
in final/, and the training state, trainable tensors only under LoRA) is rlhf/checkpointing.py's.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Union

import torch

from . import checkpointing
from . import checkpoints as ckpt
from .checkpoints import CheckpointError, DiskFullError, NonFiniteError  # noqa: F401  (re-exported)
from .config import ConfigError, TrainConfig, save_config
from .distributed import (CollectiveError, _is_collective_failure, _use_deepspeed, _use_fsdp,  # noqa: F401
                          deepspeed_plugin, fsdp_precision, micro_batch_size, process_state,
                          resolve_mixed_precision, size_zero3)
from .models.loading import mark_step
from .ops import TIMEOUT_ENV, all_reduce_sum_, collective_timeout
from .runs import choose_checkpoint, flat_config, resolve_run_dir  # noqa: F401  (flat_config: re-exported)
from .tracking import SAMPLES_FILE, MetricsWriter, prepare_wandb, trackers, wandb_settings

# Metrics holding reward-model scores: a non-finite one skips the step like a non-finite loss.
SCORE_KEYS = ("objective/scores", "reward/")


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped the run after a step; a checkpoint of that step was written."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[str]):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        where = f"checkpoint {checkpoint}; continue with --resume" if checkpoint else "no checkpoint written"
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}: {where}")


class StopSignals:
    """SIGTERM / SIGINT set a flag that the loop reads after each step; a second signal exits at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, say: Callable[[str], None]):
        self.say, self.signum, self.previous = say, None, {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():  # handlers can only be set from the main thread
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None:
            sys.stderr.write(f"\n{name} again: exiting now, without a checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        self.say(f"{name}: finishing this step, then writing a checkpoint and stopping (send it again to exit now)")


def _algorithm_class(name: str):
    from .algorithms import ALGORITHMS

    return ALGORITHMS[name]()


def _grad_accum(cfg: TrainConfig, world_size: int) -> int:
    fn = getattr(cfg, "grad_accum", None)
    return fn(world_size) if fn else cfg.optim.grad_accum(world_size)


class Trainer:
    def __init__(self, config: Union[TrainConfig, dict, str], *, model=None, ref_model=None, reward_model=None,
                 reward_tokenizer=None, tokenizer=None, processing_class=None, train_dataset=None, eval_dataset=None,
                 reward_fns=None, peft_config=None, callbacks=None, resume: Union[bool, str] = False,
                 overwrite: bool = False):
        """config: a TrainConfig, a dict of config values or a YAML path. The objects (models, tokenizer, datasets,
        reward callables, a peft LoraConfig, callbacks) take the place of what the config names by path: see
        rlhf/api.py. resume: True (the run folder's newest good checkpoint) or a run folder or checkpoint path.
        overwrite: clear a run folder that already holds a run; without it (or resume) such a folder is refused."""
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        from .api import as_config, trainer_objects

        self.cfg = cfg = as_config(config)
        self.objects = trainer_objects(model, ref_model, reward_model, reward_tokenizer, tokenizer, processing_class,
                                       train_dataset, eval_dataset, reward_fns, peft_config, callbacks)
        self.objects.apply(cfg)
        self.should_stop = False  # a callback sets it to stop after the current step (with a checkpoint)
        cfg.validate()
        # once, before anything reads it (the run folder's config.yaml, resume's settings check, the Accelerator)
        cfg.mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
        max_skipped = cfg.optim.max_skipped_steps  # >= 1, checked with the other ranges by cfg.validate()
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite: choose one (continue the run, or replace it)")
        self.timeout = collective_timeout()
        state = process_state(self.timeout)
        cfg.validate_world(state.num_processes)
        self.grad_accum = _grad_accum(cfg, state.num_processes)
        self.world_size, self.rank, self.is_main = state.num_processes, state.process_index, state.is_main_process
        self.run_dir = resolve_run_dir(cfg, resume, overwrite, state, self.print)
        self.resume_from = self._find_checkpoint(resume) if resume else None
        # A collective that never completes fails with a timeout error instead of hanging forever.
        pg = InitProcessGroupKwargs(timeout=self.timeout)
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=self.grad_accum,
            log_with=trackers(cfg.logging.trackers, self.run_dir) or None,
            project_dir=self.run_dir,
            kwargs_handlers=[pg],
            deepspeed_plugin=deepspeed_plugin(cfg, self.grad_accum, self.world_size),
        )
        from .models import zero_stage

        self.zero_stage = zero_stage(self.accelerator)
        self.fsdp = self.accelerator.is_fsdp2
        if self.fsdp and cfg.mixed_precision != "no":
            fsdp_precision(self.accelerator, cfg.mixed_precision)
        self.current_phase = "set-up"
        from accelerate.utils import set_seed

        # per-rank seeds for what draws from torch's global generator (dropout, HF sampling without seeds); PPO's
        # rollouts draw from per-rollout seeds instead, different per rollout and the same at any world size
        set_seed(cfg.seed, device_specific=True)
        from .models import ensure_pad_token, load_tokenizer

        if self.objects.tokenizer is not None:
            self.tokenizer = ensure_pad_token(self.objects.tokenizer)
        else:
            self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path,
                                            field="model.tokenizer" if cfg.model.tokenizer else "model.name_or_path",
                                            trust_remote_code=cfg.model.trust_remote_code,
                                            revision=None if cfg.model.tokenizer else cfg.model.revision)
        self.algorithm = _algorithm_class(cfg.algorithm)(cfg, self)
        self.metrics = MetricsWriter(os.path.join(self.run_dir, "metrics.jsonl"), enabled=self.is_main)
        self.step = 0
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite value, this run
        self.skipped_in_a_row = 0
        self.skip_reasons: list[str] = []  # what was not finite in the current run of skipped steps
        self.max_skipped_steps = max_skipped
        self.saved_step: Optional[int] = None  # the step of the last checkpoint this process wrote

    def _build_model(self) -> torch.nn.Module:
        """The algorithm's model, with what it initializes at random (LoRA adapters, fresh score heads) drawn from
        `seed` alone: the same on every rank and at any world size. DDP and DeepSpeed would copy rank 0's values
        over anyway; FSDP shards each rank's own, so rank-dependent draws would mix into one parameter."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed)
            return self.algorithm.build_model()

    def _size_zero3(self, model: torch.nn.Module) -> None:
        size_zero3(self.accelerator, model)

    # ------------------------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Name what every rank is doing for the block; a collective failing inside becomes a CollectiveError that
        says where (the innermost phase), on which rank, at which step."""
        outer, self.current_phase = self.current_phase, name
        try:
            yield
        except CollectiveError:
            raise
        except Exception as e:
            if self.world_size == 1 or not _is_collective_failure(e):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CollectiveError(
                f"collective failed during {name} (step {self.step}, rank {self.rank} of {self.world_size}): another "
                f"rank did not take part within {TIMEOUT_ENV}={self.timeout.total_seconds():g}s or has died; see "
                f"its own error. Cause: {first}") from e
        finally:
            self.current_phase = outer

    @contextmanager
    def full_model(self, model: Optional[torch.nn.Module] = None) -> Iterator[torch.nn.Module]:
        """The unwrapped model (default: the one being trained) with whole weights on this rank, for generation,
        scoring, evaluation and export: forwards inside may differ in number between ranks.

        Under ZeRO-3 and FSDP the parameters are gathered once for the whole block, not per forward or token, and
        re-sharded after (entering is a collective: every rank must enter). Elsewhere the weights are already
        whole and this only unwraps. Read-only: changes to the parameters inside are dropped when sharded."""
        model = self.model if model is None else model
        if self.zero_stage == 3:
            from .models import whole_model

            with whole_model(model) as module:
                yield module
        elif self.fsdp:
            from .models import whole_fsdp_model

            with whole_fsdp_model(model) as module:
                yield self.accelerator.unwrap_model(module)
        else:
            yield self.accelerator.unwrap_model(model)

    # ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def print(self, *args) -> None:
        if self.is_main:
            from tqdm.auto import tqdm

            tqdm.write(" ".join(str(a) for a in args))

    def rows(self, which: str) -> list:
        """The rows of data.train or data.eval ('train' / 'eval'): of the dataset object the Trainer was given
        (train_dataset=, eval_dataset=), else read from the file, folder or hub dataset the config names. data.limit
        applies to the training rows."""
        d = self.cfg.data
        limit = d.limit if which == "train" else 0
        obj = self.objects.dataset(which)
        if obj is None:
            from .data import load_rows

            return load_rows(getattr(d, which), getattr(d, f"{which}_split"), limit)
        from .data.objects import rows_from_dataset

        rows = rows_from_dataset(obj, f"{which}_dataset")
        return rows[:limit] if limit else rows

    def callback(self, event: str, *args) -> None:
        """Call `event` ('on_log', 'on_save', ...) on the callbacks given to the Trainer that define it."""
        from .api import call_back

        call_back(self.objects.callbacks, event, self, *args)

    def _find_checkpoint(self, resume: Union[bool, str]) -> Optional[str]:
        """The checkpoint to resume from, chosen and verified on rank 0; every rank gets it (or the same error)."""
        from accelerate.utils import broadcast_object_list

        found: list = [None, None]
        if self.is_main:
            try:
                found = [choose_checkpoint(self.cfg, self.run_dir, resume, self.print), None]
            except (ConfigError, CheckpointError) as e:
                found = [None, (isinstance(e, ConfigError), str(e))]
        found = broadcast_object_list(found)
        if found[1] is not None:
            is_config, message = found[1]
            raise (ConfigError if is_config else CheckpointError)(message)
        return found[0]

    def _any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (a collective when several processes): ranks then decide alike."""
        if self.world_size == 1:
            return flag
        return bool(all_reduce_sum_(torch.tensor([float(flag)], device=self.device)).item() > 0)

    # ------------------------------------------------------------------------------------------
    def _optimizer(self, model: torch.nn.Module):
        o = self.cfg.optim
        groups = self.algorithm.param_groups(model)
        for g in groups:
            g.setdefault("lr", o.lr)
            g["initial_lr"] = g["lr"]
        from .optim import make_adamw

        return make_adamw(groups, o, self.device)

    def _scheduler(self, optimizer, total_steps: int):
        from transformers import get_scheduler

        o = self.cfg.optim
        name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[o.scheduler]
        return get_scheduler(name, optimizer, num_warmup_steps=int(o.warmup_ratio * total_steps),
                             num_training_steps=total_steps)

    def _init_trackers(self) -> None:
        log = self.cfg.logging
        if not log.trackers:
            return
        kwargs = {}
        wandb = wandb_settings(log)
        if "wandb" in log.trackers:
            prepare_wandb(self.run_dir, self.print)
            kwargs["wandb"] = {"name": os.path.basename(self.run_dir), "dir": self.run_dir,
                               "entity": wandb["entity"], "group": wandb["group"], "tags": wandb["tags"],
                               "resume": "allow", "id": os.path.basename(self.run_dir)}
        self.accelerator.init_trackers(wandb["project"], config=flat_config(self.cfg), init_kwargs=kwargs)

    # ------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run to the configured number of steps; returns the last logged metrics. Raises Interrupted after a
        SIGTERM / SIGINT (a checkpoint of the step is written) and NonFiniteError when too many steps in a row were
        not finite."""
        acc, cfg, algo = self.accelerator, self.cfg, self.algorithm
        if self.is_main:
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"), header=self.objects.header())
        with self.phase("set-up"):
            model = self._build_model()
            if self.zero_stage == 3:
                self._size_zero3(model)
            optimizer = self._optimizer(model)
            total = algo.total_steps()
            scheduler = self._scheduler(optimizer, total)
            # The schedule is stepped once per optimizer step by hand: a prepared scheduler would step
            # once per process.
            model, optimizer = acc.prepare(model, optimizer)
            acc.register_for_checkpointing(scheduler)
            self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
            algo.prepared(model)

        resumed_step = None
        if self.resume_from:
            with self.phase("resume"):
                self._load_checkpoint(self.resume_from)
            resumed_step = self.step
            self.print(f"resumed from {self.resume_from} at step {self.step}")
        elif self.is_main:  # a fresh run: what an attempt that never got to hold a run (runs.holds_run) left goes
            for path in (self.metrics.path, os.path.join(self.run_dir, SAMPLES_FILE)):
                if os.path.exists(path):
                    os.remove(path)
        self._init_trackers()
        self.print(f"run folder: {self.run_dir}  ({total} steps, world {self.world_size}, "
                   f"grad accum {self.grad_accum})")

        self.callback("on_train_begin")
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=self.step, desc=cfg.algorithm, dynamic_ncols=True,
                   disable=not (self.is_main and cfg.logging.progress))
        last: dict = {}
        step_iter = algo.steps(self.step)
        deferred = False  # a stop signal came at a step that cannot be checkpointed
        collected = False
        with StopSignals(self.print) as signals:
            while self.step < total:
                t0 = time.time()
                with self.phase("batch"):  # PPO names its rollout inside
                    batch = next(step_iter)
                with self.phase("train step"):
                    stats = self._optimizer_step(model, optimizer, scheduler, batch.micro_batches, batch.metrics)
                    self.step += 1
                    stats.update(batch.metrics)
                    stats.update(algo.after_step(model, self.step))
                stats["time/step_s"] = time.time() - t0
                if self.step % cfg.logging.log_every == 0 or self.step == total or self.skipped_in_a_row:
                    self.log(stats)
                    last = stats
                if self.skipped_in_a_row >= self.max_skipped_steps:
                    bar.close()
                    raise NonFiniteError(
                        f"stopped at step {self.step}: {self.skipped_in_a_row} optimizer steps in a row had a "
                        f"non-finite {', '.join(self.skip_reasons)} and were skipped (optim.max_skipped_steps="
                        f"{self.max_skipped_steps}); nothing non-finite was written. Lower optim.lr (now "
                        f"{cfg.optim.lr:g}) or check the data and the initial weights")
                bar.update(1)
                bar.set_postfix({k.split("/")[-1]: f"{float(stats[k]):.4g}" for k in algo.progress_keys if k in stats})
                if cfg.logging.eval_every and self.step % cfg.logging.eval_every == 0 and self.step < total:
                    self.log(self.evaluate())
                saved = None
                due = cfg.logging.save_every and self.step % cfg.logging.save_every == 0
                if due and algo.can_checkpoint(self.step):
                    saved = self.save_checkpoint()
                    self.callback("on_save", saved)
                self.callback("on_step_end", self.step)
                if not collected:
                    # The first step creates most of what lives to the end (compiled graphs and their guards: ~575,000
                    # objects for 24 compiled layers; CUDA graphs; caches). Python's collector runs a full collection
                    # once the objects new since the last one exceed a quarter of the older ones: soon, inside some
                    # later step (~0.2 s over that many on a CI core). Taking it here keeps it in the first step.
                    gc.collect()
                    collected = True
                signalled = self._stop_requested(signals)
                if signalled or self._any_rank(self.should_stop):
                    if not algo.can_checkpoint(self.step):  # e.g. PPO: only between iterations
                        if not deferred:
                            self.print(f"step {self.step}: a checkpoint can be written only at the next step that "
                                       f"allows one; training on until then")
                        deferred = True
                        continue
                    if not signalled:  # a callback's stop: the run ends here as at its last step
                        self.print(f"step {self.step}: a callback set should_stop; stopping after this step")
                        break
                    bar.close()
                    path = saved
                    if not path:
                        path = self.save_checkpoint()
                        self.callback("on_save", path)
                    acc.end_training()
                    raise Interrupted(signals.signum or signal.SIGTERM, self.step, path)
        bar.close()
        if self.skipped_steps:
            self.print(f"{self.skipped_steps} of {total} optimizer steps were skipped for non-finite values "
                       f"(train/skipped_steps in metrics.jsonl)")
        final_eval = self.evaluate()
        if final_eval:
            self.log(final_eval)
            last.update(final_eval)
        if (resumed_step is None or self.step > resumed_step) and self.saved_step != self.step:
            self.callback("on_save", self.save_checkpoint())
        self.save_final()
        acc.end_training()
        self.callback("on_train_end", last)
        return last

    def _stop_requested(self, signals: StopSignals) -> bool:
        """Whether a stop signal reached any rank: all ranks then stop after the same step."""
        return self._any_rank(signals.signum is not None)

    def _optimizer_step(self, model, optimizer, scheduler, micro_batches: list, batch_metrics: dict) -> dict:
        acc, algo = self.accelerator, self.algorithm
        if len(micro_batches) != self.grad_accum:
            raise RuntimeError(f"algorithm gave {len(micro_batches)} micro-batches for a step; "
                               f"expected {self.grad_accum}")
        lr = scheduler.get_last_lr()[0]  # the rate this step uses (after scheduler.step() it is the next step's)
        # Normalize by the step's global unit count (tokens, pairs): the loss is then the same
        # whatever the split into ranks and micro-batches.
        weight = torch.tensor(float(sum(algo.loss_weight(mb) for mb in micro_batches)), device=self.device)
        weight = all_reduce_sum_(weight).clamp(min=1.0)
        scale = self.world_size * self.grad_accum / weight
        sums: dict[str, torch.Tensor] = {}
        total_loss = torch.zeros((), device=self.device)
        grad_norm, skipped = None, []
        for mb in micro_batches:
            mark_step(model)  # the previous micro-batch's backward is done
            with acc.accumulate(model):
                with acc.autocast():
                    loss, stats = algo.loss(model, mb)
                acc.backward(loss * scale)
                total_loss += loss.detach().float() / weight
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, device=self.device).detach().float()
                if acc.sync_gradients:
                    grad_norm = self._clip_grad_norm(model)
                    skipped = self._nonfinite(total_loss, grad_norm, sums, batch_metrics)
                    if not skipped:
                        optimizer.step()
                    elif acc.scaler is not None:  # fp16: close the scaler's record of this step's unscale_
                        acc.scaler.update()
                    optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # torch warns when the first optimizer step was the skipped one
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            scheduler.step()  # a skipped step still advances the schedule: step k always uses the rate of step k
        keys = sorted(sums)
        packed = torch.stack([total_loss] + [sums[k] / len(micro_batches) for k in keys])
        packed = all_reduce_sum_(packed)  # the loss: already per global unit, so summed; the stats: rank means
        out = {"train/loss": packed[0].item(), "optim/lr": lr}
        out.update({k: (packed[i + 1] / self.world_size).item() for i, k in enumerate(keys)})
        if grad_norm is None and hasattr(model, "get_global_grad_norm"):
            grad_norm = model.get_global_grad_norm()
        if grad_norm is not None:
            out["optim/grad_norm"] = float(grad_norm)
        self._count_skip(skipped)
        out["train/skipped_steps"] = self.skipped_steps
        return out

    def _clip_grad_norm(self, model):
        """The global gradient norm, clipped to optim.max_grad_norm; with clipping off it is still measured (an
        infinite threshold scales nothing) for the non-finite check. None under DeepSpeed (the engine clips)."""
        clip = self.cfg.optim.max_grad_norm
        return self.accelerator.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))

    def _nonfinite(self, loss: torch.Tensor, grad_norm, sums: dict, batch_metrics: dict) -> list[str]:
        """Names of the step's non-finite values (loss, gradient norm, reward-model scores), the same on every rank:
        the flags are summed over ranks, so every rank skips the step or none does. Under fp16 the loss scaler
        handles overflowing gradients itself (it skips those steps and lowers the scale), so the norm is not
        checked there. Under DeepSpeed the engine steps inside backward: the check counts and stops the run but
        cannot hold that step back."""
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 gives the norm as a DTensor
            grad_norm = grad_norm.full_tensor()
        checks = [("loss", loss)]
        if grad_norm is not None and self.accelerator.scaler is None:
            checks.append(("grad norm", torch.as_tensor(grad_norm, device=self.device)))
        checks += [(k, sums[k]) for k in sorted(sums) if k.startswith(SCORE_KEYS)]
        flags = torch.stack([(~torch.isfinite(v.float())).any().float() for _, v in checks])
        flags = all_reduce_sum_(flags) if self.world_size > 1 else flags
        bad = [name for (name, _), f in zip(checks, flags.tolist()) if f > 0]
        # the rollout's scores are already reduced over ranks: the same on every rank
        bad += [k for k in sorted(batch_metrics) if k.startswith(SCORE_KEYS)
                and isinstance(batch_metrics[k], (int, float)) and not ckpt.finite(float(batch_metrics[k]))]
        return bad

    def _count_skip(self, bad: list[str]) -> None:
        if not bad:
            self.skipped_in_a_row, self.skip_reasons = 0, []
            return
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        self.skip_reasons += [b for b in bad if b not in self.skip_reasons]
        self.print(f"step {self.step + 1}: non-finite {', '.join(bad)}; optimizer step skipped "
                   f"({self.skipped_in_a_row} in a row; the run stops at optim.max_skipped_steps="
                   f"{self.max_skipped_steps})")

    def evaluate(self) -> dict:
        """The algorithm's evaluation on whole weights: ranks' shares of the eval set may differ in size."""
        if not self.algorithm.evaluates() and not self.cfg.logging.eval_testbed:
            return {}
        with self.phase("evaluate"), self.full_model() as model:
            from .eval.callback import testbed_metrics

            metrics = self.algorithm.evaluate(model) if self.algorithm.evaluates() else {}
            metrics.update(testbed_metrics(self, model))  # the evaluation harness, on rank 0
            return metrics

    def log(self, metrics: dict) -> None:
        if not metrics:
            return
        clean = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        self.metrics.write(self.step, clean)
        if self.cfg.logging.trackers:
            self.accelerator.log({k: v for k, v in clean.items() if isinstance(v, (int, float))}, step=self.step)
        self.callback("on_log", dict(clean))

    # --- checkpoints and export (rlhf/checkpointing.py) -----------------------------------------
    def save_checkpoint(self) -> str:
        """Write `checkpoints/step_N/` (the model and the training state); returns its path."""
        return checkpointing.save_checkpoint(self)

    def _load_checkpoint(self, path: str) -> None:
        checkpointing.load_checkpoint(self, path)

    def save_final(self) -> str:
        """Write `final/`, loadable with from_pretrained; returns its path."""
        return checkpointing.save_final(self)
