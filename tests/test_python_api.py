# Run: .venv/bin/python -m pytest -q tests/test_python_api.py
"""The Python API (rlhf/api.py): every object given to Trainer(config, model=..., ...) is the one actually used.

Each test checks the object's effect on numbers the run produces: a model object is trained in place and is what
final/ holds; a reference object gives the DPO loss computed here from its log-probs; a reward callable's own scores
are PPO's reward/<name>; a peft LoraConfig's rank is the adapters' rank; dataset objects' rows are the rows trained
on, and a bad one is named by row and field; callbacks see exactly what metrics.jsonl holds and can stop the run.
"""

import json
import math
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import FIXTURES
from rlhf import Trainer
from rlhf.config import ConfigError
from rlhf.data import DataError
from rlhf.data.preference import collate_pairs
from rlhf.models.forward import sequence_logprobs
from rlhf.tracking import read_metrics


def rows(name, n):
    with open(os.path.join(FIXTURES, name)) as f:
        return [json.loads(line) for line in f if line.strip()][:n]


def values(algorithm, out, **sections):
    """A config dict with no model path (objects fill it in); sections update the defaults."""
    v = {"algorithm": algorithm, "seed": 0,
         "model": {},
         "data": {"train": os.path.join(FIXTURES, "prefs.jsonl" if algorithm in ("dpo", "reward") else "sft.jsonl"),
                  "max_length": 64, "max_prompt_length": 32, "shuffle": False},
         "optim": {"lr": 1e-3, "batch_size": 4, "micro_batch_size": 2, "max_steps": 2, "warmup_ratio": 0.0},
         "logging": {"output_dir": str(out), "run_name": "run", "progress": False}}
    for key, value in sections.items():
        v[key] = {**v.get(key, {}), **value}
    return v


def llama(path):
    return AutoModelForCausalLM.from_pretrained(path)


def saved_config(run):
    with open(os.path.join(run, "config.yaml")) as f:
        text = f.read()
    return text, yaml.safe_load(text)


def clone_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------------------------
# model, tokenizer / processing_class, config forms
# --------------------------------------------------------------------------------------------------------------------


def test_model_object_is_trained_in_place_and_is_final(tiny_model_dir, tmp_path):
    model = llama(tiny_model_dir)
    start = clone_state(model)
    trainer = Trainer(values("sft", tmp_path), model=model)  # no model.name_or_path: the object stands in
    trainer.train()
    final = load_file(os.path.join(trainer.run_dir, "final", "model.safetensors"))
    now = model.state_dict()
    assert any(not torch.equal(now[k], start[k]) for k in start), "the object's weights did not change"
    for k, v in final.items():  # the exported weights are the object's own
        assert torch.equal(v, now[k]), k
    text, saved = saved_config(trainer.run_dir)
    assert saved["model"]["name_or_path"] == "<object: LlamaForCausalLM>"
    assert saved["model"]["tokenizer"] == tiny_model_dir  # from the object's from_pretrained path
    assert text.startswith("# Python objects given to Trainer: model=LlamaForCausalLM\n")
    # the run folder's config names an object: using it without the object again is refused, naming the field
    with pytest.raises(ConfigError, match=r"model.name_or_path='<object: LlamaForCausalLM>'.*Trainer\(model="):
        Trainer(os.path.join(trainer.run_dir, "config.yaml"), overwrite=True)


def test_tokenizer_object_and_processing_class_alias(tiny_model_dir, tmp_path):
    for arg in ("tokenizer", "processing_class"):
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        tok.add_special_tokens({"additional_special_tokens": ["<|marker|>"]})  # one token the folder's lacks
        assert len(tok) == len(AutoTokenizer.from_pretrained(tiny_model_dir)) + 1
        out = tmp_path / arg
        trainer = Trainer(values("sft", out, model={"name_or_path": tiny_model_dir}, optim={"max_steps": 1}),
                          **{arg: tok})
        trainer.train()
        assert trainer.tokenizer is tok
        final = os.path.join(trainer.run_dir, "final")
        # the model was sized for this tokenizer, and final/ carries it
        assert AutoModelForCausalLM.from_pretrained(final).get_input_embeddings().num_embeddings == len(tok)
        assert "<|marker|>" in AutoTokenizer.from_pretrained(final).get_vocab()
        assert saved_config(trainer.run_dir)[1]["model"]["tokenizer"] == f"<object: {type(tok).__name__}>"
    with pytest.raises(ConfigError, match="one argument"):
        Trainer(values("sft", tmp_path / "both"), tokenizer=tok, processing_class=AutoTokenizer.from_pretrained(
            tiny_model_dir))


