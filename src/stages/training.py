"""What every training stage shares: SGD over the network's parameter groups with the poly schedule,
fitting with resume, rebuilding a trained network from its artifact, and fitting a refiner on label maps.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import Dataset

from src.data.datamodule import WSSSDataModule
from src.data.datasets import WSSSDataset
from src.data.transforms import build_transform
from src.models.weights import load_state_strict
from src.ops.optim import ParamGroup, build_sgd, poly_scheduler
from src.stages.core import CHECKPOINT, LABELS, Artifact, Stage, StageContext, check_schedule, container
from src.utils.logging import get_logger

log = get_logger(__name__)


def steps_per_epoch(n_images: int, global_batch: int, world: int) -> int:
    """Optimiser steps per epoch: whole global batches (the sampler drops the rest), same for 1 and N
    processes."""
    per_device = max(1, global_batch // world)
    return max(1, n_images // (per_device * world))


class PolySGDModule(pl.LightningModule):
    """A LightningModule holding ``net`` and training it with SGD + poly lr decay (stepped per step).

    ``optim``: lr, momentum, weight_decay, poly_power, poly_every (DeepLab's staircase: 10; else 1).
    Subclasses add the loss and may extend :meth:`param_groups`."""

    def __init__(self, net: torch.nn.Module, optim: Mapping[str, Any], max_steps: int) -> None:
        super().__init__()
        self.net, self.optim, self.max_steps = net, dict(optim), max_steps

    def param_groups(self) -> list[ParamGroup]:
        return list(self.net.param_groups())

    def log_losses(self, terms: Mapping[str, torch.Tensor], logged: Sequence[str], total: str,
                   batch_size: int) -> torch.Tensor:
        """Log the ``logged`` loss terms and the total (``train/loss``, in the progress bar); returns the total."""
        for key in logged:
            self.log(f"train/{key}", terms[key], batch_size=batch_size)
        self.log("train/loss", terms[total], prog_bar=True, batch_size=batch_size)
        return terms[total]

    def configure_optimizers(self) -> dict:
        o = self.optim
        optimizer = build_sgd(self.param_groups(), o["lr"], o["momentum"], o["weight_decay"])
        scheduler = poly_scheduler(optimizer, self.max_steps, o["poly_power"], o["poly_every"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def fit_resumable(trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule,
                  out_dir: Path) -> Path:
    """Fit, resuming from the stage's last checkpoint if a previous run was interrupted; returns the
    final checkpoint (written atomically, after training)."""
    last = out_dir / "checkpoints" / "last.ckpt"
    resume = str(last) if last.is_file() else None
    if resume:
        log.info(f"resuming training from {last}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    final = out_dir / CHECKPOINT
    trainer.save_checkpoint(final, weights_only=True)
    return final


def read_checkpoint(checkpoint: Path, what: str) -> dict[str, torch.Tensor]:
    """The state dict of a Lightning checkpoint; a missing or unreadable file stops with its path.

    Read as data only (``torch.load(weights_only=True)``: tensors and plain containers, no Python objects),
    since a checkpoint may be a file the user brings (``artifacts.reuse``, a warm start): unpickling
    anything else could run code. Ours hold epoch, global_step, loops, the version and ``state_dict``
    (``trainer.save_checkpoint(weights_only=True)``)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint} ({what})")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        reason = f"It refers to {found.group(1)}." if found else ""
        raise ValueError(f"checkpoint {checkpoint} ({what}) holds Python objects besides tensors and plain "
                         "containers: refused, loading it could run code (checkpoints are read as data only; save "
                         f"a state dict, or a Lightning checkpoint with weights_only=True). {reason}".strip()) from err
    except Exception as err:
        raise ValueError(f"unreadable checkpoint {checkpoint} ({what}): {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {checkpoint} ({what}) holds a {type(state).__name__}, not a state dict")
    return state.get("state_dict", state)


def load_state(module: torch.nn.Module, checkpoint: Path, prefix: str, what: str) -> None:
    """Load the ``prefix``-ed entries of a Lightning checkpoint into ``module`` strictly; a checkpoint
    of another baseline or class count stops with the mismatching keys listed."""
    state = read_checkpoint(checkpoint, what)
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    load_state_strict(module, sub, source=f"checkpoint {checkpoint} ({what})",
                      hint="of this config (another baseline, backbone or class count?)")


