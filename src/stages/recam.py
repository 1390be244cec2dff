"""ReCAM's fine-tuning stage (../shared/specs/debias.md; src/models/recam.py): the round's trained classifier
(``model``: the classification artifact) wrapped with W_sce and trained with BCE + ``loss_weight`` x L_sce
on the baseline's augmentation. The seeds of a ``debias=recam`` run read this stage's network instead of
the classifier (conf/debias/recam.yaml ``redirect``), whose ``seed_cams`` are ReCAM's maps.

Its manifest provides the wrapper's network config (ReCAM around the classifier's own ``net`` from the
classification manifest), so :func:`~src.stages.classification.load_classifier` rebuilds it like any
classifier. In CONTA rounds (``context`` from round r - 1) the classifier keeps its context module, frozen
at the weights the classification stage trained (ReCAM fine-tunes the classifier, not CONTA's attention).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig

from src.models.conta import ContextPrior
from src.models.recam import ReCAM, sce_loss
from src.stages.classification import ClassificationModule, load_classifier
from src.stages.core import CHECKPOINT, StageContext, check_number, container
from src.stages.training import TrainingStage


class ReCAMModule(ClassificationModule):
    """BCE (multi-label soft margin) of the classifier's logits + ``loss_weight`` x L_sce; validation mAP
    as the classification stage's."""

    def __init__(self, net: ReCAM, optim: Mapping[str, Any], max_steps: int, loss_weight: float,
                 context: ContextPrior | None = None, val_split: str = "val") -> None:
        super().__init__(net, optim, max_steps, context, 0.0, val_split)
        self.loss_weight = loss_weight
        if context is not None:
            context.requires_grad_(False)

    def losses(self, image: torch.Tensor, label: torch.Tensor, prior: torch.Tensor | None
               ) -> dict[str, torch.Tensor]:
        logits, feats = self.net.class_features(image, prior)
        bce = F.multilabel_soft_margin_loss(logits.float(), label)
        sce = sce_loss(self.net.sce_logits(feats).float(), label)
        return {"bce": bce, "sce": sce, "loss": bce + self.loss_weight * sce}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.losses(batch["image"], batch["label"], self.prior(batch))
        return self.log_losses(terms, ("bce", "sce"), "loss", batch["image"].shape[0])


class ReCAMStage(TrainingStage):
    """Fine-tunes the ``model`` input's classifier into ReCAM (module docstring). ``net``: the ReCAM wrapper's
    own options (``_target_`` + ``net_lr_mult``); the classifier inside comes from the ``model`` artifact."""

    optional_inputs = frozenset({"context"})

    def __init__(self, net: DictConfig, loss_weight: float, epochs: int, batch_size: int, optim: DictConfig,
                 augment: list, inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(net, epochs, batch_size, optim, augment, inputs)
        check_number("loss_weight", loss_weight, 0.0)
        check_number("net.net_lr_mult", net.get("net_lr_mult"), 0.0)
        self.loss_weight = loss_weight

    def provides(self) -> dict[str, Any]:
        return {"checkpoint": CHECKPOINT}  # ``net`` (ReCAM around the classifier's config) comes with the result

    def run(self, ctx: StageContext) -> dict[str, Any]:
        model = ctx.input("model")
        classifier, prior, masks = load_classifier(model, ctx.optional("context"))
        classifier.train()  # loaded in eval mode; Lightning keeps a module's mode when fitting
        if prior is not None:
            prior.train()
        make: Callable[..., ReCAM] = instantiate(self.net_cfg, _partial_=True)
        net = make(net=classifier)
        data = ctx.data

        def module(max_steps: int) -> pl.LightningModule:
            return ReCAMModule(net, self.optim, max_steps, float(self.loss_weight), prior, data.val_split)

        fitted = self.fit(ctx, module, extras=[masks] if masks is not None else [], validate=True)
        trainer = fitted.trainer
        key = f"{data.val_split}/map"
        if key not in trainer.callback_metrics:  # resumed after the last epoch: score once more
            trainer.validate(fitted.module, datamodule=fitted.datamodule, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        return {"summary": {k: v for k, v in metrics.items() if k.startswith(f"{data.val_split}/")},
                "final": metrics, "max_steps": fitted.max_steps,
                "provides": {"net": {**container(self.net_cfg), "net": model.need("net")},
                             "output_stride": net.output_stride}}
