"""IRNet stage 5: pseudo-masks by a random walk over IRN's class boundaries (specs/irnet.md).

Per image: boundary map from IRN (image and mirror image, zero-padded to the training crop), the
stride-4 seeds multiplied by (1 - boundary) and propagated 2^exp_times steps with the sparse
transition (src/inference/random_walk.py), upsampled x4, divided by the global max, a background
plane at ``bg_threshold``, argmax -> class ids -> PNG. Images of one size are walked as one batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from src.data.datasets import WSSSDataset
from src.inference.cams import load_seeds
from src.inference.common import pending_ids, run_predict, same_size_groups
from src.inference.random_walk import propagate_cams
from src.inference.scoring import score_label_maps
from src.models.irn import merge_flip_edge, pad_to_crop
from src.pipeline.stage import Stage, StageContext
from src.utils.io import save_label_png_atomic


def walked_labels(walked: torch.Tensor, keys: np.ndarray, size: tuple[int, int], bg_threshold: float,
                  scale: int) -> np.ndarray:
    """Walked stride-4 scores (n, h, w) of classes ``keys`` -> label map (H, W) uint8."""
    h, w = size
    if walked.shape[0] == 0:
        return np.zeros(size, np.uint8)
    up = F.interpolate(walked[None], scale_factor=scale, mode="bilinear", align_corners=False)[0, :, :h, :w]
    peak = up.max()
    if not peak > 0:
        return np.zeros(size, np.uint8)
    up = up / peak
    scores = torch.cat([torch.full_like(up[:1], bg_threshold), up])
    pred = scores.argmax(0).cpu().numpy()
    return np.concatenate([[0], keys]).astype(np.uint8)[pred]


class IRNRandomWalk(pl.LightningModule):
    def __init__(self, net: torch.nn.Module, cam_dir, crop_size: int, radius: int, beta: float, exp_times: int,
                 bg_threshold: float) -> None:
        super().__init__()
        self.net, self.cam_dir, self.crop_size = net, cam_dir, crop_size
        self.radius, self.beta, self.exp_times, self.bg_threshold = radius, beta, exp_times, bg_threshold

    def edges(self, images: torch.Tensor) -> torch.Tensor:
        """Boundary maps (B, h, w) of same-size images, each merged with its mirror image."""
        b, _, h, w = images.shape
        canvas = max(self.crop_size, -(-h // 16) * 16), max(self.crop_size, -(-w // 16) * 16)
        batch = pad_to_crop(torch.cat([images, images.flip(-1)]), canvas)
        edge_logits, displacement = self.net(batch)
        return torch.stack([merge_flip_edge(edge_logits[[i, b + i]], displacement[[i, b + i]], (h, w),
                                            self.net.output_stride)[0][0] for i in range(b)])

    @torch.no_grad()
    def predict_step(self, batch: list[dict], batch_idx: int) -> list[tuple[str, np.ndarray]]:
        out = []
        for group in same_size_groups(batch):
            images = torch.stack([s["image"] for s in group]).to(self.device)
            edges = self.edges(images)
            seeds = [load_seeds(self.cam_dir, s["id"]) for s in group]
            n_max = max(1, max(len(s["keys"]) for s in seeds))
            cams = torch.zeros(len(group), n_max, *edges.shape[-2:], device=self.device)
            for i, s in enumerate(seeds):
                cams[i, : len(s["keys"])] = torch.from_numpy(s["cam"].astype(np.float32)).to(self.device)
            walked = propagate_cams(cams, edges, self.radius, self.beta, self.exp_times)
            size = tuple(images.shape[-2:])
            for sample, s, wk in zip(group, seeds, walked):
                n = len(s["keys"])
                out.append((sample["id"], walked_labels(wk[:n], s["keys"], size, self.bg_threshold,
                                                        self.net.output_stride)))
        return out


class IRNRandomWalkStage(Stage):
    folder = "masks"

    def __init__(self, crop_size: int, radius: int, beta: float, exp_times: int, bg_threshold: float,
                 batch_size: int = 8, inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(inputs)
        self.crop_size, self.radius, self.beta, self.exp_times = crop_size, radius, beta, exp_times
        self.bg_threshold, self.batch_size = bg_threshold, batch_size

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from src.inference.cams import CAMSeedStage
        from src.stages.irn import load_irn

        net = load_irn(ctx)
        folder = ctx.out_dir / self.folder
        module = IRNRandomWalk(net, ctx.input("cams").file(CAMSeedStage.folder), self.crop_size, self.radius,
                               self.beta, self.exp_times, self.bg_threshold)
        ids = pending_ids(ctx.data.layout.ids(ctx.data.train_split), folder, ".png")
        dataset = WSSSDataset(ctx.data.layout, ctx.data.train_split, ctx.eval_transform(), ids=ids)
        run_predict(ctx, module, dataset, lambda i, m: save_label_png_atomic(folder / f"{i}.png", m),
                    self.batch_size)
        return mask_metrics(ctx, folder)


def mask_metrics(ctx: StageContext, folder) -> dict[str, Any]:
    """Pseudo-mask quality on the scored train images (mIoU, precision, recall, per class)."""
    ids = ctx.data.seed_eval_ids()
    if not ids:
        return {"summary": {}, "note": "no ground truth on the train split: pseudo-masks not scored"}
    res = score_label_maps(ctx.data.layout, ids, folder, ctx.data.class_names)
    res["summary"] = {"train/mask_miou": res["miou"], "train/mask_precision": res["mean_precision"],
                      "train/mask_recall": res["mean_recall"]}
    return res
