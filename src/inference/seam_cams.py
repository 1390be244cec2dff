"""SEAM's seeds (specs/seam.md, ``infer_SEAM.py``) in the project's seeds artifact contract.

Inference: for every scale (0.5, 1, 1.5, 2) the image and its mirror image run through the trained
SEAM net; the PCM-refined CAMs (``cam_rv``) of the foreground channels are flipped back and summed over
scales and flips (IRNet's :func:`~src.inference.cams.multiscale_cams`, shared; its per-map ReLU is a
no-op here since the PCM output is a non-negative combination of the non-negative PCM seed).

The adapter to the contract (``cams/<id>.npz``: ``keys`` 1..K, ``cam`` at stride 4, ``high_res`` at the
image size, foreground only, values in [0, 1]) is, per map:

1. SEAM's channel 0 (background) is dropped: the reference never reads it at inference either
   (``cam[:, 1:]``); only the image's own classes are kept (the reference multiplies by the labels).
2. Each kept class is min-max normalised over the image as the reference:
   ``(s - min - 1e-5) / (max - min + 1e-5)`` with ``s = max(sum, 0)``. The reference sets the pixels with
   ``s < min + 1e-5`` to ``-(min + 1e-5) / (max - min + 1e-5)`` (slightly negative); we store 0 there,
   which changes no argmax against a non-negative background (ties go to the background first).
   The peak is (max - min - 1e-5) / (max - min + 1e-5) ~ 1, so the maps are also valid "divided by their
   max" maps for IRNet's consumers; only their zero moved to the image's minimum (which is why
   ``seam_irnet`` exposes IRNet's thresholds). ``cam`` and ``high_res`` are each normalised on their own
   grid, as IRNet's seeds are.

The background is never stored; each consumer forms it:
* seed scoring (this stage): a constant background plane, mIoU at ``eval_threshold`` (reference seed
  PNGs: 0.26) and the best of the ``sweep_thresholds`` sweep (reference: 0.00-0.59 on train), through
  :func:`~src.inference.cams.seed_metrics`;
* AffinityNet labels and walk: the alpha power ``(1 - max_fg) ** alpha`` (src/inference/affinity_labels.py,
  src/inference/affinity_walk.py);
* IRNet's IR labels and walk (``seam_irnet``): constant planes ``conf_fg`` / ``conf_bg`` / ``bg_threshold``.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from src.inference.cams import CAMInference, CAMSeedStage
from src.pipeline.stage import StageContext

EPS = 1e-5  # the reference's epsilon of the min-max normalisation


def minmax_normalise(maps: torch.Tensor, keys: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The maps (K, h, w) of the image's classes (0-based ``keys``), each clipped at 0 and min-max
    normalised as ``infer_SEAM.py`` (module docstring, step 2): values in [0, 1)."""
    sel = maps[keys].clamp_min(0)
    if not sel.numel():
        return sel
    flat = sel.flatten(1)
    lo = flat.amin(1).view(-1, 1, 1)
    hi = flat.amax(1).view(-1, 1, 1)
    return ((sel - lo - eps) / (hi - lo + eps)).clamp_min(0)


class SEAMCAMInference(CAMInference):
    """predict_step of :class:`CAMInference` on the SEAM net: PCM-refined foreground CAMs, min-max normalised."""

    def cam_fn(self, x: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        _, cam_rv = self.net.cams(x, prior)
        return cam_rv[:, 1:]

    def normalise(self, maps: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return minmax_normalise(maps, keys)


class SEAMSeedStage(CAMSeedStage):
    """Seeds of the SEAM classifier (conf/seeds/seam.yaml); same files and metrics as :class:`CAMSeedStage`."""

    def build_module(self, ctx: StageContext) -> tuple[pl.LightningModule, list]:
        from src.stages.classification import load_classifier

        net, prior, masks = load_classifier(ctx)
        net.eval()
        module = SEAMCAMInference(net, self.scales, self.flip, self.cam_stride, prior, self.dtype)
        return module, [masks] if masks is not None else []
