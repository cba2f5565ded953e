"""Compare runs side by side: a markdown table like the paper's, and PNG plots, from local files only.

    rlhf compare runs/sft runs/dpo runs/ppo --out runs/report
    rlhf compare runs/ppo-base-seed* runs/ppo-ema-seed* --out runs/ablation   # seeds -> mean ± std

Each run folder holds metrics.jsonl (training curves) and eval.json (held-out metrics), so a
report needs no network. Runs whose labels differ only by a `-seed<N>` suffix are aggregated.
"""

from .compare import cli, compare_runs, load_run

__all__ = ["cli", "compare_runs", "load_run"]
