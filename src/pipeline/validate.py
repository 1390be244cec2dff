"""Early config checks: every mistake a user can make on the command line stops the run before any
work starts, with a message naming the setting and the valid choices."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue

from src.pipeline.pipeline import round_specs
from src.utils.logging import get_logger

log = get_logger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class ConfigError(ValueError):
    """A setting is missing or invalid."""


def check_writable(folder: str | Path, setting: str) -> None:
    """Fail early when an output folder cannot be created or written."""
    path = Path(str(folder)).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{setting}={path} is not writable: {err.strerror or err}") from err


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def finalize(cfg: DictConfig) -> DictConfig:
    """Fill the implicit defaults (``conta`` absent = off), then validate; returns the same cfg."""
    if OmegaConf.select(cfg, "baseline") is None:
        raise ConfigError(
            "no baseline chosen: append +baseline=<name> to the command, one of: "
            + ", ".join(choices("baseline")) + " (e.g. python -m src.run +baseline=irnet +conta=on)"
        )
    if OmegaConf.select(cfg, "conta") is None:
        log.info("no +conta given: running with conta=off (the baseline alone, one round)")
        with open_dict(cfg):
            cfg.conta = OmegaConf.load(CONF_DIR / "conta" / "off.yaml")
    validate(cfg)
    return cfg


def _number(cfg: DictConfig, key: str, low: float | None = None, high: float | None = None,
            integer: bool = False, allow: tuple = ()) -> None:
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{key} is required but not set") from err
    if value is None or value in allow:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"{key} must be <= {high}, got {value}")


def validate(cfg: DictConfig) -> None:
    name = OmegaConf.select(cfg, "baseline.name")
    if name is None:
        raise ConfigError(f"unknown baseline config; choose one of {choices('baseline')}")
    conta_name = str(OmegaConf.select(cfg, "conta.name"))
    if conta_name not in ("on", "off"):
        raise ConfigError(f"conta must be 'on' or 'off' (+conta=on), got {conta_name!r}")
    _number(cfg, "conta.rounds", 0, integer=True)
    if cfg.conta.enabled:
        warm = str(cfg.conta.warm_start)
        if warm not in ("none", "classifier", "segmentation_backbone"):
            raise ConfigError(f"conta.warm_start must be none | classifier | segmentation_backbone, got {warm!r}")
        if str(cfg.conta.context.inject) not in ("feature", "input"):
            raise ConfigError(f"conta.context.inject must be feature | input, got {cfg.conta.context.inject!r}")
        if str(cfg.conta.context.image_mask) not in ("foreground", "label_map", "per_class"):
            raise ConfigError("conta.context.image_mask must be foreground | label_map | per_class, got "
                              f"{cfg.conta.context.image_mask!r}")
        if str(cfg.conta.confounder_set.source) not in ("segmentation", "pseudo_masks"):
            raise ConfigError("conta.confounder_set.source must be segmentation | pseudo_masks, got "
                              f"{cfg.conta.confounder_set.source!r}")
    _number(cfg, "seed", 0, integer=True)
    try:
        OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(
            f"{err.full_key if hasattr(err, 'full_key') else 'a data setting'} is required for data="
            f"{OmegaConf.select(cfg, 'data.name')}: e.g. data.root=/path/to/VOCdevkit/VOC2012"
        ) from err
    root = OmegaConf.select(cfg, "data.root")
    if root is not None and not Path(str(root)).expanduser().is_dir():
        raise ConfigError(f"data.root={root}: no such directory")
    _number(cfg, "data.num_classes", 1, integer=True)
    if len(cfg.data.class_names) not in (0, cfg.data.num_classes):
        raise ConfigError(f"data.class_names has {len(cfg.data.class_names)} names but data.num_classes is "
                          f"{cfg.data.num_classes}")
    for stage_key in ("baseline.classification", "baseline.seeds", "segmentation",
                      *[f"baseline.refinement.{k}" for k in cfg.baseline.refinement]):
        _check_stage(cfg, stage_key)
    stop_after = OmegaConf.select(cfg, "stop_after")
    stages = list(round_specs(cfg))
    if stop_after is not None and str(stop_after) not in stages:
        raise ConfigError(f"stop_after={stop_after!r} is not a stage of baseline {name}; choose one of {stages}")
    _number(cfg, "trainer.devices", 1, integer=True, allow=("auto", -1))
    _number(cfg, "trainer.num_nodes", 1, integer=True)


def _check_stage(cfg: DictConfig, key: str) -> None:
    node = OmegaConf.select(cfg, key)
    if node is None or "_target_" not in node:
        raise ConfigError(f"{key} must be a stage config with a _target_")
    for sub, low, integer in (("batch_size", 1, True), ("epochs", -1, True), ("max_steps", -1, True),
                              ("optim.lr", 0, False), ("optim.weight_decay", 0, False),
                              ("optim.momentum", 0, False), ("radius", 2, True), ("beta", 0, False),
                              ("exp_times", 0, True)):
        if OmegaConf.select(node, sub) is not None:
            _number(cfg, f"{key}.{sub}", low, integer=integer)
    for sub in ("conf_fg", "conf_bg", "bg_threshold", "eval_threshold"):
        if OmegaConf.select(node, sub) is not None:
            _number(cfg, f"{key}.{sub}", 0.0, 1.0)
    if OmegaConf.select(node, "optim.lr") is not None and node.optim.lr <= 0:
        raise ConfigError(f"{key}.optim.lr must be > 0, got {node.optim.lr}")
    epochs, steps = OmegaConf.select(node, "epochs"), OmegaConf.select(node, "max_steps")
    if epochs is not None and (epochs == 0 or (epochs < 0 and (steps is None or steps <= 0))):
        raise ConfigError(f"{key}: set epochs >= 1 (or epochs=-1 with max_steps >= 1), got epochs={epochs}")
