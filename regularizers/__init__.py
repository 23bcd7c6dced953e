"""Bin Regularization (Han et al., ICCV 2021)."""

from regularizers.bin_reg import INFO_FIELDS, BinRegularizer, bin_regularization

__all__ = ["INFO_FIELDS", "BinRegularizer", "bin_regularization"]
from regularizers.bin_metrics import bin_indices, weight_bin_stats  # noqa: E402

__all__ += ["bin_indices", "weight_bin_stats"]
