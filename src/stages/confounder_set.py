"""CONTA: the confounder set C and the per-image masks X_m built from a round's segmentation model, and how
the next round reads them.

Output (the artifact of stage ``confounder_set``): ``confounder_set.pt`` (C, counts, size), ``priors.png``
(a picture of the n class priors) and ``image_masks/<id>.png`` (the model's label map at h x w, for every
train and val image; ``.npy`` class probabilities with ``soft_image_mask``). Its manifest provides the
context options (conf/conta/on.yaml ``context``) the consuming stages build CONTA's module with.
Consumers (classification, seeds of round r + 1) call :func:`context_of`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from src.callbacks.confounder_set import ConfounderSetCallback
from src.data.datasets import WSSSDataset
from src.models.conta import ContextPrior
from src.stages.core import (
    CONFOUNDER_FILE,
    IMAGE_MASKS,
    MASKS,
    Artifact,
    ParameterError,
    Stage,
    StageContext,
    container,
)
from src.stages.predict import run_predict, same_size_groups
from src.stages.segmentation import load_segmentation
from src.utils import dist
from src.utils.io import read_label, save_label_png_atomic, write_bytes_atomic
from src.utils.labels import IGNORE


# ------------------------------------------------------------------------------- the next round's side
def load_confounder_set(artifact: Artifact) -> dict[str, Any]:
    path = artifact.file(CONFOUNDER_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"confounder set not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


class ContextMasks:
    """Dataset extra: ``context_mask`` = the image's mask from the previous round's segmentation model."""

    def __init__(self, artifact: Artifact, soft: bool) -> None:
        self.folder = artifact.file(IMAGE_MASKS)
        self.soft = soft

    def __call__(self, image_id: str) -> dict[str, torch.Tensor]:
        if self.soft:
            path = self.folder / f"{image_id}.npy"
            if not path.is_file():
                raise FileNotFoundError(f"no context mask for {image_id}: {path}")
            return {"context_mask": torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))}
        path = self.folder / f"{image_id}.png"
        return {"context_mask": torch.from_numpy(read_label(path)).long()}


def context_of(artifact: Artifact) -> tuple[ContextPrior, ContextMasks, dict[str, Any]]:
    """CONTA's context module (untrained W1, W2 around C), the per-image mask reader and the context options
    (``inject``, ``attention_lr_mult``...) of a confounder-set artifact."""
    options = artifact.need("context")
    saved = load_confounder_set(artifact)
    prior = ContextPrior(saved["confounders"], str(options["image_mask"]), str(options["normalize"]))
    return prior, ContextMasks(artifact, bool(options["soft_image_mask"])), options


# ------------------------------------------------------------------------------------ building it
def area_resize(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) -> (C, h, w) by area averaging: a binary mask becomes the covered fraction per cell."""
    return F.adaptive_avg_pool2d(masks[None].float(), size)[0]


class ConfounderPrediction(pl.LightningModule):
    """predict_step: per image, class masks at h x w (background first) for C, and the image mask X_m."""

    def __init__(self, seg: pl.LightningModule, num_classes: int, size: tuple[int, int], soft: bool,
                 soft_image_mask: bool, use_targets: bool, image_masks_from_targets: bool = False) -> None:
        super().__init__()
        self.seg, self.num_classes, self.size = seg, num_classes, tuple(size)
        self.soft, self.soft_image_mask, self.use_targets = soft, soft_image_mask, use_targets
        self.image_masks_from_targets = image_masks_from_targets

    def target_masks(self, sample: dict) -> torch.Tensor:
        """The sample's target mask as per-class covered fractions at h x w (ignored pixels count for none)."""
        k = self.num_classes + 1
        target = sample["mask"].to(self.device)
        valid = (target != IGNORE).float()
        onehot = F.one_hot(target.clamp(max=k - 1), k).permute(2, 0, 1).float() * valid
        return area_resize(onehot, self.size)

    @torch.no_grad()
    def predict_step(self, batch: list[dict], batch_idx: int) -> list[tuple[str, dict]]:
        out = []
        k = self.num_classes + 1
        for group in same_size_groups(batch):
            probs = self.seg.probabilities(torch.stack([s["image"] for s in group]).to(self.device))
            for sample, p in zip(group, probs):
                hard = F.one_hot(p.argmax(0), k).permute(2, 0, 1).float()
                image_probs = area_resize(p, self.size)
                image_hard = area_resize(hard, self.size)
                if self.use_targets:  # C from the round's pseudo-masks instead of the predictions
                    class_masks = self.target_masks(sample)
                else:
                    class_masks = image_probs if self.soft else image_hard
                if self.image_masks_from_targets:  # X_m (not C) from the ground truth: the oracle diagnostic
                    image_probs = image_hard = self.target_masks(sample)
                payload = {
                    "class_masks": class_masks.cpu(),
                    "labels": sample["label"].cpu(),
                    "label_map": image_hard.argmax(0).to(torch.uint8).cpu().numpy(),
                }
                if self.soft_image_mask:
                    payload["probs"] = image_probs.cpu().numpy().astype(np.float16)
                out.append((sample["id"], payload))
        return out


