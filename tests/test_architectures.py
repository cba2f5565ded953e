# Run: .venv/bin/python -m pytest -q tests/test_architectures.py
"""Every algorithm on every architecture CI builds: tiny random Llama, Qwen2, Mistral and GPT-2 models (full
fine-tuning) train SFT, a reward model and DPO for 2 optimizer steps and PPO for 1 iteration, and write a final/
that from_pretrained loads back to the same numbers. The forward paths they share (log-probs from hidden states,
left padding, shared-prefix pairs, scalar heads) are checked against the models' own forward on each."""

import math
import os

import pytest
import torch

from rlhf.config import ModelConfig
from rlhf.data import encode_prompt
from rlhf.models import load_causal_lm, load_reward_model, load_scalar_model, load_tokenizer
from rlhf.models.forward import (_lm_parts, pair_scores, pair_sequence_logprobs, scalar_scores, shares_prefix,
                                 token_logprobs)
from rlhf.models.tiny import ARCHS, init_tiny
from rlhf.rollout import resolve_engine, unsupported
from rlhf.trainer import Trainer
from tests.conftest import FIXTURES, PAIR_OPTIM, sft_config, train_config
from tests.test_fast_logprobs import pair_batch
from tests.test_ppo import ppo_config

CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
           "gpt2": "GPT2LMHeadModel"}


def test_every_tiny_architecture_is_tested():
    assert set(ARCHS) == set(CLASSES)


@pytest.fixture(scope="module", params=sorted(CLASSES))
def arch_dir(request, tmp_path_factory):
    """(arch, a tiny random model of that architecture with the shipped BPE tokenizer), built once per module."""
    arch = request.param
    out = str(tmp_path_factory.mktemp(f"arch-{arch}") / "base")
    init_tiny(out, [os.path.join(FIXTURES, "sft.jsonl")], arch=arch, vocab_size=512, hidden_size=32, layers=2,
              heads=4, kv_heads=2, intermediate_size=64)
    return arch, out


def prompt_ids(tok):
    return torch.tensor([encode_prompt(tok, "What sound does a cow make?")])


def trained(trainer):
    return trainer.accelerator.unwrap_model(trainer.model)


def assert_finite_loss(metrics):
    assert math.isfinite(metrics["train/loss"]), metrics
    assert metrics["train/skipped_steps"] == 0


# ---------------------------------------------------------------------------------------------------------------------
# Forward paths against the model's own forward
# ---------------------------------------------------------------------------------------------------------------------


def test_forward_paths_match_the_models_own_forward(arch_dir):
    arch, path = arch_dir
    tok = load_tokenizer(path)
    model = load_causal_lm(ModelConfig(name_or_path=path), tok, trainable=False)
    assert type(model).__name__ == CLASSES[arch]
    # log-probs come from the decoder's hidden states through the LM head, not from a full-logits fallback
    decoder, head = _lm_parts(model)
    assert decoder is model.get_decoder() and head is model.get_output_embeddings()
    ids = prompt_ids(tok)
    with torch.no_grad():
        own = torch.log_softmax(model(ids).logits[0, :-1].float() / 0.7, -1).gather(1, ids[0, 1:, None])[:, 0]
        torch.testing.assert_close(token_logprobs(model, ids, torch.ones_like(ids), temperature=0.7)[0], own,
                                   atol=1e-5, rtol=0)
        # left padding: positions come from the mask (GPT-2's absolute positions too)
        padded = torch.cat([torch.full((1, 3), tok.pad_token_id), ids], 1)
        pmask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
        torch.testing.assert_close(token_logprobs(model, padded, pmask)[:, 3:],
                                   token_logprobs(model, ids, torch.ones_like(ids)), atol=1e-5, rtol=0)
    # a scalar head read at the last token: the model's own pooled logit, with or without left padding
    rm = load_scalar_model(path, tokenizer=tok)
    with torch.no_grad():
        score = scalar_scores(rm, ids, torch.ones_like(ids))
        torch.testing.assert_close(score, rm(input_ids=ids).logits[:, 0], atol=1e-6, rtol=0)
        torch.testing.assert_close(scalar_scores(rm, padded, pmask), score, atol=1e-5, rtol=0)


