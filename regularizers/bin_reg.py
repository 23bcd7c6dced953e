"""Bin Regularization (Han et al., "Improving Low-Precision Network Quantization via
Bin Regularization", ICCV 2021, eq. 5).

Every real value v is assigned to the bin of the level it rounds to,
``k = clamp(round(v/α), quant_min, quant_max)``; for each non-empty bin the loss is
``(mean(v_k) - k·α)² + var(v_k)`` (biased variance), summed over bins. It pulls each
bin's values onto the bin's level and shrinks their spread.

Implementation note. Per bin, ``(mean - t)² + var = mean((v - t)²)`` (the bias-variance
decomposition), so the loss is ``Σ_bins S_k / n_k`` with ``S_k = Σ_{v in bin k} (v - kα)²``
and ``n_k`` the bin's count: three per-bin reductions over the tensor (``bincount`` on
the CPU, a one-hot product on CUDA), no loop over bins and no host sync. Its gradient is
``2·(v - kα)/n_k``. The backward pass recomputes ``v - kα`` from ``v`` instead of saving
it, and for activations (inputs of LSQ quantizers) it adds the gradient only when the
backward pass reaches the activation (``_DeferredGradient``), so A-BR keeps nothing of
the size of an activation alive that the network does not keep anyway
(docs/performance.md measures it).
"""

from __future__ import annotations

import torch

from quant.lsq import bin_residuals, integer_range, is_quantizer_input, unflat_view

#: Order of the per-tensor statistics returned by ``bin_regularization``.
INFO_FIELDS = ("mean_term", "var_term", "nonempty_bins", "mean_dist_alpha")


#: Largest number of bins for which CUDA sums bins with a one-hot matrix product (else index_add_).
ONE_HOT_MAX_BINS = 16


