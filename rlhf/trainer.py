"""The Trainer: one loop for every algorithm, on accelerate (CPU, one GPU, many GPUs, DeepSpeed).

    from rlhf import Trainer, SFTConfig
    Trainer(cfg).train()          # or: rlhf train configs/sft_tiny.yaml [--resume] [--optim.lr 1e-4]

It owns the accelerator, the optimizer and schedule, gradient accumulation and clipping, the run
folder (config.yaml, metrics.jsonl, checkpoints/, final/), trackers, progress and resume. The
algorithm (rlhf/algorithms/) only turns micro-batches into losses and stats.

Several processes: only rank 0 writes logs, metrics and reports; metrics are reduced over ranks first. The
Trainer names what it is doing (`phase`): a collective that a rank never joins fails after
RLHF_COLLECTIVE_TIMEOUT_S seconds (default 1800) with a CollectiveError naming the phase, instead of hanging.
Under DeepSpeed ZeRO-3 and FSDP, `full_model` gives whole weights for generation, scoring, evaluation and export.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from contextlib import contextmanager
from datetime import datetime
from typing import Iterator, Optional, Union

import torch

from .config import ConfigError, TrainConfig, save_config, to_dict
from .ops import TIMEOUT_ENV, all_reduce_sum_, collective_timeout
from .tracking import MetricsWriter, prepare_wandb, truncate_metrics

CHECKPOINT_GLOB = "step_*"


class CollectiveError(RuntimeError):
    """A collective (all-reduce, barrier, all-gather) failed or timed out: some rank did not take part."""


def _is_collective_failure(e: BaseException) -> bool:
    """gloo raises a RuntimeError naming itself ("Timed out waiting ...", "Connection closed by peer"); NCCL and
    the c10d store raise torch.distributed.DistError subclasses."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "gloo", "nccl", "c10d", "timed out waiting", "connection closed by peer", "connection reset by peer"))


