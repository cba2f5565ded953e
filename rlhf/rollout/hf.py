"""Rollouts with transformers' `generate`: the plain, always-available engine."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor

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


# Settings of a model's generation_config that say nothing about which token comes next (ids, lengths, caching,
# output format; whether to sample at all is the caller's SamplingConfig.do_sample). Every other non-default setting
# (repetition_penalty, no_repeat_ngram_size, min_new_tokens, temperature, bad_words_ids, ...) reshapes the sampling
# distribution.
NEUTRAL_SETTINGS = frozenset({
    "do_sample", "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "max_length",
    "max_new_tokens", "use_cache", "cache_implementation", "cache_config", "return_dict_in_generate", "output_scores", "output_logits",
    "output_attentions", "output_hidden_states", "transformers_version", "_from_model_config", "num_return_sequences",
})


def ignored_generation_settings(model) -> dict:
    """The settings of `model.generation_config` that would change the sampling distribution and that rollouts
    ignore ({} for a plain config). Rollouts sample from exactly temperature, top-k and top-p (SamplingConfig): the
    distribution every training log-prob scores (ops.logprobs_from_logits); a repetition penalty or an n-gram ban
    would make the samples come from a distribution the old log-probs, the KL and the ratio never see."""
    own = getattr(model, "generation_config", None)
    if own is None:
        return {}
    defaults = GenerationConfig().to_dict()
    return {k: v for k, v in own.to_diff_dict().items()
            if k not in NEUTRAL_SETTINGS and v is not None and v != defaults.get(k)}


def clean_generation_config(sampling: SamplingConfig, tokenizer, seeded: bool) -> GenerationConfig:
    """Only what SamplingConfig says, plus EOS and pad: nothing from the model's generation_config."""
    config = GenerationConfig(max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    if sampling.do_sample and not seeded:
        config.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    else:  # greedy; or SeededSampler does the sampling, as a processor on the raw scores
        config.update(do_sample=False)
    return config


@contextmanager
def without_own_generation_config(model) -> Iterator[None]:
    """Within the block, every module of `model` carrying a generation_config (the transformers model, a peft
    wrapper) carries a blank one. transformers fills each setting a passed generation_config leaves unset (None)
    from model.generation_config; a blank one leaves nothing to fill from (repetition_penalty, bad_words_ids, ...)."""
    swapped = []
    for module in model.modules():
        if isinstance(getattr(module, "generation_config", None), GenerationConfig):
            swapped.append((module, "generation_config" in module.__dict__, module.generation_config))
            module.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for module, own, config in reversed(swapped):
            if own:
                module.generation_config = config
            else:
                del module.generation_config


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
                seeded = sampling.do_sample and seeds is not None
                processors = [SeededSampler(seeds[start:start + batch_size], sampling, device)] if seeded else []
                # compiled decoder layers (model.compile_layers) run eager here: each decoding step's cache state
                # would compile them again
                with without_own_generation_config(model), torch.compiler.set_stance("force_eager"):
                    out = model.generate(input_ids=ids, attention_mask=mask, synced_gpus=synced,
                                         generation_config=clean_generation_config(sampling, tokenizer, seeded),
                                         logits_processor=processors)
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
