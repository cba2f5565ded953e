"""Rollouts with transformers' `generate`: the plain, always-available engine."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from transformers import LogitsProcessor

from ..data.batching import attention_mask, pad
from ..ops import _sampling_logits
from .base import Rollout, SamplingConfig, join_rollouts, response_mask_from_ids


class SeededSampler(LogitsProcessor):
    """A logits processor that samples every row from its own random stream, for generate(do_sample=False).

    The scores are filtered like the sampler's (temperature, top-k, top-p: ops._sampling_logits, the function the
    training log-probs use), then perturbed with Gumbel noise drawn from a generator seeded for that row; the greedy
    pick argmax(z + G) is a sample of softmax(z) (the Gumbel-max trick). A row's tokens thus depend on its seed and
    its own logits only, not on the rows it shares a batch, a rank or a world size with.
    """

    def __init__(self, seeds: Sequence[int], sampling: SamplingConfig, device: torch.device):
        self.sampling = sampling
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        s = self.sampling
        z = _sampling_logits(scores, s.temperature, s.top_k, s.top_p, upcast=True)
        u = torch.stack([torch.rand(z.shape[-1], generator=g, device=z.device) for g in self.generators])
        tiny = torch.finfo(u.dtype).tiny
        return z - torch.log(-torch.log(u.clamp(min=tiny)))


class HFEngine:
    @torch.no_grad()
    def generate(self, model, tokenizer, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                 batch_size: int = 32, seeds: Optional[Sequence[int]] = None) -> Rollout:
        """seeds: one per prompt, for sampling that depends on the seed and the prompt alone (see SeededSampler);
        None samples from torch's global generator, as `generate(do_sample=True)` does."""
        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
        device = next(model.parameters()).device
        # transformers makes every rank step until all are done (2 all-reduces a token) whenever ZeRO-3 is on. That
        # is needed only while weights are partitioned and fetched per forward; whole weights (Trainer.full_model
        # gathers them once) let each rank generate alone.
        synced = any(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())
        was_training = model.training
        model.eval()
        parts = []
        try:
            for start in range(0, len(prompt_ids), batch_size):
                chunk = prompt_ids[start:start + batch_size]
                ids = pad(chunk, tokenizer.pad_token_id, side="left").to(device)
                mask = attention_mask(chunk, side="left").to(device)
                kwargs = dict(do_sample=sampling.do_sample, max_new_tokens=sampling.max_new_tokens,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              synced_gpus=synced)
                if sampling.do_sample and seeds is not None:
                    kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None,
                                  logits_processor=[SeededSampler(seeds[start:start + batch_size], sampling, device)])
                elif sampling.do_sample:
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
