# Run: .venv/bin/python -m pytest -q tests/test_shared_base.py
"""PPO on one shared base (ppo.shared_base): actor, critic and reference as LoRA adapters of one frozen model.

A shared-base run equals a run with separate models built to the same weights (policy = base + actor LoRA, critic =
base + critic LoRA + head, reference = a frozen copy EMA'd in full), also under activation checkpointing; the
reference adapter is the hand-computed EMA of the actor's LoRA factors; the export reloads with peft; the frozen
reference (adapters off) gives a KL of exactly 0 before the first update; generation runs the actor adapter in both
engines; a LoRA reward model starts the critic; bad combinations fail at start-up. All float32 on the CPU."""

import copy
import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from rlhf.algorithms.ppo import PPO, PolicyAndCritic, on_response, response_logprobs
from rlhf.algorithms.ppo_shared import ACTOR, CRITIC, REFERENCE, build_shared_base
from rlhf.config import ConfigError, ModelConfig
from rlhf.models import load_causal_lm, load_scalar_model, load_tokenizer, token_values
from rlhf.models.adapters import BASE, adapter_parameters, tuner_layers, using_adapter
from rlhf.ops import logprobs_from_logits
from rlhf.rollout import SamplingConfig, generate
from rlhf.tracking import read_metrics
from rlhf.trainer import Trainer
from tests.test_ppo import ppo_config

LORA = dict(model__lora_r=4, model__lora_alpha=8, ppo__shared_base=True)
# float32 throughout: the two set-ups run the same operations on the same values up to summation order (the gradient
# norm sums the same squares in another order, an adapter's x @ A^T @ B^T is the same matmuls); a few steps of that
# stay far below 1e-5 on metrics of order 1
TOL = 1e-5


def shared_config(model_dir, data, out, **over):
    return ppo_config(model_dir, data, out, **{**LORA, **over})


def metrics_of(cfg):
    return read_metrics(os.path.join(cfg.logging.output_dir, cfg.logging.run_name, "metrics.jsonl"))


def trained(cfg):
    trainer = Trainer(cfg)
    trainer.train()
    return trainer, metrics_of(cfg)


def assert_same_metrics(a, b, tol=TOL, skip=()):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        keys = [k for k in ra if not k.startswith("time/")]
        assert keys == [k for k in rb if not k.startswith("time/")]
        for k in keys:
            if k not in skip:
                assert ra[k] == pytest.approx(rb[k], abs=tol), (ra["step"], k)


def logprobs(model, ids, mask, P, sampling):
    out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, P - 1:-1].float()
    return on_response(logprobs_from_logits(out, ids[:, P:], sampling.temperature, sampling.top_k, sampling.top_p),
                       mask[:, P:])


@pytest.fixture(scope="module")
def shared_run(tiny_model_dir, tmp_path_factory):
    """2 iterations x 2 steps with an EMA reference adapter, exported with the merged actor."""
    sft = os.path.join(os.path.dirname(__file__), "fixtures", "data", "sft.jsonl")
    out = str(tmp_path_factory.mktemp("shared"))
    cfg = shared_config(tiny_model_dir, sft, out, ppo__ref_ema=0.1, ppo__export_merged=True)
    trainer, records = trained(cfg)
    return cfg, trainer, records


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------


def test_shared_base_settings_fail_at_start_up(tiny_model_dir, sft_file, tmp_path):
    with pytest.raises(ConfigError, match=r"ppo.shared_base=true needs LoRA .*model.lora_r=0"):
        ppo_config(tiny_model_dir, sft_file, str(tmp_path), ppo__shared_base=True)
    with pytest.raises(ConfigError, match=r"ppo.export_merged=true applies to ppo.shared_base=true"):
        ppo_config(tiny_model_dir, sft_file, str(tmp_path), ppo__export_merged=True)
    # a whole reward model cannot start a critic adapter of another base
    with pytest.raises(ConfigError, match=r"critic_init=reward_model: ppo.reward_model=.* is a whole model"):
        shared_config(tiny_model_dir, sft_file, str(tmp_path), ppo__reward_model=tiny_model_dir,
                      ppo__critic_init="reward_model")
    with pytest.raises(ConfigError, match=r"ppo.reward_adapter=true needs ppo.shared_base=true \(got false\)"):
        ppo_config(tiny_model_dir, sft_file, str(tmp_path), ppo__reward_adapter=True)
    with pytest.raises(ConfigError, match=r"ppo.reward_adapter=true needs .* LoRA reward-model folder .*got '"):
        shared_config(tiny_model_dir, sft_file, str(tmp_path), ppo__reward_adapter=True,
                      ppo__reward_model=tiny_model_dir)
    assert shared_config(tiny_model_dir, sft_file, str(tmp_path)).ppo.shared_base


