"""Fused LoRA linear layers and SwiGLU MLP tails that save less for backward (pure PyTorch, CPU and CUDA).

peft's LoRA forward, `base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`, casts x to the adapter dtype (float32)
first; under bf16 autocast lora_A then casts it back, so each LoRA layer saves a fresh bf16 copy of its input: q, k
and v three copies of one normed hidden state, gate and up two more, o_proj one, down_proj one of the
intermediate-size h = silu(gate) * up. A SwiGLU MLP also saves silu(gate) (and h itself when down_proj's weight
trains). Here:

- `lora_linear`: y = x W^T + b + s (x A^T) B^T saving x itself (the tensor passed in: q, k and v share one saved
  storage) and the rank-r t = x A^T;
- `swiglu_down`: y = down(silu(g) * u) saving only g and u (and t), recomputing h in backward.

The values and dtypes are those of the unfused modules (under autocast every matmul in the autocast dtype, parameter
gradients in the parameters' own dtype); only the summation order of the gradients can differ.
`apply_fused_layers(model)` binds the fused forwards on module instances (never the classes: state dicts and peft's
save/load are untouched); each call checks whether the layer can be fused as it stands and otherwise runs the
forward it replaced (adapters disabled or merged, several or no active adapters, dropout, DoRA and other variants,
LoRA bias, ZeRO-3 partitioned weights, no gradient being recorded).
"""

from __future__ import annotations

import types
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# (A, B, scaling) of a LoRA adapter
Lora = Optional[tuple[Tensor, Tensor, float]]


