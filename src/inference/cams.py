"""Seeds: multi-scale + flip class activation maps of a trained classifier (IRNet's make_cam).

For every scale the image and its mirror image run as one batch; ReLU'd maps are flipped back, summed
over scales and flips, and resized twice: to stride 4 (``cam``, the random walk's input) and to the
image size (``high_res``, for IR labels and scoring). Only the image's own classes are kept, each
divided by its max (+1e-5). Images of the same size are batched together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from src.data.datasets import WSSSDataset
from src.inference.common import pending_ids, run_predict, same_size_groups
from src.inference.scoring import score_cams
from src.pipeline.stage import Stage, StageContext
from src.utils.io import load_npz, save_npz_atomic
from src.utils.logging import get_logger

log = get_logger(__name__)

CamFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


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


def keep_and_normalise(maps: torch.Tensor, keys: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The maps of the image's classes (0-based ``keys``), each divided by its max + eps."""
    sel = maps[keys]
    return sel / (sel.flatten(1).amax(1).view(-1, 1, 1) + eps) if sel.numel() else sel


class CAMInference(pl.LightningModule):
    """predict_step: per-image seeds {keys (1..K), cam, high_res} of a classifier with ``cams(x, prior)``."""

    def __init__(self, net: torch.nn.Module, scales: Sequence[float], flip: bool, cam_stride: int,
                 context: torch.nn.Module | None = None, dtype: str = "float16") -> None:
        super().__init__()
        self.net, self.context = net, context
        self.scales, self.flip, self.cam_stride = list(scales), flip, cam_stride
        self.np_dtype = np.dtype(dtype)

    def cam_fn(self, x: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        return self.net.cams(x, prior)

    def normalise(self, maps: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The stored maps of the image's classes (a hook: SEAM min-max normalises instead)."""
        return keep_and_normalise(maps, keys)

    @torch.no_grad()
    def predict_step(self, batch: list[dict], batch_idx: int) -> list[tuple[str, dict]]:
        out = []
        for group in same_size_groups(batch):
            images = torch.stack([s["image"] for s in group]).to(self.device)
            prior = None
            if self.context is not None:
                prior = self.context(torch.stack([s["context_mask"] for s in group]).to(self.device))
            cams, highs = multiscale_cams(self.cam_fn, images, self.scales, self.flip, self.cam_stride,
                                          self.net.output_stride, prior)
            for s, cam, high in zip(group, cams, highs):
                keys = torch.nonzero(s["label"]).flatten().to(self.device)
                out.append((s["id"], {
                    "keys": (keys + 1).to(torch.int16).cpu().numpy(),
                    "cam": self.normalise(cam, keys).cpu().numpy().astype(self.np_dtype),
                    "high_res": self.normalise(high, keys).cpu().numpy().astype(self.np_dtype),
                }))
        return out


def thresholds_from(spec: Mapping[str, float]) -> list[float]:
    n = int(math.floor((spec["stop"] - spec["start"]) / spec["step"] + 1e-9))
    return [round(spec["start"] + i * spec["step"], 6) for i in range(n)]


class CAMSeedStage(Stage):
    """Seeds of IRNet-style classifiers (``net.cams``); files ``cams/<id>.npz``."""

    uses_context = True
    folder = "cams"

    def __init__(self, scales: Sequence[float], flip: bool, cam_stride: int, eval_threshold: float,
                 sweep_thresholds: Mapping[str, float], dtype: str = "float16", batch_size: int = 8,
                 inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(inputs)
        self.scales, self.flip, self.cam_stride = list(scales), flip, cam_stride
        self.eval_threshold, self.sweep = eval_threshold, dict(sweep_thresholds)
        self.dtype, self.batch_size = dtype, batch_size

    def build_module(self, ctx: StageContext) -> tuple[pl.LightningModule, list]:
        from src.stages.classification import load_classifier

        net, prior, masks = load_classifier(ctx)
        net.eval()
        module = CAMInference(net, self.scales, self.flip, self.cam_stride, prior, self.dtype)
        return module, [masks] if masks is not None else []

    def run(self, ctx: StageContext) -> dict[str, Any]:

        module, extras = self.build_module(ctx)
        folder = ctx.out_dir / self.folder
        ids = pending_ids(ctx.data.layout.ids(ctx.data.train_split), folder, ".npz")
        dataset = WSSSDataset(ctx.data.layout, ctx.data.train_split, ctx.eval_transform(), extras=extras, ids=ids)

        def write(image_id: str, arrays: dict) -> None:
            save_npz_atomic(folder / f"{image_id}.npz", **arrays)

        run_predict(ctx, module, dataset, write, self.batch_size)
        return seed_metrics(ctx, folder, self.eval_threshold, thresholds_from(self.sweep))


def seed_metrics(ctx: StageContext, folder: Path, eval_threshold: float, thresholds: Sequence[float]) -> dict:
    ids = ctx.data.seed_eval_ids()
    if not ids:
        return {"summary": {}, "note": "no ground truth on the train split: seeds not scored"}
    res = score_cams(ctx.data.layout, ids, folder, ctx.data.class_names, thresholds, eval_threshold)
    res["summary"] = {
        "train/seed_miou": res["at_threshold"]["miou"],
        "train/seed_best_miou": res["best"]["miou"],
        "train/seed_best_threshold": res["best_threshold"],
    }
    if res["best_threshold"] >= max(thresholds) and max(thresholds) < 1.0:
        res["note"] = (f"the best seed threshold {res['best_threshold']:g} is the upper end of the sweep: the best "
                       "may lie above it; widen baseline.seeds.sweep_thresholds.stop to find it")
        log.warning(res["note"])
    return res


def load_seeds(folder: Path, image_id: str) -> dict[str, np.ndarray]:
    """The seeds of one image: keys (class ids 1..K), cam (stride 4), high_res (image size)."""
    return load_npz(Path(folder) / f"{image_id}.npz")

