"""The code testbed: one-line Python functions from templated families, judged by unit tests.

Each task is a function (add_3, is_even, max_list, count_a, clamp_0_9, ...) with a one-line
correct body, a few plausible flawed bodies (off-by-one, wrong operator, wrong element) and assert
lines that tell them apart. Prompts are (phrasing template, task) pairs; each task keeps two
phrasings for evaluation only. As in the assistant testbed, about a third of the tasks carry a
fixed flaw in most of their SFT demos, so an SFT model learns those bugs; preference pairs are
labelled by running the tests.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlhf.eval.code import make_execution_reward


@dataclass(frozen=True)
class Task:
    name: str  # the entry point
    args: str  # "x", "xs", "s", "x, y"
    does: str  # what it returns, as words after "that"
    body: str  # correct return expression
    flaws: tuple[str, ...]  # flawed return expressions
    cases: tuple[str, ...]  # argument lists for the tests

    @property
    def signature(self) -> str:
        return f"{self.name}({self.args})"

    def source(self, body: str | None = None) -> str:
        return f"def {self.signature}:\n    return {body or self.body}"

    def tests(self) -> str:
        if self.name not in _TESTS:
            _TESTS[self.name] = self._make_tests()
        return _TESTS[self.name]

    def _make_tests(self) -> str:
        lines = []
        for case in self.cases:
            expected = _evaluate(self.source(), self.name, case)
            lines.append(f"assert {self.name}({case}) == {expected!r}")
        return "\n".join(lines)


def _evaluate(source: str, name: str, case: str) -> Any:
    """Run our own generated code (trusted) in-process."""
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    return eval(f"{name}({case})", namespace)


_TESTS: dict[str, str] = {}
_PASSES: dict[tuple[str, str], bool] = {}


def passes(task: Task, completion: str) -> bool:
    """Whether `completion` passes the task's tests, run in-process: only for code we generated."""
    key = (task.name, completion)
    if key not in _PASSES:
        try:
            exec(completion + "\n" + task.tests(), {})
            _PASSES[key] = True
        except Exception:
            _PASSES[key] = False
    return _PASSES[key]


NUMBERS = ("0", "5", "-3", "12")
LISTS = ("[3, 1, 2]", "[5]", "[-1, -7, 4, 0]", "[2, 9, 9, 1]")
STRINGS = ("'banana'", "'abc'", "''", "'cabbage'")


