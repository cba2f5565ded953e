"""`rlhf export CHECKPOINT OUT`: a checkpoint or final/ folder as one plain transformers model.

    rlhf export runs/sft/run/checkpoints/step_000040 exported/sft-40 --dtype bfloat16
    AutoModelForCausalLM.from_pretrained("exported/sft-40")       # no peft, no rlhf needed

A LoRA folder (adapter_config.json) is loaded over its base and merged (peft's merge_and_unload); a full model is
copied. The merge runs in float32 whatever the stored dtype, then the weights are cast to --dtype (default: the
dtype the model was saved in). A reward model or critic stays a sequence-classification model, its calibration
shift in config.score_bias as in final/. A PPO folder's policy is exported; its critic is CHECKPOINT/critic.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

from .config import ConfigError, ModelConfig

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def _model_config(path: str) -> tuple[dict, Optional[dict]]:
    """(config.json of the model or of the adapter's base, adapter_config.json or None); ConfigError naming the
    path when the folder holds neither."""
    from .models.loading import ADAPTER_CONFIG, adapter_base

    if not os.path.isdir(path):
        raise ConfigError(f"export: '{path}' is not a folder; expected a checkpoint folder or final/ of an rlhf run")
    base = adapter_base(path)
    if base:  # the base: a local folder or a hub name
        from transformers import AutoConfig

        with open(os.path.join(path, ADAPTER_CONFIG)) as f:
            adapter = json.load(f)
        try:
            return AutoConfig.from_pretrained(os.path.expanduser(base)).to_dict(), adapter
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"export: {os.path.join(path, ADAPTER_CONFIG)} names the base '{base}', which could "
                              f"not be loaded: {first}") from None
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        hint = f" (did you mean {os.path.join(path, 'final')}?)" if os.path.isdir(os.path.join(path, "final")) else ""
        raise ConfigError(f"export: '{path}' is not a model folder: it has neither config.json nor {ADAPTER_CONFIG}"
                          f"{hint}")
    with open(config) as f:
        return json.load(f), None


def export_model(src: str, out: str, dtype: Optional[str] = None, overwrite: bool = False) -> str:
    """Write `src` (full model or LoRA adapter folder) merged into `out`; returns `out`."""
    from . import checkpoints as ckpt
    from .models import DTYPES, keep_score_bias_, load_causal_lm, load_scalar_model, load_tokenizer
    from .models.loading import adapter_base, has_tokenizer

    config, adapter = _model_config(src)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise ConfigError(f"export: '{out}' exists and is not empty; pass --overwrite to replace it")
    scalar = (adapter or {}).get("task_type") == "SEQ_CLS" or any(
        a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    target = DTYPES[dtype or (stored if stored in DTYPES else "float32")]
    tok_path = src if has_tokenizer(src) else adapter_base(src) or src
    tokenizer = load_tokenizer(tok_path, field="CHECKPOINT")
    cfg = ModelConfig(name_or_path=src, dtype="float32")  # merge in float32, cast after
    if scalar:
        model = load_scalar_model(src, cfg, tokenizer, field="CHECKPOINT")
        keep_score_bias_(model)
    else:
        model = load_causal_lm(cfg, tokenizer, trainable=False, field="CHECKPOINT")
    model = model.to(target)
    with ckpt.atomic_folder(out, lambda: ckpt.state_bytes(model)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rlhf export", description=(
        "Write a checkpoint folder or final/ (full or LoRA) as one model with its tokenizer, loadable with plain "
        "AutoModelForCausalLM.from_pretrained(OUT): LoRA adapters are merged into their base."))
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="A run's checkpoints/step_N/ or final/ folder (for a PPO "
                   "run the policy; its critic is CHECKPOINT/critic), or any from_pretrained folder.")
    p.add_argument("out", metavar="OUT", help="Output folder; refused when it exists and is not empty.")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="dtype of the written weights (default: the dtype the model was saved in); LoRA merges in "
                        "float32 first.")
    p.add_argument("--overwrite", action="store_true", help="Replace OUT when it exists.")
    a = p.parse_args(argv)
    out = export_model(a.checkpoint, a.out, a.dtype, a.overwrite)
    print(f"exported {a.checkpoint} to {out}")
    return 0
