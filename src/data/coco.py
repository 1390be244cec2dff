"""MS-COCO 2014 as a dataset in the VOC layout: instance annotations rendered once to semantic masks.

Why: every stage reads data through :class:`src.data.voc.VOCLayout`. COCO ships instance polygons and
RLEs, not label maps, so :func:`prepare_coco` renders one label PNG per image into an output folder
(the images stay where they are) and writes the split list, the image-level labels and a manifest::

    <root>/<split>/<file_name>                      the images, e.g. val2014/COCO_val2014_000000000042.jpg
    <root>/annotations/instances_<split>.json       the default annotation file
    <out_dir>/SegmentationClass/<file stem>.png     palette PNG: 0 background, 1..80 classes, 255 crowd
    <out_dir>/ImageSets/Segmentation/<split>.txt    file stems, in image-id order
    <out_dir>/cls_labels_<split>.npz                ids (N,) str, labels (N, 80) float32 multi-hot, no
                                                    background (plain arrays, read without pickle)
    <out_dir>/coco_<split>.json                     manifest: fingerprint, options, summary

Decisions (all documented in the summary a call returns):

* Class ids: the JSON's categories sorted by id (1..90 with gaps in COCO) become 1..C in that order;
  the class names are the categories' names in that order.
* Drawing order: crowd regions first (as 255, ignore), then the other instances from the largest to
  the smallest (by rendered pixel count, ties by annotation id), each over the previous ones. So a
  small object lying on a large one stays visible, and an instance annotated inside a crowd region
  keeps its class there (it is a confident label, the crowd region is not).
* Image-level labels come from the annotations, not the masks: every category with at least one
  annotation on the image, crowd annotations included (the objects are visible, so a person naming the
  classes in the image would name them). A class can therefore be labelled and still have no pixel
  of its id in the mask (crowd only, or covered by smaller objects).
* Images without annotations are kept as background-only images unless ``drop_unannotated`` (the lists
  common in the WSSS literature, 82,081 train / 40,137 val images, leave them out).
* Masks need only the sizes in the JSON, not the images. A missing image file is reported (count and
  examples, a logged warning) and the image stays listed, so reading that sample fails later naming the
  file; ``check_files`` fails at preparation instead (it also checks the JPEG end marker and the size
  in the file header), ``drop_bad_images`` leaves such images out. COCO train2014 holds one truncated
  JPEG (COCO_train2014_000000167126.jpg, see karpathy/neuraltalk2#4): :func:`src.utils.io.read_image`
  refuses it, so replace the file or prepare train2014 with ``drop_bad_images``.
* Dangling references (annotations whose ``image_id`` is not in ``images``) are skipped and reported.
  An annotation of an unknown category is an error.

Caching: a mask PNG is written atomically and only when absent, so a killed preparation resumes where
it stopped. The manifest holds the annotation file's sha256; a changed file (or ``overwrite``) deletes
this split's masks and renders them again. A later call with the same file and options opens the
prepared split from the manifest without parsing the JSON (``check_files`` always parses and checks
again; ``drop_bad_images`` keeps the images found bad at preparation out). Concurrent calls for one
split (the ranks of a multi-process job) serialise on a file lock and the later ones reuse the first
one's work (``filelock``). Folders prepared with the earlier pickled ``cls_labels_<split>.npy`` lack
the ``.npz``: the next preparation writes it (reusing the masks) and removes the old file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout
from PIL import Image

from src.data.voc import VOCLayout
from src.utils.io import (
    check_jpeg_complete,
    save_label_png_atomic,
    save_npz_atomic,
    write_bytes_atomic,
    write_json_atomic,
)
from src.utils.labels import IGNORE
from src.utils.logging import get_logger

log = get_logger(__name__)

RENDER_VERSION = 1  # bump when the rendering rules change: prepared masks are then rendered again
MANIFEST_FORMAT = "coco-semantic-v1"
MASK_DIR = "SegmentationClass"
LIST_DIR = "ImageSets/Segmentation"
EXAMPLES = 5  # example ids kept per reported problem

# One mask-rendering job: (png path, height, width, [(class id, iscrowd, segmentation, annotation id)], where)
RenderTask = tuple[str, int, int, list[tuple[int, bool, Any, int]], str]


# ------------------------------------------------------------------------------------------ paths
def manifest_path(out_dir: Path, split: str) -> Path:
    return Path(out_dir) / f"coco_{split}.json"


def labels_path(out_dir: Path, split: str) -> Path:
    return Path(out_dir) / f"cls_labels_{split}.npz"


def _legacy_labels_path(out_dir: Path, split: str) -> Path:
    """The pickled dict of the first format (``np.save`` of an object array), replaced by the .npz."""
    return Path(out_dir) / f"cls_labels_{split}.npy"


def default_annotation_file(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


# ------------------------------------------------------------------------------------------ layout
class CocoLayout(VOCLayout):
    """A :class:`VOCLayout` over splits prepared by :func:`prepare_coco` in ``out_dir``.

    Differences from VOC: each split's images stay in their own folder (``<root>/<split>``), so the
    image path is looked up per id; image-level labels come from the per-split labels files. The
    summaries of the splits' preparations are in ``summaries`` (``summary`` for a single split).
    """

    def __init__(self, out_dir: str | Path, splits: Sequence[str]) -> None:
        out_dir = Path(out_dir).expanduser().absolute()
        if isinstance(splits, str):
            splits = [splits]
        if not splits:
            raise ValueError("CocoLayout needs at least one split")
        manifests = {split: read_manifest(out_dir, split) for split in splits}
        for split, manifest in manifests.items():
            if not manifest.get("complete"):
                raise ValueError(
                    f"COCO split '{split}' in {out_dir} was not prepared to the end "
                    f"({manifest_path(out_dir, split)}): run prepare_coco again"
                )
        names = [tuple(m["class_names"]) for m in manifests.values()]
        if len(set(names)) != 1:
            raise ValueError(f"the COCO splits {list(splits)} in {out_dir} have different categories")
        folders = {split: Path(m["image_dir"]) for split, m in manifests.items()}
        roots = {Path(m["root"]) for m in manifests.values()}
        # VOCLayout checks that image_dir exists; image paths are looked up per id (image_path)
        image_dir = folders[splits[0]] if len(splits) == 1 or len(roots) > 1 else roots.pop()
        super().__init__(
            out_dir, names[0], image_dir=str(image_dir), mask_dirs=(MASK_DIR,), list_dir=LIST_DIR
        )
        self.splits = tuple(splits)
        self.summaries = {split: m["summary"] for split, m in manifests.items()}
        self.label_files = {split: labels_path(out_dir, split) for split in splits}
        self.labels_file = self.label_files[splits[0]]
        for split, path in self.label_files.items():
            if not path.is_file():
                raise FileNotFoundError(
                    f"labels file of COCO split '{split}' not found: {path} (a folder prepared by an "
                    "older version holds a cls_labels_<split>.npy instead: run prepare_coco again)"
                )
        self._image_of: dict[str, tuple[Path, str]] = {}
        for split, manifest in manifests.items():
            place = (folders[split], manifest["image_ext"])
            for image_id in self.ids(split):
                self._image_of[image_id] = place

    @property
    def summary(self) -> dict[str, Any]:
        """The preparation summary of the first (usually the only) split."""
        return self.summaries[self.splits[0]]

    def image_path(self, image_id: str) -> Path:
        try:
            folder, ext = self._image_of[image_id]
        except KeyError:
            raise KeyError(
                f"image id {image_id!r} is in none of the prepared COCO splits {list(self.splits)} "
                f"in {self.root}"
            ) from None
        return folder / f"{image_id}{ext}"

    def _load_labels_file(self) -> dict[str, np.ndarray]:
        """id -> float32 (C,) multi-hot over all splits, from their .npz files (no pickle)."""
        if self._labels_from_file is None:
            merged: dict[str, np.ndarray] = {}
            for path in self.label_files.values():
                ids, table = _read_labels_npz(path)
                if table.shape[1] != self.num_classes:
                    raise ValueError(
                        f"labels file {path} has {table.shape[1]} classes, the manifest names "
                        f"{self.num_classes} categories"
                    )
                merged.update(zip(ids, table))
            self._labels_from_file = merged
        return self._labels_from_file


def _read_labels_npz(path: Path) -> tuple[list[str], np.ndarray]:
    """The ids and the (N, C) float32 labels of a ``cls_labels_<split>.npz``; errors name the file.

    Read with ``allow_pickle=False``: a file that holds Python objects is refused, not unpickled.
    """
    path = Path(path)

    def unreadable(err: Exception) -> ValueError:
        if isinstance(err, ValueError) and "pickle" in str(err).lower():
            # numpy refuses object arrays in an .npz / .npy, and takes any other file for a pickle
            with open(path, "rb") as handle:
                magic = handle.read(6)
            if magic.startswith((b"PK", b"\x93NUMPY", b"\x80")):  # zip, .npy, a pickle's PROTO opcode
                return ValueError(
                    f"labels file {path} holds pickled Python objects and is refused (read with "
                    "allow_pickle=False); prepare_coco writes it again as plain arrays"
                )
            return ValueError(f"unreadable labels file {path}: not an .npz file")
        return ValueError(f"unreadable labels file {path}: {type(err).__name__}: {err}")

    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"labels file not found: {path}") from None
    except Exception as err:  # a pickled .npy (ValueError), zipfile.BadZipFile, EOFError, OSError...
        raise unreadable(err) from err
    if not isinstance(data, np.lib.npyio.NpzFile) or not {"ids", "labels"} <= set(data.files):
        raise ValueError(f"labels file {path} is not an .npz holding the arrays 'ids' and 'labels'")
    with data:
        try:
            ids, table = data["ids"], data["labels"]
        except Exception as err:
            raise unreadable(err) from err
    if ids.dtype.kind != "U" or ids.ndim != 1:
        raise ValueError(f"labels file {path}: 'ids' must be a 1-d array of strings, not {ids.dtype} {ids.shape}")
    if table.ndim != 2 or table.shape[0] != ids.shape[0] or table.dtype.kind not in "biuf":
        raise ValueError(
            f"labels file {path}: 'labels' must be a numeric (N, C) array with N = {ids.shape[0]} ids, "
            f"not {table.dtype} {table.shape}"
        )
    names = ids.tolist()
    if len(set(names)) != len(names):
        repeated = sorted(i for i, n in Counter(names).items() if n > 1)
        raise ValueError(f"labels file {path} repeats ids, e.g. {repeated[:3]}")
    return names, table.astype(np.float32)


def _write_labels_npz(path: Path, ids: Sequence[str], table: np.ndarray) -> None:
    """Store ids and (N, C) labels as plain arrays, atomically; an equal file is left untouched (its
    mtime too, so readers and caches see no change)."""
    table = np.asarray(table, np.float32)
    with contextlib.suppress(FileNotFoundError, ValueError):
        old_ids, old_table = _read_labels_npz(path)
        if old_ids == list(ids) and np.array_equal(old_table, table):
            return
    save_npz_atomic(path, ids=np.asarray(list(ids), dtype=np.str_), labels=table)


def read_manifest(out_dir: Path, split: str) -> dict[str, Any]:
    path = manifest_path(out_dir, split)
    if not path.is_file():
        raise FileNotFoundError(
            f"COCO split '{split}' is not prepared: no manifest {path} (run prepare_coco)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"unreadable COCO manifest {path}: {err}") from err
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a COCO manifest of format {MANIFEST_FORMAT}")
    return manifest


def open_coco(out_dir: str | Path, splits: Sequence[str]) -> CocoLayout:
    """Reader over splits already prepared in ``out_dir`` (no JSON parsing, no checks of the images)."""
    return CocoLayout(out_dir, splits)


# ----------------------------------------------------------------------------------- rendering
def _checked_segmentation(segm: Any, height: int, width: int, where: str) -> Any | None:
    """The segmentation as pycocotools takes it, or None when nothing is left to draw.

    Checks what pycocotools does not: polygons must be lists of an even number of coordinates and
    those with fewer than 3 points are skipped (pycocotools would read a 4-number polygon as a box);
    an RLE must have the image's size (pycocotools would decode it at its own size) and uncompressed
    counts must cover the image.
    """
    if isinstance(segm, list):
        for poly in segm:
            if not isinstance(poly, list) or len(poly) % 2:
                raise ValueError(f"{where}: a polygon must be a list of an even number of coordinates")
        return [poly for poly in segm if len(poly) >= 6] or None
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if [int(v) for v in segm["size"]] != [height, width]:
            raise ValueError(f"{where}: RLE size {segm['size']} differs from the image's [{height}, {width}]")
        if isinstance(segm["counts"], list) and sum(segm["counts"]) != height * width:
            raise ValueError(f"{where}: RLE counts sum to {sum(segm['counts'])}, not {height} x {width}")
        return segm
    raise ValueError(f"{where}: unknown segmentation format {type(segm).__name__}")


def segmentation_mask(segm: Any, height: int, width: int, where: str) -> np.ndarray:
    """(H, W) uint8 0/1 mask of one COCO segmentation: polygons, uncompressed or compressed RLE.

    Decoded by ``pycocotools.mask`` following ``COCO.annToRLE`` (polygon parts merged, uncompressed
    RLE encoded, compressed RLE as is), after the checks of :func:`_checked_segmentation`.
    """
    from pycocotools import mask as mask_utils

    segm = _checked_segmentation(segm, height, width, where)
    if segm is None:
        return np.zeros((height, width), np.uint8)
    try:
        if isinstance(segm, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
        elif isinstance(segm["counts"], list):
            rle = mask_utils.frPyObjects(segm, height, width)
        else:
            rle = segm  # compressed: counts as str (the JSON's) or bytes
        with warnings.catch_warnings():  # pycocotools' decode under numpy 2: a harmless copy=False notice
            warnings.simplefilter("ignore", DeprecationWarning)
            return np.asarray(mask_utils.decode(rle), dtype=np.uint8)
    except Exception as err:  # pycocotools raises bare TypeError / ValueError / Exception on bad values
        raise ValueError(f"{where}: pycocotools cannot decode the segmentation: {type(err).__name__}: {err}") from err


def render_semantic_mask(
    height: int, width: int, objects: Sequence[tuple[int, bool, Any, int]], where: str = ""
) -> np.ndarray:
    """Label map of one image from its (class id, iscrowd, segmentation, annotation id) objects.

    Crowd regions first as 255, then instances from the largest to the smallest (see the module
    docstring for why).
    """
    label = np.zeros((height, width), np.uint8)
    drawn = []
    for class_id, iscrowd, segm, ann_id in objects:
        mask = segmentation_mask(segm, height, width, f"{where} annotation {ann_id}").astype(bool)
        drawn.append((bool(iscrowd), -int(mask.sum()), int(ann_id), class_id, mask))
    drawn.sort(key=lambda d: (not d[0], d[1], d[2]))  # crowd first, then by area descending, then id
    for iscrowd, _, _, class_id, mask in drawn:
        label[mask] = IGNORE if iscrowd else class_id
    return label


def _render_task(task: RenderTask) -> None:
    path, height, width, objects, where = task
    save_label_png_atomic(Path(path), render_semantic_mask(height, width, objects, where))


# ----------------------------------------------------------------------------------- helpers
def _file_digest(path: Path) -> dict[str, Any]:
    stat = path.stat()
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            sha.update(block)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha.hexdigest()}


def _same_file(path: Path, recorded: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The file's digest if it matches ``recorded``; size and mtime equal skip the hashing."""
    if not recorded:
        return None
    stat = path.stat()
    if stat.st_size == recorded.get("size") and stat.st_mtime_ns == recorded.get("mtime_ns"):
        return dict(recorded)
    digest = _file_digest(path)
    return digest if digest["sha256"] == recorded.get("sha256") else None


