"""Shared fixtures: a tiny Llama built offline once per session, and small data files."""

from __future__ import annotations

import os
import tempfile

import pytest

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")

# Tests never touch a hub or the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tokenized-data cache (data.cache_dir's default) and datasets' own: in a folder of the tests, not the user's.
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tempfile.gettempdir(), "rlhf-tests-datasets-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer Llama with a BPE tokenizer, saved with save_pretrained (load with from_pretrained)."""
    from rlhf.models.tiny import init_tiny

    out = str(tmp_path_factory.mktemp("tiny") / "llama")
    return init_tiny(out, [os.path.join(FIXTURES, "sft.jsonl")], arch="llama", vocab_size=512, hidden_size=64,
                     layers=2, heads=4, kv_heads=2, intermediate_size=128)


@pytest.fixture
def sft_file() -> str:
    return os.path.join(FIXTURES, "sft.jsonl")


@pytest.fixture
def prefs_file() -> str:
    return os.path.join(FIXTURES, "prefs.jsonl")


def train_config(algorithm: str, model_dir: str, train: str, out: str, optim: dict, **over):
    """A small training config for tests; keyword overrides use section__key=value."""
    from rlhf.config import config_from_dict

    values = {
        "algorithm": algorithm, "seed": 0,
        "model": {"name_or_path": model_dir},
        "data": {"train": train, "max_length": 64, "max_prompt_length": 32},
        "optim": dict(optim),
        "logging": {"output_dir": out, "run_name": "run", "progress": False},
    }
    for key, value in over.items():
        section, name = key.split("__")
        values.setdefault(section, {})[name] = value
    return config_from_dict(values)


def sft_config(model_dir: str, train: str, out: str, **over):
    return train_config("sft", model_dir, train, out, {"lr": 3e-3, "batch_size": 8, "micro_batch_size": 4,
                                                        "max_steps": 6, "warmup_ratio": 0.0}, **over)


PAIR_OPTIM = {"lr": 1e-3, "batch_size": 8, "micro_batch_size": 4, "max_steps": 2}
