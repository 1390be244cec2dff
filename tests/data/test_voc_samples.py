"""The VOC reader (src/data/voc.py, src/data/datasets.py, src/utils/io.py) on real PASCAL VOC 2012 files.

The files live in the shared folder next to the checkout (shared/data/voc_samples, see its SOURCES.md);
they are read in place. Expected values below are those SOURCES.md lists (sizes W x H, classes, border
pixel counts, per-class label counts over the full cls_labels.npy).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED
from PIL import Image

from src.data.datasets import WSSSDataset
from src.data.voc import VOC_CLASSES, VOCLayout, decode_int_id
from src.utils.io import read_image, read_label, save_label_png_atomic

SAMPLES = SHARED / "data" / "voc_samples"
VOC = SAMPLES / "VOCdevkit" / "VOC2012"
LISTS = SAMPLES / "lists"
PSA_LISTS = LISTS / "psa_seam_format"
PALETTE_AUG = SAMPLES / "variants" / "SegmentationClassAug_palette"

pytestmark = pytest.mark.skipif(
    not VOC.is_dir(), reason=f"shared VOC samples not found at {SAMPLES} (no ../shared, no $WSSS_SHARED_DIR)"
)

# id -> (width, height, mask values, border (255) pixel count), from SOURCES.md
EXPECTED = {
    "2007_000032": (500, 281, {0, 1, 15, 255}, 5355),
    "2007_000033": (500, 366, {0, 1, 255}, 8195),
    "2007_000039": (500, 375, {0, 20, 255}, 2930),
    "2007_000042": (500, 335, {0, 19, 255}, 9996),
    "2007_000063": (500, 375, {0, 9, 12, 255}, 8714),
    "2007_000129": (334, 500, {0, 2, 15, 255}, 17285),
    "2007_000663": (422, 500, {0, 6, 7, 255}, 9074),
    "2007_000762": (500, 375, {0, 5, 11, 15, 255}, 18531),
    "2007_000799": (500, 441, {0, 13, 15, 255}, 8231),
}
SPLITS = {
    "train": ("2007_000032", "2007_000039", "2007_000063"),
    "train_aug": ("2007_000032", "2007_000039", "2007_000063"),
    "val": ("2007_000033", "2007_000042", "2007_000129", "2007_000663", "2007_000762", "2007_000799"),
}
AUG_IDS = SPLITS["train"]
# positives per class over all 12031 entries of cls_labels.npy (train_aug + val)
CLASS_COUNTS = [680, 583, 808, 540, 810, 467, 1277, 1124, 1351, 338, 688, 1316, 524, 568, 4600, 607, 357, 739,
                587, 641]


def expected_labels(image_id: str) -> np.ndarray:
    vec = np.zeros(20, np.float32)
    for value in EXPECTED[image_id][2] - {0, 255}:
        vec[value - 1] = 1
    return vec


def class_names(image_id: str) -> list[str]:
    return [VOC_CLASSES[i] for i in np.flatnonzero(expected_labels(image_id))]


@pytest.fixture(scope="module")
def layout() -> VOCLayout:
    return VOCLayout(VOC, VOC_CLASSES)


# ---------------------------------------------------------------------------------- reading
def test_split_lists(layout: VOCLayout) -> None:
    for split, ids in SPLITS.items():
        assert layout.ids(split) == ids


def test_sizes_values_and_labels_from_masks(layout: VOCLayout) -> None:
    for split, ids in SPLITS.items():
        labels = layout.labels(split)  # no labels file: from the masks
        assert labels.shape == (len(ids), 20) and labels.dtype == np.float32
        for row, image_id in zip(labels, ids):
            np.testing.assert_array_equal(row, expected_labels(image_id))
    for image_id, (width, height, values, border) in EXPECTED.items():
        image = read_image(layout.image_path(image_id))
        assert image.shape == (height, width, 3) and image.dtype == np.uint8
        path = layout.mask_path(image_id)
        assert path == VOC / "SegmentationClass" / f"{image_id}.png"
        mask = read_label(path)
        assert mask.shape == (height, width)
        assert set(np.unique(mask).tolist()) == values
        assert int((mask == 255).sum()) == border
    assert class_names("2007_000762") == ["bottle", "diningtable", "person"]
    assert class_names("2007_000032") == ["aeroplane", "person"]


def test_image_reads_as_rgb(layout: VOCLayout) -> None:
    """OpenCV decodes BGR; read_image must hand back RGB (the same pixels PIL gives)."""
    path = layout.image_path("2007_000032")
    with Image.open(path) as img:
        pil = np.asarray(img.convert("RGB"), dtype=np.int16)
    diff = np.abs(read_image(path).astype(np.int16) - pil)
    assert diff.mean() < 1.0  # decoders may differ by rounding only; BGR order would differ a lot


def test_cls_labels_both_formats_agree_with_masks(layout: VOCLayout) -> None:
    assert decode_int_id(2007000032) == "2007_000032" and decode_int_id(np.int32(2011003276)) == "2011_003276"
    irn = VOCLayout(VOC, VOC_CLASSES, labels_file=LISTS / "cls_labels.npy")
    keys = list(np.load(LISTS / "cls_labels.npy", allow_pickle=True).item())[:3]
    assert all(isinstance(k, np.integer) for k in keys)
    formats = [irn]
    if (PSA_LISTS / "cls_labels.npy").is_file():  # SOURCES.md: may be deleted to save space
        psa = VOCLayout(VOC, VOC_CLASSES, labels_file=PSA_LISTS / "cls_labels.npy")
        assert all(isinstance(k, str) for k in list(np.load(PSA_LISTS / "cls_labels.npy",
                                                            allow_pickle=True).item())[:3])
        formats.append(psa)
    for split in SPLITS:
        from_masks = layout.labels(split)
        for reader in formats:
            np.testing.assert_array_equal(reader.labels(split), from_masks)


def test_full_lists_and_label_counts() -> None:
    """The full irn lists with the full label dict: every id has labels; per-class counts as recorded."""
    full = VOCLayout(VOC, VOC_CLASSES, list_dir=str(LISTS), labels_file=LISTS / "cls_labels.npy")
    assert (len(full.ids("train")), len(full.ids("val")), len(full.ids("train_aug"))) == (1464, 1449, 10582)
    assert set(full.ids("train")) <= set(full.ids("train_aug"))
    assert not set(full.ids("val")) & set(full.ids("train_aug"))
    counts = full.labels("train_aug").sum(0) + full.labels("val").sum(0)
    assert counts.astype(int).tolist() == CLASS_COUNTS
    positives = full.labels("train_aug").sum(1)
    assert positives.min() == 1 and positives.max() == 6


@pytest.mark.skipif(not PSA_LISTS.is_dir(), reason=f"psa/SEAM lists not found at {PSA_LISTS}")
def test_psa_format_lists_parse_to_ids(tmp_path: Path) -> None:
    psa = VOCLayout(VOC, VOC_CLASSES, list_dir=str(PSA_LISTS))
    irn = VOCLayout(VOC, VOC_CLASSES, list_dir=str(LISTS))
    first = (PSA_LISTS / "train.txt").read_text().splitlines()[0]
    assert first == "/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png"
    for split in ("train", "val"):
        assert psa.ids(split) == irn.ids(split)
    # psa's val lines point at SegmentationClassAug, absent for val here: the reader takes only the id
    # from a line and looks the mask up in its own mask_dirs
    lines = [line for line in (PSA_LISTS / "val.txt").read_text().splitlines()
             if Path(line.split()[0]).stem in SPLITS["val"]]
    (tmp_path / "val.txt").write_text("\n".join(lines) + "\n")
    subset = VOCLayout(VOC, VOC_CLASSES, list_dir=str(tmp_path))
    assert subset.ids("val") == SPLITS["val"]
    assert subset.has_masks("val")
    assert subset.mask_path("2007_000033") == VOC / "SegmentationClass" / "2007_000033.png"


def test_aug_masks_grey_and_palette_equal_segmentation_class() -> None:
    for image_id in AUG_IDS:
        reference = read_label(VOC / "SegmentationClass" / f"{image_id}.png")
        grey, palette = VOC / "SegmentationClassAug" / f"{image_id}.png", PALETTE_AUG / f"{image_id}.png"
        with Image.open(grey) as g, Image.open(palette) as p:
            assert (g.mode, p.mode) == ("L", "P")
        np.testing.assert_array_equal(read_label(grey), reference)
        np.testing.assert_array_equal(read_label(palette), reference)
    # Aug first: the train ids resolve to the Aug masks, the val ids fall back to SegmentationClass
    aug_first = VOCLayout(VOC, VOC_CLASSES, mask_dirs=("SegmentationClassAug", "SegmentationClass"))
    assert aug_first.mask_path("2007_000039") == VOC / "SegmentationClassAug" / "2007_000039.png"
    assert aug_first.mask_path("2007_000042") == VOC / "SegmentationClass" / "2007_000042.png"
    palette_only = VOCLayout(VOC, VOC_CLASSES, mask_dirs=(str(PALETTE_AUG),))
    expected = np.stack([expected_labels(i) for i in AUG_IDS])
    np.testing.assert_array_equal(palette_only.labels("train"), expected)
    assert palette_only.mask_path("2007_000033") is None and not palette_only.has_masks("val")


def test_dataset_samples(layout: VOCLayout) -> None:
    dataset = WSSSDataset(layout, "val", target="gt", return_raw=True)
    assert len(dataset) == 6
    for index, image_id in enumerate(SPLITS["val"]):
        width, height, values, border = EXPECTED[image_id]
        sample = dataset[index]
        assert sample["id"] == image_id and sample["index"] == index
        assert sample["size"].tolist() == [height, width]
        assert tuple(sample["image"].shape) == (3, height, width)
        assert tuple(sample["raw"].shape) == (height, width, 3)
        assert tuple(sample["mask"].shape) == (height, width)
        assert int((sample["mask"] == 255).sum()) == border  # the VOC borders survive
        assert set(sample["mask"].unique().tolist()) == values
        np.testing.assert_array_equal(sample["label"].numpy(), expected_labels(image_id))
    subset = WSSSDataset(layout, "val", ids=["2007_000762"])
    assert len(subset) == 1 and "mask" not in subset[0]
    np.testing.assert_array_equal(subset[0]["label"].numpy(), expected_labels("2007_000762"))


# ---------------------------------------------------------------------------------- errors
def one_image_root(tmp_path: Path, image_id: str = "2007_000032") -> Path:
    """A root with its own list and mask folder; images read from the shared folder (absolute image_dir)."""
    root = tmp_path / "voc"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text(image_id + "\n")
    (root / "SegmentationClass").mkdir()
    return root


def labels_file(tmp_path: Path, image_id: str) -> Path:
    """A psa-style labels file (str keys) for one image, with its true labels."""
    path = tmp_path / f"labels_{image_id}.npy"
    np.save(path, np.array({image_id: expected_labels(image_id)}, dtype=object), allow_pickle=True)
    return path


def test_missing_root_and_list(tmp_path: Path, layout: VOCLayout) -> None:
    with pytest.raises(FileNotFoundError, match="dataset root not found: .*nowhere"):
        VOCLayout(tmp_path / "nowhere", VOC_CLASSES)
    with pytest.raises(FileNotFoundError, match=r"split list not found: .*Segmentation/trainval\.txt"):
        layout.ids("trainval")
    with pytest.raises(FileNotFoundError, match="labels file not found: .*none.npy"):
        VOCLayout(VOC, VOC_CLASSES, labels_file=tmp_path / "none.npy")


def test_corrupt_jpeg_is_named(tmp_path: Path) -> None:
    root = one_image_root(tmp_path)
    (root / "JPEGImages").mkdir()
    data = (VOC / "JPEGImages" / "2007_000032.jpg").read_bytes()
    bad = root / "JPEGImages" / "2007_000032.jpg"
    bad.write_bytes(data[: len(data) * 2 // 3])  # truncated copy
    voc = VOCLayout(root, VOC_CLASSES, mask_dirs=(str(VOC / "SegmentationClass"),))
    with pytest.raises(ValueError, match=f"corrupt or truncated image file {bad}"):
        WSSSDataset(voc, "train")[0]
    bad.write_bytes(b"\xff\xd8\xff" + b"\x00" * 100 + b"\xff\xd9")  # end marker, garbage inside
    with pytest.raises(ValueError, match=f"corrupt or unreadable image file {bad}"):
        WSSSDataset(voc, "train")[0]
    bad.unlink()
    with pytest.raises(FileNotFoundError, match=f"image not found: {bad}"):
        voc.check_files("train")


def test_mask_with_class_id_above_k_is_named(tmp_path: Path) -> None:
    root = one_image_root(tmp_path)
    mask = read_label(VOC / "SegmentationClass" / "2007_000032.png").copy()
    mask[:5, :5] = 21
    path = root / "SegmentationClass" / "2007_000032.png"
    save_label_png_atomic(path, mask)
    voc = VOCLayout(root, VOC_CLASSES, image_dir=str(VOC / "JPEGImages"))
    with pytest.raises(ValueError, match=rf"mask {path} holds class ids \[21\] > 20"):
        voc.labels("train")  # labels from masks: the reader refuses the mask
    labelled = VOCLayout(root, VOC_CLASSES, image_dir=str(VOC / "JPEGImages"),
                         labels_file=labels_file(tmp_path, "2007_000032"))
    dataset = WSSSDataset(labelled, "train", target="gt")  # labels from a file: the mask is read per sample
    with pytest.raises(ValueError, match=f"mask {path} holds class id 21 > 20"):
        dataset[0]


def test_mask_size_differs_from_image_is_named(tmp_path: Path) -> None:
    root = one_image_root(tmp_path)
    mask = read_label(VOC / "SegmentationClass" / "2007_000032.png")[:-1]  # 500x280
    path = root / "SegmentationClass" / "2007_000032.png"
    save_label_png_atomic(path, mask)
    voc = VOCLayout(root, VOC_CLASSES, image_dir=str(VOC / "JPEGImages"))
    image = VOC / "JPEGImages" / "2007_000032.jpg"
    with pytest.raises(ValueError, match=f"mask {path} is 500x280 but image {image} is 500x281"):
        WSSSDataset(voc, "train", target="gt")[0]


def test_missing_mask_and_bad_labels_file_are_named(tmp_path: Path) -> None:
    root = one_image_root(tmp_path, "2007_000033")
    voc = VOCLayout(root, VOC_CLASSES, image_dir=str(VOC / "JPEGImages"))
    with pytest.raises(FileNotFoundError, match="no mask for 2007_000033"):
        voc.labels("train")
    labelled = VOCLayout(root, VOC_CLASSES, image_dir=str(VOC / "JPEGImages"),
                         labels_file=labels_file(tmp_path, "2007_000033"))
    with pytest.raises(FileNotFoundError, match=f"no ground-truth mask for 2007_000033 under {root}"):
        WSSSDataset(labelled, "train", target="gt")[0]
    rgb = root / "SegmentationClass" / "2007_000033.png"
    shutil.copyfile(VOC / "JPEGImages" / "2007_000033.jpg", tmp_path / "x.jpg")
    Image.fromarray(read_image(tmp_path / "x.jpg")).save(rgb)  # an RGB picture, not class ids
    with pytest.raises(ValueError, match=f"mask {rgb} has mode 'RGB'"):
        voc.labels("train")

    short = tmp_path / "short.npy"
    np.save(short, np.array({"2007_000033": np.ones(19, np.float32)}, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=f"labels file {short}: entry 2007_000033 has 19 classes"):
        VOCLayout(root, VOC_CLASSES, image_dir=str(VOC / "JPEGImages"), labels_file=short).labels("train")
    other = tmp_path / "other.npy"
    np.save(other, np.array({"2007_000032": np.ones(20, np.float32)}, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=rf"labels file {other} has no entry for 1 ids .*2007_000033"):
        VOCLayout(root, VOC_CLASSES, image_dir=str(VOC / "JPEGImages"), labels_file=other).labels("train")
