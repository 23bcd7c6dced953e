"""Durable outputs: every file is written to a temporary name, synced and renamed into
place, so a crash mid-write leaves the previous version intact."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not one this tool wrote; the message names the file."""


#: Exit status of every command (training, export.py, plots.py) when an output file cannot be written.
EXIT_WRITE_FAILED = 4


class WriteError(OSError):
    """An output file could not be written (disk full, read-only, quota, ...).

    ``filename`` is the file meant (not a temporary name), ``strerror`` the reason.
    """

    def __init__(self, path: str, exc: OSError):
        super().__init__(exc.errno, exc.strerror or str(exc), path)

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


@contextlib.contextmanager
def writing(path: str):
    """Turn any ``OSError`` inside the ``with`` block into a ``WriteError`` naming ``path``."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        raise WriteError(path, exc) from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str, write) -> None:
    """Write ``path`` through ``write(f)`` into a temporary file that is synced and renamed onto it.

    Raises:
        WriteError: any OSError (disk full, read-only folder, ...), naming ``path``; the
            previous ``path`` is intact and the temporary file removed.
    """
    directory = os.path.dirname(os.path.abspath(path))
    with writing(path):
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


def remove_temporaries(folder: str, names) -> list[str]:
    """Remove the temporary files (``.<name>.<random>.tmp``) of the files ``names`` that a process
    killed during ``_atomic_write`` left in ``folder``; only call it while holding the folder (a
    running writer's files look the same). Returns the names removed.

    Raises:
        WriteError: one cannot be removed.
    """
    pattern = re.compile(r"^\.(%s)\.[^./]+\.tmp$" % "|".join(re.escape(n) for n in names))
    stray = sorted(n for n in os.listdir(folder) if pattern.match(n))
    for name in stray:
        with writing(os.path.join(folder, name)):
            os.unlink(os.path.join(folder, name))
    return stray


def atomic_copy(source: str, path: str) -> None:
    """Copy the file ``source`` to ``path``, atomically (``WriteError`` as ``_atomic_write``)."""
    with open(source, "rb") as src:
        _atomic_write(path, lambda f: shutil.copyfileobj(src, f))


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save(obj, path)``, atomically (``WriteError`` as ``_atomic_write``)."""
    _atomic_write(path, lambda f: _torch_save(obj, f))


def _torch_save(obj, f) -> None:
    """``torch.save``, raising the ``OSError`` of a failed write: on a disk that fills up mid-file,
    torch's zip writer replaces it by a ``RuntimeError`` ("unexpected pos") when it closes."""
    try:
        torch.save(obj, f)
    except RuntimeError as exc:
        if isinstance(exc.__context__, OSError):
            raise exc.__context__ from None
        raise


def atomic_write_json(obj, path: str, sort_keys: bool = True) -> None:
    """Write ``obj`` as indented JSON to ``path``, atomically; keys sorted, or in ``obj``'s order."""
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode()))


def append_jsonl(obj, path: str) -> None:
    """Append one JSON line to ``path`` and sync it to disk.

    Raises:
        WriteError: any OSError, naming ``path`` (a torn last line is ignored by ``read_jsonl``).
    """
    with writing(path), open(path, "a") as f:
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


def write_jsonl(rows: list[dict], path: str) -> None:
    """Write ``rows`` as the JSON-lines file ``path``, atomically (``WriteError`` as ``_atomic_write``)."""
    _atomic_write(path, lambda f: f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()))


def truncate_jsonl(path: str, keep) -> None:
    """Atomically keep only the rows of ``path`` for which ``keep(row)`` is true."""
    write_jsonl([r for r in read_jsonl(path) if keep(r)], path)


#: What a checkpoint of an older version of this tool holds besides tensors and containers: the
#: numpy RNG state as a uint32 ``ndarray`` and torch's version string as a ``TorchVersion`` (a
#: ``str``). Allowed (nothing else) when reading such a file, which is then converted to the
#: current form (``_convert_legacy``).
_LEGACY_GLOBALS = (np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType,
                   torch.torch_version.TorchVersion)
_LEGACY_NAMES = {f"{g.__module__}.{g.__qualname__}" for g in _LEGACY_GLOBALS}


