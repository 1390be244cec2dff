"""Seeds: multi-scale + flip class activation maps of the trained classifier over the train split
(IRNet's ``make_cam``, SEAM's ``infer_SEAM.py``), and their score by the WSSS seed protocol.

The CAM rule is the network's: ``net.seed_cams(x, prior)`` gives the foreground maps that become seeds
(IRNet's CAM net: its CAMs; SEAM: its PCM-refined CAMs without the background channel). The merge over
scales and flips is :func:`~src.ops.cams.multiscale_cams`; the per-class normalisation is ``normalise``
(``max``: divided by the max, IRNet; ``minmax``: SEAM); ``pyramid`` (``torch`` | ``pil``) and ``upsample``
(``direct`` | ``via_input``) choose how the image is rescaled and the maps resized (the references: ``pil``;
IRNet ``direct``, SEAM ``via_input``). Files ``cams/<id>.npz``: ``keys`` (class ids
1..K), ``cam`` at stride 4 (the random walk's input) and ``high_res`` at the image size, foreground only.
The background is never stored: each consumer forms it (a constant plane when scoring and for IRNet's
refinement, the alpha power for AffinityNet's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from src.ops.cams import NORMALISATIONS, PYRAMIDS, UPSAMPLES, multiscale_cams, pil_pyramid
from src.stages.classification import load_classifier
from src.stages.core import CAMS, StageContext, check_number
from src.stages.predict import PerImagePredictStage, same_size_groups, score_cam_folder, thresholds_from
from src.utils.config import check_choice
from src.utils.io import save_npz_atomic
from src.utils.logging import get_logger

log = get_logger(__name__)


class CAMInference(pl.LightningModule):
    """predict_step: per-image seeds {keys (1..K), cam, high_res} of a classifier with ``seed_cams(x, prior)``."""

    def __init__(self, net: torch.nn.Module, scales: Sequence[float], flip: bool, cam_stride: int,
                 context: torch.nn.Module | None = None, dtype: str = "float32", normalise: str = "max",
                 pyramid: str = "torch", upsample: str = "direct", mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.net, self.context = net, context
        self.scales, self.flip, self.cam_stride = list(scales), flip, cam_stride
        self.np_dtype = np.dtype(dtype)
        self.normalise = NORMALISATIONS[normalise]
        if pyramid == "pil" and (mean is None or std is None):
            raise ValueError("the pil pyramid normalises the raw image itself: give the data's mean and std")
        self.pyramid, self.upsample, self.mean, self.std = pyramid, upsample, mean, std

    def cam_fn(self, x: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        return self.net.seed_cams(x, prior)

    @torch.no_grad()
    def predict_step(self, batch: list[dict], batch_idx: int) -> list[tuple[str, dict]]:
        out = []
        for group in same_size_groups(batch):
            images = torch.stack([s["image"] for s in group]).to(self.device)
            prior = None
            if self.context is not None:
                prior = self.context(torch.stack([s["context_mask"] for s in group]).to(self.device))
            pyramid = None  # torch: rescale the normalised images
            if self.pyramid == "pil":
                pyramid = pil_pyramid(torch.stack([s["raw"] for s in group]), self.mean, self.std, self.device)
            cams, highs = multiscale_cams(self.cam_fn, images, self.scales, self.flip, self.cam_stride,
                                          self.net.output_stride, prior, pyramid, self.upsample)
            for s, cam, high in zip(group, cams, highs):
                keys = torch.nonzero(s["label"]).flatten().to(self.device)
                out.append((s["id"], {
                    "keys": (keys + 1).to(torch.int16).cpu().numpy(),
                    "cam": self.normalise(cam, keys).cpu().numpy().astype(self.np_dtype),
                    "high_res": self.normalise(high, keys).cpu().numpy().astype(self.np_dtype),
                }))
        return out


class SeedStage(PerImagePredictStage):
    """Seeds of the ``model`` input's classifier (with CONTA's ``context`` in the rounds that have one)."""

    optional_inputs = frozenset({"context"})
    folder = CAMS
    suffix = ".npz"

    def __init__(self, scales: Sequence[float], flip: bool, cam_stride: int, normalise: str,
                 eval_threshold: float, sweep_thresholds: Mapping[str, float], dtype: str, batch_size: int,
                 pyramid: str, upsample: str, inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(batch_size, inputs)
        check_choice("normalise", normalise, NORMALISATIONS)
        check_choice("pyramid", pyramid, PYRAMIDS)
        check_choice("upsample", upsample, UPSAMPLES)
        check_choice("dtype", dtype, ("float16", "float32"))
        check_number("eval_threshold", eval_threshold, 0.0, 1.0)
        check_number("cam_stride", cam_stride, 1, integer=True)
        self.scales, self.flip, self.cam_stride, self.normalise = list(scales), flip, cam_stride, normalise
        self.eval_threshold, self.sweep = eval_threshold, dict(sweep_thresholds)
        self.dtype, self.pyramid, self.upsample = dtype, pyramid, upsample

    def build_module(self, ctx: StageContext) -> pl.LightningModule:
        net, prior, masks = load_classifier(ctx.input("model"), ctx.optional("context"))
        self._extras = [masks] if masks is not None else []
        return CAMInference(net, self.scales, self.flip, self.cam_stride, prior, self.dtype, self.normalise,
                            self.pyramid, self.upsample, list(ctx.data.mean), list(ctx.data.std))

    def dataset_options(self, ctx: StageContext) -> dict[str, Any]:
        return {"transform": ctx.eval_transform(), "extras": self._extras, "return_raw": self.pyramid == "pil"}

    def write(self, path: Path, payload: dict) -> None:
        save_npz_atomic(path, **payload)

    def score(self, ctx: StageContext, folder: Path) -> dict[str, Any]:
        return seed_metrics(ctx, folder, self.eval_threshold, thresholds_from(self.sweep))


def seed_metrics(ctx: StageContext, folder: Path, eval_threshold: float, thresholds: Sequence[float]) -> dict:
    data = ctx.data
    ids = data.seed_eval_ids()
    if not ids:
        return {"summary": {}, "note": "no ground truth on the train split: seeds not scored"}
    res = score_cam_folder(data, ids, folder, thresholds, eval_threshold)
    widened = widen(thresholds, res["best_threshold"])
    if widened:  # the best lay at the sweep's end: it may lie above; sweep on to 1 (only the new thresholds)
        log.info(f"the best seed threshold {res['best_threshold']:g} is the sweep's upper end: sweeping on to "
                 f"{widened[-1]:g}")
        more = score_cam_folder(data, ids, folder, [t for t in widened if t > max(thresholds)], eval_threshold)
        res = {**(more if more["best"]["miou"] > res["best"]["miou"] else res),  # a tie keeps the lower threshold
               "miou_per_threshold": {**res["miou_per_threshold"], **more["miou_per_threshold"]},
               "widened_from": max(thresholds)}
    split = data.seed_metric_split
    res["summary"] = {
        f"{split}/seed_best_miou": res["best"]["miou"],
        f"{split}/seed_best_threshold": res["best_threshold"],
        f"{split}/seed_miou": res["at_threshold"]["miou"],
    }
    res["provides"] = {"best_threshold": res["best_threshold"]}
    return res


def widen(thresholds: Sequence[float], best: float) -> list[float] | None:
    """The sweep continued to 1 (same step) when its best threshold is its upper end, else None."""
    top = max(thresholds)
    if best < top or top >= 1.0 or len(thresholds) < 2:
        return None
    step = round(sorted(thresholds)[-1] - sorted(thresholds)[-2], 6)
    return thresholds_from({"start": min(thresholds), "stop": 1.0, "step": step})

