"""Schemas of the run-level settings (OmegaConf structured configs): types, choices and ranges.

Defaults live in conf/ (the single source of values); these dataclasses only say what a value may be.
A choice is an Enum, so a typo names the key and the valid options; ranges are checked in
``__post_init__``. Stage parameters are checked by the stages' own constructors (src/stages/), which
the validation instantiates; these schemas cover what no stage owns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Progress(Enum):
    rich = "rich"
    tqdm = "tqdm"
    none = "none"


class OnOff(Enum):
    on = "on"
    off = "off"


class Inject(Enum):
    feature = "feature"
    input = "input"


class ImageMask(Enum):
    foreground = "foreground"
    label_map = "label_map"
    per_class = "per_class"


class Normalize(Enum):
    none = "none"
    max = "max"


class WarmStart(Enum):
    none = "none"
    classifier = "classifier"
    segmentation_backbone = "segmentation_backbone"


class ConfounderSource(Enum):
    segmentation = "segmentation"
    pseudo_masks = "pseudo_masks"


class ImageMaskSource(Enum):
    segmentation = "segmentation"
    ground_truth = "ground_truth"


def _at_least(name: str, value: Any, low: float) -> None:
    if value is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


@dataclass
class RunSchema:
    seed: int
    progress: Progress
    print_config: bool
    dry_run: bool
    stop_after: str | None = None
    optimized_metric: str | None = None
    methods: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _at_least("seed", self.seed, 0)


@dataclass
class TrainerSchema:
    devices: Any  # a count >= 1, "auto" or -1 (all)
    num_nodes: int

    def __post_init__(self) -> None:
        if self.devices not in ("auto", -1):
            if isinstance(self.devices, bool) or not isinstance(self.devices, int):
                raise ValueError(f"devices must be an integer, 'auto' or -1, got {self.devices!r}")
            _at_least("devices", self.devices, 1)
        _at_least("num_nodes", self.num_nodes, 1)


@dataclass
class ContextSchema:
    inject: Inject
    image_mask: ImageMask
    soft_image_mask: bool
    normalize: Normalize
    attention_lr_mult: float

    def __post_init__(self) -> None:
        _at_least("attention_lr_mult", self.attention_lr_mult, 0)


@dataclass
class ConfounderSetSchema:
    source: ConfounderSource
    image_masks: ImageMaskSource = ImageMaskSource.segmentation
    size: Any = None  # null or (h, w)
    soft: bool = False
    batch_size: int = 1
    inputs: Any = None
    context: Any = None
    _target_: str = ""

    def __post_init__(self) -> None:
        _at_least("batch_size", self.batch_size, 1)


@dataclass
class ContaSchema:
    name: OnOff
    enabled: bool
    rounds: int
    warm_start: WarmStart | None = None
    context: ContextSchema | None = None
    confounder_set: ConfounderSetSchema | None = None
    # (``stages`` and ``previous_round`` are the planner's: src/pipeline/plan.py checks them)

    def __post_init__(self) -> None:
        _at_least("rounds", self.rounds, 0)


@dataclass
class DataSchema:
    name: str
    num_classes: int
    class_names: list[str]

    def __post_init__(self) -> None:
        _at_least("num_classes", self.num_classes, 1)
        if len(self.class_names) not in (0, self.num_classes):
            raise ValueError(f"class_names has {len(self.class_names)} names but num_classes is {self.num_classes}")
