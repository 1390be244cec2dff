"""CONTA: build the confounder set C and the per-image masks X_m from a round's segmentation model.

Output (the artifact of stage ``confounder_set``, read by the next round, src/stages/context.py):
``confounder_set.pt`` (C, counts, size), ``priors.png`` (a picture of the n class priors) and
``image_masks/<id>.png`` (the model's label map at h x w, for every train and val image; ``.npy``
class probabilities with ``soft_image_mask``).
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
from hydra.utils import instantiate

from src.callbacks.confounder_set import ConfounderSetCallback
from src.data.datasets import WSSSDataset
from src.inference.common import run_predict, same_size_groups
from src.pipeline.stage import Stage, StageContext
from src.stages.context import CONFOUNDER_FILE, IMAGE_MASK_DIR
from src.stages.segmentation import MASK_FOLDER, load_segmentation
from src.utils import dist
from src.utils.io import save_label_png_atomic, write_bytes_atomic


def area_resize(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) -> (C, h, w) by area averaging: a binary mask becomes the covered fraction per cell."""
    return F.adaptive_avg_pool2d(masks[None].float(), size)[0]


class ConfounderPrediction(pl.LightningModule):
    """predict_step: per image, class masks at h x w (background first) for C, and the image mask X_m."""

    def __init__(self, seg: pl.LightningModule, num_classes: int, size: tuple[int, int], soft: bool,
                 soft_image_mask: bool, use_targets: bool) -> None:
        super().__init__()
        self.seg, self.num_classes, self.size = seg, num_classes, tuple(size)
        self.soft, self.soft_image_mask, self.use_targets = soft, soft_image_mask, use_targets

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
                    target = sample["mask"].to(self.device)
                    valid = (target != 255).float()
                    onehot = F.one_hot(target.clamp(max=k - 1), k).permute(2, 0, 1).float() * valid
                    class_masks = area_resize(onehot, self.size)
                else:
                    class_masks = image_probs if self.soft else image_hard
                payload = {
                    "class_masks": class_masks.cpu(),
                    "labels": sample["label"],
                    "label_map": image_hard.argmax(0).to(torch.uint8).cpu().numpy(),
                }
                if self.soft_image_mask:
                    payload["probs"] = image_probs.cpu().numpy().astype(np.float16)
                out.append((sample["id"], payload))
        return out


def confounder_size(ctx: StageContext, size: Sequence[int] | None) -> tuple[int, int]:
    """h x w of C: as configured, or the classifier's feature map at its training crop."""
    if size:
        return int(size[0]), int(size[1])
    spec = ctx.spec_of("classification")
    stride = instantiate(spec.net).output_stride
    side = -(-int(spec.crop_size) // stride)
    return side, side


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
    def __init__(self, source: str = "segmentation", size: Sequence[int] | None = None, soft: bool = False,
                 image_mask: str = "foreground", soft_image_mask: bool = False, batch_size: int = 8,
                 inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(inputs)
        if source not in ("segmentation", "pseudo_masks"):
            raise ValueError(f"conta.confounder_set.source must be segmentation | pseudo_masks, got {source!r}")
        self.source, self.size, self.soft = source, size, soft
        self.image_mask, self.soft_image_mask, self.batch_size = image_mask, soft_image_mask, batch_size

    def run(self, ctx: StageContext) -> dict[str, Any]:
        size = confounder_size(ctx, self.size)
        seg = load_segmentation(ctx)
        n = ctx.data.num_classes
        folder = ctx.out_dir / IMAGE_MASK_DIR

        def write(image_id: str, payload: dict) -> None:
            if self.soft_image_mask:
                buf = io.BytesIO()
                np.save(buf, payload["probs"])
                write_bytes_atomic(folder / f"{image_id}.npy", buf.getvalue())
            else:
                save_label_png_atomic(folder / f"{image_id}.png", payload["label_map"])

        callback = ConfounderSetCallback(n, size)
        data = ctx.data
        target = None
        if self.source == "pseudo_masks":
            target = ctx.inputs["pseudo_masks"].file(MASK_FOLDER) if "pseudo_masks" in ctx.inputs else None
            if target is None:
                raise ValueError("conta.confounder_set.source=pseudo_masks needs the round's pseudo_masks input")
        train = WSSSDataset(data.layout, data.train_split, ctx.eval_transform(), target=target)
        module = ConfounderPrediction(seg, n, size, self.soft, self.soft_image_mask, target is not None)
        run_predict(ctx, module, train, write, self.batch_size, callbacks=[callback])
        if data.val_split != data.train_split:
            val = WSSSDataset(data.layout, data.val_split, ctx.eval_transform())
            run_predict(ctx, ConfounderPrediction(seg, n, size, self.soft, self.soft_image_mask, False), val,
                        write, self.batch_size)
        confounders = callback.confounders
        assert confounders is not None
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
