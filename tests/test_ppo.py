# Run: .venv/bin/python -m pytest -q tests/test_ppo.py
"""PPO: the glue worked by hand (per-token rewards, truncation, reference support, batch hierarchy), the shipped
ablation configs, log-probs that match the sampler, and tiny end-to-end runs through the Trainer: PPO learns,
resume at an iteration boundary reproduces an uninterrupted run, critic warm-up leaves the policy alone."""

import glob
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from rlhf.algorithms.ppo import PolicyAndCritic, final_scores, response_logits, support_logprobs, token_rewards
from rlhf.config import ConfigError, ModelConfig, config_from_dict, load_config, to_dict
from rlhf.data import DataError, encode_prompt
from rlhf.data.batching import attention_mask, pad
from rlhf.models import load_causal_lm, load_scalar_model, load_tokenizer
from rlhf.ops import logprobs_from_logits
from rlhf.rollout import SamplingConfig, response_mask_from_ids
from rlhf.tracking import read_metrics
from rlhf.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), atol=tol, rtol=0)


def e_fraction_reward(prompts, completions, **columns):
    """A programmatic reward a random tiny model can learn: 10 x the fraction of 'e' characters."""
    return [10.0 * c.count("e") / max(len(c), 1) for c in completions]


def ppo_config(model_dir, train, out, **over):
    """A tiny PPO config for tests; keyword overrides use section__key=value."""
    values = {
        "algorithm": "ppo", "seed": 0,
        "model": {"name_or_path": model_dir},
        "data": {"train": train, "max_length": 64, "max_prompt_length": 32},
        "optim": {"lr": 1e-3, "scheduler": "constant", "warmup_ratio": 0.0},
        "logging": {"output_dir": out, "run_name": "run", "progress": False},
        "ppo": {"reward_fns": ["tests.test_ppo:e_fraction_reward"], "critic_init": "policy", "critic_lr": 1e-3,
                "iterations": 2, "rollout_batch_size": 16, "num_minibatches": 2, "micro_batch_size": 8,
                "rollout_micro_batch_size": 16, "max_new_tokens": 8, "on_truncated": "score"},
    }
    for key, value in over.items():
        section, name = key.split("__")
        values.setdefault(section, {})[name] = value
    return config_from_dict(values)


def lm(path):
    return load_causal_lm(ModelConfig(name_or_path=path))


def run(cfg, resume=False):
    Trainer(cfg, resume=resume).train()
    return read_metrics(os.path.join(cfg.logging.output_dir, cfg.logging.run_name, "metrics.jsonl"))


# --------------------------------------------------------------------------------------------------------------------
# Per-token rewards. logp, ref, mask (row 1 has 2 valid tokens; its padding holds junk):
#   row 0: logp [-1, -2, -.5]  ref [-1.5, -1, -.5]  -> k1 = logp - ref = [.5, -1, 0]
#   row 1: logp [-.3, -.7, 9]  ref [-.3, -1.2, 9]   -> k1 = [0, .5, (pad) 0]
#   kl_coef .1: -.1 * k1 = [-.05, .1, 0] and [0, -.05, 0]
#   scores [30, -2], reward_clip 20 -> [20, -2], added on the last valid token (index 2 and index 1):
#   rewards = [[-.05, .1, 0 + 20], [0, -.05 - 2, 0]] = [[-.05, .1, 20], [0, -2.05, 0]]
# --------------------------------------------------------------------------------------------------------------------


