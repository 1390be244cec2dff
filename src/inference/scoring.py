"""Scoring written artifacts against ground truth, sharded across ranks and summed.

Scoring reads the files a stage wrote (not in-memory predictions), so a resumed stage that skipped
already-written images still scores every image, and 1 and N processes give identical numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from src.data.voc import VOCLayout
from src.metrics.segmentation import CAMThresholdSweep, SegmentationMetric, scores_from_confusion
from src.utils import dist
from src.utils.io import load_npz, read_label


def _gt(layout: VOCLayout, image_id: str) -> np.ndarray:
    return layout.read_gt(image_id)


def _shard(ids: Sequence[str]) -> Sequence[str]:
    return ids[dist.global_rank()::dist.world_size()]


def score_label_maps(layout: VOCLayout, ids: Sequence[str], pred_dir: Path, class_names: Sequence[str]) -> dict:
    """mIoU etc. of ``<pred_dir>/<id>.png`` against the ground truth of ``ids``."""
    n = len(class_names)
    metric = SegmentationMetric(n, class_names, sync_on_compute=False)  # summed below, NCCL or gloo alike
    for image_id in _shard(ids):
        path = Path(pred_dir) / f"{image_id}.png"
        pred = read_label(path)
        gt = _gt(layout, image_id)
        if pred.shape != gt.shape:
            raise ValueError(f"{path} is {pred.shape}, ground truth is {gt.shape}")
        if pred.max() >= n:
            raise ValueError(f"{path} holds class id {int(pred.max())} >= {n} ({n - 1} classes + background)")
        metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
    total = dist.all_reduce_sum(metric.confmat.clone()).numpy()
    out = scores_from_confusion(total, class_names)
    out["images"] = len(ids)
    return out


def score_cams(layout: VOCLayout, ids: Sequence[str], cam_dir: Path, class_names: Sequence[str],
               thresholds: Sequence[float], eval_threshold: float, key: str = "high_res") -> dict:
    """The seed protocol: mIoU at ``eval_threshold`` and the best threshold of the sweep."""
    thr = sorted(set(float(t) for t in thresholds) | {float(eval_threshold)})
    sweep = CAMThresholdSweep(len(class_names), thr)
    for image_id in _shard(ids):
        arrays = load_npz(Path(cam_dir) / f"{image_id}.npz")
        gt = _gt(layout, image_id)
        scores = arrays[key]
        if scores.shape[1:] != gt.shape:
            raise ValueError(f"{cam_dir}/{image_id}.npz '{key}' is {scores.shape[1:]}, ground truth is {gt.shape}")
        sweep.update(scores, arrays["keys"], gt)
    sweep.hist = dist.all_reduce_sum(torch.from_numpy(sweep.hist)).numpy()
    res = sweep.results(class_names)
    at = res["per_threshold"][thr.index(float(eval_threshold))]
    return {
        "threshold": float(eval_threshold),
        "at_threshold": at,
        "best_threshold": res["best_threshold"],
        "best": res["best"],
        "miou_per_threshold": dict(zip([round(t, 4) for t in res["thresholds"]], res["miou_per_threshold"])),
        "images": len(ids),
    }
