"""The content of a run's ``config.json``: every resolved flag, derived values, versions, commit."""

from __future__ import annotations

import os
import platform
import subprocess

import torch

from run.checkpoint import atomic_write_json
from run.config import act_bits, compile_mode, first_last_bits, is_float_run, resolve_device, weight_bits

#: The checkout this code runs from (the folder that holds cifar10_qat_br.py).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str | None:
    """The commit of the code that runs, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_config(cfg, data_source: str, cpu_kernels: str | None, val_split=None, world_size: int = 1,
               backend: str | None = None, train_digest: str | None = None) -> dict:
    """The content of config.json: every resolved flag, derived values and versions.

    ``cpu_kernels``: ``quant.kernels.describe()`` where the run uses them, else None.
    ``val_split``: the held-out ``data.Split`` of ``--val-split`` (config.json gives its size,
    seed and images per class; its indices are in every checkpoint), or None.
    ``world_size``, ``backend``: the processes of a torchrun run and their collectives' backend
    (1 and None: one process). ``train_digest``: ``Split.label_digest()`` of the images the run trains on
    (``--resume`` and ``--from-warmup`` compare it), or None (PTQ: nothing continues from it).
    """
    import torchvision
    return {"flags": dict(vars(cfg)),
            "derived": {"weight_bits": weight_bits(cfg), "act_bits": act_bits(cfg),
                        "first_last_bits": first_last_bits(cfg), "float_run": is_float_run(cfg),
                        "device": str(resolve_device(cfg.device)), "data": data_source,
                        "train_labels_sha256": train_digest,
                        "cpu_kernels": cpu_kernels, "compile": compile_mode(cfg),
                        "val_split": describe_val_split(cfg, val_split),
                        "world_size": world_size, "backend": backend,
                        "weight_step_sizes": "per output channel" if cfg.per_channel_weights else "per tensor"},
            "versions": {"python": platform.python_version(), "torch": str(torch.__version__),  # not TorchVersion:
                         "torchvision": str(torchvision.__version__)},  # a checkpoint holds only plain types
            "git_commit": git_commit()}


def describe_val_split(cfg, val_split) -> dict | None:
    """config.json's account of the validation split: how it was drawn and its images per class."""
    if val_split is None:
        return None
    from run.data import CLASSES
    counts = torch.bincount(val_split.labels, minlength=len(CLASSES)).tolist()
    return {"images": len(val_split.labels), "seed": cfg.seed,
            "per_class": {CLASSES[c] if c < len(CLASSES) else str(c): n for c, n in enumerate(counts)},
            "rule": "data.balanced_indices: n // 10 images per class (the first n % 10 classes one more), the first "
                    "of a seeded permutation of each class's training images; not trained on, evaluated every "
                    "epoch without augmentation; --train-subset is drawn from the rest"}


def write_config(cfg, config: dict) -> None:
    """Write ``config`` to ``<--output-dir>/config.json`` atomically (a crash leaves the old file or the new)."""
    atomic_write_json(config, os.path.join(cfg.output_dir, "config.json"))
