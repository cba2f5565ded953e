# Run: .venv/bin/python -m pytest -q tests/test_data_loading.py
"""Data sources through `datasets` (save_to_disk folders of a Dataset or a DatasetDict, parquet files and folders)
and the tokenizing map: its cache (hit on the same data, tokenizer and options, in another process too; miss on a
changed tokenizer or max_length), data.num_proc, and bad rows reported in file order as before."""

import json
import os
import subprocess
import sys

import datasets
import pytest

from rlhf.config import ConfigError, config_from_dict
from rlhf.data import BadRows, DataError
from rlhf.data import mapped
from rlhf.data.preference import PairEncoder, PairOptions, load_pairs
from rlhf.models import load_tokenizer

ROWS = [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"It is {2 * i + 1}."}
        for i in range(6)]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pairs(spec, tok, cache, split="train", bad=None, **opts) -> list[tuple]:
    options = PairOptions(**{"max_length": 64, "max_prompt_length": 32, "cache_dir": str(cache), **opts})
    return [(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.index)
            for p in load_pairs(spec, tok, options, bad or BadRows(), split)]


@pytest.fixture
def expected(tok, tmp_path):
    return pairs(write_jsonl(tmp_path / "rows.jsonl", ROWS), tok, tmp_path / "cache")


def test_dataset_save_to_disk_folder(tok, tmp_path, expected):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert pairs(str(tmp_path / "ds"), tok, tmp_path / "cache") == expected


def test_dataset_dict_save_to_disk_folder_reads_the_split(tok, tmp_path, expected):
    folder = str(tmp_path / "dd")
    datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS),
                         test=datasets.Dataset.from_list(ROWS[:2])).save_to_disk(folder)
    assert pairs(folder, tok, tmp_path / "cache") == expected
    assert pairs(folder, tok, tmp_path / "cache", split="test") == expected[:2]
    with pytest.raises(DataError, match=r"dd: no split 'valid' in this save_to_disk folder; it has train, test"):
        pairs(folder, tok, tmp_path / "cache", split="valid")


def test_parquet_file_and_folder(tok, tmp_path, expected):
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "rows.parquet"))
    assert pairs(str(tmp_path / "rows.parquet"), tok, tmp_path / "cache") == expected
    os.makedirs(tmp_path / "hub" / "data")
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    assert pairs(str(tmp_path / "hub"), tok, tmp_path / "cache") == expected


def test_bad_parquet_row_is_named_by_its_row_number(tok, tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[3]["rejected"] = rows[3]["chosen"]
    path = str(tmp_path / "bad.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    with pytest.raises(DataError, match=rf"^{path} row:4: field 'rejected': identical to chosen$"):
        pairs(path, tok, tmp_path / "cache")
    bad = BadRows("skip")
    assert len(pairs(path, tok, tmp_path / "cache", bad=bad)) == 5 and [e.line for e in bad.skipped] == [4]


def test_second_load_reuses_the_cache_and_a_changed_tokenizer_or_max_length_misses(tok, tmp_path, monkeypatch):
    path, cache = write_jsonl(tmp_path / "rows.jsonl", ROWS), tmp_path / "cache"
    calls = []
    real = mapped.map_source
    monkeypatch.setattr(mapped, "map_source", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = pairs(path, tok, cache)
    assert (len(calls), len([f for f in os.listdir(cache) if f.endswith(".json")])) == (1, 1)
    assert pairs(path, tok, cache) == first and len(calls) == 1  # warm: read from the Arrow file, no map
    assert pairs(path, tok, cache, max_length=40) == first and len(calls) == 2  # same pairs, another key
    other = load_tokenizer(tok.name_or_path)
    other.add_tokens(["<|extra|>"])
    pairs(path, other, cache)
    assert len(calls) == 3
    os.utime(path, ns=(1, 1))  # the file changed (its mtime): its rows are read again
    pairs(path, tok, cache)
    assert len(calls) == 4


def test_cache_key_is_the_same_in_another_process(tok, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    identity = mapped.file_identity(path)
    key = mapped.cache_key(identity, PairEncoder(tok, PairOptions(max_length=64)))
    code = ("import sys; from rlhf.data import mapped; from rlhf.data.preference import PairEncoder, PairOptions; "
            "from rlhf.models import load_tokenizer; "
            "print(mapped.cache_key(sys.argv[1], PairEncoder(load_tokenizer(sys.argv[2]), PairOptions(max_length=64))))")
    out = subprocess.run([sys.executable, "-c", code, identity, tok.name_or_path], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.stdout.strip() == key
    assert key != mapped.cache_key(identity, PairEncoder(tok, PairOptions(max_length=65)))


def test_num_proc_gives_the_same_pairs_and_reports_bad_rows_in_file_order(tok, tmp_path):
    rows = [dict(ROWS[i % len(ROWS)]) for i in range(2400)]  # three map batches, split over two processes
    rows[1900]["chosen"] = rows[1900]["rejected"]
    rows[700]["prompt"] = 7
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    bad1, bad2 = BadRows("skip"), BadRows("skip")
    one = pairs(path, tok, tmp_path / "c1", bad=bad1)
    two = pairs(path, tok, tmp_path / "c2", bad=bad2, num_proc=2)
    assert len(one) == 2398 and one == two
    assert [str(e) for e in bad1.skipped] == [str(e) for e in bad2.skipped] == [
        f"{path}:701: field 'prompt': expected str or list, got int",
        f"{path}:1901: field 'rejected': identical to chosen"]
    with pytest.raises(DataError, match=rf"^{path}:701: "):
        pairs(path, tok, tmp_path / "c2", num_proc=2)  # from the cache: the same first error


def test_num_proc_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match=r"data.num_proc=0: expected"):
        config_from_dict({"algorithm": "sft", "model": {"name_or_path": "gpt2"},
                          "data": {"train": "rows.jsonl", "num_proc": 0},
                          "logging": {"output_dir": str(tmp_path)}}).validate()


def test_limit_takes_the_first_rows_of_every_source(tok, tmp_path, expected):
    from rlhf.data.io import load_rows

    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "rows.parquet"))
    for spec in (path, str(tmp_path / "rows.parquet")):
        assert [r.data["prompt"] for r in load_rows(spec, limit=2)] == [r["prompt"] for r in ROWS[:2]]
        options = PairOptions(max_length=64, max_prompt_length=32, cache_dir=str(tmp_path / "cache"))
        assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.index)
                for p in load_pairs(spec, tok, options, BadRows(), limit=2)] == expected[:2]


def test_pairs_are_a_sequence_whose_slices_and_sums_keep_each_pairs_position(tok, tmp_path):
    from rlhf.data.preference import number_pairs

    options = PairOptions(max_length=64, max_prompt_length=32, cache_dir=str(tmp_path / "cache"))
    train = load_pairs(write_jsonl(tmp_path / "a.jsonl", ROWS), tok, options, BadRows())
    held_out = load_pairs(write_jsonl(tmp_path / "b.jsonl", ROWS[:4]), tok, options, BadRows())
    number_pairs(train, held_out)
    both = train + held_out
    assert len(both) == 10 and [e.index for e in both] == list(range(10))
    assert [e.index for e in both[1::3]] == [1, 4, 7] and [e.index for e in both[1::3][1:]] == [4, 7]
    assert both[7].chosen_ids == train[1].chosen_ids and list([] + train) == list(train[:]) == list(train)
