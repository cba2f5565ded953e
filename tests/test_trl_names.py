"""A TRL/transformers user's names: unknown keys that TRL knows say what ours is (rlhf.config.TRL_NAMES)."""

import dataclasses
import typing

import pytest

from rlhf.cli import main
from rlhf.config import CONFIGS, TRL_NAMES, ConfigError, config_from_dict, load_config


def values(algorithm="sft", **top):
    return {"algorithm": algorithm, "model": {"name_or_path": "m"}, "data": {"train": "x.jsonl"}, **top}


def all_keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_every_alias_points_at_a_real_key():
    keys = {k for cls in CONFIGS.values() for k in all_keys(cls)}
    for name, alias in TRL_NAMES.items():
        assert alias.key in keys, (name, alias.key)
        assert not alias.ppo or alias.ppo in set(all_keys(CONFIGS["ppo"])), (name, alias.ppo)


@pytest.mark.parametrize("algorithm,name,ours", [
    ("sft", "learning_rate", "optim.lr"),
    ("sft", "per_device_train_batch_size", "optim.micro_batch_size"),
    ("ppo", "per_device_train_batch_size", "ppo.micro_batch_size"),
    ("sft", "num_train_epochs", "optim.epochs"),
    ("sft", "logging_steps", "logging.log_every"),
    ("dpo", "beta", "dpo.beta"),
    ("ppo", "cliprange", "ppo.clip_eps"),
    ("sft", "lora_target_modules", "model.lora_target_modules"),
])
def test_top_level_trl_name_says_ours(algorithm, name, ours):
    with pytest.raises(ConfigError, match=rf"unknown key '{name}' \(a TRL/transformers name\); here it is '{ours}'"):
        config_from_dict(values(algorithm, **{name: 1}))


def test_trl_name_inside_a_section_says_ours():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.learning_rate' \(a TRL/transformers name\); "
                                          r"here it is 'optim.lr'"):
        config_from_dict(values(optim={"learning_rate": 1e-5}))


def test_accumulation_hint_explains_the_global_batch():
    with pytest.raises(ConfigError, match=r"here it is 'optim.batch_size' \(accumulation is derived: "
                                          r"optim.batch_size = world_size x optim.micro_batch_size x accumulation\)"):
        config_from_dict(values(gradient_accumulation_steps=4))


def test_a_name_that_is_not_trl_still_gets_the_nearest_key():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'; did you mean 'optim.lr'\?"):
        config_from_dict(values(optim={"lrr": 1e-5}))


@pytest.mark.parametrize("override,expected", [
    (["--learning_rate", "1e-5"], "unknown key 'learning_rate' (a TRL/transformers name); here it is 'optim.lr'"),
    (["--max_steps", "10"], "here it is 'optim.max_steps'"),
    (["--bf16"], "unknown key 'bf16' (a TRL/transformers name); here it is 'mixed_precision'"),
    (["--gradient_checkpointing", "--optim.lr", "1e-4"], "here it is 'model.gradient_checkpointing'"),
])
def test_trl_name_as_cli_override(tmp_path, capsys, override, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"algorithm: sft\nmodel:\n  name_or_path: {tmp_path}\ndata:\n  train: x.jsonl\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path), override)
    assert expected in str(e.value)
    assert main(["train", str(path), *override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
