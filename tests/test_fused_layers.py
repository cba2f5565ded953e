# Run: .venv/bin/python -m pytest -q tests/test_fused_layers.py
"""rlhf.models.fused_layers: the fused LoRA Linear and SwiGLU MLP forwards give the unfused model's outputs and
gradients (LoRA on all linear layers, two adapters switched with set_adapter, adapters disabled or merged, full
fine-tuning, activation checkpointing, CPU bf16 autocast), save the activations the design removes, and the two
autograd Functions pass gradcheck. Tiny Llama and Qwen2 models (Qwen2: q/k/v with biases), on the CPU."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlhf.config import ConfigError, ModelConfig
from rlhf.models import load_causal_lm
from rlhf.models.fused_layers import apply_fused_layers, lora_linear, swiglu_down

ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 32, 80, 2, 4, 2, 96
PER_LAYER = 7 + 1  # modules patched: LoRA layers q, k, v, o, gate, up, down, and the MLP
NODES = 6 * LAYERS + LAYERS  # fused backward nodes: q, k, v, o, gate, up, and the MLP tail (down_proj within it)
# float32: the forward runs the same ops as peft's (the logits come out equal); the fused backward computes the same
# products as autograd but adds the base and LoRA parts of dL/dx (and q/k/v's, gate/up's) in another order, so
# gradients differ by float32 rounding (~1e-7 of their size, a few such sums over two layers: ~2e-7 measured); 1e-5 of
# each gradient's largest magnitude is far above that and far below any real error (the adapters here move the logits
# by more than their own size, so a wrong or missing term shows at order 1).
LOGIT_TOL, GRAD_TOL = 1e-6, 1e-5


def tiny(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    config_class, model_class = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_class(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                          num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                          tie_word_embeddings=False)
    return model_class(config).train()


def lora_config(**kw) -> LoraConfig:
    # init_lora_weights=False: B is drawn too, so the adapter changes the outputs and A gets a gradient
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **kw})


def with_lora(model: torch.nn.Module, train_embeddings: bool = False, **kw) -> torch.nn.Module:
    """`model` with LoRA on every linear layer; train_embeddings: the input embeddings train too, so that gradients
    flow through every layer when no adapter is in use (disabled or merged)."""
    torch.manual_seed(1)
    model = get_peft_model(model, lora_config(**kw)).train()
    model.get_input_embeddings().weight.requires_grad_(train_embeddings)
    return model


def fused_copy(model: torch.nn.Module, expected: int) -> torch.nn.Module:
    fused = copy.deepcopy(model)
    assert apply_fused_layers(fused) == expected
    return fused


def fused_nodes(out: torch.Tensor) -> int:
    """Backward nodes of the fused Functions in the graph of `out`."""
    seen, stack, count = set(), [out.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__.startswith(("_LoraLinear", "_SwigluDown"))
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return count


def ids_and_mask():
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding in one row
    return ids, mask


def run(model: torch.nn.Module, autocast: bool = False):
    """(logits, {trainable parameter: gradient}, fused backward nodes) of a weighted sum of the logits."""
    ids, mask = ids_and_mask()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, attention_mask=mask).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    (logits.float() * weights).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads, fused_nodes(logits)


def assert_same(plain: torch.nn.Module, fused: torch.nn.Module, fused_expected: int, logit_tol: float = LOGIT_TOL,
                grad_tol: float = GRAD_TOL, autocast: bool = False) -> None:
    logits, grads, none = run(plain, autocast)
    fused_logits, fused_grads, nodes = run(fused, autocast)
    assert none == 0 and nodes == fused_expected
    assert fused_logits.dtype == logits.dtype
    torch.testing.assert_close(fused_logits, logits, atol=logit_tol, rtol=0)
    assert fused_grads.keys() == grads.keys() and any(g is not None for g in grads.values())
    for name, grad in grads.items():
        if grad is None:  # a merged adapter takes no part
            assert fused_grads[name] is None, name
            continue
        assert fused_grads[name].dtype == grad.dtype, name
        torch.testing.assert_close(fused_grads[name], grad, atol=grad_tol * max(1.0, grad.abs().max().item()),
                                   rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_all_linear_same_outputs_and_gradients(arch):
    plain = with_lora(tiny(arch))
    fused = fused_copy(plain, PER_LAYER * LAYERS)
    assert_same(plain, fused, NODES)
    # instances only: the state dict and the class forwards are untouched
    assert fused.state_dict().keys() == plain.state_dict().keys()
    mlp = fused.base_model.model.model.layers[0].mlp
    assert "forward" in mlp.__dict__ and mlp._unfused_forward.__func__ is type(mlp).forward
    assert apply_fused_layers(fused) == PER_LAYER * LAYERS  # idempotent: nothing is wrapped twice
    assert mlp._unfused_forward.__func__ is type(mlp).forward
    assert_same(plain, copy.deepcopy(fused), NODES)  # a copy's forwards are bound to the copy's own modules


def test_two_adapters_switched_with_set_adapter():
    plain = with_lora(tiny())
    fused = fused_copy(plain, PER_LAYER * LAYERS)
    for model in (plain, fused):  # added after fusing: the fused forwards read the layers' adapters at each call
        torch.manual_seed(4)
        model.add_adapter("second", lora_config(r=2, lora_alpha=3))
    for name in ("second", "default", "second"):
        plain.set_adapter(name)
        fused.set_adapter(name)
        assert_same(plain, fused, NODES)


def test_disabled_adapters_give_the_base_model():
    base = tiny("qwen2")
    plain = with_lora(copy.deepcopy(base), train_embeddings=True)
    fused = fused_copy(plain, PER_LAYER * LAYERS)
    ids, mask = ids_and_mask()
    with plain.disable_adapter(), fused.disable_adapter():
        assert_same(plain, fused, 0)  # every layer ran its own forward
        logits, _, _ = run(fused)
    torch.testing.assert_close(logits, base(input_ids=ids, attention_mask=mask).logits.detach(), atol=0, rtol=0)
    assert_same(plain, fused, NODES)  # on again after the context


def test_merged_adapter_falls_back():
    plain = with_lora(tiny(), train_embeddings=True)
    fused = fused_copy(plain, PER_LAYER * LAYERS)
    plain.merge_adapter()
    fused.merge_adapter()
    assert_same(plain, fused, 0)


def test_dropout_and_zero3_weights_fall_back():
    plain = with_lora(tiny(), lora_dropout=0.1)
    fused = fused_copy(plain, PER_LAYER * LAYERS)
    assert run(fused)[2] == 0  # LoRA dropout in training mode: peft's forward (and the MLP's, down_proj being one)
    fused.eval()  # dropout off
    assert run(fused)[2] == NODES
    plain = with_lora(tiny())
    fused = fused_copy(plain, PER_LAYER * LAYERS)
    fused.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.ds_id = 0  # as ZeRO-3 marks them
    assert_same(plain, fused, NODES - 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_fine_tuning_fuses_the_mlp(arch):
    plain = tiny(arch)
    fused = fused_copy(plain, LAYERS)
    assert_same(plain, fused, LAYERS)


def test_gradient_checkpointing():
    base = tiny()
    base.gradient_checkpointing_enable()  # as rlhf.models.loading does, before peft wraps the model
    plain = with_lora(base)
    fused = fused_copy(plain, PER_LAYER * LAYERS)
    assert fused.base_model.model.is_activation_checkpointing
    assert_same(plain, fused, NODES)


def test_liger_style_instance_forward_is_replaced_and_kept_as_fallback():
    """Liger binds its SwiGLU forward on the MLP instance before peft wraps the model: the fused forward replaces
    it and runs it whenever it falls back."""
    model = tiny()
    calls = []

    def liger_like(self, x):
        calls.append(1)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
    for layer in model.model.layers:
        layer.mlp.forward = liger_like.__get__(layer.mlp)
    plain = with_lora(model)
    fused = fused_copy(plain, PER_LAYER * LAYERS)
    assert_same(plain, fused, NODES)
    calls.clear()
    with torch.no_grad():
        fused(input_ids=ids_and_mask()[0])
    assert len(calls) == LAYERS


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_cpu_bf16_autocast_same_as_unfused(weights):
    """Under autocast every matmul runs in bf16 in both, on the same bf16 operands (the logits come out equal); only
    gradient sums run in another order, each rounded to bf16 (8 significant bits: one ulp is 2^-7 of the value's
    binade), and differ by an ulp or so, which carries on through the layers (2.4 ulps of the largest magnitude
    measured with bf16 weights, 0 with float32 ones). 8 ulps of the largest magnitude bounds that and stays far below
    what a wrong or missing term gives (the adapters move the logits by more than their size); dtypes must match
    exactly."""
    plain = with_lora(tiny().to(weights))  # bf16 weights: peft keeps the adapters in float32
    fused = fused_copy(plain, PER_LAYER * LAYERS)
    ulps = 8 * 2.0 ** -7
    logits, _, _ = run(plain, autocast=True)
    assert logits.dtype == torch.bfloat16
    assert_same(plain, fused, NODES, logit_tol=ulps * logits.abs().max().item(), grad_tol=ulps,
                autocast=True)
    assert all(p.grad.dtype == torch.float32 for n, p in fused.named_parameters() if "lora_" in n)


# ---------------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------------


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages one forward saves for backward, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids).logits
    del out
    return sum(storages.values())


def test_saves_less_for_backward():
    """bf16 weights, float32 adapters, bf16 autocast (the 7B set-up). A frozen base layer saves nothing (its input
    gradient needs only W); each unfused LoRA layer saves a bf16 copy of its input for lora_A (x cast to float32 by
    peft, back to bf16 by autocast) and the bf16 casts of A and B; the fused one saves its input itself and the
    parameters. So per layer and token the design removes: q, k, v's three copies for one shared input (2 x hidden),
    gate and up's two for one (hidden), down_proj's copy of h and silu(gate) (2 x intermediate: only gate and up are
    kept); and every adapter's bf16 casts. (o_proj's input may also be shared with what attention saves: not
    counted.)"""
    plain = with_lora(tiny().to(torch.bfloat16))
    fused = fused_copy(plain, PER_LAYER * LAYERS)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    before, after = saved_bytes(plain, ids), saved_bytes(fused, ids)
    adapters = sum(p.numel() for n, p in plain.named_parameters() if "lora_" in n)
    removed = 2 * ((3 * HIDDEN + 2 * INTERMEDIATE) * ids.numel() * LAYERS + adapters)  # bf16: 2 bytes
    print(f"saved for backward: unfused {before} bytes, fused {after} bytes ({after / before:.3f})")
    assert after <= before - removed


# ---------------------------------------------------------------------------------------------------------------------
# The Functions
# ---------------------------------------------------------------------------------------------------------------------


def _randn(*shape, dtype=torch.float64, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


@pytest.mark.parametrize("train_weight", [False, True])
def test_lora_linear_gradcheck(train_weight):
    torch.manual_seed(6)
    x, w, b = _randn(2, 3, 5), _randn(4, 5, grad=train_weight), _randn(4, grad=train_weight)
    a, bb = _randn(2, 5), _randn(4, 2)
    assert torch.autograd.gradcheck(lambda *t: lora_linear(*t, 0.7), (x, w, b, a, bb))
    assert torch.autograd.gradcheck(lambda x, w: lora_linear(x, w), (x, w))
    torch.testing.assert_close(lora_linear(x, w, b, a, bb, 0.7), F.linear(x, w, b) + F.linear(F.linear(x, a), bb) * 0.7)


@pytest.mark.parametrize("lora", [False, True])
def test_swiglu_down_gradcheck(lora):
    torch.manual_seed(7)
    g, u, w, b = _randn(2, 3, 6), _randn(2, 3, 6), _randn(4, 6, grad=not lora), _randn(4, grad=not lora)
    factors = (_randn(2, 6), _randn(4, 2), 1.5) if lora else ()
    assert torch.autograd.gradcheck(lambda *t: swiglu_down(*t, *factors), (g, u, w, b))
    expected = F.linear(F.silu(g) * u, w, b)
    if lora:
        expected = expected + F.linear(F.linear(F.silu(g) * u, factors[0]), factors[1]) * factors[2]
    torch.testing.assert_close(swiglu_down(g, u, w, b, *factors), expected)


def test_lora_linear_dtypes_follow_peft():
    """Under autocast: bf16 matmuls, parameter gradients in float32. Without: bf16 base, float32 adapter (peft casts
    x to the adapter's dtype), the sum rounded to bf16."""
    torch.manual_seed(8)
    x, w = _randn(3, 8, dtype=torch.bfloat16), _randn(6, 8, dtype=torch.bfloat16, grad=False)
    a, b = _randn(2, 8, dtype=torch.float32), _randn(6, 2, dtype=torch.float32)

    def plain_and_fused(reference):
        out = []
        for fn in (reference, lambda: lora_linear(x, w, None, a, b, 2.0)):
            for t in (x, a, b):
                t.grad = None
            y = fn()
            y.float().square().sum().backward()
            out.append((y, x.grad, a.grad, b.grad))
        return out
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = plain_and_fused(lambda: F.linear(x, w) + F.linear(F.linear(x.float(), a), b) * 2.0)
    bare = plain_and_fused(lambda: (F.linear(x, w) + F.linear(F.linear(x.float(), a), b) * 2.0).to(torch.bfloat16))
    for plain, fused in (auto, bare):
        assert [t.dtype for t in fused] == [t.dtype for t in plain] == [torch.bfloat16, torch.bfloat16,
                                                                          torch.float32, torch.float32]
        torch.testing.assert_close(fused[0], plain[0], atol=0, rtol=0)  # the forward: the same ops
        for got, want in zip(fused[1:], plain[1:]):
            torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# model.fused_layers
# ---------------------------------------------------------------------------------------------------------------------


def test_setting_applies_after_peft_and_true_says_why_not():
    ids = ids_and_mask()[0]
    model = load_causal_lm(ModelConfig(name_or_path="tiny", lora_r=4), model=tiny())
    assert fused_nodes(model(input_ids=ids).logits) == NODES
    model = load_causal_lm(ModelConfig(name_or_path="tiny", lora_r=4, fused_layers=False), model=tiny())
    assert fused_nodes(model(input_ids=ids).logits) == 0
    model = load_causal_lm(ModelConfig(name_or_path="tiny", fused_layers=True), model=tiny(), trainable=False)
    assert "forward" not in model.model.layers[0].mlp.__dict__  # frozen: nothing saved for backward, nothing fused
    gelu = tiny()
    gelu.config.hidden_act = "gelu"
    with pytest.raises(ConfigError, match="model.fused_layers=true: nothing to fuse.*hidden_act='gelu'"):
        load_causal_lm(ModelConfig(name_or_path="tiny", fused_layers=True), model=gelu)
