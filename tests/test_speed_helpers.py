# Run: .venv/bin/python -m pytest -q tests/test_speed_helpers.py
"""The fused-AdamW choice, the import order of ops and config, and the model.liger_kernels setting."""

import pytest
import torch

from rlhf.config import ConfigError
from rlhf.optim import make_adamw


def test_adamw_is_fused_for_cuda_training_only():
    from rlhf.config import OptimConfig

    params = [torch.nn.Parameter(torch.randn(3))]

    o = OptimConfig(lr=0.1, weight_decay=0.01)
    assert make_adamw([{"params": params}], o, "cuda").defaults["fused"] is True  # built before the move to the GPU
    assert not make_adamw([{"params": params}], o, "cpu").defaults["fused"]


def test_adamw_under_deepspeed_keeps_the_default(monkeypatch):
    from rlhf.config import OptimConfig

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    params = [torch.nn.Parameter(torch.randn(3))]
    assert not make_adamw([{"params": params}], OptimConfig(), "cuda").defaults["fused"]


def test_fused_and_default_adamw_take_the_same_step():
    """One AdamW step from the same state: the fused kernel and the default loop agree to float32 rounding
    (a few ulps of |p| ~ 1, i.e. ~1e-6)."""
    from rlhf.config import OptimConfig

    o = OptimConfig(lr=0.1, weight_decay=0.01)
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64))
    b = torch.nn.Parameter(a.detach().clone())
    fused, plain = make_adamw([{"params": [a]}], o, "cuda"), make_adamw([{"params": [b]}], o, "cpu")
    for _ in range(3):
        g = torch.randn(64)
        a.grad, b.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_ops_does_not_import_config():
    """config -> losses -> ops must not lead back to config: no import of config anywhere in ops.py, lazy or not."""
    import ast

    import rlhf.ops

    tree = ast.parse(open(rlhf.ops.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.split(".")[-1] == "config"}, imported


def test_liger_setting_is_auto_or_a_bool():
    from rlhf.config import config_from_dict

    base = {"algorithm": "sft", "model": {"name_or_path": "org/model"}, "data": {"train": "org/data"}}
    for value in ("auto", True, False):
        cfg = config_from_dict({**base, "model": {**base["model"], "liger_kernels": value}})
        assert cfg.model.liger_kernels == value
    with pytest.raises(ConfigError):
        config_from_dict({**base, "model": {**base["model"], "liger_kernels": "yes"}})


def test_liger_true_without_cuda_says_so():
    from rlhf.models.loading import apply_liger_kernels

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only message")
    assert apply_liger_kernels(torch.nn.Linear(2, 2), "auto") is False
    with pytest.raises(ConfigError, match="CUDA"):
        apply_liger_kernels(torch.nn.Linear(2, 2), True)


def test_liger_patches_only_the_instance_it_is_applied_to(monkeypatch):
    """Liger's instance patch also rebinds classes and apply_rotary_pos_emb in the model's transformers module (as
    liger-kernel 0.8 does); a model built afterwards (a critic after a reward model) must get transformers' own."""
    import sys
    import types

    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    from rlhf.models.loading import apply_liger_kernels

    class FakeNorm(torch.nn.Module):
        pass

    calls = []

    def fake_apply(model, rope, rms_norm, swiglu, **_):
        calls.append(rope)
        modeling_llama.LlamaRMSNorm = FakeNorm  # what liger's apply_liger_kernel_to_llama does at module level
        modeling_llama.liger_added_name = 1
        if rope:
            modeling_llama.apply_rotary_pos_emb = lambda *a, **k: None
        for layer in model.model.layers:  # and per instance
            layer.input_layernorm.forward = types.MethodType(lambda self, x: x * 2, layer.input_layernorm)

    fake = types.ModuleType("liger_kernel.transformers.monkey_patch")
    fake._apply_liger_kernel_to_instance = fake_apply
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    norm_cls, rope = modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb
    cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    first = LlamaForCausalLM(cfg)
    assert apply_liger_kernels(first, "auto") is True
    assert calls == [False]  # RoPE: a module-level swap only, so not asked for
    assert modeling_llama.LlamaRMSNorm is norm_cls and modeling_llama.apply_rotary_pos_emb is rope
    assert not hasattr(modeling_llama, "liger_added_name")
    x = torch.ones(1, 8)
    assert torch.equal(first.model.layers[0].input_layernorm(x), 2 * x)  # the patched instance keeps its swap
    second = LlamaForCausalLM(cfg)
    assert type(second.model.layers[0].input_layernorm) is norm_cls
