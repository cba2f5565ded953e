"""Code benchmarks through the sandbox: HumanEval's canonical solutions, hub-format MBPP / APPS /
CodeContests rows, pass@k aggregation and the execution reward."""

import os

import pytest

from rlhf.eval.code import (
    WRONG_ANSWER,
    check_completion,
    evaluate_code,
    execution_reward,
    load_code_problems,
    load_humaneval,
    make_execution_reward,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "eval")


@pytest.fixture(scope="module")
def humaneval():
    return load_humaneval()


def test_humaneval_program_layout(humaneval):
    assert len(humaneval) == 164
    p = humaneval[0]
    assert p.task_id == "HumanEval/0" and p.entry_point == "has_close_elements"
    assert p.program("    return 1\n") == p.prompt + "    return 1\n" + "\n" + p.test_code + "\n"
    assert p.test_code.endswith("check(has_close_elements)")


def test_humaneval_canonical_solutions_all_pass(humaneval):
    result = evaluate_code(humaneval, [[p.reference_solution] for p in humaneval], ks=[1])
    assert result["status_counts"] == {"passed": 164}
    assert result["pass@1"] == 1.0


def test_humaneval_empty_completions_score_zero(humaneval):
    result = evaluate_code(humaneval, [[""] for _ in humaneval], ks=[1])
    assert result["pass@1"] == 0.0 and result["num_samples"] == 164


def load(name, tmp_path):
    return load_code_problems(os.path.join(FIXTURES, f"{name}.jsonl"), name, cache_dir=str(tmp_path))


def test_mbpp_rows(tmp_path):
    problems = load("mbpp", tmp_path)
    assert [p.task_id for p in problems] == ["mbpp/901", "mbpp/902", "mbpp/903"]
    assert [p.entry_point for p in problems] == ["sum_squares", "common", "hypot"]
    assert "assert sum_squares([1, 2, 3]) == 14" in problems[0].prompt  # tests are shown, as usual
    assert problems[2].test_code.startswith("import math\n")  # test_setup_code runs first
    for p in problems:
        assert check_completion(p, p.reference_solution).passed, p.task_id
    wrong = check_completion(problems[0], "def sum_squares(xs):\n    return sum(xs)\n")
    assert not wrong.passed and "AssertionError" in wrong.detail


def test_apps_rows(tmp_path):
    problems = load("apps", tmp_path)
    assert [p.task_id for p in problems] == ["apps/4001", "apps/4002", "apps/4003"]  # 4004 has no tests
    stdio, call, leetcode = problems
    assert stdio.is_stdio and stdio.stdio_tests == [("1 2\n", "3\n"), ("10 -3\n", "7\n")]
    assert "Use Standard Input format" in stdio.prompt and "Use Call-Based format" in call.prompt
    assert call.entry_point == "count_vowels" and leetcode.difficulty == "interview"
    for p in problems:
        assert check_completion(p, p.reference_solution).passed, p.task_id
    # outputs [[3], [0]] wrap the single result: 3 itself must count, 4 must not
    assert not check_completion(call, "def count_vowels(s):\n    return 4\n").passed
    assert check_completion(call, "def count_vowels(s):\n    return [3, 0][s == '']\n").passed
    # a tuple result compares as a list against [1, 3]
    zeros = "class Solution:\n    def minMax(self, nums):\n        return (0, 0)\n"
    assert not check_completion(leetcode, zeros).passed
    wrong = check_completion(stdio, "a, b = map(int, input().split())\nprint(a - b)\n")
    assert wrong.status == WRONG_ANSWER and "expected '3\\n'" in wrong.detail


def test_codecontests_rows(tmp_path):
    problems = load("codecontests", tmp_path)
    double, longest = problems
    assert double.task_id == "codecontests/1000_A. Double It"
    # public + private tests by default: 1 + 2; generated ones left out
    assert double.stdio_tests == [("3\n1 2 3\n", "2 4 6\n"), ("1\n-5\n", "-10\n"), ("2\n0 7\n", "0 14\n")]
    assert double.time_limit_s == 2.0 and longest.time_limit_s == 1.5
    assert double.reference_solution.startswith("input()")  # the python3 one (language 3), not C++
    for p in problems:
        assert check_completion(p, p.reference_solution).passed, p.task_id
    wrong = check_completion(double, "input()\nprint(*input().split())\n")  # the row's incorrect solution
    assert wrong.status == WRONG_ANSWER
    # trailing spaces and a missing final newline do not matter
    assert check_completion(longest, "import sys\nsys.stdout.write(max(input().split(), key=len) + '  ')\n").passed


def test_pass_at_k_over_samples():
    problems = load_humaneval()[:2]
    good = [p.reference_solution for p in problems]
    samples = [[good[0], "    return None\n"], ["    return None\n", "    return None\n"]]
    result = evaluate_code(problems, samples, ks=[1, 2])
    # problem 0: 1 of 2 pass -> pass@1 0.5, pass@2 1; problem 1: 0 -> mean 0.25 and 0.5
    assert result["pass@1"] == pytest.approx(0.25) and result["pass@2"] == pytest.approx(0.5)
    assert [s["passed"] for s in result["results"]["HumanEval/0"]] == [True, False]


def test_execution_reward_from_columns():
    prompts = ["Write add(a, b).", "Write add(a, b).", "Echo the input."]
    completions = ["def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b", "print(input())"]
    columns = dict(
        tests=[["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "assert add(1, 2) == 3", ""],
        entry_point=["add", "add", None],
        inputs=[[], [], ["hello\n"]],
        outputs=[[], [], ["hello\n"]],
    )
    assert execution_reward(prompts, completions, **columns) == [1.0, 0.0, 1.0]
    ten = make_execution_reward(pass_reward=10.0, fail_reward=-1.0)
    assert ten(prompts[:2], completions[:2], tests=columns["tests"][:2]) == [10.0, -1.0]
    with pytest.raises(ValueError):
        execution_reward(prompts, completions, tests=["x"])


def test_execution_reward_humaneval_style_check(humaneval):
    p = humaneval[2]  # truncate_number: tests define check(candidate)
    reward = execution_reward(
        [p.prompt, p.prompt], [p.reference_solution, "    return 0.0\n"],
        tests=[p.test_code.rsplit("\ncheck(", 1)[0]] * 2, entry_point=[p.entry_point] * 2,
        code_prefix=[p.prompt] * 2,
    )
    assert reward == [1.0, 0.0]
