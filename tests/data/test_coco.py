"""COCO preparation (src/data/coco.py) on a tiny hand-made COCO set and on the real val2014 excerpt.

The tiny set: three images, categories given out of id order (18 dog, 1 person, 3 car -> classes
person 1, car 2, dog 3), an overlapping pair in each annotated image, a crowd RLE, a compressed RLE,
a degenerate polygon, a dangling annotation and an image without annotations.

The image-level labels are stored as plain arrays (cls_labels_<split>.npz: ids, labels) and read
without pickle; concurrent preparations of one split serialise on a ``filelock`` lock.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT, SHARED
from filelock import FileLock
from PIL import Image
from pycocotools import mask as mask_utils

from src.data.coco import CocoLayout, coco_layout, open_coco, prepare_coco, render_semantic_mask
from src.data.datasets import WSSSDataset
from src.utils.io import read_label

SPLIT = "val2014"
SAMPLES = SHARED / "data" / "voc_samples"
EXCERPT = SAMPLES / "coco" / "instances_val2014.json_samples.json"

PERSON, CAR, DOG = 1, 2, 3
SIZES = {1: (40, 60), 2: (30, 50), 5: (48, 64)}  # image id -> (H, W)


def stem(image_id: int, split: str = SPLIT) -> str:
    return f"COCO_{split}_{image_id:012d}"


def rect(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    """Polygon of the pixels x in [x0, x1), y in [y0, y1) (pycocotools' rasterisation)."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def box_mask(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return {"counts": counts, "size": list(mask.shape)}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"counts": rle["counts"].decode("ascii"), "size": list(rle["size"])}


def tiny_coco(split: str = SPLIT) -> dict:
    h1, w1 = SIZES[1]
    h5, w5 = SIZES[5]
    return {
        "info": {"description": "tiny test set"},
        "images": [  # not in id order either
            {"id": 5, "file_name": f"{stem(5, split)}.jpg", "height": h5, "width": w5},
            {"id": 1, "file_name": f"{stem(1, split)}.jpg", "height": h1, "width": w1},
            {"id": 2, "file_name": f"{stem(2, split)}.jpg", "height": SIZES[2][0], "width": SIZES[2][1]},
        ],
        "categories": [
            {"id": 18, "name": "dog", "supercategory": "animal"},
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 3, "name": "car", "supercategory": "vehicle"},
        ],
        "annotations": [
            # image 1: a small dog listed BEFORE the large person it lies on
            {"id": 11, "image_id": 1, "category_id": 18, "iscrowd": 0,
             "segmentation": [rect(10, 10, 20, 20)]},
            {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [rect(0, 0, 40, 30)]},
            # image 1: a crowd of cars, columns 35..54 over all rows (overlaps the person in 35..39)
            {"id": 12, "image_id": 1, "category_id": 3, "iscrowd": 1,
             "segmentation": uncompressed_rle(box_mask(h1, w1, 35, 0, 55, h1))},
            # image 5: a car of two polygons (+ a degenerate 2-point one), then a small dog AFTER it
            {"id": 13, "image_id": 5, "category_id": 3, "iscrowd": 0,
             "segmentation": [[0, 0, 20, 0, 0, 20], rect(40, 30, 60, 45), [1, 1, 2, 2]]},
            {"id": 14, "image_id": 5, "category_id": 18, "iscrowd": 0,
             "segmentation": compressed_rle(box_mask(h5, w5, 42, 32, 48, 38))},
            # dangling: image 777 is not listed
            {"id": 99, "image_id": 777, "category_id": 1, "iscrowd": 0, "segmentation": [rect(0, 0, 5, 5)]},
        ],
    }


