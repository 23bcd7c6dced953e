"""Convert a float CIFAR network into an LSQ fake-quantized one (Esser et al. 2020, section 3)."""

from __future__ import annotations

from torch import nn

from quant.layers import QConv2d, QLinear, QuantizedLayer
from quant.lsq import FULL_PRECISION_BITS, check_num_bits


def _quantized_copy(layer: nn.Module, weight_bits: int, act_bits: int, act_signed: bool,
                    per_channel_weights: bool) -> nn.Module:
    kwargs = dict(weight_bits=weight_bits, act_bits=act_bits, act_signed=act_signed,
                  per_channel_weights=per_channel_weights,
                  device=layer.weight.device, dtype=layer.weight.dtype)
    if isinstance(layer, nn.Conv2d):
        new = QConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                      layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                      layer.padding_mode, **kwargs)
    else:
        new = QLinear(layer.in_features, layer.out_features, layer.bias is not None, **kwargs)
    new.load_state_dict(layer.state_dict(), strict=False)  # weights and bias; quantizers stay fresh
    new.train(layer.training)
    return new


def fuse_relus(model: nn.Module) -> list[str]:
    """Fuse each ReLU that feeds only a quantized layer into that layer's input quantizer, in place.

    A module declares such pairs in ``exclusive_activations`` (attribute names
    ``(activation, layer)``, e.g. ``models.resnet.BasicBlock``). Where the activation is
    exactly ``nn.ReLU`` and the layer's ``act_quant`` is enabled and unsigned, the ReLU is
    replaced by ``nn.Identity`` and ``act_quant.input_relu`` set: the quantizer then applies
    the ReLU itself, in the same pass as the quantization (``quant.lsq.LSQQuantizer``), with
    the same values and gradients. Other activations (``nn.Hardtanh``) are left alone.

    Returns:
        the module names of the fused ReLUs.
    """
    fused = []
    for name, module in model.named_modules():
        for act_name, layer_name in getattr(module, "exclusive_activations", ()):
            act, layer = getattr(module, act_name), getattr(module, layer_name)
            if (type(act) is nn.ReLU and isinstance(layer, QuantizedLayer) and layer.act_quant.enabled
                    and not layer.act_quant.signed):
                setattr(module, act_name, nn.Identity())
                layer.act_quant.input_relu = True
                fused.append(f"{name}.{act_name}" if name else act_name)
    return fused


def quantize_model(model: nn.Module, weight_bits: int, act_bits: int, first_last_bits: int = 8,
                   fuse_relu: bool = True, per_channel_weights: bool = False) -> nn.Module:
    """Replace every ``nn.Conv2d`` / ``nn.Linear`` of ``model`` by ``QConv2d`` / ``QLinear``, in place.

    Trained weights and biases are kept. The first conv and the last linear (in module
    order) are quantized at ``first_last_bits`` for both weight and input, as in LSQ;
    every other layer at ``weight_bits`` / ``act_bits``. The first layer's input (the
    normalised image) is quantized signed; every other input unsigned, which assumes
    it is non-negative (after ReLU, or average pooling of ReLU outputs), as in the
    CIFAR ResNets of ``models``, except where a module lists the layer in its
    ``signed_input_layers`` (attribute names of child layers whose input can be negative,
    e.g. the layers after a linear bottleneck in ``models.mobilenetv2``): those get a
    signed input quantizer too. A width of 32 keeps that tensor in float; a network
    with every width at 32 is returned unchanged.

    The quantizers are named ``<layer>.weight_quant`` and ``<layer>.act_quant``, where
    ``<layer>`` is the layer's module name, so weight α, activation α and captured
    activations all match by ``<layer>``.

    With ``fuse_relu``, ReLUs that feed only a quantized layer are then fused into its
    input quantizer (``fuse_relus``): the same function, one pass fewer each way.

    Args:
        model: a float network; modified in place and returned.
        weight_bits, act_bits, first_last_bits: 1..8, or 32 for full precision (1 bit: ``quant.grid``).
        fuse_relu: fuse exclusive ReLUs into the following quantizer (default True).
        per_channel_weights: one weight step size per output channel in every quantized layer
            (the first and last included); activations keep one per tensor.

    Returns:
        ``model``.

    Raises:
        ValueError: unsupported widths, or a network without conv/linear layers.
    """
    check_num_bits(weight_bits, "weight_bits")
    check_num_bits(act_bits, "act_bits")
    check_num_bits(first_last_bits, "first_last_bits")
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, QuantizedLayer)]
    if not layers:
        raise ValueError("quantize_model: the model has no nn.Conv2d or nn.Linear layer to quantize")
    if min(weight_bits, act_bits, first_last_bits) >= FULL_PRECISION_BITS:
        return model
    first_name, last_name = layers[0][0], layers[-1][0]
    modules = dict(model.named_modules())
    signed_inputs = {first_name} | {f"{name}.{child}" if name else child for name, module in modules.items()
                                    for child in getattr(module, "signed_input_layers", ())}
    for name, layer in layers:
        is_edge = name in (first_name, last_name)
        if is_edge and first_last_bits >= FULL_PRECISION_BITS:
            continue
        w_bits, a_bits = (first_last_bits, first_last_bits) if is_edge else (weight_bits, act_bits)
        new = _quantized_copy(layer, w_bits, a_bits, act_signed=name in signed_inputs,
                              per_channel_weights=per_channel_weights)
        new.is_first_or_last = is_edge
        parent_name, _, child_name = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child_name, new)
    if fuse_relu:
        fuse_relus(model)
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """Every ``QConv2d`` / ``QLinear`` of ``model``, keyed by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}
