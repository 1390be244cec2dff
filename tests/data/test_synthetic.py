"""The synthetic confounded set (src/data/synthetic.py): determinism, the documented confounding, the
255 border band, the VOC reader over the generated root, generate-once caching and spec checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from src.data.datasets import WSSSDataset
from src.data.synthetic import SPLITS, SyntheticSpec, draw_image, format_summary, generate, synthetic_layout
from src.data.voc import VOCLayout
from src.utils.io import read_image, read_label

SMALL = {"image_size": 48, "num_train": 5, "num_val": 3, "num_val_deconfounded": 3}
PREFIX = {"train": "train", "val": "val", "val_deconfounded": "vdc"}


def classes_in(label: np.ndarray, num_classes: int) -> np.ndarray:
    """K-dim bool vector of the foreground classes present in a label map."""
    vec = np.zeros(num_classes, bool)
    values = np.unique(label)
    values = values[(values > 0) & (values <= num_classes)]
    vec[values.astype(int) - 1] = True
    return vec


def draw_many(spec: SyntheticSpec, confounded: bool, n: int, split_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, K) class presence from the masks and (n,) context-texture flags of n images drawn as generate does."""
    labels, water = [], []
    for i in range(n):
        _, label, has_water = draw_image(spec, confounded, np.random.default_rng([spec.seed, split_index, i]))
        labels.append(classes_in(label, len(spec.class_names)))
        water.append(has_water)
    return np.array(labels), np.array(water)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    spec = SyntheticSpec(**SMALL)
    root = tmp_path_factory.mktemp("synthetic") / "root"
    summary = generate(spec, root)
    return spec, root, summary


# ------------------------------------------------------------------------------------------ determinism
def test_generation_is_deterministic(generated, tmp_path):
    spec, root, _ = generated
    again = tmp_path / "again"
    generate(SyntheticSpec(**SMALL), again)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".jpg"]) == 11
    for rel in files:
        assert (again / rel).read_bytes() == (root / rel).read_bytes(), rel

    other = tmp_path / "other"
    generate(SyntheticSpec(**{**SMALL, "seed": 1}), other)
    for split, n in (("train", 5), ("val", 3), ("val_deconfounded", 3)):
        for i in range(n):
            name = f"{PREFIX[split]}_{i:05d}"
            assert (other / "JPEGImages" / f"{name}.jpg").read_bytes() != (root / "JPEGImages" / f"{name}.jpg"
                                                                            ).read_bytes()
    masks_same = [(other / "SegmentationClass" / f"train_{i:05d}.png").read_bytes()
                  == (root / "SegmentationClass" / f"train_{i:05d}.png").read_bytes() for i in range(5)]
    assert not all(masks_same)


def test_draw_image_same_rng_same_output():
    spec = SyntheticSpec(image_size=48)
    a = draw_image(spec, True, np.random.default_rng([3, 0, 7]))
    b = draw_image(spec, True, np.random.default_rng([3, 0, 7]))
    c = draw_image(spec, True, np.random.default_rng([3, 0, 8]))
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes() and a[2] == b[2]
    assert a[0].tobytes() != c[0].tobytes()
    assert a[0].shape == (48, 48, 3) and a[0].dtype == np.uint8
    assert a[1].shape == (48, 48) and a[1].dtype == np.uint8


# ------------------------------------------------------------------------------------------ confounding
def test_train_split_is_confounded():
    spec = SyntheticSpec(image_size=48)
    labels, water = draw_many(spec, True, 300, split_index=0)
    names = list(spec.class_names)
    rider, horse, boat = (labels[:, names.index(n)] for n in ("rider", "horse", "boat"))
    assert rider.sum() >= 60 and horse.sum() >= 60 and boat.sum() >= 60  # enough images to measure
    assert (rider & horse).sum() / rider.sum() >= 0.8  # P(horse | rider)
    assert (rider & horse).sum() / horse.sum() >= 0.8  # P(rider | horse)
    assert (water & boat).sum() / boat.sum() >= 0.8    # P(water | boat)
    assert (water & ~boat).sum() / (~boat).sum() <= 0.1  # P(water | no boat)


