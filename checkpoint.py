"""Durable outputs: every file is written to a temporary name, synced and renamed into
place, so a crash mid-write leaves the previous version intact."""

from __future__ import annotations

import json
import os
import tempfile

import torch


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not one this tool wrote; the message names the file."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the mode open() would, like the logs
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save(obj, path)``, atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj, path: str) -> None:
    """Write ``obj`` as indented JSON to ``path``, atomically."""
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def append_jsonl(obj, path: str) -> None:
    """Append one JSON line to ``path`` and sync it to disk."""
    with open(path, "a") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str) -> list[dict]:
    """Every complete line of a JSON-lines file (a torn last line is ignored); [] if missing."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def truncate_jsonl(path: str, keep) -> None:
    """Atomically keep only the rows of ``path`` for which ``keep(row)`` is true."""
    rows = [r for r in read_jsonl(path) if keep(r)]
    _atomic_write(path, lambda f: f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()))


def load_checkpoint(path: str, what: str) -> dict:
    """Load a checkpoint written by this tool onto the CPU.

    Args:
        path: the file. what: the flag it came from, for messages (``--resume``).

    Raises:
        CheckpointError: missing file, unreadable or corrupt file, or no ``model`` / ``config``.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise CheckpointError(f"{what}: {path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{what}: {path} is not a checkpoint written by cifar10_qat_br.py")
    return ckpt
