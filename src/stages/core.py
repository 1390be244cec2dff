"""What a pipeline stage is, what it is given when it runs, and the artifact contract between stages.

A stage is a config node with a ``_target_`` naming a :class:`Stage` subclass plus its parameters
(conf/classification, conf/seeds, conf/refinement, conf/segmentation, conf/conta...). The pipeline
instantiates it with its own parameters only, and hands ``run`` a :class:`StageContext`: its output
folder, the input :class:`Artifact` s it declares (``inputs: {role: stage}``), the data and the run's
trainer settings. What a stage needs of a producer (its network config, output stride, folders) comes
from the producer's artifact: the folder names below and the manifest's ``provides``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import albumentations as A
import numpy as np
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.callbacks.checkpoint import AtomicCheckpointIO
from src.data.bundle import DataBundle
from src.utils.io import load_npz
from src.utils.logging import get_logger

log = get_logger(__name__)

# ------------------------------------------------------------------------------- the artifact contract
MANIFEST = "manifest.json"  # written last: a stage's folder is finished when it exists
CHECKPOINT = "model.ckpt"  # the trained network of a training stage (keys "net.*", plus e.g. "context.*")
CAMS = "cams"  # seeds: <id>.npz with keys (class ids 1..K), cam (stride 4), high_res (image size)
LABELS = "labels"  # IR / affinity labels: <id>.png class ids, 0 background, 255 unknown
MASKS = "masks"  # pseudo-masks (the last refinement step): <id>.png
WALKED = "walked"  # IRNet's walk: <id>.npz with keys, cam (walked scores, stride 4), edge (boundary map)
PREDICTIONS = "predictions"  # segmentation: predictions/<split>/<id>.png
IMAGE_MASKS = "image_masks"  # confounder set: X_m per image, <id>.png label maps or <id>.npy probabilities
CONFOUNDER_FILE = "confounder_set.pt"  # confounder set: {"confounders": C (n, h, w), "counts", "size"}


def load_seeds(folder: Path, image_id: str) -> dict[str, np.ndarray]:
    """The seeds of one image (``<seeds artifact>/cams/<id>.npz``): keys (class ids 1..K), cam (stride 4),
    high_res (image size)."""
    return load_npz(Path(folder) / f"{image_id}.npz")


AUTO = "auto"


def auto_threshold(value: float | str, offset: float, seeds: Artifact, name: str) -> float:
    """A CAM-scale threshold: the configured number, or with ``auto`` the seeds' best threshold (the seed
    protocol's, on the train split's ground truth) plus ``offset``, clipped to [0.01, 0.99].

    Why: IRNet's thresholds (0.30 / 0.05 / 0.25) are VOC's, for CAMs whose best threshold is ~0.16; on other
    data the CAMs' scale differs. ReCAM's authors advise conf_fg = best + 0.10..0.15, conf_bg = best - 0.10."""
    if value != AUTO:
        check_number(name, value, 0.0, 1.0)
        return float(value)
    best = seeds.provides.get("best_threshold")
    if best is None:
        raise ValueError(f"{name}=auto needs the seeds' best threshold, which needs ground truth on the train split "
                         f"(data.seed_eval_split); the seeds in {seeds.path} were not scored: set {name} to a number")
    return round(min(0.99, max(0.01, best + offset)), 6)  # 0.57 + 0.1 is 0.67, not 0.66999...


def alpha_for_threshold(threshold: float) -> float:
    """The background power alpha at which bg = (1 - s) ** alpha equals s at s = ``threshold``: a pixel whose
    top class score s is above the threshold beats that background (AffinityNet's labels and walk)."""
    return float(np.log(threshold) / np.log(1.0 - threshold))


@dataclass(frozen=True)
class Artifact:
    """A finished stage output: its folder and manifest (fingerprint, config, inputs, metrics, provides)."""

    stage: str
    fingerprint: str
    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    reused: bool = False

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    @property
    def provides(self) -> dict[str, Any]:
        """What the stage tells its consumers (network config, output stride, options...)."""
        return self.manifest.get("provides", {})

    def need(self, key: str) -> Any:
        if key not in self.provides:
            raise KeyError(f"the '{self.stage}' artifact in {self.path} provides no '{key}' (its manifest lists "
                           f"{sorted(self.provides)}; made by another version of this code? rerun that stage)")
        return self.provides[key]

    @property
    def checkpoint(self) -> Path:
        """The Lightning checkpoint of a training stage (an override may point elsewhere)."""
        return Path(self.manifest.get("checkpoint") or self.path / CHECKPOINT)

    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)


# ---------------------------------------------------------------------------------- what a stage gets
@dataclass
class Runtime:
    """The run's settings every stage's Trainer shares (conf/trainer, conf/logger, conf/callbacks)."""

    trainer: Mapping[str, Any]
    logger: DictConfig | None = None
    callbacks: DictConfig | None = None  # {fit: {...}, every: {...}}: callback configs with a _target_
    log_dir: Path | None = None


