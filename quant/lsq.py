"""LSQ fake quantizer (Esser et al., "Learned Step Size Quantization", ICLR 2020).

The quantizer maps a real tensor x to ``clamp(round(x / α), Qn, Qp) · α`` (LSQ eq. 1–2)
with a learned step size α per tensor. Gradients follow LSQ section 2.2: the
straight-through estimator (STE) for ``round`` and eq. 3, scaled by
``g = 1 / sqrt(N · Qp)``, for α.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from quant.bins import (BinStats, bin_alpha_gradient, eager_bin_gradient, eager_bin_statistics,
                        flat_view)
from quant.grid import (FULL_PRECISION_BITS, MIN_STEP_SIZE, check_num_bits, describe_grid, integer_range,
                        is_binary, min_step_size, per_channel_view, round_to_grid)
from quant.kernels import cpu_kernels, kernels_apply


def effective_step(alpha: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """The step the fake quantizer multiplies by: the value of LSQ's ``scale_grad(α, g)``, ``(α - α·g) + α·g``,
    which is not always α to the last bit (computed so, the output is bit-identical to the plain form)."""
    scaled = alpha * grad_scale
    return (alpha - scaled) + scaled


def _sum_of_products(a: torch.Tensor, b: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """``(a * b).sum()`` as a scalar of at least float32, with no temporary for float32/64 inputs;
    with ``per_channel`` the sum over every dimension but the first, shape ``(a.shape[0],)``."""
    if per_channel:
        return (a * b).reshape(a.shape[0], -1).sum(1, dtype=torch.promote_types(a.dtype, torch.float32))
    if a.dtype in (torch.float32, torch.float64) and a.dtype == b.dtype and a.stride() == b.stride():
        return torch.dot(flat_view(a), flat_view(b))
    return (a * b).sum(dtype=torch.promote_types(a.dtype, torch.float32))


class _LSQFakeQuantize(torch.autograd.Function):
    """LSQ fake quantization of one tensor in one autograd node (LSQ eq. 1-3), optionally with BR's bin
    statistics of the same tensor (``quant.bins``) and a ReLU fused in front (``input_relu``).

    forward: ``out = round_to_grid(clamp(x/a, Qn, Qp))·a`` with ``a = effective_step(α, g)``; with
    ``bin_stats`` also ``(3, K)`` statistics and ``Σ|x - out|`` from the same pass.
    backward: ``∂L/∂x = ∂L/∂out`` where ``Qn < x/a < Qp``, else 0 (STE), plus the statistics' gradient;
    to α, LSQ eq. 3 times ``g``, plus the statistics' (without ``g``) if ``bin_stats == "to_alpha"``.
    Per channel: ``alpha`` of shape ``(C,)``, ``C = x.shape[0]``. Equals ``plain_lsq`` of
    tests/test_lsq_fused.py (the reference); the rules: docs/design.md, "The fused node".
    """

    @staticmethod
    def forward(ctx, x, alpha, quant_min, quant_max, grad_scale, bin_stats=None, input_relu=False):
        # clamp: an α that would be 0 (0/0 = NaN) or subnormal in the dtype of x (float16) is raised
        # to min_step_size; a no-op for every α the optimiser leaves in float32 (>= MIN_STEP_SIZE).
        a = effective_step(alpha, grad_scale).to(x.dtype).clamp_min(min_step_size(x.dtype))
        a = per_channel_view(a, x)  # one α per output channel: shape (C, 1, ..., 1), broadcast over x
        with_stats = bin_stats is not None
        # backward takes the same path (it saved what that path needs); the kernels take one α
        ctx.kernels = alpha.dim() == 0 and kernels_apply(x)
        if ctx.kernels:
            if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
                x = x.contiguous()
            out, stats, abs_sum = cpu_kernels().lsq_forward(x, a, quant_min, quant_max, with_stats, input_relu)
        else:
            if input_relu:
                x = torch.relu(x)  # saved instead of the input: threshold_backward needs relu(x)
            out = round_to_grid(x / a, quant_min, quant_max).mul_(a)
            stats, abs_sum = (eager_bin_statistics(x, a, quant_min, quant_max) if with_stats
                              else (x.new_zeros(3, 0, dtype=torch.float32), x.new_zeros((), dtype=torch.float32)))
        ctx.save_for_backward(x, a, stats)
        ctx.quant_range, ctx.bin_stats = (quant_min, quant_max), bin_stats
        ctx.grad_scale, ctx.alpha_dtype, ctx.input_relu = grad_scale, alpha.dtype, input_relu
        ctx.alpha_shape = alpha.shape
        ctx.mark_non_differentiable(abs_sum)
        ctx.set_materialize_grads(False)  # an unused statistics output costs nothing in backward
        return out, stats, abs_sum

    @staticmethod
    def backward(ctx, grad_out, grad_stats, _grad_abs_sum):
        x, a, stats = ctx.saved_tensors
        quant_min, quant_max = ctx.quant_range
        if ctx.bin_stats is None:  # no statistics: torch.compile may still pass an (empty) gradient for them
            grad_stats = None
        if grad_out is None:
            grad_out = torch.zeros_like(x)
        # The kernels' gradient has no autograd history: a double backward (create_graph) takes
        # the PyTorch ops, which are differentiable.
        if ctx.kernels and not torch.is_grad_enabled():
            if grad_out.stride() != x.stride():
                grad_out = torch.empty_like(x).copy_(grad_out)
            br_table = grad_stats[1:].float().contiguous() if grad_stats is not None else None
            grad_x, step_sum = cpu_kernels().lsq_backward(grad_out, x, a, quant_min, quant_max, br_table,
                                                          ctx.input_relu)
        else:
            if ctx.kernels and ctx.input_relu:
                x = torch.relu(x)  # the kernels saved the ReLU's input
            c = x / a
            # hardtanh_backward(g, c, lo, hi) is g where lo < c < hi, else 0: the STE in one pass.
            grad_x = torch.ops.aten.hardtanh_backward(grad_out, c, quant_min, quant_max)
            per_channel = a.dim() > 0
            step_sum = (_sum_of_products(grad_out, round_to_grid(c, quant_min, quant_max), per_channel)
                        - _sum_of_products(grad_x, c, per_channel))
            if grad_stats is not None:
                grad_x = grad_x + eager_bin_gradient(grad_stats, x, a, quant_min, quant_max).to(grad_x.dtype)
            if ctx.input_relu:  # x is relu(input) here: torch.relu's own backward
                grad_x = torch.ops.aten.threshold_backward(grad_x, x, 0)
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad_alpha = step_sum * ctx.grad_scale
            if grad_stats is not None and ctx.bin_stats == "to_alpha":
                grad_alpha = grad_alpha + bin_alpha_gradient(grad_stats, stats, quant_min, quant_max)
            grad_alpha = grad_alpha.to(ctx.alpha_dtype).view(ctx.alpha_shape)
        return (grad_x if ctx.needs_input_grad[0] else None), grad_alpha, None, None, None, None, None


def lsq_fake_quantize(x: torch.Tensor, alpha: torch.Tensor, quant_min: int, quant_max: int,
                      grad_scale: float) -> torch.Tensor:
    """LSQ fake quantization ``clamp(round(x/α), quant_min, quant_max)·α`` (LSQ eq. 1-2), fused.

    Args:
        x: any shape and float dtype; the output has its shape, dtype and memory format.
        alpha: step size, shape ``()`` (float32 parameter; cast to the dtype of ``x``).
        quant_min, quant_max: the integer range.
        grad_scale: LSQ's ``g`` (eq. 4); the gradient to ``alpha`` is multiplied by it.

    Returns:
        the fake-quantized tensor. Gradients: STE to ``x`` where ``quant_min < x/α < quant_max``,
        0 elsewhere; LSQ eq. 3 times ``g`` to ``alpha``. Values and gradients equal
        those of ``round_ste(clamp(x / a, quant_min, quant_max)) * a`` with
        ``a = scale_grad(alpha, grad_scale).to(x.dtype)`` (see ``_LSQFakeQuantize``).
    """
    return _LSQFakeQuantize.apply(x, alpha, quant_min, quant_max, grad_scale)[0]


class LSQQuantizer(nn.Module):
    """Fake quantizer with a learned step size α (LSQ, Esser et al. 2020, eq. 1-3).

    Forward: ``x̂ = clamp(round(x/α), quant_min, quant_max)·α``, shape and dtype of ``x`` (``num_bits >= 32``:
    the identity, no α). Gradients: STE to ``x`` where ``quant_min < x/α < quant_max``; LSQ eq. 3 times
    ``g = 1/sqrt(N·quant_max)`` to α (N: the weights, or the features of one sample for activations).
    α starts at ``2·mean|x|/sqrt(quant_max)`` (LSQ section 2.1; binary grid: ``mean|x|``) from the first
    usable input (``initialize_from``). ``channels=C``: one α per output channel, shape ``(C,)``.
    With a callable ``bin_stats_sink``, each training forward with gradients on also hands it the
    ``quant.bins.BinStats`` of its input (for BR; gradient to α only if ``bin_stats_grad_to_alpha``).
    ``input_relu``: quantizes ``relu(x)`` (a fused ReLU; ``pre_quantization``). ``init_reduce``: the
    global mean for the initialisation under torchrun. State: ``alpha``, ``initialized``, ``grid``.
    Rules (initialisation, state, per channel, fused ReLU): docs/design.md, "LSQ quantizer".

    Raises:
        ValueError: ``num_bits`` not in 1..8 and below 32; unknown ``grad_count``; bad ``channels``.
    """

    def __init__(self, num_bits: int, signed: bool, grad_count: str = "numel", channels: int | None = None):
        super().__init__()
        check_num_bits(num_bits)
        if grad_count not in ("numel", "per_sample"):
            raise ValueError(f"grad_count must be 'numel' or 'per_sample', got {grad_count!r}")
        if channels is not None and (grad_count != "numel" or channels < 1):
            raise ValueError(f"channels (one step size per output channel) needs grad_count='numel' (weights) "
                             f"and channels >= 1, got channels={channels!r}, grad_count={grad_count!r}")
        self.num_bits = num_bits
        self.signed = signed
        self.grad_count = grad_count
        self.channels = channels
        self.enabled = num_bits < FULL_PRECISION_BITS
        if self.enabled:
            self.quant_min, self.quant_max = integer_range(num_bits, signed)
            self.alpha = nn.Parameter(torch.ones(channels) if channels is not None else torch.tensor(1.0))
        else:
            self.quant_min = self.quant_max = None
            self.register_parameter("alpha", None)
        self.binary = self.enabled and is_binary(self.quant_min, self.quant_max)
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("grid", torch.tensor([num_bits, int(signed)]))
        # Python mirror of the buffer, so that forward never reads a device value.
        self._is_initialized = False
        self._warned_uninitialized = False
        self.input_relu = False
        self.bin_stats_sink = None
        self.bin_stats_grad_to_alpha = False
        self.init_reduce = None

    def extra_repr(self) -> str:
        if not self.enabled:
            return f"num_bits={self.num_bits} (identity)"
        relu = ", input_relu=True (fused ReLU)" if self.input_relu else ""
        channels = f", per channel ({self.channels})" if self.channels is not None else ""
        return (f"num_bits={self.num_bits}, signed={self.signed}, range=[{self.quant_min}, {self.quant_max}]"
                f"{channels}{relu}")

    def pre_quantization(self, x: torch.Tensor) -> torch.Tensor:
        """The real values this quantizer quantizes given its input ``x``: ``relu(x)`` with a fused
        ReLU (a new tensor), else ``x`` itself. Same shape as ``x``."""
        return torch.relu(x) if self.input_relu and self.enabled else x

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        grid = state_dict.get(prefix + "grid")
        if grid is not None:
            bits, signed = (int(v) for v in grid.tolist())
            if (bits, bool(signed)) != (self.num_bits, self.signed):
                # Checked before anything is copied: a refused state leaves the quantizer as it was.
                error_msgs.append(f"{prefix.rstrip('.') or 'LSQQuantizer'}: the state is of a "
                                  f"{describe_grid(bits, bool(signed))} quantizer, this one is "
                                  f"{describe_grid(self.num_bits, self.signed)}")
                return
        alpha = state_dict.get(prefix + "alpha")
        if alpha is not None and self.alpha is not None and alpha.shape != self.alpha.shape:
            def kind(shape):
                return f"per output channel ({shape[0]})" if len(shape) else "per tensor"
            error_msgs.append(f"{prefix.rstrip('.') or 'LSQQuantizer'}: the state has one step size "
                              f"{kind(alpha.shape)}, this quantizer one {kind(self.alpha.shape)} "
                              f"(--per-channel-weights makes one per output channel)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if grid is None and prefix + "grid" in missing_keys:  # a state saved before the grid was recorded
            missing_keys.remove(prefix + "grid")
        flag = state_dict.get(prefix + "initialized")
        if flag is not None:
            self._is_initialized = bool(flag)

    @torch.no_grad()
    def initialize_from(self, x: torch.Tensor) -> bool:
        """Set α = 2·mean(|x|)/sqrt(quant_max) in place (LSQ section 2.1; binary grid: mean(|x|), XNOR-Net
        eq. 4) and mark the quantizer initialised, if ``x`` is usable: not empty, finite, not all zeros (else
        it stays uninitialised and warns once). α is at least ``min_step_size`` of both dtypes. Per channel:
        α[c] from ``x[c]`` (a channel of zero magnitude takes the tensor-wide value). Reads one value to the host.

        Returns whether the quantizer is initialised now (True for a full-precision one).
        Raises ``ValueError`` per channel when ``x.shape[0]`` is not ``channels``.
        """
        if not self.enabled:
            return True
        if self.channels is not None and (x.dim() == 0 or x.shape[0] != self.channels):
            raise ValueError(f"LSQQuantizer ({self.extra_repr()}): expected a tensor with {self.channels} output "
                             f"channels in its first dimension, got shape {tuple(x.shape)}")

        def rule(mean_magnitude):
            # Binary grid: mean|x|, the scale minimising Σ(x - α·sign(x))² (Rastegari et al., XNOR-Net,
            # ECCV 2016, eq. 4). LSQ's rule would give 2·mean|x|, which puts both levels beyond most weights.
            return mean_magnitude if self.binary else 2 * mean_magnitude / math.sqrt(self.quant_max)

        magnitudes = x.detach().abs().float()
        if self.init_reduce is None:
            mean = magnitudes.mean()  # NaN when x is empty
        else:  # the mean over every process's input, the same on all of them (activations: never per channel)
            total, count = self.init_reduce(magnitudes.sum(), x.numel())
            mean = total / count
        value = rule(mean)
        magnitude = float(value)
        if not (math.isfinite(magnitude) and magnitude > 0):
            if not self._warned_uninitialized:
                self._warned_uninitialized = True
                reason = ("is empty" if x.numel() == 0 else "is all zeros" if magnitude == 0
                          else "holds NaN or inf values")
                warnings.warn(f"LSQQuantizer ({self.extra_repr()}): its first input {reason}, so its step size "
                              f"is not initialised from it; it quantizes with alpha = "
                              f"{float(self.alpha.detach().mean()):g}"
                              f"{' (mean over channels)' if self.channels else ''} "
                              f"until an input with finite values and a non-zero mean magnitude arrives",
                              RuntimeWarning, stacklevel=3)
            return False
        if self.channels is not None:  # each channel its own; one without magnitude the tensor's
            per_channel = rule(magnitudes.reshape(self.channels, -1).mean(1))
            value = torch.where(per_channel > 0, per_channel, value)
        floor = max(min_step_size(x.dtype), min_step_size(self.alpha.dtype))
        self.alpha.copy_(value.clamp(min=floor))
        self.initialized.fill_(True)
        self._is_initialized = True
        return True

    def grad_scale(self, x: torch.Tensor) -> float:
        """LSQ's gradient scale g = 1/sqrt(N · quant_max) for the input ``x`` (N: see the class docstring)."""
        per_slice = self.grad_count == "per_sample" or self.channels is not None  # N of one sample / channel
        n = x.numel() // max(x.shape[0], 1) if per_slice and x.dim() > 0 else x.numel()
        return 1.0 / math.sqrt(max(n, 1) * self.quant_max)

    def effective_step(self, x: torch.Tensor) -> torch.Tensor:
        """The step (detached, in α's dtype) that ``forward`` multiplies by for the input ``x`` (any
        tensor of its shape, a ``meta`` one too): ``effective_step(α, grad_scale(x))``, before the cast."""
        return effective_step(self.alpha.detach(), self.grad_scale(x))

    def set_step_size_trainable(self, trainable: bool) -> None:
        """Freeze (``False``) or unfreeze α. A frozen α has ``requires_grad=False`` and no gradient, so an
        optimiser skips it entirely (no momentum or decay step either): it stays bit-identical."""
        self.alpha.requires_grad_(trainable)
        if not trainable:
            self.alpha.grad = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self._is_initialized:
            self.initialize_from(self.pre_quantization(x))
        sink = self.bin_stats_sink if self.training and torch.is_grad_enabled() else None
        mode = None if sink is None else ("to_alpha" if self.bin_stats_grad_to_alpha else "detached")
        out, stats, abs_sum = _LSQFakeQuantize.apply(x, self.alpha, self.quant_min, self.quant_max,
                                                     self.grad_scale(x), mode, self.input_relu)
        if sink is not None:
            sink(BinStats(stats, abs_sum, x.numel(), self.alpha.detach(), self.quant_min))
        return out


