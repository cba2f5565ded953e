# Run: .venv/bin/python -m pytest -q tests/test_rewards.py
"""Reward sources: a trained reward model scores as in training, programmatic rewards get the dataset columns,
several sources sum with their weights, and a broken source fails naming itself."""

import os

import pytest
import torch

from rlhf.config import ConfigError
from rlhf.data import encode_prompt, encode_response
from rlhf.data.batching import attention_mask, pad
from rlhf.models import load_scalar_model, load_tokenizer, scalar_scores
from rlhf.rewards import FunctionReward, ModelReward, RewardSources, build_reward, import_reward_fn
from tests.conftest import FIXTURES

SEEN = {}


def length_reward(prompts, completions, **columns):
    """len(completion) + the row's 'bonus' column; records what it was given."""
    SEEN.update(prompts=prompts, completions=completions, columns=columns)
    return [float(len(c)) + b for c, b in zip(completions, columns["bonus"])]


def short_reward(prompts, completions, **columns):
    return [1.0]


def nan_reward(prompts, completions, **columns):
    return [float("nan")] * len(completions)


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, tmp_path_factory):
    """A tiny reward model: a sequence-classification head (num_labels=1) on the tiny Llama, saved and reloaded."""
    out = str(tmp_path_factory.mktemp("rm"))
    tok = load_tokenizer(tiny_model_dir)
    load_scalar_model(tiny_model_dir, tokenizer=tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def batch(tok):
    prompts = [encode_prompt(tok, "What color is the sky?"), encode_prompt(tok, "Which color is the sun?")]
    responses = [encode_response(tok, "Blue."), encode_response(tok, "The sun is yellow.")]
    ids = torch.cat([pad(prompts, tok.pad_token_id, "left"), pad(responses, tok.pad_token_id, "right")], dim=1)
    mask = torch.cat([attention_mask(prompts, "left"), attention_mask(responses, "right")], dim=1)
    return ids, mask


def test_model_reward_scores_like_the_reward_model(rm_dir):
    tok = load_tokenizer(rm_dir)
    ids, mask = batch(tok)
    expected = scalar_scores(load_scalar_model(rm_dir), ids, mask)
    # batch_size 1 scores row by row: padding and batching do not change a score
    scores = ModelReward(rm_dir, tokenizer=tok, batch_size=1)(ids, mask)
    torch.testing.assert_close(scores, expected.detach(), atol=1e-5, rtol=0)


def test_weighted_sum_of_sources_and_columns_by_name(rm_dir):
    tok = load_tokenizer(rm_dir)
    ids, mask = batch(tok)
    sources = RewardSources(ModelReward(rm_dir, tokenizer=tok), [FunctionReward("tests.test_rewards:length_reward")],
                            weights=[2.0, 0.5])
    total, parts = sources(ids, mask, ["p0", "p1"], ["abc", "hello"], {"bonus": [1.0, -5.0]})
    # the fn got the prompts, the completions and the 'bonus' column as a keyword list
    assert SEEN == {"prompts": ["p0", "p1"], "completions": ["abc", "hello"], "columns": {"bonus": [1.0, -5.0]}}
    # length_reward: [3 + 1, 5 - 5] = [4, 0]; total = 2 x model + .5 x [4, 0] = 2 x model + [2, 0]
    torch.testing.assert_close(parts["length_reward"], torch.tensor([4.0, 0.0]))
    torch.testing.assert_close(total, 2 * parts["model"] + torch.tensor([2.0, 0.0]))


def test_import_errors_name_the_path():
    assert import_reward_fn("tests.test_rewards:length_reward") is length_reward
    with pytest.raises(ConfigError, match="'no_colon': expected 'module:callable'"):
        import_reward_fn("no_colon")
    with pytest.raises(ConfigError, match="cannot import module 'tests.no_such_module'"):
        import_reward_fn("tests.no_such_module:fn")
    with pytest.raises(ConfigError, match="module 'tests.test_rewards' has no callable 'missing'"):
        import_reward_fn("tests.test_rewards:missing")


def test_bad_scores_name_the_fn():
    with pytest.raises(ValueError, match="'tests.test_rewards:short_reward' returned 1 scores for 2 completions"):
        FunctionReward("tests.test_rewards:short_reward")(["a", "b"], ["x", "y"], {})
    with pytest.raises(ValueError, match="'tests.test_rewards:nan_reward' returned a non-finite .* index 0"):
        FunctionReward("tests.test_rewards:nan_reward")(["a"], ["x"], {})


def test_build_reward_from_a_ppo_section_and_weight_count():
    from rlhf.config import PPOSection

    sources = build_reward(PPOSection(reward_fns=["tests.test_rewards:length_reward"]))
    assert sources.model is None and sources.weights == [1.0]
    total, _ = sources(None, None, ["p"], ["abcd"], {"bonus": [0.5]})
    torch.testing.assert_close(total, torch.tensor([4.5]))
    with pytest.raises(ConfigError, match="2 reward weights for 1 reward sources"):
        RewardSources(None, [FunctionReward("tests.test_rewards:length_reward")], [1.0, 1.0])
    with pytest.raises(ConfigError, match="no reward source"):
        RewardSources()


# --------------------------------------------------------------------------------------------------------------------
# A reward model with a tokenizer of its own
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_tokenizer_rm(tmp_path_factory):
    """A reward model whose tokenizer (300 tokens, trained on other text) differs from the tiny policy's (512)."""
    from rlhf.models.tiny import init_tiny

    base = init_tiny(str(tmp_path_factory.mktemp("other") / "base"), [os.path.join(FIXTURES, "prefs.jsonl")],
                     vocab_size=300,
                     hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64, seed=3)
    out = str(tmp_path_factory.mktemp("other_rm"))
    tok = load_tokenizer(base)
    load_scalar_model(base, tokenizer=tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_a_reward_model_folder_without_tokenizer_files_reads_the_policys_tokens(tiny_model_dir, tmp_path):
    """A model folder with config and weights only (no tokenizer files) shares the policy's tokenizer: AutoTokenizer
    would build an empty tokenizer of the config's model type there, which must not count as one of its own."""
    policy_tok = load_tokenizer(tiny_model_dir)
    bare = str(tmp_path / "bare_rm")
    load_scalar_model(tiny_model_dir, tokenizer=policy_tok).save_pretrained(bare)
    assert not any(f.startswith(("tokenizer", "vocab")) for f in os.listdir(bare))
    with pytest.raises(ConfigError, match=r"ppo.reward_model='.*bare_rm': the folder holds no tokenizer files"):
        load_tokenizer(bare, field="ppo.reward_model")
    reward = ModelReward(bare, tokenizer=policy_tok)
    assert reward.shares_tokenizer and reward.tokenizer is policy_tok


def test_reward_model_with_its_own_tokenizer_scores_the_texts(tiny_model_dir, rm_dir, own_tokenizer_rm):
    policy_tok = load_tokenizer(tiny_model_dir)
    assert ModelReward(rm_dir, tokenizer=policy_tok).shares_tokenizer
    reward = ModelReward(own_tokenizer_rm, tokenizer=policy_tok)
    assert not reward.shares_tokenizer and len(reward.tokenizer) != len(policy_tok)
    ids, mask = batch(policy_tok)  # the policy's tokens: meaningless to this reward model
    chats = ["What color is the sky?", [{"role": "user", "content": "Which color is the sun?"}]]
    completions = ["Blue.", "The sun is yellow."]
    total, parts = RewardSources(reward)(ids, mask, ["p0", "p1"], completions, chats=chats, finished=[True, False])
    # by hand: each prompt through the reward model's own chat template, the finished response with its EOS
    rm_tok, rm = load_tokenizer(own_tokenizer_rm), load_scalar_model(own_tokenizer_rm)
    rows = [encode_prompt(rm_tok, chats[0]) + encode_response(rm_tok, completions[0]),
            encode_prompt(rm_tok, chats[1]) + encode_response(rm_tok, completions[1], add_eos=False)]
    assert rows[0][-1] == rm_tok.eos_token_id and rows[1][-1] != rm_tok.eos_token_id
    expected = torch.cat([scalar_scores(rm, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))
                          for r in rows]).detach()
    torch.testing.assert_close(parts["model"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(total, expected, atol=1e-5, rtol=0)


def test_ppo_with_a_reward_model_of_its_own_tokenizer(tiny_model_dir, sft_file, own_tokenizer_rm, tmp_path, capsys):
    from rlhf.trainer import Trainer
    from rlhf.tracking import read_metrics
    from tests.test_ppo import ppo_config

    cfg = ppo_config(tiny_model_dir, sft_file, str(tmp_path), ppo__iterations=1, ppo__reward_model=own_tokenizer_rm,
                     ppo__reward_fns=[], ppo__critic_init="reward_model")
    # the critic reads the policy's tokens: it cannot start from this reward model
    with pytest.raises(ConfigError, match=r"critic_init=reward_model: .*tokenizer of its own \(300 tokens\).*"
                                          r"policy's \(512 tokens\).*set ppo.critic_init: policy"):
        Trainer(cfg)
    cfg = ppo_config(tiny_model_dir, sft_file, str(tmp_path), ppo__iterations=1, ppo__reward_model=own_tokenizer_rm,
                     ppo__reward_fns=[], ppo__critic_init="policy")
    Trainer(cfg).train()
    assert "a tokenizer of its own (300 tokens, the policy's 512); it scores the prompt and response texts" in \
        capsys.readouterr().out
    first = read_metrics(os.path.join(tmp_path, "run", "metrics.jsonl"))[0]
    assert first["objective/scores"] == pytest.approx(first["reward/model"], abs=1e-6)


def test_eval_harness_scores_with_the_reward_models_own_tokenizer(tiny_model_dir, own_tokenizer_rm):
    from rlhf.eval.runner import EvalSettings, evaluate_model
    from rlhf.models import load_causal_lm
    from rlhf.config import ModelConfig

    tok = load_tokenizer(tiny_model_dir)
    policy = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir), tok, trainable=False)
    reward = ModelReward(own_tokenizer_rm, tokenizer=tok)
    metrics, records = evaluate_model(policy, tok, EvalSettings(limit=3, max_new_tokens=6), reward)
    assert metrics["rm/score"] == pytest.approx(sum(r["rm_score"] for r in records) / 3, abs=1e-6)
    for r in records:  # each score is the reward model's on the texts, as finished or as cut at the token limit
        options = [reward.score_texts([r["prompt"]], [r["response"]], [f]).item() for f in (True, False)]
        assert min(abs(r["rm_score"] - o) for o in options) < 1e-5, (r["rm_score"], options)
