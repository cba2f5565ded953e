"""Rows -> tokenized examples through `datasets.Dataset.map`: batched, over `data.num_proc` processes, cached on disk.

    examples = encode_source(spec, split, limit, encoder, bad, MapOptions(num_proc=2), dropped)

A source becomes a Dataset the map reads rows from (a `RowSource`):
  JSONL file      one (line, byte offset, size) per non-blank line; the map reads and parses the lines itself, in
                  parallel, through the same `parse_line` as `read_jsonl`, so an unreadable line is a row error there
  rows in memory  a .json file, or rows handed over as Rows: the map reads them by position
  Arrow data      parquet, a save_to_disk folder, a hub dataset: the Dataset itself, row i named "<source> row:i+1"
The map runs an encoder (SFT, preference pairs, PPO prompts; each a value with an `encode(row)` method) on every row
and writes its columns plus an error column: a DataError becomes (source, line, field, reason) there, a row left out
by choice a `_dropped` reason. After the map, `apply_bad_rows` walks the error column in file order and applies
`data.on_bad_row`: the first bad row raises, or every bad row is counted, as if the rows had been encoded one by one.

Caching. A file source's result is written to `<cache_dir>/<key>*.arrow`, key = hash of (the file's path, size and
mtime, or an Arrow dataset's fingerprint; split; limit; the encoder's kind and options; the tokenizer; the source
text of the data code). A second run with the same data, tokenizer and options finds `<key>.json`, which lists the
result's files, and memory-maps them without reading the source again; a different tokenizer, max_length, format
or file misses. The hash is datasets' `Hasher` (dill), stable across processes. Rows in memory are mapped in memory.

The result is an `Examples` sequence backed by the memory-mapped Arrow table: a million pairs take no Python memory
until a batch reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

from .io import BadRows, DataError, Row, is_blank_line, iter_jsonl, parse_line

CACHE_VERSION = 1
PROGRESS_ROWS = 10_000  # smaller sources are mapped without a progress bar
# An encoder has: columns (names) and features() (their datasets types), settings() (what its output depends on
# besides the tokenizer, for the cache key), tokenizer, resolve(rows) (decide anything that needs the whole source,
# before the map; e.g. the preference format) and encode(row) -> {column: value} | Dropped, raising DataError, or
# encode_batch(rows) -> [{column: value} | Dropped | DataError] (one batched tokenizer call for many rows).
ERROR_COLUMNS = ("_error_source", "_error_line", "_error_field", "_error_reason", "_dropped")


@dataclass
class MapOptions:
    """How the map runs; not part of the cache key (the result does not depend on it)."""

    num_proc: int = 1
    cache_dir: str = ""  # "" -> <HF_DATASETS_CACHE>/rlhf-tokenized

    @classmethod
    def from_config(cls, data) -> "MapOptions":
        return cls(getattr(data, "num_proc", 1), getattr(data, "cache_dir", ""))

    def folder(self) -> str:
        if self.cache_dir:
            return os.path.expanduser(self.cache_dir)
        import datasets

        return os.path.join(datasets.config.HF_DATASETS_CACHE, "rlhf-tokenized")


class Dropped(str):
    """What `encode` returns for a well-formed row left out by choice: the reason, a key of the `dropped` counts."""


# ----------------------------------------------------------------------------------------------
# Sources: a Dataset to map over, and how a batch of it becomes Rows
# ----------------------------------------------------------------------------------------------


class RowSource:
    """A Dataset of the source's rows (`dataset`), `rows(batch, indices)` -> the Rows of a batch of it, `head()`
    -> the Rows in order (for format detection, read lazily)."""

    dataset: Any

    def rows(self, batch: dict, indices: list[int]) -> list[Row]:
        raise NotImplementedError

    def head(self) -> Iterator[Row]:
        raise NotImplementedError


class JsonlLines(RowSource):
    """A JSONL file as (line, offset, size) of each non-blank line; the map reads the bytes."""

    def __init__(self, path: str, limit: int = 0):
        import datasets

        lines, offsets, sizes = [], [], []
        with open(path, "rb") as f:
            offset = 0
            for lineno, raw in enumerate(f, start=1):
                if not is_blank_line(lineno, raw):
                    lines.append(lineno), offsets.append(offset), sizes.append(len(raw))
                    if limit and len(lines) == limit:
                        break
                offset += len(raw)
        self.path, self.limit = path, limit
        self.dataset = datasets.Dataset.from_dict({"line": lines, "offset": offsets, "size": sizes})

    def rows(self, batch: dict, indices: list[int]) -> list[Row]:
        out = []
        with open(self.path, "rb") as f:
            for lineno, offset, size in zip(batch["line"], batch["offset"], batch["size"]):
                f.seek(offset)
                out.append(parse_line(self.path, lineno, f.read(size)))
        return [r for r in out if r is not None]

    def head(self) -> Iterator[Row]:
        for n, row in enumerate(iter_jsonl(self.path), start=1):
            yield row
            if n == self.limit:
                return


class RowsInMemory(RowSource):
    """Rows already read (a .json file, or rows handed over in memory); the map picks them by position."""

    def __init__(self, rows: list[Row]):
        import datasets

        self.list = rows
        self.dataset = datasets.Dataset.from_dict({"i": list(range(len(rows)))})

    def rows(self, batch: dict, indices: list[int]) -> list[Row]:
        return [self.list[i] for i in batch["i"]]

    def head(self) -> Iterator[Row]:
        yield from self.list


class ArrowRows(RowSource):
    """An Arrow-backed Dataset (parquet, save_to_disk, hub): row i is named '<name>:i+1'."""

    def __init__(self, dataset, name: str):
        self.dataset, self.name = dataset, name
        self.identity = f"arrow:{dataset._fingerprint}:{name}"  # the Arrow data's own fingerprint names it

    def rows(self, batch: dict, indices: list[int]) -> list[Row]:
        keys = list(batch)
        return [Row(dict(zip(keys, values)), self.name, i + 1) for i, values in zip(indices, zip(*batch.values()))]

    def head(self) -> Iterator[Row]:
        for start in range(0, len(self.dataset), 256):
            batch = self.dataset[start:start + 256]
            yield from self.rows(batch, list(range(start, start + len(next(iter(batch.values()), [])))))


def file_identity(path: str) -> str:
    st = os.stat(path)
    return f"file:{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


# ----------------------------------------------------------------------------------------------
# The map
# ----------------------------------------------------------------------------------------------


def _encode_batch(batch: dict, indices: list[int], source: RowSource, encoder) -> dict:
    """The map function: every row of the batch -> the encoder's columns, or an error / a drop reason."""
    columns = {name: [] for name in encoder.columns + ERROR_COLUMNS}
    empty = {name: None for name in encoder.columns}
    rows = source.rows(batch, indices)
    if hasattr(encoder, "encode_batch"):
        results = encoder.encode_batch(rows)
    else:
        results = []
        for row in rows:
            try:
                results.append(encoder.encode(row))
            except DataError as e:
                results.append(e)
    for result in results:
        values, error, dropped = empty, None, None
        if isinstance(result, DataError):
            error = result
        elif isinstance(result, Dropped):
            dropped = str(result)
        else:
            values = result
        for name in encoder.columns:
            columns[name].append(values[name])
        columns["_error_source"].append(error.source if error else None)
        columns["_error_line"].append(error.line if error else None)
        columns["_error_field"].append(error.field if error else None)
        columns["_error_reason"].append(error.reason if error else None)
        columns["_dropped"].append(dropped)
    return columns