def _write_if_changed(path: Path, data: bytes) -> None:
    """Leave an identical file untouched (its mtime too), so readers and caches see no change."""
    if path.is_file() and path.read_bytes() == data:
        return
    write_bytes_atomic(path, data)


def _acquire(lock: FileLock) -> Any:
    """Acquire the split's lock, saying so when another process holds it; use as ``with _acquire(lock):``."""
    try:
        return lock.acquire(timeout=0)
    except Timeout:
        log.info(f"waiting for another process that prepares the same COCO split ({lock.lock_file})")
        return lock.acquire()


def _image_problem(path: Path, height: int, width: int) -> str | None:
    """Why an image file is unusable (truncated JPEG, unreadable, size differs from the JSON), or None."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if path.suffix.lower() in (".jpg", ".jpeg"):
                handle.seek(max(0, handle.tell() - 2))
                if handle.read(2) != b"\xff\xd9":
                    try:
                        check_jpeg_complete(path)
                    except ValueError as err:
                        return str(err)
        with Image.open(path) as img:
            size = img.size
    except (OSError, SyntaxError) as err:
        return f"unreadable image file: {err}"
    if size != (width, height):
        return f"image is {size[0]}x{size[1]} but the annotation file says {width}x{height}"
    return None


def _check_ids(coco: Any, annotation_file: Path) -> None:
    """The ids must be JSON integers (the COCO format's): pycocotools keys its index by the raw values,
    so an image id 5 and an annotation's image_id "5" would not meet."""
    fields = {
        "images": ("image entry", ("id",)),
        "categories": ("category entry", ("id",)),
        "annotations": ("annotation", ("id", "image_id", "category_id")),
    }
    for key, (what, names) in fields.items():
        for index, entry in enumerate(coco.dataset[key]):
            for name in names:
                value = entry[name]  # present: pycocotools' index read it
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError(
                        f"COCO annotation file {annotation_file}: {what} #{index} lacks a valid integer "
                        f"'{name}' (found {value!r})"
                    )


def _load_coco(annotation_file: Path) -> Any:
    try:
        from pycocotools.coco import COCO
    except ImportError as err:
        raise ImportError(
            "COCO support needs pycocotools: install the 'coco' extra (pip install -e .[coco])"
        ) from err
    start = time.time()
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):  # pycocotools prints its progress
            coco = COCO(str(annotation_file))
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError, KeyError, TypeError) as err:
        # AssertionError: not a JSON object; KeyError / TypeError: an entry lacks a field pycocotools indexes
        raise ValueError(
            f"unreadable COCO annotation file {annotation_file}: {type(err).__name__}: {err}"
        ) from err
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.dataset.get(key), list):
            raise ValueError(f"COCO annotation file {annotation_file} has no '{key}' list")
    log.info(f"read {annotation_file} in {time.time() - start:.1f}s")
    return coco


