"""Checkpoint folders on disk: manifests, verification, the newest good checkpoint, pruning, atomic folders.

A checkpoint is `<run>/checkpoints/step_NNNNNN/` holding whatever the accelerator and the algorithm wrote (laid out
by rlhf/checkpointing.py), plus `manifest.json`, written last: the relative path, size and hash of every file, the
step and the folder's own name. A folder is a checkpoint only if its manifest names it, so a half-written
`step_000020.tmp` or a copied `step_000020.bak` is never taken for one. Resume verifies the manifest against the files and falls back to the
previous good checkpoint when the newest is damaged.

Run-level files that an algorithm caches next to the checkpoints (DPO's `ref_logps.pt`) are recorded in the
manifest too (`run_files`), so a damaged cache is noticed and recomputed on resume instead of failing to load.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch

MANIFEST = "manifest.json"
FORMAT = 1
RUN_FILE_SUFFIX = ".pt"  # run-folder caches written by algorithms (e.g. DPO's ref_logps.pt)


class CheckpointError(RuntimeError):
    """No usable checkpoint (all damaged, or none): one line naming the folder and what is wrong."""


class NonFiniteError(RuntimeError):
    """Training produced non-finite values: too many skipped steps, or weights that must not be written."""


class DiskFullError(RuntimeError):
    """The device ran out of space while writing a checkpoint or the final model."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


# Files up to FULL_HASH_BYTES are hashed whole (`sha256`); larger ones by SAMPLED_BLOCKS blocks of SAMPLE_BYTES
# spread evenly from the first byte to the last, with the size (`sampled_sha256`). Hashing runs at about 157 MB/s
# here: a 7B model's full-fine-tuning checkpoint (bf16 weights, fp32 master weights and Adam moments, ~100 GB) would
# take over ten minutes to hash when written and again when resumed. What goes wrong with checkpoints in practice is
# caught by the sample: a truncated or half-written file (its size, its last block), a file from another checkpoint
# (every block differs), a zeroed or torn tail. A bit flipped between two sampled blocks of a large file is not; small
# files (configs, tokenizers, the trainer state, RNG states, LoRA weights) are hashed whole.
FULL_HASH_BYTES = 64 << 20
SAMPLE_BYTES = 1 << 20
SAMPLED_BLOCKS = 16


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sampled_sha256(path: str) -> str:
    """sha256 of the size and SAMPLED_BLOCKS blocks at evenly spaced offsets, the first and the last included."""
    size = os.path.getsize(path)
    last = max(size - SAMPLE_BYTES, 0)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(SAMPLED_BLOCKS):
            f.seek(last * i // (SAMPLED_BLOCKS - 1))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def _entry(root: str, rel: str) -> dict:
    full = os.path.join(root, rel)
    size = os.path.getsize(full)
    if size <= FULL_HASH_BYTES:
        return {"path": rel, "size": size, "sha256": _sha256(full)}
    return {"path": rel, "size": size, "sampled_sha256": _sampled_sha256(full)}


def _files(folder: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(folder):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), folder)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def run_files(run_dir: str) -> list[str]:
    """Algorithm caches at the top of the run folder that a resume reads back."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(n for n in os.listdir(run_dir)
                  if n.endswith(RUN_FILE_SUFFIX) and os.path.isfile(os.path.join(run_dir, n)))


def write_manifest(folder: str, name: str, step: int, run_dir: str) -> None:
    """Hash every file of `folder` (all ranks have written) and write the manifest last, atomically."""
    from concurrent.futures import ThreadPoolExecutor

    # hashlib releases the GIL on large buffers: sharded checkpoints (one file per rank) hash in parallel
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        files = list(pool.map(lambda rel: _entry(folder, rel), _files(folder)))
        cached = list(pool.map(lambda rel: _entry(run_dir, rel), run_files(run_dir)))
    manifest = {"format": FORMAT, "name": name, "step": step, "saved_at": time.time(), "files": files,
                "run_files": cached}
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))


def read_manifest(folder: str) -> Optional[dict]:
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("files"), list) else None


def _check_entry(root: str, e: dict, full_hash: bool) -> Optional[str]:
    path = os.path.join(root, e["path"])
    if not os.path.isfile(path):
        return f"{e['path']} is missing"
    size = os.path.getsize(path)
    if size != e["size"]:
        return f"{e['path']} has {size} bytes, the manifest says {e['size']} (truncated or rewritten)"
    if not full_hash:
        return None
    if "sha256" in e and _sha256(path) != e["sha256"]:
        return f"{e['path']} has a different sha256 than the manifest (corrupted)"
    if "sampled_sha256" in e and _sampled_sha256(path) != e["sampled_sha256"]:
        return f"{e['path']} has a different sampled sha256 than the manifest (corrupted)"
    return None


def verify(folder: str, full_hash: bool = True) -> Optional[str]:
    """None when every file the manifest lists is there with its size and hash; else what is wrong, in words."""
    from concurrent.futures import ThreadPoolExecutor

    m = read_manifest(folder)
    if m is None:
        return f"{MANIFEST} is missing or unreadable (an incomplete checkpoint)"
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = list(pool.map(lambda e: _check_entry(folder, e, full_hash), m["files"]))
    return next((p for p in problems if p), None)


def damaged_run_files(folder: str, run_dir: str) -> list[tuple[str, str]]:
    """[(file, problem)] for the run-folder caches recorded in the checkpoint's manifest that no longer match."""
    m = read_manifest(folder) or {}
    out = []
    for e in m.get("run_files", []):
        if os.path.exists(os.path.join(run_dir, e["path"])):
            problem = _check_entry(run_dir, e, full_hash=True)
            if problem:
                out.append((e["path"], problem))
    return out