def _features(encoder):
    from datasets import Features, Value

    return Features({**encoder.features(), "_error_source": Value("string"), "_error_line": Value("int64"),
                     "_error_field": Value("string"), "_error_reason": Value("string"), "_dropped": Value("string")})


_CODE_FILES = ("io.py", "preference.py", "templates.py", "mapped.py")


def _code_hash(encoder) -> str:
    """The source text of the data code and the encoder's module: changed code misses the cache."""
    import inspect

    h = hashlib.sha256()
    here = os.path.dirname(__file__)
    for path in [os.path.join(here, f) for f in _CODE_FILES] + [inspect.getfile(type(encoder))]:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def cache_key(identity: str, encoder) -> str:
    """What the encoded result depends on, hashed with datasets' Hasher (deterministic across processes)."""
    from datasets.fingerprint import Hasher

    return Hasher.hash((CACHE_VERSION, identity, type(encoder).__name__, encoder.settings(),
                        Hasher.hash(encoder.tokenizer), _code_hash(encoder)))


def map_source(source: RowSource, encoder, opts: MapOptions, key: Optional[str] = None):
    """The Dataset of encoded columns plus error columns, one row per source row, in source order."""
    import datasets
    from datasets.fingerprint import generate_random_fingerprint

    encoder.resolve(source.head())
    if not len(source.dataset):  # map would return the input's columns
        features = _features(encoder)
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    kwargs: dict[str, Any] = dict(batched=True, with_indices=True, batch_size=1000, features=_features(encoder),
                                  remove_columns=source.dataset.column_names,
                                  fn_kwargs={"source": source, "encoder": encoder},
                                  num_proc=opts.num_proc if opts.num_proc > 1 and len(source.dataset) > 1 else None,
                                  desc=f"Tokenizing {getattr(source, 'path', getattr(source, 'name', 'rows')).removesuffix(' row')}")
    if key is None:
        kwargs.update(keep_in_memory=True, new_fingerprint=generate_random_fingerprint())
    else:
        os.makedirs(opts.folder(), exist_ok=True)
        kwargs.update(cache_file_name=os.path.join(opts.folder(), f"{key}.arrow"), new_fingerprint=key)
    quiet = len(source.dataset) < PROGRESS_ROWS and not datasets.are_progress_bars_disabled()
    if quiet:  # a bar for a few rows is noise (and a second line under an error)
        datasets.disable_progress_bars()
    try:
        return source.dataset.map(_encode_batch, **kwargs)
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _cached(path: str):
    """The result listed in a manifest, or None when it or any of its files is missing."""
    import datasets

    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        return None
    if not files or not all(os.path.exists(p) for p in files):
        return None
    parts = [datasets.Dataset.from_file(p) for p in files]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _write_manifest(path: str, ds) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"files": [c["filename"] for c in ds.cache_files]}, f)
    os.replace(tmp, path)


