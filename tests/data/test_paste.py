"""CDA's instance bank rule, crop, rotation, shrink and paste (src/data/paste.py), and the doubled dataset."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch

from src.data.paste import (
    InstanceBank,
    PastedDataset,
    crop_instance,
    fit_instance,
    paste,
    paste_random_instance,
    rotate_instance,
    select_instance,
)
from src.data.transforms import sample_seed, seed_transform
from src.utils.io import save_npz_atomic

OPTIONS = {"max_angle": 90, "max_size": 0.7}


def mask_with(*boxes: tuple[int, int, int, int, int], size: int = 10) -> np.ndarray:
    """A 10 x 10 label map with class ``k`` on rows r0:r1, cols c0:c1 for each (k, r0, r1, c0, c1)."""
    mask = np.zeros((size, size), np.uint8)
    for k, r0, r1, c0, c1 in boxes:
        mask[r0:r1, c0:c1] = k
    return mask


# ---------------------------------------------------------------------------------- selection rule
@pytest.mark.parametrize(("mask", "expected"), [
    (mask_with((2, 0, 4, 0, 5)), 2),                    # 20 px of 100: 20 %
    (mask_with((2, 0, 1, 0, 10)), 2),                   # exactly 10 %: kept (inclusive)
    (mask_with((2, 0, 7, 0, 10)), 2),                   # exactly 70 %: kept
    (mask_with((2, 0, 1, 0, 9)), None),                 # 9 %: too small
    (mask_with((2, 0, 8, 0, 9)), None),                 # 72 %: too large
    (mask_with((2, 0, 4, 0, 5), (3, 6, 8, 0, 5)), None),  # two foreground classes
    (mask_with(), None),                                # background only
])
def test_selection_rule_one_class_covering_10_to_70_percent(mask, expected):
    assert select_instance(mask, num_classes=6, min_fraction=0.1, max_fraction=0.7) == expected


def test_ignored_pixels_are_not_a_class_but_count_in_the_area():
    mask = mask_with((4, 0, 2, 0, 10))  # 20 %
    mask[5:, :] = 255                   # half the image unknown
    assert select_instance(mask, 6, 0.1, 0.7) == 4
    assert select_instance(mask, 6, 0.25, 0.7) is None  # 20 % of the whole image, not 40 % of the known part


def test_crop_is_the_bounding_box_of_the_class_mask():
    image = np.arange(10 * 10 * 3, dtype=np.uint8).reshape(10, 10, 3)
    mask = mask_with((3, 2, 5, 4, 8))
    mask[2, 4] = 0  # a hole: still inside the box, not in the mask
    mask[9, 0] = 1  # another class: outside the crop
    pixels, binary = crop_instance(image, mask, 3)
    np.testing.assert_array_equal(pixels, image[2:5, 4:8])
    assert binary.dtype == bool and binary.shape == (3, 4)
    assert not binary[0, 0] and binary.sum() == 11


# --------------------------------------------------------------------------- rotate, shrink, paste
def test_rotation_by_zero_and_ninety_degrees_is_exact():
    image = np.random.default_rng(0).integers(0, 255, (3, 5, 3), dtype=np.uint8)
    mask = np.ones((3, 5), bool)
    same, same_mask = rotate_instance(image, mask, 0)
    np.testing.assert_array_equal(same, image)
    turned, turned_mask = rotate_instance(image, mask, 90)  # counter-clockwise, as np.rot90
    np.testing.assert_array_equal(turned, np.rot90(image))
    assert turned_mask.shape == (5, 3) and turned_mask.all()


def test_rotation_keeps_the_whole_instance():
    mask = np.ones((4, 12), bool)
    image = np.full((4, 12, 3), 200, np.uint8)
    _, turned = rotate_instance(image, mask, 45)
    # the pixel centres of a 12 x 4 bar at 45 degrees span (11 + 3) / sqrt(2) = 9.9 px each way: nothing is cut
    # off by the canvas, and the area is kept up to the rasterisation
    assert turned.shape[0] in (10, 11) and turned.shape[1] in (10, 11)
    assert abs(int(turned.sum()) - 48) <= 8


def test_shrink_keeps_the_aspect_and_fits_within_0_7_of_the_target():
    image = np.zeros((40, 20, 3), np.uint8)
    mask = np.ones((40, 20), bool)
    small, small_mask = fit_instance(image, mask, (50, 100), 0.7)  # height limit 35 -> scale 35/40
    assert small_mask.shape == (35, 17) and small.shape == (35, 17, 3)
    same, _ = fit_instance(image, mask, (100, 100), 0.7)  # fits already: never enlarged
    assert same.shape == (40, 20, 3)


def test_paste_writes_the_masked_pixels_only():
    target = np.zeros((6, 6, 3), np.uint8)
    inst = np.full((2, 2, 3), 200, np.uint8)
    mask = np.array([[1, 0], [1, 1]], bool)
    out = paste(target, inst, mask, top=1, left=3)
    expected = np.zeros((6, 6), np.uint8)
    expected[1, 3] = expected[2, 3] = expected[2, 4] = 200
    np.testing.assert_array_equal(out[..., 0], expected)
    assert target.max() == 0  # the input is not modified
    with pytest.raises(ValueError, match=r"a 2x2 instance at \(5, 0\) does not fit a 6x6 image"):
        paste(target, inst, mask, top=5, left=0)


def make_bank(folder: Path, instances: dict[int, list[tuple[np.ndarray, np.ndarray]]]) -> InstanceBank:
    for k, items in instances.items():
        for i, (pixels, binary) in enumerate(items):
            save_npz_atomic(folder / str(k) / f"img{i}.npz", image=pixels, mask=binary.astype(np.uint8))
    return InstanceBank(folder)


def test_pasting_adds_a_class_the_image_lacks_and_its_pixels_land_on_its_mask(tmp_path):
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((4, 4, 3), np.uint8)
    blue[..., 2] = 255
    disc = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]], bool)
    bank = make_bank(tmp_path, {2: [(red, disc)], 5: [(blue, disc)]})
    assert bank.counts() == {2: 1, 5: 1}
    image = np.full((20, 20, 3), 50, np.uint8)
    label = np.array([0, 1, 0, 0, 0, 0], np.float32)  # holds class 2: only class 5 may be pasted
    for seed in range(5):
        out, k, placed = paste_random_instance(image, label, bank, OPTIONS, np.random.default_rng(seed))
        assert k == 5
        assert placed.sum() > 0
        changed = (out != image).any(-1)
        np.testing.assert_array_equal(changed, placed)  # pixels change exactly where the pasted mask is
        assert (out[placed][:, 2] > 0).all() and (out[placed][:, 0] == 0).all()  # blue instance pixels
    full = np.ones(6, np.float32)
    same, k, placed = paste_random_instance(image, full, bank, OPTIONS, np.random.default_rng(0))
    assert k == 0 and placed is None and same is image


class FakeTrain(torch.utils.data.Dataset):
    """WSSSDataset's contract for a training set: (epoch, index) keys, ``labels``, ``transform``, ``target``."""

    def __init__(self, images: list[np.ndarray], labels: np.ndarray, transform=None, seed: int = 0):
        self.images, self.labels, self.transform, self.target, self.seed = images, labels, transform, None, seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        epoch, index = key
        image = self.images[index]
        if self.transform is not None:
            seed_transform(self.transform, sample_seed(self.seed, epoch, index))
            image = self.transform(image=image)["image"]
        return {"id": f"i{index}", "index": index, "image": torch.from_numpy(
            np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)),
            "label": torch.from_numpy(self.labels[index].astype(np.float32))}


