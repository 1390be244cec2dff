"""IRNet stage 3: inter-pixel relation labels from the seeds (specs/irnet.md, ``cam_to_ir_label``), and the
base of every stage that turns seeds into refiner labels (AffinityNet's labels share it).

Per train image: the seeds' ``high_res`` maps and the raw image -> a label PNG ``labels/<id>.png`` (class
ids, 0 = confident background, 255 = unknown; :func:`~src.ops.labels.ir_label`). Scored as coverage (share
of known pixels) and accuracy of the known pixels on the train images with ground truth.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from src.ops.labels import ir_label
from src.stages.core import AUTO, CAMS, LABELS, StageContext, auto_threshold, check_number, container, load_seeds
from src.stages.predict import PerImagePredictStage, label_coverage


class SeedLabelModule(pl.LightningModule):
    """predict_step: a label map per image from its seeds and raw image (CPU work: the CRF)."""

    def __init__(self, cam_dir: Path, label: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]) -> None:
        super().__init__()
        self.cam_dir, self.label = cam_dir, label

    @torch.no_grad()
    def predict_step(self, batch: list[dict], batch_idx: int) -> list[tuple[str, np.ndarray]]:
        out = []
        for sample in batch:
            seeds = load_seeds(self.cam_dir, sample["id"])
            out.append((sample["id"], self.label(seeds["high_res"], seeds["keys"], sample["raw"].cpu().numpy())))
        return out


class SeedLabelStage(PerImagePredictStage):
    """Label PNGs ``labels/<id>.png`` from the ``cams`` input; subclasses define :meth:`label`. Metrics
    ``<split>/<metric_name>_coverage`` / ``_accuracy``."""

    folder = LABELS
    metric_name = "label"

    def __init__(self, crf: Mapping[str, Any] | None, batch_size: int, inputs: Mapping[str, str] | None = None
                 ) -> None:
        super().__init__(batch_size, inputs)
        self.crf = container(crf)

    def label(self, scores: np.ndarray, keys: np.ndarray, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def build_module(self, ctx: StageContext) -> pl.LightningModule:
        return SeedLabelModule(ctx.input("cams").file(CAMS), self.label)

    def dataset_options(self, ctx: StageContext) -> dict[str, Any]:
        return {"transform": None, "return_raw": True}

    def score(self, ctx: StageContext, folder: Path) -> dict[str, Any]:
        return label_coverage(ctx.data, folder, self.metric_name)


class IRLabelStage(SeedLabelStage):
    """IR labels at the confidence thresholds ``conf_fg`` / ``conf_bg`` (background planes), CRF-refined.

    Either threshold may be ``auto``: the seeds' best threshold plus ``auto_offsets[name]`` (ReCAM's authors
    advise conf_fg = best + 0.10..0.15, conf_bg = best - 0.10; src/stages/core.py ``auto_threshold``)."""

    metric_name = "ir_label"

    def __init__(self, conf_fg: float | str, conf_bg: float | str, auto_offsets: Mapping[str, float],
                 crf: Mapping[str, Any] | None, batch_size: int, inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(crf, batch_size, inputs)
        for name, value in (("conf_fg", conf_fg), ("conf_bg", conf_bg)):
            if value != AUTO:
                check_number(name, value, 0.0, 1.0)
        if AUTO not in (conf_fg, conf_bg):
            check_order(float(conf_fg), float(conf_bg))
        self.conf_fg, self.conf_bg, self.auto_offsets = conf_fg, conf_bg, dict(auto_offsets)

    def build_module(self, ctx: StageContext) -> pl.LightningModule:
        seeds = ctx.input("cams")
        self._fg = auto_threshold(self.conf_fg, self.auto_offsets["conf_fg"], seeds, "conf_fg")
        self._bg = auto_threshold(self.conf_bg, self.auto_offsets["conf_bg"], seeds, "conf_bg")
        check_order(self._fg, self._bg)
        return super().build_module(ctx)

    def label(self, scores: np.ndarray, keys: np.ndarray, image: np.ndarray) -> np.ndarray:
        return ir_label(scores, keys, image, self._fg, self._bg, self.crf)

    def score(self, ctx: StageContext, folder: Path) -> dict[str, Any]:
        return {**super().score(ctx, folder), "conf_fg": self._fg, "conf_bg": self._bg}


def check_order(conf_fg: float, conf_bg: float) -> None:
    if conf_bg > conf_fg:
        raise ValueError(f"IR labels need conf_bg <= conf_fg, got conf_bg={conf_bg}, conf_fg={conf_fg}")
