"""Bad rows and bad configs, shared by tests/test_bad_input.py and tests/probe_bad_input.py.

VALID holds one good row per data kind, LOADERS the algorithms' loaders that read each kind, DATA_CASES and
CONFIG_CASES the known kinds of bad input with the message each must give; the strategies generate more. Only
long-standing entry points are used here, so the probe also runs against older code."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from types import SimpleNamespace

from hypothesis import strategies as st

from rlhf.algorithms.ppo import PPO
from rlhf.algorithms.sft import SFT
from rlhf.config import CONFIGS, config_from_dict
from rlhf.data import BadRows, DataError
from rlhf.data.io import load_rows
from rlhf.data.preference import PairOptions, load_pairs


def msg(role, content):
    return {"role": role, "content": content}


VALID = {
    "prompt_response": {"prompt": "What color is the sky?", "response": "The sky is blue."},
    "messages": {"messages": [msg("user", "What color is the sky?"), msg("assistant", "The sky is blue.")]},
    "preference": {"prompt": "What color is the sky?", "chosen": "The sky is blue.", "rejected": "The sky is woof."},
    "preference-messages": {"prompt": [msg("user", "What color is the sky?")], "chosen": [msg("assistant", "Blue.")],
                            "rejected": [msg("assistant", "Woof.")]},
    "hh-rlhf": {"chosen": "\n\nHuman: What color is the sky?\n\nAssistant: Blue.",
                "rejected": "\n\nHuman: What color is the sky?\n\nAssistant: Woof."},
    "pku-saferlhf": {"prompt": "What color is the sky?", "response_0": "Blue.", "response_1": "Woof.",
                     "better_response_id": 0, "safer_response_id": 1},
    "ultrafeedback": {"prompt": "What color is the sky?",
                      "chosen": [msg("user", "What color is the sky?"), msg("assistant", "Blue.")],
                      "rejected": [msg("user", "What color is the sky?"), msg("assistant", "Woof.")],
                      "score_chosen": 8.0, "score_rejected": 2.0},
    "prompt": {"prompt": "What color is the sky?"},
}
DATA_FORMAT = {"preference-messages": "preference"}  # data.format of each kind; others are their own name
SFT_KINDS, PPO_KINDS = ("prompt_response", "messages"), ("prompt",)
PAIR_KINDS = tuple(k for k in VALID if k not in SFT_KINDS + PPO_KINDS)


def make_cfg(algorithm, model_dir, train, policy, fmt="auto", **sections):
    values = {"algorithm": algorithm, "model": {"name_or_path": model_dir},
              "data": {"train": train, "format": fmt, "max_length": 256, "max_prompt_length": 128, "on_bad_row": policy},
              "logging": {"output_dir": os.path.dirname(train)}, **sections}
    if algorithm == "ppo":
        values["ppo"] = {"reward_fns": ["rlhf.testbeds.assistant:gold_reward"], "critic_init": "policy",
                         "max_new_tokens": 16}
    return config_from_dict(values)


def run_loader(loader, kind, path, policy, tokenizer, model_dir, first_skipped: list | None = None):
    """Load `path` with one algorithm's own loading code -> (rows loaded, rows skipped); the line of the first
    skipped row is appended to `first_skipped` when given."""
    # DPO reads preference files with data.format=auto (detection from the rows), the reward model with the format named
    fmt = DATA_FORMAT.get(kind, kind) if kind in PAIR_KINDS and loader != "dpo" else "auto"
    note = first_skipped if first_skipped is not None else []
    if loader == "sft":
        cfg = make_cfg("sft", model_dir, path, policy)
        algo = SimpleNamespace(cfg=cfg, trainer=SimpleNamespace(tokenizer=tokenizer), bad=BadRows(policy))
        loaded = len(SFT._encode(algo, load_rows(path)))
        note += [e.line for e in algo.bad.skipped[:1]]
        return loaded, len(algo.bad.skipped)
    if loader == "ppo":
        cfg = make_cfg("ppo", model_dir, path, policy)
        printed: list[str] = []  # PPO keeps its BadRows to itself; its printed summary names the first skipped row
        # no dataset objects: the prompts are read from the file through data.train
        trainer = SimpleNamespace(tokenizer=tokenizer, print=printed.append,
                                  objects=SimpleNamespace(dataset=lambda which: None))
        algo = SimpleNamespace(cfg=cfg, trainer=trainer)
        try:
            loaded = len(PPO._load_prompts(algo))
        except DataError as e:
            if "no usable prompt rows" not in str(e):
                raise
            loaded = 0  # every row was skipped (counted below); an empty prompt set stops the run in one line
        note += [int(m) for m in re.findall(rf"first: {re.escape(path)}:(\d+):", " ".join(printed))[:1]]
        return loaded, algo.skipped["data/train_skipped_rows"]
    algorithm = {"reward": "reward", "reward-margin": "reward", "dpo": "dpo"}[loader]
    cfg = make_cfg(algorithm, model_dir, path, policy, fmt)
    bad = BadRows(policy)
    opts = PairOptions.from_config(cfg.data, "better", need_margin=loader == "reward-margin")
    loaded = len(load_pairs(path, tokenizer, opts, bad))
    note += [e.line for e in bad.skipped[:1]]
    return loaded, len(bad.skipped)


LOADERS = {kind: ("sft",) for kind in SFT_KINDS} | {kind: ("ppo",) for kind in PPO_KINDS} | {
    kind: ("reward", "dpo") for kind in PAIR_KINDS} | {"ultrafeedback": ("reward", "reward-margin", "dpo")}


def count_rows(data: bytes) -> int:
    """Rows a JSONL file holds, by the format's definition: lines with more than JSON whitespace (and a BOM at the
    start of the file)."""
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    return sum(1 for line in data.split(b"\n") if line.strip(b" \t\r"))


def line(value) -> bytes:
    return json.dumps(value).encode()


def with_field(kind, **fields) -> bytes:
    return line({**VALID[kind], **fields})


def without(kind, name) -> bytes:
    return line({k: v for k, v in VALID[kind].items() if k != name})


# (kind of the file, the bad line, the error after "FILE") by name. Kinds the loaders already refused stay as guards;
# RELIABILITY.md ("Bad input") gives each kind's outcome before and now.
DATA_CASES: dict[str, tuple[str, bytes, str]] = {
    # file-level: each line unreadable
    "non-UTF-8 bytes": ("prompt_response", b'{"prompt": "caf\xe9", "response": "b"}', r":2: not valid UTF-8: byte 0xe9"),
    "invalid JSON": ("prompt_response", b'{"prompt": "a", "response": ', r":2: invalid JSON: Expecting value \(column 29\)"),
    "invalid JSON, unclosed object": ("preference", b'{"prompt": "a"', r":2: invalid JSON: Expecting ',' delimiter \(column 15\)"),
    "JSON array row": ("preference", b'["a", "b"]', r":2: expected a JSON object, got array"),
    "JSON string row": ("prompt", b'"just a prompt"', r":2: expected a JSON object, got string"),
    "JSON number row": ("pku-saferlhf", b"3", r":2: expected a JSON object, got number"),
    "JSON null row": ("messages", b"null", r":2: expected a JSON object, got null"),
    "BOM inside the file": ("prompt_response", b"\xef\xbb\xbf" + line(VALID["prompt_response"]), r":2: invalid JSON: Unexpected UTF-8 BOM"),
    "control character line": ("prompt", b"\x1c", r":2: invalid JSON"),
    "nested too deeply": ("prompt", b"[" * 100000 + b"]" * 100000, r":2: invalid JSON: nested too deeply"),
    # wrong types and missing fields
    "number as message content": ("messages", line({"messages": [msg("user", 5), msg("assistant", "b")]}),
                                  r":2: field 'messages\[0\].content': expected str, got int"),
    "message content missing": ("messages", line({"messages": [{"role": "user"}, msg("assistant", "b")]}),
                                r":2: field 'messages\[0\].content': expected str, got nothing"),
    "unknown message role": ("messages", line({"messages": [msg("human", "a"), msg("assistant", "b")]}),
                             r":2: field 'messages\[0\].role': expected one of system, user, assistant, tool, got 'human'"),
    "prompt list of non-dicts": ("prompt", line({"prompt": ["a", "b"]}), r":2: field 'prompt\[0\]': expected a message"),
    "prompt list of non-dicts (SFT)": ("prompt_response", with_field("prompt_response", prompt=[1, 2]),
                                       r":2: field 'prompt\[0\]': expected a message \{role, content\}, got int"),
    "prompt list of non-dicts (preference)": ("preference", with_field("preference", prompt=[["x"]]),
                                              r":2: field 'prompt\[0\]': expected a message"),
    "prompt is a number": ("prompt_response", with_field("prompt_response", prompt=7), r":2: field 'prompt': expected str or list, got int"),
    "prompt is an object": ("prompt", line({"prompt": {"text": "hi"}}), r":2: field 'prompt': expected str or list, got dict"),
    "response is a list": ("prompt_response", with_field("prompt_response", response=["b"]), r":2: field 'response': expected str, got list"),
    "response missing": ("prompt_response", without("prompt_response", "response"), r":2: field 'response': missing"),
    "response null": ("prompt_response", with_field("prompt_response", response=None), r":2: field 'response': missing"),
    "messages not a list": ("messages", line({"messages": "hi"}), r":2: field 'messages': expected list, got str"),
    "messages without assistant reply": ("messages", line({"messages": [msg("user", "a")]}), r":2: field 'messages': the last message must be"),
    "chosen is a number": ("preference", with_field("preference", chosen=1), r":2: field 'chosen': expected str or list, got int"),
    "rejected missing": ("preference", without("preference", "rejected"), r":2: field 'rejected': missing"),
    "chosen message content a number": ("preference-messages", with_field("preference-messages", chosen=[msg("assistant", 2)]),
                                        r":2: field 'chosen\[0\].content': expected str, got int"),
    "margin is a string": ("preference", with_field("preference", margin="big"), r":2: field 'margin': expected int or float, got str"),
    "margin is NaN": ("preference", b'{"prompt": "a", "chosen": "b", "rejected": "c", "margin": NaN}', r":2: field 'margin': expected a finite number, got nan"),
    "margin is a bool": ("preference", with_field("preference", margin=True), r":2: field 'margin': expected int or float, got bool"),
    "hh transcript is a list": ("hh-rlhf", with_field("hh-rlhf", chosen=["x"]), r":2: field 'chosen': expected str, got list"),
    "hh text before Human": ("hh-rlhf", with_field("hh-rlhf", chosen="hello\n\nHuman: a\n\nAssistant: b"), r":2: field 'chosen': text before"),
    "pku id out of range": ("pku-saferlhf", with_field("pku-saferlhf", better_response_id=2), r":2: field 'better_response_id': expected 0 or 1, got 2"),
    "pku id a bool": ("pku-saferlhf", with_field("pku-saferlhf", better_response_id=True), r":2: field 'better_response_id': expected int, got bool"),
    "pku response a number": ("pku-saferlhf", with_field("pku-saferlhf", response_1=0), r":2: field 'response_1': expected str, got int"),
    "ultrafeedback chosen a string": ("ultrafeedback", with_field("ultrafeedback", chosen="Blue."), r":2: field 'chosen': expected list, got str"),
    "ultrafeedback message not a dict": ("ultrafeedback", with_field("ultrafeedback", rejected=[None, msg("assistant", "x")]),
                                         r":2: field 'rejected\[0\]': expected a message \{role, content\}, got NoneType"),
    "lone surrogate in text": ("prompt_response", b'{"prompt": "a\\ud800", "response": "b"}', r":2: field 'prompt': not valid Unicode: lone surrogate U\+D800"),
    # empty strings
    "empty prompt": ("prompt_response", with_field("prompt_response", prompt=""), r":2: field 'prompt': empty prompt"),
    "blank prompt (PPO)": ("prompt", line({"prompt": "   "}), r":2: field 'prompt': empty prompt"),
    "empty prompt messages": ("prompt", line({"prompt": []}), r":2: field 'prompt': empty prompt"),
    "prompt messages all blank": ("preference-messages", with_field("preference-messages", prompt=[msg("user", " ")]), r":2: field 'prompt': empty prompt"),
    "empty response": ("prompt_response", with_field("prompt_response", response=" "), r":2: field 'response': empty response"),
    "empty chosen": ("preference", with_field("preference", chosen=""), r":2: field 'chosen': empty response"),
    "empty pku response": ("pku-saferlhf", with_field("pku-saferlhf", response_0=""), r":2: field 'chosen': empty response"),
}


def case_file(kind: str, bad: bytes) -> bytes:
    return line(VALID[kind]) + b"\n" + bad + b"\n" + line(VALID[kind]) + b"\n"


TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=24)
JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                        TEXT, st.sampled_from(["", "   ", "\ud800", "a\udfffb"]))
JSON_ANY = st.recursive(JSON_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                              st.dictionaries(TEXT, inner, max_size=3)), max_leaves=8)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "bot", "", 1]),
                                 "content": st.one_of(TEXT, JSON_ANY)})


@st.composite
def valid_row(draw, kind: str) -> dict:
    """A row of `kind` with drawn texts (which may still be too long or empty for the loader)."""
    row = json.loads(json.dumps(VALID[kind]))

    def fill(value):
        if isinstance(value, str):
            return draw(TEXT) if draw(st.booleans()) else value
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: (fill(v) if k != "role" else v) for k, v in value.items()}
        return value
    return fill(row)


@st.composite
def broken_line(draw, kind: str) -> bytes:
    """One JSONL line: a valid row, or one broken in one of the ways users' data breaks."""
    row = draw(valid_row(kind))
    how = draw(st.sampled_from(["valid", "drop field", "garbage field", "garbage message", "not an object",
                                "truncated", "bad UTF-8", "BOM", "extra fields"]))
    key = draw(st.sampled_from(sorted(row)))
    if how == "drop field":
        del row[key]
    elif how == "garbage field":
        row[key] = draw(JSON_ANY)
    elif how == "garbage message":
        row[key] = draw(st.lists(st.one_of(MESSAGE, JSON_ANY), max_size=3))
    elif how == "extra fields":
        row.update(draw(st.dictionaries(TEXT, JSON_ANY, max_size=2)))
    elif how == "not an object":
        return json.dumps(draw(JSON_ANY.filter(lambda v: not isinstance(v, dict)))).encode()
    text = json.dumps(row).encode()
    if how == "truncated":
        return text[:draw(st.integers(1, max(1, len(text) - 1)))]
    if how == "bad UTF-8":
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe9", b"\xed\xa0\x80"])) + text[at:]
    if how == "BOM":
        return b"\xef\xbb\xbf" + text
    return text


