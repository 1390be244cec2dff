"""The IRNet pipeline on real VOC 2012 files (../shared/data/voc_samples): the VOC reader, a labels file
in IRNet's format, images of the real sizes, 20 classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from checks import assert_scores_match_files
from conftest import TINY_SCHEDULE, shared_path

from src.pipeline.pipeline import run_pipeline
from src.pipeline.validate import finalize
from src.utils.io import read_image, read_label

pytestmark = pytest.mark.slow


def test_irnet_runs_on_voc_samples(make_cfg, tmp_path: Path) -> None:
    root = shared_path("data", "voc_samples", "VOCdevkit", "VOC2012")
    labels = shared_path("data", "voc_samples", "lists", "cls_labels.npy")
    cfg = finalize(make_cfg(
        "+baseline=irnet", "data=voc12", f"data.root={root}", f"data.labels_file={labels}",
        "data.train_split=train", "data.seed_eval_split=train", "data.loader.num_workers=0",
        "data.loader.pin_memory=false", "data.loader.persistent_workers=false", "progress=none",
        *TINY_SCHEDULE, "profile.cam.batch_size=2", "profile.irn.batch_size=2", "profile.deeplab.batch_size=2",
        tiny=False))
    results = run_pipeline(cfg, tmp_path / "run")
    data = json.loads(results.write().read_text())
    summary = data["rounds"][0]["summary"]
    assert {"seeds/train/seed_best_miou", "pseudo_masks/train/mask_miou", "segmentation/val/miou"} <= set(summary)
    assert_scores_match_files(results)  # the reported scores are those of the written files, on real VOC masks
    run = tmp_path / "run" / "round_0"
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    for image_id in ids:  # pseudo-masks at the image's real size, with class ids from the image's labels
        mask = read_label(run / "pseudo_masks" / "masks" / f"{image_id}.png")
        assert mask.shape == read_image(root / "JPEGImages" / f"{image_id}.jpg").shape[:2]
        gt_classes = set(read_label(root / "SegmentationClass" / f"{image_id}.png").ravel()) - {0, 255}
        assert set(mask.ravel()) - {0} <= gt_classes
    scores = data["rounds"][0]["stages"]["segmentation"]["metrics"]["val"]
    assert scores["images"] == 6 and len(scores["iou"]) == 21
