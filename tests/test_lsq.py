"""LSQ quantizer: values and gradients worked out by hand (Esser et al. 2020, eq. 1-3)."""

import math
import warnings

import pytest
import torch

from quant import LSQQuantizer, MIN_STEP_SIZE, integer_range, keep_step_sizes_positive


def _quantizer(num_bits, signed, alpha, grad_count="numel"):
    q = LSQQuantizer(num_bits, signed, grad_count)
    with torch.no_grad():
        q.alpha.fill_(alpha)
    q.initialized.fill_(True)
    q._is_initialized = True
    return q


def test_integer_ranges():
    assert integer_range(2, signed=True) == (-2, 1)
    assert integer_range(2, signed=False) == (0, 3)
    assert integer_range(4, signed=True) == (-8, 7)
    assert integer_range(8, signed=False) == (0, 255)
    q = LSQQuantizer(3, signed=True)
    assert (q.num_bits, q.signed, q.quant_min, q.quant_max) == (3, True, -4, 3)
    assert isinstance(q.alpha, torch.nn.Parameter)


@pytest.mark.parametrize("bits", [0, 9, 16, 31, -2, 2.5, True])
def test_unsupported_widths_name_the_value(bits):
    with pytest.raises(ValueError, match=str(bits)):
        LSQQuantizer(bits, signed=True)


def test_32_bits_is_identity_without_alpha():
    q = LSQQuantizer(32, signed=False)
    x = torch.randn(3, 4)
    assert q.alpha is None and not q.enabled
    assert torch.equal(q(x), x)


def test_signed_forward_and_gradients_by_hand():
    # α = 0.5, 2-bit signed: range [-2, 1].  x/α = [-3.2, -1.2, 0.2, 0.6, 1.6, 2.2]
    q = _quantizer(2, True, 0.5)
    x = torch.tensor([-1.6, -0.6, 0.1, 0.3, 0.8, 1.1], requires_grad=True)
    out = q(x)
    assert torch.allclose(out, torch.tensor([-1.0, -0.5, 0.0, 0.5, 0.5, 0.5]))
    out.sum().backward()
    # STE: gradient 1 strictly inside the range, 0 where x/α was clipped.
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
    # eq. 3 per element: -2 (below), 0.2, -0.2, 0.4 (inside: round(x/α) - x/α), 1, 1 (above) -> sum 0.4
    # times g = 1/sqrt(N·Qp) = 1/sqrt(6·1).
    assert q.alpha.grad.item() == pytest.approx(0.4 / math.sqrt(6), rel=1e-5)


def test_unsigned_activation_gradient_scale_uses_features_per_sample():
    # 2-bit unsigned: range [0, 3], α = 0.5; N = features of one sample = 3, so g = 1/sqrt(3·3).
    q = _quantizer(2, False, 0.5, grad_count="per_sample")
    x = torch.tensor([[0.2, 0.9, 2.0], [-0.4, 1.3, 0.7]], requires_grad=True)
    out = q(x)
    assert torch.allclose(out, torch.tensor([[0.0, 1.0, 1.5], [0.0, 1.5, 0.5]]))
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]))
    # eq. 3: [-0.4, 0.2, 3] and [0, 0.4, -0.4] -> 2.8; g = 1/3.
    assert q.alpha.grad.item() == pytest.approx(2.8 / 3, rel=1e-5)


def test_initialisation_from_first_tensor_in_place():
    q = LSQQuantizer(2, signed=True)
    param = q.alpha
    q(torch.tensor([1.0, -3.0]))  # mean |x| = 2, Qp = 1 -> α = 4
    assert q.alpha is param
    assert q.alpha.item() == pytest.approx(4.0)
    assert bool(q.initialized)
    u = LSQQuantizer(2, signed=False)
    u(torch.tensor([1.0, 3.0]))  # Qp = 3 -> α = 4/sqrt(3)
    assert u.alpha.item() == pytest.approx(4 / math.sqrt(3), rel=1e-6)
    q(torch.tensor([100.0]))  # a later tensor does not re-initialise
    assert q.alpha.item() == pytest.approx(4.0)


def test_initialisation_works_under_inference_mode():
    q = LSQQuantizer(2, signed=False)
    with torch.inference_mode():
        q(torch.tensor([1.0, 3.0]))
    assert q.alpha.item() == pytest.approx(4 / math.sqrt(3), rel=1e-6)


def test_state_dict_round_trip_keeps_alpha_and_does_not_reinitialise():
    q = LSQQuantizer(2, signed=True)
    q(torch.tensor([1.0, -3.0]))
    with torch.no_grad():
        q.alpha.fill_(0.125)  # as if trained
    fresh = LSQQuantizer(2, signed=True)
    fresh.load_state_dict(q.state_dict())
    assert fresh.alpha.item() == 0.125 and bool(fresh.initialized)
    fresh(torch.tensor([50.0, -50.0]))
    assert fresh.alpha.item() == 0.125


