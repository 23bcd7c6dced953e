"""Oscillations (Nagel et al., ICML 2022): dampening, tracking and freezing, against values worked out by hand."""

import math

import pytest
import torch

from quant.layers import QLinear
from regularizers.oscillation import OscillationState, OscillationTracker, cosine_ramp, dampening_loss

# A 6-weight tensor (2 output channels x 3), 2 bits (levels -2..1), α = 0.5 (clip range [-1.0, 0.5]):
# w/α = [[0.6, -1.8, 1.4], [-2.6, 0.2, 0.9]] -> codes [[1, -2, 1], [-2, 0, 1]], q(w) = [[0.5, -1, 0.5], [-1, 0, 0.5]];
# clip(w) = [[0.3, -0.9, 0.5], [-1.0, 0.1, 0.45]]; q - clip = [[0.2, -0.1, 0], [0, -0.1, 0.05]];
# squared: [[0.04, 0.01, 0], [0, 0.01, 0.0025]] (channel sums 0.05 and 0.0125, total 0.0625).
W = [[0.3, -0.9, 0.7], [-1.3, 0.1, 0.45]]


@pytest.mark.parametrize("aggregation, value, scale", [("kernel_mean", 0.0625 / 3, 1 / 3), ("sum", 0.0625, 1.0),
                                                       ("mean", 0.0625 / 6, 1 / 6)])
def test_dampening_loss_and_its_gradient_by_hand(aggregation, value, scale):
    w = torch.tensor(W, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    loss = dampening_loss(w, alpha, -2, 1, aggregation)
    assert loss.item() == pytest.approx(value, abs=1e-12)
    loss.backward()
    # d/dw (q - w)² = -2 (q - w) inside the clip range (0.7 and -1.3 are outside: 0), times the aggregation's weight
    expected = [[-2 * 0.2, -2 * -0.1, 0.0], [0.0, -2 * -0.1, -2 * 0.05]]
    assert torch.allclose(w.grad, torch.tensor(expected, dtype=torch.float64) * scale, atol=1e-12)
    assert alpha.grad is None  # the clip keeps the term off the step size


def test_dampening_per_channel_and_binary():
    w = torch.tensor(W, dtype=torch.float64, requires_grad=True)
    # channel 1 at α = 0.25 (clip [-0.5, 0.25]): codes [-2, 0, 1], q = [-0.5, 0, 0.25], clip = [-0.5, 0.1, 0.25]
    loss = dampening_loss(w, torch.tensor([0.5, 0.25], dtype=torch.float64), -2, 1)
    assert loss.item() == pytest.approx(0.05 / 3 + 0.01 / 3, abs=1e-12)
    loss.backward()
    assert w.grad[1].tolist() == pytest.approx([0.0, 2 * 0.1 / 3, 0.0], abs=1e-12)
    # binary (levels ±α, clip [-α, α]), α = 0.5: q = [[.5, -.5, .5], [-.5, .5, .5]],
    # clip = [[.3, -.5, .5], [-.5, .1, .45]]
    binary = dampening_loss(torch.tensor(W, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64), -1, 1)
    assert binary.item() == pytest.approx((0.04 + 0 + 0) / 3 + (0 + 0.16 + 0.0025) / 3, abs=1e-12)


def test_cosine_ramp():
    assert cosine_ramp(0.0, 0.0, 0.1) == 0.0 and cosine_ramp(1.0, 0.0, 0.1) == pytest.approx(0.1)
    assert cosine_ramp(0.5, 0.0, 0.1) == pytest.approx(0.05)
    assert cosine_ramp(0.0, 0.1, 0.01) == pytest.approx(0.1) and cosine_ramp(0.25, 0.1, 0.01) == pytest.approx(
        0.01 + 0.09 * (1 + math.cos(math.pi / 4)) / 2)


def codes(*values):
    return torch.tensor(values, dtype=torch.int8)


def test_tracker_on_a_hand_made_sequence():
    """3 weights of a 3-bit grid (levels -4..3), momentum 0.5 (ema = 0.5·x + 0.5·ema).

    A weight freezes at the rounded mean of its codes before the step (ema_code before its update).
    w0: 0 -> 1 -> -1: its first change never counts, the second (opposite) does: ema_osc 0.5 > 0.4 at step 2,
        frozen at round(ema_code) = round(0.5·1 + 0.5·0) = round(0.5) = 0 (half to even; not its code, -1).
    w1: 2 -> 3 -> 3 -> 2 -> 2 -> 3: a zero change is skipped, so steps 3 and 5 oscillate; ema_osc 0.5, 0.25,
        0.625 > 0.6 at step 5; ema_code 2.5, 2.75, 2.375, 2.1875 after steps 1-4: frozen at round(2.1875) = 2
        (not its code, 3); then ema_code = 0.5·3 + 0.5·2.1875 = 2.59375.
    w2: never moves.
    """
    state = OscillationState(-4, 3, momentum=0.5)
    state.start(codes(0, 2, 0))
    steps = [(codes(1, 3, 0), 0.4, [False, False, False]),
             (codes(-1, 3, 0), 0.4, [True, False, False]),
             (codes(-1, 2, 0), 0.6, [False, True, False]),   # w0 is frozen (at 0): its code is ignored
             (codes(3, 2, 0), 0.6, [False, False, False]),
             (codes(-4, 3, 0), 0.6, [False, True, False])]
    frozen_after = [[False] * 3, [True, False, False], [True, False, False], [True, False, False],
                    [True, True, False]]
    for (code, threshold, oscillated), frozen in zip(steps, frozen_after):
        assert state.update(code, threshold).tolist() == oscillated
        assert state.frozen.tolist() == frozen
    assert state.frozen_code.tolist()[:2] == [0, 2]
    assert state.ema_osc.tolist() == pytest.approx([0.0625, 0.625, 0.0])  # w0's decays: nothing unfreezes
    assert state.ema_code[1].item() == pytest.approx(2.59375)


def test_tracking_without_freezing_and_the_binary_grid():
    state = OscillationState(-1, 1, momentum=0.5)  # binary: codes ±1, every change after the first oscillates
    state.start(codes(1))
    seen = [state.update(codes(c)).item() for c in (-1, 1, 1, -1)]
    assert seen == [False, True, False, True]
    assert state.ema_osc.tolist() == [0.0] and not state.frozen.any()  # threshold None: no EMA, no freezing
    state.start(codes(1))  # a new stage: the first change does not count
    assert state.update(codes(-1), 0.4).item() is False  # then ema_code = 0.5·-1 + 0.5·1 = 0
    assert state.update(codes(1), 0.4).item() is True  # ema_osc 0.5 > 0.4: frozen at the level of ema_code 0
    # frozen at the nearest binary level of 0: +1 (x >= 0 -> +1; an integer grid would give 0)
    assert state.frozen.tolist() == [True] and state.frozen_code.tolist() == [1]


def _frozen_layer(alpha_trainable: bool):
    torch.manual_seed(0)
    layer = QLinear(3, 2, bias=False, weight_bits=2, act_bits=32)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.3, -0.9, 0.2], [-0.6, 0.1, 0.45]]))
    layer.weight_quant.initialize_from(layer.weight)
    layer.weight_quant.alpha.requires_grad_(alpha_trainable)
    tracker = OscillationTracker({"fc": layer}, freezing=True)
    tracker.start()
    state = tracker.states["fc"]
    state.frozen[0, 0], state.frozen_code[0, 0] = True, -1  # frozen at code -1 (its own: round(0.3 / 0.85) = 0)
    tracker.hold()
    return layer, tracker


