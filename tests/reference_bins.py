"""The batched bin statistics with their own autograd node: the slow reference that tests hold the
quantizer's statistics (quant/bins.py) against, and their gradients (``eager_bin_gradient``,
``bin_alpha_gradient``) against autograd."""

from __future__ import annotations

import torch

from quant.bins import bin_alpha_gradient, eager_bin_gradient, eager_bin_statistics
from regularizers.bin_reg import check_step_sizes


class _BinStatistics(torch.autograd.Function):
    """Bin statistics of one tensor with their gradients to the tensor and (optionally) to α."""

    @staticmethod
    def forward(ctx, v, alpha, quant_min, quant_max, grad_to_alpha):
        stats, abs_sum = eager_bin_statistics(v, alpha, quant_min, quant_max)
        ctx.save_for_backward(v, alpha, stats)
        ctx.quant_range, ctx.grad_to_alpha = (quant_min, quant_max), grad_to_alpha
        ctx.mark_non_differentiable(abs_sum)
        return stats, abs_sum

    @staticmethod
    def backward(ctx, grad_stats, _grad_abs_sum):
        v, alpha, stats = ctx.saved_tensors
        grad_v = grad_alpha = None
        if ctx.needs_input_grad[0]:
            grad_v = eager_bin_gradient(grad_stats, v, alpha, *ctx.quant_range).to(v.dtype)
        if ctx.grad_to_alpha and ctx.needs_input_grad[1]:
            grad_alpha = bin_alpha_gradient(grad_stats, stats, *ctx.quant_range).to(alpha.dtype)
        return grad_v, grad_alpha, None, None, None


def bin_statistics(values: list[torch.Tensor], alphas: list[torch.Tensor], quant_min: int, quant_max: int,
                   grad_to_alpha: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin statistics of each tensor in ``values`` on the grid ``alphas[i]·[quant_min, quant_max]``.

    Args:
        values: L tensors of real values, any shapes and float dtypes (computed in at least
            float32). alphas: L step sizes, each of shape ``()``, in the units of its tensor, or
            ``(C,)`` for a tensor whose first dimension has C output channels (one α each).
        quant_min, quant_max: the integer range.
        grad_to_alpha: whether the statistics carry gradient to the step sizes (through ``d``).

    Returns:
        ``(stats, abs_sums)``: ``stats`` of shape ``(L, 3, K)`` (``STAT_ROWS`` per tensor; see
        the module docstring), differentiable in the values (and step sizes); ``abs_sums``
        of shape ``(L,)``, ``Σ|d|`` per tensor, not differentiable. Per channel: ``(L, C, 3, K)``
        and ``(L, C)`` (every tensor must then have C channels: stacked).

    Raises:
        ValueError: ``values`` empty or of another length than ``alphas``; a step size that is
            not a finite number > 0 (the grid ``k·α`` would be meaningless: NaN or a finite
            nonsense loss). Checking reads each α back to the host.
    """
    if not values or len(values) != len(alphas):
        raise ValueError(f"bin_statistics: need as many step sizes as tensors (at least one), "
                         f"got {len(values)} tensors and {len(alphas)} step sizes")
    check_step_sizes(alphas)
    stats, abs_sums = zip(*(_BinStatistics.apply(v, a, quant_min, quant_max, grad_to_alpha)
                            for v, a in zip(values, alphas)))
    return torch.stack(stats), torch.stack(abs_sums)
