"""Dialogue metrics against numbers worked out by hand."""

import pytest
import torch

from rlhf.eval.dialogue import (
    distinct_n,
    kl_to_reference,
    mean_judgements,
    mean_score,
    pointwise_as_pairwise,
    response_length,
    safety_metrics,
    win_rate,
)


def length_scorer(prompts, responses, **columns):
    return [float(len(r)) for r in responses]


def test_mean_score_passes_columns():
    def scorer(prompts, responses, bonus):
        return [len(r) + b for r, b in zip(responses, bonus)]

    # (1 + 10) + (3 + 0) = 14, / 2 = 7
    assert mean_score(["p", "q"], ["a", "abc"], scorer, bonus=[10, 0]) == pytest.approx(7.0)


def test_mean_judgements_averages_numbers_and_rates_booleans():
    judged = [{"helpfulness": 1.0, "is_safe": True, "note": "x"}, {"helpfulness": -1.0, "is_safe": False, "note": "y"},
              {"helpfulness": 0.0, "is_safe": True, "note": "z"}]
    # helpfulness (1 - 1 + 0) / 3 = 0; is_safe 2/3; strings ignored
    assert mean_judgements(judged) == {"helpfulness": 0.0, "is_safe": pytest.approx(2 / 3)}


def test_win_rate_with_a_pointwise_scorer():
    judge = pointwise_as_pairwise(length_scorer)
    prompts = ["p1", "p2", "p3", "p4"]
    responses = ["long answer", "ab", "same", "x"]
    references = ["short", "abcd", "four", "yyyyyy"]
    # lengths 11 v 5 win; 2 v 4 loss; 4 v 4 tie; 1 v 6 loss -> W/T/L = 1/1/2 of 4
    out = win_rate(prompts, responses, references, judge)
    assert out == {"win": 0.25, "tie": 0.25, "loss": 0.5, "win_rate": 0.25 + 0.125, "order_disagreement": 0.0}


def test_win_rate_counts_order_disagreement_as_tie():
    # A judge with position bias: it always prefers whatever comes first.
    def first_wins(prompts, first, second):
        return [1] * len(prompts)

    out = win_rate(["p", "q"], ["a", "b"], ["c", "d"], first_wins)
    # Both orders disagree on both pairs -> 2 ties of 2: win_rate 0.5
    assert out == {"win": 0.0, "tie": 1.0, "loss": 0.0, "win_rate": 0.5, "order_disagreement": 1.0}

    # A judge that only agrees with itself on the first pair.
    def biased_on_second(prompts, first, second):
        return [1 if f == "a" else -1 if s == "a" else 1 for f, s in zip(first, second)]

    out = win_rate(["p", "q"], ["a", "b"], ["c", "d"], biased_on_second)
    # pair 1: forward +1, backward judge(c, a) = -1 -> +1 for responses: both say win.
    # pair 2: forward judge(b, d) = +1, backward judge(d, b) = +1 -> -1: disagree -> tie.
    assert out["win"] == 0.5 and out["tie"] == 0.5 and out["order_disagreement"] == 0.5


def test_kl_to_reference_tensors_and_lists():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -0.2, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # sample 1: (0.5) + (-1.0) + 0 = -0.5; sample 2: 0.2 + 0 (+ masked) = 0.2 -> mean -0.15
    assert kl_to_reference(logp, ref, mask) == pytest.approx(-0.15)
    # ragged lists, same numbers without the masked token
    ragged = kl_to_reference([[-1.0, -2.0, -0.5], [-0.1, -0.2]], [[-1.5, -1.0, -0.5], [-0.3, -0.2]])
    assert ragged == pytest.approx(-0.15)


def test_response_length_and_distinct_n():
    responses = ["the cat sat", "the cat ran away"]
    # words: 3 and 4 -> 3.5
    assert response_length(responses) == 3.5
    # unigrams: the cat sat the cat ran away -> 7 total, unique {the, cat, sat, ran, away} = 5
    assert distinct_n(responses, 1) == pytest.approx(5 / 7)
    # bigrams: (the cat)(cat sat)(the cat)(cat ran)(ran away) -> 5 total, 4 unique
    assert distinct_n(responses, 2) == pytest.approx(4 / 5)
    assert distinct_n(["one"], 2) == 0.0


def test_response_length_with_a_tokenizer():
    class Chars:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text)}

    assert response_length(["ab", "abcd"], Chars()) == 3.0


def test_safety_metrics():
    # helpfulness mean (2 - 1 + 0 + 3) / 4 = 1; harm mean (1 - 2 - 1 + 0) / 4 = -0.5;
    # safe when harm <= 0: 3 of 4
    out = safety_metrics([2, -1, 0, 3], [1, -2, -1, 0], baseline_helpfulness=1.5)
    assert out == {"helpfulness": 1.0, "harm": -0.5, "safety_rate": 0.75, "delta_helpfulness": -0.5}
    assert safety_metrics([0, 0], [1, 1], is_safe=[True, False])["safety_rate"] == 0.5
