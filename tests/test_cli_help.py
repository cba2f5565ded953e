"""`rlhf train --help`, `rlhf train CONFIG --help` and `rlhf --version`."""

import re

from rlhf.cli import main, version


def test_config_help_lists_its_algorithm_with_its_values(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    # the model folder does not exist yet: help checks keys and types only
    path.write_text("algorithm: dpo\nmodel:\n  name_or_path: runs/not-built-yet\ndata:\n  train: p.jsonl\n"
                    "  max_length: 96\ndpo:\n  beta: 0.25\n")
    assert main(["train", str(path), "--optim.lr", "0.0005", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--dpo.beta (float, value 0.25; default 0.1)" in out
    assert "--data.max_length (int, value 96; default 512)" in out
    assert "--optim.lr (float, value 0.0005; default 1e-05)" in out  # the other flags apply too
    assert "--optim.epochs (int, default 1)" in out  # unchanged keys show only the default
    assert "--ppo." not in out and "--sft." not in out and "--reward." not in out


def test_config_help_still_rejects_a_bad_key(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm: sft\nmodel:\n  name_or_path: m\ndata:\n  train: x.jsonl\n  max_lenght: 3\n")
    assert main(["train", str(path), "-h"]) == 2
    assert "did you mean 'data.max_length'" in capsys.readouterr().err


def test_train_help_lists_shared_sections_once_then_each_algorithm(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.count("--model.name_or_path ") == 1
    assert out.count("--optim.lr ") == 1
    headers = re.findall(r"^(\w+) config keys", out, flags=re.M)
    assert headers == ["shared", "sft", "reward", "dpo", "ppo"]
    for section in ("sft.loss_on", "reward.margin", "dpo.beta", "ppo.clip_eps"):
        assert out.count(f"--{section} ") == 1, section
    # each algorithm's own keys come under its own header
    ppo_part = out[out.index("ppo config keys"):]
    assert "--ppo.clip_eps" in ppo_part and "--dpo.beta" not in ppo_part


def test_version(capsys):
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    import rlhf

    try:
        expected = installed("rlhf")
    except PackageNotFoundError:
        expected = rlhf.__version__
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"rlhf {expected}" == f"rlhf {version()}"
