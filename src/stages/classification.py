"""Stage 1 of every baseline: train the multi-label classifier whose CAMs become the seeds.

The network is a plain nn.Module from the baseline config (IRNet's CAMNet, SEAM's net...); this
module holds the loss, parameter groups and logging. With CONTA (rounds >= 1) it also holds the
context module and feeds the prior M to the net.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score

from src.data.datamodule import WSSSDataModule
from src.data.datasets import WSSSDataset
from src.data.transforms import build_transform
from src.pipeline.artifacts import Artifact
from src.pipeline.stage import Stage, StageContext, fit_resumable, load_state
from src.stages.base import PolySGDModule, steps_per_epoch
from src.stages.context import ContextPrior, build_context
from src.stages.optim import ParamGroup
from src.utils.logging import get_logger

log = get_logger(__name__)


class ClassificationModule(PolySGDModule):
    def __init__(self, net: torch.nn.Module, optim: Mapping[str, Any], max_steps: int,
                 context: ContextPrior | None = None, attention_lr_mult: float = 10.0) -> None:
        super().__init__(net, optim, max_steps)
        self.context, self.attention_lr_mult = context, attention_lr_mult
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
        self.log("val/map", self.val_map.compute(), prog_bar=True)
        self.log("val/f1", self.val_f1.compute())
        self.val_map.reset()
        self.val_f1.reset()

    def param_groups(self) -> list[ParamGroup]:
        groups = super().param_groups()
        if self.context is not None:
            groups.append(ParamGroup(self.context.parameters(), self.attention_lr_mult, name="conta_attention"))
        return groups


def build_classifier(spec: DictConfig, context: Artifact | None, conta_cfg: DictConfig | None
                     ) -> tuple[torch.nn.Module, ContextPrior | None, Any]:
    """The classifier of a baseline config, with CONTA's context enabled when ``context`` is given.

    Returns (net, context module or None, per-image context-mask reader or None)."""
    net = instantiate(spec.net)
    if context is None:
        return net, None, None
    net.enable_context(str(conta_cfg.context.inject))
    prior, masks = build_context(conta_cfg.context, context)
    return net, prior, masks


def load_classifier(ctx: StageContext, role: str = "model", stage: str = "classification"
                    ) -> tuple[torch.nn.Module, ContextPrior | None, Any]:
    """Rebuild the trained classifier of this round from its checkpoint (for seeds)."""
    context = ctx.inputs.get("context")
    net, prior, masks = build_classifier(ctx.spec_of(stage), context, ctx.cfg.get("conta"))
    checkpoint = ctx.input(role).checkpoint
    load_state(net, checkpoint, "net.", f"{stage} network")
    if prior is not None:
        load_state(prior, checkpoint, "context.", f"{stage} context module")
    return net, prior, masks


def warm_start(net: torch.nn.Module, source: Artifact, stage_name: str) -> None:
    """CONTA's warm start: copy the matching weights of the previous round's classifier or the
    segmentation model's backbone (specs/conta.md ``conta.warm_start``)."""
    state = torch.load(source.checkpoint, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    if stage_name == "segmentation":
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


class ClassificationStage(Stage):
    uses_context = True

    def __init__(self, net: DictConfig, epochs: int, batch_size: int, optim: DictConfig,
                 augment: list, crop_size: int | None = None, inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(inputs)
        self.net_cfg, self.epochs, self.batch_size = net, epochs, batch_size
        self.optim, self.augment, self.crop_size = optim, augment, crop_size

    def make_module(self, net: torch.nn.Module, optim: Mapping[str, Any], max_steps: int,
                    context: ContextPrior | None, attention_lr_mult: float) -> pl.LightningModule:
        """The training module of this classifier (a hook: SEAM's stage trains its siamese pair instead)."""
        return ClassificationModule(net, optim, max_steps, context, attention_lr_mult)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        spec = DictConfig({"net": self.net_cfg})
        net, prior, masks = build_classifier(spec, ctx.inputs.get("context"), ctx.cfg.get("conta"))
        if "warm_start" in ctx.inputs:
            source = ctx.inputs["warm_start"]
            warm_start(net, source, source.stage)
        extras = [masks] if masks is not None else []
        data = ctx.data
        train = WSSSDataset(data.layout, data.train_split, build_transform(self.augment), extras=extras,
                            seed=ctx.seed)
        val = WSSSDataset(data.layout, data.val_split, ctx.eval_transform(), extras=extras)
        trainer = ctx.make_trainer(max_epochs=self.epochs, checkpointing=True)
        max_steps = steps_per_epoch(len(train), self.batch_size, trainer.world_size) * self.epochs
        attention_lr = float(OmegaConf.select(ctx.cfg, "conta.context.attention_lr_mult", default=10.0))
        module = self.make_module(net, OmegaConf.to_container(self.optim, resolve=True), max_steps, prior,
                                  attention_lr)
        dm = WSSSDataModule(train, val, batch_size=self.batch_size, seed=ctx.seed, **ctx.loader_kwargs())
        fit_resumable(trainer, module, dm, ctx.out_dir)
        if "val/map" not in trainer.callback_metrics:  # resumed after the last epoch: score once more
            trainer.validate(module, datamodule=dm, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        return {"summary": {k: v for k, v in metrics.items() if k.startswith("val/")},
                "final": metrics, "max_steps": max_steps}
