"""ESOL's shrinkage stage (specs/esol.md section 5): a second deformable head on the clipped expansion
feature, starting from the finished expansion net (the ``model`` input), narrows the expanded CAM.

Loss (:class:`ShrinkageModule`): L = L_cls + lambda_a L_area, with everything up to the clip frozen (run
without a graph). The sampler gets the gradient of both terms; the classifier (and W2 under
``shrink_kernel=cls_only``) only that of L_cls: the area term reads the CAM through the classifier's
weights detached (and, when W2 trains, through a second DCN pass with W2 detached), so the classifier
cannot satisfy the area term by itself. Seeds: the shrinkage CAM (``ESOLNet.seed_cams``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from src.models.conta import ContextPrior
from src.models.esol import ESOLNet
from src.ops.losses import AREA_NORMALISATIONS, area_loss
from src.stages.core import Artifact, ParameterError, check_number, container
from src.stages.expansion import ESOLModule, ESOLStage
from src.stages.training import read_checkpoint
from src.utils.config import check_choice


class ShrinkageModule(ESOLModule):
    """L_cls + ``lambda_a`` x the area term (``area_normalise``: max | none, src.ops.losses.area_loss)."""

    def __init__(self, net: ESOLNet, optim: Mapping[str, Any], max_steps: int, lambda_a: float, area_normalise: str,
                 context: ContextPrior | None = None, attention_lr_mult: float = 0.0, val_split: str = "val") -> None:
        super().__init__(net, optim, max_steps, context, attention_lr_mult, val_split)
        self.check_options(lambda_a, area_normalise)
        self.lambda_a, self.area_normalise = float(lambda_a), area_normalise

    @staticmethod
    def check_options(lambda_a: float, area_normalise: str) -> None:
        check_number("module.lambda_a", lambda_a, 0.0)
        check_choice("module.area_normalise", area_normalise, AREA_NORMALISATIONS, ParameterError)

    def step_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        net: ESOLNet = self.net
        labels, prior = batch["label"], self.prior(batch)
        clipped = net.clipped(batch["image"], prior)
        offsets = net.shrink_offsets(clipped)
        self.track_offsets(offsets)
        shrunk = net.shrink(clipped, offsets)
        head = net.head_classifier
        cls = F.multilabel_soft_margin_loss(net.logits(shrunk, prior, head).float(), labels)
        for_area = net.shrink(clipped, offsets, frozen_kernel=True) if net.trains_w2 else shrunk
        area = area_loss(net.class_maps(for_area, prior, head, frozen=True), labels, self.area_normalise)
        return {"cls": cls, "area": area, "loss": cls + self.lambda_a * area}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.step_losses(batch)
        return self.log_losses(terms, ("cls", "area"), "loss", batch["image"].shape[0])


class ShrinkageStage(ESOLStage):
    """The shrinkage stage: ``model`` = the expansion artifact; its net config must be this one's with
    ``stage: expansion``."""

    net_stage = "shrinkage"

    def check_module(self, lambda_a: float, area_normalise: str) -> None:
        ShrinkageModule.check_options(lambda_a, area_normalise)

    def start(self, net: ESOLNet, prior: ContextPrior | None, model: Artifact) -> None:
        self.check_source(model, {**container(self.net_cfg), "stage": "expansion"}, "ESOL expansion net")
        state = read_checkpoint(model.checkpoint, f"{model.stage} network")
        net.load_expansion({k[4:]: v for k, v in state.items() if k.startswith("net.")},
                           f"checkpoint {model.checkpoint} ({model.stage} network)")
        self.load_context(prior, model)