def _tasks() -> list[Task]:
    tasks = []
    for k in range(1, 13):
        tasks.append(Task(f"add_{k}", "x", f"returns x plus {k}", f"x + {k}",
                          (f"x + {k + 1}", f"x - {k}"), NUMBERS))
        tasks.append(Task(f"sub_{k}", "x", f"returns x minus {k}", f"x - {k}",
                          (f"x - {k + 1}", f"x + {k}"), NUMBERS))
    for k in range(2, 13):
        tasks.append(Task(f"mul_{k}", "x", f"returns x times {k}", f"x * {k}",
                          (f"x * {k + 1}", f"x + {k}"), NUMBERS))
    for k in range(3, 8):
        tasks.append(Task(f"is_div_{k}", "x", f"returns True if x is divisible by {k}",
                          f"x % {k} == 0", (f"x % {k + 1} == 0", f"x % {k} == 1"),
                          ("0", str(k), str(k + 1), str(2 * k), "7")))
    for c in "abcde":
        tasks.append(Task(f"count_{c}", "s", f"returns how many times '{c}' appears in s",
                          f"s.count('{c}')", (f"s.count('{c}') + 1", "len(s)"),
                          ("'banana'", "'abcde'", "''", "'cabbage dd eee'")))
    for lo, hi in ((0, 9), (0, 5), (1, 10), (2, 8)):
        tasks.append(Task(f"clamp_{lo}_{hi}", "x", f"returns x limited to {lo} to {hi}",
                          f"max({lo}, min({hi}, x))", (f"max({lo}, min({hi - 1}, x))", f"min({lo}, max({hi}, x))"),
                          (str(lo - 2), str(lo), str((lo + hi) // 2), str(hi), str(hi + 3))))
    for k in (2, 3, 4):
        tasks.append(Task(f"repeat_{k}", "s", f"returns s repeated {k} times", f"s * {k}",
                          (f"s * {k + 1}", f"s + '{k}'"), STRINGS))
    tasks += [
        Task("is_even", "x", "returns True if x is even", "x % 2 == 0", ("x % 2 == 1", "x > 0"),
             ("0", "3", "4", "-2", "7")),
        Task("is_odd", "x", "returns True if x is odd", "x % 2 == 1", ("x % 2 == 0", "x < 0"),
             ("0", "3", "4", "-3", "7")),
        Task("is_pos", "x", "returns True if x is positive", "x > 0", ("x >= 0", "x < 0"), ("0", "5", "-3")),
        Task("is_neg", "x", "returns True if x is negative", "x < 0", ("x <= 0", "x > 0"), ("0", "5", "-3")),
        Task("square", "x", "returns x squared", "x * x", ("x + x", "x * x * x"), NUMBERS),
        Task("cube", "x", "returns x cubed", "x * x * x", ("x * x", "x * 3"), NUMBERS),
        Task("max_list", "xs", "returns the largest item of xs", "max(xs)", ("min(xs)", "xs[0]"), LISTS),
        Task("min_list", "xs", "returns the smallest item of xs", "min(xs)", ("max(xs)", "xs[-1]"), LISTS),
        Task("first", "xs", "returns the first item of xs", "xs[0]", ("xs[1]", "xs[-1]"),
             ("[3, 1, 2]", "[7, 8]", "[-1, -7, 4, 0]")),
        Task("last", "xs", "returns the last item of xs", "xs[-1]", ("xs[-2]", "xs[0]"),
             ("[3, 1, 2]", "[7, 8]", "[-1, -7, 4, 0]")),
        Task("len_list", "xs", "returns the number of items in xs", "len(xs)", ("len(xs) - 1", "sum(xs)"), LISTS),
        Task("sum_list", "xs", "returns the sum of xs", "sum(xs)", ("sum(xs[1:])", "max(xs)"), LISTS),
        Task("reverse", "s", "returns s reversed", "s[::-1]", ("s[1:]", "s"), STRINGS),
        Task("upper", "s", "returns s in capital letters", "s.upper()", ("s.lower()", "s.title()"),
             ("'banana'", "'Abc'", "'cabbage'")),
        Task("add_xy", "x, y", "returns x plus y", "x + y", ("x - y", "x + y + 1"), ("1, 2", "0, 0", "-3, 5")),
        Task("mul_xy", "x, y", "returns x times y", "x * y", ("x + y", "x * y + 1"), ("2, 3", "0, 4", "-3, 5")),
        Task("max_xy", "x, y", "returns the larger of x and y", "max(x, y)", ("min(x, y)", "x"),
             ("1, 2", "4, 4", "-3, -5")),
    ]
    return tasks


TASKS = _tasks()
BY_NAME = {t.name: t for t in TASKS}
TEMPLATES = (
    "Write a function {sig} that {does}.",
    "Define {sig} so that it {does}.",
    "Implement {sig}: it {does}.",
    "Write {sig}, which {does}.",
    "Create a function {sig} that {does}.",
    "Give me Python code for {sig} that {does}.",
)
EVAL_TEMPLATES_PER_TASK = 2
MISCONCEPTION_RATE = 0.35
CLEAN_TASK_MIX = (0.85, 0.0, 0.15)  # (correct, the task's fixed flaw, another flaw)
FLAWED_TASK_MIX = (0.35, 0.60, 0.05)
SIZES = {"sft": 2000, "prefs": 2000, "prompts_train": 256, "prompts_eval": 128}


def _prompt(template: str, task: Task) -> str:
    return template.format(sig=task.signature, does=task.does)


def gold_judge(prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]) -> list[dict[str, Any]]:
    """Per-sample {"passed": bool}: the completion passes the task's tests in the sandbox.
    Needs the `tests` column (and takes `entry_point`), as in prompts_*.jsonl."""
    rewards = _execution(prompts, completions, **_code_columns(columns))
    return [{"passed": r > 0} for r in rewards]


_execution = make_execution_reward()


def _code_columns(columns: dict[str, Sequence[Any]]) -> dict[str, Sequence[Any]]:
    return {k: v for k, v in columns.items() if k in ("tests", "entry_point", "task_id", "code_prefix")}


def gold_reward(prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]) -> list[float]:
    """1.0 when the completion passes the task's tests in the sandbox, else 0.0."""
    return _execution(prompts, completions, **_code_columns(columns))


def build(rng: random.Random) -> dict[str, list[dict[str, Any]]]:
    """All rows of the testbed's files, drawn from `rng` (same seed, same bytes)."""
    train, evaluation, plans = [], [], {}
    for task in TASKS:
        bad = [f for f in task.flaws if not passes(task, task.source(f))]
        if len(bad) != len(task.flaws) or not passes(task, task.source()):
            raise AssertionError(f"{task.name}: tests do not separate the correct body from its flaws")
        templates = list(TEMPLATES)
        rng.shuffle(templates)
        row = {"entry_point": task.name, "tests": task.tests()}
        for j, template in enumerate(templates):
            target = evaluation if j < EVAL_TEMPLATES_PER_TASK else train
            target.append({"prompt": _prompt(template, task), **row})
        plans[task.name] = (rng.random() < MISCONCEPTION_RATE, rng.choice(task.flaws))

    def demo(task: Task) -> str:
        flawed_task, fixed_flaw = plans[task.name]
        mix = FLAWED_TASK_MIX if flawed_task else CLEAN_TASK_MIX
        pick = rng.choices(("correct", "fixed", "other"), weights=mix)[0]
        if pick == "correct":
            return task.source()
        return task.source(fixed_flaw if pick == "fixed" else rng.choice(task.flaws))

    sft = []
    for _ in range(SIZES["sft"]):
        row = rng.choice(train)
        sft.append({"prompt": row["prompt"], "response": demo(BY_NAME[row["entry_point"]])})

    prefs = []
    while len(prefs) < SIZES["prefs"]:
        row = rng.choice(train)
        task = BY_NAME[row["entry_point"]]
        first = demo(task)
        second = rng.choice([task.source()] + [task.source(f) for f in task.flaws])
        ok_first, ok_second = passes(task, first), passes(task, second)  # labelled by the tests
        if ok_first == ok_second:
            continue
        chosen, rejected = (first, second) if ok_first else (second, first)
        prefs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})

    prompts_train = rng.sample(train, SIZES["prompts_train"])
    prompts_eval = rng.sample(evaluation, SIZES["prompts_eval"])
    return {"sft": sft, "prefs": prefs, "prompts_train": prompts_train, "prompts_eval": prompts_eval}
