"""Dialogue metrics: pure functions over lists of prompts and responses.

Scorer:        scorer(prompts, responses, **columns) -> list[float]   (reward model, gold reward)
PairwiseJudge: judge(prompts, first, second, **columns) -> list[int]   (+1 first better, -1 second
               better, 0 tie)

Win rates judge every pair twice, once in each order; an outcome counts only when both orders agree,
and a disagreement counts as a tie (position bias of LLM judges, as in the paper's GPT-4 W-T-L).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Scorer = Callable[..., Sequence[float]]
PairwiseJudge = Callable[..., Sequence[int]]


def _mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("no values to average")
    return sum(values) / len(values)


def mean_score(prompts: Sequence[str], responses: Sequence[str], scorer: Scorer, **columns: Sequence[Any]) -> float:
    """Mean of a pointwise scorer (e.g. a reward model) over the responses."""
    scores = list(scorer(list(prompts), list(responses), **columns))
    if len(scores) != len(responses):
        raise ValueError(f"scorer returned {len(scores)} scores for {len(responses)} responses")
    return _mean([float(s) for s in scores])


def mean_judgements(judgements: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Average every numeric or boolean key of per-sample judge dicts (booleans become rates)."""
    if not judgements:
        raise ValueError("no judgements to average")
    keys = [k for k, v in judgements[0].items() if isinstance(v, (int, float, bool))]
    return {k: _mean([float(j[k]) for j in judgements]) for k in keys}


def pointwise_as_pairwise(scorer: Scorer, margin: float = 0.0) -> PairwiseJudge:
    """A pairwise judge from a pointwise scorer: the higher score wins unless within `margin`."""

    def judge(prompts: Sequence[str], first: Sequence[str], second: Sequence[str],
              **columns: Sequence[Any]) -> list[int]:
        a = list(scorer(list(prompts), list(first), **columns))
        b = list(scorer(list(prompts), list(second), **columns))
        return [1 if x - y > margin else -1 if y - x > margin else 0 for x, y in zip(a, b)]

    return judge


def win_rate(
    prompts: Sequence[str],
    responses: Sequence[str],
    references: Sequence[str],
    judge: PairwiseJudge,
    **columns: Sequence[Any],
) -> dict[str, float]:
    """Win/tie/loss of `responses` against `references` (a reference model's or the dataset's
    chosen responses), each pair judged in both orders.

    Returns fractions {"win", "tie", "loss"}, "win_rate" = win + tie / 2, and "order_disagreement",
    the fraction of pairs whose two orders disagreed (counted as ties).
    """
    n = len(prompts)
    if not (len(responses) == len(references) == n) or n == 0:
        raise ValueError(f"need equal non-empty lists, got {n}, {len(responses)}, {len(references)}")
    forward = list(judge(list(prompts), list(responses), list(references), **columns))
    backward = list(judge(list(prompts), list(references), list(responses), **columns))
    win = tie = loss = disagree = 0
    for f, b in zip(forward, backward):
        f, b = _sign(f), -_sign(b)  # both now from the responses' side
        if f != b:
            disagree += 1
            tie += 1
        elif f > 0:
            win += 1
        elif f < 0:
            loss += 1
        else:
            tie += 1
    return {
        "win": win / n,
        "tie": tie / n,
        "loss": loss / n,
        "win_rate": (win + tie / 2) / n,
        "order_disagreement": disagree / n,
    }


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def kl_to_reference(logprobs: Any, ref_logprobs: Any, mask: Any = None) -> float:
    """Mean over samples of sum_t [log pi(y_t|...) - log pi_ref(y_t|...)] on response tokens.

    Accepts [B, T] tensors (with a 0/1 `mask` over response tokens) or lists of per-sample lists of
    per-token log-probs (ragged; then `mask` may be omitted). This is the sampled-sequence estimate
    of KL(pi || pi_ref) when the responses were drawn from pi.
    """
    if hasattr(logprobs, "dim"):  # torch tensors
        from rlhf.ops import masked_sum

        diff = logprobs.float() - ref_logprobs.float()
        if mask is None:
            return float(diff.sum(dim=-1).mean())
        return float(masked_sum(diff, mask.to(diff.dtype), dim=-1).mean())
    totals = []
    for i, (lp, ref) in enumerate(zip(logprobs, ref_logprobs)):
        if len(lp) != len(ref):
            raise ValueError(f"sample {i}: {len(lp)} policy vs {len(ref)} reference log-probs")
        weights = mask[i] if mask is not None else [1] * len(lp)
        totals.append(sum(w * (a - b) for a, b, w in zip(lp, ref, weights)))
    return _mean(totals)


def response_length(responses: Sequence[str], tokenizer: Any = None) -> float:
    """Mean response length in tokens (with a tokenizer) or in whitespace-separated words."""
    if tokenizer is not None:
        lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses]
    else:
        lengths = [len(r.split()) for r in responses]
    return _mean(lengths)


def distinct_n(responses: Sequence[str], n: int) -> float:
    """distinct-n (Li et al. 2016): unique n-grams / total n-grams over all responses (words)."""
    grams = []
    for response in responses:
        words = response.split()
        grams += [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def safety_metrics(
    helpfulness: Sequence[float],
    harm: Sequence[float],
    is_safe: Sequence[bool] | None = None,
    baseline_helpfulness: float | None = None,
) -> dict[str, float]:
    """PKU-SafeRLHF's reporting: mean helpfulness (or its change over a baseline), mean harm
    (cost: lower is better) and the safety rate (fraction judged safe; default harm <= 0)."""
    if not (len(helpfulness) == len(harm)) or not harm:
        raise ValueError("need equal non-empty helpfulness and harm lists")
    safe = list(is_safe) if is_safe is not None else [h <= 0 for h in harm]
    out = {
        "helpfulness": _mean(helpfulness),
        "harm": _mean(harm),
        "safety_rate": _mean([float(s) for s in safe]),
    }
    if baseline_helpfulness is not None:
        out["delta_helpfulness"] = out["helpfulness"] - baseline_helpfulness
    return out


def score_std(scores: Sequence[float]) -> float:
    """Population standard deviation, for reporting the spread next to a mean score."""
    m = _mean(scores)
    return math.sqrt(_mean([(s - m) ** 2 for s in scores]))
