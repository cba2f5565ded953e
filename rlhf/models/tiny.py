"""Build a tiny Llama-, Qwen2-, Mistral- or GPT-2-architecture model and a BPE tokenizer trained on shipped text.

    rlhf init-model --out runs/tiny --corpus data/assistant/sft.jsonl data/code/sft.jsonl

Both are written with `save_pretrained` and read back through `from_pretrained`, the same path a
hub name or a local checkpoint takes, so tests and the offline demo exercise the real loading code.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Iterable, Iterator

import torch

# <|endoftext|> is in the vocabulary because some architectures' tokenizer classes expect it.
SPECIAL_TOKENS = ["<|pad|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}<|eos|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def shipped_corpus() -> str:
    return resources.files("rlhf").joinpath("assets/corpus.txt").read_text()


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def corpus_lines(paths: Iterable[str]) -> Iterator[str]:
    """Text of the shipped corpus plus every string value in the given .jsonl / text files."""
    yield from shipped_corpus().splitlines()
    for path in paths:
        with open(path) as f:
            if path.endswith(".jsonl"):
                for line in f:
                    if line.strip():
                        yield from _strings(json.loads(line))
            else:
                yield from f


def train_tokenizer(lines: Iterable[str], vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    # pad != eos, so a padded position is never mistaken for the end of a response
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


# arch -> (config class, causal-LM class) in transformers
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
}


def build_tiny_model(tokenizer, arch: str = "llama", hidden_size: int = 128, layers: int = 2, heads: int = 4,
                     kv_heads: int = 2, intermediate_size: int = 384, max_positions: int = 512, seed: int = 0):
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}: expected one of {', '.join(ARCHS)}")
    tokens = dict(vocab_size=len(tokenizer), tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    if arch == "gpt2":  # GPT-2 names its sizes its own way, and has no grouped key/value heads
        sizes = dict(n_embd=hidden_size, n_layer=layers, n_head=heads, n_inner=intermediate_size,
                     n_positions=max_positions)
    else:
        sizes = dict(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions)
    config_name, model_name = ARCHS[arch]
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**tokens, **sizes))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def init_tiny(out_dir: str, corpus: Iterable[str] = (), arch: str = "llama", vocab_size: int = 1024, seed: int = 0,
              **model_kwargs) -> str:
    """Train the tokenizer, build the model, save both to `out_dir`; returns out_dir."""
    tokenizer = train_tokenizer(corpus_lines(list(corpus)), vocab_size=vocab_size)
    model = build_tiny_model(tokenizer, arch=arch, seed=seed, **model_kwargs)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    return out_dir
