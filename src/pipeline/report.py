"""The per-run report: ``report.md`` with the results table and pictures of a fixed set of images.

Per round: for the first ``n`` scored train images, image | ground truth | CAM heat map | seed (at the
seed threshold) | pseudo-mask; for the first ``n`` val images, image | ground truth | segmentation
prediction; and CONTA's confounder priors. Pictures go to ``<run>/report/`` and, with
``logger=tensorboard``, to TensorBoard too (tag ``report/round_<r>/...``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from src.data.bundle import DataBundle
from src.ops.labels import seed_labels
from src.ops.random_walk import walked_scores
from src.pipeline.results import RunResults
from src.stages.core import CAMS, MASKS, PREDICTIONS, WALKED
from src.utils.io import load_npz, read_image, read_label, save_rgb_png_atomic, write_text_atomic
from src.utils.labels import colorize

TILE = 128


def _tile(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = TILE / max(h, w)
    img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_NEAREST)
    canvas = np.full((TILE, TILE, 3), 255, np.uint8)
    canvas[: img.shape[0], : img.shape[1]] = img
    return canvas


def cam_overlay(image: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The image blended with a jet heat map of the largest class score per pixel."""
    peak = scores.max(0) if scores.shape[0] else np.zeros(image.shape[:2], np.float32)
    heat = cv2.applyColorMap(np.clip(peak * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return (0.5 * image + 0.5 * heat).astype(np.uint8)


def _row(tiles: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([_tile(t) for t in tiles], axis=1)


def train_panel(run_dir: Path, round_index: int, data: DataBundle, ids: Sequence[str], threshold: float
                ) -> np.ndarray | None:
    base = run_dir / f"round_{round_index}"
    rows = []
    for image_id in ids:
        cams = base / "seeds" / CAMS / f"{image_id}.npz"
        mask = base / "pseudo_masks" / MASKS / f"{image_id}.png"
        if not cams.is_file():
            continue
        image = read_image(data.layout.image_path(image_id))
        gt = read_label(data.layout.mask_path(image_id))
        seeds = load_npz(cams)
        scores = seeds["high_res"].astype(np.float32)
        seed = seed_labels(scores, seeds["keys"], threshold)
        tiles = [image, colorize(gt), cam_overlay(image, scores), colorize(seed)]
        walked = base / "pseudo_masks" / WALKED / f"{image_id}.npz"
        if walked.is_file():  # IRNet's walk: its boundary map and the walked scores
            arrays = load_npz(walked)
            edge = cv2.resize(arrays["edge"].astype(np.float32), image.shape[1::-1], interpolation=cv2.INTER_LINEAR)
            tiles.append(np.repeat((255 * (1 - np.clip(edge, 0, 1))).astype(np.uint8)[..., None], 3, axis=2))
            up = walked_scores(torch.from_numpy(arrays["cam"].astype(np.float32)), image.shape[:2],
                               -(-image.shape[0] // arrays["edge"].shape[0]))
            tiles.append(cam_overlay(image, up.numpy()))
        if mask.is_file():
            tiles.append(colorize(read_label(mask)))
        rows.append(_row(tiles))
    if not rows:
        return None
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])


def val_panel(run_dir: Path, round_index: int, data: DataBundle, split: str, ids: Sequence[str]) -> np.ndarray | None:
    folder = run_dir / f"round_{round_index}" / "segmentation" / PREDICTIONS / split
    rows = []
    for image_id in ids:
        pred = folder / f"{image_id}.png"
        if not pred.is_file():
            continue
        image = read_image(data.layout.image_path(image_id))
        gt = read_label(data.layout.mask_path(image_id)) if data.layout.mask_path(image_id) else None
        tiles = [image] + ([colorize(gt)] if gt is not None else []) + [colorize(read_label(pred))]
        rows.append(_row(tiles))
    return np.concatenate(rows) if rows else None


def seed_threshold(results: RunResults, round_index: int) -> float | None:
    """The background threshold the round's seeds were scored at (their stage's ``eval_threshold``)."""
    seeds = results.rounds.get(round_index, {}).get("stages", {}).get("seeds")
    return None if seeds is None else seeds["metrics"].get("threshold")


def per_class_table(results: RunResults, data: DataBundle, round_index: int) -> list[str]:
    """Markdown rows: IoU (%) of every class at every scored stage of a round (a class at 0 stands out)."""
    stages = results.rounds.get(round_index, {}).get("stages", {})
    columns: list[tuple[str, dict]] = []
    for stage, title, pick in (("seeds", "seeds (best thr)", lambda m: m.get("best")),
                               ("ir_labels", None, None), ("pseudo_masks", "pseudo-masks", lambda m: m),
                               ("pseudo_masks", "masks (best thr)", lambda m: m.get("best"))):
        if title is None or stage not in stages:
            continue
        found = pick(stages[stage]["metrics"])
        if isinstance(found, dict) and "iou" in found:
            columns.append((title, found["iou"]))
    seg = stages.get("segmentation", {}).get("metrics", {})
    columns += [(f"seg {split}", seg[split]["iou"]) for split in data.eval_splits
                if isinstance(seg.get(split), dict) and "iou" in seg[split]]
    if not columns:
        return []

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    lines = ["Per-class IoU (%):", "", "| class | " + " | ".join(t for t, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name in data.class_names:
        lines.append(f"| {name} | " + " | ".join(cell(iou.get(name)) for _, iou in columns) + " |")
    return lines


def write_report(results: RunResults, data: DataBundle, run_dir: Path, n_images: int = 4,
                 tensorboard_dir: Path | None = None) -> Path:
    """Write report.md (+ pictures) into the run directory; returns its path."""
    run_dir = Path(run_dir)
    pictures = run_dir / "report"
    train_ids = data.seed_eval_ids()[:n_images]
    lines = [
        f"# Run report: {results.as_dict()['baseline']} (conta {results.as_dict()['conta']})", "",
        "## Results", "", "```", results.table(), "```", "",
        "Columns: classifier mAP on val; seeds at the best threshold of the sweep (the protocol) and at the "
        "configured one (train); pseudo-masks at the configured background threshold and at the best of a sweep "
        "of the walked scores (train); segmentation mIoU on each eval split. Full numbers: results.json.", "",
        *[f"**Warning**: {w}" for w in results.warnings()], "",
    ]
    images: dict[str, np.ndarray] = {}
    for r in sorted(results.rounds):
        lines += [f"## Round {r}", "", *per_class_table(results, data, r), ""]
        threshold = seed_threshold(results, r)
        panel = None if threshold is None else train_panel(run_dir, r, data, train_ids, threshold)
        if panel is not None:
            images[f"round_{r}_train.png"] = panel
            walk = " | boundary (dark = edge) | walked scores" if (run_dir / f"round_{r}" / "pseudo_masks" /
                                                                  WALKED).is_dir() else ""
            lines += [f"Train images: image | ground truth | CAM | seed (at the configured threshold){walk} | "
                      "pseudo-mask", "",
                      f"![round {r} train](report/round_{r}_train.png)", ""]
        for split in data.eval_splits:
            panel = val_panel(run_dir, r, data, split, data.layout.ids(split)[:n_images])
            if panel is not None:
                images[f"round_{r}_{split}.png"] = panel
                lines += [f"{split}: image | ground truth | segmentation", "",
                          f"![round {r} {split}](report/round_{r}_{split}.png)", ""]
        priors = run_dir / f"round_{r}" / "confounder_set" / "priors.png"
        if priors.is_file():
            lines += ["Confounder set built from this round (used by the next):", "",
                      f"![priors {r}](round_{r}/confounder_set/priors.png)", ""]
    for name, img in images.items():
        save_rgb_png_atomic(pictures / name, img)
    if tensorboard_dir is not None:
        _to_tensorboard(tensorboard_dir, images)
    path = run_dir / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path


def _to_tensorboard(log_dir: Path, images: dict[str, np.ndarray]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        for name, img in images.items():
            writer.add_image(f"report/{Path(name).stem}", img, dataformats="HWC")
    finally:
        writer.close()
