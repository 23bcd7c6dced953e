"""The bin statistics of Bin Regularization that the fused LSQ quantizer node computes, and their gradients.

A value v lies in bin ``j`` of level ``k_j = Qn + j·spacing`` (``quant.grid``); with ``d = v - k·α``:
``stats[0, j] = n_j``, ``stats[1, j] = Σ_j d``, ``stats[2, j] = Σ_j d²`` (a ``(3, K)`` tensor, float32 or
float64; ``(C, 3, K)`` per channel) and ``abs_sum = Σ|d|``. Why these suffice for BR (eq. 5):
regularizers/bin_reg.py. Gradients for an upstream ``G``: ``∂/∂v_i = G[1, j] + 2·G[2, j]·d_i`` and
``∂/∂α = -Σ_j k_j·(G[1, j]·n_j + 2·G[2, j]·stats[1, j])``; counts and ``abs_sum`` carry none.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from quant.grid import grid_levels, level_spacing, num_levels, round_to_grid


class BinStats(NamedTuple):
    """Bin statistics of one tensor, as an ``LSQQuantizer`` hands them to its ``bin_stats_sink``.

    Attributes:
        stats: ``(3, K)`` (``STAT_ROWS``), differentiable in the tensor (and α if asked);
            ``(C, 3, K)`` with one step size per output channel (each channel's own bins).
        abs_sum: ``Σ |d|``, shape ``()`` (per channel ``(C,)``), not differentiable.
        numel: number of values in the tensor (all channels).
        alpha: the step size used, detached, shape ``()`` (per channel ``(C,)``).
        quant_min: the level of bin 0.
    """

    stats: torch.Tensor
    abs_sum: torch.Tensor
    numel: int
    alpha: torch.Tensor
    quant_min: int


#: The rows of a ``(3, K)`` statistics tensor.
STAT_ROWS = ("count", "sum_d", "sum_d_squared")

#: Largest number of bins summed by a masked reduction on CUDA and in compiled code (else index_add_).
MASKED_MAX_BINS = 16


def flat_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 1-D tensor in memory order: a view when ``t`` is contiguous or ``channels_last``.

    Element-wise work and per-bin sums do not care about the order of the elements, so
    they run on this view; ``unflat_view`` maps a result back to the layout of ``t``.
    Any other layout is copied.
    """
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


def unflat_view(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Undo ``flat_view``: ``flat`` of ``like.numel()`` elements, shaped (and laid out) as ``like``."""
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = like.shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(like.shape)


def bin_sum(index: torch.Tensor, num_bins: int, values: torch.Tensor | None = None,
            dtype: torch.dtype = torch.float32, method: str | None = None) -> torch.Tensor:
    """Per-bin count (``values=None``, as ``dtype``) or sum of ``values``; ``(num_bins,)``, no host sync.

    ``index``: 1-D integer bins in ``[0, num_bins)``; ``values``: 1-D, as long. ``method``: ``"bincount"``,
    ``"masked"`` or ``"index_add"``; default by device and bin count (docs/design.md, "Bin statistics
    and BR").
    """
    if method is None:
        if index.device.type == "cpu" and not torch.compiler.is_compiling():
            method = "bincount"
        else:
            method = "masked" if num_bins <= MASKED_MAX_BINS else "index_add"
    dtype = dtype if values is None else values.dtype
    if method == "bincount":
        return torch.bincount(index, weights=values, minlength=num_bins).to(dtype)
    if method == "masked":
        hit = index[:, None] == torch.arange(num_bins, device=index.device, dtype=index.dtype)
        if values is None:
            return hit.sum(0, dtype=dtype)
        return torch.where(hit, values[:, None], torch.zeros((), dtype=dtype, device=index.device)).sum(0)
    ones = torch.ones((), dtype=dtype, device=index.device).expand(index.shape)
    return torch.zeros(num_bins, dtype=dtype, device=index.device).index_add_(
        0, index.long(), ones if values is None else values)


def bin_index(levels: torch.Tensor, quant_min: int, quant_max: int, dtype: torch.dtype) -> torch.Tensor:
    """The bin ``(k - Qn) / spacing`` of each level ``k`` (``quant.grid.round_to_grid``), as ``dtype``,
    clamped to ``[0, K)`` (in range for NaN too)."""
    bins = levels - quant_min
    spacing = level_spacing(quant_min, quant_max)
    if spacing != 1:  # the binary grid; on every other grid the division would be one more pass for nothing
        bins.div_(spacing)
    return bins.to(dtype).clamp_(0, num_levels(quant_min, quant_max) - 1)


def _residuals(x: torch.Tensor, step: torch.Tensor, quant_min: int,
               quant_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``c - k`` in steps (``c = x/α``, ``k = clamp(round(c), Qn, Qp)``) over ``flat_view(x)``, in the
    dtype of ``step``, and each value's bin ``k - Qn``. No gradient.

    Per channel (``step`` of shape ``(C,)``): over ``x`` in row-major order (``x[c]`` divided by
    ``step[c]``), and the bin of a value of channel ``c`` is ``c·K + k - Qn`` (K bins per channel)."""
    per_channel = step.dim() > 0
    if per_channel:
        scaled = (x.detach().reshape(step.shape[0], -1).to(step.dtype) / step[:, None]).view(-1)
    else:
        scaled = flat_view(x.detach()).to(step.dtype) / step
    levels = round_to_grid(scaled, quant_min, quant_max)
    # int32 on the CPU (bincount and index_select take it; half the memory traffic of int64)
    index = bin_index(levels, quant_min, quant_max, torch.int32 if scaled.device.type == "cpu" else torch.int64)
    index_dtype, num_bins = index.dtype, num_levels(quant_min, quant_max)
    if per_channel:
        offsets = torch.arange(step.shape[0], device=index.device, dtype=index_dtype) * num_bins
        index = index.view(step.shape[0], -1).add_(offsets[:, None]).view(-1)
    return scaled.sub_(levels), index  # the residual takes the memory of scaled


def _step(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """α, detached, in the dtype the statistics of ``x`` are computed in (at least float32); shape
    ``()``, or ``(C,)`` for per-channel step sizes (given as ``(C,)`` or ``(C, 1, ..., 1)``)."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, torch.float32), alpha.dtype)
    step = alpha.detach().to(dtype)
    return step.reshape(-1) if step.dim() > 0 else step


def eager_bin_statistics(x: torch.Tensor, alpha: torch.Tensor, quant_min: int,
                         quant_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stats (3, K), abs_sum ())`` of one tensor with PyTorch ops; no gradient.

    Sums are taken in steps and scaled back: ``Σd = α·Σ(c-k)``, ``Σd² = α²·Σ(c-k)²``.
    Per channel (``alpha`` of ``C`` elements, ``x.shape[0] == C``): ``(stats (C, 3, K), abs_sum (C,))``,
    each channel's statistics on its own grid ``α[c]·[Qn, Qp]``.
    """
    step = _step(x, alpha)
    residual, index = _residuals(x, step, quant_min, quant_max)
    num_bins = num_levels(quant_min, quant_max) * step.numel()  # K per channel
    per_bin = torch.stack([bin_sum(index, num_bins, dtype=residual.dtype), bin_sum(index, num_bins, residual),
                           bin_sum(index, num_bins, residual.square())])
    scale = torch.stack([torch.ones_like(step), step, step * step], dim=-1).unsqueeze(-1)  # (3, 1) or (C, 3, 1)
    if step.dim() == 0:
        return per_bin * scale, residual.abs_().sum() * step
    channels = step.shape[0]
    return per_bin.view(3, channels, -1).transpose(0, 1) * scale, residual.abs_().view(channels, -1).sum(1) * step


def eager_bin_gradient(grad_stats: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor,
                       quant_min: int, quant_max: int) -> torch.Tensor:
    """``∂/∂x`` of ``Σ grad_stats * stats(x)`` (``grad_stats`` of shape ``(3, K)``, per channel
    ``(C, 3, K)``): ``G[1, k] + 2·G[2, k]·d`` per value, shaped as ``x``.

    In at least float32; the caller casts. Recomputes the bins rather than keeping them.
    """
    step = _step(x, alpha)
    residual, index = _residuals(x, step, quant_min, quant_max)
    table = grad_stats.to(residual.dtype)
    if step.dim() > 0:  # per channel: (C, 3, K), the index counts bins over all channels
        sums, squares = table[:, 1].reshape(-1), (2 * step[:, None] * table[:, 2]).reshape(-1)
        return sums.index_select(0, index).addcmul_(squares.index_select(0, index), residual).view(x.shape)
    per_bin = table[1].index_select(0, index)
    # d = α·(c - k): α folded into the second table
    return unflat_view(per_bin.addcmul_((2 * step * table[2]).index_select(0, index), residual), x)


def bin_alpha_gradient(grad_stats: torch.Tensor, stats: torch.Tensor, quant_min: int,
                       quant_max: int) -> torch.Tensor:
    """``∂/∂α`` of ``Σ grad_stats * stats``: ``-Σ_j k_j·(G[1, j]·n_j + 2·G[2, j]·stats[1, j])``,
    ``k_j`` the level of bin ``j`` (``quant.grid.grid_levels``).

    ``stats`` and ``grad_stats`` of shape ``(..., 3, K)``; the result has shape ``(...)``.
    """
    levels = grid_levels(quant_min, quant_max, device=stats.device, dtype=stats.dtype)
    g, st = grad_stats.to(stats.dtype), stats
    return -(levels * (g[..., 1, :] * st[..., 0, :] + 2 * g[..., 2, :] * st[..., 1, :])).sum(-1)
