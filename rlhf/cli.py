"""Command line: `rlhf train | init-model | eval | export | compare | pipeline`.

    rlhf train configs/sft_tiny.yaml --optim.lr 1e-4          # or: accelerate launch -m rlhf train ...
    rlhf train configs/sft_tiny.yaml --resume                  # continue the latest run of that config
    rlhf train configs/sft_tiny.yaml --overwrite               # replace the run in that config's run folder
    rlhf init-model --out runs/tiny --corpus data/assistant/sft.jsonl
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
import traceback
from typing import Callable, Optional

from .config import CONFIGS, ConfigError, TrainConfig, help_lines, load_config, own_sections

USAGE = """usage: rlhf COMMAND ...

commands:
  train CONFIG [--resume [RUN_OR_CHECKPOINT] | --overwrite] [--section.key VALUE ...]   train with a YAML config
  init-model --out DIR [--corpus FILE ...]                                  build a tiny model + tokenizer
  eval --model PATH --testbed NAME ...                                      evaluate a model
  export CHECKPOINT OUT [--dtype D] [--overwrite]                           a checkpoint as one merged model
  compare RUN_DIR ...                                                       compare runs in a report
  pipeline CONFIG                                                           SFT -> RM -> DPO/PPO -> eval -> report

`rlhf train --help` lists every config key; `rlhf train CONFIG --help` that config's keys and values.
`rlhf --version` prints the version."""


def _train_usage() -> None:
    print("usage: rlhf train CONFIG [--resume [RUN_OR_CHECKPOINT] | --overwrite] [--section.key VALUE ...]\n")
    print("  --resume     continue the run folder's newest good checkpoint (or the given run folder or checkpoint)")
    print("  --overwrite  replace the run already in the run folder (its checkpoints, final/ and metrics)")
    print("  --help       with CONFIG: that algorithm's keys and the config's values\n")


def _train(argv: list[str]) -> int:
    """Exit codes: 0 done, 1 stopped by non-finite values or a full disk, 2 a config, data or checkpoint problem,
    130 / 143 stopped by SIGINT / SIGTERM after writing a checkpoint."""
    if not argv or argv[0] in ("-h", "--help"):
        _train_usage()
        print("shared config keys (every algorithm):")
        print("\n".join(help_lines(TrainConfig)))
        for algo, cls in CONFIGS.items():
            print(f"\n{algo} config keys:")
            print("\n".join(help_lines(cls, names=own_sections(cls))))
        return 0
    path, rest = argv[0], argv[1:]
    resume: object = False
    if "--resume" in rest:
        i = rest.index("--resume")
        if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            resume = rest[i + 1]
            del rest[i:i + 2]
        else:
            resume = True
            del rest[i]
    overwrite = "--overwrite" in rest
    if overwrite:
        rest.remove("--overwrite")
    if "-h" in rest or "--help" in rest:
        # this config's keys with its values (the file's and the other flags'); checked for keys and types only,
        # so it works before the model and data it names exist
        cfg = load_config(path, [a for a in rest if a not in ("-h", "--help")], validate=False)
        _train_usage()
        print(f"{cfg.algorithm} config keys, values from {path}:")
        print("\n".join(help_lines(type(cfg), current=cfg)))
        return 0
    from .trainer import CheckpointError, CollectiveError, DiskFullError, Interrupted, NonFiniteError, Trainer

    cfg = load_config(path, rest)
    try:
        trainer = Trainer(cfg, resume=resume, overwrite=overwrite)
        trainer.train()  # ends with accelerate's end_training: trackers closed, process group destroyed
    except CollectiveError:
        # A rank is missing: NCCL's teardown at interpreter exit would wait for it (seen: until the stalled rank came
        # back). Say why and leave now; checkpoints and metrics written so far stay, and --resume continues from them.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except (NonFiniteError, DiskFullError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except CheckpointError as e:
        print(f"error: checkpoint: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the loop (set-up): nothing to save yet
        print("interrupted before training started; nothing written to resume from", file=sys.stderr)
        return 130
    # Free the model now, while the interpreter is whole: with several processes over gloo, collective work still
    # holding its tensors (FSDP's last gradient reduction) can otherwise abort the process during interpreter exit.
    del trainer
    gc.collect()
    return 0


def _init_model(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rlhf init-model", description="Build a tiny offline model and tokenizer.")
    p.add_argument("--out", required=True, help="Output folder (loadable with from_pretrained).")
    p.add_argument("--corpus", nargs="*", default=[], help="Extra .jsonl/.txt files to train the tokenizer on.")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2", "mistral", "gpt2"])
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=384)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from .models.tiny import init_tiny

    out = init_tiny(a.out, a.corpus, arch=a.arch, vocab_size=a.vocab_size, seed=a.seed, hidden_size=a.hidden_size,
                    layers=a.layers, heads=a.heads, kv_heads=a.kv_heads, intermediate_size=a.intermediate_size)
    print(f"tiny {a.arch} model and tokenizer written to {out}")
    return 0


def _delegate(module: str, fn: str = "cli") -> Callable[[list[str]], int]:
    return lambda argv: getattr(importlib.import_module(module), fn)(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": _train,
    "init-model": _init_model,
    "eval": _delegate("rlhf.eval.runner"),
    "export": _delegate("rlhf.export"),
    "compare": _delegate("rlhf.report"),
    "pipeline": _delegate("rlhf.pipeline"),
}


def version() -> str:
    """The installed distribution's version; the package's own when run from a source tree that is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("rlhf")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"rlhf {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    from .data.io import DataError

    try:
        return COMMANDS[argv[0]](argv[1:]) or 0
    except (ConfigError, DataError) as e:
        kind = "config" if isinstance(e, ConfigError) else "data"
        print(f"error: {kind}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
