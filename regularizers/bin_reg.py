"""Bin Regularization (Han et al., "Improving Low-Precision Network Quantization via Bin Regularization",
ICCV 2021, eq. 5).

A value v lies in the bin of the level it rounds to, ``k = clamp(round(v/α), Qn, Qp)`` (``quant.grid``);
the loss of a tensor is ``Σ_{non-empty bins} (mean(v_k) - k·α)² + var(v_k)`` (biased variance).

Identity: per bin, ``(mean - t)² + var = mean((v - t)²)``, so the loss is ``Σ_k S_k / n_k`` with
``S_k = Σ_{v in bin k} d²``, ``d = v - k·α``, ``n_k`` the count: a function of the per-bin sums that the
LSQ quantizers compute in their own pass (``quant.bins``, collected by ``hooks.BinStatsCollector``).
Training takes that path (``total_from_stats``); ``BinRegularizer.compute_total_loss`` and
``bin_regularization`` are the plain eager BR of given tensors, the reference of every fast path.
"""

from __future__ import annotations

import math

import torch

from quant.bins import BinStats, bin_index
from quant.grid import integer_range, num_levels, round_to_grid

#: Order of the per-tensor statistics returned by ``bin_regularization``.
INFO_FIELDS = ("mean_term", "var_term", "nonempty_bins", "mean_dist_alpha")


