"""Models: loading through from_pretrained, tiny offline models, and shared forward passes."""

from .forward import last_token_index, position_ids_from_mask, scalar_scores, token_logprobs, token_values
from .loading import (DTYPES, disable_dropout, ensure_pad_token, keep_score_bias_, load_causal_lm,
                      load_reward_model, load_scalar_model, load_tokenizer, saved_pretrained)

__all__ = [
    "DTYPES", "disable_dropout", "ensure_pad_token", "keep_score_bias_", "last_token_index", "load_causal_lm",
    "load_reward_model", "load_scalar_model", "load_tokenizer", "position_ids_from_mask", "saved_pretrained", "scalar_scores",
    "token_logprobs", "token_values",
]
from .reference import adapters_disabled, ema_update_, frozen_copy, is_peft  # noqa: E402
from .sharded import gathered, whole_fsdp_model, whole_loading, whole_model, zero_stage  # noqa: E402
