"""OmegaConf resolvers used in conf/ (registered once, on import of ``src``)."""

from __future__ import annotations

from omegaconf import OmegaConf

# conta.warm_start -> the stage of round r - 1 the classifier starts from (conf/conta/on.yaml)
WARM_START_STAGES = {"none": None, "classifier": "classification", "segmentation_backbone": "segmentation"}


def warm_start_stage(choice: str) -> str | None:
    if choice not in WARM_START_STAGES:
        raise ValueError(f"conta.warm_start must be one of {' | '.join(WARM_START_STAGES)}, got {choice!r}")
    return WARM_START_STAGES[choice]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("add"):
        OmegaConf.register_new_resolver("add", lambda *xs: sum(xs))
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda a, b: a * b)
    if not OmegaConf.has_resolver("floordiv"):
        OmegaConf.register_new_resolver("floordiv", lambda a, b: int(a) // int(b))
    if not OmegaConf.has_resolver("warm_start_stage"):
        OmegaConf.register_new_resolver("warm_start_stage", warm_start_stage)
