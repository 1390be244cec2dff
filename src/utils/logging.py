"""Rank-aware logging: in multi-process runs only global rank 0 speaks, unless asked otherwise."""

from __future__ import annotations

import logging

from pytorch_lightning.utilities.rank_zero import rank_zero_only


class RankedLogger(logging.LoggerAdapter):
    """A logger that prefixes the rank and, by default, logs on rank 0 only."""

    def __init__(self, name: str = __name__, rank_zero_only_: bool = True) -> None:
        super().__init__(logging.getLogger(name), extra={})
        self.rank_zero_only = rank_zero_only_

    def log(self, level: int, msg: object, *args, rank: int | None = None, **kwargs) -> None:
        if not self.isEnabledFor(level):
            return
        current = getattr(rank_zero_only, "rank", 0) or 0
        if self.rank_zero_only and current != 0:
            return
        if rank is not None and current != rank:
            return
        text = f"[rank {current}] {msg}" if current != 0 else str(msg)
        self.logger.log(level, text, *args, **kwargs)


def get_logger(name: str) -> RankedLogger:
    return RankedLogger(name)


# Lightning warnings that are expected in this pipeline (each of a dozen Trainers would repeat them).
EXPECTED_WARNINGS = (
    ".*val_dataloader.*but have no .validation_step.*",  # refiners/segmentation train without validation
    ".*does not have many workers.*",                    # num_workers is a data.loader setting
    ".*smaller than the logging interval.*",             # tiny runs
    ".*isinstance.treespec, LeafSpec.*",                 # a torch deprecation inside Lightning
)


def quiet_lightning() -> None:
    """Silence Lightning's per-Trainer banners (accelerator info, tips) and expected warnings: a run builds
    a dozen Trainers."""
    import warnings

    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
