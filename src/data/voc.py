"""Datasets in the PASCAL VOC 2012 layout (VOC itself, the synthetic set, pre-rendered COCO masks).

::

    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClass/<id>.png        palette PNGs: 0 background, 1..K classes, 255 ignore
    <root>/SegmentationClassAug/<id>.png     optional (SBD masks for train_aug), grey or palette
    <root>/ImageSets/Segmentation/<split>.txt  one id per line (psa/SEAM lines
                                               "/JPEGImages/x.jpg /SegmentationClassAug/x.png" also read)

Image-level labels come from a labels file (the common ``cls_labels.npy``: dict id -> K-dim multi-hot,
keys either int like 2007000032 or str like "2007_000032") or, without one, from the masks. That file is
a pickle (a 0-d object array); it is read by :func:`read_labels_file`, whose unpickler rebuilds numpy
arrays and nothing else, so a crafted file cannot run code. Every missing path or malformed file raises an
error that names it.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format
from PIL import Image

from src.utils.io import read_label
from src.utils.labels import IGNORE

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


# What numpy's pickles of arrays and scalars need (np.save of an object array pickles it with protocol 3):
# (module, name) -> the module that holds it under numpy 2 or numpy 1. Nothing else is ever imported.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "numpy.core.numeric"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "numpy.core.numeric"),
    ("numpy", "ndarray"): ("numpy",),
    ("numpy", "dtype"): ("numpy",),
    ("_codecs", "encode"): ("_codecs",),  # protocol 2/3 bytes: _codecs.encode(str, "latin1")
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays, dtypes and scalars, and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        homes = _NUMPY_GLOBALS.get((module, name))
        if homes is None:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a labels table does not need")
        for home in homes:
            try:
                return getattr(importlib.import_module(home), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"{module}.{name} is not available in this numpy")


def read_labels_file(path: str | Path) -> dict[Any, np.ndarray]:
    """The dict id -> label vector of an IRNet / psa / SEAM ``cls_labels.npy`` (a 0-d object array), read
    without running code: only numpy arrays are rebuilt, keys must be str or int, values numeric arrays.
    Errors name the file."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            version = npy_format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = npy_format.read_array_header_1_0(handle)
            else:
                shape, _, dtype = npy_format.read_array_header_2_0(handle)
            if dtype.hasobject:
                table = _ArrayUnpickler(handle).load()
            else:
                table = None
    except pickle.UnpicklingError as err:
        raise ValueError(f"labels file {path} was refused: {err} (the file is read as data only: a dict of "
                         "image ids to label arrays)") from err
    except Exception as err:
        raise ValueError(f"unreadable labels file {path}: {err}") from err
    if isinstance(table, np.ndarray) and table.dtype == object and table.shape == ():
        table = table.item()
    if not isinstance(table, dict):
        found = f"a {dtype} array of shape {shape}" if table is None else f"a {type(table).__name__}"
        raise ValueError(f"labels file {path} must hold a dict id -> multi-hot vector (a 0-d object array), "
                         f"found {found}")
    for key, value in table.items():
        if not isinstance(key, str | int | np.integer):
            raise ValueError(f"labels file {path}: key {key!r} is a {type(key).__name__}, expected str or int ids")
        if not isinstance(value, np.ndarray | np.number) or np.asarray(value).dtype.kind not in "biuf":
            raise ValueError(f"labels file {path}: entry {key!r} is a {type(value).__name__}, expected a numeric "
                             "array")
    return table


def decode_int_id(key: int) -> str:
    """irn's cls_labels.npy keys: 2007000032 -> "2007_000032"."""
    key = int(key)
    return f"{key // 1000000}_{key % 1000000:06d}"