def encode_source(make_source: Callable[[], RowSource], identity: Optional[str], encoder, bad: BadRows,
                  opts: MapOptions, dropped: Optional[dict[str, int]] = None, make: Callable = None,
                  index_base: int = 0) -> "Examples":
    """Encode a source (built by `make_source` only on a cache miss), apply data.on_bad_row, and return the
    examples. `identity` names the data for the cache (None: map in memory)."""
    if identity is None:
        ds = map_source(make_source(), encoder, opts)
    else:
        key = cache_key(identity, encoder)
        manifest = os.path.join(opts.folder(), f"{key}.json")
        ds = _cached(manifest)
        if ds is None:
            ds = map_source(make_source(), encoder, opts, key)
            _write_manifest(manifest, ds)
    return Examples(apply_bad_rows(ds, bad, dropped).remove_columns(list(ERROR_COLUMNS)), make, index_base)


def apply_bad_rows(ds, bad: BadRows, dropped: Optional[dict[str, int]] = None):
    """Raise or count the rows whose encoding failed, in source order; count the dropped ones; keep the rest."""
    n = len(ds)
    errors, drops = ds.data.column("_error_reason"), ds.data.column("_dropped")
    if errors.null_count == n and drops.null_count == n:
        return ds
    cols = {c: ds.data.column(c).to_pylist() for c in ERROR_COLUMNS}
    keep = []
    for i in range(n):
        if cols["_error_reason"][i] is not None:
            bad(DataError(cols["_error_source"][i], cols["_error_line"][i], cols["_error_field"][i],
                          cols["_error_reason"][i]))
        elif cols["_dropped"][i] is not None:
            if dropped is not None:
                dropped[cols["_dropped"][i]] = dropped.get(cols["_dropped"][i], 0) + 1
        else:
            keep.append(i)
    return ds.select(keep)


# ----------------------------------------------------------------------------------------------
# Examples: a sequence over the Arrow table
# ----------------------------------------------------------------------------------------------


class Examples(Sequence):
    """The encoded examples, read from the (memory-mapped) Arrow table when accessed: `make(columns, index)` builds
    one (a PairExample, an SFT dict); index = index_base + position keys per-example caches (DPO's reference).
    Slices and `+` are views; nothing is copied."""

    def __init__(self, dataset, make: Callable[[dict, int], Any], index_base: int = 0):
        self.dataset, self.make, self.index_base = dataset, make, index_base

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return View(self, range(len(self))[i])
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.make(self.dataset[i], self.index_base + i)

    def __iter__(self):
        for start in range(0, len(self), 1024):
            batch = self.dataset[start:start + 1024]
            for j, values in enumerate(zip(*batch.values())):
                yield self.make(dict(zip(batch, values)), self.index_base + start + j)

    def __add__(self, other):
        return Concat([self, other])

    def __radd__(self, other):
        return Concat([other, self])

    def with_index_base(self, base: int) -> "Examples":
        return Examples(self.dataset, self.make, base)


class View(Sequence):
    """Positions of a sequence (a slice of Examples, of a Concat)."""

    def __init__(self, seq: Sequence, positions):
        self.seq, self.positions = seq, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return View(self.seq, self.positions[i])
        return self.seq[self.positions[i]]

    def __add__(self, other):
        return Concat([self, other])

    def __radd__(self, other):
        return Concat([other, self])


class Concat(Sequence):
    """Sequences one after another."""

    def __init__(self, parts: Iterable[Sequence]):
        self.parts = [p for part in parts for p in (part.parts if isinstance(part, Concat) else [part])]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return View(self, range(len(self))[i])
        if i < 0:
            i += len(self)
        for part in self.parts:
            if i < len(part):
                return part[i]
            i -= len(part)
        raise IndexError(i)

    def __iter__(self):
        for part in self.parts:
            yield from part

    def __add__(self, other):
        return Concat([self, other])

    def __radd__(self, other):
        return Concat([other, self])
