"""Early config checks: every mistake a user can make on the command line stops the run before any
work starts, with a message naming the setting.

Three sources, each checked once: the run-level settings against their schemas (src/pipeline/schema.py),
the plan (stage inputs, ``stop_after``, the methods' feeds; src/pipeline/plan.py), and every planned
stage's parameters by its own constructor (src/stages/).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from src.pipeline import schema
from src.pipeline.pipeline import build_stage
from src.pipeline.plan import PlannedStage, plan
from src.stages.core import ParameterError
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
    """Fill the implicit defaults (an absent round method = its ``off`` / ``none`` option), then validate;
    returns the same cfg."""
    if OmegaConf.select(cfg, "baseline") is None:
        raise ConfigError(
            "no baseline chosen: append +baseline=<name> to the command, one of: "
            + ", ".join(choices("baseline")) + " (e.g. python -m src.run +baseline=irnet +conta=on)"
        )
    for group, default in (("conta", "off"), ("debias", "none")):
        if OmegaConf.select(cfg, group) is None:
            log.info(f"no +{group} given: running with {group}={default}")
            with open_dict(cfg):
                cfg[group] = OmegaConf.load(CONF_DIR / group / f"{default}.yaml")
    validate(cfg)
    return cfg


def check_schema(node: DictConfig | None, cls: type, prefix: str) -> None:
    """``node``'s fields of the dataclass ``cls`` typed and range-checked; errors name ``prefix.key``."""
    if node is None:
        raise ConfigError(f"{prefix.rstrip('.')} is missing")
    names = [f.name for f in dataclasses.fields(cls)]
    picked = OmegaConf.create({k: OmegaConf.to_container(node[k], resolve=True) if OmegaConf.is_config(node[k])
                               else node[k] for k in names if k in node})
    try:
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), picked))
    except MissingMandatoryValue as err:
        raise ConfigError(f"{prefix}{err.full_key} is required but not set") from err
    except OmegaConfBaseException as err:
        first = str(err.msg).splitlines()[0] if getattr(err, "msg", None) else str(err).splitlines()[0]
        raise ConfigError(f"{prefix}{err.full_key}: {first}") from err
    except ValueError as err:
        raise ConfigError(f"{prefix}{err}") from err


def validate(cfg: DictConfig) -> None:
    if OmegaConf.select(cfg, "baseline.name") is None:
        raise ConfigError(f"unknown baseline config; choose one of {choices('baseline')}")
    check_schema(cfg, schema.RunSchema, "")
    check_schema(cfg.get("trainer"), schema.TrainerSchema, "trainer.")
    check_schema(cfg.get("conta"), schema.ContaSchema, "conta.")
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
    check_schema(cfg.data, schema.DataSchema, "data.")
    try:
        rounds = plan(cfg)
    except (ValueError, OmegaConfBaseException) as err:
        raise ConfigError(str(err)) from err
    checked: set[str] = set()
    for st in (st for stages in rounds for st in stages):
        if st.key not in checked:
            checked.add(st.key)
            check_stage(st)
    metric = OmegaConf.select(cfg, "optimized_metric")
    planned = {st.name for st in rounds[-1]}
    if metric is not None and str(metric).split("/")[0] not in planned:
        raise ConfigError(f"optimized_metric={metric} names stage '{str(metric).split('/')[0]}', which the last "
                          f"round does not run ({sorted(planned)}); set optimized_metric=<stage>/<split>/<metric> "
                          "of a stage that runs (e.g. seeds/train/seed_best_miou with stop_after=seeds), or null")


def check_stage(st: PlannedStage) -> None:
    """Build the stage once: its constructor checks its parameters."""
    try:
        build_stage(st)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise _stage_error(st.key, cause) from err
    except (ValueError, TypeError) as err:
        raise _stage_error(st.key, err) from err


def _stage_error(key: str, err: BaseException) -> ConfigError:
    if isinstance(err, ParameterError):
        return ConfigError(f"{key}.{err}")
    return ConfigError(f"{key}: {err}")
