"""The shared evaluation harness (docs/eval.md): pass@k, the code sandbox, code benchmarks and the
execution reward, dialogue metrics, and the `rlhf eval` runner (rlhf.eval.runner, imported on use)."""

from rlhf.eval.code import CodeProblem, evaluate_code, execution_reward, load_code_problems, make_execution_reward
from rlhf.eval.passk import mean_pass_at_k, pass_at_k, pass_at_k_table
from rlhf.eval.sandbox import SandboxLimits, SandboxResult, run_program, run_programs

__all__ = [
    "CodeProblem", "SandboxLimits", "SandboxResult", "evaluate_code", "execution_reward", "load_code_problems",
    "make_execution_reward", "mean_pass_at_k", "pass_at_k", "pass_at_k_table", "run_program", "run_programs",
]
