# Run: .venv/bin/python -m pytest -q tests/test_dataset_types.py
"""TRL's dataset types (3-row fixtures in tests/fixtures/trl/), each read by the algorithm it serves with
data.format: auto: language modelling and conversational (SFT), prompt-completion as text and as messages (SFT),
preference with an explicit and an implicit prompt, as text and as messages (DPO / reward model), unpaired preference
(refused), prompt-only as text and as messages (PPO). Each is checked against the same rows written in a form the
loaders read before, or against the tokenizer directly."""

import json
import os
from types import SimpleNamespace

import pytest

from rlhf.algorithms.ppo import PPO
from rlhf.algorithms.sft import SFT
from rlhf.data import BadRows, DataError, encode_prompt, encode_response
from rlhf.data.io import load_rows
from rlhf.data.preference import PairOptions, detect_format, load_pairs
from rlhf.models import load_tokenizer
from tests.bad_input_cases import make_cfg

TRL = os.path.join(os.path.dirname(__file__), "fixtures", "trl")


def fixture(name: str) -> str:
    return os.path.join(TRL, f"{name}.jsonl")


def rows_of(name: str) -> list[dict]:
    with open(fixture(name)) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def sft_examples(path, tok, model_dir, tmp_path) -> list[dict]:
    cfg = make_cfg("sft", model_dir, str(path), "error", logging={"output_dir": str(tmp_path)})
    algo = SimpleNamespace(cfg=cfg, trainer=SimpleNamespace(tokenizer=tok), bad=BadRows("error"))
    return list(SFT._encode(algo, load_rows(str(path))))


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_language_modelling_rows_train_every_token_and_end_with_eos(tok, tiny_model_dir, tmp_path):
    examples = sft_examples(fixture("lm"), tok, tiny_model_dir, tmp_path)
    for example, row in zip(examples, rows_of("lm"), strict=True):
        ids = tok(row["text"])["input_ids"] + [tok.eos_token_id]
        assert example == {"input_ids": ids, "labels": ids}


def test_conversational_language_modelling_is_the_messages_format(tok, tiny_model_dir, tmp_path):
    examples = sft_examples(fixture("lm_conv"), tok, tiny_model_dir, tmp_path)
    for example, row in zip(examples, rows_of("lm_conv"), strict=True):
        prompt, reply = row["messages"][:-1], row["messages"][-1]["content"]
        p, r = encode_prompt(tok, prompt), encode_response(tok, reply)
        assert example == {"input_ids": p + r, "labels": [-100] * len(p) + r}


@pytest.mark.parametrize("name", ["prompt_completion", "prompt_completion_conv"])
def test_prompt_completion_rows_equal_their_messages_form(name, tok, tiny_model_dir, tmp_path):
    as_messages = []
    for row in rows_of(name):
        prompt = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
        completion = ([{"role": "assistant", "content": row["completion"]}] if isinstance(row["completion"], str)
                      else row["completion"])
        as_messages.append({"messages": prompt + completion})
    expected = sft_examples(write(tmp_path / "messages.jsonl", as_messages), tok, tiny_model_dir, tmp_path)
    got = sft_examples(fixture(name), tok, tiny_model_dir, tmp_path)
    assert len(got) == 3 and got == expected


def pairs_of(path, tok, **opts) -> list[tuple]:
    options = PairOptions(max_length=64, max_prompt_length=32, **opts)
    return [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in load_pairs(str(path), tok, options, BadRows())]


@pytest.mark.parametrize("name, fmt", [("preference", "preference"), ("preference_conv", "preference"),
                                       ("implicit_preference", "implicit_prompt"),
                                       ("implicit_preference_conv", "ultrafeedback")])
def test_preference_rows_explicit_and_implicit_prompt(name, fmt, tok, tmp_path):
    rows = rows_of(name)
    assert detect_format(load_rows(fixture(name))[0]) == fmt
    pairs = pairs_of(fixture(name), tok)
    explicit = rows_of("preference_conv" if name.endswith("conv") else "preference")
    if name == "implicit_preference":  # the prompt is the words the two texts share before the first that differs
        explicit = []
        for r in rows:
            c, j = r["chosen"].split(" "), r["rejected"].split(" ")
            n = next(i for i, (a, b) in enumerate(zip(c, j)) if a != b)
            explicit.append({"prompt": " ".join(c[:n]), "chosen": " " + " ".join(c[n:]),
                             "rejected": " " + " ".join(j[n:])})
        assert explicit[0] == {"prompt": "What color is the sky? The sky is", "chosen": " blue.", "rejected": " green."}
    expected = pairs_of(write(tmp_path / "explicit.jsonl", explicit), tok)
    assert len(pairs) == 3 and pairs == expected
    for prompt_ids, chosen_ids, rejected_ids in pairs:
        assert chosen_ids[-1] == rejected_ids[-1] == tok.eos_token_id and chosen_ids != rejected_ids
    assert pairs_of(fixture(name), tok, format=fmt) == pairs  # the explicit format name reads them the same


def test_implicit_prompt_pairs_need_a_shared_prompt(tok, tmp_path):
    path = write(tmp_path / "rows.jsonl", [{"chosen": "Blue sky.", "rejected": "Green sky."}])
    with pytest.raises(DataError, match=r"rows.jsonl:1: field 'chosen': chosen and rejected share no prompt"):
        pairs_of(path, tok)


def test_unpaired_preference_rows_are_refused_for_pairs(tok):
    with pytest.raises(DataError, match=r"unpaired_preference.jsonl:1: unpaired preference rows \{prompt, "
                                        r"completion, label\}: DPO and the reward model learn from pairs"):
        pairs_of(fixture("unpaired_preference"), tok)


@pytest.mark.parametrize("name", ["prompt_only", "prompt_only_conv"])
def test_prompt_only_rows_for_ppo(name, tok, tiny_model_dir, tmp_path):
    cfg = make_cfg("ppo", tiny_model_dir, fixture(name), "error", logging={"output_dir": str(tmp_path)})
    no_objects = SimpleNamespace(dataset=lambda which: None)  # prompts from data.train, not a dataset object
    algo = SimpleNamespace(cfg=cfg, trainer=SimpleNamespace(tokenizer=tok, print=print, objects=no_objects))
    prompts = PPO._load_prompts(algo)
    assert [(p.ids, p.chat) for p in prompts] == [(encode_prompt(tok, r["prompt"]), r["prompt"]) for r in rows_of(name)]
