"""AffinityNet's training labels from the seeds (specs/seam.md; PSA/SEAM ``infer_SEAM.py --out_crf``):
``labels/<id>.png`` at two background powers + dense CRF (:func:`~src.ops.labels.affinity_label`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from src.ops.labels import affinity_label
from src.stages.ir_labels import SeedLabelStage


class AffinityLabelStage(SeedLabelStage):
    """Confident foreground where the CRF keeps a class against bg = (1 - max fg) ** ``alpha_low``,
    confident background where it keeps the background against ``alpha_high``, unknown elsewhere."""

    metric_name = "aff_label"

    def __init__(self, alpha_low: float, alpha_high: float, crf: Mapping[str, Any] | None, batch_size: int,
                 inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(crf, batch_size, inputs)
        if not 0 < alpha_low <= alpha_high:
            raise ValueError(f"affinity labels need 0 < alpha_low <= alpha_high, got {alpha_low}, {alpha_high}")
        self.alpha_low, self.alpha_high = alpha_low, alpha_high

    def label(self, scores: np.ndarray, keys: np.ndarray, image: np.ndarray) -> np.ndarray:
        return affinity_label(scores, keys, image, self.alpha_low, self.alpha_high, self.crf)
