"""CDA's context decoupling augmentation (Su et al., ICCV 2021; ../shared/specs/debias.md): object
instances cut from the previous round's pseudo-masks are pasted into training images that do not hold
their class, so a class is also seen away from the context it usually comes with.

* The instance bank (:func:`select_instance`, :func:`crop_instance`; written by
  src/stages/instance_bank.py, read by :class:`InstanceBank`): train images whose pseudo-mask holds exactly
  one foreground class covering ``[min_fraction, max_fraction]`` of the image, cropped (pixels + binary
  mask) to the mask's bounding box, stored per class as ``<folder>/<class id>/<image id>.npz``.
* Pasting (:func:`paste_random_instance`): a class the image does not hold, a random instance of it,
  rotated by a random integer angle in [-max_angle, max_angle] (:func:`rotate_instance`), shrunk with its
  aspect kept to fit within ``max_size`` of the image's height and width (:func:`fit_instance`), its
  masked pixels pasted at a random place (:func:`paste`); the label gains the pasted class.
* :class:`PastedDataset`: 2N items, i < N the original image i, i >= N a pasted version of image i - N
  with its own augmentation draw, so batches hold half originals and half pasted versions in expectation
  (CDA's own loader pairs each image with its pasted version in one batch; same batch size and steps).

Randomness comes from (seed, epoch, index) only, as in src/data/datasets.py: 1 and N processes and a
resumed run paste the same instances at the same places.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from src.data.transforms import sample_seed, seed_transform
from src.utils.io import load_npz
from src.utils.logging import get_logger

log = get_logger(__name__)

PASTE_STREAM = 0xCDA  # separates the paste draws from the augmentation draws of the same (seed, epoch, index)
PASTE_OPTIONS = ("max_angle", "max_size")


# ------------------------------------------------------------------------------------ the instance bank
def select_instance(mask: np.ndarray, num_classes: int, min_fraction: float, max_fraction: float) -> int | None:
    """The class id of a pseudo-mask that holds exactly one foreground class (1..num_classes) covering
    between ``min_fraction`` and ``max_fraction`` of the image (both inclusive), else None. Background (0)
    and ignored pixels (255) count in the image's area, not as a class."""
    present = [int(c) for c in np.unique(mask) if 0 < c <= num_classes]
    if len(present) != 1:
        return None
    k = present[0]
    fraction = float((mask == k).sum()) / mask.size
    return k if min_fraction <= fraction <= max_fraction else None


def crop_instance(image: np.ndarray, mask: np.ndarray, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixels, binary mask) of ``class_id`` cropped to the bounding box of its mask."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} but its mask {mask.shape[1]}x{mask.shape[0]}")
    binary = mask == class_id
    rows, cols = np.flatnonzero(binary.any(1)), np.flatnonzero(binary.any(0))
    if rows.size == 0:
        raise ValueError(f"class {class_id} is not in the mask")
    box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    return np.ascontiguousarray(image[box]), np.ascontiguousarray(binary[box])


class InstanceBank:
    """The stored instances of an instance-bank folder: ``<folder>/<class id>/<image id>.npz`` (image, mask)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"instance bank folder not found: {self.folder}")
        self.files: dict[int, list[Path]] = {}
        for sub in sorted(p for p in self.folder.iterdir() if p.is_dir() and p.name.isdigit()):
            files = sorted(sub.glob("*.npz"))
            if files:
                self.files[int(sub.name)] = files

    @property
    def classes(self) -> list[int]:
        return sorted(self.files)

    def counts(self) -> dict[int, int]:
        return {k: len(v) for k, v in sorted(self.files.items())}

    def load(self, class_id: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Instance ``i`` of ``class_id``: (uint8 pixels (h, w, 3), bool mask (h, w))."""
        path = self.files[class_id][i]
        data = load_npz(path)
        if "image" not in data or "mask" not in data or data["image"].shape[:2] != data["mask"].shape:
            raise ValueError(f"instance file {path} needs an image (h, w, 3) and a mask (h, w)")
        return data["image"], data["mask"].astype(bool)


