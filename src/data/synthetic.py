"""A small, deterministic, deliberately confounded dataset in the VOC 2012 layout.

Why: CONTA targets context bias (a classifier that learns "horse" from the rider on it, or "boat"
from the water under it). The synthetic set builds both biases in, at a size that trains on a CPU:

* every class has its own shape and texture (so it is learnable from the object alone);
* **co-occurrence**: the two ``pair`` classes (default rider + horse) appear together, touching, in
  ``pair_rate`` (default 90%) of the images that hold either of them;
* **context**: the ``context_class`` (default boat) sits on a class-specific background texture
  (water) in ``context_rate`` (90%) of its images, and that texture appears without it in only
  ``context_leak`` (5%) of the others; the water is background (label 0);
* ``val_deconfounded`` draws the same objects with the pair classes independent of each other and the
  water independent of the boat (present in half of the images);
* ``train_confounding=false`` draws the train split that way too: the de-confounded-train oracle, the
  ceiling of what any de-confounding method could win (scored on the same val and val_deconfounded).

Masks are palette PNGs with 0 = background, 1..K = classes and a 255 band (``border`` px either side)
along every object boundary, as in VOC. Image-level labels are derived from the masks by the reader.
``ContextRegion/<id>.png`` marks the context texture (1 = water) so analyses can measure how much of
the context a model labels as the context class (never used for training).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from filelock import FileLock

from src.data.voc import VOCLayout
from src.utils.io import save_jpeg_atomic, save_label_png_atomic, write_json_atomic, write_text_atomic
from src.utils.logging import get_logger

log = get_logger(__name__)

SPLITS = ("train", "val", "val_deconfounded")

# Per class: shape and texture (pattern + two RGB colours). Distinct from each other and from water.
CLASS_STYLES: dict[str, dict] = {
    "rider": {"shape": "capsule", "pattern": "hstripes", "colors": ((220, 40, 40), (250, 210, 60))},
    "horse": {"shape": "wide_ellipse", "pattern": "checker", "colors": ((120, 70, 30), (235, 225, 210))},
    "boat": {"shape": "trapezoid", "pattern": "diagonal", "colors": ((250, 250, 250), (240, 120, 20))},
    "ball": {"shape": "circle", "pattern": "dots", "colors": ((30, 110, 30), (150, 240, 90))},
    "box": {"shape": "square", "pattern": "vstripes", "colors": ((110, 40, 140), (240, 150, 220))},
    "star": {"shape": "star", "pattern": "solid", "colors": ((40, 200, 210), (40, 200, 210))},
    "kite": {"shape": "diamond", "pattern": "grid", "colors": ((200, 200, 40), (60, 60, 200))},
    "cup": {"shape": "triangle", "pattern": "rings", "colors": ((200, 90, 120), (250, 250, 200))},
}
WATER_COLORS = ((20, 60, 160), (70, 140, 230))


@dataclass
class SyntheticSpec:
    """Generative rules of the synthetic set (all fields are config: ``data.layout.spec.*``)."""

    seed: int = 0
    image_size: int = 96
    num_train: int = 200
    num_val: int = 80
    num_val_deconfounded: int = 80
    class_names: Sequence[str] = ("rider", "horse", "boat", "ball", "box", "star")
    pair: Sequence[str] = ("rider", "horse")
    pair_class_rate: float = 0.4
    pair_rate: float = 0.9
    context_class: str = "boat"
    context_class_rate: float = 0.35
    context_rate: float = 0.9
    context_leak: float = 0.05
    object_rate: float = 0.3
    max_objects: int = 3
    object_scale: Sequence[float] = (0.3, 0.45)
    part_fraction: float = 1.0  # share of an object carrying its class texture; the rest is a generic body
    border: int = 1
    jpeg_quality: int = 92
    train_confounding: bool = True  # false: the train split drawn as val_deconfounded (the oracle's data)
    split_sizes: dict[str, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.class_names = tuple(self.class_names)
        self.pair = tuple(self.pair)
        self.object_scale = tuple(float(s) for s in self.object_scale)
        unknown = [c for c in self.class_names if c not in CLASS_STYLES]
        if unknown:
            raise ValueError(f"data.layout.spec.class_names: unknown {unknown}; choose from {sorted(CLASS_STYLES)}")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("data.layout.spec.class_names must be distinct")
        for name in (*self.pair, self.context_class):
            if name not in self.class_names:
                raise ValueError(f"data.layout.spec: '{name}' (pair/context_class) is not in class_names")
        if len(self.pair) != 2 or self.pair[0] == self.pair[1]:
            raise ValueError("data.layout.spec.pair must name two different classes")
        if self.context_class in self.pair:
            raise ValueError("data.layout.spec.context_class must not be one of the pair classes")
        for key in ("pair_class_rate", "pair_rate", "context_class_rate", "context_rate", "context_leak",
                    "object_rate", "part_fraction"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"data.layout.spec.{key} must lie in [0, 1], got {value}")
        if len(self.object_scale) != 2 or not 0 < self.object_scale[0] <= self.object_scale[1] <= 1:
            raise ValueError("data.layout.spec.object_scale must be two fractions of the image side, "
                             f"0 < low <= high <= 1, got {list(self.object_scale)}")
        if self.image_size < 32:
            raise ValueError(f"data.layout.spec.image_size must be >= 32, got {self.image_size}")
        if self.max_objects < 2:
            raise ValueError("data.layout.spec.max_objects must be >= 2 (the pair needs two)")
        self.split_sizes = {"train": self.num_train, "val": self.num_val,
                            "val_deconfounded": self.num_val_deconfounded}
        for split, n in self.split_sizes.items():
            if n < 1:
                raise ValueError(f"data.layout.spec: split '{split}' must have at least one image, got {n}")

    def fingerprint_dict(self) -> dict:
        d = asdict(self)
        d.pop("split_sizes")
        return d


# ----------------------------------------------------------------------------------------- drawing
def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Binary mask (size x size) of a shape centred in its box."""
    m = np.zeros((size, size), np.uint8)
    c, r = size // 2, size // 2 - 1
    if shape == "circle":
        cv2.circle(m, (c, c), r, 1, -1)
    elif shape == "square":
        k = int(r * 0.8)
        m[c - k:c + k, c - k:c + k] = 1
    elif shape == "capsule":
        w = max(2, int(r * 0.45))
        cv2.ellipse(m, (c, c), (w, r), 0, 0, 360, 1, -1)
    elif shape == "wide_ellipse":
        cv2.ellipse(m, (c, c), (r, int(r * 0.55)), 0, 0, 360, 1, -1)
    elif shape == "trapezoid":
        top, bottom = int(c - r * 0.5), int(c + r * 0.5)
        pts = np.array([[c - r, top], [c + r, top], [c + int(r * 0.5), bottom], [c - int(r * 0.5), bottom]])
        cv2.fillPoly(m, [pts.astype(np.int32)], 1)
    elif shape == "star":
        angles = np.linspace(-np.pi / 2, 1.5 * np.pi, 11)[:-1]
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        pts = np.stack([c + radii * np.cos(angles), c + radii * np.sin(angles)], 1)
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    elif shape == "diamond":
        pts = np.array([[c, c - r], [c + int(r * 0.7), c], [c, c + r], [c - int(r * 0.7), c]])
        cv2.fillPoly(m, [pts.astype(np.int32)], 1)
    elif shape == "triangle":
        pts = np.array([[c, c - r], [c + r, c + int(r * 0.8)], [c - r, c + int(r * 0.8)]])
        cv2.fillPoly(m, [pts.astype(np.int32)], 1)
    else:
        raise ValueError(f"unknown shape {shape}")
    return m