# --------------------------------------------------------------------------------------------------------------------
# Adapter switching
# --------------------------------------------------------------------------------------------------------------------


def test_using_adapter_switches_what_runs_and_never_what_trains(tiny_model_dir, sft_file, tmp_path):
    cfg = shared_config(tiny_model_dir, sft_file, str(tmp_path), ppo__ref_ema=0.1)
    tok = load_tokenizer(tiny_model_dir)
    pair = build_shared_base(cfg, tok, SamplingConfig())
    lm = pair.lm
    trainable = {n for n, q in lm.named_parameters() if q.requires_grad}
    assert trainable == {n for n, q in lm.named_parameters() if f".{ACTOR}." in n or f".{CRITIC}." in n}
    assert not any(f".{REFERENCE}." in n for n in trainable)
    with torch.no_grad():  # give the adapters different, non-zero B so each one changes the output
        for i, name in enumerate((ACTOR, CRITIC, REFERENCE)):
            for key, q in adapter_parameters(lm, name).items():
                if "lora_B" in key:
                    q.fill_(0.05 * (i + 1))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)
    out = {}
    for name in (ACTOR, CRITIC, REFERENCE, BASE):
        with torch.no_grad(), using_adapter(lm, name):
            out[name] = lm(input_ids=ids, attention_mask=mask).logits
    for a in out:
        for b in out:
            if a != b:
                assert (out[a] - out[b]).abs().max() > 1e-3, (a, b)
    with using_adapter(lm, CRITIC):  # nested: the inner block's adapter, then the outer one's again
        with using_adapter(lm, BASE):
            assert all(layer.disable_adapters for layer in tuner_layers(lm))
        assert all(layer.active_adapters == [CRITIC] and not layer.disable_adapters for layer in tuner_layers(lm))
    assert {n for n, q in lm.named_parameters() if q.requires_grad} == trainable
    with pytest.raises(ValueError, match="no LoRA layer has an adapter 'nope'"):
        with using_adapter(lm, "nope"):
            pass


# --------------------------------------------------------------------------------------------------------------------
# Shared base == separate models with the same weights
# --------------------------------------------------------------------------------------------------------------------


def separate_models(cfg, tok, sampling) -> PolicyAndCritic:
    """The separate-model set-up at the shared one's initial weights: policy = base + LoRA (the actor's tensors),
    critic = sequence-classification base + LoRA (the critic's tensors) + score head (the value head)."""
    shared = build_shared_base(cfg, tok, sampling)  # the same draws, in the same order, as the shared run's
    m = cfg.model
    lora = dict(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, target_modules=m.lora_target_modules)
    policy = get_peft_model(load_causal_lm(m, tok, trainable=False), LoraConfig(task_type="CAUSAL_LM", **lora))
    critic = get_peft_model(load_scalar_model(m.name_or_path, m, tok), LoraConfig(task_type="SEQ_CLS", **lora))
    with torch.no_grad():
        for model, name in ((policy, ACTOR), (critic, CRITIC)):
            source, target = adapter_parameters(shared.lm, name), adapter_parameters(model, "default")
            assert source.keys() == target.keys()
            for key, q in target.items():
                q.copy_(source[key])
        critic.base_model.model.score.modules_to_save["default"].weight.copy_(shared.value_head.weight)
    for model in (policy, critic):
        model.train()
    return PolicyAndCritic(policy, critic, sampling)