def _bin_sum(index: torch.Tensor, num_bins: int, values: torch.Tensor | None = None,
             dtype: torch.dtype = torch.float32, method: str | None = None) -> torch.Tensor:
    """Per-bin count (``values=None``, as ``dtype``) or sum of ``values``; ``(num_bins,)``, no host sync.

    ``method`` (default: by device): ``"bincount"`` on the CPU (fastest there, on uint8
    indices); on CUDA ``bincount`` reads the index range back to the host, so small grids
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


def _index_dtype(device: torch.device, for_gather: bool) -> torch.dtype:
    """uint8 for CPU ``bincount`` (at most 256 bins), int32 for CPU ``index_select``, int64 on CUDA."""
    if device.type != "cpu":
        return torch.int64
    return torch.int32 if for_gather else torch.uint8


class _DeferredGradient:
    """Adds BR's gradient to a non-leaf tensor when the backward pass reaches the tensor.

    BR runs after the network's forward pass, so its autograd node runs at the very start
    of the backward pass. Returning ``∂BR/∂v`` from there would hold one gradient of the
    size of ``v`` per regularised layer until the backward pass reaches that layer: A-BR
    would raise the peak memory by about one activation per layer. Instead the node only
    stores the per-bin table ``2/n_k`` (and ``v``), and a hook on ``v`` adds
    ``table[k]·(v - kα)`` to the gradient of ``v`` once all of it has arrived, i.e. just
    before the backward pass continues below ``v``. BR's node stays a consumer of ``v``
    (returning no gradient), so the hook cannot fire before the table is there. Used only
    for inputs of activation quantizers (``quant.lsq.is_quantizer_input``): the quantizer
    also consumes ``v``, so its gradient is defined when the hook fires.
    """

    def __init__(self, alpha: torch.Tensor, quant_min: int, quant_max: int):
        self.alpha, self.quant_range = alpha, (quant_min, quant_max)
        self.table = self.values = None

    def __call__(self, grad: torch.Tensor | None) -> torch.Tensor | None:
        if self.table is None:  # BR was not part of this backward pass
            return None
        table, v = self.table, self.values
        self.table = self.values = None  # hold nothing between backward passes
        if grad is None:  # autograd cannot turn "no gradient" into one from a hook
            raise RuntimeError("Bin Regularization of a quantizer input whose quantized output does not reach "
                               "the loss: compute the loss through the layer, or regularise a copy of the input")
        d, index = bin_residuals(v, self.alpha, *self.quant_range, _index_dtype(v.device, for_gather=True))
        term = unflat_view(d.mul_(table.index_select(0, index)), v)
        return term.add_(grad) if term.dtype == grad.dtype else (term + grad).to(grad.dtype)


class _BinRegularization(torch.autograd.Function):
    """Fused BR loss of one tensor; see the module docstring for the math.

    Forward, on the flattened tensor: ``d = v - kα`` and the bin of each value, then three
    per-bin reductions (count, Σd, Σd²). Nothing of the size of ``v`` is saved.

    Backward: ``∂loss/∂v_i = 2·d_i / n_k(i)``, a table of ``2/n_k`` looked up per element
    after recomputing ``d`` and the bins from ``v``: here, or, with ``deferred``, in the
    ``_DeferredGradient`` hook on ``v``.
    """

    @staticmethod
    def forward(ctx, v, alpha, quant_min, quant_max, grad_to_alpha, deferred=None):
        dtype = torch.promote_types(v.dtype, torch.float32)  # float32 even under autocast
        num_bins = quant_max - quant_min + 1
        d, index = bin_residuals(v, alpha, quant_min, quant_max, _index_dtype(v.device, for_gather=False))
        counts = _bin_sum(index, num_bins, dtype=dtype)
        sums = _bin_sum(index, num_bins, d)
        dist = d.abs_().sum() / max(d.numel(), 1) / alpha.detach().to(dtype)  # d is not needed after this
        squares = _bin_sum(index, num_bins, d.square_())
        safe = counts.clamp(min=1)  # empty bins have zero sums, so they add nothing
        loss = (squares / safe).sum()
        mean_term = ((sums / safe) ** 2).sum()
        info = torch.stack([mean_term, (loss - mean_term).clamp(min=0), (counts > 0).sum().to(dtype), dist]).detach()
        ctx.save_for_backward(v, alpha, counts, sums)
        ctx.quant_range = (quant_min, quant_max)
        ctx.grad_to_alpha, ctx.deferred = grad_to_alpha, deferred
        ctx.mark_non_differentiable(info)
        return loss, info

    @staticmethod
    def backward(ctx, grad_loss, _grad_info):
        v, alpha, counts, sums = ctx.saved_tensors
        quant_min, quant_max = ctx.quant_range
        grad_v = grad_alpha = None
        # ∂/∂v_i Σ_k S_k/n_k = 2·d_i / n_k(i): one table of K entries, looked up per element.
        table = 2 * grad_loss / counts.clamp(min=1)
        if ctx.deferred is not None:
            ctx.deferred.table, ctx.deferred.values = table, v
        elif ctx.needs_input_grad[0]:
            d, index = bin_residuals(v, alpha, quant_min, quant_max, _index_dtype(v.device, for_gather=True))
            grad_v = unflat_view(d.mul_(table.index_select(0, index)), v).to(v.dtype)
        if ctx.grad_to_alpha and ctx.needs_input_grad[1]:
            # d/dα Σ_k S_k/n_k = Σ_k -2·k·(Σ_{v in k} d)/n_k, with k the bin's level.
            levels = torch.arange(counts.numel(), device=counts.device, dtype=counts.dtype) + quant_min
            grad_alpha = (grad_loss * -2 * (levels * sums / counts.clamp(min=1)).sum()).to(alpha.dtype)
        return grad_v, grad_alpha, None, None, None, None


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
    if not (torch.is_grad_enabled() and v.grad_fn is not None and is_quantizer_input(v)):
        return _BinRegularization.apply(v, alpha, quant_min, quant_max, backprop_to_alpha)
    # An activation going into a quantizer: its gradient is added when the backward pass reaches it.
    deferred = _DeferredGradient(alpha, quant_min, quant_max)
    loss, info = _BinRegularization.apply(v, alpha, quant_min, quant_max, backprop_to_alpha, deferred)
    v.register_hook(deferred)
    return loss, info


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
