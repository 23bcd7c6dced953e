"""LSQ fake quantization: quantizer, quantized layers, model conversion."""

from quant.convert import quantize_model, quantized_layers
from quant.layers import QConv2d, QLinear, QuantizedLayer
from quant.lsq import (FULL_PRECISION_BITS, MIN_STEP_SIZE, LSQQuantizer, check_num_bits, min_step_size,
                       integer_range, keep_step_sizes_positive, step_size_quantizers)

__all__ = [
    "FULL_PRECISION_BITS", "MIN_STEP_SIZE", "LSQQuantizer", "QConv2d", "QLinear", "QuantizedLayer",
    "check_num_bits", "integer_range", "keep_step_sizes_positive", "min_step_size", "quantize_model",
    "quantized_layers", "step_size_quantizers",
]
