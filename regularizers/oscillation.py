"""Weight oscillations in QAT: tracking, dampening and iterative freezing.

Nagel, Fournarakis, Bondarenko, Blankevoort, "Overcoming Oscillations in Quantization-Aware
Training", ICML 2022 (its "oscillation dampening" and "iterative weight freezing"; public code
Qualcomm-AI-research/oscillations-qat: ``utils/qat_utils.py`` ``dampening_loss``,
``utils/oscillation_tracking_utils.py`` ``TrackOscillation``).
Written here from the paper and that description, not copied.

* **Oscillation**: per weight, the change Δ of its integer code between two training
  steps; an oscillation is a non-zero Δ whose sign is opposite to that of the last non-zero Δ (steps
  without a change are skipped; the first change never counts). On the binary grid (1 bit, levels
  -1 and +1, ``quant.grid``) every change is ±2 and the sign can only alternate, so every change
  but the first is an oscillation.
* **Dampening** (``dampening_loss``): ``Σ_tensors agg((sg(q(w)) - clip(w, Qmin·α, Qmax·α))²)``, pulling each
  latent weight towards the level it is quantized to.
* **Iterative freezing** (``TrackOscillation``): exponential moving averages of "oscillated" and of the code;
  a weight whose oscillation average passes the threshold is frozen for good at the rounded average
  of its code.

In this tool they act on the **low-bit** weights only (every quantized layer but the first conv and
the last linear, as BR): the paper's code also dampens the 8-bit first/last layers, whose fine grid
oscillates much more often for much less error; its freezing skips them too (only weights of at most
4 bits). Tracking runs on training steps only (after each optimiser step), never on evaluation passes,
and its state is in every checkpoint.
"""

from __future__ import annotations

import math

import torch

from quant.grid import per_channel_view, round_to_grid

#: ``--dampen-aggregation`` choices: how one tensor's squared distances become one number.
AGGREGATIONS = ("kernel_mean", "sum", "mean")


def cosine_ramp(progress: float, start: float, final: float) -> float:
    """``final + (start - final)·(1 + cos(π·progress))/2``: ``start`` at progress 0, ``final`` at 1.

    The schedule of λ_d (start 0) and of the freezing threshold over stage 2 (the paper's
    ``CosineTempDecay`` after its first 25 %; here progress = stage-2 steps done / stage-2 steps).
    """
    return final + (start - final) * (1.0 + math.cos(math.pi * progress)) / 2.0


def integer_codes(w: torch.Tensor, alpha: torch.Tensor, quant_min: int, quant_max: int) -> torch.Tensor:
    """The integer code of each weight, ``round_to_grid(w/α)`` (``quant.grid``), int8, shape of ``w``.

    ``alpha``: ``()`` or ``(C,)`` (one per output channel, ``w.shape[0] == C``)."""
    with torch.no_grad():
        step = per_channel_view(alpha.detach().to(w.dtype), w)
        return round_to_grid(w.detach() / step, quant_min, quant_max).to(torch.int8)


