"""Bin metrics of quantized weights (regularizers.bin_metrics.weight_bin_stats) on hand-worked examples."""

import pytest
import torch

from regularizers import bin_indices, weight_bin_stats


def test_signed_2bit_distance_occupancy_and_flips_by_hand():
    # α = 0.5, signed 2-bit: levels k in [-2, 1], i.e. -1.0, -0.5, 0.0, 0.5.
    # v        : -1.3  -0.9   0.1   0.2   0.6   2.0
    # v/α      : -2.6  -1.8   0.2   0.4   1.2   4.0
    # k        : -2    -2     0     0     1     1 (clamped from 4)
    # bin k+2  :  0     0     2     2     3     3
    # |v - kα| :  0.3   0.1   0.1   0.2   0.1   1.5  -> sum 2.3, mean 2.3/6, in α units 2.3/6/0.5
    v = torch.tensor([-1.3, -0.9, 0.1, 0.2, 0.6, 2.0])
    alpha = torch.tensor(0.5)
    stats, bins = weight_bin_stats(v, alpha, -2, 1, None)
    assert bins.tolist() == [0, 0, 2, 2, 3, 3]
    assert bins.dtype == torch.int16
    assert stats["dist_alpha"] == pytest.approx(2.3 / 6 / 0.5, rel=1e-6)
    assert stats["occupancy"] == pytest.approx([2 / 6, 0.0, 2 / 6, 2 / 6])
    assert stats["flips"] is None  # no previous epoch

    # Next epoch: -0.9 moved to -0.7 (v/α -1.4 -> k -1: flip), 0.2 to 0.3 (0.6 -> k 1: flip),
    # 2.0 to 0.4 (0.8 -> k 1: same bin, no flip). 2 of 6 weights changed bin.
    v2 = torch.tensor([-1.3, -0.7, 0.1, 0.3, 0.6, 0.4])
    stats2, bins2 = weight_bin_stats(v2, alpha, -2, 1, bins)
    assert bins2.tolist() == [0, 1, 2, 3, 3, 3]
    assert stats2["flips"] == pytest.approx(2 / 6)
    assert stats2["occupancy"] == pytest.approx([1 / 6, 1 / 6, 1 / 6, 3 / 6])
    # |v - kα|: 0.3, |-0.7+0.5|=0.2, 0.1, |0.3-0.5|=0.2, 0.1, |0.4-0.5|=0.1 -> 1.0 / 6 / 0.5
    assert stats2["dist_alpha"] == pytest.approx(1.0 / 6 / 0.5, rel=1e-6)

    # Same values again: nothing flips.
    stats3, _ = weight_bin_stats(v2, alpha, -2, 1, bins2)
    assert stats3["flips"] == 0.0


def test_unsigned_weights_on_levels_have_zero_distance_and_4d_shapes_work():
    # α = 0.25, unsigned 2-bit: levels 0, 0.25, 0.5, 0.75; every value sits on a level.
    v = torch.tensor([0.0, 0.25, 0.25, 0.5, 0.75, 0.75, 0.75, 0.75]).view(2, 1, 2, 2)
    stats, bins = weight_bin_stats(v, torch.tensor(0.25), 0, 3, None)
    assert bins.shape == v.shape
    assert stats["dist_alpha"] == 0.0
    assert stats["occupancy"] == pytest.approx([1 / 8, 2 / 8, 1 / 8, 4 / 8])
    # One weight moves from 0.75 down to 0.3 (bin 3 -> 1): 1 flip of 8; it is 0.05 = 0.2α off level 0.25.
    v2 = v.clone()
    v2[1, 0, 1, 1] = 0.3
    stats2, _ = weight_bin_stats(v2, torch.tensor(0.25), 0, 3, bins)
    assert stats2["flips"] == pytest.approx(1 / 8)
    assert stats2["dist_alpha"] == pytest.approx(0.2 / 8, rel=1e-5)


def test_values_on_a_bin_edge_round_half_to_even():
    # α = 1: v/α = 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0 (torch.round: half to even).
    # Each is half a step from its level, so the mean distance is 0.5 α.
    v = torch.tensor([0.5, 1.5, 2.5, -0.5])
    stats, bins = weight_bin_stats(v, torch.tensor(1.0), -4, 3, None)
    assert (bins.long() + -4).tolist() == [0, 2, 2, 0]
    assert stats["dist_alpha"] == pytest.approx(0.5)


def test_previous_bins_of_another_shape_give_no_flip_count():
    v = torch.tensor([0.1, 0.2, 0.3])
    previous = torch.zeros(4, dtype=torch.int16)
    stats, _ = weight_bin_stats(v, torch.tensor(0.1), -2, 1, previous)
    assert stats["flips"] is None


def test_bin_indices_clamp_to_the_grid():
    # α = 0.1, signed 3-bit (k in [-4, 3]): -1.0 -> -10 -> -4 (index 0); 1.0 -> 10 -> 3 (index 7).
    idx = bin_indices(torch.tensor([-1.0, -0.04, 0.06, 1.0]), torch.tensor(0.1), -4, 3)
    assert idx.tolist() == [0, 4, 5, 7]
