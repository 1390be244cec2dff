"""Per-image predict stages: one ``trainer.predict`` pass that writes a file per image, then a score.

Every inference stage (seeds, IR / affinity labels, both random walks, the segmentation's eval
predictions, the confounder set) runs the same plumbing: the ids whose file is not written yet (a killed
run resumes there), a dataset over them, ``trainer.predict`` with a per-image writer (each rank writes its
own shard, no duplicates), then a score computed from the written files (so a resumed or multi-process
run scores exactly the same pixels). :class:`PerImagePredictStage` is that loop; subclasses give the
module, the dataset's options, the writer and the score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytorch_lightning as pl
import torch
from torchmetrics.aggregation import SumMetric

from src.callbacks.writer import PerImageWriter
from src.data.bundle import DataBundle
from src.data.datamodule import WSSSDataModule
from src.data.datasets import WSSSDataset
from src.metrics.segmentation import CAMThresholdSweep, SegmentationMetric
from src.stages.core import Stage, StageContext, check_number
from src.utils import dist
from src.utils.io import load_npz, read_label, save_label_png_atomic
from src.utils.labels import IGNORE


def same_size_groups(batch: list[dict]) -> list[list[dict]]:
    """Split a list batch into groups of equally sized images (each group runs as one tensor batch)."""
    groups: dict[tuple, list[dict]] = {}
    for sample in batch:
        groups.setdefault(tuple(sample["image"].shape), []).append(sample)
    return list(groups.values())


def pending_ids(ids: Sequence[str], folder: Path, suffix: str) -> list[str]:
    """Ids whose output file does not exist yet (resume after an interruption)."""
    folder = Path(folder)
    done = {p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}")} if folder.is_dir() else set()
    return [i for i in ids if i not in done]


def run_predict(ctx: StageContext, module: pl.LightningModule, dataset: WSSSDataset,
                write: Callable[[str, Any], None], batch_size: int,
                callbacks: Sequence[pl.Callback] = ()) -> None:
    """trainer.predict over ``dataset`` with a per-image writer (each rank writes its own shard)."""
    if len(dataset) == 0 and not callbacks:
        dist.barrier()
        return
    trainer = ctx.make_trainer(callbacks=[PerImageWriter(write), *callbacks])
    dm = WSSSDataModule(predict=dataset, eval_batch_size=batch_size, **ctx.loader_kwargs())
    trainer.predict(module, datamodule=dm, return_predictions=False)
    dist.barrier()


def write_label_png(path: Path, label: np.ndarray) -> None:
    save_label_png_atomic(path, label)


def predict_to_folder(ctx: StageContext, module: pl.LightningModule, split: str, folder: Path, suffix: str,
                      write: Callable[[Path, Any], None], batch_size: int, **dataset_options: Any) -> None:
    """Predict every image of ``split`` whose ``<folder>/<id><suffix>`` is missing; ``write(path, payload)``
    writes one. ``dataset_options`` go to :class:`WSSSDataset` (transform, extras, return_raw...)."""
    ids = pending_ids(ctx.data.layout.ids(split), folder, suffix)
    dataset = WSSSDataset(ctx.data.layout, split, ids=ids, **dataset_options)
    run_predict(ctx, module, dataset, lambda i, payload: write(folder / f"{i}{suffix}", payload), batch_size)


class PerImagePredictStage(Stage):
    """A stage that predicts one file per train image into ``folder`` and scores the folder."""

    folder: ClassVar[str]
    suffix: ClassVar[str] = ".png"

    def __init__(self, batch_size: int, inputs=None) -> None:
        super().__init__(inputs)
        check_number("batch_size", batch_size, 1, integer=True)
        self.batch_size = batch_size

    def build_module(self, ctx: StageContext) -> pl.LightningModule:
        raise NotImplementedError

    def dataset_options(self, ctx: StageContext) -> dict[str, Any]:
        """Options of the dataset the module reads (default: the normalised image)."""
        return {"transform": ctx.eval_transform()}

    def write(self, path: Path, payload: Any) -> None:
        write_label_png(path, payload)

    def score(self, ctx: StageContext, folder: Path) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, ctx: StageContext) -> dict[str, Any]:
        folder = ctx.out_dir / self.folder
        module = self.build_module(ctx)
        predict_to_folder(ctx, module, ctx.data.train_split, folder, self.suffix, self.write, self.batch_size,
                          **self.dataset_options(ctx))
        return self.score(ctx, folder)


# ------------------------------------------------------------------------------------------ scoring
def thresholds_from(spec: Mapping[str, float]) -> list[float]:
    """The background thresholds start, start + step, ... < stop of a sweep config."""
    n = int(math.floor((spec["stop"] - spec["start"]) / spec["step"] + 1e-9))
    return [round(spec["start"] + i * spec["step"], 6) for i in range(n)]


def _shard(ids: Sequence[str]) -> Sequence[str]:
    return ids[dist.global_rank()::dist.world_size()]


def _on_reduce_device(metric):
    return metric.to(dist.reduce_device())


def score_label_folder(data: DataBundle, ids: Sequence[str], folder: Path) -> dict[str, Any]:
    """mIoU, per-class IoU / precision / recall of ``<folder>/<id>.png`` against the ground truth of ``ids``
    (each rank scores its shard; the confusion matrix is summed over ranks)."""
    names = data.class_names
    n = len(names)
    metric = _on_reduce_device(SegmentationMetric(n, names))
    for image_id in _shard(ids):
        path = Path(folder) / f"{image_id}.png"
        pred = read_label(path)
        gt = data.layout.read_gt(image_id)
        if pred.shape != gt.shape:
            raise ValueError(f"{path} is {pred.shape}, ground truth is {gt.shape}")
        if pred.max() >= n:
            raise ValueError(f"{path} holds class id {int(pred.max())} >= {n} ({n - 1} classes + background)")
        metric.update(torch.from_numpy(pred).to(metric.device), torch.from_numpy(gt).to(metric.device))
    out = metric.scores()
    out["images"] = len(ids)
    return out


def score_cam_folder(data: DataBundle, ids: Sequence[str], folder: Path, thresholds: Sequence[float],
                     eval_threshold: float, key: str = "high_res") -> dict[str, Any]:
    """The seed protocol on ``<folder>/<id>.npz`` (``key`` scores at the image size, ``keys`` class ids)."""
    def read(image_id: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        arrays = load_npz(Path(folder) / f"{image_id}.npz")
        if arrays[key].shape[1:] != shape:
            raise ValueError(f"{folder}/{image_id}.npz '{key}' is {arrays[key].shape[1:]}, ground truth is {shape}")
        return arrays[key], arrays["keys"]

    return sweep_scores(data, ids, read, thresholds, eval_threshold)


def sweep_scores(data: DataBundle, ids: Sequence[str],
                 read: Callable[[str, tuple[int, int]], tuple[np.ndarray, np.ndarray]],
                 thresholds: Sequence[float], eval_threshold: float) -> dict[str, Any]:
    """The seed protocol on any foreground scores: mIoU at ``eval_threshold`` and at the best threshold of the
    sweep (a constant background plane, argmax). ``read(id, gt shape)`` gives (scores (n, H, W), class ids)."""
    thr = sorted({round(float(t), 6) for t in thresholds} | {round(float(eval_threshold), 6)})
    sweep = _on_reduce_device(CAMThresholdSweep(len(data.class_names), thr))
    for image_id in _shard(ids):
        gt = data.layout.read_gt(image_id)
        scores, keys = read(image_id, gt.shape)
        sweep.update(scores, keys, gt)
    res = sweep.results(data.class_names)
    at = res["per_threshold"][thr.index(round(float(eval_threshold), 6))]
    return {
        "threshold": float(eval_threshold),
        "at_threshold": at,
        "best_threshold": res["best_threshold"],
        "best": res["best"],
        "miou_per_threshold": dict(zip([round(t, 4) for t in res["thresholds"]], res["miou_per_threshold"])),
        "images": len(ids),
    }


def label_coverage(data: DataBundle, folder: Path, name: str) -> dict[str, Any]:
    """How much of the image refiner labels cover, and how often the confident labels are right (metric
    keys ``<split>/<name>_coverage``, ``<split>/<name>_accuracy``)."""
    ids = data.seed_eval_ids()
    if not ids:
        return {"summary": {}}
    n = len(data.class_names)
    metric = _on_reduce_device(SegmentationMetric(n, data.class_names))
    known, total = (_on_reduce_device(SumMetric()) for _ in range(2))
    for image_id in _shard(ids):
        lab = read_label(Path(folder) / f"{image_id}.png")
        gt = data.layout.read_gt(image_id)
        sure = lab != IGNORE
        known.update(float(sure.sum()))
        total.update(float(lab.size))
        metric.update(torch.from_numpy(np.where(sure, lab, 0)).to(metric.device),
                      torch.from_numpy(np.where(sure, gt, IGNORE).astype(np.uint8)).to(metric.device))
    known, total = float(known.compute()), float(total.compute())
    conf = metric.compute().cpu().numpy()
    split = data.seed_metric_split
    return {"summary": {f"{split}/{name}_coverage": known / max(1, total),
                        f"{split}/{name}_accuracy": float(np.trace(conf) / max(1, conf.sum()))}}


def mask_metrics(data: DataBundle, folder: Path) -> dict[str, Any]:
    """Pseudo-mask quality on the scored train images (mIoU, precision, recall, per class)."""
    ids = data.seed_eval_ids()
    if not ids:
        return {"summary": {}, "note": "no ground truth on the train split: pseudo-masks not scored"}
    res = score_label_folder(data, ids, folder)
    split = data.seed_metric_split
    res["summary"] = {f"{split}/mask_miou": res["miou"], f"{split}/mask_precision": res["mean_precision"],
                      f"{split}/mask_recall": res["mean_recall"]}
    return res

