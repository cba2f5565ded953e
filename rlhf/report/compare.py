"""Tables and plots across run folders."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from ..tracking import read_metrics

SEED_SUFFIX = re.compile(r"[-_]seed\d+$")
# Columns shown first when present, in this order; everything else numeric follows.
PREFERRED = [
    "assistant/gold/reward", "assistant/gold/helpfulness", "assistant/gold/harm", "assistant/gold/safety_rate",
    "assistant/rm/score", "assistant/win_rate_gold/vs_reference/win_rate", "assistant/kl/reference",
    "assistant/length/tokens", "code/pass@1", "code/pass@4", "code/pass@5", "code/pass@10", "code/kl/reference",
    "code/length/tokens",
]
CURVES = {
    "sft": ["train/loss", "eval/loss"],
    "reward": ["train/loss", "reward/accuracy", "reward/margin"],
    "dpo": ["train/loss", "rewards/accuracies", "rewards/margins", "logps/chosen"],
    "ppo": ["objective/scores", "objective/kl", "objective/rlhf_reward", "ppo/value_loss", "response/length_mean"],
}


@dataclass
class Run:
    path: str
    label: str
    algorithm: str
    metrics: list[dict] = field(default_factory=list)
    evals: dict[str, float] = field(default_factory=dict)


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[key] = float(v)
    return out


def _eval_metrics(data: dict, testbed: Optional[str] = None) -> dict[str, float]:
    """An eval.json ({"testbed", "metrics": {...}} from `rlhf eval`, or any nested dict) as 'testbed/metric'."""
    if isinstance(data.get("metrics"), dict):
        testbed = data.get("testbed") or testbed
        flat = _flatten(data["metrics"])
    else:
        flat = _flatten(data)
    if not testbed:
        return flat
    return {k if k.startswith(testbed + "/") else f"{testbed}/{k}": v for k, v in flat.items()}


def _eval_files(path: str) -> list[tuple[str, Optional[str]]]:
    """(eval.json path, testbed named by its folder) for a run or model folder: eval.json, eval/eval.json (what
    `rlhf eval --model X` writes by default), eval/<testbed>/eval.json; and the same under final/ of a run folder."""
    found: list[tuple[str, Optional[str]]] = []
    for root in (path, os.path.join(path, "final")):
        for file in (os.path.join(root, "eval.json"), os.path.join(root, "eval", "eval.json")):
            if os.path.isfile(file):
                found.append((file, None))
        eval_dir = os.path.join(root, "eval")
        if os.path.isdir(eval_dir):
            for name in sorted(os.listdir(eval_dir)):
                file = os.path.join(eval_dir, name, "eval.json")
                if os.path.isfile(file):
                    found.append((file, name))
    return found


def _find_evals(path: str) -> dict[str, float]:
    """Every eval.json of a run or model folder (see _eval_files), flattened to 'testbed/metric'."""
    out: dict[str, float] = {}
    for file, testbed in _eval_files(path):
        with open(file) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        out.update(_eval_metrics(data, testbed))
    return out


def _default_label(path: str) -> str:
    """The folder name; for a run's final/ or a checkpoint (what `rlhf eval --model` takes), the run's name."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if parts[-1] == "final" and len(parts) > 1:
        return parts[-2]
    if len(parts) > 2 and parts[-2] == "checkpoints":
        return f"{parts[-3]}@{parts[-1]}"
    return parts[-1]