def reward_batch():
    logp = t([[-1.0, -2.0, -0.5], [-0.3, -0.7, 9.0]])
    ref = t([[-1.5, -1.0, -0.5], [-0.3, -1.2, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    return logp, ref, mask


def test_token_rewards_kl_on_every_token_and_clipped_score_on_the_last():
    logp, ref, mask = reward_batch()
    rewards, kl = token_rewards(logp, ref, mask, t([30.0, -2.0]), torch.tensor([True, True]), kl_coef=0.1,
                                kl_estimator="k1", reward_clip=20.0)
    close(kl, [[0.5, -1.0, 0.0], [0.0, 0.5, 0.0]])
    close(rewards, [[-0.05, 0.1, 20.0], [0.0, -2.05, 0.0]])
    # an unscored row (truncated, bootstrapping from V) gets only its KL penalty; reward_clip 0 = no clip: 30 stays
    rewards, _ = token_rewards(logp, ref, mask, t([30.0, -2.0]), torch.tensor([True, False]), 0.1, "k1", 0.0)
    close(rewards, [[-0.05, 0.1, 30.0], [0.0, -0.05, 0.0]])


def test_token_rewards_k3_estimator():
    # row 0, token 0: u = ref - logp = -.5 -> k3 = e^-.5 - 1 + .5 = .60653066 - .5 = .10653066
    #        token 1: u = 1 -> e - 1 - 1 = .71828183;  token 2: u = 0 -> 0
    logp, ref, mask = reward_batch()
    rewards, kl = token_rewards(logp, ref, mask, t([0.0, 0.0]), torch.tensor([True, True]), 0.1, "k3")
    close(kl[0], [0.10653066, 0.71828183, 0.0])
    close(rewards[0], [-0.010653066, -0.071828183, 0.0])


def test_final_scores_for_truncated_responses():
    scores, eos = t([1.0, 2.0, 3.0]), torch.tensor([True, False, True])
    # missing_eos_penalty (TRL's meaning) is subtracted from the truncated response's score: 2 - 1.5 = 0.5;
    # everyone is scored
    s, scored = final_scores(scores, eos, missing_eos_penalty=1.5)
    close(s, [1.0, 0.5, 3.0])
    assert scored.tolist() == [True, True, True]
    # truncated_score replaces it: 2 -> -1
    s, scored = final_scores(scores, eos, truncated_score=-1.0)
    close(s, [1.0, -1.0, 3.0])
    assert scored.tolist() == [True, True, True]
    # 'score': the truncated response keeps its score
    s, scored = final_scores(scores, eos, on_truncated="score")
    close(s, [1.0, 2.0, 3.0])
    assert scored.tolist() == [True, True, True]
    # 'bootstrap' (paper): no score; GAE bootstraps from V(s_T) instead
    s, scored = final_scores(scores, eos, on_truncated="bootstrap")
    close(s, [1.0, 0.0, 3.0])
    assert scored.tolist() == [True, False, True]


def test_truncation_settings_are_validated(tiny_model_dir, sft_file, tmp_path):
    with pytest.raises(ConfigError, match="missing_eos_penalty=-1.0: expected >= 0"):
        ppo_config(tiny_model_dir, sft_file, str(tmp_path), ppo__missing_eos_penalty=-1.0)
    with pytest.raises(ConfigError, match="not both"):
        ppo_config(tiny_model_dir, sft_file, str(tmp_path), ppo__missing_eos_penalty=1.0, ppo__truncated_score=-1.0)
    ppo_config(tiny_model_dir, sft_file, str(tmp_path), ppo__truncated_score=-1.0)


def test_reference_logprobs_on_the_policy_sampling_support():
    # policy logits [2, 1, 0, -5], top_k 2 -> the sampler keeps tokens {0, 1}
    policy = t([[[2.0, 1.0, 0.0, -5.0]]])
    # a uniform reference renormalized over {0, 1}: log(1/2) for either token
    close(support_logprobs(t([[[0.0, 0.0, 0.0, 0.0]]]), policy, torch.tensor([[1]]), top_k=2), [[math.log(0.5)]])
    # temperature 2: reference [0, 2, 4, 0] / 2 = [0, 1, 2, 0]; over {0, 1}: token 0 -> 0 - log(1 + e) = -1.3132617.
    # The reference's own top-2 would be {1, 2} (+ the label): 0 - log(1 + e + e^2) = -2.4076059, a different support.
    ref = t([[[0.0, 2.0, 4.0, 0.0]]])
    close(support_logprobs(ref, policy, torch.tensor([[0]]), temperature=2.0, top_k=2), [[-1.3132617]])
    close(logprobs_from_logits(ref, torch.tensor([[0]]), temperature=2.0, top_k=2), [[-2.4076059]])
    # a sampled token outside the policy's support at scoring time (rounding) still gets a finite log-prob:
    # policy top-1 is {0}; token 1 joins it: reference over {0, 1} at T=2 -> 1 - log(1 + e) = -0.3132617
    close(support_logprobs(ref, policy, torch.tensor([[1]]), temperature=2.0, top_k=1), [[-0.3132617]])


# --------------------------------------------------------------------------------------------------------------------
# Batch hierarchy: rollout_batch_size x samples_per_prompt = num_minibatches x world x micro x accum
# --------------------------------------------------------------------------------------------------------------------


def hierarchy(tiny_model_dir, sft_file, **ppo):
    return ppo_config(tiny_model_dir, sft_file, "unused", **{f"ppo__{k}": v for k, v in ppo.items()})


def test_batch_hierarchy_for_one_and_two_ranks(tiny_model_dir, sft_file):
    # 16 prompts x 2 = 32 rollouts = 4 minibatches of 8; world 1 x micro 4 x accum 2, world 2 x micro 4 x accum 1
    cfg = hierarchy(tiny_model_dir, sft_file, rollout_batch_size=16, samples_per_prompt=2, num_minibatches=4,
                    micro_batch_size=4)
    cfg.validate_world(1)
    cfg.validate_world(2)
    assert (cfg.grad_accum(1), cfg.grad_accum(2)) == (2, 1)
    every_number = ["ppo.rollout_batch_size=16", "ppo.samples_per_prompt=2", "32 rollouts", "ppo.num_minibatches=4",
                    "ppo.micro_batch_size=8"]
    # micro 8: a minibatch of 8 fits one rank (8 = 1 x 8 x 1), not two (2 x 8 = 16)
    cfg = hierarchy(tiny_model_dir, sft_file, rollout_batch_size=16, samples_per_prompt=2, num_minibatches=4,
                    micro_batch_size=8)
    cfg.validate_world(1)
    with pytest.raises(ConfigError) as e:
        cfg.validate_world(2)
    for part in every_number + ["world_size=2", "minibatch of 8 rollouts", "= 16"]:
        assert part in str(e.value), (part, str(e.value))
    # 32 rollouts do not split into 5 minibatches, whatever the world
    cfg = hierarchy(tiny_model_dir, sft_file, rollout_batch_size=16, samples_per_prompt=2, num_minibatches=5,
                    micro_batch_size=1)
    for world in (1, 2):
        with pytest.raises(ConfigError, match=f"32 rollouts do not split into 5 minibatches.*world_size={world}"):
            cfg.validate_world(world)
    # 3 prompts x 2 = 6 rollouts fit 2 ranks x micro 3, but 3 prompts do not split over 2 ranks
    cfg = hierarchy(tiny_model_dir, sft_file, rollout_batch_size=3, samples_per_prompt=2, num_minibatches=1,
                    micro_batch_size=3)
    cfg.validate_world(1)
    with pytest.raises(ConfigError, match="3 prompts do not split evenly over world_size=2"):
        cfg.validate_world(2)


def test_reward_and_critic_settings_fail_at_load(tiny_model_dir, sft_file):
    with pytest.raises(ConfigError, match="no reward source"):
        ppo_config(tiny_model_dir, sft_file, "unused", ppo__reward_fns=[])
    with pytest.raises(ConfigError, match="2 weights for 1 reward sources"):
        ppo_config(tiny_model_dir, sft_file, "unused", ppo__reward_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="critic_init=reward_model needs ppo.reward_model"):
        ppo_config(tiny_model_dir, sft_file, "unused", ppo__critic_init="reward_model")


# --------------------------------------------------------------------------------------------------------------------
# The paper's ablation as four config files, each one factor away from the previous
# --------------------------------------------------------------------------------------------------------------------


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_ablation_configs_differ_by_one_factor_each(tiny_model_dir):
    steps = ["base", "advnorm", "largebatch", "refema"]
    factor = {"advnorm": {"ppo.adv_norm"}, "largebatch": {"ppo.rollout_batch_size", "ppo.num_minibatches"},
              "refema": {"ppo.ref_ema"}}
    cfgs = {}
    for name in steps + ["tiny"]:
        path = os.path.join(ROOT, "configs", f"ppo_ablation_{name}.yaml" if name != "tiny" else "ppo_tiny.yaml")
        with open(path) as f:
            assert f"# rlhf train configs/{os.path.basename(path)}" in f.read()  # the header names the command
        # the configs start from the SFT run; a model folder stands in for it here
        cfg = load_config(path, ["--model.name_or_path", tiny_model_dir])
        cfg.validate_world(1)
        cfgs[name] = flat(to_dict(cfg))
    base = cfgs["base"]
    assert (base["ppo.adv_norm"], base["ppo.ref_ema"], base["ppo.num_minibatches"]) == (False, 0.0, 1)
    for before, after in zip(steps, steps[1:]):
        changed = {k for k in base if cfgs[before][k] != cfgs[after][k]} - {"logging.run_name"}
        assert changed == factor[after], (before, after, changed)
    last = cfgs["refema"]
    assert (last["ppo.adv_norm"], last["ppo.ref_ema"], last["ppo.num_minibatches"]) == (True, 0.001, 4)
    assert last["ppo.rollout_batch_size"] == 8 * base["ppo.rollout_batch_size"]  # paper: 64 -> 512
    # ppo_tiny.yaml is the full recipe: the last ablation step
    logging_only = {"logging.run_name", "logging.group", "logging.save_every"}
    assert {k for k in base if cfgs["tiny"][k] != last[k]} <= logging_only


# --------------------------------------------------------------------------------------------------------------------
# Log-probs of the sampling distribution
# --------------------------------------------------------------------------------------------------------------------


def test_scoring_logprobs_equal_the_sampler_with_temperature_top_k_top_p(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    policy = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir), tok)
    critic = load_scalar_model(tiny_model_dir)
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.7, top_k=40, top_p=0.9)
    pair = PolicyAndCritic(policy, critic, sampling)
    prompts = [encode_prompt(tok, p) for p in ["What color is the sky?", "Tell me the color of the orange."]]
    ids, mask = pad(prompts, tok.pad_token_id, side="left"), attention_mask(prompts, side="left")
    torch.manual_seed(0)
    out = policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=6, temperature=0.7,
                          top_k=40, top_p=0.9, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          output_scores=True, return_dict_in_generate=True)
    P = ids.shape[1]
    response = out.sequences[:, P:]
    rmask, _ = response_mask_from_ids(response, tok.eos_token_id)
    # the sampler's own distribution: log-softmax of the processed scores (temperature, top-k, top-p applied)
    sampler = torch.stack([s.float().log_softmax(-1) for s in out.scores], dim=1)
    sampler = sampler.gather(-1, response[..., None])[..., 0]
    full_mask = torch.cat([mask, rmask], dim=1)
    with torch.no_grad():
        logp, _ = pair(out.sequences, full_mask, P)  # the training forward (= the scoring pass: ratio 1 at step 1)
        logits = response_logits(policy, out.sequences, full_mask, P)
        ref_logp = support_logprobs(logits, logits, response, 0.7, 40, 0.9)  # reference == policy at the start
    valid = rmask.bool()
    assert valid.sum() >= 6
    close(logp[valid], sampler[valid], 1e-4)
    close(ref_logp[valid], sampler[valid], 1e-4)