def loss_from_bin_stats(stats: torch.Tensor, abs_sum: torch.Tensor, numel,
                        alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BR loss (eq. 5) from bin statistics (``quant.bins.STAT_ROWS``), for one tensor or a batch of L.

    ``stats``: ``(3, K)`` or ``(L, 3, K)``, the loss differentiable through it; ``abs_sum`` (``Σ|d|``) and
    ``alpha``: ``()`` or ``(L,)``; ``numel``: an int or L of them. Returns ``(loss, info)`` of shapes
    ``()`` / ``(L,)`` and ``(4,)`` / ``(L, 4)``: ``Σ_{k: n_k > 0} S_k / n_k`` (squared units of the values)
    and a detached ``INFO_FIELDS`` vector: ``Σ_k (Σd/n_k)²`` (the bin means' squared distance to their
    levels), the variance term (the rest), the non-empty bins and ``Σ|d| / numel / α`` (in steps).
    """
    counts, squares = stats[..., 0, :].detach(), stats[..., 2, :]
    safe = counts.clamp(min=1)  # empty bins have zero sums, so they add nothing
    loss = (squares / safe).sum(-1)
    with torch.no_grad():
        mean_term = ((stats[..., 1, :] / safe) ** 2).sum(-1)
        numel = torch.as_tensor(numel, dtype=loss.dtype, device=loss.device).clamp(min=1)
        info = torch.stack([mean_term, (loss - mean_term).clamp(min=0), (counts > 0).sum(-1).to(loss.dtype),
                            abs_sum.to(loss.dtype) / numel / alpha.detach().to(loss.dtype)], dim=-1)
    return loss, info


def _sum_over_channels(losses: torch.Tensor, infos: torch.Tensor,
                       counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses ``(M,)`` and infos ``(M, 4)`` of ``len(counts)`` tensors, tensor ``i`` having
    ``counts[i]`` rows (1 per tensor, C for per-channel step sizes), reduced to one per tensor:
    the loss, mean and variance terms and non-empty bins summed over the rows, the mean distance
    (in steps) averaged."""
    if max(counts) == 1:
        return losses, infos
    return (torch.stack([rows.sum() for rows in losses.split(counts)]),
            torch.stack([torch.cat([rows[:, :3].sum(0), rows[:, 3:].mean(0)]) for rows in infos.split(counts)]))


def _tensor_losses(items: list[BinStats]) -> tuple[torch.Tensor, torch.Tensor]:
    """BR loss ``(L,)`` and info ``(L, 4)`` of L tensors' statistics, each of one step size
    (``(3, K)``) or one per output channel (``(C, 3, K)``: summed by ``_sum_over_channels``)."""
    rows = [item.stats.reshape(-1, *item.stats.shape[-2:]) for item in items]
    counts = [r.shape[0] for r in rows]
    losses, infos = loss_from_bin_stats(torch.cat(rows), torch.cat([item.abs_sum.reshape(-1) for item in items]),
                                        [item.numel // c for item, c in zip(items, counts) for _ in range(c)],
                                        torch.cat([item.alpha.reshape(-1) for item in items]))
    return _sum_over_channels(losses, infos, counts)


def check_step_sizes(alphas: list[torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the first step size (of any shape) that is not a finite number > 0
    (and which tensor, of several): the grid ``k·α`` would be meaningless. Reads each α to the host."""
    for i, alpha in enumerate(alphas):
        bad = [step for step in alpha.detach().reshape(-1).tolist() if not (math.isfinite(step) and step > 0)]
        if bad:
            which = f" (tensor {i} of {len(alphas)})" if len(alphas) > 1 else ""
            raise ValueError(f"bin statistics: step size α must be a finite number > 0, got {bad[0]:g}{which}")


def eager_stats(v: torch.Tensor, alpha: torch.Tensor, quant_min: int, quant_max: int,
                backprop_to_alpha: bool) -> BinStats:
    """The ``BinStats`` of ``v`` with plain autograd ops (in at least float32): ``(C, 3, K)``, C = 1 for
    one step size, ``C = v.shape[0]`` for ``alpha`` of shape ``(C,)``."""
    dtype = torch.promote_types(torch.promote_types(v.dtype, torch.float32), alpha.dtype)
    step = alpha.to(dtype).reshape(-1, 1)
    step = step if backprop_to_alpha else step.detach()
    rows = v.to(dtype).reshape(step.shape[0], -1)
    levels = round_to_grid(rows.detach() / step.detach(), quant_min, quant_max)
    d = rows - levels * step
    index = bin_index(levels, quant_min, quant_max, torch.int64)
    zeros = d.new_zeros(step.shape[0], num_levels(quant_min, quant_max))
    stats = torch.stack([zeros.scatter_add(1, index, torch.ones_like(d.detach())), zeros.scatter_add(1, index, d),
                         zeros.scatter_add(1, index, d * d)], dim=1)
    return BinStats(stats, d.detach().abs().sum(1), v.numel(), alpha.detach(), quant_min)


def bin_regularization(v: torch.Tensor, alpha: torch.Tensor, quant_min: int, quant_max: int,
                       backprop_to_alpha: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """BR loss (eq. 5) of one tensor ``v`` (any shape and float dtype) on the grid ``α·[Qn, Qp]``.

    ``alpha``: shape ``()``, or ``(C,)`` with ``v.shape[0] == C`` (the sum of each channel's BR on its
    own grid). Returns ``(loss, info)``: a scalar with gradients to ``v`` (and α if
    ``backprop_to_alpha``) and a detached ``INFO_FIELDS`` vector (``loss_from_bin_stats``; per channel
    summed, the distance averaged). Raises ``ValueError`` for an α that is not a finite number > 0.
    """
    check_step_sizes([alpha])
    losses, infos = _tensor_losses([eager_stats(v, alpha, quant_min, quant_max, backprop_to_alpha)])
    return losses[0], infos[0]


class BinRegularizer:
    """Bin Regularization (eq. 5) for tensors quantized on one grid: ``num_bits`` (1..8) and ``signed`` as
    the quantizer's (``quant.grid.integer_range``; ``ValueError`` for an unsupported width)."""

    def __init__(self, num_bits: int, signed: bool):
        self.num_bits = num_bits
        self.signed = signed
        self.quant_min, self.quant_max = integer_range(num_bits, signed)

    def __repr__(self) -> str:
        return f"BinRegularizer(num_bits={self.num_bits}, signed={self.signed})"

    def loss(self, v: torch.Tensor, alpha: torch.Tensor, backprop_to_alpha: bool):
        """BR loss and info of one tensor; see ``bin_regularization``."""
        return bin_regularization(v, alpha, self.quant_min, self.quant_max, backprop_to_alpha)

    def compute_total_loss(self, values: dict[str, torch.Tensor], alphas: dict[str, torch.Tensor],
                           backprop_to_alpha: bool) -> tuple[torch.Tensor, dict]:
        """Sum of the per-tensor BR losses (the plain eager BR) over the names of ``values``.

        ``values``: name -> real values (weights, or pre-quantization activations); ``alphas``: name -> the
        raw α parameter (BR does not use LSQ's gradient scale), shape ``()`` or ``(C,)``. Returns
        ``(total, info)``: the scalar total (0 when empty) and ``info["per_tensor"][name]``,
        ``info["total"]``: detached ``INFO_FIELDS`` tensors (the total's distance: the mean over tensors).
        Raises ``KeyError`` (naming both sides) when the keys differ, ``ValueError`` for a bad α.
        """
        if values.keys() != alphas.keys():
            only_v = sorted(values.keys() - alphas.keys())
            only_a = sorted(alphas.keys() - values.keys())
            raise KeyError(f"BR keys do not match: values without alpha {only_v}, alphas without values {only_a}")
        check_step_sizes([alphas[name] for name in values])
        return self.total_from_stats({name: eager_stats(v, alphas[name], self.quant_min, self.quant_max,
                                                        backprop_to_alpha) for name, v in values.items()})

    def total_from_stats(self, stats: dict[str, BinStats]) -> tuple[torch.Tensor, dict]:
        """As ``compute_total_loss``, from name -> ``BinStats`` (in training: the quantizers' own statistics).

        Whether the gradient reaches α was decided when the statistics were computed
        (``LSQQuantizer.bin_stats_grad_to_alpha``). A tensor with one step size per output channel
        (statistics ``(C, 3, K)``) contributes the sum of its channels' losses (``bin_regularization``).
        """
        if not stats:
            return torch.zeros(()), {"per_tensor": {}, "total": torch.zeros(len(INFO_FIELDS))}
        losses, infos = _tensor_losses(list(stats.values()))
        summary = torch.cat([infos[:, :3].sum(0), infos[:, 3:].mean(0)])  # the distance: a mean over tensors
        return losses.sum(), {"per_tensor": dict(zip(stats, infos.unbind())), "total": summary}
