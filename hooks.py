"""Forward hooks for Bin Regularization: the bin statistics that LSQ quantizers compute in their own pass.

``BinStatsCollector`` takes them from given quantizers (W-BR: the weight quantizers);
``ActivationHookManager`` from a model's activation quantizers (A-BR, this project's extension of
Han et al., ICCV 2021, to the pre-quantization activations), dropping them at each new forward pass.
BR's loss is computed from them (``BinRegularizer.total_from_stats``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

from torch import nn

from quant.bins import BinStats
from quant.convert import activation_quantizers
from quant.lsq import LSQQuantizer


class BinStatsCollector:
    """Collect the bin statistics that LSQ quantizers compute in their own forward pass (for BR).

    While enabled, each quantizer hands its ``quant.bins.BinStats`` here (``LSQQuantizer.bin_stats_sink``)
    whenever it runs in training mode with gradients on; ``get()`` returns the latest by name. Disabled or
    removed, the quantizers compute none. A quantizer has one statistics slot: a second live collector
    for it is refused (``RuntimeError``) until ``remove()``.

    Args:
        quantizers: name -> enabled ``LSQQuantizer``.
        grad_to_alpha: whether the statistics carry gradient to each quantizer's own α (always to its input).
    """

    def __init__(self, quantizers: dict[str, LSQQuantizer], grad_to_alpha: bool):
        taken = [name for name, q in quantizers.items() if _owner(q) is not None]
        if taken:
            raise RuntimeError(f"bin statistics of {', '.join(taken)} are already collected by another "
                               f"BinStatsCollector or ActivationHookManager (a quantizer has one statistics "
                               f"slot); call remove() on that one first")
        for quantizer in quantizers.values():
            _OWNERS[quantizer] = weakref.ref(self)
        self._quantizers = dict(quantizers)
        self._stats: dict[str, BinStats] = {}
        self._sinks = {name: self._make_sink(name) for name in self._quantizers}
        for quantizer in self._quantizers.values():
            quantizer.bin_stats_grad_to_alpha = grad_to_alpha
        self._enabled = None
        self.enabled = True

    @property
    def enabled(self) -> bool:
        """Whether the quantizers compute and hand over statistics."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if bool(value) == self._enabled:  # set every training step: nothing to do most of the time
            return
        self._enabled = bool(value)
        for name, quantizer in self._quantizers.items():
            quantizer.bin_stats_sink = self._sinks[name] if self._enabled else None

    def _make_sink(self, name: str):
        def sink(stats: BinStats) -> None:
            self._stats[name] = stats
        return sink

    def get(self) -> dict[str, BinStats]:
        """The statistics of each quantizer's latest forward pass: name -> ``BinStats``."""
        return dict(self._stats)

    def clear(self) -> None:
        """Drop the statistics (and with them the references into the autograd graph)."""
        self._stats.clear()

    def remove(self) -> None:
        """Stop the quantizers computing statistics, drop the collected ones and free the quantizers."""
        self.enabled = False
        self.clear()
        for quantizer in self._quantizers.values():
            if _owner(quantizer) is self:
                del _OWNERS[quantizer]


#: quantizer -> weak reference to the collector that holds its statistics slot.
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _owner(quantizer: LSQQuantizer) -> BinStatsCollector | None:
    """The live collector that holds ``quantizer``'s statistics slot, or None."""
    ref = _OWNERS.get(quantizer)
    return ref() if ref is not None else None


class ActivationHookManager:
    """The bin statistics of a model's activation quantizers (``quant.activation_quantizers``: a layer's
    input quantizer, or a ``QuantAct``'s), keyed by the module that holds each (``<name>.act_quant.alpha``).

    A ``BinStatsCollector`` of those quantizers whose statistics a new forward pass of the model drops,
    so that nothing is kept from one step to the next even if ``clear()`` is forgotten.

    Args:
        model: the network.
        layer_names: holders of the quantizers to watch (default: every enabled activation quantizer).
        bin_stats_grad_to_alpha: whether the statistics carry gradient to each quantizer's own α
            (``--br-backprop-to-alpha-act``); they always carry it to the input.

    Raises:
        KeyError: a name that holds no enabled activation quantizer of ``model``.
        RuntimeError: another live collector watches one of these quantizers; ``remove()`` it first.

    Use as a context manager, or call ``remove()``.
    """

    def __init__(self, model: nn.Module, layer_names: Iterable[str] | None = None,
                 bin_stats_grad_to_alpha: bool = False):
        available = activation_quantizers(model)
        names = list(available) if layer_names is None else list(layer_names)
        unknown = [n for n in names if n not in available]
        if unknown:
            raise KeyError(f"ActivationHookManager: not quantized layers or QuantAct modules with an enabled "
                           f"activation quantizer: {unknown}")
        self._quantizers = {name: available[name] for name in names}
        self._bin_stats = BinStatsCollector(self._quantizers, bin_stats_grad_to_alpha)
        self._handles = [model.register_forward_pre_hook(lambda _m, _a: self.clear())]

    @property
    def enabled(self) -> bool:
        """Whether the quantizers compute and hand over statistics; False once removed."""
        return self._bin_stats.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._bin_stats.enabled = bool(value) and bool(self._handles)

    def get_bin_stats(self) -> dict[str, BinStats]:
        """The bin statistics of the latest forward pass: layer name -> ``BinStats`` of its input."""
        return self._bin_stats.get()

    def clear(self) -> None:
        """Drop the statistics (and with them the references into the autograd graph)."""
        self._bin_stats.clear()

    def remove(self) -> None:
        """Detach the hooks, stop the bin statistics and drop them."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._bin_stats.remove()
        self.clear()

    def __enter__(self) -> "ActivationHookManager":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
