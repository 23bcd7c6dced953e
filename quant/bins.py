"""Bin statistics of a tensor on an LSQ grid: the sufficient statistics of Bin Regularization.

Every value v falls in the bin of the level it rounds to, ``k = clamp(round(v/α), Qn, Qp)``
(Han et al., "Improving Low-Precision Network Quantization via Bin Regularization", ICCV
2021, section 3). With ``d = v - k·α``, BR's loss of a tensor (eq. 5) is a function of three
sums per bin (see ``regularizers.bin_reg``):

    stats[0, j] = n_j = #{v in bin j}     stats[1, j] = Σ_{v in bin j} d     stats[2, j] = Σ_{v in bin j} d²

with bin ``j`` holding level ``Qn + j`` (``j = 0 .. Qp - Qn``). ``stats`` is a ``(3, K)``
tensor, ``K = Qp - Qn + 1``, in float32 (float64 for float64 input); ``abs_sum = Σ |d|``
over the whole tensor (for the mean distance to the levels).

Gradients (the sums are linear in d, and d depends on v with slope 1 and on α with slope -k):
``∂/∂v_i = G[1, j(i)] + 2·G[2, j(i)]·d_i`` and ``∂/∂α = -Σ_j k_j·(G[1, j]·n_j + 2·G[2, j]·stats[1, j])``
for an upstream gradient ``G`` of ``stats``; counts and ``abs_sum`` carry no gradient.

``LSQQuantizer`` computes the statistics inside its own forward pass (``bin_stats=...``),
``bin_statistics`` computes them for any tensor (weights).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

class BinStats(NamedTuple):
    """Bin statistics of one tensor, as an ``LSQQuantizer`` hands them to its ``bin_stats_sink``.

    Attributes:
        stats: ``(3, K)`` (``STAT_ROWS``), differentiable in the tensor (and α if asked).
        abs_sum: ``Σ |d|``, shape ``()``, not differentiable.
        numel: number of values in the tensor.
        alpha: the step size used, detached, shape ``()``.
        quant_min: the level of bin 0.
    """

    stats: torch.Tensor
    abs_sum: torch.Tensor
    numel: int
    alpha: torch.Tensor
    quant_min: int


#: The rows of a ``(3, K)`` statistics tensor.
STAT_ROWS = ("count", "sum_d", "sum_d_squared")

#: Largest number of bins for which CUDA sums bins with a one-hot matrix product (else index_add_).
ONE_HOT_MAX_BINS = 16


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
    if _is_channels_last(like):
        n, c, h, w = like.shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(like.shape)


def bin_sum(index: torch.Tensor, num_bins: int, values: torch.Tensor | None = None,
            dtype: torch.dtype = torch.float32, method: str | None = None) -> torch.Tensor:
    """Per-bin count (``values=None``, as ``dtype``) or sum of ``values``; ``(num_bins,)``, no host sync.

    ``method`` (default: by device): ``"bincount"`` on the CPU (fastest there); on CUDA ``bincount`` reads the index range back to the host, so small grids
    use ``"one_hot"`` (a one-hot matrix product) and larger ones ``"index_add"``.
    """
    if method is None:
        method = "bincount" if index.device.type == "cpu" else (
            "one_hot" if num_bins <= ONE_HOT_MAX_BINS else "index_add")
    dtype = dtype if values is None else values.dtype
    if method == "bincount":
        return torch.bincount(index, weights=values, minlength=num_bins).to(dtype)
    if method == "one_hot":
        one_hot = (index[:, None] == torch.arange(num_bins, device=index.device)).to(dtype)
        return one_hot.sum(0) if values is None else values @ one_hot
    ones = torch.ones((), dtype=dtype, device=index.device).expand(index.shape)
    return torch.zeros(num_bins, dtype=dtype, device=index.device).index_add_(
        0, index.long(), ones if values is None else values)


def _residuals(values, steps: torch.Tensor, quant_min: int, quant_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``c - k`` in steps (``c = v/α``, ``k = clamp(round(c), Qn, Qp)``) of all values of ``values``
    concatenated in ``flat_view`` order, in the dtype of ``steps`` (shape ``(L,)``), and each
    value's bin ``k - Qn`` plus ``K`` per tensor before it. No gradient."""
    num_bins = quant_max - quant_min + 1
    parts = [flat_view(v.detach()).to(steps.dtype) / a for v, a in zip(values, steps.unbind())]
    scaled = torch.cat(parts) if len(parts) > 1 else parts[0]
    levels = scaled.round().clamp_(quant_min, quant_max)
    # int32 on the CPU (bincount and index_select take it; half the memory traffic of int64)
    index_dtype = torch.int32 if scaled.device.type == "cpu" else torch.int64
    index = (levels - quant_min).to(index_dtype).clamp_(0, num_bins - 1)  # in range for NaN too
    if len(values) > 1:
        index.add_(_bin_offsets(values, num_bins, index_dtype))
    return scaled.sub_(levels), index  # the residual takes the memory of scaled