def test_shared_prefix_pairs_equal_separate_rows(arch_dir):
    _, path = arch_dir
    tok = load_tokenizer(path)
    model = load_causal_lm(ModelConfig(name_or_path=path), tok, trainable=False)
    rm = load_scalar_model(path, tokenizer=tok)
    assert shares_prefix(model) and shares_prefix(rm)
    b = pair_batch()  # token ids < 300, inside the 512-token vocabulary
    out = {}
    for shared in (True, False):
        model.shared_prefix = rm.shared_prefix = shared
        with torch.no_grad():
            out[shared] = (pair_sequence_logprobs(model, b.input_ids, b.attention_mask, b.response_mask)[0],
                           pair_scores(rm, b.input_ids, b.attention_mask, b.response_mask))
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-5, rtol=0)


def test_static_engine_only_for_the_llama_family(arch_dir):
    arch, path = arch_dir
    model = load_causal_lm(ModelConfig(name_or_path=path), trainable=False)
    if arch == "gpt2":  # no rotary embeddings or Llama module layout: auto falls back to transformers' generate
        assert "gpt2" in unsupported(model)
        assert resolve_engine("auto", model) == "hf"
    else:
        assert unsupported(model) is None
    assert resolve_engine("auto", model) == "hf"  # on a CPU always


# ---------------------------------------------------------------------------------------------------------------------
# Every algorithm, end to end
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sft(arch_dir, sft_file, tmp_path):
    arch, path = arch_dir
    trainer = Trainer(sft_config(path, sft_file, str(tmp_path), optim__max_steps=2))
    assert_finite_loss(trainer.train())
    final = os.path.join(tmp_path, "run", "final")
    reloaded = load_causal_lm(ModelConfig(name_or_path=final), trainable=False)
    assert type(reloaded).__name__ == CLASSES[arch]
    ids = prompt_ids(load_tokenizer(final))
    model = trained(trainer).eval()
    start = load_causal_lm(ModelConfig(name_or_path=path), trainable=False)
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(reloaded(ids).logits, logits, atol=1e-5, rtol=0)  # tied head included
        assert not torch.allclose(start(ids).logits, logits, atol=1e-4)  # the 2 steps trained it


@pytest.mark.slow
def test_reward_model(arch_dir, prefs_file, tmp_path):
    _, path = arch_dir
    trainer = Trainer(train_config("reward", path, prefs_file, str(tmp_path), PAIR_OPTIM))
    assert_finite_loss(trainer.train())
    final = os.path.join(tmp_path, "run", "final")
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(final)
    calibrated = load_reward_model(final)
    ids = prompt_ids(load_tokenizer(final))
    with torch.no_grad():
        raw, score = plain(ids).logits[0, 0], calibrated(ids).logits[0, 0]
    assert math.isfinite(score.item())
    torch.testing.assert_close(score, raw + plain.config.score_bias, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_dpo(arch_dir, prefs_file, tmp_path):
    arch, path = arch_dir
    trainer = Trainer(train_config("dpo", path, prefs_file, str(tmp_path), PAIR_OPTIM))
    assert_finite_loss(trainer.train())
    final = os.path.join(tmp_path, "run", "final")
    reloaded = load_causal_lm(ModelConfig(name_or_path=final), trainable=False)
    assert type(reloaded).__name__ == CLASSES[arch]
    ids = prompt_ids(load_tokenizer(final))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained(trainer).eval()(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_ppo(arch_dir, sft_file, tmp_path):
    arch, path = arch_dir
    # critic from the policy, the programmatic reward of tests/test_ppo.py; 1 iteration = 2 optimizer steps
    trainer = Trainer(ppo_config(path, sft_file, str(tmp_path), ppo__iterations=1, logging__log_samples=0))
    last = trainer.train()
    assert_finite_loss(last)
    assert math.isfinite(last["ppo/value_loss"])
    final = os.path.join(tmp_path, "run", "final")
    policy = load_causal_lm(ModelConfig(name_or_path=final), trainable=False)
    critic = load_scalar_model(os.path.join(final, "critic"))
    assert type(policy).__name__ == CLASSES[arch]
    pair = trained(trainer).eval()
    ids = prompt_ids(load_tokenizer(final))
    with torch.no_grad():
        torch.testing.assert_close(policy(ids).logits, pair.policy(ids).logits, atol=1e-5, rtol=0)
        mask = torch.ones_like(ids)
        torch.testing.assert_close(scalar_scores(critic, ids, mask), scalar_scores(pair.critic, ids, mask),
                                   atol=1e-5, rtol=0)