def test_model_object_without_any_tokenizer_is_refused(tiny_model_dir, tmp_path):
    from rlhf.models.tiny import build_tiny_model

    model = build_tiny_model(AutoTokenizer.from_pretrained(tiny_model_dir), hidden_size=32, layers=1,
                             intermediate_size=64)  # built from a config: no from_pretrained path to fall back on
    with pytest.raises(ConfigError, match=r"model= given without a tokenizer: pass tokenizer= \(or processing_class"):
        Trainer(values("sft", tmp_path), model=model)


# --------------------------------------------------------------------------------------------------------------------
# train_dataset / eval_dataset
# --------------------------------------------------------------------------------------------------------------------


def test_dataset_objects_are_the_rows_trained_and_evaluated(tiny_model_dir, tmp_path):
    import datasets

    train = datasets.Dataset.from_list(rows("sft.jsonl", 8))
    held_out = rows("sft.jsonl", 36)[-6:]  # a list of dicts
    config = tmp_path / "sft.yaml"  # the config as a YAML path
    config.write_text(yaml.safe_dump(values("sft", tmp_path, model={"name_or_path": tiny_model_dir},
                                            data={"train": "", "limit": 0})))
    trainer = Trainer(str(config), train_dataset=train, eval_dataset=held_out)
    assert len(trainer.algorithm.train_examples) == 8 and len(trainer.algorithm.eval_examples) == 6
    last = trainer.train()
    assert math.isfinite(last["eval/loss"])
    data = saved_config(trainer.run_dir)[1]["data"]
    assert (data["train"], data["eval"]) == ("<object: Dataset>", "<object: list>")
    # DPO reads its pairs from an object through the same rows: 12 pairs in, 12 pairs encoded
    pairs = datasets.Dataset.from_list(rows("prefs.jsonl", 12))
    dpo = Trainer(values("dpo", tmp_path / "dpo", model={"name_or_path": tiny_model_dir}), train_dataset=pairs)
    assert [e.chosen_ids for e in dpo.algorithm.train_pairs] == [
        dpo.tokenizer.encode(r["chosen"], add_special_tokens=False) + [dpo.tokenizer.eos_token_id]
        for r in rows("prefs.jsonl", 12)]


@pytest.mark.parametrize("kind", ["Dataset", "list"])
def test_bad_dataset_row_is_named_by_row_and_field(tiny_model_dir, tmp_path, kind):
    import datasets

    data = rows("sft.jsonl", 5)
    data[2] = {"prompt": data[2]["prompt"], "response": None}  # row 3 lost its response
    obj = datasets.Dataset.from_list(data) if kind == "Dataset" else data
    with pytest.raises(DataError, match=r"^train_dataset:3: field 'response': missing$"):
        Trainer(values("sft", tmp_path, model={"name_or_path": tiny_model_dir}), train_dataset=obj)
    if kind == "list":  # an element that is no row at all
        with pytest.raises(DataError, match=r"^train_dataset:2: expected a mapping of columns, got str$"):
            Trainer(values("sft", tmp_path, model={"name_or_path": tiny_model_dir}),
                    train_dataset=[data[0], "oops"])
        with pytest.raises(DataError, match=r"pass one split"):
            Trainer(values("sft", tmp_path, model={"name_or_path": tiny_model_dir}),
                    train_dataset=datasets.DatasetDict({"train": datasets.Dataset.from_list(data)}))


# --------------------------------------------------------------------------------------------------------------------
# peft_config
# --------------------------------------------------------------------------------------------------------------------


def test_peft_config_sets_the_adapters(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = Trainer(values("sft", tmp_path, model={"name_or_path": tiny_model_dir}, optim={"max_steps": 1}),
                      peft_config=lora)
    trainer.train()
    adapters = {n: p for n, p in trainer.model.named_parameters() if "lora_A" in n}
    layers = 2
    assert len(adapters) == 2 * layers and all(n.split(".lora_A")[0].endswith(("q_proj", "v_proj")) for n in adapters)
    assert all(p.shape[0] == 2 for p in adapters.values())  # rank 2: A is [r, in]
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)
    with open(os.path.join(trainer.run_dir, "final", "adapter_config.json")) as f:
        assert json.load(f)["r"] == 2
    model = saved_config(trainer.run_dir)[1]["model"]
    assert (model["lora_r"], model["lora_alpha"], model["lora_target_modules"]) == (2, 4, ["q_proj", "v_proj"])
    assert lora.task_type is None  # the caller's config is copied, not changed