def numpy_rng_to_plain(state: tuple) -> dict:
    """``np.random.get_state()`` as tensors and numbers (loadable with ``weights_only=True``)."""
    name, key, pos, has_gauss, gauss = state
    return {"bit_generator": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def numpy_rng_from_plain(state: dict) -> tuple:
    """The inverse of ``numpy_rng_to_plain``: a state for ``np.random.set_state``."""
    return (state["bit_generator"], state["key"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
            state["gauss"])


def _convert_legacy(ckpt):
    """A checkpoint of an older version of this tool in the current form (numpy RNG state, versions)."""
    if not isinstance(ckpt, dict):
        return ckpt
    if isinstance(ckpt.get("rng"), dict) and isinstance(ckpt["rng"].get("numpy"), tuple):
        ckpt["rng"]["numpy"] = numpy_rng_to_plain(ckpt["rng"]["numpy"])
    versions = ckpt.get("config", {}).get("versions") if isinstance(ckpt.get("config"), dict) else None
    if isinstance(versions, dict):
        ckpt["config"]["versions"] = {k: str(v) for k, v in versions.items()}
    return ckpt


def _unsafe_globals(path: str, message: str) -> set[str]:
    """The classes and functions a failed ``weights_only`` load of ``path`` would have needed.

    Read from the file's pickle opcodes (zip checkpoints) and from torch's error message
    (any format); empty for a file that is merely corrupt.
    """
    try:
        found = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a readable zip checkpoint: the message is all there is
        found = set()
    found.update(re.findall(r"Unsupported global: GLOBAL (\S+)", message))
    found.update(re.findall(r"but got <class '([^']+)'>", message))
    return found


def _load_tensors_only(path: str, what: str):
    """``torch.load(path, weights_only=True)``: tensors, plain containers and numbers, never code.

    A file written by an older version of this tool is read with only its extra types
    allowed besides (numpy's uint32 arrays, torch's version string), and converted.

    Raises:
        CheckpointError: a file whose unpickling would call anything else (named in the message).
        Exception: whatever ``torch.load`` raises for an unreadable file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path, str(exc))
        if not unsafe:  # corrupt, not code
            raise
        if not unsafe <= _LEGACY_NAMES:
            raise CheckpointError(
                f"{what}: refusing {path}: loading it would call {', '.join(sorted(unsafe))}, i.e. run code, "
                f"not read data. Checkpoints are loaded with torch.load(weights_only=True): tensors, plain "
                f"containers and numbers only") from None
    with torch.serialization.safe_globals(list(_LEGACY_GLOBALS)):
        return _convert_legacy(torch.load(path, map_location="cpu", weights_only=True))


def _reason(exc: Exception) -> str:
    """One line saying why ``torch.load`` failed (torch's weights-only message spans a page)."""
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(Check the documentation|$)", text, re.S)
    detail = " ".join((match.group(1) if match else text).split())
    return f"{type(exc).__name__}: {detail}"


def load_tensors(path: str, what: str):
    """Any file of tensors, plain containers and numbers (a checkpoint, a plain ``state_dict``),
    onto the CPU, as data only (``weights_only=True``; see ``_load_tensors_only``).

    Args:
        path: the file. what: the flag it came from, for messages (``--resume``).

    Raises:
        CheckpointError: missing file, a folder (the message names its ``.pt`` files), unreadable
            or corrupt file, a file that would run code when unpickled.
    """
    if os.path.isdir(path):
        try:
            files = sorted(f for f in os.listdir(path) if f.endswith(".pt"))
        except OSError:  # an unreadable folder: still a folder, not a checkpoint
            files = None
        inside = (f"name one of its checkpoints: {', '.join(files)}" if files
                  else "name a checkpoint file" if files is None else "it holds no .pt file")
        raise CheckpointError(f"{what}: {path} is a folder, not a checkpoint file; {inside}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: no checkpoint at {path}")
    try:
        return _load_tensors_only(path, what)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise CheckpointError(f"{what}: {path} is not a readable checkpoint ({_reason(exc)})") from None


#: What ``--resume`` needs of a checkpoint besides ``model`` and ``config``, with the accepted types.
RESUME_KEYS = {"optimizer": dict, "scheduler": dict, "epoch": int, "best_acc": (int, float), "best_epoch": int,
               "last_acc": (int, float, type(None)), "elapsed": (int, float), "previous_bins": dict, "rng": dict}


def type_phrase(value) -> str:
    """``a list``, ``an int``, ``None``: the type of ``value``, for messages."""
    if value is None:
        return "None"
    name = type(value).__name__
    return ("an " if name[0] in "aeiou" else "a ") + name


def _flag_types() -> dict:
    """Flag name -> the types its value may have in a checkpoint's ``config["flags"]`` (None: any)."""
    from run.config import build_parser
    types = {}
    for action in build_parser()._actions:
        kind = action.type or (type(action.default) if action.default is not None else None)
        if isinstance(action, argparse.BooleanOptionalAction) and action.default is None:
            types[action.dest] = (bool, type(None))  # None: a default resolved later (--freeze-alpha)
        elif kind is not None:
            types[action.dest] = (kind, int) if kind is float else (kind,)
    types["compile"] = (str, bool)  # older versions stored --compile as a switch
    return types


def _flag_choices() -> dict:
    """Flag name -> the values it may take (flags with argparse ``choices``: ``--optimizer``)."""
    from run.config import build_parser
    return {action.dest: tuple(action.choices) for action in build_parser()._actions if action.choices}


def checkpoint_problem(obj, resumable: bool = False) -> str | None:
    """Why ``obj`` (a loaded file) is not a checkpoint written by this tool, or None if it is one.

    A checkpoint is a dict with ``model`` (parameter name -> tensor) and ``config`` (a dict whose
    ``flags``, when present, are the run's flags with their types and allowed values), and a
    tensor or None as ``val_index`` when it has one; ``resumable`` also asks for
    the training state ``--resume`` needs (``RESUME_KEYS``) and ``config["flags"]``.
    """
    if not isinstance(obj, dict):
        return f"it holds {type_phrase(obj)}, not a dict"
    for key in ("model", "config"):
        if key not in obj:
            return f"no '{key}' entry"
    model, config = obj["model"], obj["config"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        return f"'model' is {type_phrase(model)}, not a state_dict (parameter name -> tensor)"
    if not isinstance(config, dict):
        return f"'config' is {type_phrase(config)}, not a dict"
    if resumable and "flags" not in config:
        return "no 'flags' in its 'config'"
    flags = config.get("flags", {})
    if not isinstance(flags, dict):
        return f"'config'/'flags' is {type_phrase(flags)}, not a dict"
    types, choices = _flag_types(), _flag_choices()
    for key, value in flags.items():
        if value is not None and key in types and not isinstance(value, types[key]):
            return f"flag '{key}' is {type_phrase(value)} ({value!r}), expected {types[key][0].__name__}"
        if value is not None and key in choices and value not in choices[key]:
            return f"flag '{key}' is {value!r}, expected one of {', '.join(map(str, choices[key]))}"
    if obj.get("val_index") is not None and not isinstance(obj["val_index"], torch.Tensor):
        return f"'val_index' is {type_phrase(obj['val_index'])}, not a tensor of image indices"
    for key, kinds in RESUME_KEYS.items():  # checked wherever present: --evaluate reads epoch and last_acc
        if key in obj and (not isinstance(obj[key], kinds) or (kinds is int and isinstance(obj[key], bool))):
            return f"'{key}' is {type_phrase(obj[key])}"
    missing = [key for key in RESUME_KEYS if key not in obj] if resumable else []
    return f"no '{missing[0]}' entry (a checkpoint to resume holds the training state)" if missing else None


def foreign_checkpoint_error(path: str, what: str, problem: str) -> CheckpointError:
    """The error for a file that is not a checkpoint written by this tool (``checkpoint_problem``)."""
    return CheckpointError(f"{what}: {path} is not a checkpoint written by this tool (cifar10_qat_br.py): {problem}")


def load_checkpoint(path: str, what: str, resumable: bool = False) -> dict:
    """Load a checkpoint written by this tool onto the CPU, as data only (``load_tensors``).

    Args:
        resumable: also require the training state that ``--resume`` continues from.

    Raises:
        CheckpointError: as ``load_tensors``, and a file that is not a checkpoint of this tool
            (``checkpoint_problem``: missing entries, entries of the wrong types).
    """
    ckpt = load_tensors(path, what)
    problem = checkpoint_problem(ckpt, resumable)
    if problem is not None:
        raise foreign_checkpoint_error(path, what, problem)
    return ckpt


def load_pretrained(model: torch.nn.Module, cfg) -> None:
    """Load a float checkpoint made by this tool (``--pretrained``) into the float ``model``.

    Raises:
        CheckpointError: missing or unreadable file, another architecture, or a quantized run.
    """
    ckpt = load_checkpoint(cfg.pretrained, "--pretrained")
    check_pretrained(ckpt, cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"--pretrained {cfg.pretrained}: does not fit {cfg.arch} ({first})") from None


def check_pretrained(ckpt: dict, cfg) -> None:
    """Refuse a ``--pretrained`` checkpoint of another architecture or of a quantized run."""
    flags = ckpt["config"].get("flags", {})
    if flags.get("arch") != cfg.arch:
        raise CheckpointError(f"--pretrained {cfg.pretrained}: made for --arch {flags.get('arch')}, "
                              f"this run is --arch {cfg.arch}")
    if any("_quant." in k for k in ckpt["model"]):
        raise CheckpointError(f"--pretrained {cfg.pretrained}: a quantized checkpoint; --pretrained expects a "
                              f"float run of this tool (--num-bits 32)")