class RecordingSampler:
    """Wraps SeededSampler.__call__: keeps the log-softmax of the logits each draw is made from (after whatever
    processors generate ran before it, and after the sampler's own temperature/top-k/top-p filter)."""

    def __init__(self, monkeypatch):
        from rlhf.ops import _sampling_logits
        from rlhf.rollout import hf

        self.steps = []
        original = hf.SeededSampler.__call__

        def call(sampler, input_ids, scores):
            s = sampler.sampling
            self.steps.append(_sampling_logits(scores, s.temperature, s.top_k, s.top_p, upcast=True).log_softmax(-1))
            return original(sampler, input_ids, scores)
        monkeypatch.setattr(hf.SeededSampler, "__call__", call)


@pytest.mark.parametrize("setting", [{}, {"repetition_penalty": 1.05}, {"repetition_penalty": 1.3},
                                     {"no_repeat_ngram_size": 1}, {"min_new_tokens": 4}])
def test_rollout_samples_the_distribution_training_scores_whatever_the_model_generation_config(
        tiny_model_dir, monkeypatch, setting):
    # A checkpoint's own generation_config (Qwen2.5-Instruct ships repetition_penalty 1.05) must not shape the
    # samples: the old log-probs, the KL and the ratio score the plain temperature/top-k/top-p distribution. Before
    # rollouts ignored it, the sampler's log-prob of a sampled token here differed from the scoring one by up to
    # 1.2e-2 (repetition_penalty 1.05), 4.9e-2 (1.3), 9.4e-2 (no_repeat_ngram_size 1), 4e-3 (min_new_tokens 4);
    # now by float32 rounding of two log-softmaxes over a 512-token vocabulary (7e-7 measured).
    from rlhf.rollout import generate
    from rlhf.rollout.hf import ignored_generation_settings

    tok = load_tokenizer(tiny_model_dir)
    policy = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir), tok)
    for k, v in setting.items():
        setattr(policy.generation_config, k, v)
    assert ignored_generation_settings(policy) == setting
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.7, top_k=40, top_p=0.9)
    prompts = [encode_prompt(tok, p) for p in ["What color is the sky?", "Tell me the color of the orange.",
                                               "Name a fruit.", "Say hello."]]
    recorder = RecordingSampler(monkeypatch)
    rollout = generate(policy, tok, prompt_ids=prompts, sampling=sampling, seeds=[11, 12, 13, 14])
    sampler = torch.stack(recorder.steps, dim=1)  # [B, steps, V]
    R = rollout.response_ids.shape[1]
    sampler = sampler[:, :R].gather(-1, rollout.response_ids[..., None])[..., 0]
    pair = PolicyAndCritic(policy, load_scalar_model(tiny_model_dir), sampling)
    P = rollout.prompt_ids.shape[1]
    with torch.no_grad():
        logp, _ = pair(rollout.input_ids, rollout.attention_mask, P)
    valid = rollout.response_mask.bool()
    assert valid.sum() >= 12
    close(logp[valid], sampler[valid], 1e-5)
    # the model's own config is back in place afterwards
    assert ignored_generation_settings(policy) == setting


