"""IRNet stage 3: inter-pixel relation labels from the seeds (specs/irnet.md, cam_to_ir_label).

Confident foreground: a background plane at ``conf_fg`` (0.30), argmax over [background, classes], a
dense CRF. Confident background: the same at ``conf_bg`` (0.05). Foreground classes are taken from the
first map; background where BOTH say background; every other pixel is 255 (unknown). Full resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from src.data.datasets import WSSSDataset
from src.data.voc import IGNORE
from src.inference.cams import load_seeds
from src.inference.common import pending_ids, run_predict
from src.inference.crf import crf_refine_labels
from src.metrics.segmentation import confusion_matrix
from src.pipeline.stage import Stage, StageContext
from src.utils.io import read_label, save_label_png_atomic


def confident_labels(scores: np.ndarray, keys: np.ndarray, threshold: float, image: np.ndarray | None,
                     crf: Mapping[str, Any] | None) -> np.ndarray:
    """Class ids (H, W): argmax over [threshold plane, class scores], CRF-refined when ``crf`` is set."""
    padded = np.concatenate([np.full((1, *scores.shape[1:]), threshold, np.float32), scores.astype(np.float32)])
    pred = padded.argmax(0)
    if crf is not None and image is not None:
        pred = crf_refine_labels(image, pred, len(keys) + 1, crf)
    return np.concatenate([[0], np.asarray(keys, np.int64)])[pred]


def ir_label(scores: np.ndarray, keys: np.ndarray, image: np.ndarray | None, conf_fg: float, conf_bg: float,
             crf: Mapping[str, Any] | None) -> np.ndarray:
    """The IR label map (H, W) uint8: classes, 0 = confident background, 255 = unknown."""
    fg = confident_labels(scores, keys, conf_fg, image, crf)
    bg = confident_labels(scores, keys, conf_bg, image, crf)
    out = fg.copy()
    out[fg == 0] = IGNORE
    out[(fg == 0) & (bg == 0)] = 0
    return out.astype(np.uint8)


class SeedLabelModule(pl.LightningModule):
    """predict_step: a label map per image from its seeds and raw image (CPU work: the CRF)."""

    def __init__(self, cam_dir, label: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]) -> None:
        super().__init__()
        self.cam_dir, self.label = cam_dir, label

    @torch.no_grad()
    def predict_step(self, batch: list[dict], batch_idx: int) -> list[tuple[str, np.ndarray]]:
        out = []
        for sample in batch:
            seeds = load_seeds(self.cam_dir, sample["id"])
            out.append((sample["id"], self.label(seeds["high_res"], seeds["keys"], sample["raw"].numpy())))
        return out


class SeedLabelStage(Stage):
    """Base of the stages that turn seeds into label PNGs ``labels/<id>.png`` (IR labels, affinity labels):
    subclasses define :meth:`label`; metrics ``train/<metric_name>_coverage`` / ``_accuracy``."""

    folder = "labels"
    metric_name = "label"

    def __init__(self, crf: Mapping[str, Any] | None = None, batch_size: int = 8,
                 inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(inputs)
        self.batch_size = batch_size
        self.crf = None if crf is None else {k: (dict(v) if hasattr(v, "items") else v) for k, v in crf.items()}

    def label(self, scores: np.ndarray, keys: np.ndarray, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from src.inference.cams import CAMSeedStage

        folder = ctx.out_dir / self.folder
        ids = pending_ids(ctx.data.layout.ids(ctx.data.train_split), folder, ".png")
        dataset = WSSSDataset(ctx.data.layout, ctx.data.train_split, None, return_raw=True, ids=ids)
        module = SeedLabelModule(ctx.input("cams").file(CAMSeedStage.folder), self.label)
        run_predict(ctx, module, dataset, lambda i, lab: save_label_png_atomic(folder / f"{i}.png", lab),
                    self.batch_size)
        return ir_label_metrics(ctx, folder, self.metric_name)


class IRLabelStage(SeedLabelStage):
    metric_name = "ir_label"

    def __init__(self, conf_fg: float, conf_bg: float, crf: Mapping[str, Any] | None = None,
                 batch_size: int = 8, inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(crf, batch_size, inputs)
        if not 0 <= conf_bg <= conf_fg <= 1:
            raise ValueError(f"IR labels need 0 <= conf_bg <= conf_fg <= 1, got {conf_bg}, {conf_fg}")
        self.conf_fg, self.conf_bg = conf_fg, conf_bg

    def label(self, scores: np.ndarray, keys: np.ndarray, image: np.ndarray) -> np.ndarray:
        return ir_label(scores, keys, image, self.conf_fg, self.conf_bg, self.crf)


def ir_label_metrics(ctx: StageContext, folder, name: str = "ir_label") -> dict[str, Any]:
    """How much of the image the labels cover, and how often the confident labels are right (metric keys
    ``train/<name>_coverage``, ``train/<name>_accuracy``; AffinityNet's labels share this)."""
    ids = ctx.data.seed_eval_ids()
    if not ids:
        return {"summary": {}}
    n = len(ctx.data.class_names)
    known = total = 0
    conf = np.zeros((n, n), np.int64)
    for image_id in ids:
        lab = read_label(folder / f"{image_id}.png")
        gt = read_label(ctx.data.layout.mask_path(image_id))
        sure = lab != IGNORE
        known += int(sure.sum())
        total += lab.size
        gt_sure = np.where(sure, gt, IGNORE).astype(np.uint8)
        conf += confusion_matrix(np.where(sure, lab, 0), gt_sure, n)
    accuracy = float(np.trace(conf) / max(1, conf.sum()))
    return {"summary": {f"train/{name}_coverage": known / max(1, total), f"train/{name}_accuracy": accuracy}}
