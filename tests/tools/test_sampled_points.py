"""experiments/esol_synthetic/sampled_points.py: the share of taps sampled off the map, by hand."""

from __future__ import annotations

import pytest
import torch

from experiments.esol_synthetic.sampled_points import outside_share


def test_regular_grid_share_is_the_padding() -> None:
    # 3 x 3 taps on a 6 x 6 map: per axis the side taps miss one row / column in six -> 1 - (16/18)^2
    assert outside_share(torch.zeros(1, 18, 6, 6)) == pytest.approx(1 - (16 / 18) ** 2)


def test_offsets_push_taps_off_the_map() -> None:
    off = torch.zeros(1, 18, 6, 6)
    off[:, 0::2] = -10.0  # every tap 10 cells up
    assert outside_share(off) == 1.0
    small = torch.full((1, 18, 6, 6), 0.25)
    assert outside_share(small) == outside_share(torch.zeros(1, 18, 6, 6))  # within half a cell