def dampening_loss(w: torch.Tensor, alpha: torch.Tensor, quant_min: int, quant_max: int,
                   aggregation: str = "kernel_mean") -> torch.Tensor:
    """Oscillation dampening of one weight tensor (Nagel et al. 2022, "oscillation dampening"), a scalar
    (float32 or float64).

    ``d = (sg(q(w)) - clip(w, quant_min·α, quant_max·α))²`` elementwise, with ``q(w) = round_to_grid(w/α)·α``
    (gradient stopped) and α detached (the clip keeps the term off the step size: no gradient to α).
    Aggregated as ``kernel_mean`` (sum over output channels of the mean over the rest:
    ``Σ_c mean(d[c])``; the paper code's default), ``sum`` or ``mean``. The gradient to ``w`` is
    ``-2·(q(w) - w)`` times the aggregation's weight inside the clip range, 0 outside.

    Args:
        w: weight, shape ``(C, ...)``. alpha: ``()`` or ``(C,)``.
        quant_min, quant_max: the integer range (binary grid ``(-1, 1)``: levels ±α).

    Raises:
        ValueError: an unknown ``aggregation``.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    dtype = torch.promote_types(w.dtype, torch.float32)  # bf16/fp16 weights: the loss in float32
    step = per_channel_view(alpha.detach().to(dtype), w)
    wf = w.to(dtype)
    q = round_to_grid(wf.detach() / step, quant_min, quant_max) * step
    clipped = torch.minimum(torch.maximum(wf, quant_min * step), quant_max * step)
    d = (q - clipped) ** 2
    if aggregation == "kernel_mean":
        return d.reshape(d.shape[0], -1).mean(1).sum()
    return d.sum() if aggregation == "sum" else d.mean()


class OscillationState:
    """Oscillation tracking and freezing of one tensor of integer codes (Nagel et al. 2022, "iterative weight
    freezing").

    ``start(code)`` begins (or begins again: each stage of a run starts afresh, as the paper's tracker
    starts when freezing does); ``update(code, threshold)`` takes the codes after one training step:

    1. frozen weights take their frozen code (the caller writes their weights back: ``code`` of a
       frozen weight is ignored);
    2. ``Δ = code - previous``; oscillated = ``Δ != 0`` and ``sign(Δ) = -direction`` (direction: the
       sign of the last non-zero Δ, 0 before the first change); direction updated where ``Δ != 0``;
    3. with ``threshold`` not None (freezing on, in stage 2): ``ema_osc = m·oscillated + (1-m)·ema_osc``
       (``m``: ``momentum``; ``ema_osc`` starts at 0); where ``ema_osc > threshold`` a weight not yet
       frozen is frozen at ``round_to_grid(ema_code)`` (nearest level, half to even; binary grid: ±1 by
       sign), the average of its codes before this step, as in the paper's code; then
       ``ema_code = m·code + (1-m)·ema_code`` (it starts at the code of ``start``). Nothing unfreezes
       (the paper's code may move a frozen weight's code while its average stays above the threshold).

    State (``state_dict``, all tensors of the codes' shape): ``previous`` and ``direction`` (int8),
    ``ema_osc``, ``ema_code`` (float32), ``frozen`` (bool), ``frozen_code`` (int8).
    """

    FIELDS = ("previous", "direction", "ema_osc", "ema_code", "frozen", "frozen_code")

    def __init__(self, quant_min: int, quant_max: int, momentum: float = 0.001):
        self.quant_min, self.quant_max, self.momentum = quant_min, quant_max, momentum
        self.previous = self.direction = self.ema_osc = self.ema_code = self.frozen = self.frozen_code = None

    def start(self, code: torch.Tensor) -> None:
        """Begin tracking from ``code`` (int8); the frozen weights stay frozen."""
        if self.frozen is None:
            self.frozen = torch.zeros_like(code, dtype=torch.bool)
            self.frozen_code = torch.zeros_like(code, dtype=torch.int8)
        self.previous = torch.where(self.frozen, self.frozen_code, code.to(torch.int8))
        self.direction = torch.zeros_like(self.previous)
        self.ema_osc = torch.zeros_like(self.previous, dtype=torch.float32)
        self.ema_code = self.previous.float()

    def update(self, code: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """One training step's codes (int8); returns the bool mask of the weights that oscillated."""
        code = torch.where(self.frozen, self.frozen_code, code.to(torch.int8))
        sign = torch.sign(code.to(torch.int16) - self.previous.to(torch.int16)).to(torch.int8)
        oscillated = (sign * self.direction) == -1
        self.direction = torch.where(sign != 0, sign, self.direction)
        self.previous = code
        if threshold is not None:
            m = self.momentum
            self.ema_osc = m * oscillated.float() + (1 - m) * self.ema_osc
            if threshold > 0:  # at the mean code of the steps before this one (as the paper's code)
                new = (self.ema_osc > threshold) & ~self.frozen
                level = round_to_grid(self.ema_code, self.quant_min, self.quant_max).to(torch.int8)
                self.frozen_code = torch.where(new, level, self.frozen_code)
                self.frozen = self.frozen | new
                self.previous = torch.where(self.frozen, self.frozen_code, self.previous)
            self.ema_code = m * code.float() + (1 - m) * self.ema_code
        return oscillated

    def state_dict(self) -> dict:
        return {k: getattr(self, k).cpu() for k in self.FIELDS}

    def load_state_dict(self, state: dict, device) -> None:
        for k in self.FIELDS:
            setattr(self, k, state[k].to(device))


class OscillationTracker:
    """Oscillations of the weights of quantized layers, step by step (``OscillationState`` per layer),
    with frozen weights held at their code: call ``start`` at the start of each stage, ``step`` after
    every optimiser step.

    Frozen weights are written back to ``frozen_code·α`` after every step (``hold``), so that neither the
    gradient, momentum nor weight decay moves them: their latent value is a level, the quantized value
    is exactly ``frozen_code·α`` in training, evaluation and export (which see the weight tensor), and
    with α trained it follows α.

    Args:
        layers: name -> ``quant.layers.QuantizedLayer`` with an enabled weight quantizer.
        momentum: the EMAs' momentum (``--oscillation-momentum``).
        freezing: whether weights may be frozen (``--freeze-oscillating``); without it ``hold`` does nothing.
    """

    def __init__(self, layers: dict, momentum: float = 0.001, freezing: bool = False):
        self.layers, self.freezing = dict(layers), freezing
        self.states = {n: OscillationState(m.weight_quant.quant_min, m.weight_quant.quant_max, momentum)
                       for n, m in self.layers.items()}
        self.started = False
        self.new_epoch()

    def codes(self, name: str) -> torch.Tensor:
        layer = self.layers[name]
        q = layer.weight_quant
        return integer_codes(layer.weight, q.alpha, q.quant_min, q.quant_max)

    def start(self) -> None:
        """Begin tracking from the current weights (the start of a stage)."""
        for name, state in self.states.items():
            state.start(self.codes(name))
        self.started = True

    def new_epoch(self) -> None:
        """Zero the epoch's counts of oscillations and steps (``frequencies``)."""
        self.counts = {n: None for n in self.layers}
        self.steps = 0

    @torch.no_grad()
    def hold(self) -> None:
        """Write every frozen weight back to ``frozen_code·α`` (in place; no device read)."""
        if not self.freezing:
            return
        for name, state in self.states.items():
            if state.frozen is not None:
                layer = self.layers[name]
                step = per_channel_view(layer.weight_quant.alpha.detach(), layer.weight)
                level = (state.frozen_code.to(layer.weight.dtype) * step).to(layer.weight.dtype)
                layer.weight.copy_(torch.where(state.frozen, level, layer.weight))

    @torch.no_grad()
    def step(self, threshold: float | None = None) -> None:
        """After an optimiser step: hold frozen weights, count oscillations, update the EMAs and freeze
        (``threshold``: None, no EMAs or freezing; 0, EMAs only; see ``OscillationState.update``)."""
        self.hold()
        for name, state in self.states.items():
            oscillated = state.update(self.codes(name), threshold).sum()
            self.counts[name] = oscillated if self.counts[name] is None else self.counts[name] + oscillated
        self.steps += 1
        if threshold:  # the weights frozen in this step
            self.hold()

    def frequencies(self) -> dict[str, dict]:
        """Per layer: ``osc_freq``, the fraction of its weights that oscillated per step over the epoch's
        steps (None without steps), and ``frozen``, the fraction of its weights frozen. Reads the device."""
        out = {}
        for name, layer in self.layers.items():
            n, state = layer.weight.numel(), self.states[name]
            count = self.counts[name]
            freq = int(count) / (self.steps * n) if count is not None and self.steps else None
            frozen = int(state.frozen.sum()) / n if state.frozen is not None else 0.0
            out[name] = {"osc_freq": freq, "frozen": frozen}
        return out

    def totals(self) -> tuple[float | None, float]:
        """(oscillations per weight and step, fraction frozen) over every tracked weight."""
        n = sum(m.weight.numel() for m in self.layers.values())
        counts = [c for c in self.counts.values() if c is not None]
        freq = sum(int(c) for c in counts) / (self.steps * n) if counts and self.steps else None
        frozen = sum(int(s.frozen.sum()) for s in self.states.values() if s.frozen is not None) / n
        return freq, frozen

    def dampening(self, aggregation: str = "kernel_mean") -> torch.Tensor:
        """Σ over the layers of ``dampening_loss`` of their weights (a float32 scalar with gradient)."""
        return sum(dampening_loss(m.weight, m.weight_quant.alpha, m.weight_quant.quant_min,
                                  m.weight_quant.quant_max, aggregation) for m in self.layers.values())

    def state_dict(self) -> dict | None:
        """The states of every layer (CPU tensors), or None before ``start``."""
        if not self.started:
            return None
        return {n: s.state_dict() for n, s in self.states.items()}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore ``state_dict``'s result (None: not started, e.g. a checkpoint from before tracking)."""
        self.started = state is not None
        if state is None:
            return
        for name, s in self.states.items():
            s.load_state_dict(state[name], self.layers[name].weight.device)