def test_val_deconfounded_breaks_the_confounding():
    spec = SyntheticSpec(image_size=48)
    labels, water = draw_many(spec, False, 300, split_index=2)
    names = list(spec.class_names)
    rider, horse, boat = (labels[:, names.index(n)] for n in ("rider", "horse", "boat"))
    p_horse_given_rider = (rider & horse).sum() / rider.sum()
    p_rider_given_horse = (rider & horse).sum() / horse.sum()
    # independence: P(a | b) close to P(a) (pair_class_rate = 0.4), far below the confounded 0.9
    assert abs(p_horse_given_rider - horse.mean()) < 0.15 and p_horse_given_rider < 0.6
    assert abs(p_rider_given_horse - rider.mean()) < 0.15 and p_rider_given_horse < 0.6
    p_water_boat = (water & boat).sum() / boat.sum()
    p_water_no_boat = (water & ~boat).sum() / (~boat).sum()
    assert 0.3 <= p_water_boat <= 0.7 and 0.3 <= p_water_no_boat <= 0.7
    assert abs(p_water_boat - p_water_no_boat) < 0.2


def test_summary_counts_match_the_masks(generated):
    spec, root, summary = generated
    k = len(spec.class_names)
    for split_index, split in enumerate(SPLITS):
        n = spec.split_sizes[split]
        labels, water = [], []
        for i in range(n):
            labels.append(classes_in(read_label(root / "SegmentationClass" / f"{PREFIX[split]}_{i:05d}.png"), k))
            water.append(draw_image(spec, split != "val_deconfounded",
                                    np.random.default_rng([spec.seed, split_index, i]))[2])
        labels_arr, water_arr = np.array(labels, int), np.array(water)
        info = summary["splits"][split]
        assert info["images"] == n
        assert info["class_counts"] == dict(zip(spec.class_names, labels_arr.sum(0).tolist()))
        assert info["cooccurrence"] == (labels_arr.T @ labels_arr).tolist()
        ctx = labels_arr[:, list(spec.class_names).index("boat")].astype(bool)
        assert info["context_texture_with_class"] == int((water_arr & ctx).sum())
        assert info["context_texture_without_class"] == int((water_arr & ~ctx).sum())
    text = format_summary(summary, spec.class_names)
    assert "train: 5 images" in text and "val_deconfounded: 3 images" in text
    assert all(name in text for name in spec.class_names)


# ---------------------------------------------------------------------------------------- border band
def band_of(raw: np.ndarray, border: int) -> np.ndarray:
    """Pixels whose (2 border + 1)^2 window (clipped at the image edge) holds more than one label."""
    h, w = raw.shape
    band = np.zeros_like(raw, bool)
    for dy in range(-border, border + 1):
        for dx in range(-border, border + 1):
            shifted = np.full((h, w), -1, np.int64)
            ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
            xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
            shifted[yd, xd] = raw[ys, xs]
            band |= (shifted != -1) & (shifted != raw)
    return band


@pytest.mark.parametrize(("size", "border"), [(48, 1), (96, 2)])
def test_border_band_along_boundaries_only(size, border):
    spec = SyntheticSpec(image_size=size, border=border)
    raw_spec = dataclasses.replace(spec, border=0)
    for i in range(20):
        image, label, _ = draw_image(spec, True, np.random.default_rng([0, 0, i]))
        raw_image, raw, _ = draw_image(raw_spec, True, np.random.default_rng([0, 0, i]))
        assert not (raw == 255).any()
        np.testing.assert_array_equal(image, raw_image)  # the band only touches the mask
        expected = band_of(raw, border)
        assert expected.any()  # every image holds at least one object
        np.testing.assert_array_equal(label == 255, expected, err_msg=f"image {i}")
        np.testing.assert_array_equal(label[~expected], raw[~expected])


@pytest.mark.parametrize("border", [1, 2])
def test_band_keeps_every_drawn_class_at_the_default_size(border):
    """Image-level labels come from the masks: at the default 96 px the band never erases a drawn
    (visible) object, so the labels are those of the drawing."""
    spec = SyntheticSpec(border=border)
    raw_spec = dataclasses.replace(spec, border=0)
    for i in range(60):
        _, label, _ = draw_image(spec, True, np.random.default_rng([0, 0, i]))
        _, raw, _ = draw_image(raw_spec, True, np.random.default_rng([0, 0, i]))
        np.testing.assert_array_equal(classes_in(label, 6), classes_in(raw, 6), err_msg=f"image {i}")


@pytest.mark.parametrize(("size", "index"), [(96, 934), (48, 403)])
def test_draw_image_never_crashes_on_the_pair_placement(size, index):
    # train image `index` of seed 0: generate() with num_train > index crashes the same way
    image, label, _ = draw_image(SyntheticSpec(image_size=size), True, np.random.default_rng([0, 0, index]))
    assert image.shape == (size, size, 3) and label.shape == (size, size)


