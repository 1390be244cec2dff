"""Checks of a finished pipeline run that can fail: its reported scores recomputed from the files it wrote
with plain numpy (an oracle independent of the torchmetrics scoring code), and its per-class results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from src.utils.io import load_npz, read_label

IGNORE = 255


def miou(confusion: np.ndarray) -> float:
    """nanmean IoU over the classes present in ground truth or prediction (the VOC protocol)."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmean(np.where(union > 0, tp / union, np.nan)))


def confusion_of(pairs, n: int) -> np.ndarray:
    conf = np.zeros((n, n), np.int64)
    for pred, gt in pairs:
        valid = gt != IGNORE
        np.add.at(conf, (gt[valid].astype(int), pred[valid].astype(int)), 1)
    return conf


def seed_map(arrays: dict, threshold: float) -> np.ndarray:
    """Seeds at a constant float32 background plane, argmax (ties to the background), to class ids."""
    scores = arrays["high_res"].astype(np.float32)
    plane = np.full((1, *scores.shape[1:]), threshold, np.float32)
    return np.concatenate([[0], arrays["keys"]])[np.concatenate([plane, scores]).argmax(0)]


def assert_scores_match_files(results, round_index: int = 0) -> None:
    """Seeds (at their reported best threshold), pseudo-masks and segmentation predictions of a round,
    scored again from the written files against the ground truth, equal what the run reported."""
    data, run = results.data, results.run_dir / f"round_{round_index}"
    n = len(data.class_names)
    summary = results.summary(round_index)
    split = data.seed_metric_split
    ids = data.seed_eval_ids()
    gts = {i: data.layout.read_gt(i) for i in ids}
    if (run / "seeds").exists():
        best = summary[f"seeds/{split}/seed_best_threshold"]
        conf = confusion_of(((seed_map(load_npz(run / "seeds" / "cams" / f"{i}.npz"), best), gts[i]) for i in ids), n)
        assert miou(conf) == pytest.approx(summary[f"seeds/{split}/seed_best_miou"], abs=1e-6)
    if (run / "pseudo_masks").exists():
        conf = confusion_of(((read_label(run / "pseudo_masks" / "masks" / f"{i}.png"), gts[i]) for i in ids), n)
        assert miou(conf) == pytest.approx(summary[f"pseudo_masks/{split}/mask_miou"], abs=1e-6)
    for eval_split in data.eval_splits if (run / "segmentation").exists() else []:
        folder = run / "segmentation" / "predictions" / eval_split
        pairs = ((read_label(folder / f"{i}.png"), data.layout.read_gt(i)) for i in data.layout.ids(eval_split))
        assert miou(confusion_of(pairs, n)) == pytest.approx(summary[f"segmentation/{eval_split}/miou"], abs=1e-6)


def per_class(results, round_index: int, stage: str, *path: str) -> dict[str, float | None]:
    node = results.rounds[round_index]["stages"][stage]["metrics"]
    for key in path:
        node = node[key]
    return node


def written(folder: Path, suffix: str) -> set[str]:
    return {p.name[: -len(suffix)] for p in Path(folder).glob(f"*{suffix}")}
