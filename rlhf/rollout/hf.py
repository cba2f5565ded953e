"""Rollouts with transformers' `generate`: the plain, always-available engine."""

from __future__ import annotations

from typing import Sequence

import torch

from ..data.batching import attention_mask, pad
from .base import Rollout, SamplingConfig, join_rollouts, response_mask_from_ids


class HFEngine:
    @torch.no_grad()
    def generate(self, model, tokenizer, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                 batch_size: int = 32) -> Rollout:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        parts = []
        try:
            for start in range(0, len(prompt_ids), batch_size):
                chunk = prompt_ids[start:start + batch_size]
                ids = pad(chunk, tokenizer.pad_token_id, side="left").to(device)
                mask = attention_mask(chunk, side="left").to(device)
                kwargs = dict(do_sample=sampling.do_sample, max_new_tokens=sampling.max_new_tokens,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                if sampling.do_sample:
                    kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
                else:
                    kwargs.update(temperature=None, top_k=None, top_p=None)
                out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
                response = out[:, ids.shape[1]:]
                if response.shape[1] == 0:  # max_new_tokens == 0
                    response = torch.full((ids.shape[0], 1), tokenizer.pad_token_id, device=device)
                rmask, eos = response_mask_from_ids(response, tokenizer.eos_token_id)
                response = torch.where(rmask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
                texts = tokenizer.batch_decode(response * rmask + tokenizer.pad_token_id * (1 - rmask),
                                               skip_special_tokens=True)
                parts.append(Rollout(ids, mask, response, rmask, eos, texts))
        finally:
            model.train(was_training)
        return join_rollouts(parts, tokenizer.pad_token_id)