def _stats(residual: torch.Tensor, index: torch.Tensor, steps: torch.Tensor,
           num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stats (L, 3, K), abs_sums (L,))`` from ``_residuals``: sums in steps, scaled back per tensor
    (``Σd = α·Σ(c-k)``, ``Σd² = α²·Σ(c-k)²``)."""
    count, total = steps.numel(), steps.numel() * num_bins
    per_bin = torch.stack([bin_sum(index, total, dtype=residual.dtype), bin_sum(index, total, residual),
                           bin_sum(index, total, residual.square())]).view(3, count, num_bins)
    scale = torch.stack([torch.ones_like(steps), steps, steps * steps]).unsqueeze(-1)  # (3, L, 1)
    if count == 1:
        abs_sums = residual.abs().sum().reshape(1)
    else:  # Σ|c - k| per tensor: the per-bin sums of each tensor's K bins
        abs_sums = bin_sum(index, total, residual.abs()).view(count, num_bins).sum(-1)
    return (per_bin * scale).transpose(0, 1).contiguous(), abs_sums * steps


def _gradient(grad_stats: torch.Tensor, residual: torch.Tensor, index: torch.Tensor,
              steps: torch.Tensor) -> torch.Tensor:
    """``G[1, k] + 2·G[2, k]·d`` per value (flat), with ``d = α·(c - k)`` (α folded into the table)."""
    table = grad_stats.to(residual.dtype)
    per_bin = table[:, 1].reshape(-1).index_select(0, index)
    return per_bin.addcmul_((2 * table[:, 2] * steps[:, None]).reshape(-1).index_select(0, index), residual)


def _steps(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """α as a ``(1,)`` tensor in the dtype the statistics of ``x`` are computed in (at least float32)."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, torch.float32), alpha.dtype)
    return alpha.detach().to(dtype).reshape(1)


