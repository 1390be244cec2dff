"""The prepared dataset of a run and the roles of its splits (from conf/data)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from src.data.voc import VOCLayout


@dataclass
class DataBundle:
    """``train_split``: classifier, seeds, refiners and segmentation train on it; ``val_split``: the
    classifier's validation; ``eval_splits``: segmentation is scored on each; ``seed_eval_split``: the train
    images with ground truth on which seeds and pseudo-masks are scored (the WSSS protocol)."""

    layout: VOCLayout
    train_split: str
    val_split: str
    eval_splits: Sequence[str]
    seed_eval_split: str | None
    mean: Sequence[float]
    std: Sequence[float]
    loader: Mapping[str, Any]

    @property
    def num_classes(self) -> int:
        return self.layout.num_classes

    @property
    def class_names(self) -> list[str]:
        return ["background", *self.layout.class_names]

    def seed_eval_ids(self) -> list[str]:
        """Images of the train split scored for seeds and pseudo-masks (they need ground truth)."""
        if not self.seed_eval_split:
            return []
        train = set(self.layout.ids(self.train_split))
        return [i for i in self.layout.ids(self.seed_eval_split) if i in train]

    @property
    def seed_metric_split(self) -> str:
        """The split name in the keys of seed / label / mask metrics (``<split>/seed_miou``)."""
        return self.seed_eval_split or self.train_split