class VOCLayout:
    """Reader for one dataset root in VOC layout; see the module docstring."""

    def __init__(
        self,
        root: str | Path,
        class_names: Sequence[str],
        image_dir: str = "JPEGImages",
        mask_dirs: Sequence[str] = ("SegmentationClass", "SegmentationClassAug"),
        list_dir: str = "ImageSets/Segmentation",
        labels_file: str | Path | None = None,
        image_ext: str = ".jpg",
        mask_ext: str = ".png",
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root not found: {self.root} (data.root)")
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.image_dir = self.root / image_dir
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir}")
        self.mask_dirs = [self.root / d for d in mask_dirs if (self.root / d).is_dir()]
        self.list_dir = self.root / list_dir
        self.labels_file = Path(labels_file).expanduser() if labels_file else None
        if self.labels_file is not None and not self.labels_file.is_file():
            raise FileNotFoundError(f"labels file not found: {self.labels_file} (data.labels_file)")
        self.image_ext, self.mask_ext = image_ext, mask_ext
        self._labels_from_file: dict[str, np.ndarray] | None = None
        self._ids: dict[str, tuple[str, ...]] = {}
        self._labels: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------------------ paths
    def list_path(self, split: str) -> Path:
        return self.list_dir / f"{split}.txt"

    def ids(self, split: str) -> tuple[str, ...]:
        """Image ids of a split, in list order (read once)."""
        if split not in self._ids:
            self._ids[split] = self._read_ids(split)
        return self._ids[split]

    def _read_ids(self, split: str) -> tuple[str, ...]:
        path = self.list_path(split)
        if not path.is_file():
            raise FileNotFoundError(f"split list not found: {path} (split '{split}')")
        ids = []
        for line in path.read_text(encoding="utf-8-sig").splitlines():
            token = line.strip().split()[0] if line.strip() else ""
            if not token:
                continue
            ids.append(Path(token).stem if "/" in token or "." in token else token)
        if not ids:
            raise ValueError(f"split list {path} is empty (split '{split}')")
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ValueError(f"split list {path} repeats ids, e.g. {dup}")
        return tuple(ids)

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / f"{image_id}{self.image_ext}"

    def mask_path(self, image_id: str) -> Path | None:
        """The first ground-truth mask found for ``image_id`` (SegmentationClass before Aug), or None."""
        for folder in self.mask_dirs:
            path = folder / f"{image_id}{self.mask_ext}"
            if path.is_file():
                return path
        return None

    def read_gt(self, image_id: str) -> np.ndarray:
        """The ground-truth label map of an image, checked against the image's size and the class count;
        errors name the files."""
        path = self.mask_path(image_id)
        if path is None:
            raise FileNotFoundError(f"no ground-truth mask for {image_id} in {[str(d) for d in self.mask_dirs]}")
        mask = read_label(path)
        image_path = self.image_path(image_id)
        try:
            with Image.open(image_path) as img:
                width, height = img.size
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {image_path}") from None
        except OSError as err:
            raise ValueError(f"corrupt or unreadable image file {image_path}: {err}") from err
        if mask.shape != (height, width):
            raise ValueError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                             f"{width}x{height}")
        self.labels_from_mask(mask, str(path))  # class ids in range
        return mask

    def has_masks(self, split: str) -> bool:
        return all(self.mask_path(i) is not None for i in self.ids(split))

    def check_files(self, split: str) -> None:
        """Fail early, naming the first missing image of a split."""
        for image_id in self.ids(split):
            if not self.image_path(image_id).is_file():
                raise FileNotFoundError(
                    f"image not found: {self.image_path(image_id)} (listed in {self.list_path(split)})"
                )

    # ----------------------------------------------------------------------------- labels
    def _load_labels_file(self) -> dict[str, np.ndarray]:
        if self._labels_from_file is None:
            assert self.labels_file is not None
            table = read_labels_file(self.labels_file)
            labels = {}
            for key, value in table.items():
                image_id = decode_int_id(key) if isinstance(key, int | np.integer) else str(key)
                vec = np.asarray(value, np.float32).reshape(-1)
                if vec.shape[0] != self.num_classes:
                    raise ValueError(
                        f"labels file {self.labels_file}: entry {image_id} has {vec.shape[0]} classes, "
                        f"data.class_names has {self.num_classes}"
                    )
                labels[image_id] = vec
            self._labels_from_file = labels
        return self._labels_from_file

    def labels_from_mask(self, mask: np.ndarray, where: str = "") -> np.ndarray:
        """K-dim multi-hot vector of the classes present in a label map (0 and 255 excluded)."""
        values = np.unique(mask)
        bad = values[(values > self.num_classes) & (values != IGNORE)]
        if bad.size:
            raise ValueError(
                f"mask {where} holds class ids {bad.tolist()} > {self.num_classes} (data.class_names) "
                "that are not 255 (ignore)"
            )
        vec = np.zeros(self.num_classes, np.float32)
        fg = values[(values > 0) & (values <= self.num_classes)]
        vec[fg.astype(int) - 1] = 1.0
        return vec

    def labels(self, split: str) -> np.ndarray:
        """(N, K) float32 image-level labels of a split, in list order (read-only, computed once)."""
        if split not in self._labels:
            labels = self._read_labels(split)
            labels.flags.writeable = False
            self._labels[split] = labels
        return self._labels[split]

    def _read_labels(self, split: str) -> np.ndarray:
        ids = self.ids(split)
        if self.labels_file is not None:
            table = self._load_labels_file()
            missing = [i for i in ids if i not in table]
            if missing:
                raise ValueError(
                    f"labels file {self.labels_file} has no entry for {len(missing)} ids of split '{split}', "
                    f"e.g. {missing[:3]}"
                )
            return np.stack([table[i] for i in ids])
        rows = []
        for image_id in ids:
            path = self.mask_path(image_id)
            if path is None:
                raise FileNotFoundError(
                    f"no mask for {image_id} in {[str(d) for d in self.mask_dirs] or self.root}: image-level "
                    "labels come from masks unless data.labels_file is set"
                )
            rows.append(self.labels_from_mask(read_label(path), str(path)))
        return np.stack(rows)

    def check_labels_against_masks(self, split: str) -> int:
        """With a labels file, check that each image's labels equal the classes in its ground-truth mask
        (images without a mask are skipped); raises naming the file and the first mismatching ids.
        Returns the number of images checked."""
        if self.labels_file is None:
            return 0
        labels = self.labels(split)
        bad, checked = [], 0
        for image_id, row in zip(self.ids(split), labels):
            path = self.mask_path(image_id)
            if path is None:
                continue
            checked += 1
            from_mask = self.labels_from_mask(read_label(path), str(path))
            if not np.array_equal(from_mask, row):
                names = lambda v: [self.class_names[i] for i in np.flatnonzero(v)]  # noqa: E731
                bad.append(f"{image_id}: file {names(row)}, mask {names(from_mask)}")
        if bad:
            raise ValueError(
                f"labels file {self.labels_file} disagrees with the masks of split '{split}' for {len(bad)} of "
                f"{checked} images, e.g. " + "; ".join(bad[:3]) + " (set data.check_labels=false to skip this check)"
            )
        return checked