def eager_bin_statistics(x: torch.Tensor, alpha: torch.Tensor, quant_min: int,
                         quant_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stats (3, K), abs_sum ())`` of one tensor with PyTorch ops (the quantizer's path off the CPU kernels)."""
    steps = _steps(x, alpha)
    residual, index = _residuals([x], steps, quant_min, quant_max)
    stats, abs_sums = _stats(residual, index, steps, quant_max - quant_min + 1)
    return stats[0], abs_sums[0]


def eager_bin_gradient(grad_stats: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor,
                       quant_min: int, quant_max: int) -> torch.Tensor:
    """``∂/∂x`` of ``Σ grad_stats * stats(x)`` (``grad_stats`` of shape ``(3, K)``), shaped as ``x``.

    In at least float32; the caller casts. Recomputes the bins rather than keeping them.
    """
    steps = _steps(x, alpha)
    residual, index = _residuals([x], steps, quant_min, quant_max)
    return unflat_view(_gradient(grad_stats[None], residual, index, steps), x)


def bin_alpha_gradient(grad_stats: torch.Tensor, stats: torch.Tensor, quant_min: int) -> torch.Tensor:
    """``∂/∂α`` of ``Σ grad_stats * stats``: ``-Σ_j k_j·(G[1, j]·n_j + 2·G[2, j]·stats[1, j])``.

    ``stats`` and ``grad_stats`` of shape ``(..., 3, K)``; the result has shape ``(...)``.
    """
    levels = torch.arange(stats.shape[-1], device=stats.device, dtype=stats.dtype) + quant_min
    g, st = grad_stats.to(stats.dtype), stats
    return -(levels * (g[..., 1, :] * st[..., 0, :] + 2 * g[..., 2, :] * st[..., 1, :])).sum(-1)


class _BinStatistics(torch.autograd.Function):
    """Bin statistics of several tensors, each on its own step size, in one pass of ops.

    The tensors are concatenated in units of their own step (``c = v/α``, in at least
    float32), and every value's bin gets an offset of ``K`` per tensor, so one set of
    per-bin sums covers all of them: a fixed number of ops per call instead of per tensor
    (W-BR regularises 18 small weight tensors per step, where the cost is the number of
    ops, not their size). Sums in step units are scaled back per tensor: ``Σd = α·Σ(c-k)``,
    ``Σd² = α²·Σ(c-k)²``. Saved for backward: the residuals and bins (the size of the
    weights), so the backward pass does not recompute them.
    """

    @staticmethod
    def forward(ctx, quant_min, quant_max, grad_to_alpha, count, *tensors):
        values, alphas = tensors[:count], tensors[count:]
        dtype = torch.promote_types(torch.promote_types(values[0].dtype, torch.float32), alphas[0].dtype)
        steps = torch.stack([a.detach().to(dtype) for a in alphas])
        residual, index = _residuals(values, steps, quant_min, quant_max)
        stats, abs_sums = _stats(residual, index, steps, quant_max - quant_min + 1)
        ctx.save_for_backward(residual, index, steps, stats)
        ctx.quant_min, ctx.grad_to_alpha = quant_min, grad_to_alpha
        ctx.shapes = [(v.shape, v.dtype, _is_channels_last(v)) for v in values]
        ctx.mark_non_differentiable(abs_sums)
        return stats, abs_sums

    @staticmethod
    def backward(ctx, grad_stats, _grad_abs_sums):
        residual, index, steps, stats = ctx.saved_tensors
        count = len(ctx.shapes)
        grads_v = [None] * count
        if any(ctx.needs_input_grad[4:4 + count]):
            flat = _gradient(grad_stats, residual, index, steps)
            parts = flat.split([math.prod(shape) for shape, _, _ in ctx.shapes])
            for i, (part, (shape, dtype, channels_last)) in enumerate(zip(parts, ctx.shapes)):
                if ctx.needs_input_grad[4 + i]:
                    grads_v[i] = _shaped(part, shape, channels_last).to(dtype)
        grads_a = [None] * count
        if ctx.grad_to_alpha:
            per_tensor = bin_alpha_gradient(grad_stats, stats, ctx.quant_min)
            grads_a = [g if ctx.needs_input_grad[4 + count + i] else None for i, g in enumerate(per_tensor.unbind())]
        return None, None, None, None, *grads_v, *grads_a


def _is_channels_last(t: torch.Tensor) -> bool:
    """Whether ``flat_view(t)`` is in channels_last (NHWC) order rather than the logical one."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _shaped(flat: torch.Tensor, shape: torch.Size, channels_last: bool) -> torch.Tensor:
    """A gradient in ``flat_view`` order back in the shape (and channels_last layout) of its tensor."""
    if not channels_last:
        return flat.view(shape)
    n, c, h, w = shape
    return flat.view(n, h, w, c).permute(0, 3, 1, 2)


_OFFSETS: dict = {}


def _bin_offsets(values, num_bins: int, dtype: torch.dtype) -> torch.Tensor:
    """``i·K`` for every value of tensor ``i`` (cached per sizes: W-BR asks for the same ones every step)."""
    key = (tuple(v.numel() for v in values), num_bins, values[0].device, dtype)
    if key not in _OFFSETS:
        sizes = torch.tensor(key[0], device=key[2])
        _OFFSETS.clear()  # one entry: a model's weights; a new set replaces it
        _OFFSETS[key] = (torch.arange(len(values), device=key[2]).repeat_interleave(sizes) * num_bins).to(dtype)
    return _OFFSETS[key]


def bin_statistics(values: list[torch.Tensor], alphas: list[torch.Tensor], quant_min: int, quant_max: int,
                   grad_to_alpha: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin statistics of each tensor in ``values`` on the grid ``alphas[i]·[quant_min, quant_max]``.

    Args:
        values: L tensors of real values, any shapes and float dtypes (computed in at least
            float32). alphas: L step sizes, each of shape ``()``, in the units of its tensor.
        quant_min, quant_max: the integer range.
        grad_to_alpha: whether the statistics carry gradient to the step sizes (through ``d``).

    Returns:
        ``(stats, abs_sums)``: ``stats`` of shape ``(L, 3, K)`` (``STAT_ROWS`` per tensor; see
        the module docstring), differentiable in the values (and step sizes); ``abs_sums``
        of shape ``(L,)``, ``Σ|d|`` per tensor, not differentiable.

    Raises:
        ValueError: ``values`` empty or of another length than ``alphas``.
    """
    if not values or len(values) != len(alphas):
        raise ValueError(f"bin_statistics: need as many step sizes as tensors (at least one), "
                         f"got {len(values)} tensors and {len(alphas)} step sizes")
    return _BinStatistics.apply(quant_min, quant_max, grad_to_alpha, len(values), *values, *alphas)
