"""Rows of a dataset given as a Python object (`Trainer(train_dataset=..., eval_dataset=...)`, rlhf.api).

A `datasets.Dataset` (or IterableDataset) or a list of dicts, in any row format the file readers accept. Each row
becomes the same `Row` a file gives (rlhf/data/io.py), its source the argument's name and its line the row's index
+ 1, so every algorithm's validation applies unchanged and an error names the row and field:
"train_dataset:3: field 'response': missing".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .io import DataError, Row


def rows_from_dataset(obj: Any, name: str) -> list[Row]:
    """One Row per row of `obj`; an element that is not a mapping of columns becomes an unreadable Row (the loader
    then applies data.on_bad_row to it like to any bad row)."""
    if isinstance(obj, Mapping):  # a DatasetDict, or a dict of columns
        keys = ", ".join(repr(k) for k in list(obj)[:4])
        raise DataError(name, 0, None, f"expected a datasets.Dataset or a list of dicts, got a {type(obj).__name__} "
                                       f"with keys {keys}: pass one split (e.g. {name}=ds['train']), or rows as "
                                       f"datasets.Dataset.from_dict(columns)")
    if isinstance(obj, (str, bytes)) or not isinstance(obj, Iterable):
        raise DataError(name, 0, None, f"expected a datasets.Dataset or a list of dicts, got {type(obj).__name__}"
                                       + (" (a path goes into the config's data.train / data.eval)"
                                          if isinstance(obj, str) else ""))
    if hasattr(obj, "with_format"):  # rows as Python objects, whatever format (torch, numpy) the dataset was set to
        obj = obj.with_format(None)
    return [Row(dict(r), name, i + 1) if isinstance(r, Mapping)
            else Row.unreadable(name, i + 1, f"expected a mapping of columns, got {type(r).__name__}")
            for i, r in enumerate(obj)]