@dataclass
class StageContext:
    name: str
    round: int
    out_dir: Path
    inputs: dict[str, Artifact]
    data: DataBundle
    seed: int
    runtime: Runtime
    label: str = ""  # "round r/R · k/K name", for progress bars and messages

    def input(self, role: str) -> Artifact:
        if role not in self.inputs:
            raise KeyError(f"stage '{self.name}' needs input '{role}'; it has {sorted(self.inputs)}")
        return self.inputs[role]

    def optional(self, role: str) -> Artifact | None:
        """An input the pipeline adds in some rounds only (CONTA's ``context``, ``warm_start``...)."""
        return self.inputs.get(role)

    def eval_transform(self) -> A.Compose:
        """Inference input: the image normalised with the dataset's statistics, nothing else."""
        return A.Compose([A.Normalize(mean=list(self.data.mean), std=list(self.data.std))])

    def loader_kwargs(self) -> dict[str, Any]:
        return dict(self.data.loader)

    def make_trainer(self, callbacks: Sequence[pl.Callback] = (), fit: bool = False, **overrides: Any) -> pl.Trainer:
        """A Trainer from conf/trainer with this stage's folder, logger (training only) and the configured
        callbacks (``callbacks.every`` always, ``callbacks.fit`` when ``fit``)."""
        rt = self.runtime
        logger = False
        if fit and rt.logger is not None:
            logger = instantiate(rt.logger, save_dir=str(rt.log_dir), name=f"round_{self.round}/{self.name}")
        cbs = [*configured_callbacks(rt.callbacks, "every"), *(configured_callbacks(rt.callbacks, "fit") if fit
                                                               else []), *callbacks]
        kwargs: dict[str, Any] = {
            "enable_progress_bar": any(isinstance(c, pl.callbacks.ProgressBar) for c in cbs),
            "logger": logger,
            "callbacks": cbs,
            "default_root_dir": str(self.out_dir),
            "enable_checkpointing": fit,
            "plugins": [AtomicCheckpointIO()],
        }
        kwargs.update(overrides)
        trainer_cfg = dict(rt.trainer)
        if trainer_cfg.get("sync_batchnorm") and trainer_cfg.get("accelerator") == "cpu":
            _warn_once("trainer.sync_batchnorm needs GPUs (torch's SyncBatchNorm): on CPU processes each keeps "
                       "its own BN statistics, so 1 and N processes train slightly different models")
            trainer_cfg["sync_batchnorm"] = False
        trainer = instantiate(trainer_cfg, **kwargs)
        trainer.stage_label = self.label or f"round {self.round} {self.name}"  # read by the callbacks
        return trainer


def configured_callbacks(cfg: DictConfig | None, group: str) -> list[pl.Callback]:
    """Fresh instances of the callbacks of ``cfg[group]`` (a factory may return None: left out)."""
    if cfg is None or cfg.get(group) is None:
        return []
    made = (instantiate(node) for node in cfg[group].values() if node is not None)
    return [cb for cb in made if cb is not None]


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


# ------------------------------------------------------------------------------------------ the protocol
class Stage:
    """Base of every pipeline stage. Subclasses take their parameters as keyword arguments (their config
    node) and check them in ``__init__``, so a bad value stops the run before any work starts."""

    version: ClassVar[int] = 1
    #: input roles the pipeline may add in some rounds only (a method's feed from round r-1, e.g. CONTA's
    #: ``context``); any other undeclared role is an error.
    optional_inputs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, inputs: Mapping[str, str] | None = None) -> None:
        self.inputs = dict(inputs or {})

    def provides(self) -> dict[str, Any]:
        """What consumers may read from this stage's manifest, known from the config alone (a stage adds
        what it learns while running under the ``provides`` key of its result)."""
        return {}

    def run(self, ctx: StageContext) -> dict[str, Any]:
        raise NotImplementedError


def container(node: Any) -> Any:
    """A config node as plain Python (resolved); other values pass through."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


class ParameterError(ValueError):
    """A stage parameter is out of range; the message starts with the parameter's name (the config check
    puts the stage's config key in front of it)."""


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                 integer: bool = False, low_open: bool = False) -> None:
    """Stage parameter checks with the parameter's name in the message (the pipeline adds the config key)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)) \
            or (isinstance(value, float) and math.isnan(value)):
        raise ParameterError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ParameterError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ParameterError(f"{name} must be <= {high}, got {value}")


def check_schedule(epochs: int, batch_size: int, optim: Mapping[str, Any] | None = None,
                   max_steps: int | None = None) -> None:
    """The checks every training stage shares: batch >= 1, epochs >= 1 (or -1 with max_steps >= 1),
    lr > 0, momentum and weight decay >= 0."""
    check_number("batch_size", batch_size, 1, integer=True)
    check_number("epochs", epochs, -1, integer=True)
    if epochs == 0 or (epochs < 0 and (max_steps is None or max_steps <= 0)):
        raise ValueError(f"set epochs >= 1 (or epochs=-1 with max_steps >= 1), got epochs={epochs}"
                         + (f", max_steps={max_steps}" if max_steps is not None else ""))
    if optim is not None:
        check_number("optim.lr", optim["lr"], 0, low_open=True)
        check_number("optim.momentum", optim["momentum"], 0)
        check_number("optim.weight_decay", optim["weight_decay"], 0)