def list_checkpoints(ckpt_dir: str) -> list[tuple[str, dict]]:
    """[(folder, manifest)] of the folders whose manifest names them, oldest write first. Folders without one, or
    whose manifest names another folder (a copy such as step_000020.bak), are not checkpoints."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for n in os.listdir(ckpt_dir):
        folder = os.path.join(ckpt_dir, n)
        m = read_manifest(folder) if os.path.isdir(folder) else None
        if m is not None and m.get("name") == n:
            found.append((folder, m))
    return sorted(found, key=lambda fm: (fm[1].get("saved_at", 0), fm[1].get("step", 0)))


def unlisted_folders(ckpt_dir: str) -> list[str]:
    """Folders under checkpoints/ that are not checkpoints (no manifest naming them)."""
    if not os.path.isdir(ckpt_dir):
        return []
    good = {os.path.basename(f) for f, _ in list_checkpoints(ckpt_dir)}
    return sorted(n for n in os.listdir(ckpt_dir) if n not in good and os.path.isdir(os.path.join(ckpt_dir, n)))


def newest_good(ckpt_dir: str, say: Callable[[str], None]) -> str:
    """The most recently written checkpoint that verifies; each damaged newer one is named in one line."""
    found = list_checkpoints(ckpt_dir)
    for n in unlisted_folders(ckpt_dir):
        say(f"resume: ignoring {os.path.join(ckpt_dir, n)}: no {MANIFEST} naming it (not a complete checkpoint)")
    for folder, _ in reversed(found):
        problem = verify(folder)
        if problem is None:
            return folder
        say(f"resume: checkpoint {folder} is damaged: {problem}; trying the previous one")
    if not found:
        raise CheckpointError(f"--resume: no complete checkpoint in {ckpt_dir} (a checkpoint is a folder with a "
                              f"{MANIFEST}); start a new run instead")
    raise CheckpointError(f"--resume: every checkpoint in {ckpt_dir} is damaged ({len(found)} checked); "
                          f"start a new run with --overwrite")


def prune(ckpt_dir: str, keep: int) -> list[str]:
    """Delete all but the `keep` most recently written checkpoints (keep <= 0: keep all). Only complete checkpoints
    count and are deleted, so the newest written, verified one always stays."""
    found = list_checkpoints(ckpt_dir)
    doomed = [f for f, _ in found[:-keep]] if keep > 0 else []
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


# ----------------------------------------------------------------------------------------------
# Writing folders: all or nothing, and a clear error when the disk is full
# ----------------------------------------------------------------------------------------------


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC, or torch's serializer failing to write (it raises a RuntimeError without the errno)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("No space", "enforce fail at inline_container", "file write failed"))


@contextmanager
def atomic_folder(final: str, needed_bytes: Callable[[], int]) -> Iterator[str]:
    """Yield `<final>.tmp` to write into; on success it replaces `final` (the old one goes only after the new one
    is complete); on failure the temporary folder is removed and `final` is untouched. A full disk becomes one
    DiskFullError naming the path and an estimate of the bytes needed."""
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise DiskFullError(f"no space left on device: {final} (about {needed_bytes()} bytes needed)") from e
        raise
    replace_folder(tmp, final)


def replace_folder(tmp: str, final: str) -> None:
    """Rename `tmp` to `final`; an existing `final` is moved aside first and deleted once the rename is done."""
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# What may be written: finite weights only
# ----------------------------------------------------------------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's values of a parameter: a ZeRO-3 partition, an FSDP2 DTensor's shard, or the tensor itself."""
    t = getattr(t, "ds_tensor", t)
    return t.to_local() if hasattr(t, "to_local") else t


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters (this rank's shards) holding a NaN or an infinity."""
    out = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = _local(p)
            if t.numel() and not bool(torch.isfinite(t).all()):
                out.append(name)
    return out


def state_bytes(*objects) -> int:
    """Bytes of the tensors of modules and optimizers: an estimate of what a checkpoint or export writes."""
    total = 0
    for obj in objects:
        if obj is None:
            continue
        if isinstance(obj, torch.nn.Module):
            tensors = [_local(p) for p in obj.parameters()]
        else:
            tensors = [v for s in getattr(obj, "state", {}).values() if isinstance(s, dict)
                       for v in s.values() if isinstance(v, torch.Tensor)]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def finite(x: float) -> bool:
    return x is None or math.isfinite(x)