# ---------------------------------------------------------------------------------------- VOC reader
def test_voc_reader_reads_the_generated_root(generated):
    spec, root, _ = generated
    layout = VOCLayout(root, spec.class_names)
    for split_index, split in enumerate(SPLITS):
        n = spec.split_sizes[split]
        assert layout.ids(split) == tuple(f"{PREFIX[split]}_{i:05d}" for i in range(n))
        labels = layout.labels(split)
        assert labels.shape == (n, 6) and labels.dtype == np.float32
        for i, image_id in enumerate(layout.ids(split)):
            _, drawn, _ = draw_image(spec, split != "val_deconfounded",
                                     np.random.default_rng([spec.seed, split_index, i]))
            mask = read_label(layout.mask_path(image_id))
            np.testing.assert_array_equal(mask, drawn)  # the PNG holds exactly the drawn label map
            np.testing.assert_array_equal(labels[i], classes_in(drawn, 6).astype(np.float32))
            assert labels[i].sum() >= 1  # every image has an object
            assert read_image(layout.image_path(image_id)).shape == (48, 48, 3)
    ds = WSSSDataset(layout, "train", target="gt")
    sample = ds[2]
    assert sample["id"] == "train_00002"
    assert sample["size"].tolist() == [48, 48]
    assert tuple(sample["image"].shape) == (3, 48, 48)
    assert tuple(sample["mask"].shape) == (48, 48)
    np.testing.assert_array_equal(sample["label"].numpy(), layout.labels("train")[2])


def test_synthetic_layout_generates_once_and_reuses(tmp_path):
    spec = {**SMALL, "num_train": 3}
    first = synthetic_layout(tmp_path / "cache", spec)
    files = sorted(p for p in first.root.rglob("*") if p.is_file())
    assert first.root.parent == tmp_path / "cache" / "datasets" / "synthetic"
    assert (first.root / "summary.json").is_file()  # written last: the mark of a finished generation
    assert first.ids("train") == ("train_00000", "train_00001", "train_00002")
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    second = synthetic_layout(tmp_path / "cache", SyntheticSpec(**spec))
    assert second.root == first.root
    assert sorted(p for p in second.root.rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes  # nothing rewritten
    other = synthetic_layout(tmp_path / "cache", {**spec, "seed": 5})
    assert other.root != first.root


def test_synthetic_layout_generates_again_when_interrupted(tmp_path):
    spec = {**SMALL, "num_train": 3}
    first = synthetic_layout(tmp_path / "cache", spec)
    (first.root / "summary.json").unlink()  # as if killed before the end
    (first.root / "JPEGImages" / "train_00001.jpg").unlink()
    again = synthetic_layout(tmp_path / "cache", spec)
    assert again.root == first.root and (again.root / "JPEGImages" / "train_00001.jpg").is_file()
    assert (again.root / "summary.json").is_file()


# ---------------------------------------------------------------------------------------- spec checks
BAD_SPECS = [
    ({"image_size": 16}, "image_size"),
    ({"pair_rate": 1.5}, "pair_rate"),
    ({"context_leak": -0.1}, "context_leak"),
    ({"class_names": ["rider", "horse", "boat", "dragon"]}, "class_names"),
    ({"class_names": ["rider", "horse", "boat", "boat"]}, "class_names"),
    ({"pair": ["rider", "rider"]}, "pair"),
    ({"context_class": "rider"}, "context_class"),
    ({"max_objects": 1}, "max_objects"),
    ({"num_val": 0}, "val"),
]


@pytest.mark.parametrize(("override", "key"), BAD_SPECS)
def test_bad_spec_raises_naming_the_key(override, key):
    with pytest.raises(ValueError, match=r"data\.layout\.spec") as info:
        SyntheticSpec(**override)
    assert key in str(info.value)


@pytest.mark.parametrize(("override", "key"), [({"image_size": 16}, "image_size"), ({"pair_rate": 1.5}, "pair_rate")])
def test_bad_spec_names_the_config_path(override, key):
    with pytest.raises(ValueError, match=rf"data\.layout\.spec\.{key}"):
        SyntheticSpec(**override)


@pytest.mark.parametrize("scale", [(0.9, 1.2), (0.45, 0.3), (0.3,)])
def test_bad_object_scale_names_the_key(scale):
    with pytest.raises(ValueError, match="object_scale"):
        SyntheticSpec(image_size=48, object_scale=scale)
