"""Augmentation pipelines built from YAML lists of albumentations transforms.

A stage config lists its transforms, each with a ``_target_`` (an albumentations class or one of the
few additions here), and :func:`build_transform` composes them. Image and mask go through the same
geometric ops (masks with nearest-neighbour, padded with 255 = ignore).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomLongestSide(A.LongestMaxSize):
    """Resize so that the long side is a uniform integer in [min_size, max_size] (IRNet's
    ``random_resize_long``); aspect ratio kept."""

    def __init__(self, min_size: int, max_size: int, interpolation: int = 1, p: float = 1.0):
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomLongestSide needs 0 < min_size <= max_size, got {min_size}, {max_size}")
        super().__init__(max_size=list(range(int(min_size), int(max_size) + 1)), interpolation=interpolation, p=p)


def build_transform(spec: Sequence[Any] | None, additional_targets: dict[str, str] | None = None) -> A.Compose:
    """Compose a list of transform configs (``_target_`` dicts) or transform objects."""
    if spec is not None and not isinstance(spec, (list, tuple, ListConfig)):
        raise TypeError(f"augmentation config must be a list of transforms, got {type(spec).__name__}")
    ops = []
    for item in spec or []:
        if isinstance(item, (dict, DictConfig)):
            ops.append(instantiate(item))
        elif isinstance(item, A.BasicTransform):
            ops.append(item)
        else:
            raise TypeError(f"augmentation entry must be a `_target_` mapping, got {item!r}")
    return A.Compose(ops, additional_targets=additional_targets or {})


def seed_transform(transform: A.Compose, seed: int) -> None:
    """Make the next call of ``transform`` deterministic: its randomness depends only on ``seed``
    (we derive it from the run seed, the epoch and the sample index, so 1 and N processes and a
    resumed run draw the same augmentations)."""
    transform.set_random_seed(int(seed) % (2**32))


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([int(base_seed), int(epoch), int(index)]).generate_state(1)[0])