def compute_dtypes(device: str, x_dtype: torch.dtype, lora_weight: Optional[Tensor]
                    ) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the base matmul, dtype of the LoRA matmuls) as the unfused modules compute them: the autocast dtype
    for both under autocast; else the input's for the base and the adapter's for LoRA (peft casts x to it)."""
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return dtype, dtype
    return x_dtype, x_dtype if lora_weight is None else lora_weight.dtype


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora: Lora, dtypes: tuple[torch.dtype, torch.dtype]
             ) -> tuple[Tensor, Optional[Tensor]]:
    """(y, t = x A^T): the base and LoRA terms in their dtypes, added and rounded as peft adds them."""
    base_dtype, lora_dtype = dtypes
    y = F.linear(x.to(base_dtype), weight.to(base_dtype), None if bias is None else bias.to(base_dtype))
    if lora is None:
        return y, None
    a, b, scaling = lora
    t = F.linear(x.to(lora_dtype), a.to(lora_dtype))
    return (y + F.linear(t, b.to(lora_dtype)) * scaling).to(y.dtype), t


def _backward(gy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], lora: Lora, t: Optional[Tensor],
              dtypes: tuple[torch.dtype, torch.dtype], needs: tuple[bool, ...]) -> tuple[Optional[Tensor], ...]:
    """(gx, gW, gb, gA, gB) of `_forward`, None where `needs` (x, W, b, A, B) says no gradient is wanted."""
    base_dtype, lora_dtype = dtypes
    gx = gw = gbias = ga = gb = None
    gy2 = gy.reshape(-1, gy.shape[-1]).to(base_dtype)
    if needs[0]:
        gx = (gy.to(base_dtype) @ weight.to(base_dtype)).to(x.dtype)
    if needs[1]:
        gw = (gy2.t() @ x.reshape(-1, x.shape[-1]).to(base_dtype)).to(weight.dtype)
    if needs[2] and bias is not None:
        gbias = gy2.sum(0).to(bias.dtype)
    if lora is not None and (needs[0] or needs[3] or needs[4]):
        a, b, scaling = lora
        gs = gy.to(lora_dtype) * scaling
        gs2 = gs.reshape(-1, gs.shape[-1])
        if needs[4]:
            gb = (gs2.t() @ t.reshape(-1, t.shape[-1])).to(b.dtype)
        if needs[0] or needs[3]:
            gt = gs @ b.to(lora_dtype)
            if needs[3]:
                ga = (gt.reshape(-1, gt.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(lora_dtype)).to(a.dtype)
            if needs[0]:
                gx = gx + (gt @ a.to(lora_dtype)).to(x.dtype)
    return gx, gw, gbias, ga, gb


def _lora_of(a: Optional[Tensor], b: Optional[Tensor], scaling: float) -> Lora:
    return None if a is None else (a, b, scaling)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling, base_dtype, lora_dtype):
        dtypes = (base_dtype, lora_dtype)
        with torch.autocast(x.device.type, enabled=False):
            y, t = _forward(x, weight, bias, _lora_of(a, b, scaling), dtypes)
        ctx.save_for_backward(x, weight, bias, a, b, t)
        ctx.scaling, ctx.dtypes = scaling, dtypes
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, a, b, t = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            grads = _backward(gy, x, weight, bias, _lora_of(a, b, ctx.scaling), t, ctx.dtypes,
                              ctx.needs_input_grad[:5])
        return (*grads, None, None, None)


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, lora_a: Optional[Tensor] = None,
                lora_b: Optional[Tensor] = None, scaling: float = 1.0) -> Tensor:
    """y = x W^T + b + scaling * (x A^T) B^T (no LoRA term when lora_a is None), saving for backward only x (the
    tensor passed in) and the rank-r x A^T. Values and dtypes as peft's LoRA Linear (F.linear without LoRA), also
    under autocast."""
    return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, scaling, *compute_dtypes(x.device.type, x.dtype, lora_a))


class _SwigluDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u, weight, bias, a, b, scaling, base_dtype, lora_dtype):
        dtypes = (base_dtype, lora_dtype)
        with torch.autocast(g.device.type, enabled=False):
            y, t = _forward(F.silu(g) * u, weight, bias, _lora_of(a, b, scaling), dtypes)
        ctx.save_for_backward(g, u, weight, bias, a, b, t)
        ctx.scaling, ctx.dtypes = scaling, dtypes
        return y

    @staticmethod
    def backward(ctx, gy):
        g, u, weight, bias, a, b, t = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with torch.autocast(g.device.type, enabled=False):
            act = F.silu(g)  # recomputed: cheap element-wise work instead of two saved intermediate-size tensors
            gh, gw, gbias, ga, gb = _backward(gy, act * u, weight, bias, _lora_of(a, b, ctx.scaling), t, ctx.dtypes,
                                              (needs[0] or needs[1], *needs[2:6]))
            gg = gu = None
            if needs[0]:
                gg = torch.ops.aten.silu_backward(gh * u, g).to(g.dtype)  # autograd's own SiLU derivative
            if needs[1]:
                gu = (gh * act).to(u.dtype)
        return gg, gu, gw, gbias, ga, gb, None, None, None


def swiglu_down(g: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor] = None, lora_a: Optional[Tensor] = None,
                lora_b: Optional[Tensor] = None, scaling: float = 1.0) -> Tensor:
    """down(silu(g) * u) with down = `lora_linear`'s x W^T + b (+ scaling * (x A^T) B^T), saving for backward only g
    and u (and the rank-r h A^T): h = silu(g) * u and silu(g) are recomputed in backward. The gradients cover a
    trainable W (full fine-tuning) as well as the LoRA factors."""
    dtypes = compute_dtypes(g.device.type, torch.promote_types(g.dtype, u.dtype), lora_a)
    return _SwigluDown.apply(g, u, weight, bias, lora_a, lora_b, scaling, *dtypes)


# ---------------------------------------------------------------------------------------------------------------------
# Patching model instances
# ---------------------------------------------------------------------------------------------------------------------


def _partitioned(weight: Tensor) -> bool:
    """A DeepSpeed ZeRO-3 partitioned parameter: gathered only by its module's hooks, which a direct read bypasses."""
    return hasattr(weight, "ds_id")