@pytest.mark.slow
def test_ppo_names_the_ignored_generation_settings_once(tiny_model_dir, sft_file, tmp_path, capsys):
    tok = load_tokenizer(tiny_model_dir)
    policy = lm(tiny_model_dir)
    policy.generation_config.update(do_sample=True, repetition_penalty=1.05, top_p=0.8)  # as Qwen2.5-Instruct ships
    model_dir = str(tmp_path / "model")
    policy.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    records = run(ppo_config(model_dir, sft_file, str(tmp_path), ppo__iterations=1))
    lines = [line for line in capsys.readouterr().out.splitlines() if "generation_config" in line]
    assert lines == [f"{model_dir}: generation_config sets top_p=0.8, repetition_penalty=1.05; ignored: rollouts "
                     "sample from ppo.temperature, ppo.top_k and ppo.top_p alone, the distribution training scores"]
    assert records[0]["ppo/ratio_mean"] == pytest.approx(1.0, abs=1e-6)


def test_unseeded_rollouts_resolve_a_clean_generation_config(tiny_model_dir, monkeypatch):
    # The path without seeds samples inside transformers: the config generate resolves holds only SamplingConfig's
    # values, whatever the model's generation_config says.
    from rlhf.rollout import generate

    tok = load_tokenizer(tiny_model_dir)
    policy = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir), tok)
    policy.generation_config.update(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=3,
                                    temperature=0.2, top_k=5, suppress_tokens=[7])
    resolved = []
    prepare = type(policy)._prepare_generation_config

    def spy(self, generation_config, **kwargs):
        out = prepare(self, generation_config, **kwargs)
        resolved.append(out[0])
        return out
    monkeypatch.setattr(type(policy), "_prepare_generation_config", spy)
    generate(policy, tok, prompt_ids=[encode_prompt(tok, "Say hello.")],
             sampling=SamplingConfig(max_new_tokens=3, temperature=0.9, top_k=0, top_p=0.95))
    (cfg,) = resolved
    assert (cfg.repetition_penalty, cfg.no_repeat_ngram_size, cfg.min_new_tokens, cfg.suppress_tokens) == \
        (1.0, 0, None, None)
    assert (cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p) == (True, 0.9, 0, 0.95)
    assert (cfg.eos_token_id, cfg.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert policy.generation_config.repetition_penalty == 1.3  # restored


# --------------------------------------------------------------------------------------------------------------------
# End to end through the Trainer
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ppo_learns_with_bounded_kl_and_first_ratio_exactly_one(tiny_model_dir, sft_file, tmp_path):
    cfg = ppo_config(tiny_model_dir, sft_file, str(tmp_path), ppo__iterations=15, ppo__rollout_batch_size=32,
                     ppo__micro_batch_size=16, ppo__rollout_micro_batch_size=32, ppo__kl_coef=0.1,
                     ppo__temperature=0.7, ppo__top_k=40, ppo__top_p=0.95)
    records = run(cfg)
    its = [r for r in records if "objective/scores" in r]  # one record per iteration (its first step)
    assert len(its) == 15 and records[-1]["step"] == 30
    # the scoring pass measured the sampling distribution: the first minibatch of the first epoch is on-policy
    assert abs(records[0]["ppo/ratio_mean"] - 1.0) < 1e-5 and abs(records[0]["ppo/approx_kl"]) < 1e-6
    start = its[0]["objective/scores"]
    end = sum(r["objective/scores"] for r in its[-3:]) / 3
    kls = [r["objective/kl"] for r in its]
    print(f"\nPPO learns: score {start:.3f} -> {end:.3f} (last 3 iterations), KL max {max(kls):.3f}, "
          f"final {kls[-1]:.3f}, {records[-1]['step']} steps, {records[-1]['time/elapsed_s']:.1f} s")
    assert end > start + 1.0 and end > 1.8 * start
    # bounded: a policy collapsed onto one response would sit near -log ref(y) ~ log(40) nats a token at top-k 40,
    # ~30 nats over 8 tokens; the KL penalty keeps the whole run far below that, and the reward net of it rises
    assert max(kls) < 6.0
    assert sum(r["objective/rlhf_reward"] for r in its[-3:]) / 3 > its[0]["objective/rlhf_reward"] + 1.0
    final = os.path.join(tmp_path, "run", "final")
    assert lm(final) is not None
    assert load_scalar_model(os.path.join(final, "critic")) is not None


@pytest.mark.slow
def test_resume_at_an_iteration_boundary_reproduces_the_uninterrupted_run(tiny_model_dir, sft_file, tmp_path):
    # 4 prompts x 2 samples = 8 rollouts; 2 epochs x 2 minibatches of 4 = world 1 x micro 2 x accum 2: 4 steps an
    # iteration. EMA reference, adaptive KL, reward and value normalization: every piece of state must survive.
    common = dict(ppo__rollout_batch_size=4, ppo__samples_per_prompt=2, ppo__ppo_epochs=2, ppo__micro_batch_size=2,
                  ppo__ref_ema=0.1, ppo__adaptive_kl=True, ppo__kl_target=0.01, ppo__reward_norm=True,
                  logging__save_every=2)
    whole = run(ppo_config(tiny_model_dir, sft_file, str(tmp_path / "a"), ppo__iterations=2, **common))
    run(ppo_config(tiny_model_dir, sft_file, str(tmp_path / "b"), ppo__iterations=1, **common))
    # save_every 2, but a checkpoint only at the iteration boundary (step 4), never mid-iteration (step 2)
    assert os.listdir(tmp_path / "b" / "run" / "checkpoints") == ["step_000004"]
    checkpoint = tmp_path / "b" / "run" / "checkpoints" / "step_000004"  # a model too: the policy, critic/ (as final/)
    assert lm(str(checkpoint)) is not None and load_scalar_model(str(checkpoint / "critic")) is not None
    resumed = run(ppo_config(tiny_model_dir, sft_file, str(tmp_path / "b"), ppo__iterations=2, **common), resume=True)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    kl_coefs = [r["objective/kl_coef"] for r in whole if "objective/kl_coef" in r]
    assert kl_coefs[0] == 0.1 and kl_coefs[1] != kl_coefs[0]  # the adaptive controller moved
    for a, b in zip(whole, resumed):
        for key in a:
            if not key.startswith("time/"):
                assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
    pa = lm(str(tmp_path / "a" / "run" / "final")).state_dict()
    pb = lm(str(tmp_path / "b" / "run" / "final")).state_dict()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_reward_model_source_and_critic_warmup(tiny_model_dir, sft_file, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    rm_dir = str(tmp_path / "rm")
    rm = load_scalar_model(tiny_model_dir, tokenizer=tok)
    rm.config.score_bias = 0.25  # a calibrated reward model's shift: the critic starts from it and trains it
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    cfg = ppo_config(tiny_model_dir, sft_file, str(tmp_path), ppo__iterations=1, ppo__reward_model=rm_dir,
                     ppo__reward_weights=[1.0, 0.5], ppo__critic_init="reward_model", ppo__critic_warmup_iters=1)
    first = run(cfg)[0]
    # the score is the weighted sum of the sources: 1 x reward model + .5 x the programmatic reward
    close(first["objective/scores"], first["reward/model"] + 0.5 * first["reward/e_fraction_reward"], 1e-5)
    final = os.path.join(tmp_path, "run", "final")
    # critic warm-up: the policy did not move; the critic (initialized from the reward model) did
    before, after = lm(tiny_model_dir), lm(final)
    for (name, p0), p1 in zip(before.named_parameters(), after.parameters()):
        assert torch.equal(p0, p1), name
    rm, critic = load_scalar_model(rm_dir).state_dict(), load_scalar_model(os.path.join(final, "critic")).state_dict()
    assert not torch.equal(rm["score.weight"], critic["score.weight"])
    # the reloaded critic has its trained bias (as in the last checkpoint), not the reward model's 0.25
    last = sorted(glob.glob(os.path.join(tmp_path, "run", "checkpoints", "step_*")))[-1]
    trained = load_file(os.path.join(last, "state", "model.safetensors"))  # the resume state's tensors
    assert trained["critic.score.bias"].item() != pytest.approx(0.25, abs=1e-6)
    torch.testing.assert_close(critic["score.bias"], trained["critic.score.bias"])


@pytest.mark.slow
def test_critic_warmup_leaves_the_policy_optimizer_state_and_schedule_untouched(tiny_model_dir, sft_file, tmp_path,
                                                                                monkeypatch):
    # 4 iterations x 2 steps; the first 2 iterations (steps 0-3) train only the critic. Cosine schedule, no lr warm-up.
    # The policy's updates after the warm-up must be those of a fresh AdamW (as in a run without warm-up) fed the
    # same gradients, at the learning rates of a 4-step cosine: factor 0.5 (1 + cos(pi k / 4)), k = 0..3 =
    # 1, 0.8535534, 0.5, 0.1464466. Zero gradients during warm-up used to advance AdamW's step count (first real
    # update 0.65x its fresh size after these 4 steps) and the policy's lr followed the 8-step cosine from step 4:
    # 0.5, 0.3086583, 0.1464466, 0.0380602.
    lr, wd, W, spi = 1e-3, 0.1, 2, 2
    cfg = ppo_config(tiny_model_dir, sft_file, str(tmp_path), ppo__iterations=4, ppo__critic_warmup_iters=W,
                     optim__scheduler="cosine", optim__weight_decay=wd)
    seen = []  # per optimizer step: (policy lr, critic lr, grads, params before, params after, policy state sizes)
    make = Trainer._optimizer

    def optimizer_with_probe(trainer, model):
        opt = make(trainer, model)
        policy = opt.param_groups[0]["params"]

        def before(o, args, kwargs):  # runs before PPO's own hook, so warm-up grads are still zeros here
            seen.append([o.param_groups[0]["lr"], o.param_groups[1]["lr"],
                         [q.grad.clone() for q in policy], [q.detach().clone() for q in policy]])

        def after(o, args, kwargs):
            seen[-1] += [[q.detach().clone() for q in policy], [len(o.state[q]) for q in policy]]
        opt.register_step_pre_hook(before)
        opt.register_step_post_hook(after)
        return opt
    monkeypatch.setattr(Trainer, "_optimizer", optimizer_with_probe)
    run(cfg)
    assert len(seen) == 8
    for lr_p, lr_c, grads, p0, p1, state in seen[:W * spi]:  # warm-up: the policy neither moves nor gets state
        assert all(torch.equal(a, b) for a, b in zip(p0, p1)) and set(state) == {0}
    critic = [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    close([s[1] for s in seen], [lr * f for f in critic], 1e-12)  # the critic keeps the 8-step schedule
    close([s[0] for s in seen[W * spi:]], [lr * f for f in (1.0, 0.8535534, 0.5, 0.1464466)], 1e-10)
    # a fresh AdamW replays the policy's real steps from the same weights and gradients: the same weights after each
    fresh = [q.clone() for q in seen[W * spi][3]]
    adam = torch.optim.AdamW(fresh, lr=lr, betas=tuple(cfg.optim.adam_betas), eps=cfg.optim.adam_eps, weight_decay=wd)
    for lr_p, _, grads, p0, p1, _ in seen[W * spi:]:
        for q, g in zip(fresh, grads):
            q.grad = g
        adam.param_groups[0]["lr"] = lr_p
        with torch.no_grad():
            adam.step()
        for a, b in zip(fresh, p1):
            torch.testing.assert_close(a, b, atol=0, rtol=0)  # the same float32 operations in the same order


@pytest.mark.slow
def test_ema_reference_scores_at_the_policy_precision_and_updates_in_float32(tiny_model_dir, sft_file, tmp_path):
    # A bf16 policy with ppo.ref_ema: at iteration 0 reference == policy, so every per-token KL is exactly 0 (the
    # reference used to be cast to float32 whole, and its log-probs differed from the bf16 policy's by up to 2e-3 a
    # token). The EMA itself runs on a float32 master: eta 1e-3 moves it by increments a bf16 copy cannot hold.
    cfg = ppo_config(tiny_model_dir, sft_file, str(tmp_path), model__dtype="bfloat16", ppo__ref_ema=0.001,
                     ppo__iterations=2)
    trainer = Trainer(cfg)
    trainer.train()
    records = read_metrics(os.path.join(tmp_path, "run", "metrics.jsonl"))
    assert records[0]["objective/kl"] == 0.0
    algo, start = trainer.algorithm, lm(tiny_model_dir)
    assert {q.dtype for q in algo.reference.parameters()} == {torch.bfloat16}
    assert {q.dtype for q in algo.reference_master} == {torch.float32}
    initial = [q.to(torch.bfloat16).float() for q in start.parameters()]
    moved = sum(int((m != q0).sum()) for m, q0 in zip(algo.reference_master, initial))
    assert moved > 0  # the master took the EMA steps
    for r, m in zip(algo.reference.parameters(), algo.reference_master):
        assert torch.equal(r, m.to(torch.bfloat16))  # the scoring reference is the master at bf16


def test_overlong_prompt_names_file_and_line(tiny_model_dir, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "short"}) + "\n" + json.dumps({"prompt": "word " * 200}) + "\n")
    cfg = ppo_config(tiny_model_dir, str(path), str(tmp_path))
    with pytest.raises(DataError, match=rf"{path}:2: field 'prompt': .* > data.max_prompt_length=32"):
        Trainer(cfg)


@pytest.mark.slow
def test_ppo_with_the_static_engine_samples_what_training_scores(tiny_model_dir, sft_file, tmp_path):
    """ppo.engine static (eager on a CPU): the scoring pass reproduces the engine's own sampling log-probs (float32:
    the mean per-token gap is rounding, < 1e-5), the first ratio is exactly 1, and the run trains and exports."""
    cfg = ppo_config(tiny_model_dir, sft_file, str(tmp_path), ppo__engine="static", ppo__temperature=0.7,
                     ppo__top_k=40, ppo__top_p=0.95)
    records = run(cfg)
    its = [r for r in records if "objective/scores" in r]
    assert len(its) == 2
    assert all(0 <= r["rollout/sampler_logprob_gap"] < 1e-5 for r in its)
    assert abs(records[0]["ppo/ratio_mean"] - 1.0) < 1e-5
    assert lm(os.path.join(tmp_path, "run", "final")) is not None