# ---------------------------------------------------------------------------------------------- pasting
def rotate_instance(image: np.ndarray, mask: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate by ``angle`` degrees counter-clockwise about the centre on a canvas large enough for the whole
    instance, then crop to the rotated mask's bounding box (pixels bilinear, mask nearest)."""
    h, w = mask.shape
    rad = math.radians(angle)
    cos, sin = abs(math.cos(rad)), abs(math.sin(rad))
    nw, nh = int(math.ceil(w * cos + h * sin - 1e-6)), int(math.ceil(w * sin + h * cos - 1e-6))
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
    m[0, 2] += (nw - 1) / 2 - (w - 1) / 2
    m[1, 2] += (nh - 1) / 2 - (h - 1) / 2
    rotated_image = cv2.warpAffine(image, m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=0)
    rotated = cv2.warpAffine(mask.astype(np.uint8), m, (nw, nh), flags=cv2.INTER_NEAREST, borderValue=0) > 0
    if not rotated.any():  # a sliver lost by the nearest-neighbour rotation: keep it unrotated
        return image, mask
    return crop_instance(rotated_image, rotated.astype(np.uint8), 1)


def fit_instance(image: np.ndarray, mask: np.ndarray, target_hw: tuple[int, int], max_size: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Shrink (never enlarge), aspect kept, so the instance fits within ``max_size`` of the target's height
    and width (pixels area-averaged, mask nearest)."""
    h, w = mask.shape
    scale = min(1.0, max_size * target_hw[0] / h, max_size * target_hw[1] / w)
    if scale >= 1.0:
        return image, mask
    nh, nw = max(1, int(math.floor(h * scale + 1e-9))), max(1, int(math.floor(w * scale + 1e-9)))
    small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    small_mask = cv2.resize(mask.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST) > 0
    return small, small_mask


def paste(target: np.ndarray, image: np.ndarray, mask: np.ndarray, top: int, left: int) -> np.ndarray:
    """A copy of ``target`` with ``image``'s pixels where ``mask`` is set, its top-left corner at (top, left)."""
    h, w = mask.shape
    if top < 0 or left < 0 or top + h > target.shape[0] or left + w > target.shape[1]:
        raise ValueError(f"a {w}x{h} instance at ({top}, {left}) does not fit a "
                         f"{target.shape[1]}x{target.shape[0]} image")
    out = target.copy()
    region = out[top:top + h, left:left + w]
    region[mask] = image[mask]
    return out


def paste_random_instance(image: np.ndarray, label: np.ndarray, bank: InstanceBank, options: Mapping[str, Any],
                          rng: np.random.Generator) -> tuple[np.ndarray, int, np.ndarray | None]:
    """(pasted image, pasted class id or 0, the pasted pixels' mask in image coordinates or None) for an image
    with multi-hot ``label`` (classes 1..K at positions 0..K-1). 0 / None: no stored class is absent from it."""
    candidates = [k for k in bank.classes if label[k - 1] == 0]
    if not candidates:
        return image, 0, None
    k = candidates[int(rng.integers(len(candidates)))]
    inst, inst_mask = bank.load(k, int(rng.integers(len(bank.files[k]))))
    max_angle = int(options["max_angle"])
    angle = int(rng.integers(-max_angle, max_angle + 1))
    inst, inst_mask = rotate_instance(inst, inst_mask, angle)
    inst, inst_mask = fit_instance(inst, inst_mask, image.shape[:2], float(options["max_size"]))
    h, w = inst_mask.shape
    top = int(rng.integers(0, image.shape[0] - h + 1))
    left = int(rng.integers(0, image.shape[1] - w + 1))
    placed = np.zeros(image.shape[:2], dtype=bool)
    placed[top:top + h, left:left + w] = inst_mask
    return paste(image, inst, inst_mask, top, left), k, placed


def check_paste_options(options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The paste options of an instance bank's manifest, checked (the error names where they come from)."""
    missing = [k for k in PASTE_OPTIONS if k not in options]
    if missing:
        raise ValueError(f"{where}: paste options {missing} missing (has {sorted(options)})")
    if not 0 <= int(options["max_angle"]) <= 180:
        raise ValueError(f"{where}: paste.max_angle must be in [0, 180], got {options['max_angle']}")
    if not 0 < float(options["max_size"]) <= 1:
        raise ValueError(f"{where}: paste.max_size must be in (0, 1], got {options['max_size']}")
    return {k: options[k] for k in PASTE_OPTIONS}


# ---------------------------------------------------------------------------------------------- dataset
class PastedDataset(Dataset):
    """A training dataset doubled by CDA's pasting (module docstring): item i < N is ``inner``'s image i,
    item i >= N a pasted version of image i - N (label + the pasted class; ``pasted_class`` = its id, 0 for
    originals). ``inner`` (a WSSSDataset) is read without its transform, which runs here after pasting,
    seeded by (seed, epoch, item), so item i < N equals ``inner``'s own item i.

    The inner dataset's raw image comes back as float CHW of the uint8 values (no transform), and is turned
    back into uint8 HWC exactly; extras (CONTA's context masks) are the image's own."""

    def __init__(self, inner: Any, bank: InstanceBank, options: Mapping[str, Any], seed: int) -> None:
        self.transform: A.Compose | None = inner.transform
        self.inner = copy.copy(inner)
        self.inner.transform = None
        if getattr(inner, "target", None) is not None:
            raise ValueError("CDA pastes into classification images only (the dataset has a pixel target)")
        self.bank, self.options, self.seed = bank, check_paste_options(options, str(bank.folder)), seed
        if not bank.classes:
            raise ValueError(f"the instance bank {bank.folder} is empty: nothing to paste")
        labels = np.asarray(inner.labels)
        stuck = int(sum(1 for row in labels if all(row[k - 1] > 0 for k in bank.classes)))
        if stuck:
            log.warning(f"CDA: {stuck} of {len(labels)} training images hold every class of the instance bank "
                        f"({bank.counts()}); their 'pasted' versions are the original images")

    def __len__(self) -> int:
        return 2 * len(self.inner)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        n = len(self.inner)
        if not 0 <= index < 2 * n:
            raise IndexError(f"item {index} of a pasted dataset of {2 * n}")
        sample = self.inner[(epoch, index % n)]
        image = sample["image"].numpy().transpose(1, 2, 0).astype(np.uint8)
        label = sample["label"].clone()
        pasted = 0
        if index >= n:
            rng = np.random.default_rng(np.random.SeedSequence([int(self.seed), int(epoch), int(index), PASTE_STREAM]))
            image, pasted, _ = paste_random_instance(image, label.numpy(), self.bank, self.options, rng)
            if pasted:
                label[pasted - 1] = 1.0
        if self.transform is not None:
            seed_transform(self.transform, sample_seed(self.seed, epoch, index))
            image = self.transform(image=image)["image"]
        sample["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))
        sample["label"] = label
        sample["pasted_class"] = pasted
        return sample
