"""Run set-up around the engine: output folder, resume, pretrained weights, config.json.

Every check here runs before any data is read or any model trained, and fails with
one line naming the flag or file.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

import torch

from checkpoint import (CheckpointError, append_jsonl, atomic_write_json, load_checkpoint, read_jsonl,
                        truncate_jsonl)
from config import RUN_FLAGS, ConfigError, default_output_dir, explicit_flags, is_float_run, resolve_device

#: Files that make a folder "hold a run".
RUN_FILES = ("config.json", "metrics.jsonl", "timing.jsonl", "last.pt", "best.pt", "warmup_end.pt", "summary.json",
             "ptq.pt")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def resolve_resume(cfg, argv: list[str]) -> dict | None:
    """Apply ``--resume``: load the checkpoint, take the run's experiment flags, refuse changes.

    Flags not given on the command line take the run's values; experiment flags given
    with another value are refused with one line listing the differences. ``cfg`` is
    updated in place.

    Returns:
        the checkpoint, or None without ``--resume``.

    Raises:
        CheckpointError: no checkpoint, or a corrupt one.
        ConfigError: experiment flags that differ from the run's.
    """
    if cfg.resume is None:
        return None
    if cfg.resume:
        path = cfg.resume
        if cfg.output_dir is None:
            cfg.output_dir = os.path.dirname(os.path.abspath(path))
    else:
        cfg.output_dir = cfg.output_dir or default_output_dir(cfg)
        path = os.path.join(cfg.output_dir, "last.pt")
    ckpt = load_checkpoint(path, "--resume")
    saved = ckpt["config"]["flags"]
    given = explicit_flags(argv)
    differences = []
    for key, value in saved.items():
        if key in RUN_FLAGS or not hasattr(cfg, key):
            continue
        if key in given and getattr(cfg, key) != value:
            differences.append(f"{_flag(key)} {getattr(cfg, key)} (run: {value})")
        setattr(cfg, key, value)
    if differences:
        raise ConfigError(f"--resume: refusing to change the experiment of {path}: {'; '.join(differences)}")
    return ckpt


def prepare_output_dir(cfg, resuming: bool) -> bool:
    """Create ``--output-dir`` (default: a descriptive folder under results/) and check it.

    Returns:
        whether this call created the folder.

    Raises:
        ConfigError: it is a file, not writable, or holds a run and neither
            ``--resume`` nor ``--overwrite`` was given.
    """
    cfg.output_dir = cfg.output_dir or default_output_dir(cfg)
    out = cfg.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--output-dir {out} is a file, not a folder")
    created = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--output-dir {out}: cannot create it ({exc.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {out} is not writable")
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if existing and not resuming:
        if not cfg.overwrite:
            raise ConfigError(f"--output-dir {out} already holds a run ({', '.join(existing)}); "
                              f"pass --resume to continue it or --overwrite to replace it")
        for f in existing:
            os.remove(os.path.join(out, f))
        shutil.rmtree(os.path.join(out, "tensorboard"), ignore_errors=True)
    return created


def remove_if_empty(folder: str) -> None:
    """Remove ``folder`` if it exists and is empty (a run refused before writing anything)."""
    try:
        os.rmdir(folder)
    except OSError:  # not empty, or already gone
        pass


def restore_logs(output_dir: str, ckpt: dict) -> None:
    """Make the logs end at the checkpoint's epoch before a resumed run appends to them.

    Drops lines of epochs after it (work the checkpoint does not contain) and appends the
    checkpoint's own rows when the run was killed after writing the checkpoint but before
    its log lines.
    """
    epoch = ckpt["epoch"]
    for name in ("metrics.jsonl", "timing.jsonl"):
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            truncate_jsonl(path, lambda row: row.get("epoch", 0) <= epoch)
        row = ckpt.get("log_rows", {}).get(name)
        if row is not None and not any(r.get("epoch") == epoch for r in read_jsonl(path)):
            append_jsonl(row, path)


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


def git_commit() -> str | None:
    """The commit of the code that runs, or None outside a git checkout."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_config(cfg, data_source: str, cpu_kernels: str | None) -> dict:
    """The content of config.json: every resolved flag, derived values and versions.

    ``cpu_kernels``: ``quant.kernels.describe()`` where the run uses them, else None.
    """
    import torchvision
    from config import act_bits, first_last_bits, weight_bits
    return {"flags": dict(vars(cfg)),
            "derived": {"weight_bits": weight_bits(cfg), "act_bits": act_bits(cfg),
                        "first_last_bits": first_last_bits(cfg), "float_run": is_float_run(cfg),
                        "device": str(resolve_device(cfg.device)), "data": data_source,
                        "cpu_kernels": cpu_kernels},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__},
            "git_commit": git_commit()}


def write_config(cfg, config: dict) -> None:
    atomic_write_json(config, os.path.join(cfg.output_dir, "config.json"))
