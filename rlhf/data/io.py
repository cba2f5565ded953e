"""Read rows from JSONL/JSON files, folders or hub datasets, keeping where each row came from.

Every error names the file, the line (or row) and the field, so a user can open the file at the
right place. Bad rows either stop the run or, with `data.on_bad_row: skip`, are counted and logged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional


class DataError(ValueError):
    def __init__(self, source: str, line: int, field: Optional[str], reason: str):
        self.source, self.line, self.field, self.reason = source, line, field, reason
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: " + (f"field '{field}': " if field else "") + reason)


@dataclass
class Row:
    data: dict
    source: str
    line: int

    def get(self, name: str, kind: type | tuple = str, required: bool = True) -> Any:
        if name not in self.data or self.data[name] is None:
            if required:
                raise DataError(self.source, self.line, name, "missing")
            return None
        value = self.data[name]
        if not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise DataError(self.source, self.line, name, f"expected {expected}, got {type(value).__name__}")
        return value

    def fail(self, name: Optional[str], reason: str) -> DataError:
        return DataError(self.source, self.line, name, reason)


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
        if not self.skipped:
            return ""
        return f"skipped {len(self.skipped)} bad rows (data.on_bad_row=skip); first: {self.skipped[0]}"


def read_jsonl(path: str) -> list[Row]:
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(value, dict):
                raise DataError(path, lineno, None, f"expected a JSON object, got {type(value).__name__}")
            rows.append(Row(value, path, lineno))
    return rows


def read_json(path: str) -> list[Row]:
    with open(path) as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(value, dict) and "data" in value:
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(path, 0, None, "expected a list of objects")
    return [Row(v, f"{path} row", i + 1) for i, v in enumerate(value)]


def load_rows(spec: str, split: str = "train", limit: int = 0) -> list[Row]:
    """Rows of a .jsonl/.json file, a folder holding `<split>.jsonl`, or a dataset via `datasets`."""
    if os.path.isfile(spec):
        rows = read_jsonl(spec) if spec.endswith(".jsonl") else read_json(spec) if spec.endswith(".json") else None
        if rows is None:
            rows = _load_with_datasets(spec, split)
    elif os.path.isdir(spec) and os.path.isfile(os.path.join(spec, f"{split}.jsonl")):
        rows = read_jsonl(os.path.join(spec, f"{split}.jsonl"))
    else:
        rows = _load_with_datasets(spec, split)
    return rows[:limit] if limit else rows


def _load_with_datasets(spec: str, split: str) -> list[Row]:
    import datasets

    try:
        if os.path.isfile(spec):
            ext = os.path.splitext(spec)[1].lstrip(".")
            builder = {"parquet": "parquet", "csv": "csv", "gz": "json"}.get(ext, "json")
            ds = datasets.load_dataset(builder, data_files={split: spec}, split=split)
        else:
            ds = datasets.load_dataset(spec, split=split)
    except Exception as e:  # datasets raises many types; the user needs the spec and the reason
        raise DataError(spec, 0, None, f"could not load split '{split}': {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return [Row(dict(r), f"{spec}[{split}] row", i + 1) for i, r in enumerate(ds)]
