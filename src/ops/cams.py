"""Class activation maps: the multi-scale + flip merge and the per-class normalisations of the seeds.

IRNet's ``make_cam``: for every scale the image and its mirror image run as one batch; ReLU'd maps are
flipped back, summed over scales and flips, and resized twice: to stride 4 (``cam``, the random walk's
input) and to the image size (``high_res``, for IR labels and scoring). Only the image's own classes are
kept, each divided by its max (+1e-5) (:func:`keep_and_normalise`), or min-max normalised as SEAM's
``infer_SEAM.py`` (:func:`minmax_normalise`).

Two choices follow the reference only when asked (``pyramid``, ``upsample``; experiments/FIDELITY.md):

* the image pyramid: :func:`torch_pyramid` rescales the normalised float image (torch bicubic, a = -0.75);
  :func:`pil_pyramid` rescales the uint8 image with PIL's bicubic (a = -0.5) and then normalises, as
  IRNet's ``pil_rescale`` and SEAM's ``VOC12ClsDatasetMSF`` do;
* the way up: ``direct`` resizes the net's maps straight to the output sizes (IRNet's ``make_cam``);
  ``via_input`` first to the network input's size with align_corners=True (SEAM's ``forward``), then to
  the image size (``infer_SEAM.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from src.utils.config import check_choice

CamFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
Pyramid = Callable[[float], torch.Tensor]  # scale -> the network input (B, 3, round(H s), round(W s))
PYRAMIDS = ("torch", "pil")
UPSAMPLES = ("direct", "via_input")

EPS = 1e-5  # the references' epsilon of both normalisations


def strided_size(size: Sequence[int], stride: int) -> tuple[int, int]:
    return ((size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1)


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    """round(H * s), round(W * s) with Python's round (half to even), as the reference."""
    return (round(size[0] * scale), round(size[1] * scale))


def torch_pyramid(images: torch.Tensor) -> Pyramid:
    """Scales of normalised float images (B, 3, H, W) by torch's bicubic (a = -0.75, antialiased below 1)."""
    h, w = images.shape[-2:]

    def rescale(scale: float) -> torch.Tensor:
        size = scaled_size((h, w), scale)
        if size == (h, w):
            return images
        return F.interpolate(images, size, mode="bicubic", align_corners=False, antialias=scale < 1)

    return rescale


def pil_pyramid(raw: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                device: torch.device | str | None = None) -> Pyramid:
    """Scales of uint8 RGB images (B, H, W, 3) as the references: PIL bicubic (a = -0.5, PIL's own
    antialiasing and 8-bit rounding) of the uint8 image, then (x / 255 - mean) / std computed in float64
    and stored as float32 (the references' ``Normalize``)."""
    if raw.dtype != torch.uint8 or raw.dim() != 4 or raw.shape[-1] != 3:
        raise ValueError(f"pil_pyramid needs uint8 images (B, H, W, 3), got {raw.dtype} {tuple(raw.shape)}")
    arrays = [np.ascontiguousarray(r.cpu().numpy()) for r in raw]
    h, w = raw.shape[1:3]
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)

    def rescale(scale: float) -> torch.Tensor:
        size = scaled_size((h, w), scale)
        if size != (h, w):  # PIL takes (width, height)
            scaled = [np.asarray(Image.fromarray(a).resize(size[::-1], Image.BICUBIC)) for a in arrays]
        else:
            scaled = arrays
        x = torch.from_numpy(np.stack(scaled)).permute(0, 3, 1, 2).double()
        return ((x / 255.0 - m) / s).float().to(device)

    return rescale


def multiscale_cams(cam_fn: CamFn, images: torch.Tensor, scales: Sequence[float], flip: bool,
                    cam_stride: int, output_stride: int, prior: torch.Tensor | None = None,
                    pyramid: Pyramid | None = None, upsample: str = "direct",
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed ReLU'd CAMs of a batch of same-size images (B, 3, H, W) over scales and flips.

    Returns (cam (B, K, H/cam_stride...), high_res (B, K, H, W)), not yet normalised.
    ``prior`` (B, 1, h, w) is CONTA's context prior, passed to the classifier at every scale.
    ``pyramid``: the network input per scale (default :func:`torch_pyramid` of ``images``).
    ``upsample``: ``direct`` (maps -> stride-4 size and -> the ``output_stride`` multiple of the image
    size, cropped; IRNet) or ``via_input`` (maps -> the scaled input's size with align_corners=True, then
    -> the stride-4 size and the image size; SEAM); see the module docstring.
    """
    check_choice("upsample", upsample, UPSAMPLES)
    b, _, h, w = images.shape
    pyramid = torch_pyramid(images) if pyramid is None else pyramid
    small = strided_size((h, w), cam_stride)
    up = tuple(output_stride * s for s in strided_size((h, w), output_stride))
    cam_sum = high_sum = None
    for scale in scales:
        x = pyramid(scale)
        batch = torch.cat([x, x.flip(-1)]) if flip else x
        p = None if prior is None else (torch.cat([prior, prior]) if flip else prior)
        # fp32 from here on: under bf16/fp16 autocast the net's maps are low precision, and summing
        # 8 maps, resizing and normalising in fp32 keeps seeds equal to the fp32 run's up to the net.
        maps = F.relu(cam_fn(batch, p).float())
        if flip:
            maps = maps[:b] + maps[b:].flip(-1)
        if upsample == "via_input":
            # SEAM's net returns its maps at its input's size (align_corners=True); infer_SEAM.py resizes
            # those to the image size (align_corners=False)
            maps = F.interpolate(maps, tuple(x.shape[-2:]), mode="bilinear", align_corners=True)
        cam = F.interpolate(maps, small, mode="bilinear", align_corners=False)
        high = F.interpolate(maps, up if upsample == "direct" else (h, w), mode="bilinear",
                             align_corners=False)[..., :h, :w]
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
