import json

import pytest
import torch

from rlhf.algorithms.sft import IGNORE, encode_sft
from rlhf.data import BadRows, DataError, load_rows
from rlhf.data.batching import StepBatcher, attention_mask, pad
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


CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "good"},
        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]


@pytest.mark.parametrize("loss_on", ["assistant", "last_turn", "all"])
def test_multi_turn_sft_masks(tmp_path, tiny_model_dir, loss_on):
    # The tiny template renders <|user|>hi<|assistant|>hello<|eos|><|user|>how are you<|assistant|>good<|eos|>
    # <|user|>bye<|assistant|>see you<|eos|>. Built by hand from its pieces (special tokens split the text, so each
    # content tokenizes alone), with the trained tokens of each mode:
    #   assistant: hello<|eos|>, good<|eos|>, see you<|eos|> (every assistant turn and its end-of-turn marker)
    #   last_turn: see you<|eos|> only;  all: every token
    tok = load_tokenizer(tiny_model_dir)
    U, A, E = (tok.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>", "<|eos|>"))

    def text(s):
        return tok(s, add_special_tokens=False)["input_ids"]
    pieces = [([U] + text("hi") + [A], False), (text("hello") + [E], True),
              ([U] + text("how are you") + [A], False), (text("good") + [E], True),
              ([U] + text("bye") + [A], False), (text("see you") + [E], True)]
    ids = [t for piece, _ in pieces for t in piece]
    last = len(ids) - len(pieces[-1][0])
    trained = [t for piece, reply in pieces for t in ([reply] * len(piece))]
    expected = {"assistant": trained, "last_turn": [i >= last for i in range(len(ids))], "all": [True] * len(ids)}
    rows = load_rows(write(tmp_path / "d.jsonl", [json.dumps({"messages": CHAT})]))
    ex = encode_sft(rows[0], tok, 64, 32, loss_on=loss_on)
    assert ex["input_ids"] == ids
    assert ex["labels"] == [t if keep else IGNORE for t, keep in zip(ids, expected[loss_on])]
    # by position, with the tiny tokenizer: <|user|> 0, hi 1, <|assistant|> 2, he l lo 3-5, <|eos|> 6, <|user|> 7,
    # h ow a re y ou 8-13, <|assistant|> 14, g o od 15-17, <|eos|> 18, <|user|> 19, b y e 20-22, <|assistant|> 23,
    # s e e y ou 24-28, <|eos|> 29
    positions = {"assistant": [3, 4, 5, 6, 15, 16, 17, 18, 24, 25, 26, 27, 28, 29],
                 "last_turn": [24, 25, 26, 27, 28, 29], "all": list(range(30))}
    assert [i for i, label in enumerate(ex["labels"]) if label != IGNORE] == positions[loss_on]


def test_single_turn_sft_is_the_same_in_assistant_and_last_turn_modes(tmp_path, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    rows = load_rows(write(tmp_path / "d.jsonl", [json.dumps({"prompt": "What color is the sky?", "response": "blue"}),
                                                  json.dumps({"messages": CHAT[:2]})]))
    for row in rows:
        assert encode_sft(row, tok, 64, 32, "assistant") == encode_sft(row, tok, 64, 32, "last_turn")


def test_prompt_too_long_is_an_error(tmp_path, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    rows = load_rows(write(tmp_path / "d.jsonl", [json.dumps({"prompt": "sky " * 50, "response": "b"})]))
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'prompt': \d+ tokens > data.max_prompt_length=16"):
        encode_sft(rows[0], tok, 64, 16)


def test_pad_left_and_right():
    assert pad([[1, 2], [3]], 0).tolist() == [[1, 2], [3, 0]]
    assert pad([[1, 2], [3]], 0, side="left").tolist() == [[1, 2], [0, 3]]
    # an empty row, tuples and tensors (rows of any kind keep their order), and the masks that go with them
    seqs = [[5, 6, 7], [], (8,), torch.tensor([9, 4])]
    assert pad(seqs, -1).tolist() == [[5, 6, 7], [-1, -1, -1], [8, -1, -1], [9, 4, -1]]
    assert pad(seqs, -1, side="left").tolist() == [[5, 6, 7], [-1, -1, -1], [-1, -1, 8], [-1, 9, 4]]
    assert attention_mask(seqs).tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0], [1, 1, 0]]
    assert attention_mask(seqs, side="left").tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 1], [0, 1, 1]]


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
