"""Run folder logging: always a local metrics.jsonl, optionally wandb and TensorBoard on top."""

from __future__ import annotations

import json
import math
import netrc
import os
import time
from typing import Any, Callable, Mapping, Optional


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    """Appends one JSON object per logged step to `<run>/metrics.jsonl` (main process only)."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.start = time.time()

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time/elapsed_s": round(time.time() - self.start, 3)}
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _parse_lines(path: str) -> tuple[list[dict], Optional[str]]:
    """(records, the last line when it is cut off). A process killed while appending leaves a partial last line;
    one that does not parse elsewhere in the file is an error naming its line."""
    with open(path) as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                return records, line
            raise ValueError(f"{path}:{i + 1}: not a JSON record: {line[:80]!r}") from None
    return records, None


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl; a partial last line (a run killed mid-write, or one still writing) is left
    out."""
    return _parse_lines(str(path))[0]


def truncate_metrics(path: str, after_step: int, say: Callable[[str], None] = print) -> None:
    """On resume, drop records logged after the checkpoint so the file reads as one clean run; a partial last line
    is dropped with a notice."""
    if not os.path.exists(path):
        return
    records, partial = _parse_lines(path)
    if partial is not None:
        say(f"{path}: dropping a partial last line ({len(partial)} characters; the run stopped while writing it)")
    kept = [r for r in records if r.get("step", 0) <= after_step]
    with open(path, "w") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")


def wandb_settings(log: Any, env: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """wandb's project, entity, group and tags for the `logging` section `log`: what it sets, else wandb's own
    environment variables (WANDB_PROJECT, WANDB_ENTITY, WANDB_RUN_GROUP, WANDB_TAGS comma-separated), else the
    project 'rlhf' and no entity, group or tags. Passed to wandb.init, where a given value beats its environment."""
    env = os.environ if env is None else env
    tags = list(log.tags) or [t.strip() for t in env.get("WANDB_TAGS", "").split(",") if t.strip()]
    return {"project": log.project or env.get("WANDB_PROJECT") or "rlhf",
            "entity": env.get("WANDB_ENTITY") or None,
            "group": log.group or env.get("WANDB_RUN_GROUP") or None,
            "tags": tags or None}


def trackers(names: list[str], run_dir: str) -> list[Any]:
    """accelerate trackers for `logging.trackers`. TensorBoard writes to `<run>/tensorboard/`: named, accelerate
    would use the project name as its folder (`<run>/rlhf/`)."""
    out: list[Any] = []
    for name in names:
        if name == "tensorboard":
            from accelerate.tracking import TensorBoardTracker

            out.append(TensorBoardTracker("tensorboard", run_dir))
        else:
            out.append(name)
    return out


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1])
        return auth is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def prepare_wandb(run_dir: str, printer=print) -> Optional[str]:
    """Choose the wandb mode before init. Without credentials (e.g. no network), go offline with a notice."""
    os.environ.setdefault("WANDB_DIR", run_dir)
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if not _has_wandb_credentials():
        os.environ["WANDB_MODE"] = "offline"
        printer(f"wandb: no credentials or network; logging offline to {run_dir}/wandb (sync later with `wandb sync`)")
    return os.environ.get("WANDB_MODE")


# ---------------------------------------------------------------------------------------------------------------------
# Rollout samples: a few sampled responses per iteration, to read next to the metrics
# ---------------------------------------------------------------------------------------------------------------------

SAMPLES_FILE = "samples.jsonl"
SAMPLE_COLUMNS = ("step", "iteration", "prompt", "response", "score", "kl", "length")


def write_samples(path: str, records: list[dict]) -> None:
    """Append one JSON line per sampled response to `path` (the run folder's samples.jsonl); the caller decides which
    process writes (rank 0)."""
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps({k: _jsonable(v) for k, v in r.items()}) + "\n")


def log_samples_table(tracker: Any, records: list[dict], step: int, key: str = "samples") -> None:
    """Log `records` as one wandb.Table (a row per response, columns SAMPLE_COLUMNS) through `tracker`, accelerate's
    wandb tracker (anything with `.log(values, step=)`), like TRL's completion tables. Nothing without records."""
    if not records:
        return
    import wandb

    columns = [c for c in SAMPLE_COLUMNS if any(c in r for r in records)]
    table = wandb.Table(columns=columns, data=[[_jsonable(r.get(c)) for c in columns] for r in records])
    tracker.log({key: table}, step=step)
