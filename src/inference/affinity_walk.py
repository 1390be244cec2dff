"""AffinityNet's pseudo-masks (specs/seam.md; PSA/SEAM ``infer_aff.py``): a random walk of the seeds over the
affinities predicted by the trained AffinityNet.

Per image (images of one size as one batch): the image is zero-padded at the bottom/right to a multiple of
the net's stride (8); pair affinities within ``radius`` on the stride-8 grid
(:func:`~src.models.affinity.pair_affinity`); the seeds ``high_res`` of the image's classes get a background
channel (1 - max fg) ** ``alpha`` (:func:`~src.inference.affinity_labels.alpha_scores`), are zero-padded
likewise and average-pooled stride x stride; the scores walk 2 ** ``exp_times`` steps (SEAM's ``logt``)
with the transition A ** ``beta`` column-normalised (self-loops 1), through IRNet's sparse
:func:`~src.inference.random_walk.random_walk` (one implementation); they are upsampled bilinearly to
the padded size, cropped, and the argmax over [background, classes] is the pseudo-mask.

The reference's dense affinity matrix holds only the pairs whose source lies in PSA's label region (rows
< h - r + 1, r - 1 <= cols < w - r + 1); here every in-image pair within the radius takes part.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from src.data.datasets import WSSSDataset
from src.inference.affinity_labels import alpha_scores
from src.inference.cams import load_seeds
from src.inference.common import pending_ids, run_predict, same_size_groups
from src.inference.pairs import half_plane_offsets
from src.inference.pseudo_masks import mask_metrics
from src.inference.random_walk import random_walk
from src.models.affinity import pair_affinity
from src.pipeline.stage import Stage, StageContext
from src.stages.segmentation import MASK_FOLDER
from src.utils.io import save_label_png_atomic


def pooled_scores(seeds: list[dict[str, np.ndarray]], alpha: float, padded: tuple[int, int], stride: int,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """[bg, fg...] alpha-power scores of each image's seeds, zero-padded to ``padded`` and average-pooled
    ``stride`` x ``stride``: (B, 1 + max n, H'/stride, W'/stride); channels past an image's classes are 0."""
    n_max = max(len(s["keys"]) for s in seeds)
    out = torch.zeros(len(seeds), n_max + 1, *padded, device=device)
    for i, s in enumerate(seeds):
        scores = torch.from_numpy(alpha_scores(s["high_res"], alpha))
        out[i, : scores.shape[0], : scores.shape[1], : scores.shape[2]] = scores.to(out.device)
    return F.avg_pool2d(out, stride, stride)


def walk_labels(walked: torch.Tensor, keys: np.ndarray, size: tuple[int, int], stride: int) -> np.ndarray:
    """Walked scores (1 + n, h, w) of [bg, classes ``keys``] -> label map ``size`` uint8: bilinear upsampling by
    the grid ``stride`` (to the padded size), crop, argmax."""
    n = len(keys)
    up = F.interpolate(walked[None, : n + 1], scale_factor=stride, mode="bilinear", align_corners=False)
    pred = up[0, :, : size[0], : size[1]].argmax(0).cpu().numpy()
    return np.concatenate([[0], np.asarray(keys, np.int64)]).astype(np.uint8)[pred]


class AffinityRandomWalk(pl.LightningModule):
    def __init__(self, net: torch.nn.Module, cam_dir, radius: int, beta: float, exp_times: int,
                 alpha: float) -> None:
        super().__init__()
        self.net, self.cam_dir = net, cam_dir
        self.radius, self.beta, self.exp_times, self.alpha = radius, beta, exp_times, alpha

    def walk(self, images: torch.Tensor, seeds: list[dict[str, np.ndarray]]) -> torch.Tensor:
        """Walked [bg, fg...] scores (B, 1 + max n, h, w) on the stride grid of same-size images (B, 3, H, W)."""
        stride = self.net.output_stride
        h, w = images.shape[-2:]
        padded = (-(-h // stride) * stride, -(-w // stride) * stride)
        x = F.pad(images, (0, padded[1] - w, 0, padded[0] - h))
        affinity = pair_affinity(self.net(x).float(), self.radius)  # fp32 under autocast, as the loss
        scores = pooled_scores(seeds, self.alpha, padded, stride, self.device)
        return random_walk(scores, affinity, half_plane_offsets(self.radius), self.beta, 2 ** self.exp_times)

    @torch.no_grad()
    def predict_step(self, batch: list[dict], batch_idx: int) -> list[tuple[str, np.ndarray]]:
        out = []
        for group in same_size_groups(batch):
            images = torch.stack([s["image"] for s in group]).to(self.device)
            seeds = [load_seeds(self.cam_dir, s["id"]) for s in group]
            walked = self.walk(images, seeds)
            size = tuple(images.shape[-2:])
            for sample, s, wk in zip(group, seeds, walked):
                out.append((sample["id"], walk_labels(wk, s["keys"], size, self.net.output_stride)))
        return out


class AffinityRandomWalkStage(Stage):
    """Pseudo-masks ``masks/<id>.png`` (conf/refinement/affinity.yaml ``pseudo_masks``)."""

    folder = MASK_FOLDER

    def __init__(self, radius: int, beta: float, exp_times: int, alpha: float, batch_size: int = 8,
                 inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(inputs)
        if alpha <= 0:
            raise ValueError(f"the AffinityNet walk needs a background power alpha > 0, got {alpha}")
        self.radius, self.beta, self.exp_times, self.alpha = radius, beta, exp_times, alpha
        self.batch_size = batch_size

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from src.inference.cams import CAMSeedStage
        from src.stages.affinity import load_affinity

        net = load_affinity(ctx)
        folder = ctx.out_dir / self.folder
        module = AffinityRandomWalk(net, ctx.input("cams").file(CAMSeedStage.folder), self.radius, self.beta,
                                    self.exp_times, self.alpha)
        ids = pending_ids(ctx.data.layout.ids(ctx.data.train_split), folder, ".png")
        dataset = WSSSDataset(ctx.data.layout, ctx.data.train_split, ctx.eval_transform(), ids=ids)
        run_predict(ctx, module, dataset, lambda i, m: save_label_png_atomic(folder / f"{i}.png", m),
                    self.batch_size)
        return mask_metrics(ctx, folder)
