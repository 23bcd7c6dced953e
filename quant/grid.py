"""The integer grids of the LSQ quantizers (Esser et al., ICLR 2020, eq. 1), the 1-bit binary grid included,
and the helpers on bit widths and step sizes.

A grid is its integer range ``(quant_min, quant_max)`` (``integer_range``): levels ``quant_min .. quant_max``,
``c = x/α`` goes to ``clamp(round(c), quant_min, quant_max)`` (round half to even). The 1-bit signed grid is
binary: ``BINARY_RANGE = (-1, 1)``, levels ``-1`` and ``+1`` (spacing 2), ``+1`` for ``c >= 0``
(docs/design.md, "1 bit").
"""

from __future__ import annotations

import torch

#: The integer range of the 1-bit signed (binary) grid: levels -1 and +1 only.
BINARY_RANGE = (-1, 1)


def is_binary(quant_min: int, quant_max: int) -> bool:
    """Whether ``[quant_min, quant_max]`` is the binary grid (levels ``-1, +1``, spacing 2)."""
    return (quant_min, quant_max) == BINARY_RANGE


def level_spacing(quant_min: int, quant_max: int) -> int:
    """Distance between neighbouring levels, in steps: 2 on the binary grid, else 1."""
    return 2 if is_binary(quant_min, quant_max) else 1


def num_levels(quant_min: int, quant_max: int) -> int:
    """Number of levels (= bins of Bin Regularization): ``(quant_max - quant_min) / spacing + 1``."""
    return (quant_max - quant_min) // level_spacing(quant_min, quant_max) + 1


def round_to_grid(c: torch.Tensor, quant_min: int, quant_max: int) -> torch.Tensor:
    """The level of each value ``c = x/α`` (a new tensor, dtype and shape of ``c``; no gradient).

    LSQ grids: ``clamp(round(c), quant_min, quant_max)`` (round half to even, LSQ eq. 1). Binary grid:
    ``+1`` where ``c >= 0``, ``-1`` where ``c < 0``, NaN where ``c`` is NaN.
    """
    clamped = torch.clamp(c, quant_min, quant_max)
    if is_binary(quant_min, quant_max):
        return torch.where(clamped < 0, -1.0, torch.where(clamped >= 0, 1.0, clamped))
    return clamped.round_()


def per_channel_view(step: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A step size of shape ``()``, or ``(C,)`` (one per output channel), shaped to broadcast over
    ``like`` (first dimension C): ``()`` or ``(C, 1, ..., 1)``."""
    return step.view(-1, *[1] * (like.dim() - 1)) if step.dim() > 0 else step


def grid_levels(quant_min: int, quant_max: int, **tensor_kwargs) -> torch.Tensor:
    """The levels of the grid, lowest first, shape ``(num_levels,)``: bin ``j`` holds level ``[j]``."""
    return torch.arange(quant_min, quant_max + 1, level_spacing(quant_min, quant_max), **tensor_kwargs)


#: Smallest step size the optimiser may leave behind (see ``keep_step_sizes_positive``); in
#: float16 the floor is higher (``min_step_size``).
MIN_STEP_SIZE = 1e-8

#: ``num_bits`` at or above this value means "not quantized" (identity).
FULL_PRECISION_BITS = 32


def check_num_bits(num_bits: int, what: str = "num_bits") -> int:
    """Validate a bit width: an integer in 1..8, or >= 32 for full precision.

    Args:
        num_bits: the requested width.
        what: the name used in the error message (a flag name, for example).

    Returns:
        ``num_bits`` unchanged.

    Raises:
        ValueError: naming ``what`` and the value when it is not supported.
    """
    if isinstance(num_bits, bool) or not isinstance(num_bits, int):
        raise ValueError(f"{what} must be an integer (1-8, or 32 for full precision), got {num_bits!r}")
    if not (1 <= num_bits <= 8 or num_bits >= FULL_PRECISION_BITS):
        raise ValueError(f"{what} must be 1-8, or 32 for full precision, got {num_bits}")
    return num_bits


def integer_range(num_bits: int, signed: bool) -> tuple[int, int]:
    """Return ``(quant_min, quant_max)``, the integer range of a ``num_bits`` grid.

    Signed: ``[-2**(b-1), 2**(b-1) - 1]``; unsigned: ``[0, 2**b - 1]`` (LSQ section 2,
    where Qn = -quant_min and Qp = quant_max). One bit signed is the binary grid
    ``BINARY_RANGE = (-1, 1)``: levels -1 and +1 only (see ``quant.grid``); one bit
    unsigned is ``[0, 1]``.

    Raises:
        ValueError: if ``num_bits`` is not 1..8 (full precision has no grid).
    """
    check_num_bits(num_bits)
    if num_bits >= FULL_PRECISION_BITS:
        raise ValueError(f"a {num_bits}-bit (full precision) tensor has no integer range")
    if signed and num_bits == 1:
        return BINARY_RANGE
    if signed:
        return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    return 0, 2**num_bits - 1


def min_step_size(dtype: torch.dtype) -> float:
    """The smallest usable step size α for tensors of ``dtype``.

    ``MIN_STEP_SIZE``, or the dtype's smallest normal number where that is larger (float16:
    6.1e-5; float32, float64 and bfloat16 have 1e-8 as a normal number). With α at or above it,
    α is not 0 in ``dtype`` (``x / α`` never divides by zero, ``0 / α`` is never NaN) and
    every level ``k·α`` with ``k != 0`` is a normal number (the output does not underflow).
    """
    return max(MIN_STEP_SIZE, torch.finfo(dtype).tiny)


def describe_grid(num_bits: int, signed: bool) -> str:
    """``"2-bit signed [-2, 1]"``: a quantizer's integer grid in words (for messages);
    ``"1-bit binary {-1, +1}"`` for the binary grid."""
    if num_bits >= FULL_PRECISION_BITS:
        return f"{num_bits}-bit (full precision, no grid)"
    quant_min, quant_max = integer_range(num_bits, signed)
    if is_binary(quant_min, quant_max):
        return f"{num_bits}-bit binary {{-1, +1}}"
    return f"{num_bits}-bit {'signed' if signed else 'unsigned'} [{quant_min}, {quant_max}]"
