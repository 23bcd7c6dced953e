"""The capture half of the A-BR hooks, which only tests use: an ``ActivationHookManager`` that also
records the input of each watched quantizer (with its autograd history), to hold A-BR from the
quantizers' own statistics against the eager BR of the captured tensors."""

from __future__ import annotations

import torch
from torch import nn

import hooks


class CapturingHookManager(hooks.ActivationHookManager):
    """``hooks.ActivationHookManager`` plus ``get_pre_quant_activations``.

    Each capture is the tensor the quantizer receives (not a copy), recorded only while enabled, in
    training mode and with gradients on; a new forward pass of the model drops the previous ones.
    """

    def __init__(self, model: nn.Module, *args, **kwargs):
        self._captured: dict[str, torch.Tensor] = {}
        super().__init__(model, *args, **kwargs)
        for name, quantizer in self._quantizers.items():
            self._handles.append(quantizer.register_forward_pre_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            if self.enabled and module.training and torch.is_grad_enabled():
                self._captured[name] = inputs[0]
        return hook

    def get_pre_quant_activations(self) -> dict[str, torch.Tensor]:
        """The captures of the latest forward pass: layer name -> pre-quantization activation
        (with autograd history; a new tensor where the quantizer has a fused ReLU)."""
        return {name: self._quantizers[name].pre_quantization(x) for name, x in self._captured.items()}

    def clear(self) -> None:
        """Drop every capture and the statistics."""
        self._captured.clear()
        super().clear()
