"""The last stage of every baseline: DeepLab-v2 trained on the round's pseudo-masks (never on ground
truth), then scored on each evaluation split (ground truth used only there).

Predictions on the eval splits are written as PNGs (``predictions/<split>/<id>.png``) and scored from
the files, so a resumed or multi-process run scores exactly the same pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.data.datamodule import WSSSDataModule
from src.data.datasets import WSSSDataset
from src.data.transforms import build_transform
from src.inference.common import pending_ids, run_predict, same_size_groups
from src.inference.crf import crf_refine_probs
from src.inference.scoring import score_label_maps
from src.models.deeplab import msc_forward, msc_loss, predict_probs
from src.pipeline.stage import Stage, StageContext, fit_resumable
from src.stages.base import PolySGDModule, load_trained_net, steps_per_epoch
from src.stages.optim import ParamGroup
from src.utils.dist import global_mean_count
from src.utils.io import save_label_png_atomic

MASK_FOLDER = "masks"  # where every refinement's last step writes the pseudo-masks


class SegmentationModule(PolySGDModule):
    def __init__(self, net: torch.nn.Module, msc_scales: Sequence[float], optim: Mapping[str, Any],
                 max_steps: int, eval_cfg: Mapping[str, Any] | None = None) -> None:
        super().__init__(net, optim, max_steps)
        self.msc_scales = list(msc_scales)
        self.eval_cfg = dict(eval_cfg or {})

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        outputs = msc_forward(self.net, batch["image"], self.msc_scales)
        loss = msc_loss(outputs, batch["mask"], count=global_mean_count)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        e = self.eval_cfg
        scales = list(e.get("scales", [1.0])) if e.get("msc") else [1.0]
        return predict_probs(self.net, images, scales, bool(e.get("flip", False)))

    @torch.no_grad()
    def predict_step(self, batch: list[dict], batch_idx: int) -> list[tuple[str, np.ndarray]]:
        out = []
        crf = self.eval_cfg.get("crf")
        for group in same_size_groups(batch):
            probs = self.probabilities(torch.stack([s["image"] for s in group]).to(self.device))
            for sample, p in zip(group, probs):
                p = p.float().cpu().numpy()
                if crf:
                    p = crf_refine_probs(sample["raw"].numpy(), p, crf)
                out.append((sample["id"], p.argmax(0).astype(np.uint8)))
        return out

    def param_groups(self) -> list[ParamGroup]:
        return self.net.param_groups(self.optim.get("head_lr_mult", 10.0))


def load_segmentation(ctx: StageContext, role: str = "model", stage: str = "segmentation") -> SegmentationModule:
    spec = ctx.spec_of(stage)
    eval_cfg = OmegaConf.to_container(spec.eval, resolve=True) if "eval" in spec else {}
    return SegmentationModule(load_trained_net(ctx, stage, role), list(spec.msc_scales), {}, 1, eval_cfg)


class SegmentationStage(Stage):
    def __init__(self, net: DictConfig, msc_scales: Sequence[float], epochs: int, max_steps: int,
                 batch_size: int, optim: DictConfig, augment: list, eval: DictConfig,
                 inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(inputs)
        self.net_cfg, self.msc_scales = net, list(msc_scales)
        self.epochs, self.max_steps, self.batch_size = epochs, max_steps, batch_size
        self.optim, self.augment = optim, augment
        self.eval_cfg = OmegaConf.to_container(eval, resolve=True)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        net = instantiate(self.net_cfg)
        data = ctx.data
        masks = ctx.input("masks").file(MASK_FOLDER)
        train = WSSSDataset(data.layout, data.train_split, build_transform(self.augment), target=masks,
                            seed=ctx.seed)
        by_epochs = self.epochs is not None and self.epochs > 0
        trainer = ctx.make_trainer(checkpointing=True, limit_val_batches=0,
                                   **({"max_epochs": self.epochs} if by_epochs else
                                      {"max_epochs": -1, "max_steps": self.max_steps}))
        max_steps = (steps_per_epoch(len(train), self.batch_size, trainer.world_size) * self.epochs
                     if by_epochs else self.max_steps)
        module = SegmentationModule(net, self.msc_scales, OmegaConf.to_container(self.optim, resolve=True),
                                    max_steps, self.eval_cfg)
        dm = WSSSDataModule(train, batch_size=self.batch_size, seed=ctx.seed, **ctx.loader_kwargs())
        fit_resumable(trainer, module, dm, ctx.out_dir)
        module.eval()
        results: dict[str, Any] = {"summary": {}, "max_steps": max_steps}
        for split in data.eval_splits:
            folder = ctx.out_dir / "predictions" / split
            ids = pending_ids(data.layout.ids(split), folder, ".png")
            dataset = WSSSDataset(data.layout, split, ctx.eval_transform(), ids=ids,
                                  return_raw=bool(self.eval_cfg.get("crf")))
            run_predict(ctx, module, dataset, lambda i, m, f=folder: save_label_png_atomic(f / f"{i}.png", m),
                        int(self.eval_cfg.get("batch_size", 8)))
            if data.layout.has_masks(split):
                scores = score_label_maps(data.layout, data.layout.ids(split), folder, data.class_names)
                results[split] = scores
                results["summary"][f"{split}/miou"] = scores["miou"]
        return results
