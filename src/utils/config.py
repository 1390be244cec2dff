"""OmegaConf resolvers used in conf/ (registered once, on import of ``src``) and the check of a choice setting."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from omegaconf import OmegaConf

# conta.warm_start -> the stage of round r - 1 the classifier starts from (conf/conta/on.yaml)
WARM_START_STAGES = {"none": None, "classifier": "classification", "segmentation_backbone": "segmentation"}


def check_choice(name: str, value: Any, options: Collection[str], error: type[Exception] = ValueError) -> str:
    """``value`` if it is one of ``options``, else ``error`` naming the setting and the choices."""
    if value not in options:
        raise error(f"{name} must be one of {' | '.join(options)}, got {value!r}")
    return str(value)


def warm_start_stage(choice: str) -> str | None:
    return WARM_START_STAGES[check_choice("conta.warm_start", choice, WARM_START_STAGES)]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("add"):
        OmegaConf.register_new_resolver("add", lambda *xs: sum(xs))
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda a, b: a * b)
    if not OmegaConf.has_resolver("floordiv"):
        OmegaConf.register_new_resolver("floordiv", lambda a, b: int(a) // int(b))
    if not OmegaConf.has_resolver("warm_start_stage"):
        OmegaConf.register_new_resolver("warm_start_stage", warm_start_stage)
