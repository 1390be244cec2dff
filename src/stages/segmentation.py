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
from omegaconf import DictConfig

from src.models.deeplab import msc_forward, predict_probs
from src.ops.crf import crf_refine_probs
from src.ops.losses import LOSS_RESOLUTIONS, msc_loss
from src.ops.optim import ParamGroup
from src.stages.core import MASKS, PREDICTIONS, Artifact, StageContext, check_number, container
from src.stages.predict import predict_to_folder, same_size_groups, score_label_folder, write_label_png
from src.stages.training import PolySGDModule, TrainingStage, load_trained_net
from src.utils.config import check_choice
from src.utils.dist import global_mean_count


class SegmentationModule(PolySGDModule):
    def __init__(self, net: torch.nn.Module, msc_scales: Sequence[float], optim: Mapping[str, Any],
                 max_steps: int, eval_cfg: Mapping[str, Any], loss_at: str = "logits") -> None:
        super().__init__(net, optim, max_steps)
        self.msc_scales, self.loss_at = list(msc_scales), loss_at
        self.eval_cfg = dict(eval_cfg)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        outputs = msc_forward(self.net, batch["image"], self.msc_scales)
        loss = msc_loss(outputs, batch["mask"], count=global_mean_count, at=self.loss_at)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        e = self.eval_cfg
        scales = list(e["scales"]) if e["msc"] else [1.0]
        return predict_probs(self.net, images, scales, bool(e["flip"]))

    @torch.no_grad()
    def predict_step(self, batch: list[dict], batch_idx: int) -> list[tuple[str, np.ndarray]]:
        out = []
        crf = self.eval_cfg["crf"]
        for group in same_size_groups(batch):
            probs = self.probabilities(torch.stack([s["image"] for s in group]).to(self.device))
            for sample, p in zip(group, probs):
                p = p.float().cpu().numpy()
                if crf:
                    p = crf_refine_probs(sample["raw"].cpu().numpy(), p, crf)
                out.append((sample["id"], p.argmax(0).astype(np.uint8)))
        return out

    def param_groups(self) -> list[ParamGroup]:
        o = self.optim
        return self.net.param_groups(o["head_lr_mult"], o["head_bias_lr_mult"], o["head_bias_weight_decay"])


def load_segmentation(artifact: Artifact) -> SegmentationModule:
    """The trained segmentation model of an artifact, with its multi-scale and evaluation settings."""
    return SegmentationModule(load_trained_net(artifact), artifact.need("msc_scales"), {}, 1,
                              artifact.need("eval"))


TRAIN_ON = ("pseudo_masks", "ground_truth")


class SegmentationStage(TrainingStage):
    """Trains DeepLab on the ``masks`` input's pseudo-masks and scores each evaluation split.

    ``train_on=ground_truth`` trains on the train split's ground-truth masks instead: the fully supervised
    upper bound WSSS tables quote beside their numbers (the ceiling of this stage: how far DeepLab itself
    limits the pipeline). It is never the WSSS result."""

    def __init__(self, net: DictConfig, msc_scales: Sequence[float], epochs: int, max_steps: int,
                 batch_size: int, optim: DictConfig, augment: list, eval: DictConfig, train_on: str,
                 loss_at: str, inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(net, epochs, batch_size, optim, augment, inputs, max_steps)
        check_choice("train_on", train_on, TRAIN_ON)
        check_choice("loss_at", loss_at, LOSS_RESOLUTIONS)
        self.train_on, self.loss_at = train_on, loss_at
        self.msc_scales = list(msc_scales)
        self.eval_cfg = container(eval)
        check_number("eval.batch_size", self.eval_cfg["batch_size"], 1, integer=True)

    def provides(self) -> dict[str, Any]:
        return {**super().provides(), "msc_scales": self.msc_scales, "eval": self.eval_cfg}

    def run(self, ctx: StageContext) -> dict[str, Any]:
        net = instantiate(self.net_cfg)
        data = ctx.data
        fitted = self.fit(ctx, lambda max_steps: SegmentationModule(net, self.msc_scales, self.optim, max_steps,
                                                                    self.eval_cfg, self.loss_at),
                          target=ctx.input("masks").file(MASKS) if self.train_on == "pseudo_masks" else "gt")
        module, max_steps = fitted.module, fitted.max_steps
        module.eval()
        results: dict[str, Any] = {"summary": {}, "max_steps": max_steps}
        for split in data.eval_splits:
            folder = ctx.out_dir / PREDICTIONS / split
            predict_to_folder(ctx, module, split, folder, ".png", write_label_png, self.eval_cfg["batch_size"],
                              transform=ctx.eval_transform(), return_raw=bool(self.eval_cfg["crf"]))
            if data.layout.has_masks(split):
                scores = score_label_folder(data, data.layout.ids(split), folder)
                results[split] = scores
                results["summary"][f"{split}/miou"] = scores["miou"]
        return results