# --------------------------------------------------------------------------------------------------------------------
# ref_model (DPO)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reference", ["copy", "precomputed"])
def test_dpo_ref_model_object_is_the_reference(tiny_model_dir, tmp_path, reference):
    policy, ref = llama(tiny_model_dir), llama(tiny_model_dir)
    with torch.no_grad():  # a reference that differs from the policy
        g = torch.Generator().manual_seed(1)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    start_policy, start_ref = clone_state(policy), clone_state(ref)
    beta = 0.1
    trainer = Trainer(values("dpo", tmp_path, dpo={"reference": reference, "beta": beta}, optim={"max_steps": 1}),
                      model=policy, ref_model=ref, processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    # step 1's batch: the first 4 pairs (no shuffle); its loss from the two models' log-probs, computed here
    batch = collate_pairs(trainer.tokenizer.pad_token_id)(trainer.algorithm.train_pairs[:4])
    with torch.no_grad():
        pi = sequence_logprobs(policy.eval(), batch.input_ids, batch.attention_mask, batch.response_mask)[0]
        rho = sequence_logprobs(ref.eval(), batch.input_ids, batch.attention_mask, batch.response_mask)[0]
    (pi_c, pi_r), (rho_c, rho_r) = pi.chunk(2), rho.chunk(2)
    expected = -torch.nn.functional.logsigmoid(beta * ((pi_c - rho_c) - (pi_r - rho_r))).mean().item()
    assert abs(expected - math.log(2)) > 1e-3  # a reference equal to the policy would give log 2
    trainer.train()
    step1 = read_metrics(os.path.join(trainer.run_dir, "metrics.jsonl"))[0]
    # float32 sums of ~10 log-probs per row, in another batching (one row per pair): agreement to ~1e-6
    assert step1["train/loss"] == pytest.approx(expected, abs=1e-5)
    assert all(torch.equal(v, start_ref[k]) for k, v in ref.state_dict().items())  # frozen
    assert not any(p.requires_grad for p in ref.parameters())
    assert any(not torch.equal(v, start_policy[k]) for k, v in policy.state_dict().items())


def test_ref_model_refused_where_it_has_no_use(tiny_model_dir, tmp_path):
    ref = llama(tiny_model_dir)
    with pytest.raises(ConfigError, match="dpo.reference='adapter'"):
        Trainer(values("dpo", tmp_path, model={"name_or_path": tiny_model_dir, "lora_r": 4},
                       dpo={"reference": "adapter"}), ref_model=ref)
    with pytest.raises(ConfigError, match="algorithm sft has no reference model"):
        Trainer(values("sft", tmp_path, model={"name_or_path": tiny_model_dir}), ref_model=ref)


# --------------------------------------------------------------------------------------------------------------------
# PPO: reward_fns, reward_model, ref_model, model (critic from its weights)
# --------------------------------------------------------------------------------------------------------------------


def ppo_values(out, **sections):
    ppo = {"critic_init": "policy", "critic_lr": 1e-3, "iterations": 1, "rollout_batch_size": 8,
           "num_minibatches": 2, "micro_batch_size": 4, "rollout_micro_batch_size": 8, "max_new_tokens": 6,
           "on_truncated": "score", **sections.pop("ppo", {})}
    v = values("ppo", out, ppo=ppo, **sections)
    v["optim"] = {"lr": 1e-3, "scheduler": "constant", "warmup_ratio": 0.0}
    return v


def test_ppo_reward_fn_callable_and_weights(tiny_model_dir, tmp_path):
    seen = []

    def letter_e(prompts, completions, **columns):
        scores = [10.0 * c.count("e") / max(len(c), 1) for c in completions]
        seen.append(scores)
        return scores

    def length(prompts, completions, **columns):
        return [float(len(c)) for c in completions]

    trainer = Trainer(ppo_values(tmp_path, model={"name_or_path": tiny_model_dir},
                                 ppo={"reward_weights": [2.0, 0.5]}), reward_fns=[letter_e, length])
    trainer.train()
    first = read_metrics(os.path.join(trainer.run_dir, "metrics.jsonl"))[0]
    assert len(seen) == 1 and len(seen[0]) == 8  # one iteration of 8 rollouts
    assert first["reward/letter_e"] == pytest.approx(sum(seen[0]) / 8, rel=1e-6)
    # the weighted sum of the two sources (float64 sums of float32 scores)
    assert first["objective/scores"] == pytest.approx(2.0 * first["reward/letter_e"] + 0.5 * first["reward/length"],
                                                      rel=1e-5)
    assert saved_config(trainer.run_dir)[1]["ppo"]["reward_fns"] == ["<object: letter_e>", "<object: length>"]


def test_ppo_critic_from_a_model_object_equals_the_critic_from_its_path(tiny_model_dir, tmp_path):
    def one(prompts, completions, **columns):
        return [1.0] * len(completions)

    model = llama(tiny_model_dir)
    start = clone_state(model)
    from_object = Trainer(ppo_values(tmp_path / "a"), model=model, reward_fns=[one])._build_model()
    from_path = Trainer(ppo_values(tmp_path / "b", model={"name_or_path": tiny_model_dir}),
                        reward_fns=[one])._build_model()
    assert from_object.policy is model
    a, b = from_object.critic.state_dict(), from_path.critic.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # trunk and freshly drawn head
    assert from_object.critic.model.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_ppo_reward_model_and_ref_model_objects(tiny_model_dir, tmp_path):
    def one(prompts, completions, **columns):
        return [0.0] * len(completions)

    reward = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    ref = llama(tiny_model_dir)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    start_reward, start_ref = clone_state(reward), clone_state(ref)
    calls = []
    reward.register_forward_hook(lambda m, args, kwargs, out: calls.append(out.logits.shape[0]), with_kwargs=True)
    trainer = Trainer(ppo_values(tmp_path, model={"name_or_path": tiny_model_dir}, ppo={"critic_init": "reward_model"}),
                      reward_model=reward, ref_model=ref, reward_fns=[one])
    assert trainer.algorithm.reward.model.model is reward and trainer.algorithm.reward.model.shares_tokenizer
    trainer.train()
    first = read_metrics(os.path.join(trainer.run_dir, "metrics.jsonl"))[0]
    assert sum(calls) == 8 and "reward/model" in first  # the object scored the iteration's 8 rollouts
    # KL to the policy's own copy is exactly 0 at the first rollout; to this reference it is not
    assert abs(first["objective/kl"]) > 1e-3
    assert trainer.algorithm.reference is ref
    for obj, start in ((reward, start_reward), (ref, start_ref)):
        assert all(torch.equal(v, start[k]) for k, v in obj.state_dict().items())  # frozen
    saved = saved_config(trainer.run_dir)[1]["ppo"]
    assert saved["reward_model"] == "<object: LlamaForSequenceClassification>"


# --------------------------------------------------------------------------------------------------------------------
# callbacks
# --------------------------------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self, stop_at=0):
        self.stop_at, self.events, self.logs, self.saves, self.steps = stop_at, [], [], [], []

    def on_train_begin(self, trainer):
        self.events.append(("begin", trainer.step))

    def on_log(self, trainer, metrics):
        self.logs.append((trainer.step, metrics))

    def on_step_end(self, trainer, step):
        self.steps.append(step)
        if step == self.stop_at:
            trainer.should_stop = True

    def on_save(self, trainer, path):
        self.saves.append(path)

    def on_train_end(self, trainer, result):
        self.events.append(("end", trainer.step, result))


def test_callbacks_see_every_log_and_can_stop_the_run(tiny_model_dir, tmp_path):
    rec, quiet = Recorder(stop_at=2), object()  # a callback may define any subset of the hooks
    trainer = Trainer(values("sft", tmp_path, model={"name_or_path": tiny_model_dir}, optim={"max_steps": 5}),
                      callbacks=[rec, quiet])
    result = trainer.train()
    records = read_metrics(os.path.join(trainer.run_dir, "metrics.jsonl"))
    written = [(r["step"], {k: v for k, v in r.items() if k not in ("step", "time/elapsed_s")}) for r in records]
    assert rec.logs == written and [s for s, _ in written] == [1, 2]
    assert rec.steps == [1, 2] and trainer.step == 2
    checkpoint = os.path.join(trainer.run_dir, "checkpoints", "step_000002")
    assert rec.saves == [checkpoint] and os.path.isdir(checkpoint)
    assert os.path.isdir(os.path.join(trainer.run_dir, "final"))
    assert rec.events == [("begin", 0), ("end", 2, result)]


def test_ppo_reward_tokenizer_of_its_own_scores_texts(tiny_model_dir, tmp_path):
    def one(prompts, completions, **columns):
        return [0.0] * len(completions)

    reward = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    own = AutoTokenizer.from_pretrained(tiny_model_dir)
    own.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # another template: another encoding
    trainer = Trainer(ppo_values(tmp_path, model={"name_or_path": tiny_model_dir}), reward_model=reward,
                      reward_tokenizer=own, reward_fns=[one])
    rm = trainer.algorithm.reward.model
    assert rm.model is reward and rm.tokenizer is own and not rm.shares_tokenizer
    # the reward object scores the texts through its own tokenizer: the same as encoding them here
    from rlhf.data.templates import encode_prompt, encode_response
    from rlhf.models import scalar_scores

    ids = torch.tensor([encode_prompt(own, "Why?") + encode_response(own, "Because.")])
    with torch.no_grad():
        expected = scalar_scores(reward, ids, torch.ones_like(ids))
    torch.testing.assert_close(rm.score_texts(["Why?"], ["Because."]), expected.float(), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="reward_tokenizer= belongs to a reward_model= object"):
        Trainer(ppo_values(tmp_path / "b", model={"name_or_path": tiny_model_dir}), reward_tokenizer=own,
                reward_fns=[one])


def test_resume_with_the_same_objects_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    import datasets

    data = datasets.Dataset.from_list(rows("sft.jsonl", 16))
    config = values("sft", tmp_path, optim={"max_steps": 4})

    def run(out, resume=False, **kw):
        logging = {**config["logging"], "output_dir": str(out)}
        return Trainer({**config, "logging": logging}, model=llama(tiny_model_dir), train_dataset=data, resume=resume,
                       **kw)

    whole = run(tmp_path / "whole")
    whole.train()
    run(tmp_path / "parts", callbacks=[Recorder(stop_at=2)]).train()  # stops at step 2 with a checkpoint
    resumed = run(tmp_path / "parts", resume=True)  # objects loaded again as at the start
    resumed.train()
    assert [r["step"] for r in read_metrics(os.path.join(resumed.run_dir, "metrics.jsonl"))] == [1, 2, 3, 4]
    a = load_file(os.path.join(whole.run_dir, "final", "model.safetensors"))
    b = load_file(os.path.join(resumed.run_dir, "final", "model.safetensors"))
    for k in a:  # the same arithmetic in the same order on one CPU process: equal bit for bit
        assert torch.equal(a[k], b[k]), k


def test_reward_modelling_with_model_objects(tiny_model_dir, tmp_path):
    scalar = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    start = clone_state(scalar)
    Trainer(values("reward", tmp_path / "a", optim={"max_steps": 1}), model=scalar).train()
    trunk = [k for k in start if not k.startswith("score")]
    assert any(not torch.equal(scalar.state_dict()[k], start[k]) for k in trunk)  # trained in place
    lm = llama(tiny_model_dir)  # a causal LM: a new scalar model from its weights, the object left as it was
    lm_start = clone_state(lm)
    built = Trainer(values("reward", tmp_path / "b"), model=lm)._build_model()
    assert built is not lm and built.config.num_labels == 1
    for k, v in built.model.state_dict().items():
        assert torch.equal(v, lm_start[f"model.{k}"]), k
    assert all(torch.equal(v, lm_start[k]) for k, v in lm.state_dict().items())


def test_the_loop_collects_garbage_once_after_the_first_step(tiny_model_dir, tmp_path, monkeypatch):
    """One full collection right after step 1 (the pause a compiled model's new objects would cause in a later step
    is taken there), and none the trainer asks for after it."""
    import rlhf.trainer

    calls, steps = [], []

    class Steps:
        def on_step_end(self, trainer, step):
            steps.append(step)

    trainer = Trainer(values("sft", tmp_path, model={"name_or_path": tiny_model_dir}, optim={"max_steps": 3}),
                      callbacks=[Steps()])
    monkeypatch.setattr(rlhf.trainer.gc, "collect", lambda *a: calls.append(list(steps)))
    trainer.train()
    assert calls == [[1]] and steps == [1, 2, 3]