def load_run(path: str, label: Optional[str] = None) -> Run:
    """A run folder (config.yaml, metrics.jsonl, evals) or a model folder evaluated by `rlhf eval`."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a run folder")
    algorithm = ""
    run_root = os.path.dirname(os.path.normpath(path)) if os.path.basename(os.path.normpath(path)) == "final" else path
    cfg_path = os.path.join(run_root, "config.yaml")
    if os.path.exists(cfg_path):
        import yaml

        with open(cfg_path) as f:
            algorithm = (yaml.safe_load(f) or {}).get("algorithm", "")
    metrics_path = os.path.join(path, "metrics.jsonl")
    metrics = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    return Run(path, label or _default_label(path), algorithm, metrics, _find_evals(path))


def merge_same_label(runs: list[Run]) -> list[Run]:
    """Runs with one label (e.g. a method trained once per testbed) become one row: their evals are joined."""
    merged: dict[str, Run] = {}
    for r in runs:
        if r.label in merged:
            m = merged[r.label]
            m.evals.update(r.evals)
            m.path = f"{m.path}, {r.path}"
        else:
            merged[r.label] = Run(r.path, r.label, r.algorithm, list(r.metrics), dict(r.evals))
    return list(merged.values())


def _group(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(SEED_SUFFIX.sub("", r.label), []).append(r)
    return groups


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    m, s = _mean_std(values)
    return f"{m:.3f} ± {s:.3f}" if len(values) > 1 else f"{m:.3f}"


def table(runs: list[Run], columns: Optional[list[str]] = None) -> tuple[list[str], list[list[str]]]:
    """One row per run label (seeds aggregated); columns default to the headline metrics present, or all."""
    groups = _group(runs)
    keys = sorted({k for r in runs for k in r.evals})
    if columns is None:
        columns = [k for k in PREFERRED if k in keys] or keys
    header = ["run", "n"] + columns
    rows = []
    for label, members in groups.items():
        rows.append([label, str(len(members))] + [_fmt([m.evals[c] for m in members if c in m.evals]) for c in columns])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _series(run: Run, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for rec in run.metrics:
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            xs.append(rec["step"])
            ys.append(float(v))
    return xs, ys


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over up to `window` points (the first points average what exists so far)."""
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(runs: list[Run], out_dir: str, curves: dict[str, list[str]] = CURVES, smoothing: int = 1) -> list[str]:
    """One PNG per algorithm (curves_<algorithm>.png): a panel per metric, a line per run. A series of one or a
    few points is drawn with markers (a single point would otherwise be invisible); with smoothing > 1 the raw
    curve is drawn faintly under its moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for algorithm, keys in curves.items():
        members = [r for r in runs if r.algorithm == algorithm]
        keys = [k for k in keys if any(_series(r, k)[0] for r in members)]
        if not keys:
            continue
        ncols = min(3, len(keys))
        nrows = math.ceil(len(keys) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.3 * nrows), squeeze=False)
        for ax in axes.flat[len(keys):]:
            ax.axis("off")
        for ax, key in zip(axes.flat, keys):
            for r in members:
                xs, ys = _series(r, key)
                if not xs:
                    continue
                marker = "o" if len(xs) <= 5 else None
                if smoothing > 1 and len(xs) > smoothing:
                    line, = ax.plot(xs, ys, linewidth=0.8, alpha=0.3)
                    ax.plot(xs, smooth(ys, smoothing), label=r.label, linewidth=1.3, color=line.get_color())
                else:
                    ax.plot(xs, ys, label=r.label, linewidth=1.3, marker=marker, markersize=5)
            ax.set_title(key, fontsize=10)
            ax.set_xlabel("optimizer step", fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{algorithm} training curves", fontsize=11)
        fig.tight_layout()
        path = os.path.join(out_dir, f"curves_{algorithm}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_reward_vs_kl(runs: list[Run], out_dir: str, testbed: str = "assistant",
                      reward_key: Optional[str] = None) -> Optional[str]:
    """Held-out reward against KL to the reference (the SFT model), one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reward_key = reward_key or next((k for k in (f"{testbed}/gold/reward", f"{testbed}/gold", f"{testbed}/rm/score")
                                     if any(k in r.evals for r in runs)), None)
    kl_key = next((k for k in (f"{testbed}/kl/reference", f"{testbed}/kl") if any(k in r.evals for r in runs)),
                  f"{testbed}/kl")
    fig, ax = plt.subplots(figsize=(6, 4))
    drew = False
    for r in runs:
        if reward_key and reward_key in r.evals and kl_key in r.evals:
            ax.scatter([r.evals[kl_key]], [r.evals[reward_key]], s=60, zorder=3)
            ax.annotate(r.label, (r.evals[kl_key], r.evals[reward_key]), textcoords="offset points", xytext=(5, 5),
                        fontsize=8)
            drew = True
    if not drew:
        plt.close(fig)
        return None
    ax.set_xlabel("KL to reference (nats per response)")
    ax.set_ylabel(reward_key or "score")
    ax.set_title(f"{testbed}: reward vs KL")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, f"reward_vs_kl_{testbed}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _distinct_labels(runs: list[Run]) -> list[Run]:
    """For curves, runs sharing a label get the first path component that tells them apart (e.g. the testbed)."""
    by_label: dict[str, list[Run]] = {}
    for r in runs:
        by_label.setdefault(r.label, []).append(r)
    out = []
    for r in runs:
        group = by_label[r.label]
        suffix = ""
        if len(group) > 1:
            parts = [os.path.normpath(g.path).split(os.sep) for g in group]
            mine = os.path.normpath(r.path).split(os.sep)
            suffix = next((p for i, p in enumerate(mine) if len({q[i] if i < len(q) else None for q in parts}) > 1), "")
        out.append(Run(r.path, f"{r.label} ({suffix})" if suffix else r.label, r.algorithm, r.metrics, r.evals))
    return out


