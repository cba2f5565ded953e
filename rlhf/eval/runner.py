"""`rlhf eval`: generate on a testbed's held-out prompts, score, write eval.json and eval.md.

    rlhf eval --model runs/ppo/final --testbed assistant --reference runs/sft/final --out runs/ppo/eval
    rlhf eval --model runs/sft/final --testbed code --num-samples 8 --k 1 4 8 --temperature 1.0

`evaluate_model` takes an already loaded model and tokenizer, so a training loop can call the same
code as its eval callback; `evaluate` loads from a folder or hub name and writes the files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from rlhf.eval.code import CodeProblem, evaluate_code, load_humaneval, problem_from_columns
from rlhf.eval.dialogue import (
    distinct_n,
    kl_to_reference,
    mean_judgements,
    pointwise_as_pairwise,
    response_length,
    safety_metrics,
    win_rate,
)
from rlhf.eval.sandbox import SandboxLimits, SandboxUnavailable, check_isolation

TESTBED_CHOICES = ("assistant", "code", "humaneval")
SHOWN_SAMPLES = 8  # responses quoted in eval.md
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")  # HumanEval continuations


@dataclass
class EvalSettings:
    """What to generate and how (one per `rlhf eval` run or eval callback)."""

    testbed: str = "assistant"  # assistant, code or humaneval
    num_samples: int = 1  # responses per prompt (pass@k needs k of them)
    k: list[int] = field(default_factory=lambda: [1])  # pass@k values for code testbeds
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy decoding
    top_p: float = 1.0
    limit: int = 0  # evaluate only the first N prompts (0: all)
    seed: int = 0
    batch_size: int = 32
    data_root: Optional[str] = None  # folder holding <testbed>/prompts_eval.jsonl (default: the checkout's data/)
    unsafe_sandbox: bool = False  # code testbeds: where the kernel refuses namespaces, run programs less isolated


def _sampling(settings: EvalSettings):
    from rlhf.rollout import SamplingConfig

    greedy = settings.temperature <= 0
    return SamplingConfig(max_new_tokens=settings.max_new_tokens, temperature=1.0 if greedy else settings.temperature,
                          top_k=0, top_p=settings.top_p, do_sample=not greedy)


def _prompt_rows(settings: EvalSettings) -> tuple[list[str], dict[str, list[Any]], list[CodeProblem] | None]:
    """Prompts, their extra columns, and (for code testbeds) the problems."""
    if settings.testbed == "humaneval":
        problems = load_humaneval()
        problems = problems[: settings.limit] if settings.limit else problems
        return [p.prompt for p in problems], {}, problems
    from rlhf.testbeds import TESTBEDS

    rows = TESTBEDS[settings.testbed].load("prompts_eval", settings.data_root)
    rows = rows[: settings.limit] if settings.limit else rows
    prompts = [r["prompt"] for r in rows]
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"} if rows else {}
    problems = None
    if settings.testbed == "code":
        problems = [problem_from_columns(p, {k: v[i] for k, v in columns.items()}, i) for i, p in enumerate(prompts)]
    return prompts, columns, problems


def extract_code(text: str, continuation: bool) -> str:
    """The code in a response: a fenced block if there is one; a continuation stops where a new
    top-level statement starts (HumanEval's stop sequences)."""
    fenced = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", text, re.DOTALL)
    if fenced:
        return fenced.group(1)
    if continuation:
        cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
        return text[:cut]
    return text


@torch.no_grad()
def _response_logprobs(model, rollout, batch_size: int) -> torch.Tensor:
    """[B, T-1] log-probs of the rollout's tokens under `model` (temperature 1)."""
    from rlhf.models import token_logprobs

    device = next(model.parameters()).device
    parts = []
    for i in range(0, rollout.input_ids.shape[0], batch_size):
        ids = rollout.input_ids[i:i + batch_size].to(device)
        mask = rollout.attention_mask[i:i + batch_size].to(device)
        parts.append(token_logprobs(model, ids, mask).float().cpu())
    return torch.cat(parts)


def _sampled_kl(model, reference_model, tokenizer, prompts, rollout, settings: EvalSettings) -> float:
    """KL(pi || pi_ref) estimated on responses sampled from pi itself at temperature 1 (mean over samples of the
    summed per-token log-ratio). The evaluated responses serve when they were so sampled; greedy or tempered ones
    do not (their log-ratio is no KL), and fresh ones are drawn, seeded, one per prompt."""
    from rlhf.rollout import SamplingConfig, generate

    sampled = settings.temperature == 1.0 and settings.top_p >= 1.0
    if not sampled:
        torch.manual_seed(settings.seed + 1)
        plain = SamplingConfig(max_new_tokens=settings.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                               do_sample=True)
        rollout = generate(model, tokenizer, prompts, plain, batch_size=settings.batch_size)
    logp = _response_logprobs(model, rollout, settings.batch_size)
    ref_logp = _response_logprobs(reference_model, rollout, settings.batch_size)
    return kl_to_reference(logp, ref_logp, _response_token_mask(rollout))


def _response_token_mask(rollout) -> torch.Tensor:
    """[B, T-1] 1 where the predicted token (t+1) is a response token, aligned with token_logprobs."""
    prompt_width = rollout.prompt_ids.shape[1]
    lead = torch.zeros(rollout.response_mask.shape[0], prompt_width - 1, dtype=rollout.response_mask.dtype)
    return torch.cat([lead, rollout.response_mask.cpu()], dim=1)


def _reward_model_scorer(reward_model: Any) -> Callable[..., list[float]]:
    """A text scorer from a reward model (rlhf.rewards.ModelReward), for win rates: finished responses."""

    def scorer(prompts: Sequence[str], responses: Sequence[str], **_: Any) -> list[float]:
        return reward_model.score_texts(prompts, responses).tolist()

    return scorer


def evaluate_model(
    model,
    tokenizer,
    settings: EvalSettings,
    reward_model: Any = None,
    reference_model=None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Generate on the held-out prompts and score. Returns (metrics, per-sample records).

    reward_model: an rlhf.rewards.ModelReward (it reads the policy's tokens, or the texts when it has a tokenizer
    of its own). reference_model: a causal LM for the KL and the win rate against its own responses.
    """
    from rlhf.rollout import generate

    if settings.testbed not in TESTBED_CHOICES:
        raise ValueError(f"unknown testbed {settings.testbed!r}; choose from {TESTBED_CHOICES}")
    if settings.num_samples > 1 and settings.temperature <= 0:
        raise ValueError("--num-samples > 1 needs sampling: pass --temperature > 0")
    torch.manual_seed(settings.seed)
    prompts, columns, problems = _prompt_rows(settings)
    n = settings.num_samples
    flat_prompts = [p for p in prompts for _ in range(n)]
    flat_columns = {k: [v for v in values for _ in range(n)] for k, values in columns.items()}
    sampling = _sampling(settings)
    rollout = generate(model, tokenizer, flat_prompts, sampling, batch_size=settings.batch_size)
    responses = list(rollout.texts)

    metrics: dict[str, float] = {}
    records = [{"prompt": p, "response": r} for p, r in zip(flat_prompts, responses)]
    if settings.testbed in ("code", "humaneval"):
        continuation = settings.testbed == "humaneval" and not getattr(tokenizer, "chat_template", None)
        codes = [extract_code(r, continuation) for r in responses]
        grouped = [codes[i * n:(i + 1) * n] for i in range(len(prompts))]
        result = evaluate_code(problems, grouped, ks=settings.k, limits=SandboxLimits(unsafe=settings.unsafe_sandbox))
        for key, value in result.items():
            if key.startswith("pass@"):
                metrics[f"code/{key}"] = value
        verdicts = [s for p in problems for s in result["results"][p.task_id]]
        metrics["gold/reward"] = sum(v["passed"] for v in verdicts) / len(verdicts)
        for record, verdict in zip(records, verdicts):
            record.update(passed=verdict["passed"], status=verdict["status"])
    else:
        from rlhf.testbeds import TESTBEDS

        testbed = TESTBEDS[settings.testbed]
        judged = testbed.gold_judge(flat_prompts, responses, **flat_columns)
        rewards = testbed.gold_reward(flat_prompts, responses, **flat_columns)
        means = mean_judgements(judged)
        harmful = flat_columns.get("harmful") or [False] * len(responses)
        safety = safety_metrics([j["helpfulness"] for j in judged], [-j["harmlessness"] for j in judged],
                                [j["is_safe"] for j in judged])
        benign = [j for j, h in zip(judged, harmful) if not h]
        risky = [j for j, h in zip(judged, harmful) if h]
        metrics.update({
            "gold/reward": sum(rewards) / len(rewards),
            "gold/helpfulness": safety["helpfulness"],
            "gold/harmlessness": means["harmlessness"],
            "gold/harm": safety["harm"],
            "gold/safety_rate": safety["safety_rate"],
            "gold/refusal_rate": means["refused"],
        })
        if benign:
            metrics["gold/benign_accuracy"] = sum(j["helpfulness"] == 1 for j in benign) / len(benign)
        if risky:
            metrics["gold/harmful_refusal_rate"] = sum(j["refused"] and j["is_safe"] for j in risky) / len(risky)
        for record, j, r in zip(records, judged, rewards):
            record.update(judge=j, gold_reward=r)

    gold_scorer = None
    if settings.testbed == "assistant":
        from rlhf.testbeds import TESTBEDS

        gold_scorer = TESTBEDS["assistant"].gold_reward
    rm_scorer = None
    if reward_model is not None:
        if reward_model.shares_tokenizer:
            rm_scores = reward_model(rollout.input_ids, rollout.attention_mask).tolist()
        else:
            rm_scores = reward_model.score_texts(flat_prompts, responses, rollout.eos.tolist()).tolist()
        metrics["rm/score"] = sum(rm_scores) / len(rm_scores)
        for record, s in zip(records, rm_scores):
            record["rm_score"] = s
        rm_scorer = _reward_model_scorer(reward_model)

    if reference_model is not None:
        metrics["kl/reference"] = _sampled_kl(model, reference_model, tokenizer, flat_prompts, rollout, settings)
        torch.manual_seed(settings.seed)
        reference_texts = list(generate(reference_model, tokenizer, flat_prompts, sampling,
                                        batch_size=settings.batch_size).texts)
        for name, scorer in (("gold", gold_scorer), ("rm", rm_scorer)):
            if scorer is not None:
                wins = win_rate(flat_prompts, responses, reference_texts, pointwise_as_pairwise(scorer), **flat_columns)
                for key, value in wins.items():
                    metrics[f"win_rate_{name}/vs_reference/{key}"] = value
        for record, text in zip(records, reference_texts):
            record["reference_response"] = text

    metrics["length/words"] = response_length(responses)
    metrics["length/tokens"] = float(rollout.lengths.float().mean())
    metrics["length/truncated_rate"] = float((~rollout.eos).float().mean())
    metrics["distinct/1"] = distinct_n(responses, 1)
    metrics["distinct/2"] = distinct_n(responses, 2)
    metrics["num_prompts"] = float(len(prompts))
    metrics["num_samples"] = float(len(responses))
    return metrics, records


def _load(path: str, tokenizer=None, field: str = "--model"):
    from rlhf.config import ModelConfig
    from rlhf.models import load_causal_lm

    return load_causal_lm(ModelConfig(name_or_path=path), tokenizer, trainable=False, field=field)


def evaluate(
    model: str,
    settings: EvalSettings,
    reward_model: Optional[str] = None,
    reference: Optional[str] = None,
    out: Optional[str] = None,
) -> dict[str, Any]:
    """Load `model` (a folder or hub name, through from_pretrained), evaluate it, and write
    eval.json and eval.md into `out` when given. Returns the eval.json content."""
    from rlhf.models import load_tokenizer

    if settings.testbed in ("code", "humaneval"):
        check_isolation(settings.unsafe_sandbox)  # before minutes of loading and generating
    tokenizer = load_tokenizer(model, field="--model")
    policy = _load(model, tokenizer)
    reference_model = _load(reference, tokenizer, "--reference") if reference else None
    scorer = None
    if reward_model:
        from rlhf.rewards import ModelReward

        scorer = ModelReward(reward_model, tokenizer=tokenizer, batch_size=settings.batch_size)
    metrics, records = evaluate_model(policy, tokenizer, settings, scorer, reference_model)
    report = {
        "model": model,
        "testbed": settings.testbed,
        "reward_model": reward_model,
        "reference": reference,
        "settings": asdict(settings),
        "metrics": metrics,
        "samples": records,
    }
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "eval.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
        with open(os.path.join(out, "eval.md"), "w", encoding="utf-8") as f:
            f.write(markdown_summary(report))
    return report


def markdown_summary(report: dict[str, Any]) -> str:
    """A short human-readable summary: the settings, every metric, and a few samples."""
    s = report["settings"]
    lines = [
        f"# Evaluation: {report['testbed']}",
        "",
        f"- model: `{report['model']}`",
        f"- reference: `{report['reference']}`" if report.get("reference") else "- reference: none",
        f"- reward model: `{report['reward_model']}`" if report.get("reward_model") else "- reward model: none",
        f"- decoding: {'greedy' if s['temperature'] <= 0 else 'temperature %g' % s['temperature']}, "
        f"{s['num_samples']} sample(s) per prompt, at most {s['max_new_tokens']} new tokens, seed {s['seed']}",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" for k, v in report["metrics"].items()]
    lines += ["", "See docs/eval.md for what each metric means.", "", "## Samples", ""]
    for record in report["samples"][:SHOWN_SAMPLES]:
        verdict = {k: v for k, v in record.items() if k not in ("prompt", "response", "reference_response")}
        lines += [f"**Prompt:** {record['prompt'].strip()[:300]}", "",
                  "```", record["response"].strip()[:500], "```", f"{verdict}", ""]
    return "\n".join(lines) + "\n"


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rlhf eval",
                                description="Evaluate a model on a testbed; writes eval.json and eval.md.")
    p.add_argument("--model", required=True, help="Policy folder or hub name (from_pretrained).")
    p.add_argument("--testbed", required=True, choices=TESTBED_CHOICES, help="Held-out prompts and their scoring.")
    p.add_argument("--reward-model", default=None,
                   help="Reward model folder (its own tokenizer, if it has one, reads the texts): adds rm/score and an "
                        "RM-judged win rate.")
    p.add_argument("--reference", default=None,
                   help="Reference policy folder: adds kl/reference and win rates against its responses.")
    p.add_argument("--out", default=None, help="Output folder for eval.json and eval.md (default: <model>/eval).")
    p.add_argument("--num-samples", type=int, default=1, help="Responses per prompt.")
    p.add_argument("--k", type=int, nargs="+", default=[1], help="pass@k values (code testbeds).")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily.")
    p.add_argument("--limit", type=int, default=0, help="Evaluate only the first N prompts.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--unsafe-sandbox", action="store_true",
                   help="Code testbeds: where the kernel refuses the namespaces that give each program a private "
                        "/tmp, run programs without them (a warning says so) instead of stopping. Files they write "
                        "to /tmp, /var/tmp or /dev/shm then outlive the run.")
    a = p.parse_args(argv)
    settings = EvalSettings(testbed=a.testbed, num_samples=a.num_samples, k=a.k, max_new_tokens=a.max_new_tokens,
                            temperature=a.temperature, limit=a.limit, seed=a.seed, batch_size=a.batch_size,
                            unsafe_sandbox=a.unsafe_sandbox)
    out = a.out or os.path.join(a.model if os.path.isdir(a.model) else ".", "eval")
    try:
        report = evaluate(a.model, settings, a.reward_model, a.reference, out)
    except SandboxUnavailable as e:
        print(f"error: sandbox: {e}", file=sys.stderr)
        return 2
    width = max(len(k) for k in report["metrics"])
    for key, value in report["metrics"].items():
        print(f"{key:<{width}}  {value:.4f}")
    print(f"wrote {os.path.join(out, 'eval.json')} and eval.md")
    return 0
