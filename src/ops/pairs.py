"""Pixel pairs within a radius: the shared convention of IRN, AffinityNet and the random walk.

A pair offset (dy, dx) links pixel (y, x) to (y + dy, x + dx). Only the half plane is listed
(dy = 0 and dx > 0, or dy > 0), each unordered pair once, with dy^2 + dx^2 < radius^2 (strict), in
the reference order: (0, 1..r-1), then row by row dy = 1..r-1, dx = -(r-1)..r-1. Radius 5 gives 34
offsets, radius 10 gives 152.

Pair-affinity tensors are laid out (B, n_offsets, H, W): entry [b, o, y, x] is the affinity between
(y, x) and (y, x) + offsets[o]; entries whose partner lies outside the image are 0.

AffinityNet's training pairs follow PSA's ``ExtractAffinityLabelInRadius``: only source pixels in the region
rows [0, h - r + 1) x cols [r - 1, w - r + 1) (every partner inside), flattened row-major:
(B, n_offsets, n_src) (:func:`affinity_labels_in_radius`, :func:`to_label_layout`).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from src.utils.labels import IGNORE


@cache
def half_plane_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    if radius < 2:
        raise ValueError(f"pair radius must be >= 2, got {radius}")
    offsets = [(0, dx) for dx in range(1, radius)]
    for dy in range(1, radius):
        for dx in range(-radius + 1, radius):
            if dy * dy + dx * dx < radius * radius:
                offsets.append((dy, dx))
    return tuple(offsets)


def label_region(height: int, width: int, radius: int) -> tuple[slice, slice]:
    """Rows and columns of the source pixels PSA uses (all partners inside); clear error if too small."""
    rf = radius - 1
    if height <= rf or width <= 2 * rf:
        raise ValueError(f"a {height} x {width} map has no pixel with all radius-{radius} partners inside "
                         f"(needs height > {rf} and width > {2 * rf})")
    return slice(0, height - rf), slice(rf, width - rf)


def to_label_layout(aff: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, n_offsets, h, w) pair affinities -> (B, n_offsets, n_src) at the source pixels of
    :func:`affinity_labels_in_radius` (reference ``resnet38_aff.Net.forward`` output layout)."""
    rows, cols = label_region(aff.shape[-2], aff.shape[-1], radius)
    return aff[..., rows, cols].flatten(-2)


def affinity_labels_in_radius(
    label_map: torch.Tensor | np.ndarray, radius: int, ignore_index: int = IGNORE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair labels of AffinityNet training from a stride-8 label map (PSA's ExtractAffinityLabelInRadius).

    ``label_map``: (h, w) or (B, h, w) class ids, 0 = background, ``ignore_index`` = unknown. For each
    half-plane offset and each source pixel of :func:`label_region`:
    bg_pos = both ends 0; fg_pos = same non-zero label, both known; neg = different labels, both known.
    (The reference tests "< 255"; for label maps in 0..255 that is "!= ignore_index".)
    Returns float32 tensors (..., n_offsets, n_src).
    """
    labels = torch.as_tensor(label_map).long()
    if labels.dim() not in (2, 3):
        raise ValueError(f"label_map must be (h, w) or (B, h, w), got shape {tuple(labels.shape)}")
    h, w = labels.shape[-2:]
    rows, cols = label_region(h, w, radius)
    src = labels[..., rows, cols].flatten(-2)
    dst = []
    for dy, dx in half_plane_offsets(radius):
        dst.append(labels[..., rows.start + dy:rows.stop + dy, cols.start + dx:cols.stop + dx].flatten(-2))
    dst = torch.stack(dst, -2)
    src = src.unsqueeze(-2)
    known = (src != ignore_index) & (dst != ignore_index)
    same = src == dst
    bg_pos = same & (src == 0)
    fg_pos = same & (src != 0) & known
    neg = ~same & known
    return bg_pos.float(), fg_pos.float(), neg.float()