# ----------------------------------------------------------------------------------- preparation
def prepare_coco(
    root: str | Path,
    split: str,
    annotation_file: str | Path | None = None,
    *,
    out_dir: str | Path,
    check_files: bool = False,
    drop_bad_images: bool = False,
    drop_unannotated: bool = False,
    overwrite: bool = False,
    num_workers: int = 0,
    class_names: Sequence[str] | None = None,
) -> CocoLayout:
    """Render the semantic masks of one COCO split into ``out_dir`` (once) and return its reader.

    ``root``: the COCO folder, images in ``<root>/<split>/``. ``annotation_file``: the instances JSON
    (default ``<root>/annotations/instances_<split>.json``). ``check_files``: fail now, naming the file,
    if a listed image is missing, truncated or not of the JSON's size. ``drop_bad_images``: leave such
    images out instead. ``drop_unannotated``: leave out images without annotations. ``overwrite``:
    render every mask again. ``num_workers``: processes that render masks (0: this one).
    ``class_names``: if given, must equal the annotation file's category names (``data.class_names``).
    The returned layout's ``summary`` reports counts and dangling references (module docstring).
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"COCO root not found: {root} (data.root)")
    annotation_file = Path(annotation_file).expanduser().absolute() if annotation_file else None
    annotation_file = annotation_file or default_annotation_file(root, split)
    if not annotation_file.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {annotation_file} (split '{split}')")
    image_dir = root / split
    if not image_dir.is_dir():
        raise FileNotFoundError(f"COCO image folder not found: {image_dir} (split '{split}' under data.root)")
    out_dir = Path(out_dir).expanduser().absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    options = {"drop_bad_images": drop_bad_images, "drop_unannotated": drop_unannotated}

    with _acquire(FileLock(out_dir / f".coco_{split}.lock")):
        old = _old_manifest(out_dir, split)
        digest = _same_file(annotation_file, old.get("annotation")) if old else None
        same_masks = not overwrite and digest is not None and old.get("render_version") == RENDER_VERSION
        reuse = (
            same_masks and not check_files and old.get("complete") and old.get("options") == options
            and old.get("image_dir") == str(image_dir) and _outputs_present(out_dir, split)
        )
        if reuse:
            layout = CocoLayout(out_dir, [split])
            _check_names(layout.class_names, class_names, annotation_file)
            summary = layout.summary
            summary.update(masks_rendered=0, masks_reused=summary["num_images"], parsed_annotation_file=False)
            log.info(f"COCO {split}: prepared before in {out_dir} ({summary['num_images']} images), reused")
            return layout
        return _prepare(root, split, annotation_file, image_dir, out_dir, old, same_masks, options,
                        check_files, num_workers, class_names)


def _old_manifest(out_dir: Path, split: str) -> dict[str, Any]:
    try:
        return read_manifest(out_dir, split)
    except FileNotFoundError:
        return {}
    except ValueError as err:
        log.warning(f"{err}: preparing the split again")
        return {}


def _outputs_present(out_dir: Path, split: str) -> bool:
    """The list, a readable labels file of the same ids (else it is written again) and every mask."""
    list_file = out_dir / LIST_DIR / f"{split}.txt"
    if not (list_file.is_file() and labels_path(out_dir, split).is_file()):
        return False
    ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    try:
        labelled, _ = _read_labels_npz(labels_path(out_dir, split))
    except ValueError as err:
        log.warning(f"{err} (preparing the split again)")
        return False
    if labelled != ids:
        return False
    masks = {e.name for e in os.scandir(out_dir / MASK_DIR)} if (out_dir / MASK_DIR).is_dir() else set()
    return all(f"{i}.png" in masks for i in ids)


def _check_names(found: Sequence[str], expected: Sequence[str] | None, annotation_file: Path) -> None:
    if expected and tuple(expected) != tuple(found):
        raise ValueError(
            f"data.class_names ({len(expected)} names) differ from the categories of {annotation_file} "
            f"({len(found)}: {list(found)[:5]}...); leave data.class_names empty to take them from the file"
        )


def _examples(items: Sequence[Any]) -> list[Any]:
    return list(items[:EXAMPLES])


def _prepare(
    root: Path,
    split: str,
    annotation_file: Path,
    image_dir: Path,
    out_dir: Path,
    old: Mapping[str, Any],
    same_masks: bool,
    options: dict[str, bool],
    check_files: bool,
    num_workers: int,
    class_names: Sequence[str] | None,
) -> CocoLayout:
    start = time.time()
    coco = _load_coco(annotation_file)
    annotation = _file_digest(annotation_file)

    # categories -> contiguous class ids 1..C in category-id order (pycocotools' coco.cats)
    _check_ids(coco, annotation_file)
    if len(coco.cats) != len(coco.dataset["categories"]):
        raise ValueError(f"COCO annotation file {annotation_file} repeats category ids")
    category_ids = sorted(coco.cats)
    if not 0 < len(category_ids) < IGNORE:
        raise ValueError(
            f"COCO annotation file {annotation_file} has {len(category_ids)} categories; need 1..254"
        )
    class_of = {cat_id: i + 1 for i, cat_id in enumerate(category_ids)}
    names = [str(coco.cats[cat_id]["name"]) for cat_id in category_ids]
    _check_names(names, class_names, annotation_file)

    # images (coco.imgs): one id each, sorted by COCO image id; the file stem is the dataset id
    if len(coco.imgs) != len(coco.dataset["images"]):
        repeated = sorted(i for i, n in Counter(im["id"] for im in coco.dataset["images"]).items() if n > 1)
        raise ValueError(
            f"COCO annotation file {annotation_file} repeats image ids, e.g. {repeated[:EXAMPLES]}"
        )
    image_ids = sorted(coco.imgs)
    stem_of: dict[int, str] = {}
    sizes: dict[str, tuple[int, int]] = {}
    exts = set()
    for image_id in image_ids:
        im = coco.imgs[image_id]
        try:
            name, height, width = Path(str(im["file_name"])).name, int(im["height"]), int(im["width"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"COCO annotation file {annotation_file}: image entry {image_id} lacks {err}"
            ) from err
        stem = Path(name).stem
        if stem in sizes:
            raise ValueError(f"COCO annotation file {annotation_file} lists the file {name} twice")
        stem_of[image_id] = stem
        sizes[stem] = (height, width)
        exts.add(Path(name).suffix)
    if len(exts) > 1:
        raise ValueError(f"images in {annotation_file} have mixed file extensions {sorted(exts)}")
    ext = exts.pop() if exts else ".jpg"

    # unknown categories refused, dangling references counted: checked on the file's list (in its
    # order), since the index files an annotation under any image id, listed or not
    anns = coco.dataset["annotations"]
    unknown = [(a["id"], a["category_id"]) for a in anns if a["category_id"] not in coco.cats]
    if unknown:
        raise ValueError(
            f"COCO annotation file {annotation_file}: {len(unknown)} annotations name categories that are "
            f"not in 'categories', e.g. (annotation id, category id) {unknown[:EXAMPLES]}"
        )
    dangling = [(a["id"], a["image_id"]) for a in anns if a["image_id"] not in coco.imgs]

    # annotations per image: pycocotools' coco.imgToAnns (file order within an image)
    per_image: dict[str, list[tuple[int, bool, Any, int]]] = {
        stem_of[image_id]: [
            (class_of[ann["category_id"]], bool(ann.get("iscrowd", 0)), ann.get("segmentation", []), ann["id"])
            for ann in coco.imgToAnns.get(image_id, ())
        ]
        for image_id in image_ids
    }
    crowd = sum(iscrowd for objects in per_image.values() for _, iscrowd, _, _ in objects)
    unannotated = [stem for stem in sizes if not per_image[stem]]

    # image files: one directory listing; the slower checks only when asked for
    present = {e.name for e in os.scandir(image_dir)}
    missing = [stem for stem in sizes if f"{stem}{ext}" not in present]
    bad: list[tuple[str, str]] = []
    if check_files or options["drop_bad_images"]:
        missing_set = set(missing)
        for stem, (height, width) in sizes.items():
            if stem not in missing_set:
                problem = _image_problem(image_dir / f"{stem}{ext}", height, width)
                if problem:
                    bad.append((stem, problem))
    if check_files and missing:
        raise FileNotFoundError(
            f"image not found: {image_dir / (missing[0] + ext)} ({len(missing)} of the {len(sizes)} images "
            f"listed in {annotation_file} are missing under {image_dir})"
        )
    if check_files and bad:
        raise ValueError(f"{image_dir / (bad[0][0] + ext)}: {bad[0][1]} ({len(bad)} unusable images)")

    dropped: dict[str, str] = {}
    if options["drop_bad_images"]:
        dropped.update({stem: "missing" for stem in missing})
        dropped.update(dict(bad))
    if options["drop_unannotated"]:
        dropped.update({stem: "no annotations" for stem in unannotated if stem not in dropped})
    ids = [stem for stem in sizes if stem not in dropped]
    if not ids:
        raise ValueError(
            f"no images left in COCO split '{split}' of {annotation_file} "
            f"({len(sizes)} listed, {len(dropped)} left out: e.g. {list(dropped.items())[:EXAMPLES]})"
        )

    # masks: reuse those rendered from the same annotation file, else start over
    mask_dir = out_dir / MASK_DIR
    mask_dir.mkdir(parents=True, exist_ok=True)
    if not same_masks:
        old_list = out_dir / LIST_DIR / f"{split}.txt"
        stale = set(ids) | (set(old_list.read_text().split()) if old_list.is_file() else set())
        removed = 0
        for stem in stale:
            with contextlib.suppress(FileNotFoundError):
                (mask_dir / f"{stem}.png").unlink()
                removed += 1
        if removed:
            log.warning(
                f"COCO {split}: the annotation file or the rendering rules changed since the masks in "
                f"{mask_dir} were made (or overwrite was asked for); rendering {removed} masks again"
            )
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT, "render_version": RENDER_VERSION, "complete": False, "split": split,
        "root": str(root), "image_dir": str(image_dir), "image_ext": ext,
        "annotation_file": str(annotation_file), "annotation": annotation, "options": options,
        "class_names": names,
        "category_ids": category_ids,
    }
    write_json_atomic(manifest_path(out_dir, split), manifest)  # before rendering: marks the masks' origin

    existing = {e.name for e in os.scandir(mask_dir)}
    tasks: list[RenderTask] = [
        (str(mask_dir / f"{stem}.png"), *sizes[stem], per_image[stem], f"{annotation_file} image {stem}")
        for stem in ids if f"{stem}.png" not in existing
    ]
    render_start = time.time()
    _render_all(tasks, num_workers, split)
    render_s = time.time() - render_start

    # labels (from annotations, crowd included) and the split list
    table = np.zeros((len(ids), len(names)), np.float32)
    for row, stem in enumerate(ids):
        for class_id, _, _, _ in per_image[stem]:
            table[row, class_id - 1] = 1.0
    _write_labels_npz(labels_path(out_dir, split), ids, table)
    legacy = _legacy_labels_path(out_dir, split)
    if legacy.is_file():
        legacy.unlink()
        log.info(f"COCO {split}: removed {legacy}, the pickled labels file of an earlier version")
    _write_if_changed(out_dir / LIST_DIR / f"{split}.txt", ("\n".join(ids) + "\n").encode())

    summary = {
        "split": split,
        "annotation_file": str(annotation_file),
        "image_dir": str(image_dir),
        "out_dir": str(out_dir),
        "num_classes": len(names),
        "num_images_in_file": len(sizes),
        "num_images": len(ids),
        "num_annotations_in_file": len(coco.dataset["annotations"]),
        "num_annotations_used": sum(len(per_image[s]) for s in ids),
        "crowd_annotations": crowd,
        "dangling_annotations": {
            "count": len(dangling),
            "image_ids": len({i for _, i in dangling}),
            "example_annotation_ids": _examples([a for a, _ in dangling]),
            "example_image_ids": _examples(list(dict.fromkeys(i for _, i in dangling))),
        },
        "images_without_annotations": {"count": len(unannotated), "examples": _examples(unannotated)},
        "missing_image_files": {"count": len(missing), "examples": _examples([s + ext for s in missing])},
        "unusable_image_files": {
            "count": len(bad), "examples": _examples([f"{s}{ext}: {w}" for s, w in bad])
        },
        "dropped_images": {"count": len(dropped), "examples": _examples(list(dropped.items()))},
        "images_per_class": dict(zip(names, table.sum(0).astype(int).tolist())),
        "masks_rendered": len(tasks),
        "masks_reused": len(ids) - len(tasks),
        "render_s": round(render_s, 2),
        "total_s": round(time.time() - start, 2),
        "parsed_annotation_file": True,
    }
    _report(split, annotation_file, image_dir, summary, options)
    manifest.update(complete=True, summary=summary)
    write_json_atomic(manifest_path(out_dir, split), manifest)
    return CocoLayout(out_dir, [split])


def _render_all(tasks: list[RenderTask], num_workers: int, split: str) -> None:
    if not tasks:
        return
    how = f" with {num_workers} processes" if num_workers > 0 else ""
    log.info(f"COCO {split}: rendering {len(tasks)} masks{how}")
    step = max(1000, len(tasks) // 10)  # progress lines only for large splits
    if num_workers > 0 and len(tasks) > 1:
        # spawn, not fork: the parent may hold threads (torch, OpenCV) whose locks a forked child inherits
        with ProcessPoolExecutor(num_workers, mp_context=get_context("spawn")) as pool:
            for done, _ in enumerate(pool.map(_render_task, tasks, chunksize=64), 1):
                if done % step == 0:
                    log.info(f"COCO {split}: {done}/{len(tasks)} masks")
        return
    for done, task in enumerate(tasks, 1):
        _render_task(task)
        if done % step == 0:
            log.info(f"COCO {split}: {done}/{len(tasks)} masks")


def _report(split: str, annotation_file: Path, image_dir: Path, summary: Mapping[str, Any],
            options: Mapping[str, bool]) -> None:
    n = summary["num_images_in_file"]
    log.info(
        f"COCO {split}: {summary['num_images']} images listed ({n} in {annotation_file}), "
        f"{summary['num_annotations_used']} annotations ({summary['crowd_annotations']} crowd), "
        f"{summary['masks_rendered']} masks rendered, {summary['masks_reused']} reused"
    )
    dangling = summary["dangling_annotations"]
    if dangling["count"]:
        log.warning(
            f"COCO {split}: {dangling['count']} of {summary['num_annotations_in_file']} annotations in "
            f"{annotation_file} refer to {dangling['image_ids']} image ids that are not in its 'images' list "
            f"(skipped), e.g. annotations {dangling['example_annotation_ids']}, image ids "
            f"{dangling['example_image_ids']}"
        )
    unannotated = summary["images_without_annotations"]
    if unannotated["count"]:
        kept = "left out (drop_unannotated)" if options["drop_unannotated"] else "kept as background only"
        log.info(f"COCO {split}: {unannotated['count']} of {n} images have no annotations, {kept}, "
                 f"e.g. {unannotated['examples']}")
    missing, unusable = summary["missing_image_files"], summary["unusable_image_files"]
    if missing["count"] or unusable["count"]:
        what = (
            "left out (drop_bad_images)" if options["drop_bad_images"]
            else "still listed: their masks were rendered from the annotation file's sizes, reading them "
            "will fail (check_files=True fails now, drop_bad_images=True leaves them out)"
        )
        log.warning(
            f"COCO {split}: {missing['count']} of {n} image files are missing under {image_dir}"
            + (f" and {unusable['count']} are unusable" if unusable["count"] else "")
            + f", {what}; e.g. {missing['examples'] + unusable['examples']}"
        )


# ----------------------------------------------------------------------------------- config entry
def coco_layout(
    root: str | Path,
    splits: Sequence[str],
    cache_dir: str | Path,
    annotation_files: Mapping[str, str | Path] | None = None,
    check_files: bool = False,
    drop_bad_images: bool = False,
    drop_unannotated: bool = False,
    num_workers: int = 0,
    class_names: Sequence[str] | None = None,
) -> CocoLayout:
    """Prepare every split (once; later calls reuse it) under the cache and return one reader over them.

    The output folder is ``<cache_dir>/datasets/coco_<hash of the absolute root>``, so two COCO copies
    never share masks. ``annotation_files`` maps a split to a non-default annotation file.
    """
    root = Path(root).expanduser().absolute()
    key = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    out_dir = Path(cache_dir).expanduser().absolute() / "datasets" / f"coco_{key}"
    summaries = {}
    for split in splits:
        prepared = prepare_coco(
            root, split, (annotation_files or {}).get(split), out_dir=out_dir, check_files=check_files,
            drop_bad_images=drop_bad_images, drop_unannotated=drop_unannotated, num_workers=num_workers,
            class_names=class_names,
        )
        summaries[split] = prepared.summary
    layout = CocoLayout(out_dir, list(splits))
    layout.summaries = summaries  # this call's (masks rendered now / reused), not the stored ones
    return layout


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m src.data.coco --root /data/coco2014 --split val2014 --out /data/coco2014_voc``"""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--root", required=True)
    parser.add_argument("--split", action="append", required=True, help="repeatable, e.g. train2014")
    parser.add_argument("--out", required=True)
    parser.add_argument("--annotation-file", help="only with a single --split")
    parser.add_argument("--check-files", action="store_true")
    parser.add_argument("--drop-bad-images", action="store_true")
    parser.add_argument("--drop-unannotated", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    if args.annotation_file and len(args.split) > 1:
        parser.error("--annotation-file needs a single --split")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for split in args.split:
        layout = prepare_coco(
            args.root, split, args.annotation_file, out_dir=args.out, check_files=args.check_files,
            drop_bad_images=args.drop_bad_images, drop_unannotated=args.drop_unannotated,
            overwrite=args.overwrite, num_workers=args.workers,
        )
        print(json.dumps(layout.summary, indent=2))


if __name__ == "__main__":
    main()
