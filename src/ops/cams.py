"""Class activation maps: the multi-scale + flip merge and the per-class normalisations of the seeds.

IRNet's ``make_cam``: for every scale the image and its mirror image run as one batch; ReLU'd maps are
flipped back, summed over scales and flips, and resized twice: to stride 4 (``cam``, the random walk's
input) and to the image size (``high_res``, for IR labels and scoring). Only the image's own classes are
kept, each divided by its max (+1e-5) (:func:`keep_and_normalise`), or min-max normalised as SEAM's
``infer_SEAM.py`` (:func:`minmax_normalise`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

CamFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

EPS = 1e-5  # the references' epsilon of both normalisations


def strided_size(size: Sequence[int], stride: int) -> tuple[int, int]:
    return ((size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1)


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    """round(H * s), round(W * s) with Python's round (half to even), as the reference."""
    return (round(size[0] * scale), round(size[1] * scale))


def multiscale_cams(cam_fn: CamFn, images: torch.Tensor, scales: Sequence[float], flip: bool,
                    cam_stride: int, output_stride: int, prior: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed ReLU'd CAMs of a batch of same-size images (B, 3, H, W) over scales and flips.

    Returns (cam (B, K, H/cam_stride...), high_res (B, K, H, W)), not yet normalised.
    ``prior`` (B, 1, h, w) is CONTA's context prior, passed to the classifier at every scale.
    """
    b, _, h, w = images.shape
    small = strided_size((h, w), cam_stride)
    up = tuple(output_stride * s for s in strided_size((h, w), output_stride))
    cam_sum = high_sum = None
    for scale in scales:
        size = scaled_size((h, w), scale)
        x = images if size == (h, w) else F.interpolate(images, size, mode="bicubic", align_corners=False,
                                                         antialias=scale < 1)
        batch = torch.cat([x, x.flip(-1)]) if flip else x
        p = None if prior is None else (torch.cat([prior, prior]) if flip else prior)
        # fp32 from here on: under bf16/fp16 autocast the net's maps are low precision, and summing
        # 8 maps, resizing and normalising in fp32 keeps seeds equal to the fp32 run's up to the net.
        maps = F.relu(cam_fn(batch, p).float())
        if flip:
            maps = maps[:b] + maps[b:].flip(-1)
        cam = F.interpolate(maps, small, mode="bilinear", align_corners=False)
        high = F.interpolate(maps, up, mode="bilinear", align_corners=False)[..., :h, :w]
        cam_sum = cam if cam_sum is None else cam_sum + cam
        high_sum = high if high_sum is None else high_sum + high
    return cam_sum, high_sum


def keep_and_normalise(maps: torch.Tensor, keys: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The maps of the image's classes (0-based ``keys``), each divided by its max + eps (IRNet)."""
    sel = maps[keys]
    return sel / (sel.flatten(1).amax(1).view(-1, 1, 1) + eps) if sel.numel() else sel


def minmax_normalise(maps: torch.Tensor, keys: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The maps (K, h, w) of the image's classes (0-based ``keys``), each clipped at 0 and min-max
    normalised as ``infer_SEAM.py``: ``(s - min - eps) / (max - min + eps)``, values in [0, 1).

    The reference sets the pixels with ``s < min + eps`` to a slightly negative value; 0 here, which changes
    no argmax against a non-negative background (ties go to the background first)."""
    sel = maps[keys].clamp_min(0)
    if not sel.numel():
        return sel
    flat = sel.flatten(1)
    lo = flat.amin(1).view(-1, 1, 1)
    hi = flat.amax(1).view(-1, 1, 1)
    return ((sel - lo - eps) / (hi - lo + eps)).clamp_min(0)


NORMALISATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "max": keep_and_normalise,
    "minmax": minmax_normalise,
}
