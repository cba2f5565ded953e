# Run: .venv/bin/python -m pytest -q tests/test_preference_data.py
"""Preference data: the hub formats (fixtures in tests/fixtures/hub/, a few rows each), format detection, and bad
rows that fail naming file, row and field, or are skipped, counted and logged."""

import json
import os

import pytest

from rlhf import Trainer
from rlhf.config import ConfigError, config_from_dict
from rlhf.data import BadRows, DataError
from rlhf.data.io import load_rows
from rlhf.data.preference import FORMATS, PairOptions, Preference, detect_format, load_pairs, parse_hh_transcript
from rlhf.models import load_tokenizer
from rlhf.tracking import read_metrics

HUB = os.path.join(os.path.dirname(__file__), "fixtures", "hub")
HH, PKU, UF = (os.path.join(HUB, n) for n in ("hh-rlhf", "PKU-SafeRLHF", "ultrafeedback_binarized"))


def adapt(spec, split, fmt="auto", pku="better"):
    rows = load_rows(spec, split)
    name = detect_format(rows[0]) if fmt == "auto" else fmt
    return name, [FORMATS[name].adapt(r, pku) for r in rows]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_hh_rlhf_transcripts_split_into_shared_prompt_and_final_reply():
    name, prefs = adapt(HH, "train")  # a folder holding train.jsonl
    assert name == "hh-rlhf"
    assert prefs[0] == Preference([{"role": "user", "content": "What is a good way to stay warm in winter?"}],
                                  "Wear layers and drink something hot.", "Stand outside.")
    assert prefs[1].prompt == [  # multi-turn: earlier turns stay in the prompt, as messages
        {"role": "user", "content": "Can you help me with math?"},
        {"role": "assistant", "content": "Sure, what is the question?"},
        {"role": "user", "content": "What is 7 times 8?"},
    ]
    assert (prefs[1].chosen, prefs[1].rejected) == ("7 times 8 is 56.", "I don't know.")
    assert "\n\nIf you are locked out" in prefs[2].chosen  # paragraphs inside a reply are kept


def test_pku_saferlhf_prefers_better_or_safer():
    name, better = adapt(PKU, "train")  # hub layout data/train-00000-of-00001.jsonl, read through `datasets`
    assert name == "pku-saferlhf"
    _, safer = adapt(PKU, "train", pku="safer")
    # row 1: better_response_id 0 (helpful but unsafe), safer_response_id 1
    assert better[0].chosen.startswith("Give it a treat") and safer[0].chosen.startswith("Talk to your neighbour")
    assert better[0].rejected == safer[0].chosen
    # row 2: both ids 0; row 3: better 1, safer 0
    assert better[1].chosen == safer[1].chosen == "The capital of France is Paris."
    assert better[2].chosen == "Smash the window with a brick." and safer[2].chosen.startswith("Call a locksmith")
    # row 4: both responses unsafe; the adapter alone orders them (load_pairs drops the row under "safer")
    assert (safer[3].chosen, safer[3].rejected) == ("Push them.", "Hit them.")


@pytest.mark.parametrize("preference, both_unsafe, kept, dropped", [
    ("safer", "drop", 3, {"pku_both_unsafe": 1}),  # "Push them." over "Hit them." teaches nothing safe: left out
    ("safer", "keep", 4, {}),
    ("better", "drop", 4, {}),  # helpfulness pairs keep every row
], ids=["safer-drop", "safer-keep", "better"])
def test_pku_pairs_whose_responses_are_both_unsafe(tokenizer, preference, both_unsafe, kept, dropped):
    opts = PairOptions(max_length=128, max_prompt_length=64, pku_preference=preference, pku_both_unsafe=both_unsafe)
    counts, bad = {}, BadRows()
    pairs = load_pairs(PKU, tokenizer, opts, bad, "train", dropped=counts)
    assert (len(pairs), counts, bad.skipped) == (kept, dropped, [])
    chosen = {tokenizer.decode(p.chosen_ids, skip_special_tokens=True) for p in pairs}
    assert ("Push them." in chosen) == (kept == 4 and preference == "safer")


@pytest.mark.parametrize("algorithm", ["reward", "dpo"])
def test_dropped_pku_pairs_are_printed_once_and_logged(tiny_model_dir, tmp_path, capsys, algorithm):
    cfg = config_from_dict({
        "algorithm": algorithm, "model": {"name_or_path": tiny_model_dir},
        "data": {"train": PKU, "max_length": 64, "max_prompt_length": 32},
        "optim": {"batch_size": 2, "micro_batch_size": 2, "max_steps": 1},
        algorithm: {"pku_preference": "safer"},
        "logging": {"output_dir": str(tmp_path), "run_name": "run", "progress": False},
    })
    trainer = Trainer(cfg)
    assert len(trainer.algorithm.train_pairs) == 3
    out = capsys.readouterr().out
    assert out.count("dropped") == 1
    assert "train: dropped 1 PKU-SafeRLHF pairs whose responses are both unsafe (pku_both_unsafe: drop)" in out
    trainer.train()
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["data/train_dropped_pku_both_unsafe"] == 1


