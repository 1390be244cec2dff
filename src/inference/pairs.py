"""Pixel pairs within a radius: the shared convention of IRN, AffinityNet and the random walk.

A pair offset (dy, dx) links pixel (y, x) to (y + dy, x + dx). Only the half plane is listed
(dy = 0 and dx > 0, or dy > 0), each unordered pair once, with dy^2 + dx^2 < radius^2 (strict), in
the reference order: (0, 1..r-1), then row by row dy = 1..r-1, dx = -(r-1)..r-1. Radius 5 gives 34
offsets, radius 10 gives 152.

Pair-affinity tensors are laid out (B, n_offsets, H, W): entry [b, o, y, x] is the affinity between
(y, x) and (y, x) + offsets[o]; entries whose partner lies outside the image are 0.
"""

from __future__ import annotations

from functools import cache


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
