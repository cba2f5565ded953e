"""Load tokenizers, causal LMs and scalar-head models through `from_pretrained`.

A hub name, a local folder and a folder written by `rlhf init-model` all take this one path. A LoRA adapter folder
(adapter_config.json + adapter_model.safetensors: a LoRA run's final/ or checkpoint) loads as its base model
(`base_model_name_or_path` in adapter_config.json) with the adapter merged in: what it scores and generates is the
trained model's, and training from it starts from that model (with fresh adapters when model.lora_r > 0).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ..config import ConfigError, ModelConfig, check_local_path
from .forward import _unwrap

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _from_pretrained(loader, path: str, field: str, **kwargs):
    # a missing local path fails here at once; from_pretrained would take it for a hub id and retry the hub
    check_local_path(field, path, "a local model folder")
    try:
        return loader.from_pretrained(os.path.expanduser(path), **kwargs)
    except ImportError as e:
        # transformers refuses an attention kernel whose package is missing (flash_attention_2 without flash-attn)
        if "attn_implementation" not in kwargs:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"model.attn_implementation={kwargs['attn_implementation']!r}: {first}") from None
    except (OSError, ValueError) as e:
        where = "local folder" if os.path.isdir(path) else "hub name or local folder"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{field}='{path}': could not load as a {where}: {first}") from None


ADAPTER_CONFIG = "adapter_config.json"
# a calibrated reward model's statistics; in a LoRA reward-model folder (an adapter, no config.json of its own) also
# the home of its score shift, "score_bias", which sits in config.score_bias of a whole model
NORMALIZATION_FILE = "reward_normalization.json"


def adapter_base(path: str) -> Optional[str]:
    """The base model of a LoRA adapter folder (from its adapter_config.json); None for any other path."""
    config = os.path.join(os.path.expanduser(path), ADAPTER_CONFIG)
    if not os.path.isfile(config):
        return None
    try:
        with open(config) as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{config}: not a readable adapter config ({e})") from None
    if not base:
        raise ConfigError(f"{config}: no base_model_name_or_path; the adapter cannot be loaded without its base")
    return base


def _load(loader, path: str, field: str, tokenizer=None, fix_base=None, **kwargs):
    """`loader.from_pretrained(path)`, or for an adapter folder its base with the adapter merged in. `fix_base`
    takes what from_pretrained returned and gives the model, before any adapter goes over it."""
    base = adapter_base(path)
    where = field if base is None else f"base_model_name_or_path in {os.path.join(path, ADAPTER_CONFIG)}"
    loaded = _from_pretrained(loader, base or path, where, **kwargs)
    model = fix_base(loaded) if fix_base else loaded
    if base is None:
        return model
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # loaded straight into ZeRO-3 partitions
        raise ConfigError(f"{field}='{path}' is a LoRA adapter folder, which cannot be merged into a ZeRO-3 "
                          f"partitioned model as it loads; merge it first: rlhf export {path} MERGED_FOLDER")
    if tokenizer is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))  # as training did before it added the adapter
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, os.path.expanduser(path)).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{field}='{path}': could not load the LoRA adapter over {base}: {first}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def has_tokenizer(path: str) -> bool:
    """Whether `path` names a tokenizer: a hub name, or a local folder with tokenizer files. A model folder without
    them is not one (AutoTokenizer would otherwise build an empty tokenizer of the config's model type)."""
    return not os.path.isdir(path) or any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)


def load_tokenizer(path: str, field: str = "model.tokenizer", trust_remote_code: bool = False,
                   revision: Optional[str] = None):
    from transformers import AutoTokenizer

    if not has_tokenizer(path):
        raise ConfigError(f"{field}='{path}': the folder holds no tokenizer files (one of "
                          f"{', '.join(TOKENIZER_FILES)}); set model.tokenizer to the tokenizer's folder")
    extra = {"revision": revision} if revision else {}
    return ensure_pad_token(_from_pretrained(AutoTokenizer, path, field, trust_remote_code=trust_remote_code,
                                             **extra))


def ensure_pad_token(tok):
    """The tokenizer, given a pad token of its own when it has none (in place)."""
    if tok.pad_token_id is None:
        # A pad distinct from EOS keeps "is this the end of the response?" unambiguous.
        tok.add_special_tokens({"pad_token": "<|pad|>"})
    return tok


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    cfg = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, name, None), float):
            setattr(cfg, name, 0.0)


