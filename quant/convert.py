"""Convert a float CIFAR network into an LSQ fake-quantized one (Esser et al. 2020, section 3)."""

from __future__ import annotations

from torch import fx, nn

from quant.layers import QConv2d, QLinear, QuantAct, QuantizedLayer
from quant.grid import FULL_PRECISION_BITS, check_num_bits
from quant.lsq import LSQQuantizer

#: Where the activation quantizers sit (``--act-quant-at``). ``conv-input``: at the input of every
#: quantized conv and linear (LSQ's placement; an identity shortcut carries the float activation).
#: ``relu-output``: at the output of every activation (ReLU, clip, ReLU6), each block's output after
#: its residual add included, so that what flows between blocks is on the activation grid (the seed
#: authors' script; an integer accelerator runs the network so); a layer whose input is such an output
#: has no input quantizer of its own, the others (the first conv's image, the last linear's pooled
#: input) keep theirs.
ACT_QUANT_AT = ("conv-input", "relu-output")


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


def activation_outputs(model: nn.Module) -> list[str]:
    """The module names of what ``relu-output`` quantizes: every activation module (``nn.ReLU``,
    ``nn.Hardtanh``: the clip and ReLU6) and every block output a module lists in its
    ``quantized_outputs`` (attribute names of ``nn.Identity`` placeholders after a residual add that
    no activation follows: MobileNetV2's linear bottleneck), in module order."""
    names = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.ReLU or isinstance(child, nn.Hardtanh) or (
                    child_name in getattr(module, "quantized_outputs", ()) and isinstance(child, nn.Identity)):
                names.append(full)
    return names


def quantize_activation_outputs(model: nn.Module, act_bits: int) -> list[str]:
    """Replace each module of ``activation_outputs`` by a ``QuantAct`` of ``act_bits`` under the same
    name, in place (a ReLU is fused into its quantizer). Returns their names."""
    modules = dict(model.named_modules())
    names = activation_outputs(model)
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child_name, QuantAct.wrapping(modules[name], act_bits))
    return names


class _InputTracer(fx.Tracer):
    """Traces a network down to its layers and activation quantizers (their insides are not needed)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantAct, nn.Conv2d, nn.Linear)) or super().is_leaf_module(m, qualname)


def inputs_on_activation_grid(model: nn.Module) -> dict[str, str]:
    """Which conv / linear layers take as their whole input the output of an enabled ``QuantAct``:
    layer name -> that ``QuantAct``'s name (found by tracing ``model`` with ``torch.fx``). Such an
    input is on the activation grid already, so the layer needs no input quantizer.

    Raises:
        torch.fx's errors: a network ``torch.fx`` cannot trace (every network of ``models`` can).
    """
    graph = _InputTracer().trace(model)
    modules = dict(model.named_modules())
    found = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], (nn.Conv2d, nn.Linear)):
            continue
        source = node.args[0] if node.args else None
        if (isinstance(source, fx.Node) and source.op == "call_module" and isinstance(modules[source.target], QuantAct)
                and modules[source.target].act_quant.enabled):
            found[node.target] = source.target
    return found


def quantize_model(model: nn.Module, weight_bits: int, act_bits: int, first_last_bits: int = 8,
                   fuse_relu: bool = True, per_channel_weights: bool = False,
                   act_quant_at: str = "conv-input") -> nn.Module:
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

    ``act_quant_at="relu-output"`` (``ACT_QUANT_AT``) moves the activation quantizers: every
    activation (and every block output of a module's ``quantized_outputs``) becomes a ``QuantAct``
    of ``act_bits`` (``quantize_activation_outputs``, a ReLU fused into it), and each layer whose
    input is such an output (``inputs_on_activation_grid``) gets a 32-bit, disabled input quantizer;
    the other layers keep theirs (the first conv's image; the last linear's input, an average of grid
    values, which is not on the grid). With ``act_bits`` 32 both placements are the same network.

    Args:
        model: a float network; modified in place and returned.
        weight_bits, act_bits, first_last_bits: 1..8, or 32 for full precision (1 bit: ``quant.grid``).
        fuse_relu: fuse exclusive ReLUs into the following quantizer (default True).
        per_channel_weights: one weight step size per output channel in every quantized layer
            (the first and last included); activations keep one per tensor.
        act_quant_at: ``conv-input`` (default) or ``relu-output``.

    Returns:
        ``model``.

    Raises:
        ValueError: unsupported widths or ``act_quant_at``, or a network without conv/linear layers.
    """
    if act_quant_at not in ACT_QUANT_AT:
        raise ValueError(f"act_quant_at must be one of {', '.join(ACT_QUANT_AT)}, got {act_quant_at!r}")
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
    on_grid = {}
    if act_quant_at == "relu-output" and act_bits < FULL_PRECISION_BITS:
        quantize_activation_outputs(model, act_bits)
        on_grid = inputs_on_activation_grid(model)
    modules = dict(model.named_modules())
    signed_inputs = {first_name} | {f"{name}.{child}" if name else child for name, module in modules.items()
                                    for child in getattr(module, "signed_input_layers", ())}
    for name, layer in layers:
        is_edge = name in (first_name, last_name)
        if is_edge and first_last_bits >= FULL_PRECISION_BITS:
            continue
        w_bits, a_bits = (first_last_bits, first_last_bits) if is_edge else (weight_bits, act_bits)
        if name in on_grid:  # its input is a QuantAct's output, on the activation grid already
            a_bits = FULL_PRECISION_BITS
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


def activation_quantizers(model: nn.Module) -> dict[str, LSQQuantizer]:
    """Every enabled activation quantizer of ``model``, keyed by the module that holds it, in module
    order: a quantized layer's input quantizer (``<layer>.act_quant``, keyed ``<layer>``) and a
    ``QuantAct``'s (keyed by the ``QuantAct``'s name, that of the activation it replaced)."""
    return {name: m.act_quant for name, m in model.named_modules()
            if isinstance(m, (QuantizedLayer, QuantAct)) and m.act_quant.enabled}
