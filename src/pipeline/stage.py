"""What a pipeline stage is, and what it is given when it runs.

A stage is a config node with a ``_target_`` naming a :class:`Stage` subclass plus its parameters
(conf/classification, conf/seeds, conf/refinement, conf/segmentation, conf/conta). The pipeline
instantiates it, hands it a :class:`StageContext` (its output directory in the artifact store, its
input artifacts, the data, a trainer factory) and records the metrics ``run`` returns.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import albumentations as A
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from src.callbacks.guards import NonFiniteLossGuard
from src.callbacks.performance import ModelPerformance
from src.callbacks.progress import progress_bar
from src.data.voc import VOCLayout
from src.models.weights import load_state_strict
from src.pipeline.artifacts import CHECKPOINT, Artifact
from src.utils.io import write_bytes_atomic
from src.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class DataBundle:
    """The prepared dataset and the split roles of this run (from conf/data)."""

    layout: VOCLayout
    train_split: str
    val_split: str
    eval_splits: Sequence[str]
    seed_eval_split: str | None
    mean: Sequence[float]
    std: Sequence[float]
    loader: Mapping[str, Any]

    @property
    def num_classes(self) -> int:
        return self.layout.num_classes

    @property
    def class_names(self) -> list[str]:
        return ["background", *self.layout.class_names]

    def seed_eval_ids(self) -> list[str]:
        """Images of the train split scored for seeds and pseudo-masks (they need ground truth)."""
        if not self.seed_eval_split:
            return []
        train = set(self.layout.ids(self.train_split))
        return [i for i in self.layout.ids(self.seed_eval_split) if i in train]


@dataclass
class StageContext:
    cfg: DictConfig
    name: str
    round: int
    out_dir: Path
    inputs: dict[str, Artifact]
    data: DataBundle
    run_dir: Path
    specs: Mapping[str, DictConfig] = field(default_factory=dict)
    progress_label: str = ""

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    def spec_of(self, stage: str) -> DictConfig:
        """The config node of another stage of this round (e.g. to rebuild its network)."""
        if stage not in self.specs:
            raise KeyError(f"stage '{stage}' is not part of round {self.round} ({sorted(self.specs)})")
        return self.specs[stage]

    def input(self, role: str) -> Artifact:
        if role not in self.inputs:
            raise KeyError(f"stage '{self.name}' needs input '{role}'; it has {sorted(self.inputs)}")
        return self.inputs[role]

    def eval_transform(self) -> A.Compose:
        """Inference input: the image normalised with the dataset's statistics, nothing else."""
        return A.Compose([A.Normalize(mean=list(self.data.mean), std=list(self.data.std))])

    def loader_kwargs(self) -> dict[str, Any]:
        return dict(self.data.loader)

    def make_trainer(self, callbacks: Sequence[pl.Callback] = (), checkpointing: bool = False,
                     **overrides: Any) -> pl.Trainer:
        """A Trainer from conf/trainer with this stage's logger, callbacks and folders."""
        logger = False
        if self.cfg.get("logger") is not None and (overrides.get("max_epochs") or overrides.get("max_steps")):
            logger = instantiate(self.cfg.logger, save_dir=str(self.run_dir / "logs"),
                                 name=f"round_{self.round}/{self.name}")
        cbs = list(callbacks)
        if checkpointing:
            cbs.append(ModelCheckpoint(dirpath=self.out_dir / "checkpoints", save_last=True, save_top_k=0,
                                       every_n_epochs=1))
            cbs.append(NonFiniteLossGuard(self.out_dir / "debug", f"round {self.round} {self.name}"))
        perf = OmegaConf.select(self.cfg, "performance", default=None)
        if perf is not None and (perf.get("channels_last") or perf.get("compile")):
            cbs.append(ModelPerformance(bool(perf.get("channels_last")), bool(perf.get("compile"))))
        bar = progress_bar(self.progress_label, str(OmegaConf.select(self.cfg, "progress", default="rich")))
        if bar is not None:
            cbs.append(bar)
        kwargs: dict[str, Any] = {
            "enable_progress_bar": bar is not None,
            "logger": logger,
            "callbacks": cbs,
            "default_root_dir": str(self.out_dir),
            "enable_checkpointing": checkpointing,
            "plugins": [AtomicCheckpointIO()],
        }
        kwargs.update(overrides)
        trainer_cfg = OmegaConf.to_container(self.cfg.trainer, resolve=True)
        if trainer_cfg.get("sync_batchnorm") and trainer_cfg.get("accelerator") == "cpu":
            _warn_once("trainer.sync_batchnorm needs GPUs (torch's SyncBatchNorm): on CPU processes each keeps "
                        "its own BN statistics, so 1 and N processes train slightly different models")
            trainer_cfg["sync_batchnorm"] = False
        return instantiate(trainer_cfg, **kwargs)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed, so a killed run never leaves half a file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_bytes_atomic(Path(path), buffer.getvalue())


class Stage:
    """Base of every pipeline stage. Subclasses take their parameters as keyword arguments."""

    version: ClassVar[int] = 1
    #: CONTA feeds the context prior to the stages that set this (classification and seeds).
    uses_context: ClassVar[bool] = False

    def __init__(self, inputs: Mapping[str, str] | None = None) -> None:
        self.inputs = dict(inputs or {})

    def run(self, ctx: StageContext) -> dict[str, Any]:
        raise NotImplementedError


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


def load_state(module: torch.nn.Module, checkpoint: Path, prefix: str, what: str) -> None:
    """Load the ``prefix``-ed entries of a Lightning checkpoint into ``module`` strictly; a checkpoint
    of another baseline or class count stops with the mismatching keys listed."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint} ({what})")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"unreadable checkpoint {checkpoint} ({what}): {err}") from err
    state = state.get("state_dict", state)
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    load_state_strict(module, sub, source=f"checkpoint {checkpoint} ({what})",
                      hint="of this config (another baseline, backbone or class count?)")
