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
  [background, classes]. ``pairs``: ``label_region`` keeps, as the reference's dense affinity matrix, only
  the pairs whose source lies in PSA's label region (:func:`~src.ops.random_walk.label_region_mask`);
  ``all``: every in-image pair within the radius.

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
from src.ops.random_walk import (
    WALK_PAIRS,
    label_region_mask,
    pooled_scores,
    propagate_cams,
    random_walk,
    walk_labels,
    walked_labels,
    walked_scores,
)
from src.stages.core import (
    AUTO,
    CAMS,
    MASKS,
    WALKED,
    StageContext,
    alpha_for_threshold,
    auto_threshold,
    check_number,
    load_seeds,
)
from src.stages.predict import (
    PerImagePredictStage,
    mask_metrics,
    same_size_groups,
    sweep_scores,
    thresholds_from,
    write_label_png,
)
from src.stages.training import load_trained_net
from src.utils.config import check_choice
from src.utils.io import load_npz, save_npz_atomic


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
            for sample, s, wk, edge in zip(group, seeds, walked, edges):
                n = len(s["keys"])
                mask = walked_labels(wk[:n], s["keys"], size, self.bg_threshold, self.net.output_stride)
                out.append((sample["id"], {"mask": mask, "walked": {
                    "keys": s["keys"], "cam": wk[:n].float().cpu().numpy().astype(np.float16),
                    "edge": edge.float().cpu().numpy().astype(np.float16)}}))
        return out


class AffinityRandomWalk(pl.LightningModule):
    def __init__(self, net: torch.nn.Module, cam_dir: Path, radius: int, beta: float, exp_times: int,
                 alpha: float, pairs: str = "all") -> None:
        super().__init__()
        self.net, self.cam_dir = net, cam_dir
        self.radius, self.beta, self.exp_times, self.alpha = radius, beta, exp_times, alpha
        self.pairs = pairs

    def walk(self, images: torch.Tensor, seeds: list[dict[str, np.ndarray]]) -> torch.Tensor:
        """Walked [bg, fg...] scores (B, 1 + max n, h, w) on the stride grid of same-size images (B, 3, H, W)."""
        stride = self.net.output_stride
        h, w = images.shape[-2:]
        padded = (-(-h // stride) * stride, -(-w // stride) * stride)
        x = F.pad(images, (0, padded[1] - w, 0, padded[0] - h))
        affinity = pair_affinity(self.net(x).float(), self.radius)  # fp32 under autocast, as the loss
        if self.pairs == "label_region":
            affinity = affinity * label_region_mask(*affinity.shape[-2:], self.radius, affinity.device)
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
    """IRNet's walk over IRN's boundaries (conf/refinement/irn.yaml ``pseudo_masks``).

    Besides the masks it keeps each image's walked scores and boundary map (``walked/<id>.npz``, stride 4),
    and scores the walked scores like seeds: at ``bg_threshold`` (the masks) and at the best background
    threshold of ``sweep_thresholds`` on the train images with ground truth (the protocol's best, beside the
    configured one). ``bg_threshold: auto`` = the seeds' best threshold + ``auto_offset``."""

    def __init__(self, crop_size: int, radius: int, beta: float, exp_times: int, bg_threshold: float | str,
                 auto_offset: float, sweep_thresholds: Mapping[str, float], batch_size: int,
                 inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(radius, beta, exp_times, batch_size, inputs)
        if bg_threshold != AUTO:
            check_number("bg_threshold", bg_threshold, 0.0, 1.0)
        self.crop_size, self.bg_threshold, self.auto_offset = crop_size, bg_threshold, auto_offset
        self.sweep = dict(sweep_thresholds)

    def build_module(self, ctx: StageContext) -> pl.LightningModule:
        self._threshold = auto_threshold(self.bg_threshold, self.auto_offset, ctx.input("cams"), "bg_threshold")
        net = load_trained_net(ctx.input("model"))
        self._stride = net.output_stride
        return IRNRandomWalk(net, ctx.input("cams").file(CAMS), self.crop_size, self.radius, self.beta,
                             self.exp_times, self._threshold)

    def write(self, path: Path, payload: dict) -> None:
        save_npz_atomic(path.parent.parent / WALKED / f"{path.stem}.npz", **payload["walked"])
        write_label_png(path, payload["mask"])  # last: a written mask marks the image done

    def score(self, ctx: StageContext, folder: Path) -> dict[str, Any]:
        res = mask_metrics(ctx.data, folder)
        res["bg_threshold"] = self._threshold
        ids = ctx.data.seed_eval_ids()
        if not ids:
            return res
        walked = folder.parent / WALKED

        def read(image_id: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
            arrays = load_npz(walked / f"{image_id}.npz")
            up = walked_scores(torch.from_numpy(arrays["cam"].astype(np.float32)), shape, self._stride)
            return up.numpy(), arrays["keys"]

        sweep = sweep_scores(ctx.data, ids, read, thresholds_from(self.sweep), self._threshold)
        split = ctx.data.seed_metric_split
        res["threshold_sweep"] = {k: sweep[k] for k in ("best_threshold", "miou_per_threshold")}
        res["best"] = sweep["best"]
        res["summary"].update({f"{split}/mask_best_miou": sweep["best"]["miou"],
                               f"{split}/mask_best_threshold": sweep["best_threshold"]})
        return res


class AffinityRandomWalkStage(RandomWalkStage):
    """AffinityNet's walk (conf/refinement/affinity.yaml ``pseudo_masks``)."""

    def __init__(self, radius: int, beta: float, exp_times: int, alpha: float | str, auto_offset: float, pairs: str,
                 batch_size: int, inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(radius, beta, exp_times, batch_size, inputs)
        if alpha != AUTO and alpha <= 0:
            raise ValueError(f"the AffinityNet walk needs a background power alpha > 0, got {alpha}")
        self.auto_offset = auto_offset
        check_choice("pairs", pairs, WALK_PAIRS)
        self.alpha, self.pairs = alpha, pairs

    def build_module(self, ctx: StageContext) -> pl.LightningModule:
        self._alpha = (self.alpha if self.alpha != AUTO else
                       alpha_for_threshold(auto_threshold(AUTO, self.auto_offset, ctx.input("cams"), "alpha")))
        return AffinityRandomWalk(load_trained_net(ctx.input("model")), ctx.input("cams").file(CAMS),
                                  self.radius, self.beta, self.exp_times, self._alpha, self.pairs)

    def score(self, ctx: StageContext, folder: Path) -> dict[str, Any]:
        return {**super().score(ctx, folder), "alpha": self._alpha}
