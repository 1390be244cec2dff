"""The IRNet pipeline on a tiny COCO 2014 root written here (instances JSON with polygons and a crowd
region): annotation rendering, class names from the categories, both splits, scoring."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from checks import assert_scores_match_files
from conftest import TINY_SCHEDULE

from src.pipeline.pipeline import run_pipeline
from src.pipeline.validate import finalize

pytestmark = pytest.mark.slow
CATEGORIES = [{"id": 3, "name": "car", "supercategory": "vehicle"},
              {"id": 18, "name": "dog", "supercategory": "animal"}]


def square(x: int, y: int, s: int) -> list[float]:
    return [x, y, x + s, y, x + s, y + s, x, y + s]


def write_split(root: Path, split: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    (root / split).mkdir(parents=True)
    for i in range(n):
        image_id = 1000 * seed + i + 1
        name = f"COCO_{split}_{image_id:012d}.jpg"
        img = rng.integers(60, 120, (56, 64, 3), dtype=np.uint8)
        cat = CATEGORIES[i % 2]
        x, y, s = int(rng.integers(4, 30)), int(rng.integers(4, 24)), 24
        img[y:y + s, x:x + s] = (200, 40, 40) if cat["name"] == "car" else (40, 200, 40)
        cv2.imwrite(str(root / split / name), img)
        images.append({"id": image_id, "file_name": name, "height": 56, "width": 64})
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat["id"],
                            "segmentation": [square(x, y, s)], "area": s * s, "bbox": [x, y, s, s], "iscrowd": 0})
    annotations.append({"id": len(annotations) + 1, "image_id": images[0]["id"], "category_id": 18, "iscrowd": 1,
                        "segmentation": {"counts": [0, 10, 3574], "size": [56, 64]}, "area": 10,
                        "bbox": [0, 0, 1, 10]})
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": CATEGORIES, "info": {}, "licenses": []}))


def test_irnet_runs_on_a_tiny_coco_root(make_cfg, tmp_path: Path) -> None:
    root = tmp_path / "coco2014"
    write_split(root, "train2014", 8, seed=1)
    write_split(root, "val2014", 4, seed=2)
    cfg = finalize(make_cfg("+baseline=irnet", "data=coco14", f"data.root={root}", "data.num_classes=2",
                            "data.loader.num_workers=0", "data.loader.pin_memory=false",
                            "data.loader.persistent_workers=false", "progress=none", *TINY_SCHEDULE,
                            "profile.cam.batch_size=4", "profile.irn.batch_size=4", "profile.deeplab.batch_size=4",
                            tiny=False))
    results = run_pipeline(cfg, tmp_path / "run")
    assert results.data.layout.class_names == ("car", "dog")
    summary = results.summary(0)
    keys = {"seeds/train2014/seed_miou", "pseudo_masks/train2014/mask_miou", "segmentation/val2014/miou"}
    assert keys <= set(summary)
    assert_scores_match_files(results)
    # the table's columns and the returned metric follow COCO's split names (val2014, not VOC's val)
    header = results.table().splitlines()[0]
    for title in ("cls mAP", "seed best", "mask mIoU", "seg val2014"):
        assert title in header, title
    assert results.optimized() == summary["segmentation/val2014/miou"]
    assert results.as_dict()["columns"][-1] == ["seg val2014", "segmentation/val2014/miou"]
    masks = sorted((tmp_path / "run" / "round_0" / "pseudo_masks" / "masks").glob("*.png"))
    assert len(masks) == 8
