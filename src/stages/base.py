"""What every training stage shares: SGD over the network's parameter groups with the poly schedule,
rebuilding a trained network from its checkpoint, and fitting a refiner on a stage's label maps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.data.datamodule import WSSSDataModule
from src.data.datasets import WSSSDataset
from src.data.transforms import build_transform
from src.pipeline.stage import Stage, StageContext, fit_resumable, load_state
from src.stages.optim import ParamGroup, build_sgd, poly_scheduler


def steps_per_epoch(n_images: int, global_batch: int, world: int) -> int:
    """Optimiser steps per epoch: whole global batches (the sampler drops the rest), same for 1 and N
    processes."""
    per_device = max(1, global_batch // world)
    return max(1, n_images // (per_device * world))


class PolySGDModule(pl.LightningModule):
    """A LightningModule holding ``net`` and training it with SGD + poly lr decay (stepped per step).

    ``optim``: lr, momentum, weight_decay, poly_power (0.9), poly_every (1). Subclasses add the loss and
    may extend :meth:`param_groups`."""

    def __init__(self, net: torch.nn.Module, optim: Mapping[str, Any], max_steps: int) -> None:
        super().__init__()
        self.net, self.optim, self.max_steps = net, dict(optim), max_steps

    def param_groups(self) -> list[ParamGroup]:
        return list(self.net.param_groups())

    def configure_optimizers(self) -> dict:
        o = self.optim
        optimizer = build_sgd(self.param_groups(), o["lr"], o["momentum"], o["weight_decay"])
        scheduler = poly_scheduler(optimizer, self.max_steps, o.get("poly_power", 0.9), o.get("poly_every", 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def load_trained_net(ctx: StageContext, stage: str, role: str = "model") -> torch.nn.Module:
    """The network of this round's ``stage`` (built from its config), with its trained weights, in eval mode."""
    net = instantiate(ctx.spec_of(stage).net)
    load_state(net, ctx.input(role).checkpoint, "net.", f"{stage} network")
    return net.eval()


class RefinerTrainingStage(Stage):
    """A refiner (IRN, AffinityNet) trained on the label maps of its ``labels`` input
    (``<label folder>/<id>.png``, the pixel target) over the train split's images; writes ``model.ckpt``.
    Subclasses give the LightningModule and the folder of their label stage."""

    def __init__(self, net: DictConfig, radius: int, epochs: int, batch_size: int, optim: DictConfig,
                 augment: list, inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(inputs)
        self.net_cfg, self.radius, self.epochs, self.batch_size = net, radius, epochs, batch_size
        self.optim, self.augment = optim, augment

    def labels_folder(self) -> str:
        raise NotImplementedError

    def make_module(self, net: torch.nn.Module, optim: dict, max_steps: int, ctx: StageContext) -> pl.LightningModule:
        raise NotImplementedError

    def run(self, ctx: StageContext) -> dict[str, Any]:
        net = instantiate(self.net_cfg)
        optim = OmegaConf.to_container(self.optim, resolve=True)
        data = ctx.data
        labels = ctx.input("labels").file(self.labels_folder())
        train = WSSSDataset(data.layout, data.train_split, build_transform(self.augment), target=labels,
                            seed=ctx.seed)
        trainer = ctx.make_trainer(max_epochs=self.epochs, checkpointing=True, limit_val_batches=0)
        max_steps = steps_per_epoch(len(train), self.batch_size, trainer.world_size) * self.epochs
        dm = WSSSDataModule(train, batch_size=self.batch_size, seed=ctx.seed, **ctx.loader_kwargs())
        fit_resumable(trainer, self.make_module(net, optim, max_steps, ctx), dm, ctx.out_dir)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        return {"summary": {}, "final": metrics, "max_steps": max_steps}
