"""The generation interface every rollout engine implements, and its typed output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import torch


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    do_sample: bool = True


@dataclass
class Rollout:
    """Prompts and their sampled responses.

    prompt_ids:     [B, P] left-padded prompt tokens
    prompt_mask:    [B, P] 1 on real prompt tokens
    response_ids:   [B, R] right-padded response tokens (pad after EOS)
    response_mask:  [B, R] 1 on generated tokens up to and including EOS
    eos:            [B] bool, True where the response ended with EOS (not truncated)
    texts:          decoded responses without special tokens
    logprobs:       [B, R] float32 log-prob of each response token under the sampling distribution (0 on padding),
                    from engines that return it (the static engine); None otherwise
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    eos: torch.Tensor
    texts: list[str]
    logprobs: Optional[torch.Tensor] = None

    @property
    def input_ids(self) -> torch.Tensor:
        """[B, P + R] prompt and response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)


class Engine(Protocol):
    def generate(self, model, tokenizer, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                 batch_size: int = 32, seeds: Optional[Sequence[int]] = None) -> Rollout: ...


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, R], ended_with_eos [B]): tokens up to and including the first EOS are valid."""
    R = response_ids.shape[1]
    is_eos = response_ids == eos_token_id
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.float().argmax(dim=1), torch.full_like(has_eos, R, dtype=torch.long))
    mask = torch.arange(R, device=response_ids.device).unsqueeze(0) <= first.unsqueeze(1)
    return mask.long(), has_eos


def join_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """Concatenate rollouts of different prompt/response widths (left-pad prompts, right-pad responses)."""
    P = max(p.prompt_ids.shape[1] for p in parts)
    R = max(p.response_ids.shape[1] for p in parts)

    def widen(t: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
        extra = width - t.shape[1]
        if extra == 0:
            return t
        fill = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
        return torch.cat([fill, t] if left else [t, fill], dim=1)

    return Rollout(
        prompt_ids=torch.cat([widen(p.prompt_ids, P, pad_token_id, True) for p in parts]),
        prompt_mask=torch.cat([widen(p.prompt_mask, P, 0, True) for p in parts]),
        response_ids=torch.cat([widen(p.response_ids, R, pad_token_id, False) for p in parts]),
        response_mask=torch.cat([widen(p.response_mask, R, 0, False) for p in parts]),
        eos=torch.cat([p.eos for p in parts]),
        texts=[t for p in parts for t in p.texts],
        logprobs=(torch.cat([widen(p.logprobs, R, 0, False) for p in parts])
                  if all(p.logprobs is not None for p in parts) else None),
    )
