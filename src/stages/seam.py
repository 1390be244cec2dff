"""SEAM's stage 1 (specs/seam.md): the ResNet-38d SEAM net trained as a siamese pair.

Each step runs the net on the training crop and on the same crop rescaled by ``scale`` (0.3) and
back-propagates :func:`~src.models.seam.seam_step_losses` (classification on both branches, L_ER, L_ECR,
min-pool background term). Everything else is IRNet's classification stage, reused: the data, the
trainer, checkpointing, validation mAP/F1, the parameter groups of the net and, with CONTA, the context
module, whose prior M joins BOTH branches (the net's ``ContextInjection`` resizes M to each feature map).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from src.models.seam import ECR_TOPK, LOSS_WEIGHTS, MIN_POOL_FRACTION, SCALE, rescale, seam_step_losses
from src.stages.classification import ClassificationModule, ClassificationStage
from src.stages.context import ContextPrior

LOGGED_TERMS = ("cls", "min_pool", "er", "ecr")


class SEAMClassificationModule(ClassificationModule):
    """ClassificationModule whose training step is SEAM's siamese step; its class scores (validation
    mAP/F1) are the training ones: the global average of the foreground CAM upsampled to the input."""

    def __init__(self, net: torch.nn.Module, optim: Mapping[str, Any], max_steps: int,
                 context: ContextPrior | None = None, attention_lr_mult: float = 10.0, scale: float = SCALE,
                 ecr_topk: float = ECR_TOPK, min_pool_fraction: float = MIN_POOL_FRACTION,
                 loss_weights: Mapping[str, float] = LOSS_WEIGHTS) -> None:
        super().__init__(net, optim, max_steps, context, attention_lr_mult)
        self.scale, self.ecr_topk, self.min_pool_fraction = scale, ecr_topk, min_pool_fraction
        self.loss_weights = dict(loss_weights)

    def forward(self, image: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        prior = None if self.context is None else self.context(context_mask)
        cam, _ = self.net(image, prior)
        return cam[:, 1:].mean(dim=(2, 3))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image, prior = batch["image"], self.prior(batch)
        cam1, cam_rv1 = self.net(image, prior)
        cam2, cam_rv2 = self.net(rescale(image, self.scale), prior)
        # the loss terms in fp32 under a bf16/fp16 autocast too (1e-5 epsilons of the normalisations)
        terms = seam_step_losses(cam1.float(), cam_rv1.float(), cam2.float(), cam_rv2.float(), batch["label"],
                                 self.scale, self.ecr_topk, self.min_pool_fraction, self.loss_weights)
        n = image.shape[0]
        for key in LOGGED_TERMS:
            self.log(f"train/{key}", terms[key], batch_size=n)
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=n)
        return terms["loss"]


class SEAMClassificationStage(ClassificationStage):
    """IRNet's classification stage with SEAM's training module (conf/classification/seam.yaml)."""

    uses_context = True

    def __init__(self, net: DictConfig, epochs: int, batch_size: int, optim: DictConfig, augment: list,
                 crop_size: int | None = None, scale: float = SCALE, ecr_topk: float = ECR_TOPK,
                 min_pool_fraction: float = MIN_POOL_FRACTION, loss_weights: Mapping[str, float] = LOSS_WEIGHTS,
                 inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(net, epochs, batch_size, optim, augment, crop_size, inputs)
        self.scale, self.ecr_topk, self.min_pool_fraction = scale, ecr_topk, min_pool_fraction
        self.loss_weights = dict(loss_weights)

    def make_module(self, net: torch.nn.Module, optim: Mapping[str, Any], max_steps: int,
                    context: ContextPrior | None, attention_lr_mult: float) -> pl.LightningModule:
        return SEAMClassificationModule(net, optim, max_steps, context, attention_lr_mult, self.scale,
                                        self.ecr_topk, self.min_pool_fraction, self.loss_weights)
