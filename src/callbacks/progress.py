"""Progress: Rich progress bars whose descriptions say where the run is (round r/R, stage k/K).

Configured in conf/callbacks (``progress=rich|tqdm|none``); the stage's label is the ``stage_label`` the
stage context sets on its Trainer.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar

from src.utils.config import check_choice

KINDS = ("rich", "tqdm", "none")


def stage_label(trainer: pl.Trainer | None) -> str:
    """The ``round r/R · k/K name`` label of the stage that built ``trainer`` ('' outside the pipeline)."""
    return str(getattr(trainer, "stage_label", "") or "")


class PipelineProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, each description prefixed with e.g. ``round 1/3 · 4/27 irn``."""

    def _prefix(self, text: str) -> str:
        label = stage_label(self._trainer)
        return f"{label} · {text}" if label else text

    def _get_train_description(self, current_epoch: int) -> str:
        return self._prefix(super()._get_train_description(current_epoch))

    @property
    def validation_description(self) -> str:
        return self._prefix("validation")

    @property
    def predict_description(self) -> str:
        return self._prefix("predicting")


def progress_bar(kind: str) -> pl.Callback | None:
    """The progress callback of a stage's Trainer (``rich``, ``tqdm`` or ``none``: no callback)."""
    check_choice("progress", kind, KINDS)
    if kind == "rich":
        return PipelineProgressBar()
    if kind == "tqdm":
        return TQDMProgressBar()
    return None
