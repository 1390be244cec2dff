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


def quiet_lightning() -> None:
    """Silence Lightning's per-Trainer banners (accelerator info, tips): a run builds a dozen Trainers."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