def write_set(root: Path, split: str = SPLIT, data: dict | None = None) -> Path:
    """Images (random pixels, OpenCV) under root/split and the JSON under root/annotations."""
    rng = np.random.default_rng(0)
    (root / split).mkdir(parents=True, exist_ok=True)
    data = data or tiny_coco(split)
    for im in data["images"]:
        pixels = rng.integers(0, 256, (im["height"], im["width"], 3), dtype=np.uint8)
        assert cv2.imwrite(str(root / split / im["file_name"]), pixels)
    ann = root / "annotations" / f"instances_{split}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(data))
    return ann


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    write_set(root)
    return root


def mask_of(layout: CocoLayout, image_id: int) -> np.ndarray:
    return read_label(layout.mask_path(stem(image_id)))


# --------------------------------------------------------------------------------------- tiny set
def test_masks_labels_and_report(coco_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="src.data.coco"):
        layout = prepare_coco(coco_root, SPLIT, out_dir=tmp_path / "out")

    assert isinstance(layout, CocoLayout)
    assert layout.class_names == ("person", "car", "dog")  # category-id order 1, 3, 18
    assert layout.ids(SPLIT) == (stem(1), stem(2), stem(5))  # image-id order
    assert layout.image_dir == coco_root / SPLIT
    assert layout.image_path(stem(5)) == coco_root / SPLIT / f"{stem(5)}.jpg"
    assert layout.mask_path(stem(1)) == tmp_path / "out" / "SegmentationClass" / f"{stem(1)}.png"

    m1 = mask_of(layout, 1)
    assert m1.shape == SIZES[1]
    assert m1[15, 15] == DOG  # small over large, although listed first
    assert m1[5, 5] == PERSON
    assert m1[35, 5] == 0  # below the person
    assert m1[10, 37] == PERSON  # an instance inside the crowd region keeps its class
    assert m1[10, 50] == 255 and m1[35, 50] == 255  # crowd = ignore
    assert m1[20, 58] == 0
    assert set(np.unique(m1).tolist()) == {0, PERSON, DOG, 255}
    assert (m1 == DOG).sum() == 10 * 10
    assert (m1 == PERSON).sum() == 40 * 30 - 10 * 10  # the dog covers it, the crowd lies under it
    assert (m1 == 255).sum() == 20 * 40 - 5 * 30  # crowd columns 35..54 minus the person's 35..39

    m5 = mask_of(layout, 5)
    assert m5.shape == SIZES[5]
    assert m5[2, 2] == CAR and m5[25, 5] == 0  # triangle (0,0)-(20,0)-(0,20)
    assert m5[31, 41] == CAR and m5[35, 45] == DOG  # small dog over the car, although listed after it
    assert m5[40, 10] == 0
    assert (m5 == DOG).sum() == 36

    assert not mask_of(layout, 2).any()  # no annotations: background only
    assert Image.open(layout.mask_path(stem(1))).mode == "P"

    np.testing.assert_array_equal(
        layout.labels(SPLIT),
        np.array([[1, 1, 1], [0, 0, 0], [0, 1, 1]], np.float32),  # image 1's car is crowd only
    )

    s = layout.summary
    assert s["num_images"] == 3 and s["num_images_in_file"] == 3
    assert s["num_annotations_in_file"] == 6 and s["num_annotations_used"] == 5
    assert s["crowd_annotations"] == 1
    assert s["dangling_annotations"] == {
        "count": 1, "image_ids": 1, "example_annotation_ids": [99], "example_image_ids": [777]
    }
    assert s["images_without_annotations"] == {"count": 1, "examples": [stem(2)]}
    assert s["missing_image_files"]["count"] == 0
    assert s["masks_rendered"] == 3 and s["masks_reused"] == 0
    assert s["images_per_class"] == {"person": 1, "car": 2, "dog": 2}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 of 6 annotations" in w and "777" in w for w in warnings), warnings
    infos = [r.getMessage() for r in caplog.records]
    assert any("1 of 3 images have no annotations" in m for m in infos), infos

    listed = (tmp_path / "out" / "ImageSets" / "Segmentation" / f"{SPLIT}.txt").read_text().split()
    assert listed == [stem(1), stem(2), stem(5)]
    with np.load(tmp_path / "out" / f"cls_labels_{SPLIT}.npz", allow_pickle=False) as stored:
        assert sorted(stored.files) == ["ids", "labels"]
        assert stored["ids"].tolist() == listed and stored["labels"].dtype == np.float32
        assert stored["labels"][2].tolist() == [0, 1, 1]
    assert not (tmp_path / "out" / f"cls_labels_{SPLIT}.npy").exists()


