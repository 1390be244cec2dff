"""Per-image artifact writing from ``predict_step`` (Lightning's BasePredictionWriter).

Inference modules return, per batch, a list of (image id, payload); the writer hands each to the
stage's ``write`` function, which writes one file atomically. Each rank writes its own shard (the
inference sampler has no duplicates), so files never collide and a resumed run skips what exists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pytorch_lightning.callbacks import BasePredictionWriter


class PerImageWriter(BasePredictionWriter):
    def __init__(self, write: Callable[[str, Any], None]) -> None:
        super().__init__(write_interval="batch")
        self.write = write
        self.count = 0

    def write_on_batch_end(self, trainer, pl_module, prediction: Sequence[tuple[str, Any]] | None,
                           batch_indices, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        for image_id, payload in prediction or []:
            self.write(image_id, payload)
            self.count += 1
