# Run: .venv/bin/python -m pytest -q tests/test_rewards.py
"""Reward sources: a trained reward model scores as in training, programmatic rewards get the dataset columns,
several sources sum with their weights, and a broken source fails naming itself."""

import pytest
import torch

from rlhf.config import ConfigError
from rlhf.data import encode_prompt, encode_response
from rlhf.data.batching import attention_mask, pad
from rlhf.models import load_scalar_model, load_tokenizer, scalar_scores
from rlhf.rewards import FunctionReward, ModelReward, RewardSources, build_reward, import_reward_fn

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