@pytest.mark.slow
def test_shared_base_run_equals_separate_models_with_the_same_weights(shared_run, tiny_model_dir, tmp_path,
                                                                      monkeypatch):
    """The same 2 iterations (EMA reference, eta 0.1) through the real PPO code: the rollouts (same seeds, same
    actor), scores, KL, losses, values, ratios, gradient norms and the trained actor agree. The separate reference is
    a frozen copy of the whole LoRA policy EMA'd parameter by parameter: its base tensors stay exactly equal (lerp of
    equal values), its LoRA factors follow the same EMA as the reference adapter."""
    cfg, trainer, records = shared_run
    monkeypatch.setattr(PPO, "build_model", lambda self: separate_models(self.cfg, self.trainer.tokenizer,
                                                                          self.sampling))
    separate = shared_config(tiny_model_dir, cfg.data.train, str(tmp_path), ppo__ref_ema=0.1,
                             ppo__export_merged=True)
    separate.ppo.shared_base, separate.ppo.export_merged = False, False
    other, rec_sep = trained(separate)
    assert_same_metrics(records, rec_sep)
    assert len(records) == 4 and records[2]["objective/kl"] > 1e-6  # the second iteration's KL is not 0
    a = adapter_parameters(trainer.algorithm._pair().lm, ACTOR)
    b = adapter_parameters(other.algorithm._pair().policy, "default")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=TOL, rtol=0)


@pytest.mark.slow
def test_activation_checkpointing_recomputes_each_forward_with_its_own_adapter(shared_run, tiny_model_dir, tmp_path):
    """With model.gradient_checkpointing the backward recomputes the actor's and the critic's blocks after both
    forwards ran: each must recompute with its own adapter, so the run equals the one without checkpointing."""
    cfg, _, records = shared_run
    ckpt = shared_config(tiny_model_dir, cfg.data.train, str(tmp_path), ppo__ref_ema=0.1,
                         model__gradient_checkpointing=True)
    _, rec_ckpt = trained(ckpt)
    assert_same_metrics(records, rec_ckpt)


# --------------------------------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reference_adapter_is_the_ema_of_the_actor_factors(tiny_model_dir, sft_file, tmp_path, monkeypatch):
    # 12 rollouts in 3 minibatches of 4: 3 optimizer steps, eta 0.25. With the actor's tensors a_0 (initial) and a_k
    # after step k, the reference starts at a_0 and after step k is r_k = .25 a_k + .75 r_{k-1}: e.g. one entry with
    # a = 0, .4, .8, 1.2 gives r = 0, .1, .275, .50625. Computed here in float64 from the recorded actor tensors.
    eta = 0.25
    cfg = shared_config(tiny_model_dir, sft_file, str(tmp_path), ppo__ref_ema=eta, ppo__iterations=1,
                        ppo__rollout_batch_size=12, ppo__num_minibatches=3, ppo__micro_batch_size=4,
                        ppo__rollout_micro_batch_size=12)
    seen = []
    make = Trainer._optimizer

    def optimizer_with_probe(trainer, model):
        opt = make(trainer, model)
        actor = list(adapter_parameters(model.lm, ACTOR).values())
        if not seen:
            seen.append([q.detach().double().clone() for q in actor])

        def after(o, args, kwargs):
            seen.append([q.detach().double().clone() for q in actor])
        opt.register_step_post_hook(after)
        return opt
    monkeypatch.setattr(Trainer, "_optimizer", optimizer_with_probe)
    trainer = Trainer(cfg)
    trainer.train()
    assert len(seen) == 4
    hand = seen[0]
    for actor in seen[1:]:
        hand = [eta * a + (1 - eta) * r for a, r in zip(actor, hand)]
    lm = trainer.algorithm._pair().lm
    ref = list(adapter_parameters(lm, REFERENCE).values())
    assert all(not q.requires_grad for q in ref)
    for r, h in zip(ref, hand):
        torch.testing.assert_close(r.double(), h, atol=1e-7, rtol=0)  # 3 float32 lerps of values below 1
    b = [(r, a) for r, a, k in zip(ref, seen[-1], adapter_parameters(lm, REFERENCE)) if "lora_B" in k]
    assert max((r.double() - a).abs().max().item() for r, a in b) > 1e-5  # lags the actor: not a copy of it
    # the algorithm's checkpoint state holds the reference adapter alone, not the base
    state = trainer.algorithm.state_dict()["reference_adapter"]
    assert sum(t.numel() for t in state["tensors"]) == sum(q.numel() for q in ref)
    assert sum(q.numel() for q in ref) < sum(q.numel() for q in lm.parameters()) / 5


