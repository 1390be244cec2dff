"""How a stage that uses CONTA's context gets it: the confounder-set artifact of the previous round.

The artifact (src/stages/confounder.py) holds ``confounder_set.pt`` (C, n x h x w) and one image mask
per image (``image_masks/<id>.png`` label maps at h x w, or ``.npy`` class probabilities when
``soft_image_mask``). Stages build a :class:`~src.models.conta.ContextAdjustment` from C and read each
image's mask through :class:`ContextMasks` (a dataset extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from src.models.conta import ContextAdjustment, image_mask_vector
from src.pipeline.artifacts import Artifact
from src.utils.io import read_label

CONFOUNDER_FILE = "confounder_set.pt"
IMAGE_MASK_DIR = "image_masks"


def load_confounder_set(artifact: Artifact) -> dict[str, Any]:
    path = artifact.file(CONFOUNDER_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"confounder set not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


class ContextMasks:
    """Dataset extra: ``context_mask`` = the image's mask from the previous round's segmentation model."""

    def __init__(self, artifact: Artifact, soft: bool) -> None:
        self.folder = artifact.file(IMAGE_MASK_DIR)
        self.soft = soft

    def __call__(self, image_id: str) -> dict[str, torch.Tensor]:
        if self.soft:
            path = self.folder / f"{image_id}.npy"
            if not path.is_file():
                raise FileNotFoundError(f"no context mask for {image_id}: {path}")
            return {"context_mask": torch.from_numpy(np.load(path).astype(np.float32))}
        path = self.folder / f"{image_id}.png"
        return {"context_mask": torch.from_numpy(read_label(path)).long()}


class ContextPrior(torch.nn.Module):
    """X_m (label map or probabilities) -> M, with CONTA's image-mask convention from the config."""

    def __init__(self, confounders: torch.Tensor, image_mask: str, normalize: str = "none") -> None:
        super().__init__()
        self.adjust = ContextAdjustment(confounders, image_mask, normalize)
        self.image_mask = image_mask

    def forward(self, context_mask: torch.Tensor) -> torch.Tensor:
        x_m = image_mask_vector(context_mask, self.adjust.num_classes, self.image_mask)
        return self.adjust(x_m)


def build_context(ctx_cfg: DictConfig, artifact: Artifact) -> tuple[ContextPrior, ContextMasks]:
    """The context module and the per-image mask reader of a round, from the previous round's artifact."""
    saved = load_confounder_set(artifact)
    prior = ContextPrior(saved["confounders"], str(ctx_cfg.image_mask), str(ctx_cfg.get("normalize", "none")))
    return prior, ContextMasks(artifact, bool(ctx_cfg.soft_image_mask))


def context_folder(out_dir: Path) -> Path:
    return Path(out_dir) / IMAGE_MASK_DIR
