"""AffinityNet's training labels from the seeds (specs/seam.md; PSA/SEAM ``infer_SEAM.py --out_crf``).

Per image, with the seeds' foreground maps ``high_res`` (n, H, W) of the image's classes:

* scores at background power alpha: [bg, fg_1..fg_n] with bg = (1 - max_k fg_k) ** alpha, refined by a
  dense CRF (:func:`~src.inference.crf.crf_refine_probs`, the reference's unnormalised scores as unary);
* ``alpha_low`` (4): a strong background; pixels whose CRF argmax is still a class are *confident
  foreground*; ``alpha_high`` (24): a weak background; pixels whose CRF argmax is still the background are
  *confident background*;
* the label PNG (H, W) uint8: the class id where the low-alpha argmax is a class, 0 where the high-alpha
  argmax is the background (it wins, as in the reference's ``VOC12AffDataset``), 255 (unknown) elsewhere.

The reference keeps both CRF score maps and takes the argmax after pooling the training crop 8x8; here
the labels are full-resolution PNGs and the training step pools the label map to the stride-8 grid with
the same argmax rule (src/stages/affinity.py :func:`~src.stages.affinity.stride_labels`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from src.data.voc import IGNORE
from src.inference.crf import crf_refine_probs
from src.inference.ir_labels import SeedLabelStage


def alpha_scores(fg: np.ndarray, alpha: float) -> np.ndarray:
    """[bg, fg...] (n + 1, H, W) float32 with bg = (1 - max fg) ** alpha (all background when n = 0)."""
    fg = np.asarray(fg, np.float32)
    peak = fg.max(0) if len(fg) else np.zeros(fg.shape[1:], np.float32)
    bg = np.power(np.clip(1.0 - peak, 0.0, None), alpha)[None]
    return np.concatenate([bg, fg]).astype(np.float32)


def alpha_argmax(fg: np.ndarray, alpha: float, image: np.ndarray | None,
                 crf: Mapping[str, Any] | None) -> np.ndarray:
    """Index (H, W) into [bg, fg...] of the (CRF-refined when ``crf`` is set) alpha-power scores."""
    scores = alpha_scores(fg, alpha)
    if crf is not None and image is not None and len(scores) > 1:
        scores = crf_refine_probs(image, scores, crf)
    return scores.argmax(0)


def affinity_label(fg: np.ndarray, keys: np.ndarray, image: np.ndarray | None, alpha_low: float,
                   alpha_high: float, crf: Mapping[str, Any] | None) -> np.ndarray:
    """The label map (H, W) uint8 of the module docstring: class ids, 0 = confident background, 255 unknown."""
    ids = np.concatenate([[0], np.asarray(keys, np.int64)])
    low = alpha_argmax(fg, alpha_low, image, crf)
    high = alpha_argmax(fg, alpha_high, image, crf)
    out = ids[low]
    out[low == 0] = IGNORE
    out[high == 0] = 0
    return out.astype(np.uint8)


class AffinityLabelStage(SeedLabelStage):
    """Label PNGs ``labels/<id>.png`` for AffinityNet (conf/refinement/affinity.yaml ``affinity_labels``)."""

    metric_name = "aff_label"

    def __init__(self, alpha_low: float, alpha_high: float, crf: Mapping[str, Any] | None = None,
                 batch_size: int = 8, inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(crf, batch_size, inputs)
        if not 0 < alpha_low <= alpha_high:
            raise ValueError(f"affinity labels need 0 < alpha_low <= alpha_high, got {alpha_low}, {alpha_high}")
        self.alpha_low, self.alpha_high = alpha_low, alpha_high

    def label(self, scores: np.ndarray, keys: np.ndarray, image: np.ndarray) -> np.ndarray:
        return affinity_label(scores, keys, image, self.alpha_low, self.alpha_high, self.crf)