@st.composite
def jsonl_file(draw, kind: str) -> bytes:
    lines = draw(st.lists(broken_line(kind), min_size=1, max_size=6))
    gaps = [b"", b"  "]
    return b"\n".join(lines + draw(st.lists(st.sampled_from(gaps), max_size=1))) + b"\n"


CONFIG_CASES: dict[str, tuple[dict, str]] = {
    "max_steps -5": ({"optim": {"max_steps": -5}}, "optim.max_steps=-5: expected >= 0"),
    "epochs 0": ({"optim": {"epochs": 0}}, "optim.epochs=0: expected > 0"),
    "data.limit -5": ({"data": {"limit": -5}}, "data.limit=-5: expected >= 0"),
    "save_every -1": ({"logging": {"save_every": -1}}, "logging.save_every=-1: expected >= 0"),
    "max_grad_norm -1": ({"optim": {"max_grad_norm": -1}}, "optim.max_grad_norm=-1.0: expected >= 0"),
    "log_every 0": ({"logging": {"log_every": 0}}, "logging.log_every=0: expected > 0"),
    "adam_betas of 1": ({"optim": {"adam_betas": [0.9]}}, "optim.adam_betas=[0.9]: expected a list of 2 floats in [0, 1)"),
    "adam_betas of 3": ({"optim": {"adam_betas": [0.9, 0.99, 0.9]}}, "optim.adam_betas=[0.9, 0.99, 0.9]: expected a list of 2"),
    "adam beta 1": ({"optim": {"adam_betas": [0.9, 1.0]}}, "optim.adam_betas[1]=1.0: expected in [0, 1)"),
    "weight_decay negative": ({"optim": {"weight_decay": -0.1}}, "optim.weight_decay=-0.1: expected >= 0"),
    "adam_eps 0": ({"optim": {"adam_eps": 0}}, "optim.adam_eps=0.0: expected > 0"),
    "lr NaN": ({"optim": {"lr": float("nan")}}, "optim.lr=nan: expected a finite float"),
    "lr infinite": ({"optim": {"lr": float("inf")}}, "optim.lr=inf: expected a finite float"),
    "lr 0": ({"optim": {"lr": 0}}, "optim.lr=0.0: expected > 0"),
    "warmup_ratio 1": ({"optim": {"warmup_ratio": 1}}, "optim.warmup_ratio=1.0: expected in [0, 1)"),
    "batch_size 0": ({"optim": {"batch_size": 0}}, "optim.batch_size=0: expected > 0"),
    "eval_every -1": ({"logging": {"eval_every": -1}}, "logging.eval_every=-1: expected >= 0"),
    "eval_limit -1": ({"logging": {"eval_limit": -1}}, "logging.eval_limit=-1: expected >= 0"),
    "eval_max_new_tokens 0": ({"logging": {"eval_max_new_tokens": 0}}, "logging.eval_max_new_tokens=0: expected > 0"),
    "keep_checkpoints -1": ({"logging": {"keep_checkpoints": -1}}, "logging.keep_checkpoints=-1: expected >= 0"),
    "seed -1": ({"seed": -1}, "seed=-1: expected in [0, 2147483647]"),
    "lora_r -1": ({"model": {"lora_r": -1}}, "model.lora_r=-1: expected >= 0"),
    "lora_dropout 1": ({"model": {"lora_dropout": 1}}, "model.lora_dropout=1.0: expected in [0, 1)"),
    "lora without modules": ({"model": {"lora_r": 4, "lora_target_modules": []}}, "model.lora_target_modules=[]: expected at least one"),
    "max_length 0": ({"data": {"max_length": 0}}, "data.max_length=0: expected > 0"),
    "unknown data.format": ({"data": {"format": "sharegpt"}}, "data.format='sharegpt': expected one of auto, prompt_response"),
    "data.train empty": ({"data": {"train": ""}}, "data.train: missing"),
    "data.train missing local path": ({"data": {"train": "./no/such.jsonl"}}, "data.train: './no/such.jsonl' does not exist"),
    "data.eval missing local path": ({"data": {"eval": "/no/such/eval.jsonl"}}, "data.eval: '/no/such/eval.jsonl' does not exist"),
    "model path a mistyped runs/ folder": ({"model": {"name_or_path": "runs/nope"}}, "model.name_or_path: 'runs/nope' does not exist"),
    "tokenizer path missing": ({"model": {"tokenizer": "~/no-such-tokenizer"}}, "model.tokenizer: '~/no-such-tokenizer' does not exist"),
    "output_dir a file": ({"logging": {"output_dir": "FILE"}}, "logging.output_dir: 'FILE' is a file, not a folder"),
    "output_dir under a file": ({"logging": {"output_dir": "FILE/runs"}}, "is a file, not a folder"),
    "eval_testbed unknown": ({"logging": {"eval_testbed": "asistant"}}, "logging.eval_testbed='asistant': expected one of assistant, code"),
    "output_dir empty": ({"logging": {"output_dir": ""}}, "logging.output_dir='': expected a folder path"),
    "dpo.beta 0": ({"algorithm": "dpo", "dpo": {"beta": 0}}, "dpo.beta=0.0: expected > 0"),
    "reward.center_coef -1": ({"algorithm": "reward", "reward": {"center_coef": -1}}, "reward.center_coef=-1.0: expected >= 0"),
    "ppo.kl_coef -1": ({"algorithm": "ppo", "ppo": {"kl_coef": -1}}, "ppo.kl_coef=-1.0: expected >= 0"),
    "ppo.clip_eps -0.2": ({"algorithm": "ppo", "ppo": {"clip_eps": -0.2}}, "ppo.clip_eps=-0.2: expected > 0"),
    "ppo.gamma 1.5": ({"algorithm": "ppo", "ppo": {"gamma": 1.5}}, "ppo.gamma=1.5: expected in [0, 1]"),
    "ppo.lam -0.1": ({"algorithm": "ppo", "ppo": {"lam": -0.1}}, "ppo.lam=-0.1: expected in [0, 1]"),
    "ppo.top_p 0": ({"algorithm": "ppo", "ppo": {"top_p": 0}}, "ppo.top_p=0.0: expected in (0, 1]"),
    "ppo.value_norm_clip 0": ({"algorithm": "ppo", "ppo": {"value_norm_clip": 0}}, "ppo.value_norm_clip=0.0: expected > 0"),
    "ppo.reward_model missing": ({"algorithm": "ppo", "ppo": {"reward_model": "./no/rm"}}, "ppo.reward_model: './no/rm' does not exist"),
}
PPO_BASE = {"reward_fns": ["rlhf.testbeds.assistant:gold_reward"], "critic_init": "policy", "max_new_tokens": 16}