@pytest.mark.parametrize("alpha_trainable", [False, True])
def test_a_frozen_weight_is_untouched_by_sgd_with_weight_decay(alpha_trainable):
    layer, tracker = _frozen_layer(alpha_trainable)
    alpha = layer.weight_quant.alpha
    assert layer.weight[0, 0].item() == -1 * alpha.item()
    before = layer.weight.detach().clone()
    params = [layer.weight] + ([alpha] if alpha_trainable else [])
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=0.1)
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.0, 2.0]])
    for _ in range(3):
        optimizer.zero_grad()
        (layer(x) ** 2).sum().backward()
        assert layer.weight.grad[0, 0] + 0.1 * layer.weight[0, 0] != 0  # the gradient and the decay would move it
        optimizer.step()
        tracker.step(None)
        assert layer.weight[0, 0].item() == -1 * alpha.item()  # its level, exactly
    assert not torch.equal(layer.weight[0, 1:], before[0, 1:])  # the others trained
    if not alpha_trainable:
        assert layer.weight[0, 0].item() == before[0, 0].item()
    quantized = layer.quantized_weight()
    assert quantized[0, 0].item() == -1 * alpha.item()
    assert tracker.frequencies()["fc"]["frozen"] == pytest.approx(1 / 6)


def test_tracker_state_round_trip():
    layer, tracker = _frozen_layer(False)
    tracker.step(0.5)
    state = tracker.state_dict()
    other = OscillationTracker({"fc": layer}, freezing=True)
    assert other.state_dict() is None
    other.load_state_dict(state)
    for key, value in state["fc"].items():
        assert torch.equal(other.states["fc"].state_dict()[key], value)
