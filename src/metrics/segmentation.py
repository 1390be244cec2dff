"""Segmentation metrics from a dataset-level confusion matrix (the VOC protocol).

IoU_c = TP / (TP + FP + FN); mIoU = mean over the classes that occur in ground truth or prediction
(nanmean, as the reference evaluation). Pixels labelled 255 are ignored. Both metrics below are
torchmetrics ``Metric``s whose states are summed across DDP ranks on ``compute()``, so 1 and N processes
give the same numbers (move them to :func:`src.utils.dist.reduce_device` first under NCCL).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix

from src.utils.labels import IGNORE


def scores_from_confusion(confusion: np.ndarray | torch.Tensor, class_names: Sequence[str] | None = None
                          ) -> dict:
    """mIoU, per-class IoU/precision/recall and pixel accuracy of a (C, C) matrix [gt, pred]."""
    conf = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion, dtype=np.float64)
    tp = np.diag(conf)
    gt = conf.sum(1)
    pred = conf.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (gt + pred - tp)
        precision = tp / pred
        recall = tp / gt
    total = conf.sum()
    names = list(class_names) if class_names is not None else [str(i) for i in range(conf.shape[0])]

    def per_class(values: np.ndarray) -> dict[str, float | None]:
        return {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, values)}

    return {
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "mean_precision": float(np.nanmean(precision)) if np.isfinite(precision).any() else float("nan"),
        "mean_recall": float(np.nanmean(recall)) if np.isfinite(recall).any() else float("nan"),
        "iou": per_class(iou),
        "precision": per_class(precision),
        "recall": per_class(recall),
        "confusion": conf.astype(np.int64).tolist(),  # [ground truth, prediction] pixel counts
    }


class SegmentationMetric(MulticlassConfusionMatrix):
    """torchmetrics confusion matrix (ignore 255) with the derived scores of
    :func:`scores_from_confusion`; ``update(pred, target)`` takes label maps of any shape."""

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(num_classes=num_classes, ignore_index=IGNORE, normalize=None, validate_args=False,
                         **kwargs)
        self.class_names = list(class_names) if class_names is not None else None

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        super().update(preds.reshape(-1).long(), target.reshape(-1).long())

    def scores(self) -> dict:
        return scores_from_confusion(self.compute(), self.class_names)


class CAMThresholdSweep(Metric):
    """The WSSS seed protocol: score CAM seeds at many background thresholds in one pass.

    A pixel is foreground at threshold t when its largest class score exceeds t (a constant
    background plane at t, argmax, background winning ties) and then takes that class. The comparison is
    made in float32, as the references' (a float32 plane at t stacked with the float32 scores,
    ``eval_cam.py``): a score equal to float32(t) is a tie and goes to the background, although it lies
    above t in float64. For each image we histogram (gt class, argmax class, number of thresholds below
    the score) once; the confusion matrix at every threshold follows by cumulative sums, exactly. The
    histogram is a summed state.
    """

    full_state_update = False

    def __init__(self, num_classes: int, thresholds: Sequence[float], **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes  # including background
        self.thresholds = np.asarray(sorted(float(t) for t in thresholds), dtype=np.float64)
        self._planes = self.thresholds.astype(np.float32)  # what the scores are compared with
        if len(np.unique(self._planes)) != len(self._planes):
            raise ValueError(f"thresholds {self.thresholds.tolist()} are not distinct in float32")
        n_t = len(self.thresholds)
        self.add_state("hist", torch.zeros(num_classes, num_classes, n_t + 1, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, scores: np.ndarray, keys: np.ndarray, gt: np.ndarray) -> None:  # type: ignore[override]
        """``scores`` (n, H, W) foreground scores of the classes ``keys`` (ids 1..K); gt (H, W)."""
        valid = gt != IGNORE
        g = gt[valid].astype(np.int64)
        if scores.shape[0] == 0:
            top = np.zeros_like(g)
            level = np.zeros_like(g)
        else:
            s = scores.reshape(scores.shape[0], -1)[:, valid.reshape(-1)].astype(np.float32)
            top = np.asarray(keys, np.int64)[s.argmax(0)]
            level = np.searchsorted(self._planes, s.max(0), side="left")  # thresholds < score, float32
        c, n_levels = self.num_classes, self.hist.shape[2]
        idx = (g * c + top) * n_levels + level
        counts = np.bincount(idx, minlength=c * c * n_levels).reshape(c, c, n_levels)
        self.hist += torch.from_numpy(counts).to(self.hist.device)

    def compute(self) -> torch.Tensor:
        return self.hist

    def confusion(self, j: int) -> np.ndarray:
        """Confusion matrix [gt, pred] at thresholds[j] (summed over ranks)."""
        return self._confusion(self.compute().cpu().numpy(), j)

    @staticmethod
    def _confusion(hist: np.ndarray, j: int) -> np.ndarray:
        fg = hist[:, :, j + 1:].sum(2)  # pixels whose score exceeds thresholds[j]
        conf = fg.copy()
        conf[:, 0] = 0
        conf[:, 0] = hist.sum((1, 2)) - conf.sum(1)
        return conf

    def results(self, class_names: Sequence[str] | None = None) -> dict:
        hist = self.compute().cpu().numpy()
        per_t = [scores_from_confusion(self._confusion(hist, j), class_names) for j in range(len(self.thresholds))]
        mious = [r["miou"] for r in per_t]
        best = int(np.nanargmax(mious))
        return {
            "thresholds": self.thresholds.tolist(),
            "miou_per_threshold": mious,
            "best_threshold": float(self.thresholds[best]),
            "best": per_t[best],
            "per_threshold": per_t,
        }
