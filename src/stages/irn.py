"""IRNet stage 4: train IRN (class boundaries + displacement) on the IR labels (specs/irnet.md).

Each training crop's IR label is sampled at stride 4 (pixels 4i+2, as the reference loader), pixel
pairs within ``radius`` become positive (same class / both background), negative (different classes)
or ignored (any end unknown), and the inter-pixel affinity + displacement losses are averaged over
the pairs of the whole batch.
"""

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
from src.inference.path_index import PathIndex, affinity_labels
from src.models.irn import irn_loss_terms
from src.pipeline.stage import Stage, StageContext, fit_resumable, load_state
from src.stages.classification import steps_per_epoch
from src.stages.optim import build_sgd, poly_scheduler
from src.utils.dist import global_mean_count

LABEL_STRIDE = 4
LABEL_OFFSET = 2  # the reference shrinks labels by nearest-neighbour sampling of pixels 4i + 2


class IRNModule(pl.LightningModule):
    def __init__(self, net: torch.nn.Module, radius: int, optim: Mapping[str, Any], max_steps: int) -> None:
        super().__init__()
        self.net, self.radius = net, radius
        self.optim, self.max_steps = dict(optim), max_steps
        self._path_index: dict[tuple[int, int], PathIndex] = {}

    def path_index(self, size: tuple[int, int]) -> PathIndex:
        if size not in self._path_index:
            self._path_index[size] = PathIndex(self.radius, size)
        return self._path_index[size]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        edge_logits, displacement = self.net(batch["image"])
        h, w = edge_logits.shape[-2:]
        labels = batch["mask"][:, LABEL_OFFSET::LABEL_STRIDE, LABEL_OFFSET::LABEL_STRIDE][:, :h, :w]
        index = self.path_index((h, w))
        bg_pos, fg_pos, neg = affinity_labels(labels, index)
        terms = irn_loss_terms(edge_logits, displacement, bg_pos, fg_pos, neg, index, count=global_mean_count)
        n = edge_logits.shape[0]
        for key in ("pos_aff", "neg_aff", "dp_fg", "dp_bg"):
            self.log(f"train/{key}", terms[key], batch_size=n)
        self.log("train/loss", terms["total"], prog_bar=True, batch_size=n)
        return terms["total"]

    def configure_optimizers(self) -> dict:
        o = self.optim
        optimizer = build_sgd(self.net.param_groups(), o["lr"], o["momentum"], o["weight_decay"])
        scheduler = poly_scheduler(optimizer, self.max_steps, o.get("poly_power", 0.9))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def load_irn(ctx: StageContext, role: str = "model", stage: str = "irn") -> torch.nn.Module:
    net = instantiate(ctx.spec_of(stage).net)
    load_state(net, ctx.input(role).checkpoint, "net.", f"{stage} network")
    return net.eval()


class IRNStage(Stage):
    def __init__(self, net: DictConfig, radius: int, epochs: int, batch_size: int, optim: DictConfig,
                 augment: list, inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(inputs)
        self.net_cfg, self.radius, self.epochs, self.batch_size = net, radius, epochs, batch_size
        self.optim, self.augment = optim, augment

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from src.inference.ir_labels import IRLabelStage

        net = instantiate(self.net_cfg)
        labels = ctx.input("labels").file(IRLabelStage.folder)
        data = ctx.data
        train = WSSSDataset(data.layout, data.train_split, build_transform(self.augment), target=labels,
                            seed=ctx.seed)
        trainer = ctx.make_trainer(max_epochs=self.epochs, checkpointing=True, limit_val_batches=0)
        max_steps = steps_per_epoch(len(train), self.batch_size, trainer.world_size) * self.epochs
        module = IRNModule(net, self.radius, OmegaConf.to_container(self.optim, resolve=True), max_steps)
        dm = WSSSDataModule(train, batch_size=self.batch_size, seed=ctx.seed, **ctx.loader_kwargs())
        fit_resumable(trainer, module, dm, ctx.out_dir)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        return {"summary": {}, "final": metrics, "max_steps": max_steps}
