"""LoRA with target modules 'all-linear' on any causal LM (here GPT-2, whose layers are Conv1D and named c_attn,
c_proj, c_fc), and the model section's attn_implementation and revision reaching from_pretrained."""

import json
import math
import os

import pytest
import torch
import yaml

from rlhf.config import ConfigError, ModelConfig, config_from_dict
from rlhf.models.loading import _load_kwargs, load_causal_lm
from rlhf.trainer import Trainer
from tests.conftest import PAIR_OPTIM, sft_config, train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A 2-layer GPT-2 with the tiny Llama's tokenizer, saved with save_pretrained."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    out = str(tmp_path_factory.mktemp("gpt2") / "gpt2")
    GPT2LMHeadModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def adapted(model) -> set[str]:
    """Names (last part) of the modules that carry a LoRA adapter."""
    return {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}


def test_all_linear_is_the_default_and_a_list_is_kept(tmp_path):
    assert ModelConfig().lora_target_modules == "all-linear"
    shipped = yaml.safe_load(open(os.path.join(ROOT, "configs", "dpo_lora_tiny.yaml")))
    shipped["model"]["name_or_path"] = str(tmp_path)
    cfg = config_from_dict(shipped)
    assert cfg.model.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_all_linear_adapts_every_gpt2_linear_but_the_head(tiny_gpt2_dir):
    model = load_causal_lm(ModelConfig(name_or_path=tiny_gpt2_dir, lora_r=4))
    assert adapted(model) == {"c_attn", "c_proj", "c_fc"}  # attention and MLP; not lm_head
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_all_linear_on_llama_adapts_attention_and_mlp(tiny_model_dir):
    model = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir, lora_r=4))
    assert adapted(model) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def lora_weights_moved(run_dir) -> bool:
    from safetensors.torch import load_file

    final = os.path.join(run_dir, "final")
    # peft saves all-linear expanded to the module names it found: GPT-2's attention and MLP layers
    targets = json.load(open(os.path.join(final, "adapter_config.json")))["target_modules"]
    assert {t.split(".")[-1] for t in targets} == {"c_attn", "c_proj", "c_fc"}, targets
    weights = load_file(os.path.join(final, "adapter_model.safetensors"))
    # lora_B starts at zero: a non-zero one means the 2 steps trained the adapters
    return any(k.endswith("lora_B.weight") and weights[k].abs().sum() > 0 for k in weights)


@pytest.mark.slow
def test_sft_lora_all_linear_on_gpt2(tiny_gpt2_dir, sft_file, tmp_path):
    cfg = sft_config(tiny_gpt2_dir, sft_file, str(tmp_path), optim__max_steps=2, model__lora_r=4)
    last = Trainer(cfg).train()
    assert math.isfinite(last["train/loss"])
    assert lora_weights_moved(tmp_path / "run")


@pytest.mark.slow
def test_dpo_lora_all_linear_on_gpt2(tiny_gpt2_dir, prefs_file, tmp_path):
    cfg = train_config("dpo", tiny_gpt2_dir, prefs_file, str(tmp_path), PAIR_OPTIM, model__lora_r=4,
                       dpo__reference="adapter")
    last = Trainer(cfg).train()
    assert math.isfinite(last["train/loss"]) and "rewards/margins" in last
    assert lora_weights_moved(tmp_path / "run")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attn_implementation_reaches_the_model(tiny_model_dir, impl):
    model = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir, attn_implementation=impl), trainable=False)
    assert model.config._attn_implementation == impl


def test_missing_attention_kernel_is_one_config_line(tiny_model_dir):
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"model.attn_implementation='flash_attention_2': .*FlashAttention2"):
        load_causal_lm(ModelConfig(name_or_path=tiny_model_dir, attn_implementation="flash_attention_2"))


def test_revision_goes_with_the_policy_path_only():
    cfg = ModelConfig(name_or_path="org/policy", revision="v2", attn_implementation="sdpa")
    assert _load_kwargs(cfg, "org/policy")["revision"] == "v2"
    other = _load_kwargs(cfg, "org/reward-model")
    assert "revision" not in other and other["attn_implementation"] == "sdpa"
    assert "revision" not in _load_kwargs(ModelConfig(name_or_path="org/policy"), "org/policy")


def test_revision_reaches_model_and_tokenizer_loading(tiny_model_dir, sft_file, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = {}
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, path, *args, _original=original, _name=cls.__name__, **kwargs):
            seen[_name] = kwargs.get("revision")
            return _original(klass, path, *args, **{k: v for k, v in kwargs.items() if k != "revision"})

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    cfg = sft_config(tiny_model_dir, sft_file, str(tmp_path), optim__max_steps=1, model__revision="abc123")
    trainer = Trainer(cfg)
    trainer.algorithm.build_model()
    assert seen == {"AutoModelForCausalLM": "abc123", "AutoTokenizer": "abc123"}
