"""Pixel-pair paths of IRNet: which stride-4 pixels lie between the two ends of a pair.

IRNet's affinity of a pair is ``1 - max(boundary)`` over the pixels on the segment joining its ends, so
the training loss and the random walk both need, for every pair offset, the pixels of that segment.
:class:`PathIndex` reproduces the reference ``misc.indexing.PathIndex`` array for array (offset order,
path order, flat indices), because the oracle cases and the IR-label tensors are laid out in that order.

Geometry (spec, stage 4):
* offsets are the half plane of :func:`src.ops.pairs.half_plane_offsets` (strict ``d < radius``),
  regrouped by path length, ascending (stable, so ties keep the half-plane order);
* the path of offset (dy, dx) is every integer point (y, x) of the bounding box of (0, 0)-(dy, dx) whose
  perpendicular distance to the segment is < 1, i.e. ``(dy*x - dx*y)^2 < dy^2 + dx^2``; its points are
  sorted by decreasing ``|y| + |x|`` (stable), so point 0 is the destination and the last is (0, 0);
* source pixels are ``grid[:H - rf, rf:W - rf]`` with ``rf = radius - 1``: every partner of a source is
  then inside the grid, so no bounds checks are needed in the hot path.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from src.ops.pairs import half_plane_offsets
from src.utils.labels import IGNORE


def pair_path(dy: int, dx: int) -> np.ndarray:
    """(L, 2) integer points (y, x) on the path from (0, 0) to (dy, dx), destination first, (0, 0) last,
    in the reference's order (row-major scan of the bounding box, then a stable sort by -(|y| + |x|))."""
    length_sq = dy * dy + dx * dx
    if length_sq == 0:
        raise ValueError("a pair offset cannot be (0, 0)")
    ys = np.arange(min(0, dy), max(0, dy) + 1)
    xs = np.arange(min(0, dx), max(0, dx) + 1)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    yy, xx = yy.reshape(-1), xx.reshape(-1)
    # Integer form of "squared distance to the segment's line < 1": exact, no float division.
    on_path = (dy * xx - dx * yy) ** 2 < length_sq
    points = np.stack([yy[on_path], xx[on_path]], axis=1).astype(np.int64)
    order = np.argsort(-(np.abs(points[:, 0]) + np.abs(points[:, 1])), kind="stable")
    return points[order]


class PathTensors(NamedTuple):
    """The index arrays of a :class:`PathIndex` as int64 tensors on one device."""

    src: torch.Tensor
    dst: torch.Tensor
    paths: tuple[torch.Tensor, ...]
    search_dst: torch.Tensor