def test_pasted_dataset_doubles_the_set_keeps_originals_and_is_deterministic(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]], np.float32)
    inst = np.full((6, 6, 3), 255, np.uint8)
    bank = make_bank(tmp_path, {3: [(inst, np.ones((6, 6), bool))]})
    flip = A.Compose([A.HorizontalFlip(p=0.5)])
    inner = FakeTrain(images, labels, flip, seed=7)
    data = PastedDataset(inner, bank, OPTIONS, seed=7)
    assert len(data) == 6 and inner.transform is flip  # the caller's dataset is left as it was
    for i in range(3):
        original = data[(2, i)]
        torch.testing.assert_close(original["image"], inner[(2, i)]["image"])  # item i < N = the plain item
        assert original["pasted_class"] == 0
        pasted = data[(2, 3 + i)]
        assert pasted["pasted_class"] == 3
        torch.testing.assert_close(pasted["label"], torch.tensor([*labels[i][:2], 1.0]))
        torch.testing.assert_close(pasted["image"], data[(2, 3 + i)]["image"])  # same (epoch, index): same draw
    # another epoch draws another place for at least one image
    assert any(not torch.equal(data[(0, 3 + i)]["image"], data[(1, 3 + i)]["image"]) for i in range(3))


def test_pasted_dataset_refuses_an_empty_bank_and_bad_options(tmp_path):
    inner = FakeTrain([np.zeros((8, 8, 3), np.uint8)], np.zeros((1, 2), np.float32))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"the instance bank .*empty is empty"):
        PastedDataset(inner, InstanceBank(tmp_path / "empty"), OPTIONS, 0)
    bank = make_bank(tmp_path / "bank", {1: [(np.zeros((2, 2, 3), np.uint8), np.ones((2, 2), bool))]})
    with pytest.raises(ValueError, match=r"paste.max_size must be in \(0, 1\], got 1.5"):
        PastedDataset(inner, bank, {"max_angle": 90, "max_size": 1.5}, 0)
    with pytest.raises(FileNotFoundError, match="instance bank folder not found"):
        InstanceBank(tmp_path / "missing")