@pytest.mark.slow
def test_frozen_reference_is_the_base_and_its_kl_is_exactly_zero_before_the_first_update(tiny_model_dir, sft_file,
                                                                                         tmp_path):
    # the actor's LoRA B starts at 0, so actor == base == the adapters-off reference bit for bit: KL exactly 0.
    # The evaluation harness runs too, generating with the actor adapter (eval/callback.py enters pair.actor()).
    cfg = shared_config(tiny_model_dir, sft_file, str(tmp_path), logging__eval_every=4,
                        logging__eval_testbed="assistant", logging__eval_limit=4, logging__eval_max_new_tokens=4)
    trainer, records = trained(cfg)
    assert [r["step"] for r in records if "eval/assistant/gold/reward" in r] == [4]
    assert records[0]["objective/kl"] == 0.0 and records[0]["ppo/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert records[2]["objective/kl"] != 0.0  # after two updates the actor has left the base
    lm = trainer.algorithm._pair().lm
    assert REFERENCE not in lm.peft_config and trainer.algorithm.reference.adapter is BASE
    assert trainer.algorithm.state_dict()["reference_adapter"] == {}


# --------------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_reloads_with_peft_to_the_trained_actor_and_critic(shared_run, tiny_model_dir):
    cfg, trainer, _ = shared_run
    pair = trainer.algorithm._pair()
    final = os.path.join(cfg.logging.output_dir, cfg.logging.run_name, "final")
    tok = load_tokenizer(final)
    s = trainer.algorithm.sampling
    ids = torch.tensor([[3, 5, 6, 7, 8, 9, 10, 11], [tok.pad_token_id, 5, 9, 7, 8, 12, 13, tok.pad_token_id]])
    mask = (ids != tok.pad_token_id).long()
    P = 4
    with torch.no_grad():
        want = pair.policy_logprobs(ids, mask, P)  # under the run's sampling settings, 0 on padding
        want_values = pair.values(ids, mask)
    assert adapter_parameters(pair.lm, ACTOR)  # trained: B moved off 0
    moved = [q for k, q in adapter_parameters(pair.lm, ACTOR).items() if "lora_B" in k]
    assert max(q.abs().max().item() for q in moved) > 0
    actor = PeftModel.from_pretrained(load_causal_lm(ModelConfig(name_or_path=tiny_model_dir)), final).eval()
    with torch.no_grad():
        torch.testing.assert_close(logprobs(actor, ids, mask, P, s), want, atol=TOL, rtol=0)
        # the merged actor: W + s B A in one matrix, float32 rounding of a different summation (1e-4 on log-probs)
        merged = load_causal_lm(ModelConfig(name_or_path=os.path.join(final, "merged"))).eval()
        torch.testing.assert_close(logprobs(merged, ids, mask, P, s), want, atol=1e-4, rtol=0)
        base = load_scalar_model(tiny_model_dir)
        critic = PeftModel.from_pretrained(base, os.path.join(final, "critic")).eval()
        torch.testing.assert_close(token_values(critic, ids, mask), want_values, atol=TOL, rtol=0)
        # rlhf's own loader reads the critic folder as a whole scalar model (adapter merged onto its base)
        whole = load_scalar_model(os.path.join(final, "critic"))
        torch.testing.assert_close(token_values(whole, ids, mask), want_values, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# Generation and the critic's start
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["static", "hf"])
def test_generation_runs_the_actor_adapter(tiny_model_dir, sft_file, tmp_path, engine):
    """With a non-zero actor adapter, the engine's sampling log-probs (static) or the sampled tokens (hf) are the
    actor's: scoring the rollout with the actor gives the engine's numbers, scoring with the base does not."""
    cfg = shared_config(tiny_model_dir, sft_file, str(tmp_path))
    tok = load_tokenizer(tiny_model_dir)
    s = SamplingConfig(max_new_tokens=6, temperature=0.8, top_k=0, top_p=1.0)
    pair = build_shared_base(cfg, tok, s).eval()
    with torch.no_grad():
        for key, q in adapter_parameters(pair.lm, ACTOR).items():
            if "lora_B" in key:
                q.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    with torch.no_grad(), pair.actor() as policy:
        rollout = generate(policy, tok, prompt_ids=prompts, sampling=s, seeds=[1, 2], engine=engine)
    ids, mask, P = rollout.input_ids, rollout.attention_mask, rollout.prompt_ids.shape[1]
    rmask = mask[:, P:].float()
    with torch.no_grad():
        actor = pair.policy_logprobs(ids, mask, P)  # the pair samples with s: temperature 0.8, no filter
        with using_adapter(pair.lm, BASE):
            base = response_logprobs(pair.lm, ids, mask, P, s.temperature)
    assert (actor - base).abs().max() > 1e-2
    if engine == "static":
        assert ((rollout.logprobs - actor).abs() * rmask).max() < 1e-5
    else:  # the hf engine reports no log-probs: greedy decoding under the actor picks the actor's argmax
        greedy = SamplingConfig(max_new_tokens=6, do_sample=False)
        with torch.no_grad(), pair.actor() as policy:
            g = generate(policy, tok, prompt_ids=prompts, sampling=greedy, engine=engine)
        with torch.no_grad(), using_adapter(pair.lm, ACTOR):
            logits = pair.lm(input_ids=g.input_ids, attention_mask=g.attention_mask).logits
        top = logits[:, g.prompt_ids.shape[1] - 1:-1].argmax(-1)
        keep = g.response_mask.bool()
        assert torch.equal(top[keep], g.input_ids[:, g.prompt_ids.shape[1]:][keep])


def lora_reward_model(model_dir, out):
    """(a LoRA reward model of the tiny base with non-zero B and score head, saved by peft into `out`; the model)."""
    tok = load_tokenizer(model_dir)
    rm = get_peft_model(load_scalar_model(model_dir, tokenizer=tok),
                        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS"))
    with torch.no_grad():
        for n, q in rm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                q.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    return out, rm.eval()


def test_the_reward_trainers_lora_folder_serves_the_shared_base(tiny_model_dir, prefs_file, sft_file, tmp_path):
    """A LoRA reward model trained by rlhf (calibrated) is written as a peft adapter with its trained score head, a
    fraction of the base's bytes, and serves every consumer alike: load_reward_model (the adapter merged over the
    base, the shift from reward_normalization.json), ppo.reward_adapter (adapter "reward" of the shared base, the
    shift as the head's bias) and critic_init: reward_model (the adapter and the head's weight). float32: merged
    against unmerged weights differ by rounding only, far below 1e-5 on scores of order 1."""
    from safetensors import safe_open

    from rlhf import load_reward_model
    from tests.conftest import PAIR_OPTIM, train_config

    trainer = Trainer(train_config("reward", tiny_model_dir, prefs_file, str(tmp_path / "rm"), PAIR_OPTIM,
                                   optim__max_steps=3, model__lora_r=4))
    trainer.train()
    final = tmp_path / "rm" / "run" / "final"
    assert (final / "adapter_config.json").exists() and not (final / "model.safetensors").exists()
    live = trainer.accelerator.unwrap_model(trainer.model)
    trained = live.base_model.model.score.modules_to_save["default"].weight
    assert not torch.equal(trained, live.base_model.model.score.original_module.weight)  # three steps moved it
    stats = json.loads((final / "reward_normalization.json").read_text())
    with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
        head = f.get_tensor("base_model.model.score.weight")
        assert all("lora_" in k for k in f.keys() if k != "base_model.model.score.weight")  # no base weight
    torch.testing.assert_close(head, trained.detach() / stats["std"], atol=1e-7, rtol=1e-6)  # the scale folded in
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 5, 9, 7, 8, 12]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    from rlhf.models import scalar_scores

    with torch.no_grad():
        raw = scalar_scores(live.eval(), ids, mask)
        calibrated = scalar_scores(load_reward_model(str(final)), ids, mask)
    torch.testing.assert_close(calibrated, (raw - stats["mean"]) / stats["std"], atol=TOL, rtol=0)
    tok = load_tokenizer(tiny_model_dir)
    cfg = shared_config(tiny_model_dir, sft_file, str(tmp_path / "ppo"), ppo__reward_model=str(final),
                        ppo__reward_adapter=True, ppo__critic_init="reward_model", model__lora_r=4)
    pair = build_shared_base(cfg, tok, SamplingConfig()).eval()
    with torch.no_grad():
        from_adapter = pair.head_outputs("reward", pair.reward_head, ids, mask)
        torch.testing.assert_close(from_adapter.gather(1, torch.tensor([[5], [5]])).squeeze(1), calibrated,
                                   atol=TOL, rtol=0)
        torch.testing.assert_close(pair.values(ids, mask), token_values(live, ids, mask) / stats["std"], atol=TOL,
                                   rtol=0)


def test_critic_starts_from_a_lora_reward_model(tiny_model_dir, sft_file, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    rm_dir, rm = lora_reward_model(tiny_model_dir, str(tmp_path / "rm"))
    cfg = shared_config(tiny_model_dir, sft_file, str(tmp_path), ppo__reward_model=rm_dir,
                        ppo__critic_init="reward_model")
    pair = build_shared_base(cfg, tok, SamplingConfig()).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(pair.values(ids, mask), token_values(rm.eval(), ids, mask), atol=TOL, rtol=0)
        # and the reward source loads the same folder as a whole scorer
        torch.testing.assert_close(token_values(load_scalar_model(rm_dir), ids, mask), token_values(rm, ids, mask),
                                   atol=1e-5, rtol=0)
    other = copy.deepcopy(cfg)
    other.model.lora_r = 8  # another rank: the reward model's adapter does not fit... but its own config is used
    pair = build_shared_base(other, tok, SamplingConfig())
    assert pair.lm.peft_config[CRITIC].r == 4 and pair.lm.peft_config[ACTOR].r == 8
    # a LoRA reward model of another base is refused, naming both bases
    import json

    config_file = os.path.join(rm_dir, "adapter_config.json")
    adapter_config = json.load(open(config_file))
    adapter_config["base_model_name_or_path"] = str(tmp_path / "another-base")
    json.dump(adapter_config, open(config_file, "w"))
    with pytest.raises(ConfigError, match=r"was trained on base '.*another-base', not on model.name_or_path="):
        build_shared_base(cfg, tok, SamplingConfig())


@pytest.mark.slow
def test_one_optimizer_holds_the_actor_then_the_critic_and_head(shared_run):
    cfg, trainer, _ = shared_run
    lm, head = trainer.algorithm._pair().lm, trainer.algorithm._pair().value_head
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2
    assert [id(q) for q in groups[0]["params"]] == [id(q) for q in adapter_parameters(lm, ACTOR).values()]
    assert [id(q) for q in groups[1]["params"]] == ([id(q) for q in adapter_parameters(lm, CRITIC).values()]
                                                    + [id(head.weight)])
    assert groups[0]["lr"] == cfg.optim.lr and groups[1]["lr"] == cfg.ppo.critic_lr
    # both adapters trained in the same steps: their B factors (initialized at 0) moved, and AdamW holds state for
    # every trainable tensor of both groups
    for name in (ACTOR, CRITIC):
        moved = [q for k, q in adapter_parameters(lm, name).items() if "lora_B" in k]
        assert all(q.abs().max() > 0 for q in moved), name
    assert all(trainer.optimizer.state[q] for g in groups for q in g["params"])


@pytest.mark.slow
def test_resume_at_an_iteration_boundary_reproduces_the_shared_base_run(shared_run, tiny_model_dir, tmp_path):
    """1 iteration, a checkpoint, then the 2nd after --resume: the same metrics as the uninterrupted run (the EMA
    reference adapter comes back from the algorithm's state)."""
    cfg, _, whole = shared_run
    first = shared_config(tiny_model_dir, cfg.data.train, str(tmp_path), ppo__ref_ema=0.1, ppo__iterations=1,
                          logging__save_every=2)
    Trainer(first).train()
    again = shared_config(tiny_model_dir, cfg.data.train, str(tmp_path), ppo__ref_ema=0.1, logging__save_every=2)
    Trainer(again, resume=True).train()
    assert_same_metrics(whole, metrics_of(again), tol=1e-6)


def test_half_precision_reference_adapter_keeps_a_float32_master(tiny_model_dir, sft_file, tmp_path):
    """A bf16 reference adapter cannot hold eta = 1e-3 increments: the EMA runs on a float32 master and the scoring
    adapter is the master rounded to bf16. Actor entries of 1.0 and a reference at 0: after 3 updates the master is
    1 - 0.999^3 = 0.002997001."""
    eta = 1e-3
    cfg = shared_config(tiny_model_dir, sft_file, str(tmp_path), ppo__ref_ema=eta)
    pair = build_shared_base(cfg, load_tokenizer(tiny_model_dir), SamplingConfig())
    from rlhf.algorithms.ppo_shared import AdapterReference

    with torch.no_grad():
        for name, value in ((ACTOR, 1.0), (REFERENCE, 0.0)):
            for q in adapter_parameters(pair.lm, name).values():
                q.data = torch.full_like(q.data, value, dtype=torch.bfloat16)
    ref = AdapterReference(pair, has_adapter=True)
    assert ref.master is not None and {q.dtype for q in ref.master} == {torch.float32}
    for _ in range(3):
        ref.update(eta)
    expected = 1 - (1 - eta) ** 3
    for m, q in zip(ref.master, adapter_parameters(pair.lm, REFERENCE).values()):
        torch.testing.assert_close(m, torch.full_like(m, expected), atol=1e-7, rtol=0)
        assert torch.equal(q, m.to(torch.bfloat16))
    # why the master: near 1 a bf16 value cannot move by eta (1 - 1e-3 rounds back to 1; bf16 spacing below 1: 2^-8)
    assert torch.tensor(1.0 - eta, dtype=torch.bfloat16).item() == 1.0


@pytest.mark.slow
def test_reward_adapter_on_the_shared_base_scores_as_the_separate_reward_model(tiny_model_dir, sft_file, tmp_path):
    """ppo.reward_adapter: the LoRA reward model runs as adapter "reward" of the shared base; the run equals one that
    loads the same reward model as a second, merged model (float32: merged W + s B A against the unmerged adapter
    differ by rounding, far below 1e-5 on scores of order 1). The clip fractions are counts: a token whose ratio or
    value sits on the clip boundary can flip with that rounding (1 of 64 tokens = 0.015625), so they are left out;
    the losses, continuous across the boundary, are compared."""
    rm_dir, rm = lora_reward_model(tiny_model_dir, str(tmp_path / "rm"))
    common = dict(ppo__reward_model=rm_dir, ppo__reward_fns=[], ppo__iterations=1)
    adapter = shared_config(tiny_model_dir, sft_file, str(tmp_path / "a"), ppo__reward_adapter=True, **common)
    trainer, with_adapter = trained(adapter)
    _, separate = trained(shared_config(tiny_model_dir, sft_file, str(tmp_path / "b"), **common))
    assert_same_metrics(with_adapter, separate, skip=("ppo/clipfrac", "ppo/vf_clipfrac"))
    assert abs(with_adapter[0]["reward/model"]) > 1e-3
    pair = trainer.algorithm._pair()
    assert not any(q.requires_grad for q in adapter_parameters(pair.lm, "reward").values())
    assert not pair.reward_head.weight.requires_grad
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 5, 9, 7, 8, 12]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    from rlhf.models import scalar_scores

    with torch.no_grad():
        torch.testing.assert_close(trainer.algorithm.reward.model(ids, mask), scalar_scores(rm, ids, mask),
                                   atol=TOL, rtol=0)
