"""LSQ fake quantization: quantizer, quantized layers, model conversion."""

from quant.convert import ACT_QUANT_AT, activation_quantizers, quantize_model, quantized_layers
from quant.layers import QConv2d, QLinear, QuantAct, QuantizedLayer
from quant.grid import FULL_PRECISION_BITS, MIN_STEP_SIZE, check_num_bits, integer_range, min_step_size
from quant.lsq import LSQQuantizer, keep_step_sizes_positive, step_size_quantizers

__all__ = [
    "ACT_QUANT_AT", "FULL_PRECISION_BITS", "MIN_STEP_SIZE", "LSQQuantizer", "QConv2d", "QLinear", "QuantAct",
    "QuantizedLayer", "activation_quantizers",
    "check_num_bits", "integer_range", "keep_step_sizes_positive", "min_step_size", "quantize_model",
    "quantized_layers", "step_size_quantizers",
]