def _texture(pattern: str, colors, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) float texture in [0, 255]."""
    yy, xx = np.mgrid[0:h, 0:w]
    phase = rng.integers(0, 8)
    if pattern == "hstripes":
        sel = ((yy + phase) // 3) % 2
    elif pattern == "vstripes":
        sel = ((xx + phase) // 3) % 2
    elif pattern == "checker":
        sel = (((yy + phase) // 4) + ((xx + phase) // 4)) % 2
    elif pattern == "diagonal":
        sel = ((xx + yy + phase) // 3) % 2
    elif pattern == "dots":
        sel = (((yy + phase) % 5 < 2) & ((xx + phase) % 5 < 2)).astype(int)
    elif pattern == "grid":
        sel = (((yy + phase) % 6 == 0) | ((xx + phase) % 6 == 0)).astype(int)
    elif pattern == "rings":
        sel = (np.hypot(yy - h / 2, xx - w / 2).astype(int) // 3) % 2
    elif pattern == "solid":
        sel = np.zeros((h, w), int)
    elif pattern == "water":
        sel = ((yy + 2.0 * np.sin(xx / 3.0 + phase)).astype(int) // 3) % 2
    else:
        raise ValueError(f"unknown pattern {pattern}")
    c0, c1 = (np.asarray(c, np.float32) for c in colors)
    tex = np.where(sel[..., None] == 1, c1, c0)
    return tex * rng.uniform(0.85, 1.1)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random colour field: the generic background."""
    grid = rng.uniform(60, 200, size=(4, 4, 3)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _place(mask: np.ndarray, occupied: np.ndarray, size: int, rng: np.random.Generator,
           box: tuple[int, int, int, int] | None = None, tries: int = 20) -> tuple[int, int]:
    """Top-left corner for ``mask`` inside ``box`` (y0, y1, x0, x1 ranges), least overlap with ``occupied``."""
    s = mask.shape[0]
    y0, y1, x0, x1 = box or (0, size - s, 0, size - s)
    y0, x0 = min(y0, size - s), min(x0, size - s)
    y1, x1 = max(y0, min(y1, size - s)), max(x0, min(x1, size - s))
    best, best_overlap = (y0, x0), None
    for _ in range(tries):
        y, x = int(rng.integers(y0, y1 + 1)), int(rng.integers(x0, x1 + 1))
        overlap = int((occupied[y:y + s, x:x + s] & mask).sum())
        if best_overlap is None or overlap < best_overlap:
            best, best_overlap = (y, x), overlap
        if overlap == 0:
            break
    return best


def _body_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) generic object surface: a random colour with darker speckles, the same for every class."""
    base = rng.uniform(40, 220, size=3).astype(np.float32)
    speckle = rng.random((size, size)) < 0.3
    return np.where(speckle[..., None], 0.6 * base, base).astype(np.float32)


def _part(region: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """The pixels of ``region`` nearest to a random pixel of it, ``fraction`` of them: the object's
    discriminative part (a rider's face, a bird's head), wherever it lies."""
    ys, xs = np.nonzero(region)
    i = int(rng.integers(len(ys)))
    dist = np.hypot(ys - ys[i], xs - xs[i])
    keep = dist <= np.quantile(dist, fraction)
    part = np.zeros_like(region)
    part[ys[keep], xs[keep]] = True
    return part


def _paint(image: np.ndarray, label: np.ndarray, occupied: np.ndarray, mask: np.ndarray, y: int, x: int,
           class_id: int, style: dict, rng: np.random.Generator, part_fraction: float = 1.0) -> None:
    """Paint an object: its class texture on the part of ``part_fraction`` of it, a generic body on the rest
    (with part_fraction < 1 the classifier's evidence sits on the part, so CAMs miss the body, as on VOC)."""
    s = mask.shape[0]
    region = mask.astype(bool)
    tex = _texture(style["pattern"], style["colors"], s, s, rng)
    if part_fraction < 1.0:
        tex = np.where(_part(region, part_fraction, rng)[..., None], tex, _body_texture(s, rng))
    image[y:y + s, x:x + s][region] = tex[region]
    label[y:y + s, x:x + s][region] = class_id
    occupied[y:y + s, x:x + s] |= mask


def draw_image(spec: SyntheticSpec, confounded: bool, rng: np.random.Generator, return_context: bool = False
               ) -> tuple:
    """One (RGB uint8 image, label map uint8, has-context-texture) triple following the rules; with
    ``return_context`` also the context region (uint8, 1 where the water texture is visible)."""
    size = spec.image_size
    names = list(spec.class_names)
    ids = {n: i + 1 for i, n in enumerate(names)}
    a, b = spec.pair
    others = [n for n in names if n not in spec.pair and n != spec.context_class]

    # which classes, and is the water there
    present: list[str] = []
    if confounded:
        u = rng.random()
        p_both = spec.pair_class_rate * spec.pair_rate
        p_single = spec.pair_class_rate * (1 - spec.pair_rate)
        if u < p_both:
            present += [a, b]
        elif u < p_both + p_single:
            present.append(a if rng.random() < 0.5 else b)
        has_context_class = rng.random() < spec.context_class_rate
        water = rng.random() < (spec.context_rate if has_context_class else spec.context_leak)
    else:
        present += [n for n in (a, b) if rng.random() < spec.pair_class_rate]
        has_context_class = rng.random() < spec.context_class_rate
        water = rng.random() < 0.5
    if has_context_class:
        present.append(spec.context_class)
    for name in rng.permutation(others):
        if len(present) < spec.max_objects and rng.random() < spec.object_rate:
            present.append(str(name))
    if not present:
        present.append(str(rng.choice(others if others else names)))

    image = _background(size, rng)
    label = np.zeros((size, size), np.uint8)
    occupied = np.zeros((size, size), np.uint8)
    waterline = int(size * rng.uniform(0.5, 0.65))
    if water:
        image[waterline:] = _texture("water", WATER_COLORS, size - waterline, size, rng)

    def obj_size() -> int:
        lo, hi = spec.object_scale
        return max(8, int(size * rng.uniform(lo, hi)))

    together = confounded and a in present and b in present
    order = [n for n in present if n not in (a, b, spec.context_class)]
    order += [n for n in (b, a) if n in present]  # partner b first, a drawn on top of it
    if spec.context_class in present:
        order.append(spec.context_class)
    placed: dict[str, tuple[int, int, int]] = {}
    for name in order:
        s = obj_size()
        mask = _shape_mask(CLASS_STYLES[name]["shape"], s, rng)
        box = None
        if name == a and together and b in placed:
            by, bx, bs = placed[b]  # sit on the partner: overlap its top part
            box = (by - s // 2, by - s // 4, bx - s // 4, bx + bs - 3 * s // 4)
            box = (max(0, box[0]), max(0, box[1]), max(0, box[2]), max(0, box[3]))
        elif name == b and together:
            box = (s // 2, size - s, 0, size - s)  # leave room above for the partner
        elif name == spec.context_class and water:
            top = max(0, waterline - int(0.7 * s))
            box = (top, top, 0, size - s)
        elif water and name != spec.context_class:
            box = (0, max(0, waterline - s // 2), 0, size - s)  # other objects stay mostly above water
        y, x = _place(mask, occupied, size, rng, box)
        _paint(image, label, occupied, mask, y, x, ids[name], CLASS_STYLES[name], rng, spec.part_fraction)
        placed[name] = (y, x, s)

    image = image + rng.normal(0, 6, image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    if spec.border > 0:
        k = np.ones((2 * spec.border + 1, 2 * spec.border + 1), np.uint8)
        edge = cv2.dilate(label, k) != cv2.erode(label, k)
        label = label.copy()
        label[edge] = 255
    if return_context:
        context = np.zeros((size, size), np.uint8)
        if water:
            context[waterline:] = 1
        context[occupied > 0] = 0
        return image, label, water, context
    return image, label, water


# -------------------------------------------------------------------------------------- generation
def generate(spec: SyntheticSpec, root: Path) -> dict:
    """Write the dataset in VOC layout under ``root``; returns the summary (also in summary.json)."""
    root = Path(root)
    names = list(spec.class_names)
    summary: dict = {"spec": spec.fingerprint_dict(), "splits": {}}
    for split_index, split in enumerate(SPLITS):
        n = spec.split_sizes[split]
        confounded = split == "val" or (split == "train" and spec.train_confounding)
        prefix = {"train": "train", "val": "val", "val_deconfounded": "vdc"}[split]
        ids, labels = [], []
        water = []
        for i in range(n):
            rng = np.random.default_rng([spec.seed, split_index, i])
            image, label, has_water, context = draw_image(spec, confounded, rng, return_context=True)
            water.append(has_water)
            image_id = f"{prefix}_{i:05d}"
            save_jpeg_atomic(root / "JPEGImages" / f"{image_id}.jpg", image, spec.jpeg_quality)
            save_label_png_atomic(root / "SegmentationClass" / f"{image_id}.png", label)
            save_label_png_atomic(root / "ContextRegion" / f"{image_id}.png", context, palette=False)
            ids.append(image_id)
            present = np.zeros(len(names), int)
            for v in np.unique(label):
                if 0 < v <= len(names):
                    present[v - 1] = 1
            labels.append(present)
        labels_arr, water_arr = np.array(labels), np.array(water, bool)
        ctx = labels_arr[:, names.index(spec.context_class)].astype(bool)
        summary["splits"][split] = {
            "images": n,
            "class_counts": dict(zip(names, labels_arr.sum(0).tolist())),
            "cooccurrence": (labels_arr.T @ labels_arr).tolist(),
            "context_texture_with_class": int((water_arr & ctx).sum()),
            "context_texture_without_class": int((water_arr & ~ctx).sum()),
            "context_class_images": int(ctx.sum()),
        }
        write_text_atomic(root / "ImageSets" / "Segmentation" / f"{split}.txt", "\n".join(ids) + "\n")
    write_json_atomic(root / "summary.json", summary)
    return summary


def format_summary(summary: dict, class_names: Sequence[str]) -> str:
    """Class counts and the co-occurrence matrix of each split, as text."""
    lines = []
    for split, info in summary["splits"].items():
        lines.append(f"{split}: {info['images']} images; per class: "
                     + ", ".join(f"{k} {v}" for k, v in info["class_counts"].items()))
        co = np.array(info["cooccurrence"])
        width = max(len(n) for n in class_names) + 2
        lines.append(" " * width + "  co-occurrence (images with both)")
        lines.append(" " * width + "".join(f"{n[:6]:>7}" for n in class_names))
        for i, name in enumerate(class_names):
            lines.append(f"{name:>{width}}" + "".join(f"{v:>7}" for v in co[i]))
        lines.append(f"  context texture: with the context class in {info['context_texture_with_class']}"
                     f" of its {info['context_class_images']} images, without it in "
                     f"{info['context_texture_without_class']} images")
    return "\n".join(lines)


def synthetic_layout(cache_dir: str | Path, spec: dict | SyntheticSpec) -> VOCLayout:
    """Generate the synthetic set into ``<cache_dir>/datasets/synthetic/<fingerprint>/`` once and return its
    reader. ``summary.json`` is written last, so a folder without it is generated again; a file lock keeps
    two processes (a sweep's jobs, the ranks of a DDP job) from generating it at the same time."""
    if not isinstance(spec, SyntheticSpec):
        spec = SyntheticSpec(**dict(spec))
    text = json.dumps(spec.fingerprint_dict(), sort_keys=True, separators=(",", ":"), default=str)
    root = Path(cache_dir).expanduser() / "datasets" / "synthetic" / hashlib.sha256(text.encode()).hexdigest()[:16]
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f"{root.name}.lock")):
        if not (root / "summary.json").is_file():
            summary = generate(spec, root)
            log.info(f"generated the synthetic dataset in {root}\n" + format_summary(summary, spec.class_names))
    return VOCLayout(root, spec.class_names)