def config_values(model_dir: str, tmp: str, extra: dict) -> dict:
    """A valid small config with `extra` merged in; FILE in logging.output_dir stands for a file under `tmp`."""
    values = {"algorithm": "sft", "model": {"name_or_path": model_dir},
              "data": {"train": "x.jsonl", "max_length": 64, "max_prompt_length": 32},
              "logging": {"output_dir": os.path.join(tmp, "runs")}}
    for key, value in extra.items():
        if isinstance(value, dict):
            values.setdefault(key, {}).update(value)
        else:
            values[key] = value
    if values["algorithm"] == "ppo":
        values["ppo"] = {**PPO_BASE, **values.get("ppo", {})}
    out = values["logging"]["output_dir"]
    if "FILE" in out:
        open(os.path.join(tmp, "FILE"), "w").close()
        values["logging"]["output_dir"] = out.replace("FILE", os.path.join(tmp, "FILE"))
    return values


WRONG = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(), TEXT,
                  st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(TEXT, st.integers(), max_size=2))


def field_values(cls):
    """For each field of dataclass `cls`: its default, or a drawn value of the right type (in or out of range), or
    a value of a wrong type."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        args = typing.get_args(tp)
        right = {int: st.integers(-5, 10**4), float: st.floats(-2, 2) | st.floats(), bool: st.booleans(),
                 str: TEXT}.get(tp)
        if typing.get_origin(tp) is typing.Literal:
            right = st.sampled_from(args)
        elif typing.get_origin(tp) is list:
            right = st.lists(st.floats(-1, 2) if args[0] is float else TEXT, max_size=3)
        elif type(None) in args:
            right = st.none() | st.floats(-10, 10)
        out[f.name] = st.one_of(st.just(default), right if right is not None else st.just(default), WRONG)
    return out


@st.composite
def config_dict(draw, algorithm: str, model_dir: str, out_dir: str) -> dict:
    """A config of `algorithm` with 0-4 drawn fields (any section) on top of a valid base."""
    cls = CONFIGS[algorithm]
    hints = typing.get_type_hints(cls)
    values: dict = {"algorithm": algorithm}
    fields = []  # (section or None, name, strategy)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = {}
            fields += [(f.name, name, strategy) for name, strategy in field_values(hints[f.name]).items()]
        elif f.name != "algorithm":
            fields.append((None, f.name, field_values(cls)[f.name]))
    for i in draw(st.lists(st.integers(0, len(fields) - 1), max_size=4, unique=True)):
        section, name, strategy = fields[i]
        (values[section] if section else values)[name] = draw(strategy)
    values["model"].setdefault("name_or_path", model_dir)
    values["data"].setdefault("train", "x.jsonl")
    values["logging"].setdefault("output_dir", out_dir)
    if algorithm == "ppo":
        for key, value in PPO_BASE.items():
            values["ppo"].setdefault(key, value)
    return values