class PathIndex:
    """Pair offsets, their paths and flat pixel indices on a fixed (H, W) grid (reference ``PathIndex``).

    Attributes (numpy int64, reference names and order):
    * ``radius_floor``: ``radius - 1``, the largest |dy| or |dx| of an offset;
    * ``search_dst`` (n_offsets, 2): the offsets (dy, dx), grouped by path length ascending;
    * ``search_paths``: per group, (n_dirs, L, 2) path points of each offset of the group;
    * ``src_indices`` (n_src,): flat indices ``y * W + x`` of the source pixels;
    * ``dst_indices`` (n_offsets, n_src): flat index of each source's partner for each offset;
    * ``path_indices``: per group, (n_dirs, L, n_src) flat index of every path point of every source.
    """

    def __init__(self, radius: int, size: tuple[int, int]) -> None:
        radius = int(radius)
        height, width = (int(s) for s in size)
        self.radius = radius
        self.size = (height, width)
        self.radius_floor = radius - 1
        rf = self.radius_floor
        self.cropped_size = (height - rf, width - 2 * rf)
        if self.cropped_size[0] < 1 or self.cropped_size[1] < 1:
            raise ValueError(
                f"PathIndex(radius={radius}) needs a grid of at least {rf + 1} x {2 * rf + 1} pixels so that "
                f"some source pixel has all its partners inside; got {height} x {width}"
            )

        by_length: dict[int, list[np.ndarray]] = {}
        for dy, dx in half_plane_offsets(radius):
            path = pair_path(dy, dx)
            by_length.setdefault(len(path), []).append(path)
        self.search_paths = [np.stack(by_length[n]) for n in sorted(by_length)]
        self.search_dst = np.concatenate([group[:, 0] for group in self.search_paths], axis=0)

        ch, cw = self.cropped_size
        rows, cols = np.meshgrid(np.arange(ch), np.arange(rf, rf + cw), indexing="ij")
        self.src_indices = (rows * width + cols).reshape(-1).astype(np.int64)
        # A path point (py, px) of a source s sits at flat index s + py * W + px (no wrap: see class doc).
        self.path_indices = [
            self.src_indices[None, None, :] + (group[..., 0] * width + group[..., 1])[..., None]
            for group in self.search_paths
        ]
        self.dst_indices = np.concatenate([group[:, 0] for group in self.path_indices], axis=0)
        self._tensors: dict[str, PathTensors] = {}

    @property
    def n_offsets(self) -> int:
        return len(self.search_dst)

    @property
    def n_src(self) -> int:
        return len(self.src_indices)

    def tensors(self, device: torch.device | str | None = None) -> PathTensors:
        """The index arrays as tensors on ``device``, built once per device."""
        device = torch.device("cpu" if device is None else device)
        key = str(device)
        if key not in self._tensors:
            self._tensors[key] = PathTensors(
                src=torch.from_numpy(self.src_indices).to(device),
                dst=torch.from_numpy(self.dst_indices).to(device),
                paths=tuple(torch.from_numpy(p).to(device) for p in self.path_indices),
                search_dst=torch.from_numpy(self.search_dst).to(device),
            )
        return self._tensors[key]

    def check_size(self, height: int, width: int) -> None:
        if (height, width) != self.size:
            raise ValueError(f"PathIndex was built for a {self.size[0]} x {self.size[1]} grid, got "
                             f"{height} x {width}")


def affinity_labels(
    label_map: torch.Tensor,
    path_index: PathIndex,
    ignore_index: int = IGNORE,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair labels of IRN training from stride-4 IR label maps (reference ``GetAffinityLabelFromIndices``).

    ``label_map`` (B, h, w) integer class ids (0 = background) with ``ignore_index`` = unknown. A pair is
    *known* when both ends are valid labels; known pairs with equal labels are background-positive
    (label 0) or foreground-positive, known pairs with different labels are negative.

    The reference calls a label valid when it is < 21 (VOC's class count); here a label is valid when it
    is >= 0, differs from ``ignore_index`` and, if ``num_classes`` is given, is < ``num_classes``. For
    VOC labels (0..20 and 255) both rules agree; the general one also fits datasets with more classes.

    Returns (bg_pos, fg_pos, neg), each (B, n_offsets, n_src) float32 on the input's device, so the
    labels can be built inside the training step on the batch.
    """
    if label_map.dim() != 3:
        raise ValueError(f"label_map must be (B, h, w), got shape {tuple(label_map.shape)}")
    path_index.check_size(label_map.shape[1], label_map.shape[2])
    idx = path_index.tensors(label_map.device)
    flat = label_map.reshape(label_map.shape[0], -1).long()
    src = flat[:, idx.src].unsqueeze(1)
    dst = flat[:, idx.dst.reshape(-1)].reshape(flat.shape[0], *idx.dst.shape)

    def valid(labels: torch.Tensor) -> torch.Tensor:
        ok = (labels >= 0) & (labels != ignore_index)
        if num_classes is not None:
            ok &= labels < num_classes
        return ok

    known = valid(src) & valid(dst)
    same = src == dst
    positive = known & same
    bg_pos = positive & (src == 0)
    fg_pos = positive & (src != 0)
    neg = known & ~same
    return bg_pos.float(), fg_pos.float(), neg.float()
