"""The random generators: seeding (``seed_everything``) and their state in a checkpoint."""

from __future__ import annotations

import random

import numpy as np
import torch

from run.checkpoint import numpy_rng_from_plain, numpy_rng_to_plain


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every random generator state (python, numpy, torch CPU and CUDA), as tensors, plain
    containers and numbers: a checkpoint holding it loads with ``torch.load(weights_only=True)``."""
    return {"python": random.getstate(), "numpy": numpy_rng_to_plain(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    """Restore the generators from ``rng_state()``'s dict (CUDA's only where CUDA is there: a run saved on
    a GPU resumes on the CPU with the rest restored)."""
    random.setstate(state["python"])
    np.random.set_state(numpy_rng_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
