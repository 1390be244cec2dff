"""Progress: Rich progress bars whose descriptions say where the run is (round r/R, stage k/K)."""

from __future__ import annotations

from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar


class PipelineProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, each description prefixed with e.g. ``round 1/3 · 4/27 irn``."""

    def __init__(self, label: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.label = label

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{self.label} · " + super()._get_train_description(current_epoch)

    @property
    def validation_description(self) -> str:
        return f"{self.label} · validation"

    @property
    def predict_description(self) -> str:
        return f"{self.label} · predicting"


def progress_bar(label: str, kind: str = "rich"):
    """The progress callback of a stage's Trainer (``rich``, ``tqdm`` or ``none``), or None."""
    if kind == "rich":
        return PipelineProgressBar(label)
    if kind == "tqdm":
        return TQDMProgressBar()
    return None