def compare_runs(paths: list[str], out_dir: str, labels: Optional[list[str]] = None, title: str = "Run comparison",
                 columns: Optional[list[str]] = None, smoothing: int = 1) -> str:
    """Write report.md (+ report.html) and PNG plots into out_dir; returns the report path."""
    labels = labels or [None] * len(paths)
    runs = [load_run(p, l) for p, l in zip(paths, labels)]
    missing = [r.path for r in runs if not r.evals]
    if len(missing) == len(runs):
        raise FileNotFoundError(
            f"no eval.json in {', '.join(missing)}: evaluate first, e.g. `rlhf eval --model {missing[0]}/final "
            f"--testbed assistant` (it writes {missing[0]}/final/eval/eval.json, which compare reads)")
    os.makedirs(out_dir, exist_ok=True)
    header, rows = table(merge_same_label(runs), columns)
    curves = plot_curves(_distinct_labels(runs), out_dir, smoothing=smoothing)
    scatter = [p for p in (plot_reward_vs_kl(merge_same_label(runs), out_dir, tb) for tb in ("assistant", "code")) if p]
    lines = [f"# {title}", "", "Held-out evaluation (mean ± std over seeds where a run has several):", "",
             markdown_table(header, rows), ""]
    all_header, all_rows = table(merge_same_label(runs), sorted({k for r in runs for k in r.evals}))
    if len(all_header) > len(header):  # every metric, one row per metric, for the curious
        lines += ["<details><summary>All metrics</summary>", "",
                  markdown_table(["metric"] + [r[0] for r in all_rows],
                                 [[m] + [r[i + 2] for r in all_rows] for i, m in enumerate(all_header[2:])]),
                  "", "</details>", ""]
    lines += ["Runs:", ""]
    lines += [f"- `{r.label}`: {r.algorithm or '?'} — `{r.path}`" + ("" if r.evals else " (no eval.json found)")
              for r in runs]
    if scatter or curves:
        lines += ["", "## Plots", ""]
        lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in scatter + curves]
    report = os.path.join(out_dir, "report.md")
    with open(report, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
    _write_html(os.path.join(out_dir, "report.html"), title, header, rows, scatter + curves)
    return report


def _write_html(path: str, title: str, header: list[str], rows: list[list[str]], images: list[str]) -> None:
    import html

    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    imgs = "".join(f'<img src="{html.escape(os.path.basename(p))}" style="max-width:48%">' for p in images)
    with open(path, "w") as f:
        f.write(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
                f"padding:4px 8px}}</style></head><body><h1>{html.escape(title)}</h1><table><tr>{cells}</tr>{body}"
                f"</table>{imgs}</body></html>")


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rlhf compare", description="Compare run folders in a report.")
    p.add_argument("runs", nargs="+", help="Run folders (metrics.jsonl, evals) or model folders evaluated by `rlhf eval`.")
    p.add_argument("--out", default="runs/report", help="Output folder for report.md, report.html and PNGs.")
    p.add_argument("--labels", nargs="*", help="Row labels, one per run (default: folder names).")
    p.add_argument("--title", default="Run comparison")
    p.add_argument("--smooth", type=int, default=1, help="Moving-average window of the training curves (1 = raw).")
    a = p.parse_args(argv)
    if a.labels and len(a.labels) != len(a.runs):
        p.error(f"--labels has {len(a.labels)} names for {len(a.runs)} runs")
    if a.smooth < 1:
        p.error(f"--smooth {a.smooth}: expected a window of at least 1")
    try:
        path = compare_runs(a.runs, a.out, a.labels, a.title, smoothing=a.smooth)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: compare: {e}")
        return 2
    print(f"report written to {path}")
    return 0
