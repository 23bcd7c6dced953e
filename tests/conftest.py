"""Shared fixtures: a tiny CIFAR-10-shaped image folder made inside the test."""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from run.data import CLASSES  # noqa: E402


def make_image_folder(root, train_per_class: int = 4, test_per_class: int = 2, seed: int = 0) -> str:
    """Write ``train/<class>/*.png`` and ``test/<class>/*.png`` of random 32x32 RGB images; return root.

    Each class gets its own mean colour, so a network can learn something in a few steps.
    """
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c, name in enumerate(CLASSES):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                base = np.array([25 * c, 255 - 25 * c, (80 * c) % 256], dtype=np.float64)
                pixels = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i:04d}.png"))
    return str(root)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "cifar")


@pytest.fixture(scope="session")
def shared_folder(tmp_path_factory):
    """One tiny image folder for the whole session (its decode cache is reused by every run)."""
    return make_image_folder(tmp_path_factory.mktemp("cifar"), train_per_class=4, test_per_class=2)


def run_cli(argv, capsys=None):
    """Run the entrypoint in-process; returns (exit status, stdout, stderr)."""
    import cifar10_qat_br
    rc = cifar10_qat_br.main([str(a) for a in argv])
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return rc, out, err


# A tiny run of both BR terms with α trained in stage 2: A-BR is off by default (README), and the runs of the
# tests exercise every α's gradient and optimizer state too (said, so that no default can take it away).
TINY = ["--epochs", "2", "--warmup-epochs", "1", "--batch-size", "16", "--workers", "0", "--no-download",
        "--lambda-br-act", "1", "--no-freeze-alpha"]


def signal_in_epoch(monkeypatch, epoch: int, signum: int = signal.SIGINT):
    """Make the run receive ``signum`` during its first step of ``epoch`` (its ``Trainer.train_step``
    patched through ``monkeypatch``, which undoes it)."""
    import engine
    real = engine.Trainer.train_step

    def step(self, x, y, use_br, finite_check_at=None):
        out = real(self, x, y, use_br, finite_check_at)
        if finite_check_at is not None and finite_check_at[0] == epoch:
            self._stop_signal = signum
        return out

    monkeypatch.setattr(engine.Trainer, "train_step", step)
