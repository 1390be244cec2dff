"""The last refinement step of every baseline: pseudo-masks ``masks/<id>.png`` by a random walk of the seeds.

* IRNet (specs/irnet.md stage 5, :class:`IRNRandomWalkStage`): boundary map from IRN (image and mirror
  image, zero-padded to the training crop), the stride-4 seeds multiplied by (1 - boundary) and propagated
  2^exp_times steps with the sparse transition (:func:`~src.ops.random_walk.propagate_cams`), upsampled x4,
  divided by the global max, a background plane at ``bg_threshold``, argmax -> class ids.
* AffinityNet (specs/seam.md; PSA/SEAM ``infer_aff.py``, :class:`AffinityRandomWalkStage`): the image
  zero-padded at the bottom/right to a multiple of the net's stride (8); pair affinities within ``radius``
  on the stride-8 grid; the seeds with a background channel (1 - max fg) ** ``alpha``, zero-padded likewise
  and average-pooled stride x stride, walk 2 ** ``exp_times`` steps (SEAM's ``logt``) with A ** ``beta``
  through the same sparse :func:`~src.ops.random_walk.random_walk`; upsampled, cropped, argmax over
  [background, classes]. The reference's dense affinity matrix holds only the pairs whose source lies in
  PSA's label region; here every in-image pair within the radius takes part.

Images of one size are walked as one batch. Both score the masks on the train images with ground truth.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from src.models.affinity import pair_affinity
from src.models.irn import merge_flip_edge, pad_to_crop
from src.ops.pairs import half_plane_offsets
from src.ops.random_walk import pooled_scores, propagate_cams, random_walk, walk_labels, walked_labels
from src.stages.core import CAMS, MASKS, StageContext, check_number, load_seeds
from src.stages.predict import PerImagePredictStage, mask_metrics, same_size_groups
from src.stages.training import load_trained_net


class IRNRandomWalk(pl.LightningModule):
    def __init__(self, net: torch.nn.Module, cam_dir: Path, crop_size: int, radius: int, beta: float,
                 exp_times: int, bg_threshold: float) -> None:
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


class AffinityRandomWalk(pl.LightningModule):
    def __init__(self, net: torch.nn.Module, cam_dir: Path, radius: int, beta: float, exp_times: int,
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


class RandomWalkStage(PerImagePredictStage):
    """Pseudo-masks from the ``cams`` input's seeds walked over the ``model`` input's trained network."""

    folder = MASKS

    def __init__(self, radius: int, beta: float, exp_times: int, batch_size: int,
                 inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(batch_size, inputs)
        check_number("radius", radius, 2, integer=True)
        check_number("beta", beta, 0)
        check_number("exp_times", exp_times, 0, integer=True)
        self.radius, self.beta, self.exp_times = radius, beta, exp_times

    def score(self, ctx: StageContext, folder: Path) -> dict[str, Any]:
        return mask_metrics(ctx.data, folder)


class IRNRandomWalkStage(RandomWalkStage):
    """IRNet's walk over IRN's boundaries (conf/refinement/irn.yaml ``pseudo_masks``)."""

    def __init__(self, crop_size: int, radius: int, beta: float, exp_times: int, bg_threshold: float,
                 batch_size: int, inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(radius, beta, exp_times, batch_size, inputs)
        check_number("bg_threshold", bg_threshold, 0.0, 1.0)
        self.crop_size, self.bg_threshold = crop_size, bg_threshold

    def build_module(self, ctx: StageContext) -> pl.LightningModule:
        return IRNRandomWalk(load_trained_net(ctx.input("model")), ctx.input("cams").file(CAMS), self.crop_size,
                             self.radius, self.beta, self.exp_times, self.bg_threshold)


class AffinityRandomWalkStage(RandomWalkStage):
    """AffinityNet's walk (conf/refinement/affinity.yaml ``pseudo_masks``)."""

    def __init__(self, radius: int, beta: float, exp_times: int, alpha: float, batch_size: int,
                 inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(radius, beta, exp_times, batch_size, inputs)
        if alpha <= 0:
            raise ValueError(f"the AffinityNet walk needs a background power alpha > 0, got {alpha}")
        self.alpha = alpha

    def build_module(self, ctx: StageContext) -> pl.LightningModule:
        return AffinityRandomWalk(load_trained_net(ctx.input("model")), ctx.input("cams").file(CAMS),
                                  self.radius, self.beta, self.exp_times, self.alpha)
