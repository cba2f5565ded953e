"""Run folders: naming, one run per folder (refused without --resume or --overwrite), and the checkpoint a resume
continues from (verified, with the same training settings).

    <output_dir>/<run_name>/   config.yaml  metrics.jsonl  checkpoints/step_NNNNNN/  final/  [algorithm caches *.pt]
"""

from __future__ import annotations

import os
import secrets
import shutil
from datetime import datetime
from typing import Callable, Union

from . import checkpoints as ckpt
from .checkpoints import CheckpointError
from .config import ConfigError, TrainConfig, to_dict

# Keys that may change on --resume without changing the run: where it logs and saves, and how long it runs (a longer
# run continues the same one; a notice says the schedule's length changes with it).
RESUME_FREE_SECTIONS = ("logging",)
RESUME_LENGTH_KEYS = ("optim.max_steps", "optim.epochs", "ppo.iterations")
RESUME_FREE_KEYS = ("optim.max_skipped_steps",)
# What --overwrite clears from a run folder: what a run writes into it (algorithm caches `*.pt` are added).
RUN_OUTPUTS = ("checkpoints", "final", "final.tmp", "final.old", "metrics.jsonl", "samples.jsonl", "config.yaml",
               "eval")


def flat_config(cfg: Union[TrainConfig, dict]) -> dict:
    """{'optim.lr': 1e-5, ...} with scalar values only, as trackers' hyper-parameter tables want."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    walk(cfg if isinstance(cfg, dict) else to_dict(cfg), "")
    return out


def resume_differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(keys that change training, run-length keys) whose values differ between two config trees, each as
    'key: <saved> in the checkpoint, <current> now'."""
    a, b = flat_config(saved), flat_config(current)
    changed, longer = [], []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in RESUME_FREE_SECTIONS or key in RESUME_FREE_KEYS or a.get(key) == b.get(key):
            continue
        (longer if key in RESUME_LENGTH_KEYS else changed).append(
            f"{key}: {a.get(key, '<unset>')!r} in the checkpoint, {b.get(key, '<unset>')!r} now")
    return changed, longer


def holds_run(path: str) -> bool:
    """Whether a run folder already holds a run's results (not just a folder a failed set-up created)."""
    checkpoints = os.path.join(path, "checkpoints")
    metrics = os.path.join(path, "metrics.jsonl")
    return ((os.path.isdir(checkpoints) and bool(os.listdir(checkpoints)))
            or os.path.exists(os.path.join(path, "final"))
            or (os.path.exists(metrics) and os.path.getsize(metrics) > 0))


def clear_run(path: str) -> None:
    for name in RUN_OUTPUTS + tuple(ckpt.run_files(path)):
        target = os.path.join(path, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)


def resolve_run_dir(cfg: TrainConfig, resume: Union[bool, str], overwrite: bool, state,
                    say: Callable[[str], None]) -> str:
    """The run folder, the same on every rank (`state`: accelerate's PartialState). A new run into a folder that
    holds one is refused unless `overwrite`, which clears it first."""
    from accelerate.utils import broadcast_object_list

    log = cfg.logging
    if isinstance(resume, str) and resume:
        path = resume
        if os.path.basename(os.path.dirname(os.path.abspath(path))) == "checkpoints":
            path = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        if not os.path.isdir(path):
            raise ConfigError(f"--resume {resume}: no such run folder or checkpoint")
        return path
    if resume and not log.run_name:
        import glob

        runs = sorted(glob.glob(os.path.join(log.output_dir, f"{cfg.algorithm}-*")), key=os.path.getmtime)
        if not runs:
            raise ConfigError(f"--resume: no earlier '{cfg.algorithm}-*' run in {log.output_dir}; set logging.run_name")
        return runs[-1]
    # the default name is unique: the time to the second is not (two runs started together)
    stamp = f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    name = broadcast_object_list([log.run_name or f"{cfg.algorithm}-{stamp}"])  # one name for all ranks
    path = os.path.join(log.output_dir, name[0])
    if not resume and holds_run(path):
        if not overwrite:
            raise ConfigError(f"run folder {path} already holds a run (checkpoints, final/ or metrics.jsonl); "
                              f"pass --resume to continue it, --overwrite to replace it, or choose another "
                              f"--logging.run_name")
        if state.is_main_process:
            clear_run(path)
            say(f"--overwrite: cleared the earlier run in {path}")
        state.wait_for_everyone()  # no rank writes into the folder before it is cleared
    if state.is_main_process:
        os.makedirs(path, exist_ok=True)
    return path


def choose_checkpoint(cfg: TrainConfig, run_dir: str, resume: Union[bool, str], say: Callable[[str], None]) -> str:
    """The checkpoint to resume from: the given one, or the newest that verifies (each damaged newer one named in one
    line). Refused when it was trained with other settings. Damaged algorithm caches in the run folder are removed,
    so the algorithm recomputes them."""
    if isinstance(resume, str) and os.path.basename(os.path.dirname(os.path.abspath(resume))) == "checkpoints":
        problem = ckpt.verify(resume)
        if problem:
            raise CheckpointError(f"--resume {resume}: the checkpoint is damaged: {problem}")
        path = resume
    else:
        path = ckpt.newest_good(os.path.join(run_dir, "checkpoints"), say)
    check_resume_config(cfg, path, say)
    for name, problem in ckpt.damaged_run_files(path, run_dir):
        say(f"resume: {os.path.join(run_dir, name)} is damaged ({problem}); removing it so it is recomputed")
        os.remove(os.path.join(run_dir, name))
    return path


def check_resume_config(cfg: TrainConfig, path: str, say: Callable[[str], None]) -> None:
    import yaml

    saved_path = os.path.join(path, "config.yaml")
    if not os.path.exists(saved_path):
        return
    with open(saved_path) as f:
        saved = yaml.safe_load(f) or {}
    current = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))  # the same YAML round trip as saved
    changed, longer = resume_differences(saved, current)
    if changed:
        raise ConfigError(f"--resume: {path} was trained with other settings: {'; '.join(changed)}. Resume with "
                          f"the same settings, or start a new run (--logging.run_name NAME, or --overwrite)")
    for line in longer:
        say(f"resume: {line}: the run's length (and its schedule) change")
