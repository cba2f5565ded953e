"""The eval runner: metric assembly checked by hand with scripted responses, and `rlhf eval` end to
end on a saved tiny model."""

import json
import os

import pytest
import torch

import rlhf.rollout
from rlhf.eval.runner import EvalSettings, cli, evaluate_model, extract_code
from rlhf.rollout import Rollout
from rlhf.testbeds import TESTBEDS, assistant, code


def scripted(answer):
    """A stand-in for rollout.generate that answers each prompt with answer(prompt)."""

    def generate(model, tokenizer, prompts, sampling, batch_size=32):
        B = len(prompts)
        ones = torch.ones(B, 1, dtype=torch.long)
        return Rollout(prompt_ids=ones, prompt_mask=ones, response_ids=ones, response_mask=ones,
                       eos=torch.ones(B, dtype=torch.bool), texts=[answer(p) for p in prompts])

    return generate


def test_assistant_metrics_with_perfect_answers(monkeypatch):
    def perfect(prompt):
        category, item = assistant.lookup_prompt(prompt)
        return assistant.correct_response(assistant.BY_NAME[category], item)

    monkeypatch.setattr(rlhf.rollout, "generate", scripted(perfect))
    metrics, records = evaluate_model(None, None, EvalSettings(testbed="assistant"))
    # 96 benign prompts score 1 + 1, 32 harmful ones 0 + 1: (96 * 2 + 32) / 128 = 1.75
    assert metrics["gold/reward"] == pytest.approx(1.75)
    assert metrics["gold/helpfulness"] == pytest.approx(96 / 128)
    assert metrics["gold/harm"] == -1.0 and metrics["gold/safety_rate"] == 1.0
    assert metrics["gold/refusal_rate"] == pytest.approx(32 / 128)
    assert metrics["gold/benign_accuracy"] == 1.0 and metrics["gold/harmful_refusal_rate"] == 1.0
    assert metrics["length/tokens"] == 1.0 and len(records) == 128


def test_assistant_metrics_when_complying_with_everything(monkeypatch):
    monkeypatch.setattr(rlhf.rollout, "generate", scripted(lambda p: "Sure! First, use a thin wire."))
    metrics, _ = evaluate_model(None, None, EvalSettings(testbed="assistant", limit=40))
    rows = TESTBEDS["assistant"].load("prompts_eval")[:40]
    harmful = sum(r["harmful"] for r in rows)
    # every response carries compliance steps: harmlessness -1 everywhere, nothing safe, no right answer
    assert metrics["gold/harm"] == 1.0 and metrics["gold/safety_rate"] == 0.0
    assert metrics["gold/helpfulness"] == 0.0 and metrics["gold/reward"] == -1.0
    assert metrics["gold/harmful_refusal_rate"] == 0.0 and harmful > 0


def test_code_metrics_pass_at_k(monkeypatch):
    calls = {"n": 0}

    def answer(prompt):  # alternate right and flawed bodies: 1 of each prompt's 2 samples passes
        task = code.BY_NAME[prompt.split("(")[0].split()[-1]]
        calls["n"] += 1
        return task.source() if calls["n"] % 2 else task.source(task.flaws[0])

    monkeypatch.setattr(rlhf.rollout, "generate", scripted(answer))
    settings = EvalSettings(testbed="code", limit=6, num_samples=2, temperature=1.0, k=[1, 2])
    metrics, records = evaluate_model(None, None, settings)
    # each prompt: n = 2, c = 1 -> pass@1 = 1/2, pass@2 = 1
    assert metrics["code/pass@1"] == pytest.approx(0.5) and metrics["code/pass@2"] == pytest.approx(1.0)
    assert metrics["gold/reward"] == pytest.approx(0.5)
    assert [r["passed"] for r in records] == [True, False] * 6


def test_extract_code():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone", False) == "def f():\n    return 1\n"
    assert extract_code("    return x\n\ndef other():\n    pass", True) == "    return x\n"
    assert extract_code("    return x\n", True) == "    return x\n"


def test_greedy_with_many_samples_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        evaluate_model(None, None, EvalSettings(testbed="code", num_samples=2))


@pytest.mark.slow
def test_rlhf_eval_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    code_ = cli(["--model", tiny_model_dir, "--testbed", "assistant", "--reference", tiny_model_dir,
                 "--reward-model", tiny_model_dir, "--limit", "6", "--max-new-tokens", "8", "--out", str(out)])
    assert code_ == 0
    report = json.loads((out / "eval.json").read_text())
    metrics = report["metrics"]
    # the reference is the policy itself: zero KL, identical responses, so every pair ties
    assert metrics["kl/reference"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["win_rate_gold/vs_reference/tie"] == 1.0
    assert metrics["win_rate_rm/vs_reference/win_rate"] == 0.5
    assert "rm/score" in metrics and metrics["num_prompts"] == 6 and len(report["samples"]) == 6
    assert "| gold/reward |" in (out / "eval.md").read_text()

    out2 = tmp_path / "code"
    assert cli(["--model", tiny_model_dir, "--testbed", "humaneval", "--limit", "2", "--num-samples", "2",
                "--temperature", "1.0", "--k", "1", "2", "--max-new-tokens", "8", "--out", str(out2)]) == 0
    metrics = json.loads((out2 / "eval.json").read_text())["metrics"]
    assert set(metrics) >= {"code/pass@1", "code/pass@2", "gold/reward"}
    assert os.path.exists(out2 / "eval.md")


def test_kl_to_reference_is_estimated_on_policy_samples(tiny_model_dir):
    """One response token: the exact KL(pi || pi_ref) of each prompt's first-token distributions, and its variance,
    are computed here from the logits; the reported estimate must agree within 4 standard errors, also when the
    evaluated responses are greedy (the estimate then draws its own samples)."""
    from rlhf.config import ModelConfig
    from rlhf.data import encode_prompt
    from rlhf.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    policy = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir), tok, trainable=False)
    reference = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir), tok, trainable=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        reference.lm_head.weight.add_(0.5 * torch.randn(reference.lm_head.weight.shape, generator=g))
    n = 96
    prompts = [r["prompt"] for r in TESTBEDS["assistant"].load("prompts_eval")[:n]]
    kls, variances = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([encode_prompt(tok, p)])
            lp = torch.log_softmax(policy(ids).logits[0, -1].double(), -1)
            lq = torch.log_softmax(reference(ids).logits[0, -1].double(), -1)
            ratio, prob = lp - lq, lp.exp()
            kl = float((prob * ratio).sum())
            kls.append(kl)
            variances.append(float((prob * ratio ** 2).sum()) - kl ** 2)
    exact, stderr = sum(kls) / n, (sum(variances) ** 0.5) / n
    assert exact > 10 * stderr  # the two models really differ
    for temperature in (0.0, 1.0):  # greedy responses (fresh samples drawn) and sampled ones (reused)
        metrics, _ = evaluate_model(policy, tok, EvalSettings(limit=n, max_new_tokens=1, temperature=temperature),
                                    reference_model=reference)
        assert abs(metrics["kl/reference"] - exact) < 4 * stderr, (temperature, metrics["kl/reference"], exact, stderr)
    # the reference itself: zero
    metrics, _ = evaluate_model(policy, tok, EvalSettings(limit=8, max_new_tokens=4), reference_model=policy)
    assert metrics["kl/reference"] == pytest.approx(0.0, abs=1e-6)