def flat_config(cfg: TrainConfig) -> dict:
    """{'optim.lr': 1e-5, ...} with scalar values only, as trackers' hyper-parameter tables want."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    walk(to_dict(cfg), "")
    return out


def _algorithm_class(name: str):
    from .algorithms import ALGORITHMS

    return ALGORITHMS[name]()


def _use_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _use_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def micro_batch_size(cfg: TrainConfig) -> int:
    ppo = getattr(cfg, "ppo", None)
    return ppo.micro_batch_size if ppo is not None else cfg.optim.micro_batch_size


def _grad_accum(cfg: TrainConfig, world_size: int) -> int:
    fn = getattr(cfg, "grad_accum", None)
    return fn(world_size) if fn else cfg.optim.grad_accum(world_size)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: Union[bool, str] = False):
        from accelerate import Accelerator, PartialState
        from accelerate.utils import InitProcessGroupKwargs

        self.cfg = cfg
        cfg.validate()
        # Several processes on a machine without GPUs (torchrun, accelerate launch): start the
        # process group over gloo. Under DeepSpeed the Accelerator then wraps the model in DeepSpeed
        # on top of it (CI's ZeRO tests run this way).
        # The collective timeout is given to the first call that starts the process group (later ones reuse it).
        self.timeout = collective_timeout()
        if _use_fsdp() and os.environ.get("FSDP_VERSION", "1") != "2":
            raise ConfigError(f"FSDP: fsdp_config.fsdp_version is {os.environ.get('FSDP_VERSION', '1')} in the "
                              "accelerate config; set it to 2 (FSDP1 is not supported)")
        multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
        cpu_multi = multi and not torch.cuda.is_available()
        timeout = {"timeout": self.timeout} if multi else {}
        state = PartialState(cpu=True, **timeout) if cpu_multi else PartialState(**timeout)
        if cpu_multi and _use_deepspeed():
            import deepspeed

            deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, timeout=self.timeout)
        if cpu_multi and _use_fsdp():
            # accelerate selects FSDP only on accelerators; torch's FSDP2 also shards over gloo on CPU (CI runs it so)
            from accelerate.utils import DistributedType

            state.distributed_type = DistributedType.MULTI_GPU  # the Accelerator below upgrades it to FSDP
        if multi:
            # a collective torch's watchdog aborts (inside DeepSpeed or FSDP; the trainer's own all-reduces raise a
            # CollectiveError instead): print where every thread of this rank stood then
            import faulthandler

            faulthandler.enable(all_threads=True)
        cfg.validate_world(state.num_processes)
        self.grad_accum = _grad_accum(cfg, state.num_processes)
        self.world_size, self.rank, self.is_main = state.num_processes, state.process_index, state.is_main_process
        self.run_dir = self._resolve_run_dir(resume)
        self.resume_from = self._find_checkpoint(resume) if resume else None
        # A collective that never completes fails with a timeout error instead of hanging forever.
        pg = InitProcessGroupKwargs(timeout=self.timeout)
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=self.grad_accum,
            log_with=list(cfg.logging.trackers) or None,
            project_dir=self.run_dir,
            kwargs_handlers=[pg],
            deepspeed_plugin=self._deepspeed_plugin(),
        )
        from .models import zero_stage

        self.zero_stage = zero_stage(self.accelerator)
        self.fsdp = self.accelerator.is_fsdp2
        if self.fsdp and cfg.mixed_precision != "no":
            self._fsdp_precision(cfg.mixed_precision)
        self.current_phase = "set-up"
        from accelerate.utils import set_seed

        # per-rank seeds for what draws from torch's global generator (dropout, HF sampling without seeds); PPO's
        # rollouts draw from per-rollout seeds instead, different per rollout and the same at any world size
        set_seed(cfg.seed, device_specific=True)
        from .models import load_tokenizer

        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path,
                                        field="model.tokenizer" if cfg.model.tokenizer else "model.name_or_path",
                                        trust_remote_code=cfg.model.trust_remote_code)
        self.algorithm = _algorithm_class(cfg.algorithm)(cfg, self)
        self.metrics = MetricsWriter(os.path.join(self.run_dir, "metrics.jsonl"), enabled=self.is_main)
        self.step = 0

    def _deepspeed_plugin(self):
        """Under `accelerate launch` with a DeepSpeed config, batch numbers come from the rlhf config."""
        if not _use_deepspeed():
            return None
        from accelerate.utils import DeepSpeedPlugin

        clip = self.cfg.optim.max_grad_norm
        plugin = DeepSpeedPlugin(gradient_accumulation_steps=self.grad_accum, gradient_clipping=clip if clip > 0 else None)
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size(self.cfg)
        plugin.deepspeed_config["train_batch_size"] = micro_batch_size(self.cfg) * self.grad_accum * self.world_size
        return plugin

    def _build_model(self) -> torch.nn.Module:
        """The algorithm's model, with what it initializes at random (LoRA adapters, fresh score heads) drawn from
        `seed` alone: the same on every rank and at any world size. DDP and DeepSpeed would copy rank 0's values
        over anyway; FSDP shards each rank's own, so rank-dependent draws would mix into one parameter."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed)
            return self.algorithm.build_model()

    def _fsdp_precision(self, precision: str) -> None:
        """FSDP2 mixed precision: whole weights in half precision for forwards, as under DeepSpeed, but gradients
        reduced in float32 (as DDP does) and module outputs left as computed. accelerate's default policy also casts
        every module's output to half precision, which rounds PPO's log-probs (a ratio that is not 1 on the first
        step) and values, and a reward model's scores."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        low = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=low, reduce_dtype=torch.float32)

    def _size_zero3(self, model: torch.nn.Module) -> None:
        """ZeRO-3 keeps parameters below a size threshold whole on every rank; like transformers' "auto", scale it
        with the model (10 x hidden size: norms and biases stay whole, matrices are sharded). DeepSpeed's fixed
        default (1e5 elements) would leave a small model entirely unsharded."""
        zero = self.accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("zero_optimization", {})
        hidden = next((m.config.hidden_size for m in model.modules()
                       if isinstance(getattr(getattr(m, "config", None), "hidden_size", None), int)), None)
        if hidden and zero.get("stage3_param_persistence_threshold", "auto") == "auto":
            zero["stage3_param_persistence_threshold"] = 10 * hidden

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

    def _resolve_run_dir(self, resume: Union[bool, str]) -> str:
        from accelerate.utils import broadcast_object_list

        log = self.cfg.logging
        if isinstance(resume, str) and resume:
            path = resume
            if os.path.basename(os.path.dirname(os.path.abspath(path))) == "checkpoints":
                path = os.path.dirname(os.path.dirname(os.path.abspath(path)))
            if not os.path.isdir(path):
                raise ConfigError(f"--resume {resume}: no such run folder or checkpoint")
            return path
        if resume and not log.run_name:
            runs = sorted(glob.glob(os.path.join(log.output_dir, f"{self.cfg.algorithm}-*")), key=os.path.getmtime)
            if not runs:
                raise ConfigError(f"--resume: no earlier '{self.cfg.algorithm}-*' run in {log.output_dir}; set logging.run_name")
            return runs[-1]
        name = [log.run_name or f"{self.cfg.algorithm}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"]
        name = broadcast_object_list(name)  # one name for all ranks
        path = os.path.join(log.output_dir, name[0])
        if self.is_main:
            os.makedirs(path, exist_ok=True)
        return path

    def _find_checkpoint(self, resume: Union[bool, str]) -> Optional[str]:
        if isinstance(resume, str) and os.path.basename(os.path.dirname(os.path.abspath(resume))) == "checkpoints":
            return resume
        found = sorted(glob.glob(os.path.join(self.run_dir, "checkpoints", CHECKPOINT_GLOB)))
        found = [f for f in found if not f.endswith(".tmp")]
        if not found:
            raise ConfigError(f"--resume: no checkpoint in {self.run_dir}/checkpoints")
        return found[-1]

    # ------------------------------------------------------------------------------------------
    def _optimizer(self, model: torch.nn.Module):
        o = self.cfg.optim
        groups = self.algorithm.param_groups(model)
        for g in groups:
            g.setdefault("lr", o.lr)
            g["initial_lr"] = g["lr"]
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.adam_betas), eps=o.adam_eps,
                                 weight_decay=o.weight_decay)

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
        if "wandb" in log.trackers:
            prepare_wandb(self.run_dir, self.print)
            kwargs["wandb"] = {"name": os.path.basename(self.run_dir), "dir": self.run_dir,
                               "group": log.group or None, "tags": list(log.tags) or None,
                               "resume": "allow", "id": os.path.basename(self.run_dir)}
        self.accelerator.init_trackers(log.project, config=flat_config(self.cfg), init_kwargs=kwargs)

    # ------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run to the configured number of steps; returns the last logged metrics."""
        acc, cfg, algo = self.accelerator, self.cfg, self.algorithm
        if self.is_main:
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
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

        if self.resume_from:
            with self.phase("resume"):
                self._load_checkpoint(self.resume_from)
            self.print(f"resumed from {self.resume_from} at step {self.step}")
        elif self.is_main and os.path.exists(self.metrics.path):
            os.remove(self.metrics.path)
        self._init_trackers()
        self.print(f"run folder: {self.run_dir}  ({total} steps, world {self.world_size}, "
                   f"grad accum {self.grad_accum})")

        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=self.step, desc=cfg.algorithm, dynamic_ncols=True,
                   disable=not (self.is_main and cfg.logging.progress))
        last: dict = {}
        step_iter = algo.steps(self.step)
        while self.step < total:
            t0 = time.time()
            with self.phase("batch"):  # PPO names its rollout inside
                batch = next(step_iter)
            with self.phase("train step"):
                stats = self._optimizer_step(model, optimizer, scheduler, batch.micro_batches)
                self.step += 1
                stats.update(batch.metrics)
                stats.update(algo.after_step(model, self.step))
            stats["optim/lr"] = scheduler.get_last_lr()[0]
            stats["time/step_s"] = time.time() - t0
            if self.step % cfg.logging.log_every == 0 or self.step == total:
                self.log(stats)
                last = stats
            bar.update(1)
            bar.set_postfix({k.split("/")[-1]: f"{float(stats[k]):.4g}" for k in algo.progress_keys if k in stats})
            if cfg.logging.eval_every and self.step % cfg.logging.eval_every == 0 and self.step < total:
                self.log(self.evaluate())
            if cfg.logging.save_every and self.step % cfg.logging.save_every == 0 and algo.can_checkpoint(self.step):
                self.save_checkpoint()
        bar.close()
        final_eval = self.evaluate()
        if final_eval:
            self.log(final_eval)
            last.update(final_eval)
        if not self.resume_from or self.step > int(os.path.basename(self.resume_from).split("_")[-1]):
            self.save_checkpoint()
        self.save_final()
        acc.end_training()
        return last

    def _optimizer_step(self, model, optimizer, scheduler, micro_batches: list) -> dict:
        acc, algo = self.accelerator, self.algorithm
        if len(micro_batches) != self.grad_accum:
            raise RuntimeError(f"algorithm gave {len(micro_batches)} micro-batches for a step; expected {self.grad_accum}")
        # Normalize by the step's global unit count (tokens, pairs): the loss is then the same
        # whatever the split into ranks and micro-batches.
        weight = torch.tensor(float(sum(algo.loss_weight(mb) for mb in micro_batches)), device=self.device)
        weight = all_reduce_sum_(weight).clamp(min=1.0)
        scale = self.world_size * self.grad_accum / weight
        sums: dict[str, torch.Tensor] = {}
        total_loss = torch.zeros((), device=self.device)
        for mb in micro_batches:
            with acc.accumulate(model):
                with acc.autocast():
                    loss, stats = algo.loss(model, mb)
                acc.backward(loss * scale)
                total_loss += loss.detach().float() / weight
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, device=self.device).detach().float()
                grad_norm = None
                if acc.sync_gradients and self.cfg.optim.max_grad_norm > 0:
                    # under DeepSpeed the engine clips inside backward and returns None here
                    grad_norm = acc.clip_grad_norm_(model.parameters(), self.cfg.optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        keys = sorted(sums)
        packed = torch.stack([total_loss] + [sums[k] / len(micro_batches) for k in keys])
        packed = all_reduce_sum_(packed)  # the loss: already per global unit, so summed; the stats: rank means
        out = {"train/loss": packed[0].item()}
        out.update({k: (packed[i + 1] / self.world_size).item() for i, k in enumerate(keys)})
        if grad_norm is None and hasattr(model, "get_global_grad_norm"):
            grad_norm = model.get_global_grad_norm()
        if grad_norm is not None:
            out["optim/grad_norm"] = float(grad_norm)
        return out

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

    # --- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        """Model, optimizer, schedule, RNG states and step, written to a temp folder then renamed."""
        acc = self.accelerator
        final = os.path.join(self.run_dir, "checkpoints", f"step_{self.step:06d}")
        tmp = final + ".tmp"
        with self.phase("checkpoint"):
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            acc.wait_for_everyone()
            acc.save_state(tmp)  # under ZeRO each rank writes its own shards
            acc.wait_for_everyone()  # every rank's shard and RNG state is on disk before the rename
            state = {"step": self.step, "algorithm": self.algorithm.state_dict()}
            if self.is_main:
                torch.save(state, os.path.join(tmp, "trainer_state.pt"))
                with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                    json.dump({"step": self.step}, f)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                self._prune_checkpoints()
            acc.wait_for_everyone()
        return final

    def _prune_checkpoints(self) -> None:
        keep = self.cfg.logging.keep_checkpoints
        found = sorted(p for p in glob.glob(os.path.join(self.run_dir, "checkpoints", CHECKPOINT_GLOB))
                       if not p.endswith(".tmp"))
        for old in found[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self, path: str) -> None:
        self.accelerator.load_state(path)
        state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
        self.step = state["step"]
        self.algorithm.load_state_dict(state["algorithm"])
        if self.is_main:
            truncate_metrics(self.metrics.path, self.step)

    def save_final(self) -> str:
        """final/: whole weights written by rank 0 (under ZeRO-3 gathered first), loadable with from_pretrained."""
        out = os.path.join(self.run_dir, "final")
        with self.phase("final export"):
            self.accelerator.wait_for_everyone()
            with self.full_model() as model:
                self.algorithm.prepare_export(model)  # every rank: e.g. the reward model's calibration scores
                if self.is_main:
                    os.makedirs(out, exist_ok=True)
                    self.algorithm.save_model(model, out)
            self.accelerator.wait_for_everyone()
        return out
