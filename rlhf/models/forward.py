"""Forward passes shared by every algorithm and the evaluation harness.

Left- or right-padded batches both work: position ids are derived from the attention mask.
"""

from __future__ import annotations

import torch

from ..ops import logprobs_from_logits, masked_sum


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] positions counting only real tokens, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, return_entropy: bool = False):
    """[B, T-1] log p(input_ids[:, t+1] | input_ids[:, :t+1]) under the sampling distribution.

    temperature/top_k/top_p must equal the ones used to sample, or PPO's importance ratio is biased.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    logits = out.logits[:, :-1].float()
    logp = logprobs_from_logits(logits, input_ids[:, 1:], temperature=temperature, top_k=top_k, top_p=top_p)
    if return_entropy:
        from ..ops import entropy_from_logits

        return logp, entropy_from_logits(logits, temperature=temperature)
    return logp


def _unwrap(model):
    """The transformers model inside distributed wrappers (DDP, DeepSpeed: `.module`) and peft."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "peft_config") and hasattr(model, "base_model"):
        model = model.base_model.model  # adapters stay active: they are injected in place
    return model


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] scalar head of a sequence-classification model at every position (V(s_t) reads position t).

    The forward goes through `model` itself, wrappers included, so DDP/DeepSpeed see it and sync
    gradients; the per-position head outputs are taken with a hook before the model pools them.
    """
    head = _unwrap(model).score
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask,
              position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    finally:
        handle.remove()
    return captured[-1].squeeze(-1).float()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last real token, for right- or left-padded rows."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def scalar_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] reward-model score read at the last real token of each row."""
    values = token_values(model, input_ids, attention_mask)
    idx = last_token_index(attention_mask)
    return values.gather(1, idx.unsqueeze(1)).squeeze(1)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] summed log-prob of each row's response tokens, [B] their count).

    response_mask [B, T-1] is aligned with token_logprobs: 1 where input_ids[:, t+1] is a response token.
    The length-averaged log-prob (IPO, SimPO-style losses) is sum / count.clamp(min=1).
    """
    logp = token_logprobs(model, input_ids, attention_mask)
    mask = response_mask.to(logp.dtype)
    return masked_sum(logp, mask, dim=-1), mask.sum(-1)
