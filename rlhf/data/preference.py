"""Preference pairs: rows in any supported format -> tokenized (prompt, chosen, rejected) -> padded pair batches.

    pairs = load_pairs(cfg.data.train, tokenizer, PairOptions.from_config(cfg.data, "better"), bad)
    batch = collate_pairs(tokenizer.pad_token_id)(pairs[:4])

Formats (`data.format`; "auto" picks one from the first row's columns, see FORMATS):
  preference     {prompt, chosen, rejected[, margin]}. prompt: text or messages; chosen/rejected: text, or messages
                 ending with the assistant reply (leading messages extend the prompt).
  hh-rlhf        Anthropic/hh-rlhf: chosen/rejected are whole transcripts "\\n\\nHuman: ...\\n\\nAssistant: ...";
                 the shared turns become the prompt (as messages), the final assistant turn the response.
  pku-saferlhf   PKU-Alignment/PKU-SafeRLHF: prompt, response_0, response_1, better_response_id,
                 safer_response_id; `pku_preference` picks which id names the chosen response. With "safer", a
                 row whose responses are both unsafe (is_response_0_safe and is_response_1_safe false) is dropped
                 and counted (`pku_both_unsafe: drop`, the default): "the safer of two harmful answers" would
                 teach a preference for harm; `pku_both_unsafe: keep` keeps it as an ordinary pair.
  ultrafeedback  HuggingFaceH4/ultrafeedback_binarized: chosen/rejected are message lists holding the prompt;
                 margin = score_chosen - score_rejected. Its splits are train_prefs / test_prefs (data.train_split).
                 This is also TRL's conversational implicit-prompt type, which auto detects as this format.
  implicit_prompt  TRL's implicit-prompt type {chosen, rejected}: whole texts sharing the prompt at their start
                 (their common prefix, cut at its last whitespace, is the prompt), or message lists.
TRL's explicit-prompt type {prompt, chosen, rejected} (text or messages) is `preference`. Its unpaired type
{prompt, completion, label} is refused: DPO and the reward model need pairs (one error naming the file's first row).
Responses get the tokenizer's EOS appended and are cut to data.max_length - prompt tokens; bad rows (a missing
field, an empty response, chosen == rejected, a prompt over data.max_prompt_length) raise DataError naming file,
row and field, or are counted under data.on_bad_row=skip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import torch

from .batching import attention_mask, pad
from .io import BadRows, DataError, Row, open_source
from .mapped import Dropped, Examples, MapOptions, RowsInMemory, encode_source
from .templates import (Prompt, as_messages, encode_prompt, encode_response, encode_responses, encode_texts,
                        prompt_text, split_messages)


@dataclass
class Preference:
    """One row, format-independent: the prompt, the preferred and the dispreferred response."""

    prompt: Prompt
    chosen: str
    rejected: str
    margin: Optional[float] = None


@dataclass
class PairExample:
    """A tokenized pair; `index` is its position in the algorithm's train + eval list (keys cached log-probs)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: Optional[float] = None
    index: int = 0


# ----------------------------------------------------------------------------------------------
# Format adapters: Row -> Preference. Each raises DataError naming the row and field.
# ----------------------------------------------------------------------------------------------


def reply_of(row: Row, name: str, value) -> tuple[list, str]:
    """A chosen/rejected value -> (leading messages, reply text)."""
    if isinstance(value, str):
        return [], value
    try:
        return split_messages(value)
    except (ValueError, AttributeError, KeyError, TypeError) as e:
        raise row.fail(name, f"bad message list: {e}") from None


def _same_prompt(row: Row, chosen: tuple[list, str], rejected: tuple[list, str]) -> list:
    if chosen[0] != rejected[0]:
        raise row.fail("rejected", "chosen and rejected differ before the final reply; expected one shared prompt")
    return chosen[0]


def _from_preference(row: Row, pku_preference: str) -> Preference:
    prompt = row.get("prompt", (str, list))
    chosen = reply_of(row, "chosen", row.get("chosen", (str, list)))
    rejected = reply_of(row, "rejected", row.get("rejected", (str, list)))
    prefix = _same_prompt(row, chosen, rejected)
    if prefix:
        prompt = as_messages(prompt) + prefix
    margin = row.get("margin", (int, float), required=False)
    return Preference(prompt, chosen[1], rejected[1], None if margin is None else float(margin))