def save_priors_picture(path: Path, confounders: torch.Tensor, class_names: Sequence[str]) -> None:
    """One heat map per class prior c_i, shared colour scale."""
    from matplotlib.figure import Figure

    n = confounders.shape[0]
    cols = min(n, 10)
    rows = -(-n // cols)
    fig = Figure(figsize=(1.6 * cols, 1.8 * rows))
    vmax = float(confounders.max()) or 1.0
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(confounders[i].numpy(), vmin=0, vmax=vmax, cmap="viridis")
        ax.set_title(class_names[i], fontsize=8)
        ax.axis("off")
    fig.suptitle("confounder set: class-average masks c_i", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    write_bytes_atomic(path, buf.getvalue())


class ConfounderSetStage(Stage):
    """C from the ``model`` input's predictions over the train split (or from the round's ``pseudo_masks``
    with ``source=pseudo_masks``), at ``size`` or the ``classifier`` input's feature-map size. ``image_masks``:
    X_m from the model's label map (``segmentation``, the paper) or from the ground truth (``ground_truth``:
    an oracle diagnostic, does CONTA help once X_m carries each image's true layout?)."""

    def __init__(self, context: DictConfig, source: str, size: Sequence[int] | None, soft: bool, batch_size: int,
                 inputs: Mapping[str, str] | None = None, image_masks: str = "segmentation") -> None:
        super().__init__(inputs)  # the options are checked by the conta schema (src/pipeline/schema.py)
        self.context = container(context)
        self.source, self.size, self.soft, self.batch_size = source, size, soft, batch_size
        self.image_masks = image_masks
        if image_masks == "ground_truth" and source == "pseudo_masks":
            raise ParameterError("conta.confounder_set.image_masks=ground_truth reads the ground truth of the "
                                 "images; with source=pseudo_masks use source=segmentation")

    def provides(self) -> dict[str, Any]:
        return {"context": self.context}

    def confounder_size(self, ctx: StageContext) -> tuple[int, int]:
        """h x w of C: as configured, or the classifier's feature map at its training crop."""
        if self.size:
            return int(self.size[0]), int(self.size[1])
        side = ctx.input("classifier").need("feature_size")
        return int(side[0]), int(side[1])

    def run(self, ctx: StageContext) -> dict[str, Any]:
        size = self.confounder_size(ctx)
        seg = load_segmentation(ctx.input("model"))
        n = ctx.data.num_classes
        folder = ctx.out_dir / IMAGE_MASKS
        soft_image_mask = bool(self.context["soft_image_mask"])

        def write(image_id: str, payload: dict) -> None:
            if soft_image_mask:
                buf = io.BytesIO()
                np.save(buf, payload["probs"])
                write_bytes_atomic(folder / f"{image_id}.npy", buf.getvalue())
            else:
                save_label_png_atomic(folder / f"{image_id}.png", payload["label_map"])

        callback = ConfounderSetCallback(n, size)
        data = ctx.data
        truth = self.image_masks == "ground_truth"
        target = ctx.input("pseudo_masks").file(MASKS) if self.source == "pseudo_masks" else ("gt" if truth else None)
        train = WSSSDataset(data.layout, data.train_split, ctx.eval_transform(), target=target)
        module = ConfounderPrediction(seg, n, size, self.soft, soft_image_mask, self.source == "pseudo_masks", truth)
        run_predict(ctx, module, train, write, self.batch_size, callbacks=[callback])
        if data.val_split != data.train_split:
            val = WSSSDataset(data.layout, data.val_split, ctx.eval_transform(), target="gt" if truth else None)
            run_predict(ctx, ConfounderPrediction(seg, n, size, self.soft, soft_image_mask, False, truth), val,
                        write, self.batch_size)
        confounders = callback.confounders
        assert confounders is not None and callback.counts is not None
        if dist.is_rank_zero():
            buf = io.BytesIO()
            torch.save({"confounders": confounders, "counts": callback.counts.float(), "size": list(size),
                        "class_names": list(data.layout.class_names)}, buf)
            write_bytes_atomic(ctx.out_dir / CONFOUNDER_FILE, buf.getvalue())
            save_priors_picture(ctx.out_dir / "priors.png", confounders, data.layout.class_names)
        dist.barrier()
        return {
            "summary": {},
            "size": list(size),
            "counts": callback.counts.tolist(),
            "prior_mass": confounders.flatten(1).mean(1).tolist(),
        }
