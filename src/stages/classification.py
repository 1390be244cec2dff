"""Stage 1 of every baseline: train the multi-label classifier whose CAMs become the seeds.

The network is a plain nn.Module from the baseline config (IRNet's CAMNet, SEAM's net...); the training
module (``module``: :class:`ClassificationModule`, or SEAM's siamese :class:`SEAMClassificationModule`)
holds the loss, parameter groups and logging. In rounds where a method feeds it from round r-1 it also
takes CONTA's confounder set (``context``: the context module joins the net and the prior M is fed to it)
and a warm start (``warm_start``: the previous classifier or segmentation backbone), and CDA's instance bank
(``instances``: its instances are pasted into a doubled training set, src/data/paste.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score

from src.models.conta import ContextPrior
from src.ops.losses import rescale, seam_step_losses
from src.ops.optim import ParamGroup
from src.stages.confounder_set import ContextMasks, context_of
from src.stages.core import Artifact, StageContext, check_number
from src.stages.instance_bank import pasting
from src.stages.training import (
    PolySGDModule,
    TrainingStage,
    build_net,
    load_state,
    read_checkpoint,
)
from src.utils.logging import get_logger

log = get_logger(__name__)


class ClassificationModule(PolySGDModule):
    """Multi-label soft margin on the net's logits; validation mAP / F1 logged as ``<val_split>/map``."""

    def __init__(self, net: torch.nn.Module, optim: Mapping[str, Any], max_steps: int,
                 context: ContextPrior | None = None, attention_lr_mult: float = 0.0,
                 val_split: str = "val") -> None:
        super().__init__(net, optim, max_steps)
        self.context, self.attention_lr_mult, self.val_split = context, attention_lr_mult, val_split
        k = net.num_classes
        self.val_map = MultilabelAveragePrecision(num_labels=k, average="macro")
        self.val_f1 = MultilabelF1Score(num_labels=k, threshold=0.5, average="macro")

    def prior(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        if self.context is None:
            return None
        return self.context(batch["context_mask"].to(self.device))

    def forward(self, image: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        prior = None if self.context is None else self.context(context_mask)
        return self.net(image, prior)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.net(batch["image"], self.prior(batch))
        loss = F.multilabel_soft_margin_loss(logits.float(), batch["label"])  # fp32 under mixed precision
        self.log("train/loss", loss, prog_bar=True, batch_size=logits.shape[0])
        return loss

    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        for sample in batch:
            mask = sample.get("context_mask")
            logits = self(sample["image"][None].to(self.device),
                          None if mask is None else mask[None].to(self.device))
            target = sample["label"][None].to(self.device).long()
            self.val_map.update(torch.sigmoid(logits), target)
            self.val_f1.update(torch.sigmoid(logits), target)

    def on_validation_epoch_end(self) -> None:
        self.log(f"{self.val_split}/map", self.val_map.compute(), prog_bar=True)
        self.log(f"{self.val_split}/f1", self.val_f1.compute())
        self.val_map.reset()
        self.val_f1.reset()

    def param_groups(self) -> list[ParamGroup]:
        groups = super().param_groups()
        if self.context is not None:
            groups.append(ParamGroup(self.context.parameters(), self.attention_lr_mult, name="conta_attention"))
        return groups


SEAM_LOGGED_TERMS = ("cls", "min_pool", "er", "ecr")


class SEAMClassificationModule(ClassificationModule):
    """SEAM's siamese step (specs/seam.md): the net on the crop and on the crop rescaled by ``scale``, with
    :func:`~src.ops.losses.seam_step_losses` (cls on both branches, L_ER, L_ECR, min-pool background term).
    CONTA's prior M joins BOTH branches (the net's ``ContextInjection`` resizes M to each feature map).
    Its class scores (validation mAP/F1) are the training ones: the global average of the foreground CAM
    upsampled to the input."""

    def __init__(self, net: torch.nn.Module, optim: Mapping[str, Any], max_steps: int, scale: float,
                 ecr_topk: float, min_pool_fraction: float, loss_weights: Mapping[str, float],
                 context: ContextPrior | None = None, attention_lr_mult: float = 0.0,
                 val_split: str = "val") -> None:
        super().__init__(net, optim, max_steps, context, attention_lr_mult, val_split)
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
        return self.log_losses(terms, SEAM_LOGGED_TERMS, "loss", image.shape[0])


def with_context(net: torch.nn.Module, context: Artifact | None
                 ) -> tuple[ContextPrior | None, ContextMasks | None, dict[str, Any]]:
    """Enable CONTA's context on ``net`` when a confounder-set artifact is given; returns (context module,
    per-image mask reader, context options), or (None, None, {}) without one."""
    if context is None:
        return None, None, {}
    net.enable_context(str(context.need("context")["inject"]))  # before the context module: the RNG order
    prior, masks, options = context_of(context)                   # of the initialisations is part of a result
    return prior, masks, options


def load_classifier(model: Artifact, context: Artifact | None
                    ) -> tuple[torch.nn.Module, ContextPrior | None, ContextMasks | None]:
    """The trained classifier of a classification artifact (with its context module when the round used
    CONTA), in eval mode: (net, context module or None, per-image context-mask reader or None)."""
    net = build_net(model)
    prior, masks, _ = with_context(net, context)
    load_state(net, model.checkpoint, "net.", f"{model.stage} network")
    if prior is not None:
        load_state(prior, model.checkpoint, "context.", f"{model.stage} context module")
        prior.eval()
    return net.eval(), prior, masks


def warm_start(net: torch.nn.Module, source: Artifact) -> None:
    """CONTA's warm start: copy the matching weights of the previous round's classifier or the
    segmentation model's backbone (specs/conta.md ``conta.warm_start``)."""
    state = read_checkpoint(source.checkpoint, f"warm start from {source.stage}")
    if source.stage == "segmentation":
        prefix, target, what = "net.backbone.", net.backbone, "segmentation backbone"
    else:
        prefix, target, what = "net.", net, "previous classifier"
    own = target.state_dict()
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    usable = {k: v for k, v in sub.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(usable))
    if not usable:
        raise ValueError(f"conta.warm_start: {source.checkpoint} has no weights that fit the classifier ({what})")
    target.load_state_dict({**own, **usable})
    log.info(f"warm start from the {what}: {len(usable)} tensors"
             + (f"; kept the fresh init for {len(skipped)} ({', '.join(skipped[:4])}...)" if skipped else ""))


class ClassificationStage(TrainingStage):
    """Trains ``net`` with ``module`` (a partial LightningModule config); provides the net, its output stride
    and the feature-map size at the training crop (CONTA's confounder set has that size)."""

    optional_inputs = frozenset({"context", "warm_start", "instances"})

    def __init__(self, net: DictConfig, module: DictConfig, epochs: int, batch_size: int, optim: DictConfig,
                 augment: list, crop_size: int, inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(net, epochs, batch_size, optim, augment, inputs)
        check_number("crop_size", crop_size, 1, integer=True)
        self.module_cfg, self.crop_size = module, crop_size

    def provides(self) -> dict[str, Any]:
        return {**super().provides(), "crop_size": self.crop_size}

    def make_module(self, net: torch.nn.Module, max_steps: int, context: ContextPrior | None,
                    options: Mapping[str, Any], val_split: str) -> pl.LightningModule:
        make: Callable[..., pl.LightningModule] = instantiate(self.module_cfg, _partial_=True)
        return make(net=net, optim=self.optim, max_steps=max_steps, context=context,
                    attention_lr_mult=float(options.get("attention_lr_mult", 0.0)), val_split=val_split)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        net = instantiate(self.net_cfg)
        prior, masks, options = with_context(net, ctx.optional("context"))
        if ctx.optional("warm_start") is not None:
            warm_start(net, ctx.input("warm_start"))
        data = ctx.data
        instances = ctx.optional("instances")  # CDA: paste the previous round's instances into the training set
        fitted = self.fit(ctx, lambda max_steps: self.make_module(net, max_steps, prior, options, data.val_split),
                          extras=[masks] if masks is not None else [], validate=True,
                          wrap_train=None if instances is None else pasting(instances, ctx.seed))
        trainer, max_steps = fitted.trainer, fitted.max_steps
        key = f"{data.val_split}/map"
        if key not in trainer.callback_metrics:  # resumed after the last epoch: score once more
            trainer.validate(fitted.module, datamodule=fitted.datamodule, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        side = -(-self.crop_size // net.output_stride)
        return {"summary": {k: v for k, v in metrics.items() if k.startswith(f"{data.val_split}/")},
                "final": metrics, "max_steps": max_steps,
                "provides": {"output_stride": net.output_stride, "feature_size": [side, side]}}
