import json

import pytest

from rlhf.algorithms.sft import IGNORE, encode_sft
from rlhf.data import BadRows, DataError, load_rows
from rlhf.data.batching import StepBatcher, pad
from rlhf.models import load_tokenizer


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    # an unreadable line is still a row: using it raises, so data.on_bad_row decides in file order
    path = write(tmp_path / "d.jsonl", ['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": }'])
    rows = load_rows(path)
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON: Expecting value \(column 29\)"):
        rows[1].get("prompt")


def test_non_object_line(tmp_path):
    path = write(tmp_path / "d.jsonl", ['["a", "b"]'])
    with pytest.raises(DataError, match=r"d.jsonl:1: expected a JSON object, got array"):
        load_rows(path)[0].data


def test_missing_field_names_file_line_and_field(tmp_path, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    path = write(tmp_path / "d.jsonl", ['{"prompt": "a", "response": "b"}', "", '{"prompt": "hi"}'])
    rows = load_rows(path)
    encode_sft(rows[0], tok, 64, 32)
    with pytest.raises(DataError, match=r"d.jsonl:3: field 'response': missing"):
        encode_sft(rows[1], tok, 64, 32)


def test_wrong_field_type(tmp_path):
    rows = load_rows(write(tmp_path / "d.jsonl", ['{"prompt": 3, "response": "b"}']))
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'prompt': expected str or list, got int"):
        rows[0].get("prompt", (str, list))


def test_skip_policy_counts_instead_of_raising(tmp_path):
    bad = BadRows("skip")
    bad(DataError("f.jsonl", 4, "response", "missing"))
    assert len(bad.skipped) == 1 and "f.jsonl:4" in bad.summary()
    with pytest.raises(DataError):
        BadRows("error")(DataError("f.jsonl", 4, "response", "missing"))


def test_sft_masks_prompt_and_appends_eos(tmp_path, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    rows = load_rows(write(tmp_path / "d.jsonl", [json.dumps({"prompt": "What color is the sky?", "response": "blue"})]))
    ex = encode_sft(rows[0], tok, 64, 32)
    prompt_len = sum(1 for l in ex["labels"] if l == IGNORE)
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert ex["labels"][prompt_len:] == ex["input_ids"][prompt_len:]
    # the chat template wraps the prompt: user marker first, assistant marker last
    assert tok.decode(ex["input_ids"][:prompt_len]) == "<|user|>What color is the sky?<|assistant|>"


def test_messages_format(tmp_path, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows = load_rows(write(tmp_path / "d.jsonl", [json.dumps({"messages": msgs})]))
    ex = encode_sft(rows[0], tok, 64, 32)
    assert tok.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE]) == "hello<|eos|>"


def test_prompt_too_long_is_an_error(tmp_path, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    rows = load_rows(write(tmp_path / "d.jsonl", [json.dumps({"prompt": "sky " * 50, "response": "b"})]))
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'prompt': \d+ tokens > data.max_prompt_length=16"):
        encode_sft(rows[0], tok, 64, 16)


def test_pad_left_and_right():
    assert pad([[1, 2], [3]], 0).tolist() == [[1, 2], [3, 0]]
    assert pad([[1, 2], [3]], 0, side="left").tolist() == [[1, 2], [0, 3]]


def test_step_batcher_splits_global_batch_over_ranks_and_micro_batches():
    examples = list(range(16))
    one = StepBatcher(examples, micro_batch_size=4, grad_accum=2, world_size=1, rank=0, seed=1, shuffle=True, collate=list)
    ranks = [StepBatcher(examples, 2, 2, 2, r, 1, True, list) for r in range(2)]
    for step in range(4):  # two epochs
        whole = sorted(sum(one.micro_batches(step), []))
        split = sorted(sum(ranks[0].micro_batches(step) + ranks[1].micro_batches(step), []))
        assert whole == split and len(whole) == 8
    # every example is seen once per epoch
    assert sorted(sum(one.micro_batches(0) + one.micro_batches(1), [])) == examples


def test_step_batcher_rejects_too_little_data():
    with pytest.raises(ValueError, match="3 examples are fewer than one global batch of 4"):
        StepBatcher([1, 2, 3], 2, 2, 1, 0, 0, True, list)
