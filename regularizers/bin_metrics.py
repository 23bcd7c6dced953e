"""Per-layer bin statistics of quantized weights, for monitoring what BR does.

Bin flips follow Nagel et al., "Overcoming Oscillations in Quantization-Aware
Training", ICML 2022: weights near a bin boundary keep switching bins. The
fraction of weights whose bin changed between two epochs measures it.
"""

from __future__ import annotations

import torch

from quant.bins import bin_index
from quant.grid import level_spacing, num_levels, per_channel_view, round_to_grid


def bin_indices(v: torch.Tensor, alpha: torch.Tensor, quant_min: int, quant_max: int) -> torch.Tensor:
    """Bin of each value, ``clamp(round(v/α), quant_min, quant_max) - quant_min``, as int16, shape of ``v``
    (binary grid, ``quant.grid``: 0 for ``v < 0``, 1 for ``v >= 0``; ``alpha`` of shape ``(C,)``: one
    per output channel, ``v[c]`` on ``alpha[c]``'s grid)."""
    levels = round_to_grid(v.float() / per_channel_view(alpha.float(), v), quant_min, quant_max)
    return bin_index(levels, quant_min, quant_max, torch.int16)


@torch.no_grad()
def weight_bin_stats(v: torch.Tensor, alpha: torch.Tensor, quant_min: int, quant_max: int,
                     previous: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """Distance to level, bin flips and occupancy of one quantized tensor.

    Args:
        v: values (weights), any shape. alpha: step size, shape ``()``, or ``(C,)`` with
            ``v.shape[0] == C`` (per channel; distances in each channel's steps).
        quant_min, quant_max: the integer range.
        previous: the bins returned by the previous call for this tensor, or None.

    Returns:
        ``(stats, bins)``. ``stats`` holds Python floats: ``dist_alpha`` (mean
        ``|v - kα| / α``, 0 means every value sits on its level), ``flips`` (fraction of
        values whose bin differs from ``previous``; None without it) and ``occupancy``
        (fraction of values per bin, one entry per level (``quant.grid.num_levels``), from
        ``quant_min`` up). ``bins`` is the int16 tensor to pass as ``previous`` next time.
    """
    bins = bin_indices(v, alpha, quant_min, quant_max)
    step = per_channel_view(alpha.float(), v)
    levels = (bins.float() * level_spacing(quant_min, quant_max) + quant_min) * step
    dist = ((v.float() - levels).abs() / step).mean().item()
    counts = torch.bincount(bins.flatten().long(), minlength=num_levels(quant_min, quant_max)).float()
    occupancy = (counts / max(v.numel(), 1)).tolist()
    flips = None
    if previous is not None and previous.shape == bins.shape:
        flips = (previous.to(bins.device) != bins).float().mean().item()
    return {"dist_alpha": dist, "flips": flips, "occupancy": occupancy}, bins