# -- PTQ's step size (deploy/ptq.py), next to LSQ's initialisation (LSQQuantizer.initialize_from) --

#: Grid points over (0, 1.25·α_max] (α_max: the smallest step that clips nothing).
GRID_POINTS = 125
#: Golden-section iterations around the best grid point (the bracket shrinks by 0.618 each).
GOLDEN_ITERATIONS = 24


def quantization_mse(x: torch.Tensor, alphas, quant_min: int, quant_max: int) -> torch.Tensor:
    """``mean((clamp(round(x/α), Qn, Qp)·α - x)²)`` (``quant.grid.round_to_grid``: also the binary grid)
    of the 1-D tensor ``x`` for each step size in
    ``alphas`` (a float or a list), with ``x/α`` in the dtype of ``x`` (as the fake quantizer computes
    it) and the mean in float64. Returns a float64 tensor of shape ``(len(alphas),)`` (``()`` for a float)."""
    a = torch.tensor(alphas, dtype=x.dtype).reshape(-1, 1)
    total = torch.zeros(a.shape[0], dtype=torch.float64)
    for chunk in x.split(max(1, (1 << 21) // a.shape[0])):  # (candidates, chunk) at most 2M values at once
        err = round_to_grid(chunk / a, quant_min, quant_max).mul_(a).sub_(chunk)
        total += err.square_().sum(1, dtype=torch.float64)
    total /= max(x.numel(), 1)
    return total if isinstance(alphas, (list, tuple)) else total[0]


def mse_step_size(x: torch.Tensor, quant_min: int, quant_max: int) -> float:
    """The step size α minimising ``quantization_mse(x, α)`` for the grid ``[quant_min, quant_max]``.

    Candidates: LSQ's initial value ``2·mean|x|/sqrt(Qp)`` and ``GRID_POINTS`` steps evenly
    spaced over ``(0, 1.25·α_max]``, ``α_max = max(max(x)/Qp, min(x)/Qn)`` the smallest step that
    clips nothing; then ``GOLDEN_ITERATIONS`` of golden-section search between the best
    candidate's neighbours. The MSE is not unimodal in α (it jumps where values change level),
    so the refinement is kept only if it improves on the grid.

    Args:
        x: the values (any shape, float32 for the result to match the fake quantizer).
        quant_min, quant_max: the integer grid (``quant.integer_range``).

    Returns:
        α (> 0, at least ``MIN_STEP_SIZE``) as a Python float.
    """
    x = x.detach().reshape(-1)
    start = 2 * float(x.abs().float().mean()) / math.sqrt(quant_max)
    top = max(float(x.max()) / quant_max, float(x.min()) / quant_min if quant_min < 0 else 0.0)
    if not top > 0:  # all zero (or all on the side the grid does not cover): nothing to fit
        return max(start, MIN_STEP_SIZE)
    spacing = 1.25 * top / GRID_POINTS
    candidates = [spacing * k for k in range(1, GRID_POINTS + 1)] + ([start] if start > 0 else [])
    errors = quantization_mse(x, candidates, quant_min, quant_max).tolist()
    best = min(range(len(candidates)), key=errors.__getitem__)
    best_alpha, best_err = candidates[best], errors[best]
    lo, hi = max(best_alpha - spacing, spacing * 1e-3), best_alpha + spacing
    ratio = (math.sqrt(5) - 1) / 2
    c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fc, fd = quantization_mse(x, [c, d], quant_min, quant_max).tolist()
    for _ in range(GOLDEN_ITERATIONS):
        if fc <= fd:
            hi, d, fd = d, c, fc
            c = hi - ratio * (hi - lo)
            fc = float(quantization_mse(x, c, quant_min, quant_max))
        else:
            lo, c, fc = c, d, fd
            d = lo + ratio * (hi - lo)
            fd = float(quantization_mse(x, d, quant_min, quant_max))
    for alpha, err in ((c, fc), (d, fd)):
        if err < best_err:
            best_alpha, best_err = alpha, err
    return max(best_alpha, MIN_STEP_SIZE)


def step_size_quantizers(model: nn.Module) -> dict[str, LSQQuantizer]:
    """Return every enabled ``LSQQuantizer`` of ``model``, keyed by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LSQQuantizer) and m.enabled}


def keep_step_sizes_positive(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Project every α of ``model`` onto ``[min_step_size(α.dtype), inf)`` (``MIN_STEP_SIZE`` for
    float32 α) after each ``optimizer.step()``.

    LSQ's α is an ordinary parameter, so a large gradient can push it to zero or below,
    after which ``x / α`` flips or explodes (a known failure of public LSQ code). The
    projection runs as an optimiser step post-hook, so α is positive whenever it can be
    observed. A NaN α stays NaN, so that the training loop can report it.
    """
    alphas = [q.alpha for q in step_size_quantizers(model).values()]

    def project(_optimizer, _args, _kwargs):
        if alphas:
            floor = max(min_step_size(a.dtype) for a in alphas)  # the dtype at this step (after any .to())
            with torch.no_grad():
                torch._foreach_clamp_min_(alphas, floor)  # one launch for all step sizes

    optimizer.register_step_post_hook(project)
