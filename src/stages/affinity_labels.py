"""AffinityNet's training labels from the seeds (specs/seam.md; PSA/SEAM ``infer_SEAM.py --out_crf``):
``labels/<id>.png`` at two background powers + dense CRF (:func:`~src.ops.labels.affinity_label`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl

from src.ops.labels import affinity_label
from src.stages.core import AUTO, Artifact, StageContext, alpha_for_threshold, auto_threshold
from src.stages.ir_labels import SeedLabelStage


class AffinityLabelStage(SeedLabelStage):
    """Confident foreground where the CRF keeps a class against bg = (1 - max fg) ** ``alpha_low``,
    confident background where it keeps the background against ``alpha_high``, unknown elsewhere.

    An alpha may be ``auto``: the power whose background equals the score at the seeds' best threshold plus
    ``auto_offsets[name]`` (src/stages/core.py ``alpha_for_threshold``: with SEAM's VOC seeds, best ~0.26,
    +0.0 gives ~4.5 and -0.16 gives ~22; the paper uses 4 / 24)."""

    metric_name = "aff_label"

    def __init__(self, alpha_low: float | str, alpha_high: float | str, auto_offsets: Mapping[str, float],
                 crf: Mapping[str, Any] | None, batch_size: int, inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(crf, batch_size, inputs)
        if AUTO not in (alpha_low, alpha_high):
            check_alphas(alpha_low, alpha_high)
        self.alpha_low, self.alpha_high, self.auto_offsets = alpha_low, alpha_high, dict(auto_offsets)

    def build_module(self, ctx: StageContext) -> pl.LightningModule:
        self._low, self._high = (auto_alpha(value, self.auto_offsets[name], ctx.input("cams"), name)
                                 for name, value in (("alpha_low", self.alpha_low), ("alpha_high", self.alpha_high)))
        check_alphas(self._low, self._high)
        return super().build_module(ctx)

    def label(self, scores: np.ndarray, keys: np.ndarray, image: np.ndarray) -> np.ndarray:
        return affinity_label(scores, keys, image, self._low, self._high, self.crf)

    def score(self, ctx: StageContext, folder: Path) -> dict[str, Any]:
        return {**super().score(ctx, folder), "alpha_low": self._low, "alpha_high": self._high}


def auto_alpha(value: float | str, offset: float, seeds: Artifact, name: str) -> float:
    """A background power: the configured number, or with ``auto`` the power for the seeds' best threshold
    plus ``offset``."""
    if value != AUTO:
        return float(value)
    return alpha_for_threshold(auto_threshold(AUTO, offset, seeds, name))


def check_alphas(alpha_low: float, alpha_high: float) -> None:
    if not 0 < alpha_low <= alpha_high:
        raise ValueError(f"affinity labels need 0 < alpha_low <= alpha_high, got {alpha_low}, {alpha_high}")