def build_net(artifact: Artifact) -> torch.nn.Module:
    """The untrained network of a training stage's artifact, from the config its manifest provides."""
    return instantiate(artifact.need("net"))


def load_trained_net(artifact: Artifact) -> torch.nn.Module:
    """The trained network of a training stage's artifact (config from its manifest, weights from its
    checkpoint), in eval mode."""
    net = build_net(artifact)
    load_state(net, artifact.checkpoint, "net.", f"{artifact.stage} network")
    return net.eval()


class TrainingStage(Stage):
    """Base of the stages that train ``net`` (a config node with ``_target_``) and write ``model.ckpt``;
    consumers rebuild the network from the ``net`` the manifest provides."""

    def __init__(self, net: DictConfig, epochs: int, batch_size: int, optim: DictConfig, augment: list,
                 inputs: Mapping[str, str] | None = None, max_steps: int | None = None) -> None:
        super().__init__(inputs)
        check_schedule(epochs, batch_size, optim, max_steps)
        self.net_cfg, self.epochs, self.batch_size, self.max_steps = net, epochs, batch_size, max_steps
        self.optim, self.augment = container(optim), augment

    def provides(self) -> dict[str, Any]:
        return {"net": container(self.net_cfg), "checkpoint": CHECKPOINT}

    def fit(self, ctx: StageContext, make_module: Callable[[int], pl.LightningModule], target: Path | None = None,
            extras: Sequence[Any] = (), validate: bool = False,
            wrap_train: Callable[[WSSSDataset], Dataset] | None = None) -> Fitted:
        """Train on the train split (``target``: a folder of label PNGs, the pixel target; ``extras``: dataset
        extras such as CONTA's context masks; ``wrap_train``: a dataset around the training set, e.g. CDA's
        pasting), validating on the val split each epoch when ``validate``; ``make_module(max_steps)`` builds
        the LightningModule once the schedule's length is known."""
        data = ctx.data
        train = WSSSDataset(data.layout, data.train_split, build_transform(self.augment), target=target,
                            extras=extras, seed=ctx.seed)
        if wrap_train is not None:
            train = wrap_train(train)
        val = WSSSDataset(data.layout, data.val_split, ctx.eval_transform(), extras=extras) if validate else None
        by_epochs = self.epochs > 0
        schedule = {"max_epochs": self.epochs} if by_epochs else {"max_epochs": -1, "max_steps": self.max_steps}
        trainer = ctx.make_trainer(fit=True, **schedule, **({} if validate else {"limit_val_batches": 0}))
        max_steps = (steps_per_epoch(len(train), self.batch_size, trainer.world_size) * self.epochs if by_epochs
                     else int(self.max_steps))
        module = make_module(max_steps)
        dm = WSSSDataModule(train, val, batch_size=self.batch_size, seed=ctx.seed, **ctx.loader_kwargs())
        fit_resumable(trainer, module, dm, ctx.out_dir)
        return Fitted(trainer, module, dm, max_steps)


@dataclass
class Fitted:
    """What :meth:`TrainingStage.fit` trained: the trainer (its ``callback_metrics``), the module, the data
    and the schedule's length."""

    trainer: pl.Trainer
    module: pl.LightningModule
    datamodule: WSSSDataModule
    max_steps: int


class RefinerTrainingStage(TrainingStage):
    """A refiner (IRN, AffinityNet) trained on the label maps of its ``labels`` input (``labels/<id>.png``,
    the pixel target) over the train split's images. Subclasses give the LightningModule."""

    def __init__(self, net: DictConfig, radius: int, epochs: int, batch_size: int, optim: DictConfig,
                 augment: list, inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(net, epochs, batch_size, optim, augment, inputs)
        self.radius = radius

    def make_module(self, net: torch.nn.Module, max_steps: int, ctx: StageContext) -> pl.LightningModule:
        raise NotImplementedError

    def run(self, ctx: StageContext) -> dict[str, Any]:
        net = instantiate(self.net_cfg)
        fitted = self.fit(ctx, lambda max_steps: self.make_module(net, max_steps, ctx),
                          target=ctx.input("labels").file(LABELS))
        metrics = {k: float(v) for k, v in fitted.trainer.callback_metrics.items()}
        return {"summary": {}, "final": metrics, "max_steps": fitted.max_steps}
