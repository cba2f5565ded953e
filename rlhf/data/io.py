"""Read rows from JSONL/JSON/parquet files, folders (of them, or written by save_to_disk) or hub datasets, keeping
where each row came from.

Every error names the file, the line (or row) and the field, so a user can open the file at the
right place: JSONL rows by line (`x.jsonl:17`), JSON-list, parquet, Arrow and hub rows by number (`x.parquet row:17`).
`open_source` says how a spec is read; rlhf.data.mapped tokenizes its rows through `datasets.map`. Bad rows either stop the run or, with `data.on_bad_row: skip`, are counted and logged.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional


class DataError(ValueError):
    def __init__(self, source: str, line: int, field: Optional[str], reason: str):
        self.source, self.line, self.field, self.reason = source, line, field, reason
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: " + (f"field '{field}': " if field else "") + reason)

    def __reduce__(self):  # picklable, e.g. across processes
        return DataError, (self.source, self.line, self.field, self.reason)

    @property
    def kind(self) -> str:
        """The error without its specifics (numbers, columns, quoted values), to count errors of one kind together."""
        reason = re.split(r": | \(|, got ", self.reason)[0]
        reason = re.sub(r"(?<![\w.-])\d+(?![\w.-])", "N", reason)  # "37 tokens > ...=32" -> "N tokens > ...=N"; "UTF-8" stays
        field = re.sub(r"\[\d+\]", "[i]", self.field) if self.field else None
        return f"field '{field}': {reason}" if field else reason


# Row fields that hold chat transcripts when they are lists; every other field is read as given.
TRANSCRIPT_FIELDS = ("prompt", "messages", "chosen", "rejected", "completion")
ROLES = ("system", "user", "assistant", "tool")


class Row:
    """One row and where it came from.

    A line that could not be read (invalid JSON or UTF-8, not an object) is still a Row, holding its DataError:
    reading its `data` raises it. The loader that uses the row then applies `data.on_bad_row` to it like to any
    other bad row, in file order, so nothing unreadable is skipped silently or kept.
    """

    __slots__ = ("_data", "source", "line", "error")

    def __init__(self, data: dict, source: str, line: int, error: Optional["DataError"] = None):
        self._data, self.source, self.line, self.error = data, source, line, error

    @classmethod
    def unreadable(cls, source: str, line: int, reason: str) -> "Row":
        return cls({}, source, line, DataError(source, line, None, reason))

    @property
    def data(self) -> dict:
        if self.error is not None:
            raise self.error
        return self._data

    def __repr__(self) -> str:
        return f"Row({self._data!r}, {self.source!r}, {self.line}{', error' if self.error else ''})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Row) and (self._data, self.source, self.line, str(self.error)) == (
            other._data, other.source, other.line, str(other.error))

    def get(self, name: str, kind: type | tuple = str, required: bool = True) -> Any:
        """The field `name`, checked: of type `kind` (a bool is no number), text that is valid Unicode, a finite
        number, a transcript (see TRANSCRIPT_FIELDS) made of {role, content} messages, and a non-blank prompt."""
        data = self.data
        if name not in data or data[name] is None:
            if required:
                raise DataError(self.source, self.line, name, "missing")
            return None
        value = data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            expected = " or ".join(k.__name__ for k in kinds)
            raise DataError(self.source, self.line, name, f"expected {expected}, got {type(value).__name__}")
        if isinstance(value, str):
            self._check_text(name, value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise DataError(self.source, self.line, name, f"expected a finite number, got {value}")
        elif isinstance(value, list) and name in TRANSCRIPT_FIELDS:
            self._check_transcript(name, value)
        if name == "prompt" and _is_blank(value):
            raise DataError(self.source, self.line, name, "empty prompt")
        return value

    def _check_text(self, name: str, text: str) -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in the JSON) no tokenizer can encode
            raise DataError(self.source, self.line, name,
                            f"not valid Unicode: lone surrogate U+{ord(text[e.start]):04X} at character {e.start + 1}") from None

    def _check_transcript(self, name: str, messages: list) -> None:
        for i, m in enumerate(messages):
            where = f"{name}[{i}]"
            if not isinstance(m, dict):
                raise DataError(self.source, self.line, where,
                                f"expected a message {{role, content}}, got {type(m).__name__}")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise DataError(self.source, self.line, f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
            if not isinstance(content, str):
                raise DataError(self.source, self.line, f"{where}.content",
                                f"expected str, got {'nothing' if content is None else type(content).__name__}")
            self._check_text(f"{where}.content", content)

    def fail(self, name: Optional[str], reason: str) -> DataError:
        return DataError(self.source, self.line, name, reason)


def _is_blank(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return not prompt.strip()
    return isinstance(prompt, list) and all(not m["content"].strip() for m in prompt)


@dataclass
class BadRows:
    """Applies `data.on_bad_row`: raise the first error, or keep count of what was skipped."""

    policy: str = "error"
    skipped: list[DataError] = field(default_factory=list)

    def __call__(self, err: DataError) -> None:
        if self.policy == "error":
            raise err
        self.skipped.append(err)

    def summary(self) -> str:
        """One line: 'skipped N rows of FILE (data.on_bad_row=skip): 2 x field 'x': missing, ...; first: FILE:LINE: ...'."""
        if not self.skipped:
            return ""
        sources = ", ".join(dict.fromkeys(_file_of(e.source) for e in self.skipped))
        reasons = Counter(e.kind for e in self.skipped)
        listed = ", ".join(f"{n} x {kind}" for kind, n in reasons.most_common())
        return (f"skipped {len(self.skipped)} rows of {sources} (data.on_bad_row=skip): {listed}; "
                f"first: {self.skipped[0]}")


def _file_of(source: str) -> str:
    return source[:-len(" row")] if source.endswith(" row") else source


def is_blank_line(lineno: int, raw: bytes) -> bool:
    """A line of JSON whitespace only (after a BOM at the start of the file, which some editors write): no row.
    Other blank-looking characters are a bad row, not a gap."""
    if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    return not raw.rstrip(b"\r\n").strip(b" \t")


def parse_line(path: str, lineno: int, raw: bytes) -> Optional[Row]:
    """The Row of one JSONL line (an unreadable Row if it is no UTF-8, no JSON or no object), or None if blank."""
    if is_blank_line(lineno, raw):
        return None
    if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        return Row.unreadable(path, lineno, f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line")
    value, why = _parse(line)
    if why:
        return Row.unreadable(path, lineno, why)
    if not isinstance(value, dict):
        return Row.unreadable(path, lineno, f"expected a JSON object, got {_json_type(value)}")
    return Row(value, path, lineno)


def iter_jsonl(path: str) -> Iterator[Row]:
    """One Row per non-blank line, read lazily; a line that cannot be read becomes an unreadable Row (see Row)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            row = parse_line(path, lineno, raw)
            if row is not None:
                yield row


