"""LSQ fake quantizer (Esser et al., "Learned Step Size Quantization", ICLR 2020).

The quantizer maps a real tensor x to ``clamp(round(x / α), Qn, Qp) · α`` (LSQ eq. 1–2)
with a learned step size α per tensor. Gradients follow LSQ section 2.2: the
straight-through estimator (STE) for ``round`` and eq. 3, scaled by
``g = 1 / sqrt(N · Qp)``, for α.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: Smallest step size the optimiser may leave behind (see ``keep_step_sizes_positive``).
MIN_STEP_SIZE = 1e-8

#: ``num_bits`` at or above this value means "not quantized" (identity).
FULL_PRECISION_BITS = 32


def check_num_bits(num_bits: int, what: str = "num_bits") -> int:
    """Validate a bit width: an integer in 2..8, or >= 32 for full precision.

    Args:
        num_bits: the requested width.
        what: the name used in the error message (a flag name, for example).

    Returns:
        ``num_bits`` unchanged.

    Raises:
        ValueError: naming ``what`` and the value when it is not supported.
    """
    if isinstance(num_bits, bool) or not isinstance(num_bits, int):
        raise ValueError(f"{what} must be an integer (2-8, or 32 for full precision), got {num_bits!r}")
    if not (2 <= num_bits <= 8 or num_bits >= FULL_PRECISION_BITS):
        raise ValueError(f"{what} must be 2-8, or 32 for full precision, got {num_bits}")
    return num_bits


def integer_range(num_bits: int, signed: bool) -> tuple[int, int]:
    """Return ``(quant_min, quant_max)``, the integer range of a ``num_bits`` grid.

    Signed: ``[-2**(b-1), 2**(b-1) - 1]``; unsigned: ``[0, 2**b - 1]`` (LSQ section 2,
    where Qn = -quant_min and Qp = quant_max).

    Raises:
        ValueError: if ``num_bits`` is not 2..8 (full precision has no grid).
    """
    check_num_bits(num_bits)
    if num_bits >= FULL_PRECISION_BITS:
        raise ValueError(f"a {num_bits}-bit (full precision) tensor has no integer range")
    if signed:
        return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    return 0, 2**num_bits - 1


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


def _sum_of_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum()`` as a scalar of at least float32, with no temporary for float32/64 inputs."""
    if a.dtype in (torch.float32, torch.float64) and a.dtype == b.dtype and a.stride() == b.stride():
        return torch.dot(flat_view(a), flat_view(b))
    return (a * b).sum(dtype=torch.promote_types(a.dtype, torch.float32))