def test_alpha_stays_positive_after_huge_negative_step():
    q = LSQQuantizer(2, signed=True)
    q(torch.tensor([0.5, -0.5]))
    model = torch.nn.Sequential(q)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    keep_step_sizes_positive(opt, model)
    for _ in range(3):
        q.alpha.grad = torch.tensor(1e6)
        opt.step()
        assert q.alpha.item() > 0 and q.alpha.item() == pytest.approx(MIN_STEP_SIZE, rel=1e-6)
    assert torch.isfinite(q(torch.tensor([0.3]))).all()


# -- initialisation only from a usable tensor (issue 15) ----------------------------------------

@pytest.mark.parametrize("bad,reason", [(torch.zeros(2, 3), "is all zeros"), (torch.zeros(0), "is empty"),
                                        (torch.tensor([1.0, float("nan")]), "NaN or inf"),
                                        (torch.tensor([float("inf"), 1.0]), "NaN or inf")])
def test_unusable_first_tensor_leaves_the_quantizer_waiting_and_says_so_once(bad, reason):
    q = LSQQuantizer(2, signed=False)
    with pytest.warns(RuntimeWarning, match=reason):
        q(bad)
    assert not bool(q.initialized) and q.alpha.item() == 1.0  # the constructor's α, not 1e-8 or NaN
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second unusable tensor: no second warning
        q(bad)
        out = q(torch.tensor([1.0, 3.0]))  # the first usable one: mean |x| = 2, Qp = 3 -> α = 4/sqrt(3)
    assert bool(q.initialized) and q.alpha.item() == pytest.approx(4 / math.sqrt(3), rel=1e-6)
    # quantized with that α: 1/2.309 = 0.43 -> 0, 3/2.309 = 1.30 -> 1
    torch.testing.assert_close(out, torch.tensor([0.0, 4 / math.sqrt(3)]))


def test_initialisation_in_eval_mode_and_without_gradients_calibrates():
    q = LSQQuantizer(2, signed=True).eval()
    with torch.no_grad():
        q(torch.tensor([1.0, -3.0]))  # mean |x| = 2, Qp = 1 -> α = 4
    assert bool(q.initialized) and q.alpha.item() == pytest.approx(4.0)


def test_float16_step_size_never_underflows():
    half_tiny = 2.0 ** -14  # the smallest normal float16 number
    # a float32 α of 1e-8 is 0 in float16: 0 / 0 would be NaN
    q = _quantizer(2, True, MIN_STEP_SIZE)
    out = q(torch.tensor([0.0, 1e-3, -1.0], dtype=torch.float16))
    # α is raised to 2^-14: 0 -> 0; 1e-3 / 2^-14 = 16.4 -> Qp = 1; -1 -> Qn = -2
    assert out.dtype == torch.float16 and out.tolist() == [0.0, half_tiny, -2 * half_tiny]
    # initialised from float16 values whose α (2·1.2e-7 / 1) is below 2^-14
    q = LSQQuantizer(2, signed=True)
    q(torch.full((4,), 1.2e-7, dtype=torch.float16))
    assert q.alpha.item() == half_tiny
    # a float16 α is projected onto 2^-14, not onto 1e-8 (which is 0 in float16)
    q = LSQQuantizer(2, signed=True).half()
    q(torch.tensor([0.5, -0.5], dtype=torch.float16))
    opt = torch.optim.SGD(q.parameters(), lr=1.0)
    keep_step_sizes_positive(opt, torch.nn.Sequential(q))
    q.alpha.grad = torch.tensor(1e4, dtype=torch.float16)
    opt.step()
    assert q.alpha.item() == half_tiny
    assert torch.isfinite(q(torch.zeros(3, dtype=torch.float16))).all()


# -- the grid is part of the state (issue 15) ----------------------------------------------------

@pytest.mark.parametrize("saved,loading,words", [
    ((2, False), (4, False), ("2-bit unsigned [0, 3]", "4-bit unsigned [0, 15]")),
    ((2, True), (2, False), ("2-bit signed [-2, 1]", "2-bit unsigned [0, 3]")),
])
def test_state_of_another_grid_is_refused_naming_both(saved, loading, words):
    source = LSQQuantizer(*saved)
    source(torch.tensor([1.0, 3.0]))
    layer = torch.nn.Sequential()
    layer.add_module("act_quant", LSQQuantizer(*loading))
    with pytest.raises(RuntimeError) as exc:
        layer.load_state_dict({"act_quant." + k: v for k, v in source.state_dict().items()})
    assert "act_quant: the state is of a " + words[0] + " quantizer, this one is " + words[1] in str(exc.value)
    assert layer.act_quant.alpha.item() == 1.0 and not layer.act_quant._is_initialized  # nothing was loaded


def test_state_saved_before_the_grid_was_recorded_still_loads():
    old = LSQQuantizer(2, signed=True)
    old(torch.tensor([1.0, -3.0]))
    state = old.state_dict()
    del state["grid"]
    fresh = LSQQuantizer(4, signed=True)  # no record of the grid: no check (as before)
    fresh.load_state_dict(state)
    assert fresh.alpha.item() == 4.0 and fresh._is_initialized