def test_second_call_reuses_masks(coco_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = prepare_coco(coco_root, SPLIT, out_dir=out)
    paths = [first.mask_path(i) for i in first.ids(SPLIT)]
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths]
    labels_file = out / f"cls_labels_{SPLIT}.npz"
    labels_mtime = labels_file.stat().st_mtime_ns

    second = prepare_coco(coco_root, SPLIT, out_dir=out)
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths] == before
    assert second.summary["masks_rendered"] == 0 and second.summary["masks_reused"] == 3
    assert second.summary["parsed_annotation_file"] is False  # opened from the manifest
    assert labels_file.stat().st_mtime_ns == labels_mtime
    np.testing.assert_array_equal(second.labels(SPLIT), first.labels(SPLIT))

    # a lost mask is rendered again, the others stay
    paths[1].unlink()
    third = prepare_coco(coco_root, SPLIT, out_dir=out)
    assert third.summary["masks_rendered"] == 1 and third.summary["masks_reused"] == 2
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (paths[0], paths[2])] == [before[0], before[2]]
    assert labels_file.stat().st_mtime_ns == labels_mtime  # same content: left untouched

    # a changed annotation file invalidates every mask of the split
    data = tiny_coco()
    data["annotations"][0]["segmentation"] = [rect(30, 20, 34, 24)]  # the dog moves
    (coco_root / "annotations" / f"instances_{SPLIT}.json").write_text(json.dumps(data))
    fourth = prepare_coco(coco_root, SPLIT, out_dir=out)
    assert fourth.summary["masks_rendered"] == 3
    m1 = mask_of(fourth, 1)
    assert m1[15, 15] == PERSON and m1[21, 31] == DOG

    # overwrite renders everything again
    assert prepare_coco(coco_root, SPLIT, out_dir=out, overwrite=True).summary["masks_rendered"] == 3


def test_dataset_reads_the_prepared_split(coco_root: Path, tmp_path: Path) -> None:
    layout = prepare_coco(coco_root, SPLIT, out_dir=tmp_path / "out")
    dataset = WSSSDataset(layout, SPLIT, target="gt", return_raw=True)
    assert len(dataset) == 3
    for index, image_id in enumerate((1, 2, 5)):
        sample = dataset[index]
        assert sample["id"] == stem(image_id)
        assert tuple(sample["size"].tolist()) == SIZES[image_id]
        assert tuple(sample["mask"].shape) == SIZES[image_id] == tuple(sample["raw"].shape[:2])
    assert dataset[0]["mask"][15, 15].item() == DOG
    assert dataset[2]["label"].tolist() == [0.0, 1.0, 1.0]


def test_workers_render_the_same_masks(coco_root: Path, tmp_path: Path) -> None:
    serial = prepare_coco(coco_root, SPLIT, out_dir=tmp_path / "serial")
    pooled = prepare_coco(coco_root, SPLIT, out_dir=tmp_path / "pooled", num_workers=1)  # a spawned process
    assert pooled.summary["masks_rendered"] == 3
    for image_id in (1, 2, 5):
        np.testing.assert_array_equal(mask_of(pooled, image_id), mask_of(serial, image_id))


