"""Quantized drop-in replacements for ``nn.Conv2d`` and ``nn.Linear`` (LSQ, Esser et al. 2020).

LSQ quantizes the weights and the input of every matrix-multiply layer; the layers
here hold one ``LSQQuantizer`` for each: ``weight_quant`` (signed) and ``act_quant``
(unsigned for non-negative inputs, signed otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quant.lsq import LSQQuantizer


class QuantizedLayer:
    """Mixin for layers with ``weight_quant`` and ``act_quant`` quantizers.

    Attributes:
        weight_quant: signed ``LSQQuantizer`` for the weight (N = number of weights); with
            ``per_channel_weights`` one α per output channel (N = weights per channel).
        act_quant: ``LSQQuantizer`` for the layer input (N = features per sample).
        is_first_or_last: True for the network's first conv and last linear, which
            stay at ``first_last_bits`` and are not bin-regularised.
    """

    def _init_quantizers(self, weight_bits: int, act_bits: int, act_signed: bool, per_channel_weights: bool) -> None:
        channels = self.weight.shape[0] if per_channel_weights else None  # the output channels
        self.weight_quant = LSQQuantizer(weight_bits, signed=True, grad_count="numel", channels=channels)
        self.act_quant = LSQQuantizer(act_bits, signed=act_signed, grad_count="per_sample")
        self.is_first_or_last = False

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight, same shape as ``self.weight``."""
        return self.weight_quant(self.weight)


class QConv2d(nn.Conv2d, QuantizedLayer):
    """``nn.Conv2d`` whose weight and input are fake-quantized with LSQ.

    Input ``(N, C_in, H, W)``, output ``(N, C_out, H', W')`` exactly as ``nn.Conv2d``.

    Args:
        weight_bits, act_bits: 1..8 (1-bit weights are binary, ``quant.grid``), or >= 32 to leave
            that tensor in float.
        act_signed: whether the input can be negative (the first layer's image input).
        per_channel_weights: one weight step size per output channel (``LSQQuantizer(channels=...)``).
        Remaining arguments: as ``nn.Conv2d``.

    Raises:
        ValueError: unsupported bit widths (see ``LSQQuantizer``).
    """

    def __init__(self, in_channels, out_channels, kernel_size, *args,
                 weight_bits: int = 2, act_bits: int = 2, act_signed: bool = False,
                 per_channel_weights: bool = False, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, *args, **kwargs)
        self._init_quantizers(weight_bits, act_bits, act_signed, per_channel_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act_quant(x), self.quantized_weight(), self.bias)


class QLinear(nn.Linear, QuantizedLayer):
    """``nn.Linear`` whose weight and input are fake-quantized with LSQ.

    Input ``(N, in_features)``, output ``(N, out_features)`` exactly as ``nn.Linear``.

    Args:
        weight_bits, act_bits, act_signed, per_channel_weights: as ``QConv2d``.
        Remaining arguments: as ``nn.Linear``.

    Raises:
        ValueError: unsupported bit widths (see ``LSQQuantizer``).
    """

    def __init__(self, in_features, out_features, bias: bool = True, *,
                 weight_bits: int = 2, act_bits: int = 2, act_signed: bool = False,
                 per_channel_weights: bool = False, **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        self._init_quantizers(weight_bits, act_bits, act_signed, per_channel_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act_quant(x), self.quantized_weight(), self.bias)


class QuantAct(nn.Module):
    """An activation followed by its own LSQ quantizer: ``act_quant(activation(x))``
    (``--act-quant-at relu-output``, ``quant.convert.quantize_activation_outputs``).

    It takes the place of an activation module (``nn.ReLU``, ``nn.Hardtanh``: the clip and ReLU6)
    or of a block's output (``nn.Identity``, MobileNetV2's linear bottleneck after its residual
    add), under the same module name, so that the tensor it hands on, to the next layer and to
    any residual add, is on the activation grid ``α·[Qn, Qp]``. A ReLU is fused into the quantizer
    (``activation`` is then ``nn.Identity`` and ``act_quant.input_relu`` is set: the same values and
    gradients, one pass fewer; ``quant.convert.fuse_relus``).

    Input and output: any shape, the output the shape of the input.

    Attributes:
        activation: the activation module, or ``nn.Identity`` (a fused ReLU, a block output).
        act_quant: ``LSQQuantizer`` (N of the gradient scale: the features of one sample, as a layer's
            input quantizer); unsigned after a ReLU or a clip to ``[0, c]``, signed for a block output
            that can be negative.
    """

    def __init__(self, activation: nn.Module, num_bits: int, signed: bool):
        super().__init__()
        self.activation = activation
        self.act_quant = LSQQuantizer(num_bits, signed=signed, grad_count="per_sample")

    @classmethod
    def wrapping(cls, module: nn.Module, num_bits: int) -> "QuantAct":
        """The ``QuantAct`` that takes the place of ``module``: an ``nn.ReLU`` (fused into the
        quantizer), an ``nn.Hardtanh`` with ``min_val >= 0`` (unsigned grid), or an ``nn.Identity``
        block output (signed grid).

        Raises:
            ValueError: any other module.
        """
        if type(module) is nn.ReLU:
            new = cls(nn.Identity(), num_bits, signed=False)
            new.act_quant.input_relu = True
            return new
        if isinstance(module, nn.Hardtanh) and module.min_val >= 0:
            return cls(module, num_bits, signed=False)
        if isinstance(module, nn.Identity):
            return cls(module, num_bits, signed=True)
        raise ValueError(f"QuantAct: no activation grid for {type(module).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_quant(self.activation(x))