def _parse(text: str) -> tuple[Any, str]:
    """(value, "") or (None, why the text is no JSON)."""
    try:
        return json.loads(text), ""
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} (column {e.colno})"
    except (ValueError, RecursionError) as e:  # an integer over Python's digit limit; nesting past the stack
        return None, f"invalid JSON: {'nested too deeply' if isinstance(e, RecursionError) else e}"


def read_jsonl(path: str) -> list[Row]:
    """One Row per non-blank line; a line that cannot be read becomes an unreadable Row (see Row)."""
    return list(iter_jsonl(path))


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def read_json(path: str) -> list[Row]:
    """A .json file holding a list of objects (or {"data": [...]}). The file is one document: if it is not valid
    JSON it fails as a whole; an element that is not an object becomes an unreadable Row."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, raw[:e.start].count(b"\n") + 1, None, f"not valid UTF-8: byte 0x{raw[e.start]:02x}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise DataError(path, 0, None, f"invalid JSON: {'nested too deeply' if isinstance(e, RecursionError) else e}") from None
    if isinstance(value, dict) and "data" in value:
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(path, 0, None, f"expected a list of objects, got {_json_type(value)}")
    return [Row(v, f"{path} row", i + 1) if isinstance(v, dict)
            else Row.unreadable(f"{path} row", i + 1, f"expected a JSON object, got {_json_type(v)}")
            for i, v in enumerate(value)]


def load_rows(spec: str, split: str = "train", limit: int = 0) -> list[Row]:
    """Rows of a .jsonl/.json/.parquet file, a folder holding `<split>.jsonl`, a save_to_disk folder, or a dataset
    via `datasets` (see open_source)."""
    identity, make_source = open_source(spec, split, limit)
    return list(make_source().head())


def open_source(spec: str, split: str = "train", limit: int = 0):
    """(identity, make_source) of a data spec: `make_source()` builds the RowSource (rlhf.data.mapped) the map
    reads; `identity` names its data for the tokenization cache. JSON(L) files are read by our reader (rows named
    file:line); everything else through `datasets` as Arrow (rows named '<spec>[<split>] row:N', or '<file> row:N'):
      a file: .jsonl, .json (a list of objects), .parquet, .arrow, .csv
      a folder: `<split>.jsonl` in it; a `Dataset.save_to_disk` folder; a `DatasetDict.save_to_disk` folder (its
                split `split`); otherwise datasets' own layouts (data/<split>-*.jsonl, parquet shards, ...)
      a hub dataset name (`datasets.load_dataset(name, split=split)`)."""
    from ..config import looks_local
    from .mapped import ArrowRows, JsonlLines, RowsInMemory, file_identity

    if not os.path.exists(spec) and looks_local(spec):  # a mistyped path: say so instead of asking the hub
        raise DataError(spec, 0, None, "no such file or folder; expected a .jsonl/.json/.parquet file, a folder, or "
                                       "a hub dataset name")
    jsonl = spec if os.path.isfile(spec) and spec.endswith(".jsonl") else os.path.join(spec, f"{split}.jsonl")
    if os.path.isfile(jsonl):
        return f"{file_identity(jsonl)}:{limit}", lambda: JsonlLines(jsonl, limit)
    if os.path.isfile(spec) and spec.endswith(".json"):
        return f"{file_identity(spec)}:{limit}", lambda: RowsInMemory(_limited(read_json(spec), limit))
    ds, name = _load_with_datasets(spec, split)
    if limit and limit < len(ds):
        ds = ds.select(range(limit))
    source = ArrowRows(ds, name)
    return source.identity, lambda: source


def _limited(rows: list, limit: int) -> list:
    return rows[:limit] if limit else rows


def _load_with_datasets(spec: str, split: str):
    """(Dataset, name of its rows) of a file, folder or hub name that our JSON readers do not read."""
    import datasets

    try:
        if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "dataset_dict.json")):  # DatasetDict.save_to_disk
            splits = datasets.load_from_disk(spec)
            if split not in splits:
                raise DataError(spec, 0, None, f"no split '{split}' in this save_to_disk folder; it has "
                                               f"{', '.join(splits)} (set data.train_split / data.eval_split)")
            return splits[split], f"{spec}[{split}] row"
        if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "state.json")):  # Dataset.save_to_disk
            return datasets.load_from_disk(spec), f"{spec} row"
        if os.path.isfile(spec):
            ext = os.path.splitext(spec)[1].lstrip(".")
            if ext == "arrow":
                return datasets.Dataset.from_file(spec), f"{spec} row"
            builder = {"parquet": "parquet", "csv": "csv", "gz": "json"}.get(ext, "json")
            return datasets.load_dataset(builder, data_files={split: spec}, split=split), f"{spec} row"
        return datasets.load_dataset(spec, split=split), f"{spec}[{split}] row"
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the spec and the reason
        raise DataError(spec, 0, None, f"could not load split '{split}': {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