def apply_liger_kernels(model, setting) -> bool:
    """Swap in Liger's fused RMSNorm and SwiGLU MLP (Triton, CUDA only) on this model instance, and on no other, when
    `setting` (model.liger_kernels) asks for them; returns whether they were applied.

    auto: on CUDA when liger-kernel is installed. Liger's own LM-head loss is left off: log-probs come from
    rlhf.models.forward, which serves every algorithm (and the reward model has no LM head).
    """
    if setting is False or not torch.cuda.is_available():
        if setting is True and not torch.cuda.is_available():
            raise ConfigError("model.liger_kernels=true: Liger's kernels need a CUDA device")
        return False
    try:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
    except ImportError:
        if setting is True:
            raise ConfigError("model.liger_kernels=true: liger-kernel is not installed (pip install 'rlhf[liger]')")
        return False
    # Liger also rebinds names in the model's transformers module (its RMSNorm and MLP classes, apply_rotary_pos_emb),
    # which every model built later in the process would pick up: a critic or policy that asked for no Liger
    # kernels, or whose layers are compiled (dynamo cannot trace Liger's autograd functions there). The module's
    # names are put back; this instance keeps its swapped norms and MLPs. RoPE is a module-level swap only: off.
    import sys

    module = sys.modules[type(model).__module__]
    before = dict(vars(module))
    try:
        _apply_liger_kernel_to_instance(model=model, rope=False, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
    finally:
        for name in [n for n in vars(module) if n not in before]:
            delattr(module, name)
        for name, value in before.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
    return True


def apply_pair_packing(model, setting: str) -> str:
    """Resolve model.pair_packing for this model and set it as `model.pair_packing` (read by rlhf.models.forward):
    the flat layouts switch the model's attention from SDPA to shared_prefix.SDPA_FLEX (SDPA for every forward but the
    flat pair layout's, which torch's varlen flash attention or FlexAttention runs); "padded" leaves the model as it is.

    auto: on CUDA when the model runs SDPA: "varlen" when torch has varlen attention, the GPU is Ampere or newer and
    the weights are 16-bit (what its flash kernel runs on), else "auto" with FlexAttention (each micro-batch flat when the padded layout would pad it
    beyond shared_prefix.FLAT_ABOVE_PADDING, padded otherwise); "padded" elsewhere. varlen and flex: every micro-batch
    flat, also on the CPU (reference implementations; tests), an error where it cannot be had.
    """
    from .shared_prefix import SDPA_FLEX, VARLEN_PARAMS, flex_available, use_sdpa_flex

    layout, requested = "padded", setting
    if setting in ("varlen", "flex") or (setting == "auto" and torch.cuda.is_available()):
        if (setting == "auto" and VARLEN_PARAMS is not None and torch.cuda.get_device_capability()[0] >= 8
                and getattr(model, "dtype", None) in (torch.bfloat16, torch.float16)):
            setting = "varlen"  # flash attention's dtypes, on Ampere or newer
        impl = getattr(model.config, "_attn_implementation", None)
        why = None
        if impl not in ("sdpa", SDPA_FLEX):
            why = f"it needs sdpa attention (model.attn_implementation unset or sdpa), and the model runs {impl!r}"
        elif setting == "varlen" and VARLEN_PARAMS is None:
            why = "this torch has no varlen attention (torch.nn.attention.varlen)"
        elif setting in ("flex", "auto") and not flex_available():
            why = "FlexAttention is not available in this torch"
        elif not use_sdpa_flex(model):
            why = "the model's code cannot switch its attention implementation"
        if why is None:
            layout = setting
        elif requested != "auto":
            raise ConfigError(f"model.pair_packing={setting}: {why}")
    model.pair_packing = layout
    return layout


def apply_fused(model, setting) -> int:
    """Bind rlhf.models.fused_layers' forwards on `model`'s LoRA Linear layers and SwiGLU MLPs when `setting`
    (model.fused_layers) asks for them; returns how many modules run them. Call it after peft wraps the model and
    after Liger's kernels, so that the fused MLP forward is the one that runs.

    auto: on (exact, pure PyTorch); true: on, and an error when the model has nothing to fuse."""
    if setting is False:
        return 0
    from .fused_layers import apply_fused_layers

    count = apply_fused_layers(model)
    if setting is True and count == 0:
        act = getattr(getattr(model, "config", None), "hidden_act", None)
        raise ConfigError(f"model.fused_layers=true: nothing to fuse in {type(model).__name__}: no peft LoRA Linear "
                          f"layer over a torch.nn.Linear, and no gate_proj/up_proj/down_proj MLP with a SiLU "
                          f"activation (hidden_act={act!r}); set model.fused_layers: auto or false")
    return count


def _sharded_run() -> Optional[str]:
    """"ZeRO-3" or "FSDP" when the running accelerate set-up shards parameters, else None."""
    from accelerate.state import AcceleratorState, DistributedType

    if not AcceleratorState._shared_state:  # no Accelerator yet (library use, tests)
        return None
    from .sharded import zero_stage

    state = AcceleratorState()
    if zero_stage(state) == 3:
        return "ZeRO-3"
    return "FSDP" if state.distributed_type == DistributedType.FSDP else None


def compiles_layers(setting) -> bool:
    """Whether model.compile_layers = `setting` compiles the trained model's decoder layers in this process."""
    if setting is False:
        return False
    sharded = _sharded_run()
    if setting is True and sharded:
        raise ConfigError(f"model.compile_layers=true: not under {sharded}, whose parameter hooks break the compiled "
                          f"graphs; set model.compile_layers: auto or false")
    return not sharded and (setting is True or torch.cuda.is_available())


def decoder_layers(model: torch.nn.Module) -> list:
    """The model's repeated blocks: the modules whose class the model names in `_no_split_modules` (transformers'
    list of what must stay whole on one device: the decoder layer), through peft's wrappers."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_layers(model: torch.nn.Module, mode: str = "default") -> int:
    """torch.compile each decoder layer in place (nn.Module.compile: parameter names and state dicts unchanged).
    Every layer runs the same code with its own parameters as inputs, so one compile serves all of them, per mode
    (training, no-grad). Shapes are symbolic from the first compile (dynamic=True): rows of new lengths and batches
    of new sizes reuse it, where automatic dynamic shapes would compile again for the second length and again for
    the second batch size. mode (model.compile_mode) "reduce-overhead" also captures the compiled code in CUDA
    graphs, one per concrete shape (the Trainer marks each step's start: mark_step). Returns how many layers were
    compiled."""
    layers = decoder_layers(model)
    options = {} if mode == "default" else {"mode": mode}
    for layer in layers:
        layer.compile(dynamic=True, **options)
    _unwrap(model).compile_mode = mode  # a plain attribute of the transformers model, read by mark_step
    return len(layers)


def mark_step(model: torch.nn.Module) -> None:
    """Call before a forward when the outputs of the model's previous forwards are no longer needed (their backward
    done, their values read): CUDA graphs of model.compile_mode reduce-overhead may then reuse that memory."""
    if getattr(_unwrap(model), "compile_mode", "default") == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def liger_setting(cfg: ModelConfig, compiled: bool):
    """model.liger_kernels for a model whose decoder layers are (not) compiled. Compiled: off, as inductor fuses the
    norms and activations itself, and dynamo cannot trace Liger's kernels inside a compiled layer (an error at the
    first forward); so both set to true is refused here, at start-up."""
    if not compiled:
        return cfg.liger_kernels
    if cfg.liger_kernels is True:
        raise ConfigError(f"model.liger_kernels=true with model.compile_layers={cfg.compile_layers}: Liger's kernels "
                          f"cannot run inside compiled layers (inductor fuses the same operations); set "
                          f"model.liger_kernels: auto or model.compile_layers: false")
    return False


def compile_model_layers(model: torch.nn.Module, cfg: ModelConfig) -> int:
    """compile_layers(model), and an error when model.compile_layers=true finds no decoder layer to compile."""
    count = compile_layers(model, cfg.compile_mode)
    if count == 0 and cfg.compile_layers is True:
        raise ConfigError(f"model.compile_layers=true: {type(model).__name__} names no decoder layer class "
                          f"(_no_split_modules); set model.compile_layers: auto or false")
    return count


def _finish(model, cfg: ModelConfig, tokenizer=None, trainable: bool = True):
    # read by rlhf.models.forward; plain attributes, so they never reach a saved config
    model.logprob_chunk_size = cfg.logprob_chunk_size
    apply_pair_packing(model, cfg.pair_packing)
    compiled = trainable and compiles_layers(cfg.compile_layers)
    apply_liger_kernels(model, liger_setting(cfg, compiled))
    if tokenizer is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.disable_dropout:
        disable_dropout(model)
    if trainable and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if trainable and (cfg.lora_r > 0 or cfg.peft_config is not None):
        import copy

        from peft import LoraConfig, get_peft_model

        task = "SEQ_CLS" if not hasattr(model, "lm_head") else "CAUSAL_LM"
        if cfg.peft_config is not None:  # Trainer(peft_config=...); the task follows the model it wraps
            lora = copy.deepcopy(cfg.peft_config)
            lora.task_type = task
        else:
            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=cfg.lora_target_modules, task_type=task)
        model = get_peft_model(model, lora)
    if not trainable:  # nothing is saved for backward: a frozen model keeps its own forwards (no fused layers)
        model.eval().requires_grad_(False)
    else:
        apply_fused(model, cfg.fused_layers)
        if compiled:
            compile_model_layers(model, cfg)
        # from_pretrained returns eval mode; transformers recomputes checkpointed layers only in training mode, so a
        # model left in eval mode would ignore model.gradient_checkpointing (dropout is off unless configured on)
        model.train()
    return model


def _load_kwargs(cfg: ModelConfig, path: str) -> dict:
    """from_pretrained's options from the model section. The revision belongs to model.name_or_path, so another
    folder loaded with the same section (a reward model, a reference checkpoint) does not get it."""
    kwargs: dict = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.revision and path == cfg.name_or_path:
        kwargs["revision"] = cfg.revision
    return kwargs


def load_causal_lm(cfg: ModelConfig, tokenizer=None, path: Optional[str] = None, trainable: bool = True,
                   field: str = "model.name_or_path", model: Optional[torch.nn.Module] = None):
    """`model`: an already loaded model (Trainer(model=...), rlhf.api) taking the place of from_pretrained, as it
    is (its dtype and device); the same steps after loading apply to it, in place."""
    from transformers import AutoModelForCausalLM

    if model is None:
        path = path or cfg.name_or_path
        model = _load(AutoModelForCausalLM, path, field, tokenizer, **_load_kwargs(cfg, adapter_base(path) or path))
    return _finish(model, cfg, tokenizer, trainable)


def saved_pretrained(model: Optional[torch.nn.Module]):
    """A tempfile.TemporaryDirectory holding `model` written with save_pretrained (None for None; `.name` is the
    folder, `with` gives it too; removed on `.cleanup()` or at the end of the `with`), for a scalar model built from
    a model given as an object (PPO's critic from the policy or the reward model, a reward model trained from a
    causal LM): loading it from the folder builds the scalar model and draws its fresh head exactly as from a path,
    for any architecture, and shares no tensor with the object. Call it before LoRA wraps the object."""
    if model is None:
        return None
    import tempfile

    folder = tempfile.TemporaryDirectory(prefix="rlhf-object-")
    model.save_pretrained(folder.name)
    return folder


def apply_score_bias_(model) -> torch.nn.Module:
    """Restore the score shift a calibrated reward model carries in `config.score_bias`.

    Llama/Qwen2 score heads have no bias, so the reward normalization's shift is saved in the config
    (and in reward_normalization.json) and becomes the head's bias again here. Idempotent: a head
    that already has a bias, or a config without score_bias, is left as it is.
    """
    bias = getattr(model.config, "score_bias", None)
    head = model.score
    if bias is None or head.bias is not None:
        return model
    with_bias = torch.nn.Linear(head.in_features, head.out_features, bias=True, device=head.weight.device,
                                dtype=head.weight.dtype)
    from .sharded import gathered

    with torch.no_grad(), gathered([head.weight]):  # loaded into ZeRO-3 shards: whole for the copy
        with_bias.weight.copy_(head.weight)
        with_bias.bias.fill_(float(bias))
    model.score = with_bias
    return model


def keep_score_bias_(model) -> None:
    """Before save_pretrained: put a scalar head's bias into `config.score_bias`, where `apply_score_bias_` finds it on
    load (a bias-free head type drops a saved score.bias). No-op for a head without bias."""
    bias = model.score.bias
    if bias is not None:
        model.config.score_bias = float(bias.item())


def load_scalar_model(path: str, cfg: Optional[ModelConfig] = None, tokenizer=None, trainable: bool = False,
                      field: str = "reward_model", model: Optional[torch.nn.Module] = None):
    """A sequence-classification model with one output: a reward model or a critic.

    A causal-LM checkpoint (e.g. the SFT policy) gets a freshly initialised scalar head. A LoRA adapter folder (a
    peft sequence-classification adapter with its score head in modules_to_save, e.g. a LoRA PPO run's critic/) is
    its base with the adapter merged in. `model`: one given as an object (rlhf.api) instead of `path`: a one-output
    sequence classifier is used as it is, anything else is read back from a temporary save_pretrained folder
    (saved_pretrained) and gets a fresh head.
    """
    from transformers import AutoModelForSequenceClassification

    cfg = cfg or ModelConfig(name_or_path=path)
    if model is not None and getattr(model.config, "num_labels", None) == 1 and hasattr(model, "score"):
        return _finish(apply_score_bias_(model), cfg, tokenizer, trainable)  # a scalar model given as an object
    if model is not None:  # another model given as an object (a causal LM): a fresh scalar head, as from its folder
        with saved_pretrained(model) as folder:
            return load_scalar_model(folder, cfg, tokenizer, trainable, field)
    rng = torch.random.get_rng_state()

    def fresh_head(loaded):
        model, info = loaded
        if "score.weight" in info.get("missing_keys", ()):
            draw_fresh_head_(model, rng)
        return model
    model = _load(AutoModelForSequenceClassification, path, field, tokenizer, fresh_head, num_labels=1,
                  output_loading_info=True, **_load_kwargs(cfg, adapter_base(path) or path))
    bias = adapter_score_bias(path)
    if bias is not None:
        model.config.score_bias = bias
    return _finish(apply_score_bias_(model), cfg, tokenizer, trainable)


def adapter_score_bias(path: str) -> Optional[float]:
    """The score shift of a calibrated LoRA reward-model folder (NORMALIZATION_FILE's "score_bias"), else None."""
    if adapter_base(path) is None:
        return None
    stats = os.path.join(os.path.expanduser(path), NORMALIZATION_FILE)
    if not os.path.isfile(stats):
        return None
    with open(stats) as f:
        bias = json.load(f).get("score_bias")
    return None if bias is None else float(bias)


def load_reward_model(path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """A reward model trained by rlhf, giving calibrated scores: `model(input_ids, attention_mask).logits[:, 0]`,
    read at the last non-pad token (mean 0, std 1 on the calibration set), in eval mode without gradients.

    Use it (or add `config.score_bias` to the logits) rather than a plain
    `AutoModelForSequenceClassification.from_pretrained(path)`: most causal-LM score heads (Llama, Qwen2, ...) have
    no bias, so the calibration's shift is stored in `config.score_bias`, which transformers does not read."""
    cfg = ModelConfig(name_or_path=path, dtype=dtype, trust_remote_code=trust_remote_code)
    return load_scalar_model(path, cfg, field="path")


def draw_fresh_head_(model, rng_state: torch.Tensor) -> None:
    """Draw a freshly initialised scalar head, N(0, initializer_range), on the CPU from the global generator as it
    stood before loading: the very values transformers draws when the model loads on the CPU (the head is its one
    draw). Loaded into ZeRO-3 partitions on GPUs (deepspeed.zero.Init) the head is otherwise drawn by the GPU's
    generator, and a critic or reward model would start from another head than on one GPU. The global generator
    is left where that draw leaves it."""
    from .sharded import gathered

    head = model.score.weight
    generator = torch.Generator().set_state(rng_state)
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad(), gathered([head], write=True):
        head.copy_(torch.empty(head.shape, dtype=head.dtype).normal_(0.0, std, generator=generator))
    torch.random.set_rng_state(generator.get_state())
