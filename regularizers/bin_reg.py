"""Bin Regularization (Han et al., "Improving Low-Precision Network Quantization via
Bin Regularization", ICCV 2021, eq. 5).

Every real value v is assigned to the bin of the level it rounds to,
``k = clamp(round(v/α), quant_min, quant_max)``; for each non-empty bin the loss is
``(mean(v_k) - k·α)² + var(v_k)`` (biased variance), summed over bins. It pulls each
bin's values onto the bin's level and shrinks their spread.

Implementation note. Per bin, ``(mean - t)² + var = mean((v - t)²)`` (the bias-variance
decomposition), so the loss is ``Σ_bins S_k / n_k`` with ``S_k = Σ_{v in bin k} (v - kα)²``
and ``n_k`` the bin's count: one scatter-add over the tensor, no loop over bins. The
backward pass recomputes ``v - kα`` from ``v`` instead of saving it, so the loss keeps
no tensor of the size of ``v`` alive: A-BR costs no activation memory beyond what the
network already saves for its own backward pass.
"""

from __future__ import annotations

import torch

from quant.lsq import integer_range

#: Order of the per-tensor statistics returned by ``bin_regularization``.
INFO_FIELDS = ("mean_term", "var_term", "nonempty_bins", "mean_dist_alpha")


def _bin_residuals(v: torch.Tensor, alpha: torch.Tensor, quant_min: int, quant_max: int):
    """Return ``(d, bin_index)``: ``d = v - k·α`` and ``k - quant_min`` (int64), both shaped like ``v``."""
    k = torch.clamp(torch.round(v / alpha), quant_min, quant_max)
    return v - k * alpha, (k - quant_min).long()


class _BinRegularization(torch.autograd.Function):
    """Fused BR loss of one tensor; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, v, alpha, quant_min, quant_max, grad_to_alpha):
        dtype = torch.promote_types(v.dtype, torch.float32)  # float32 even under autocast
        vf, af = v.to(dtype), alpha.to(dtype)
        d, idx = _bin_residuals(vf, af, quant_min, quant_max)
        num_bins = quant_max - quant_min + 1
        counts = torch.bincount(idx.flatten(), minlength=num_bins).to(dtype)
        sums = torch.zeros(num_bins, dtype=dtype, device=v.device).index_add_(0, idx.flatten(), d.flatten())
        squares = torch.zeros(num_bins, dtype=dtype, device=v.device).index_add_(0, idx.flatten(), (d * d).flatten())
        safe = counts.clamp(min=1)  # empty bins have zero sums, so they add nothing
        loss = (squares / safe).sum()
        mean_term = ((sums / safe) ** 2).sum()
        info = torch.stack([
            mean_term,
            (loss - mean_term).clamp(min=0),
            (counts > 0).sum().to(dtype),
            d.abs().mean() / af if d.numel() else d.new_zeros(()),
        ]).detach()
        ctx.save_for_backward(v, alpha, counts, sums)
        ctx.quant_range = (quant_min, quant_max)
        ctx.grad_to_alpha = grad_to_alpha
        ctx.mark_non_differentiable(info)
        return loss, info

    @staticmethod
    def backward(ctx, grad_loss, _grad_info):
        v, alpha, counts, sums = ctx.saved_tensors
        quant_min, _ = ctx.quant_range
        grad_v = grad_alpha = None
        if ctx.needs_input_grad[0]:
            dtype = counts.dtype
            d, idx = _bin_residuals(v.to(dtype), alpha.to(dtype), *ctx.quant_range)
            grad_v = (grad_loss * 2 * d / counts.clamp(min=1)[idx]).to(v.dtype)
        if ctx.grad_to_alpha and ctx.needs_input_grad[1]:
            # d/dα Σ_k S_k/n_k = Σ_k -2·k·(Σ_{v in k} d)/n_k, with k the bin's level.
            levels = torch.arange(counts.numel(), device=counts.device, dtype=counts.dtype) + quant_min
            grad_alpha = (grad_loss * -2 * (levels * sums / counts.clamp(min=1)).sum()).to(alpha.dtype)
        return grad_v, grad_alpha, None, None, None


def bin_regularization(v: torch.Tensor, alpha: torch.Tensor, quant_min: int, quant_max: int,
                       backprop_to_alpha: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """BR loss of one tensor (Han et al. 2021, eq. 5), vectorised over bins.

    Args:
        v: real values, any shape, any float dtype (computed in at least float32).
        alpha: step size α, shape ``()``, in the units of ``v``.
        quant_min, quant_max: the integer range of the quantizer.
        backprop_to_alpha: if False α is a constant for this loss (no gradient to α).

    Returns:
        ``(loss, info)``: a scalar loss (in squared units of ``v``) with gradients to
        ``v`` (and α), and a detached vector of ``INFO_FIELDS``: the mean-to-target
        term, the variance term, the number of non-empty bins, and the mean
        ``|v - kα| / α``.
    """
    return _BinRegularization.apply(v, alpha, quant_min, quant_max, backprop_to_alpha)


class BinRegularizer:
    """Bin Regularization for tensors quantized on one integer grid (Han et al. 2021, eq. 5).

    Args:
        num_bits: 2..8, as the quantizer's.
        signed: as the quantizer's; gives ``quant_min``, ``quant_max`` as in ``LSQQuantizer``.

    Raises:
        ValueError: unsupported ``num_bits``.
    """

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
        """Sum of the per-tensor BR losses over all keys.

        Args:
            values: name -> tensor of real values (weights, or pre-quantization activations).
            alphas: name -> step size α of shape ``()``; the raw parameter (BR does not
                use LSQ's gradient scale).
            backprop_to_alpha: whether the targets ``k·α`` carry gradient to α.

        Returns:
            ``(total, info)``: the scalar total (0 when ``values`` is empty) and a dict
            with ``info["per_tensor"][name]`` and ``info["total"]``, each a detached
            tensor of ``INFO_FIELDS`` (the total's last field is the mean over tensors).
            No value is read back to the host.

        Raises:
            KeyError: when the keys of ``values`` and ``alphas`` differ (names both sides).
        """
        if values.keys() != alphas.keys():
            only_v = sorted(values.keys() - alphas.keys())
            only_a = sorted(alphas.keys() - values.keys())
            raise KeyError(f"BR keys do not match: values without alpha {only_v}, alphas without values {only_a}")
        per_tensor, total = {}, None
        for name, v in values.items():
            loss, per_tensor[name] = self.loss(v, alphas[name], backprop_to_alpha)
            total = loss if total is None else total + loss
        if total is None:
            return torch.zeros(()), {"per_tensor": {}, "total": torch.zeros(len(INFO_FIELDS))}
        stacked = torch.stack(list(per_tensor.values()))
        summary = torch.cat([stacked[:, :3].sum(0), stacked[:, 3:].mean(0)])
        return total, {"per_tensor": per_tensor, "total": summary}