def lora_parts(layer) -> Optional[tuple]:
    """(W, b, A, B, scaling) for `lora_linear` when peft's LoRA `layer` runs exactly one plain adapter on a plain
    nn.Linear now, else None (the layer's own forward is then run)."""
    base = layer.base_layer
    if layer.disable_adapters or layer.merged or type(base) is not torch.nn.Linear or _partitioned(base.weight):
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A:
        return None
    name = active[0]
    dropout = layer.lora_dropout[name]
    if not (isinstance(dropout, torch.nn.Identity)
            or (isinstance(dropout, torch.nn.Dropout) and (dropout.p == 0 or not dropout.training))):
        return None
    if (name in layer.lora_variant or layer.use_dora.get(name) or layer.lora_bias.get(name)
            or getattr(layer, "fan_in_fan_out", False)):
        return None
    a, b = layer.lora_A[name], layer.lora_B[name]
    if type(a) is not torch.nn.Linear or type(b) is not torch.nn.Linear or a.bias is not None or b.bias is not None:
        return None
    if a.weight.dtype != b.weight.dtype or not getattr(layer, "cast_input_dtype_enabled", True):
        return None
    return base.weight, base.bias, a.weight, b.weight, layer.scaling[name]


def _fused_lora_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    parts = lora_parts(self) if torch.is_grad_enabled() and not args and not kwargs else None
    if parts is None:
        return self._unfused_forward(x, *args, **kwargs)
    return lora_linear(x, *parts)


def _patched_with(module: torch.nn.Module, forward: Callable) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is forward


def _down_parts(down: torch.nn.Module) -> Optional[tuple]:
    """`swiglu_down`'s (W, b[, A, B, scaling]) for the MLP's down projection as it stands now (a plain nn.Linear or a
    LoRA layer patched here), or None."""
    if type(down) is torch.nn.Linear:
        return None if _partitioned(down.weight) else (down.weight, down.bias)
    return lora_parts(down) if _patched_with(down, _fused_lora_forward) else None


def _fused_mlp_forward(self, x: Tensor) -> Tensor:
    parts = _down_parts(self.down_proj) if torch.is_grad_enabled() else None
    if parts is None:
        return self._unfused_forward(x)
    return swiglu_down(self.gate_proj(x), self.up_proj(x), *parts)


def is_swiglu_mlp(module: torch.nn.Module, config) -> bool:
    """A LLaMA/Qwen2-style MLP, down_proj(act_fn(gate_proj(x)) * up_proj(x)) with act_fn SiLU."""
    if not type(module).__name__.endswith("MLP"):
        return False
    hidden_act = getattr(getattr(module, "config", None) or config, "hidden_act", None)
    act_fn = getattr(module, "act_fn", None)
    silu = isinstance(act_fn, torch.nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"  # transformers' own SiLU
    projections = ("gate_proj", "up_proj", "down_proj")
    return (hidden_act in ("silu", "swish") and silu
            and all(isinstance(getattr(module, n, None), torch.nn.Module) for n in projections))


def _bind(module: torch.nn.Module, forward: Callable) -> None:
    """Bind `forward` on this instance, keeping the forward it replaces (the class's, or Liger's bound one) as the
    fallback."""
    module._unfused_forward = module.forward
    module.forward = types.MethodType(forward, module)


def apply_fused_layers(model: torch.nn.Module) -> int:
    """Bind the fused forwards on every peft LoRA Linear over an nn.Linear and every SwiGLU MLP of `model` (in
    place; call it after peft wraps the model and after Liger's kernels). Returns how many modules now run them;
    modules already patched count again and are not patched twice."""
    from peft.tuners.lora import Linear as LoraLinear

    config = getattr(model, "config", None)
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear:
            forward = _fused_lora_forward
        elif is_swiglu_mlp(module, config):
            forward = _fused_mlp_forward
        else:
            continue
        if not _patched_with(module, forward):
            _bind(module, forward)
        count += 1
    return count