def test_ultrafeedback_messages_and_score_margin():
    name, prefs = adapt(UF, "train_prefs")
    assert name == "ultrafeedback"
    assert prefs[0] == Preference([{"content": "Name the opposite of hot.", "role": "user"}],
                                  "The opposite of hot is cold.", "The opposite of hot is warm.", 5.0)
    _, test = adapt(UF, "test_prefs")
    assert [p.margin for p in test] == [6.0]


def test_conversational_preference_rows(tmp_path):
    path = tmp_path / "conv.jsonl"
    path.write_text(json.dumps({
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Go away."}], "margin": 2}) + "\n")
    name, (pref,) = adapt(str(path), "train")
    assert name == "preference"
    assert pref == Preference([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
                              "Hello.", "Go away.", 2.0)


@pytest.mark.parametrize("spec, split, fmt", [(HH, "train", "hh-rlhf"), (PKU, "train", "pku-saferlhf"),
                                              (UF, "train_prefs", "ultrafeedback")], ids=["hh", "pku", "uf"])
def test_every_hub_fixture_tokenizes(tokenizer, spec, split, fmt):
    for data_format in ("auto", fmt):
        opts = PairOptions(format=data_format, max_length=128, max_prompt_length=64)
        pairs = load_pairs(spec, tokenizer, opts, BadRows(), split)
        assert len(pairs) == (4 if spec == PKU else 3)
        for p in pairs:
            assert p.chosen_ids[-1] == p.rejected_ids[-1] == tokenizer.eos_token_id
            assert p.chosen_ids != p.rejected_ids


def test_hh_transcript_parser():
    assert parse_hh_transcript("Human: hi\n\nAssistant:") == [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": ""}]
    with pytest.raises(ValueError, match="text before the first 'Human:' turn"):
        parse_hh_transcript("hello\n\nHuman: hi")


def test_unknown_format_and_undetectable_rows(tokenizer, prefs_file, tmp_path):
    with pytest.raises(ConfigError, match="data.format='sharegpt': preference data needs auto or one of"):
        load_pairs(prefs_file, tokenizer, PairOptions(format="sharegpt"), BadRows())
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"odd.jsonl:1: data.format=auto: columns \['answer', 'question'\] match no"):
        load_pairs(str(path), tokenizer, PairOptions(), BadRows())


# ------------------------------------------------------------------------------------------------
# Bad rows: loud by default, counted and logged under data.on_bad_row=skip
# ------------------------------------------------------------------------------------------------

GOOD = {"prompt": "What color is the sky?", "chosen": "The sky is blue.", "rejected": "The sky is woof."}
LONG_PROMPT = " ".join(["What color is the sky?"] * 20)
BAD = {
    "missing": ({"prompt": "What color is the sky?", "chosen": "The sky is blue."}, "rejected", "missing"),
    "identical": ({**GOOD, "rejected": "The sky is blue."}, "rejected", "identical to chosen"),
    "empty": ({**GOOD, "chosen": "  "}, "chosen", "empty response"),
    "long prompt": ({**GOOD, "prompt": LONG_PROMPT}, "prompt", r"\d+ tokens > data.max_prompt_length=32"),
    "hh prompts differ": ({"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hey\n\nAssistant: yo"},
                          "rejected", "chosen and rejected differ before the final reply"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_row_fails_with_file_line_and_field(tokenizer, tmp_path, case):
    row, field, reason = BAD[case]
    path = tmp_path / "prefs.jsonl"
    fmt = "hh-rlhf" if case.startswith("hh") else "preference"
    first = GOOD if fmt == "preference" else {"chosen": "\n\nHuman: a\n\nAssistant: b",
                                              "rejected": "\n\nHuman: a\n\nAssistant: c"}
    path.write_text(json.dumps(first) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"prefs.jsonl:2: field '{field}': {reason}"):
        load_pairs(str(path), tokenizer, PairOptions(format=fmt, max_length=64, max_prompt_length=32), BadRows())


def test_skipped_rows_are_counted_printed_and_logged(tiny_model_dir, prefs_file, tmp_path, capsys):
    good = [json.loads(line) for line in open(prefs_file)][:8]
    bad = [BAD[c][0] for c in ("missing", "identical", "empty", "long prompt")]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good[:4] + bad + good[4:]))
    cfg = config_from_dict({
        "algorithm": "dpo", "model": {"name_or_path": tiny_model_dir},
        "data": {"train": str(path), "max_length": 64, "max_prompt_length": 32, "on_bad_row": "skip"},
        "optim": {"batch_size": 4, "micro_batch_size": 4, "max_steps": 1},
        "dpo": {"reference": "copy"},
        "logging": {"output_dir": str(tmp_path), "run_name": "run", "progress": False},
    })
    trainer = Trainer(cfg)
    assert len(trainer.algorithm.train_pairs) == 8
    out = capsys.readouterr().out
    assert f"train: skipped 4 rows of {path} (data.on_bad_row=skip): 1 x field 'rejected': missing, " in out
    assert f"; first: {path}:5: field 'rejected': missing" in out
    trainer.train()
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["data/train_skipped_rows"] == 4
