"""Dense CRF refinement of a label map (Kraehenbuehl & Koltun), through the pydensecrf2 package.

Used by IRNet's IR labels, SEAM/PSA's affinity labels and optional segmentation post-processing.
Settings come from config (``crf:`` blocks): iterations, gt_prob of the label unary, and the Gaussian
and bilateral pairwise kernels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_labels, unary_from_softmax
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise ImportError("the dense CRF needs the 'pydensecrf2' package: pip install pydensecrf2") from err
    return dcrf, unary_from_labels, unary_from_softmax


def _pairwise(crf, image: np.ndarray, cfg: Mapping[str, Any]) -> None:
    g, b = cfg["gaussian"], cfg["bilateral"]
    crf.addPairwiseGaussian(sxy=g["sxy"], compat=g["compat"])
    crf.addPairwiseBilateral(sxy=b["sxy"], srgb=b["srgb"], rgbim=np.ascontiguousarray(image, dtype=np.uint8),
                             compat=b["compat"])


def crf_refine_labels(image: np.ndarray, labels: np.ndarray, n_labels: int, cfg: Mapping[str, Any]) -> np.ndarray:
    """Refine a label map (H, W) with values in 0..n_labels-1 on the uint8 RGB image (H, W, 3);
    returns the CRF's argmax (H, W) int64. The unary trusts each label with probability gt_prob."""
    dcrf, unary_from_labels, _ = _densecrf()
    h, w = labels.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"CRF image {image.shape[:2]} and labels {labels.shape} differ in size")
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(unary_from_labels(labels.astype(np.int32), n_labels, gt_prob=cfg["gt_prob"],
                                         zero_unsure=False))
    _pairwise(crf, image, cfg)
    q = np.asarray(crf.inference(int(cfg["iterations"])))
    return q.reshape(n_labels, h, w).argmax(0)


def crf_refine_probs(image: np.ndarray, probs: np.ndarray, cfg: Mapping[str, Any]) -> np.ndarray:
    """Refine class probabilities (C, H, W); returns the CRF's marginals (C, H, W) float32."""
    dcrf, _, unary_from_softmax = _densecrf()
    c, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.clip(probs, 1e-8, 1.0).astype(np.float32))))
    _pairwise(crf, image, cfg)
    return np.asarray(crf.inference(int(cfg["iterations"])), np.float32).reshape(c, h, w)
