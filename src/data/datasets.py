"""The one Dataset class every stage reads through.

A sample is a dict: ``id``, ``index``, ``image`` (float CHW tensor after the transform), ``label``
(K-dim multi-hot), ``size`` (original H, W), and when asked ``mask`` (long HW: ground truth, or a
stage's label PNGs such as IR labels or pseudo-masks), ``raw`` (the uint8 RGB image, e.g. for a CRF)
and the entries of any ``extras`` (e.g. CONTA's per-image context masks).

Augmentation randomness is derived from (seed, epoch, index), never from process state, so one and
N processes, and an interrupted and resumed run, draw the same augmentations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from src.data.transforms import sample_seed, seed_transform
from src.data.voc import VOCLayout
from src.utils.io import read_image, read_label
from src.utils.labels import IGNORE

Extra = Callable[[str], Mapping[str, Any]]


class WSSSDataset(Dataset):
    """Images of one split, see the module docstring.

    ``target``: None (no pixel target), ``"gt"`` (ground-truth masks, for evaluation only) or a
    directory of ``<id>.png`` label maps written by a stage.
    """

    def __init__(
        self,
        layout: VOCLayout,
        split: str,
        transform: A.Compose | None = None,
        target: str | Path | None = None,
        return_raw: bool = False,
        extras: Sequence[Extra] = (),
        seed: int = 0,
        ids: Sequence[str] | None = None,
    ) -> None:
        self.layout, self.split = layout, split
        self.ids = tuple(ids) if ids is not None else layout.ids(split)
        all_ids = layout.ids(split)
        positions = {image_id: i for i, image_id in enumerate(all_ids)}
        label_table = layout.labels(split)
        try:
            self.labels = label_table[[positions[i] for i in self.ids]]
        except KeyError as err:
            raise ValueError(f"id {err} is not in split '{split}'") from err
        self.transform, self.target, self.return_raw = transform, target, return_raw
        self.extras, self.seed = tuple(extras), seed

    def __len__(self) -> int:
        return len(self.ids)

    def target_path(self, image_id: str) -> Path:
        if self.target == "gt":
            path = self.layout.mask_path(image_id)
            if path is None:
                raise FileNotFoundError(f"no ground-truth mask for {image_id} under {self.layout.root}")
            return path
        return Path(self.target) / f"{image_id}.png"

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image_id = self.ids[index]
        image_path = self.layout.image_path(image_id)
        image = read_image(image_path)
        size = image.shape[:2]
        mask = None
        if self.target is not None:
            mask_path = self.target_path(image_id)
            mask = read_label(mask_path)
            if mask.shape != size:
                raise ValueError(
                    f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                    f"{size[1]}x{size[0]}"
                )
            bad = mask[(mask > self.layout.num_classes) & (mask != IGNORE)]
            if bad.size:
                raise ValueError(
                    f"mask {mask_path} holds class id {int(bad.max())} > {self.layout.num_classes} "
                    "(data.class_names) that is not 255 (ignore)"
                )
        sample: dict[str, Any] = {"id": image_id, "index": index, "size": torch.tensor(size)}
        if self.return_raw:
            sample["raw"] = torch.from_numpy(image)
        if self.transform is not None:
            seed_transform(self.transform, sample_seed(self.seed, epoch, index))
            out = self.transform(image=image, mask=mask) if mask is not None else self.transform(image=image)
            image, mask = out["image"], out.get("mask")
        sample["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))
        sample["label"] = torch.from_numpy(self.labels[index].astype(np.float32))
        if mask is not None:
            sample["mask"] = torch.from_numpy(np.ascontiguousarray(mask)).long()
        for extra in self.extras:
            sample.update(extra(image_id))
        return sample


def collate_list(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep samples as a list (inference over images of different sizes)."""
    return samples