def bin_residuals(x: torch.Tensor, alpha: torch.Tensor, quant_min: int, quant_max: int,
                  index_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid level of every value and its distance to it, computed in at least float32.

    Args:
        x: any shape and float dtype. alpha: step size, shape ``()``.
        quant_min, quant_max: the integer range. index_dtype: dtype of the bin index.

    Returns:
        ``(d, index)``, both 1-D over ``flat_view(x)``: ``d = x - k·α`` with
        ``k = clamp(round(x/α), quant_min, quant_max)``, and ``index = k - quant_min``
        (also in range for NaN values, whose ``d`` is NaN).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf, af = flat_view(x.detach().to(dtype)), alpha.detach().to(dtype)
    k = (xf / af).round_().clamp_(quant_min, quant_max)
    index = (k - quant_min if quant_min else k).to(index_dtype).clamp_(0, quant_max - quant_min)
    return torch.addcmul(xf, k, af, value=-1, out=k), index  # d takes the memory of k


class _LSQFakeQuantize(torch.autograd.Function):
    """LSQ fake quantization of one tensor in a single autograd node (LSQ eq. 1-3).

    Computes what the plain autograd formulation ``round_ste(clamp(x / a, Qmin, Qmax)) * a``
    with ``a = scale_grad(alpha, g)`` computes (``plain_lsq`` in tests/test_lsq_fused.py, the reference),
    in fewer passes over ``x`` and with less saved memory:

    * forward: ``c = x/a`` (saved) and ``out = round(clamp(c, Qmin, Qmax)) · a``.
    * backward: ``∂L/∂x = ∂L/∂out`` where ``Qmin < c < Qmax`` (open interval, as
      ``torch.clamp``'s gradient and the LSQ paper), else 0 (straight-through estimator,
      one ``hardtanh_backward``), and LSQ eq. 3 times ``g`` for α:
      ``∂L/∂α = g · Σ ∂L/∂out · (round(c) - c)`` inside the range, ``Qmin`` / ``Qmax``
      outside, i.e. ``g · (Σ ∂L/∂out · out / a  -  Σ ∂L/∂x · c)``: two dot products.

    Saved for backward: ``c`` and ``out`` (the convolution saves ``out`` anyway). The plain
    formulation saves two further tensors of the size of ``x``. The two dot products
    cancel in part, so the α-gradient carries a relative rounding error of about 1e-5
    in float32 (the plain form about 1e-6): far below the noise of a mini-batch gradient.
    A NaN input gets the gradient ``∂L/∂out`` (the plain form gives 0); its output is NaN
    in both, so the loss and every gradient are NaN anyway.
    """

    @staticmethod
    def forward(ctx, x, alpha, quant_min, quant_max, grad_scale):
        # The value of scale_grad(alpha, g) is (α - αg) + αg, which is not always α to the
        # last bit; computing it the same way keeps the output bit-identical to the plain form.
        scaled = alpha * grad_scale
        a = ((alpha - scaled) + scaled).to(x.dtype)
        c = x / a
        out = torch.clamp(c, quant_min, quant_max).round_().mul_(a)
        ctx.save_for_backward(c, a, out)
        ctx.quant_range = (quant_min, quant_max)
        ctx.grad_scale, ctx.alpha_dtype = grad_scale, alpha.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        c, a, out = ctx.saved_tensors
        # hardtanh_backward(g, c, lo, hi) is g where lo < c < hi, else 0: the STE in one pass.
        grad_x = torch.ops.aten.hardtanh_backward(grad_out, c, *ctx.quant_range)
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            total = _sum_of_products(grad_out, out) / a - _sum_of_products(grad_x, c)
            grad_alpha = (total * ctx.grad_scale).to(ctx.alpha_dtype)
        return (grad_x if ctx.needs_input_grad[0] else None), grad_alpha, None, None, None


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
    return _LSQFakeQuantize.apply(x, alpha, quant_min, quant_max, grad_scale)


#: Inputs of activation quantizers in training (weak keys: an entry lives as long as its tensor).
_QUANTIZER_INPUTS = torch.utils.weak.WeakIdKeyDictionary()


def is_quantizer_input(x: torch.Tensor) -> bool:
    """Whether ``x`` went into an activation ``LSQQuantizer`` in training with gradients on.

    Such a tensor has a consumer in the graph besides any loss on it, so its gradient is
    never None when the backward pass reaches it (used by BR's deferred gradient).
    """
    return x in _QUANTIZER_INPUTS


class LSQQuantizer(nn.Module):
    """Fake quantizer with a learned step size α (LSQ, Esser et al. 2020, eq. 1–3).

    Forward: ``x̂ = clamp(round(x / α), quant_min, quant_max) · α`` for a tensor of any
    shape; the output has the shape and dtype of ``x``. With ``num_bits >= 32`` the
    quantizer is the identity and has no α.

    Gradients: to ``x``, 1 where ``quant_min < x/α < quant_max`` and 0 elsewhere (STE;
    the open interval, as in the paper and as ``torch.clamp``'s gradient);
    to α, LSQ eq. 3 (``round(x/α) - x/α`` inside, ``quant_min`` / ``quant_max`` at the
    clip points) times ``g = 1 / sqrt(N · quant_max)``. For weights N is the number of
    weights. For activations N is the number of features of one sample
    (``x[0].numel()``, i.e. C·H·W), the paper's "number of features": it does not
    change with the batch size, so the effective learning rate of α does not either.

    Initialisation (LSQ section 2.1): ``α = 2 · mean(|x|) / sqrt(quant_max)`` from the
    first tensor the quantizer sees (the weights, or the first training batch of
    activations). It is written in place and recorded in the ``initialized`` buffer,
    so a quantizer restored with ``load_state_dict`` is never re-initialised from data.

    Attributes:
        num_bits, signed, quant_min, quant_max: the integer grid.
        alpha: ``nn.Parameter`` of shape ``()``, in the units of ``x``; ``None`` when
            ``num_bits >= 32``.
        grad_count: ``"numel"`` (weights) or ``"per_sample"`` (activations): which N
            the gradient scale uses.

    Raises:
        ValueError: ``num_bits`` not in 2..8 and below 32; unknown ``grad_count``.
    """

    def __init__(self, num_bits: int, signed: bool, grad_count: str = "numel"):
        super().__init__()
        check_num_bits(num_bits)
        if grad_count not in ("numel", "per_sample"):
            raise ValueError(f"grad_count must be 'numel' or 'per_sample', got {grad_count!r}")
        self.num_bits = num_bits
        self.signed = signed
        self.grad_count = grad_count
        self.enabled = num_bits < FULL_PRECISION_BITS
        if self.enabled:
            self.quant_min, self.quant_max = integer_range(num_bits, signed)
            self.alpha = nn.Parameter(torch.tensor(1.0))
        else:
            self.quant_min = self.quant_max = None
            self.register_parameter("alpha", None)
        self.register_buffer("initialized", torch.tensor(False))
        # Python mirror of the buffer, so that forward never reads a device value.
        self._is_initialized = False

    def extra_repr(self) -> str:
        if not self.enabled:
            return f"num_bits={self.num_bits} (identity)"
        return f"num_bits={self.num_bits}, signed={self.signed}, range=[{self.quant_min}, {self.quant_max}]"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        flag = state_dict.get(prefix + "initialized")
        if flag is not None:
            self._is_initialized = bool(flag)

    @torch.no_grad()
    def initialize_from(self, x: torch.Tensor) -> None:
        """Set α = 2·mean(|x|)/sqrt(quant_max) in place and mark the quantizer initialised.

        Args:
            x: a tensor of any shape in the units of the values to quantize.
        """
        if not self.enabled:
            return
        value = 2 * x.detach().abs().float().mean() / math.sqrt(self.quant_max)
        self.alpha.copy_(value.clamp(min=MIN_STEP_SIZE))
        self.initialized.fill_(True)
        self._is_initialized = True

    def grad_scale(self, x: torch.Tensor) -> float:
        """LSQ's gradient scale g = 1/sqrt(N · quant_max) for the input ``x``."""
        n = x.numel() if self.grad_count == "numel" or x.dim() == 0 else x[0].numel()
        return 1.0 / math.sqrt(max(n, 1) * self.quant_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self._is_initialized:
            self.initialize_from(x)
        if self.grad_count == "per_sample" and x.requires_grad and not torch.compiler.is_compiling():
            _QUANTIZER_INPUTS[x] = True
        return _LSQFakeQuantize.apply(x, self.alpha, self.quant_min, self.quant_max, self.grad_scale(x))


def step_size_quantizers(model: nn.Module) -> dict[str, LSQQuantizer]:
    """Return every enabled ``LSQQuantizer`` of ``model``, keyed by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LSQQuantizer) and m.enabled}


def keep_step_sizes_positive(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Project every α of ``model`` onto ``[MIN_STEP_SIZE, inf)`` after each ``optimizer.step()``.

    LSQ's α is an ordinary parameter, so a large gradient can push it to zero or below,
    after which ``x / α`` flips or explodes (a known failure of public LSQ code). The
    projection runs as an optimiser step post-hook, so α is positive whenever it can be
    observed. A NaN α stays NaN, so that the training loop can report it.
    """
    alphas = [q.alpha for q in step_size_quantizers(model).values()]

    def project(_optimizer, _args, _kwargs):
        if alphas:
            with torch.no_grad():
                torch._foreach_clamp_min_(alphas, MIN_STEP_SIZE)  # one launch for all step sizes

    optimizer.register_step_post_hook(project)