def test_missing_paths_are_named(coco_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare_coco(tmp_path / "nowhere", SPLIT, out_dir=out)
    with pytest.raises(FileNotFoundError, match="instances_train2014.json"):
        prepare_coco(coco_root, "train2014", out_dir=out)
    with pytest.raises(FileNotFoundError, match="other.json"):
        prepare_coco(coco_root, SPLIT, coco_root / "other.json", out_dir=out)
    ann = coco_root / "annotations" / f"instances_{SPLIT}.json"
    with pytest.raises(FileNotFoundError, match="image folder not found: .*test2014"):
        prepare_coco(coco_root, "test2014", ann, out_dir=out)
    with pytest.raises(FileNotFoundError, match="not prepared: no manifest .*coco_val2014.json"):
        open_coco(out, [SPLIT])


def test_missing_and_corrupt_images(
    coco_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = coco_root / SPLIT
    (folder / f"{stem(5)}.jpg").unlink()
    data = (folder / f"{stem(2)}.jpg").read_bytes()
    (folder / f"{stem(2)}.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG

    # default: masks rendered from the JSON sizes, the images stay listed, the gap is reported
    with caplog.at_level(logging.WARNING, logger="src.data.coco"):
        layout = prepare_coco(coco_root, SPLIT, out_dir=tmp_path / "a")
    assert layout.ids(SPLIT) == (stem(1), stem(2), stem(5))
    assert layout.summary["missing_image_files"] == {"count": 1, "examples": [f"{stem(5)}.jpg"]}
    assert any("1 of 3 image files are missing" in r.getMessage() for r in caplog.records)
    assert mask_of(layout, 5).shape == SIZES[5]
    dataset = WSSSDataset(layout, SPLIT)
    with pytest.raises(FileNotFoundError, match=stem(5)):
        dataset[2]
    with pytest.raises(ValueError, match=f"corrupt or truncated image file .*{stem(2)}.jpg"):
        dataset[1]

    # check_files: fail now, naming the file
    with pytest.raises(FileNotFoundError, match=rf"{stem(5)}\.jpg \(1 of the 3 images"):
        prepare_coco(coco_root, SPLIT, out_dir=tmp_path / "b", check_files=True)
    (folder / f"{stem(5)}.jpg").write_bytes((folder / f"{stem(1)}.jpg").read_bytes())  # 40x60, JSON: 48x64
    with pytest.raises(ValueError, match=f"{stem(2)}.jpg: corrupt or truncated"):
        prepare_coco(coco_root, SPLIT, out_dir=tmp_path / "b", check_files=True)

    # drop_bad_images: left out and reported
    layout = prepare_coco(coco_root, SPLIT, out_dir=tmp_path / "c", drop_bad_images=True)
    assert layout.ids(SPLIT) == (stem(1),)
    reasons = dict(layout.summary["dropped_images"]["examples"])
    assert "image file is truncated" in reasons[stem(2)]
    assert "is 60x40 but the annotation file says 64x48" in reasons[stem(5)]
    assert layout.labels(SPLIT).tolist() == [[1, 1, 1]]


def test_drop_unannotated(coco_root: Path, tmp_path: Path) -> None:
    layout = prepare_coco(coco_root, SPLIT, out_dir=tmp_path / "out", drop_unannotated=True)
    assert layout.ids(SPLIT) == (stem(1), stem(5))
    assert layout.summary["dropped_images"] == {"count": 1, "examples": [[stem(2), "no annotations"]]}


def test_bad_annotation_files(coco_root: Path, tmp_path: Path) -> None:
    ann = tmp_path / "bad.json"
    data = tiny_coco()
    data["annotations"].append({"id": 50, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": []})
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad\.json: 1 annotations name categories .*\(50, 7\)"):
        prepare_coco(coco_root, SPLIT, ann, out_dir=tmp_path / "out")

    data = tiny_coco()
    data["annotations"][1]["segmentation"] = [[0, 0, 10, 0, 10]]
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad\.json image COCO_val2014_000000000001 annotation 10: .*even"):
        prepare_coco(coco_root, SPLIT, ann, out_dir=tmp_path / "out")

    data = tiny_coco()
    del data["annotations"][2]["image_id"]
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unreadable COCO annotation file .*bad\.json: KeyError: 'image_"):
        prepare_coco(coco_root, SPLIT, ann, out_dir=tmp_path / "out")

    ann.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"unreadable COCO annotation file .*bad\.json"):
        prepare_coco(coco_root, SPLIT, ann, out_dir=tmp_path / "out")

    with pytest.raises(ValueError, match="data.class_names"):
        prepare_coco(coco_root, SPLIT, out_dir=tmp_path / "out", class_names=["person", "dog", "car"])


def test_pycocotools_missing_names_the_extra(
    coco_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[coco\]"):
        prepare_coco(coco_root, SPLIT, out_dir=tmp_path / "out")


def test_coco_layout_serves_both_splits(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    write_set(root, "val2014")
    write_set(root, "train2014")
    layout = coco_layout(root, ["train2014", "val2014"], tmp_path / "cache")
    assert layout.ids("train2014") == tuple(stem(i, "train2014") for i in (1, 2, 5))
    assert layout.image_path(stem(2, "train2014")) == root / "train2014" / f"{stem(2, 'train2014')}.jpg"
    assert layout.image_path(stem(2)) == root / "val2014" / f"{stem(2)}.jpg"
    assert layout.labels("val2014").tolist() == [[1, 1, 1], [0, 0, 0], [0, 1, 1]]
    assert layout.labels("train2014").tolist() == [[1, 1, 1], [0, 0, 0], [0, 1, 1]]
    assert read_label(layout.mask_path(stem(1, "train2014")))[15, 15] == DOG
    with pytest.raises(KeyError, match="none of the prepared COCO splits"):
        layout.image_path("2007_000032")
    again = coco_layout(root, ["train2014", "val2014"], tmp_path / "cache")
    assert again.root == layout.root and again.summaries["val2014"]["masks_rendered"] == 0


def test_render_order_is_area_not_list_order() -> None:
    big, small = box_mask(10, 10, 0, 0, 8, 8), box_mask(10, 10, 2, 2, 4, 4)
    objects = [(2, False, compressed_rle(small), 1), (1, False, compressed_rle(big), 2)]
    for order in (objects, objects[::-1]):
        label = render_semantic_mask(10, 10, order)
        assert label[3, 3] == 2 and label[6, 6] == 1 and label[9, 9] == 0


# ------------------------------------------------------------------------------- labels file
# COCO's 80 category ids: 1..90 without 12, 26, 29, 30, 45, 66, 68, 69, 71, 83
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]


class _Unpickled:
    """An object whose unpickling leaves a marker file: proof that a labels file is not unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_labels_round_trip_through_npz_80_classes(tmp_path: Path) -> None:
    assert len(COCO_CATEGORY_IDS) == 80
    stems = {1: "COCO_val2014_000000000001", 2: "my_photo_2_b", 3: "a_b__c_"}  # ids with underscores
    h, w = 20, 30
    data = {
        "images": [{"id": i, "file_name": f"{n}.jpg", "height": h, "width": w} for i, n in stems.items()],
        "categories": [{"id": c, "name": f"class_{c}"} for c in reversed(COCO_CATEGORY_IDS)],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [rect(0, 0, 10, 10)]},
            {"id": 2, "image_id": 1, "category_id": 90, "iscrowd": 0, "segmentation": [rect(10, 0, 20, 10)]},
            {"id": 3, "image_id": 2, "category_id": 13, "iscrowd": 0, "segmentation": [rect(0, 0, 5, 5)]},
            {"id": 4, "image_id": 2, "category_id": 88, "iscrowd": 1,
             "segmentation": uncompressed_rle(box_mask(h, w, 0, 10, w, h))},
        ],
    }
    root = tmp_path / "coco"
    write_set(root, data=data)
    layout = prepare_coco(root, SPLIT, out_dir=tmp_path / "out")

    column = {c: i for i, c in enumerate(COCO_CATEGORY_IDS)}  # class id - 1
    expected = np.zeros((3, 80), np.float32)
    expected[0, [column[1], column[90]]] = 1
    expected[1, [column[13], column[88]]] = 1  # the crowd's class too
    ids = tuple(stems.values())  # image-id order
    assert layout.ids(SPLIT) == ids
    assert layout.class_names[0] == "class_1" and layout.class_names[79] == "class_90"

    with np.load(tmp_path / "out" / f"cls_labels_{SPLIT}.npz", allow_pickle=False) as stored:
        assert stored["ids"].dtype.kind == "U" and stored["ids"].tolist() == list(ids)
        assert stored["labels"].dtype == np.float32 and stored["labels"].shape == (3, 80)
        np.testing.assert_array_equal(stored["labels"], expected)
    reopened = open_coco(tmp_path / "out", [SPLIT])
    np.testing.assert_array_equal(reopened.labels(SPLIT), expected)
    table = reopened._load_labels_file()  # what VOCLayout reads: id -> float32 (C,)
    assert list(table) == list(ids)
    assert all(v.dtype == np.float32 and v.shape == (80,) for v in table.values())
    np.testing.assert_array_equal(table["my_photo_2_b"], expected[1])


def test_labels_file_that_needs_pickle_is_refused(coco_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_coco(coco_root, SPLIT, out_dir=out)
    path = out / f"cls_labels_{SPLIT}.npz"
    refused = rf"labels file .*cls_labels_{SPLIT}\.npz holds pickled Python objects and is refused"

    marker = tmp_path / "unpickled"
    ids = np.array([stem(1), stem(2), _Unpickled(marker)], dtype=object)
    np.savez(path, ids=ids, labels=np.zeros((3, 3), np.float32))  # np.savez pickles object arrays
    with pytest.raises(ValueError, match=refused):
        open_coco(out, [SPLIT]).labels(SPLIT)
    assert not marker.exists()

    # the first format (np.save of a dict) under the new name is refused as well
    with open(path, "wb") as handle:
        np.save(handle, np.array({stem(1): np.ones(3, np.float32)}, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=refused):
        open_coco(out, [SPLIT]).labels(SPLIT)
    path.write_bytes(pickle.dumps({stem(1): _Unpickled(marker)}))  # a bare pickle
    with pytest.raises(ValueError, match=refused):
        open_coco(out, [SPLIT]).labels(SPLIT)
    assert not marker.exists()

    # the next preparation writes the plain arrays again and keeps the masks
    again = prepare_coco(coco_root, SPLIT, out_dir=out)
    assert again.summary["parsed_annotation_file"] is True and again.summary["masks_rendered"] == 0
    assert open_coco(out, [SPLIT]).labels(SPLIT).tolist() == [[1, 1, 1], [0, 0, 0], [0, 1, 1]]

    # other malformed files name the file too
    np.savez(path, names=np.array([stem(1)]))
    with pytest.raises(ValueError, match=r"cls_labels_val2014\.npz is not an \.npz holding the arrays"):
        open_coco(out, [SPLIT]).labels(SPLIT)
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"unreadable labels file .*cls_labels_val2014\.npz"):
        open_coco(out, [SPLIT]).labels(SPLIT)
    np.savez(path, ids=np.array([stem(1), stem(2), stem(5)]), labels=np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"cls_labels_val2014\.npz has 4 classes"):
        open_coco(out, [SPLIT]).labels(SPLIT)


def test_folder_of_the_pickled_format_is_prepared_again(coco_root: Path, tmp_path: Path) -> None:
    """A folder from the version that wrote cls_labels_<split>.npy: its masks are kept, the labels redone."""
    out = tmp_path / "out"
    first = prepare_coco(coco_root, SPLIT, out_dir=out)
    npz, legacy = out / f"cls_labels_{SPLIT}.npz", out / f"cls_labels_{SPLIT}.npy"
    old = dict(zip(first.ids(SPLIT), first.labels(SPLIT)))
    npz.unlink()
    np.save(legacy, np.array(old, dtype=object), allow_pickle=True)
    with pytest.raises(FileNotFoundError, match=rf"cls_labels_{SPLIT}\.npz .*run prepare_coco again"):
        open_coco(out, [SPLIT])

    again = prepare_coco(coco_root, SPLIT, out_dir=out)
    assert again.summary["parsed_annotation_file"] is True
    assert again.summary["masks_rendered"] == 0 and again.summary["masks_reused"] == 3
    assert npz.is_file() and not legacy.exists()
    np.testing.assert_array_equal(again.labels(SPLIT), first.labels(SPLIT))


# -------------------------------------------------------------------------------------- locking
def _waiting(text: str) -> bool:
    return "waiting for another process that prepares the same COCO split" in text


def test_preparation_waits_for_the_filelock(
    coco_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The split's lock is a filelock lock: held here, a preparation waits (and says so) until it is free."""
    out = tmp_path / "out"
    out.mkdir()
    result: dict = {}

    def prepare() -> None:
        try:
            result["layout"] = prepare_coco(coco_root, SPLIT, out_dir=out)
        except BaseException as err:  # handed to the test thread
            result["error"] = err

    thread = threading.Thread(target=prepare)
    with caplog.at_level(logging.INFO, logger="src.data.coco"):
        with FileLock(out / f".coco_{SPLIT}.lock"):
            thread.start()
            deadline = time.monotonic() + 60
            while not any(_waiting(r.getMessage()) for r in caplog.records):
                assert thread.is_alive() and time.monotonic() < deadline, result
                time.sleep(0.05)
            time.sleep(0.3)
            assert thread.is_alive() and not (out / f"coco_{SPLIT}.json").exists()  # nothing done yet
        thread.join(120)
    assert not thread.is_alive() and "error" not in result, result
    assert result["layout"].summary["masks_rendered"] == 3


def test_concurrent_preparations_serialise(coco_root: Path, tmp_path: Path) -> None:
    """Two processes (the CLI) prepare one split at once: one renders, the other waits and reuses its work."""
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-m", "src.data.coco", "--root", str(coco_root), "--split", SPLIT, "--out", str(out)]
    logs = [tmp_path / f"stderr_{i}.txt" for i in range(2)]
    procs = []
    with FileLock(out / f".coco_{SPLIT}.lock"):  # both start while the split is locked: they do contend
        for log_file in logs:
            with open(log_file, "w") as stderr:
                procs.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True))
        deadline = time.monotonic() + 300
        while not all(_waiting(f.read_text()) for f in logs):
            running = all(p.poll() is None for p in procs)
            assert running and time.monotonic() < deadline, [f.read_text()[-2000:] for f in logs]
            time.sleep(0.2)
    summaries = []
    for proc, log_file in zip(procs, logs):
        stdout, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log_file.read_text()[-2000:]
        summaries.append(json.loads(stdout))
    assert sorted(s["masks_rendered"] for s in summaries) == [0, 3]
    assert sorted(s["parsed_annotation_file"] for s in summaries) == [False, True]
    assert mask_of(open_coco(out, [SPLIT]), 1)[15, 15] == DOG


# --------------------------------------------------------------------------------- real excerpt
@pytest.mark.skipif(not EXCERPT.is_file(), reason=f"shared COCO excerpt not found at {EXCERPT}")
def test_real_val2014_excerpt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The first 100 items of each list of the real instances_val2014.json; the images are absent."""
    root = tmp_path / "coco"
    (root / SPLIT).mkdir(parents=True)  # the image folder exists, the files do not
    with caplog.at_level(logging.INFO, logger="src.data.coco"):
        layout = prepare_coco(root, SPLIT, EXCERPT, out_dir=tmp_path / "out")

    s = layout.summary
    assert s["num_images"] == s["num_images_in_file"] == 100
    assert s["num_annotations_in_file"] == 100 and s["num_annotations_used"] == 1
    assert s["dangling_annotations"]["count"] == 99
    assert s["dangling_annotations"]["example_annotation_ids"][:2] == [156, 509]
    assert s["dangling_annotations"]["example_image_ids"][:2] == [558840, 200365]
    assert s["images_without_annotations"]["count"] == 99
    assert s["missing_image_files"]["count"] == 100
    assert s["crowd_annotations"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("99 of 100 annotations" in w for w in warnings), warnings
    assert any("100 of 100 image files are missing" in w for w in warnings), warnings

    # the 80 categories, ids 1..90 with gaps, become 1..80 in id order
    assert layout.num_classes == 80
    assert layout.class_names[:3] == ("person", "bicycle", "car")
    assert layout.class_names[16] == "dog" and layout.class_names[-1] == "toothbrush"

    # the one annotation on a listed image: 3488, a dog (category 18 -> class 17) on image 173350
    dog_image = "COCO_val2014_000000173350"
    labels = layout.labels(SPLIT)
    assert labels.sum() == 1 and labels[layout.ids(SPLIT).index(dog_image), 16] == 1
    with np.load(tmp_path / "out" / f"cls_labels_{SPLIT}.npz", allow_pickle=False) as stored:
        assert stored["ids"].tolist() == list(layout.ids(SPLIT))
        assert stored["labels"].shape == (100, 80) and stored["labels"].dtype == np.float32
        np.testing.assert_array_equal(stored["labels"], labels)
    mask = read_label(layout.mask_path(dog_image))
    assert mask.shape == (480, 640)
    values, counts = np.unique(mask, return_counts=True)
    assert values.tolist() == [0, 17] and counts[1] == 32055  # its area field says 32051.3
    ys, xs = np.nonzero(mask == 17)  # inside its bbox [266.67, 0.0, 201.69, 269.58]
    assert xs.min() >= 266 and xs.max() <= 469 and ys.min() == 0 and ys.max() <= 270

    # images are absent: reading a sample fails naming it; check_files fails at preparation;
    # drop_bad_images leaves nothing
    first = layout.ids(SPLIT)[0]
    assert first == "COCO_val2014_000000001146"
    with pytest.raises(FileNotFoundError, match=f"{first}.jpg"):
        WSSSDataset(layout, SPLIT)[0]
    with pytest.raises(FileNotFoundError, match=f"{first}.jpg \\(100 of the 100 images"):
        prepare_coco(root, SPLIT, EXCERPT, out_dir=tmp_path / "out", check_files=True)
    with pytest.raises(ValueError, match="no images left in COCO split 'val2014'"):
        prepare_coco(root, SPLIT, EXCERPT, out_dir=tmp_path / "out2", drop_bad_images=True)


@pytest.mark.skipif(not EXCERPT.is_file(), reason=f"shared COCO excerpt not found at {EXCERPT}")
def test_real_excerpt_category_gaps_map_in_order(tmp_path: Path) -> None:
    data = json.loads(EXCERPT.read_text())
    ids = sorted(c["id"] for c in data["categories"])
    assert len(ids) == 80 and ids[0] == 1 and ids[-1] == 90
    sub = copy.deepcopy(data)
    sub["images"] = [im for im in sub["images"] if im["id"] == 173350]
    ann = tmp_path / "one.json"
    ann.write_text(json.dumps(sub))
    root = tmp_path / "coco"
    (root / SPLIT).mkdir(parents=True)
    layout = prepare_coco(root, SPLIT, ann, out_dir=tmp_path / "out")
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert layout.class_names == tuple(names[i] for i in ids)
    assert layout.ids(SPLIT) == ("COCO_val2014_000000173350",)