def _from_transcripts(row: Row, chosen: list, rejected: list) -> tuple[list, str, str]:
    c, r = reply_of(row, "chosen", chosen), reply_of(row, "rejected", rejected)
    prompt = _same_prompt(row, c, r)
    if not prompt:
        raise row.fail("chosen", "the transcript has no prompt before the final assistant reply")
    return prompt, c[1], r[1]


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str) -> list[dict]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', ...}]."""
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n"))
    if parts[0].strip():
        raise ValueError(f"text before the first 'Human:' turn: {parts[0][:40]!r}")
    return [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def _from_hh_rlhf(row: Row, pku_preference: str) -> Preference:
    turns = {}
    for name in ("chosen", "rejected"):
        text = row.get(name, str)  # its DataError is a ValueError too: read outside the try
        try:
            turns[name] = parse_hh_transcript(text)
        except ValueError as e:
            raise row.fail(name, str(e)) from None
    return Preference(*_from_transcripts(row, turns["chosen"], turns["rejected"]))


def _from_implicit_prompt(row: Row, pku_preference: str) -> Preference:
    """TRL's implicit-prompt pair: chosen and rejected are whole texts (or transcripts) starting with the same
    prompt. For text, the prompt is their common prefix up to its last whitespace (TRL's extract_prompt cuts at
    the first differing character, which can split a word); for message lists, the shared messages."""
    chosen, rejected = row.get("chosen", (str, list)), row.get("rejected", (str, list))
    if isinstance(chosen, list) or isinstance(rejected, list):
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise row.fail("rejected", "chosen and rejected must both be text or both be message lists")
        return Preference(*_from_transcripts(row, chosen, rejected))
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = max(chosen.rfind(" ", 0, n), chosen.rfind("\n", 0, n))
    if cut <= 0 or not chosen[:cut].strip():
        raise row.fail("chosen", "chosen and rejected share no prompt; an implicit-prompt pair starts both with it")
    margin = row.get("margin", (int, float), required=False)
    return Preference(chosen[:cut], chosen[cut:], rejected[cut:], None if margin is None else float(margin))


def _looks_hh(text) -> bool:
    return isinstance(text, str) and text.lstrip("\n").startswith("Human:")


def _from_pku_saferlhf(row: Row, pku_preference: str) -> Preference:
    key = f"{pku_preference}_response_id"
    better = row.get(key, int)
    if better not in (0, 1):
        raise row.fail(key, f"expected 0 or 1, got {better}")
    responses = [row.get("response_0", str), row.get("response_1", str)]
    return Preference(row.get("prompt", str), responses[better], responses[1 - better])


def pku_both_unsafe(row: Row) -> bool:
    """Whether a PKU-SafeRLHF row's two responses are both labelled unsafe."""
    return not row.get("is_response_0_safe", bool) and not row.get("is_response_1_safe", bool)


def _from_ultrafeedback(row: Row, pku_preference: str) -> Preference:
    prompt, chosen, rejected = _from_transcripts(row, row.get("chosen", list), row.get("rejected", list))
    scores = [row.get(k, (int, float), required=False) for k in ("score_chosen", "score_rejected")]
    margin = float(scores[0] - scores[1]) if None not in scores else None
    return Preference(prompt, chosen, rejected, margin)


def _is_transcript(value) -> bool:
    return isinstance(value, list) and any(isinstance(m, dict) and m.get("role") != "assistant" for m in value)


UNPAIRED = {"prompt", "completion", "label"}
UNPAIRED_REASON = ("unpaired preference rows {prompt, completion, label}: DPO and the reward model learn from pairs; "
                   "give each row a chosen and a rejected response ({prompt, chosen, rejected})")


class Format(NamedTuple):
    adapt: Callable[[Row, str], Preference]
    detect: Callable[[dict], bool]  # does a row with these columns look like this format?


# Detection tries the formats in this order; the first match wins.
FORMATS: dict[str, Format] = {
    "pku-saferlhf": Format(_from_pku_saferlhf, lambda d: {"response_0", "response_1"} <= d.keys()),
    "ultrafeedback": Format(_from_ultrafeedback, lambda d: _is_transcript(d.get("chosen"))),
    "hh-rlhf": Format(_from_hh_rlhf, lambda d: "prompt" not in d and _looks_hh(d.get("chosen"))),
    "preference": Format(_from_preference, lambda d: {"prompt", "chosen", "rejected"} <= d.keys()),
    "implicit_prompt": Format(_from_implicit_prompt, lambda d: "prompt" not in d and isinstance(d.get("chosen"), str)
                              and isinstance(d.get("rejected"), str)),
}


def detect_format(row: Row) -> str:
    data = row.data
    if UNPAIRED <= data.keys() and not {"chosen", "rejected"} & data.keys():
        raise DataError(row.source, row.line, None, UNPAIRED_REASON)
    for name, fmt in FORMATS.items():
        if fmt.detect(data):
            return name
    raise DataError(row.source, row.line, None, f"data.format=auto: columns {sorted(data)} match no preference "
                                                f"format; set data.format to one of {', '.join(FORMATS)}")


def resolve_format(fmt: str, rows: Iterable[Row]) -> str:
    """The format named by `fmt`; for "auto", the first readable row of `rows` (read lazily) that matches a format
    decides, so an unreadable or broken first row is one bad row under data.on_bad_row, not the whole file."""
    if fmt == "auto":
        first = None
        for row in rows:
            if row.error is None:
                first = first or row
                if any(f.detect(row.data) for f in FORMATS.values()) or UNPAIRED <= row.data.keys():
                    return detect_format(row)
        if first is not None:
            detect_format(first)  # raises: no row of the file looks like preference data
        return "preference"  # no row is readable: each fails on its own as it is adapted
    if fmt not in FORMATS:
        from ..config import ConfigError

        raise ConfigError(f"data.format={fmt!r}: preference data needs auto or one of {', '.join(FORMATS)}")
    return fmt


# ----------------------------------------------------------------------------------------------
# Tokenizing and loading
# ----------------------------------------------------------------------------------------------


@dataclass
class PairOptions:
    format: str = "auto"
    max_length: int = 512
    max_prompt_length: int = 256
    pku_preference: str = "better"
    need_margin: bool = False
    pku_both_unsafe: str = "drop"  # with pku_preference "safer": drop or keep rows whose responses are both unsafe
    num_proc: int = 1  # how the map runs (data.num_proc, data.cache_dir); the result does not depend on them
    cache_dir: str = ""

    @classmethod
    def from_config(cls, data, pku_preference: str = "better", need_margin: bool = False,
                    pku_both_unsafe: str = "drop") -> "PairOptions":
        return cls(data.format, data.max_length, data.max_prompt_length, pku_preference, need_margin, pku_both_unsafe,
                   getattr(data, "num_proc", 1), getattr(data, "cache_dir", ""))

    def drops(self, fmt: "Format", row: Row) -> Optional[str]:
        """Why a well-formed row is left out by choice (a key of the `dropped` counts), or None to keep it."""
        if (fmt is FORMATS["pku-saferlhf"] and self.pku_preference == "safer" and self.pku_both_unsafe == "drop"
                and pku_both_unsafe(row)):
            return "pku_both_unsafe"
        return None


def check_pair(row: Row, pref: Preference, opts: PairOptions) -> None:
    """The checks before tokenizing: empty or identical responses, a missing margin the options need."""
    for name in ("chosen", "rejected"):
        if not getattr(pref, name).strip():
            raise row.fail(name, "empty response")
    if pref.chosen == pref.rejected:
        raise row.fail("rejected", "identical to chosen")
    if opts.need_margin and pref.margin is None:
        raise row.fail("margin", "missing (reward.margin is on)")


def finish_pair(row: Row, pref: Preference, prompt: list[int], chosen: list[int], rejected: list[int],
                opts: PairOptions) -> PairExample:
    """The pair from its tokens (responses with EOS): prompt checks, responses cut to data.max_length."""
    if not prompt:
        raise row.fail("prompt", "empty prompt")
    if len(prompt) > opts.max_prompt_length:
        raise row.fail("prompt", f"{len(prompt)} tokens > data.max_prompt_length={opts.max_prompt_length}")
    room = opts.max_length - len(prompt)
    chosen, rejected = chosen[:room], rejected[:room]
    if chosen == rejected:
        raise row.fail("rejected", f"identical to chosen within data.max_length={opts.max_length} tokens")
    return PairExample(prompt, chosen, rejected, pref.margin)


def encode_pair(row: Row, pref: Preference, tokenizer, opts: PairOptions) -> PairExample:
    """Tokenize one pair; fails (naming the row) on empty or identical responses and over-long prompts."""
    check_pair(row, pref, opts)
    return finish_pair(row, pref, encode_prompt(tokenizer, pref.prompt), encode_response(tokenizer, pref.chosen),
                       encode_response(tokenizer, pref.rejected), opts)


class PairEncoder:
    """Row -> tokenized pair columns (or a Dropped reason), for rlhf.data.mapped; `resolve` fixes the format."""

    columns = ("prompt_ids", "chosen_ids", "rejected_ids", "margin")

    def __init__(self, tokenizer, opts: PairOptions):
        self.tokenizer, self.opts, self.format = tokenizer, opts, opts.format

    def features(self) -> dict:
        from datasets import Sequence, Value

        ids = Sequence(Value("int32"))
        return {"prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids, "margin": Value("float64")}

    def settings(self) -> tuple:
        o = self.opts
        return (o.format, o.max_length, o.max_prompt_length, o.pku_preference, o.need_margin, o.pku_both_unsafe)

    def resolve(self, rows: Iterable[Row]) -> None:
        self.format = resolve_format(self.opts.format, rows)

    def encode_batch(self, rows: list[Row]) -> list:
        """Each row's columns, Dropped reason or DataError; the texts of all rows are tokenized in three batched
        tokenizer calls (prompts, chosen, rejected), the same tokens as encode_pair's one at a time."""
        fmt, out, todo = FORMATS[self.format], [None] * len(rows), []
        for i, row in enumerate(rows):
            try:
                reason = self.opts.drops(fmt, row)
                if reason:
                    out[i] = Dropped(reason)
                    continue
                pref = fmt.adapt(row, self.opts.pku_preference)
                check_pair(row, pref, self.opts)
                todo.append((i, row, pref))
            except DataError as e:
                out[i] = e
        if not todo:
            return out
        tok = self.tokenizer
        prompts = encode_texts(tok, [prompt_text(tok, pref.prompt) for _, _, pref in todo])
        chosen = encode_responses(tok, [pref.chosen for _, _, pref in todo])
        rejected = encode_responses(tok, [pref.rejected for _, _, pref in todo])
        for (i, row, pref), p, c, r in zip(todo, prompts, chosen, rejected):
            try:
                e = finish_pair(row, pref, p, c, r, self.opts)
                out[i] = {"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids,
                          "margin": e.margin}
            except DataError as err:
                out[i] = err
        return out


def pair_example(columns: dict, index: int) -> PairExample:
    return PairExample(columns["prompt_ids"], columns["chosen_ids"], columns["rejected_ids"], columns["margin"], index)


def encode_rows(rows: list[Row], tokenizer, opts: PairOptions, bad: BadRows,
                dropped: Optional[dict[str, int]] = None) -> Sequence[PairExample]:
    """Tokenized pairs of `rows` (mapped in memory); malformed rows go to `bad`, rows left out by choice
    (PairOptions.drops) are counted by reason in `dropped`."""
    if not rows:
        return []
    return encode_source(lambda: RowsInMemory(rows), None, PairEncoder(tokenizer, opts), bad,
                         MapOptions(opts.num_proc, opts.cache_dir), dropped, pair_example)


def load_pairs(spec: str, tokenizer, opts: PairOptions, bad: BadRows, split: str = "train",
               limit: int = 0, dropped: Optional[dict[str, int]] = None) -> Sequence[PairExample]:
    """Read (rlhf.data.io.open_source), adapt and tokenize a preference dataset through the cached map; bad rows
    go to `bad`, rows dropped by choice are counted in `dropped`."""
    identity, make_source = open_source(spec, split, limit)
    return encode_source(make_source, identity, PairEncoder(tokenizer, opts), bad,
                         MapOptions(opts.num_proc, opts.cache_dir), dropped, pair_example)


def number_pairs(*parts: Sequence[PairExample]) -> None:
    """Give the pairs of `parts`, one after another, their positions as `index` (keys cached log-probs)."""
    base = 0
    for part in parts:
        if isinstance(part, Examples):
            part.index_base = base
        else:
            for i, example in enumerate(part):
                example.index = base + i
        base += len(part)


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


@dataclass
class PairBatch:
    """B pairs as 2B right-padded rows, chosen rows first: row i and row B + i share prompt i.

    input_ids, attention_mask: [2B, T]
    response_mask: [2B, T-1], 1 where the target input_ids[:, t+1] is a response token (aligned with token_logprobs)
    index: [B] the pairs' positions in the algorithm's example list
    margin: [B] per-pair margins, or None when any pair has none
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    index: torch.Tensor
    margin: Optional[torch.Tensor] = None

    @property
    def num_pairs(self) -> int:
        return self.index.numel()


def collate_pairs(pad_id: int) -> Callable[[list[PairExample]], PairBatch]:
    def collate(examples: list[PairExample]) -> PairBatch:
        rows = [e.prompt_ids + e.chosen_ids for e in examples] + [e.prompt_ids + e.rejected_ids for e in examples]
        targets = ([[0] * (len(e.prompt_ids) - 1) + [1] * len(e.chosen_ids) for e in examples]
                   + [[0] * (len(e.prompt_ids) - 1) + [1] * len(e.rejected_ids) for e in examples])
        margins = [e.margin for e in examples]
        margin = None if None in margins else torch.tensor(margins, dtype=torch.float32)
        index = torch.tensor([e.index for e in examples])
        return PairBatch(pad(rows, pad_id), attention_mask(rows), pad(targets, 0), index, margin)
    return collate
