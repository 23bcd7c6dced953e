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


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Return ``x`` in the forward pass; multiply its gradient by ``scale`` (LSQ eq. 4's g)."""
    scaled = x * scale
    return (x - scaled).detach() + scaled


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest in the forward pass, identity gradient (straight-through estimator)."""
    return (x.round() - x).detach() + x


class LSQQuantizer(nn.Module):
    """Fake quantizer with a learned step size α (LSQ, Esser et al. 2020, eq. 1–3).

    Forward: ``x̂ = clamp(round(x / α), quant_min, quant_max) · α`` for a tensor of any
    shape; the output has the shape and dtype of ``x``. With ``num_bits >= 32`` the
    quantizer is the identity and has no α.

    Gradients: to ``x``, 1 where ``quant_min <= x/α <= quant_max`` and 0 outside (STE);
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
        alpha = scale_grad(self.alpha, self.grad_scale(x)).to(x.dtype)
        return round_ste(torch.clamp(x / alpha, self.quant_min, self.quant_max)) * alpha


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
        with torch.no_grad():
            for alpha in alphas:
                alpha.clamp_(min=MIN_STEP_SIZE)

    optimizer.register_step_post_hook(project)
