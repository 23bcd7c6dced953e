"""What training, ``--evaluate``, PTQ and export share: top-1 accuracy and BatchNorm re-estimation."""

from __future__ import annotations

import torch
from torch import nn


@torch.inference_mode()
def top1_accuracy(forward, loader, device: torch.device, use_amp: bool = False, reduce=None) -> float:
    """Top-1 accuracy (%) of ``forward`` (a model in eval mode) over every batch of ``loader``
    (``data.DeviceLoader``); bf16 autocast with ``use_amp``. The one evaluation of every path
    (training, ``--evaluate``, PTQ, export), so they report the same number for the same model.

    ``reduce``: for a loader of one shard of the test set (torchrun), a function that sums an
    int64 ``(2,)`` tensor (correct, images) over the processes (``distributed.Group.sum``)."""
    correct = torch.zeros((), dtype=torch.long, device=device)
    for x, y in loader.batches():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            correct += (forward(x).argmax(1) == y).sum()
    if reduce is None:
        return 100.0 * int(correct) / max(len(loader.labels), 1)
    counts = reduce(torch.stack([correct, torch.tensor(len(loader.labels), device=device)]))
    return 100.0 * int(counts[0]) / max(int(counts[1]), 1)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Replace every BatchNorm's running mean and variance by their averages over ``batches``
    (the cumulative average, ``momentum=None``: the mean of the per-batch means and of the
    per-batch unbiased variances), computed with ``model`` as it is (quantized). Affine
    parameters are unchanged; the model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    try:
        model.train()
        for x in batches:
            model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
