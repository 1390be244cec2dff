"""The pipeline on one GPU (``trainer=gpu``): every stage of each baseline runs with its batches on the device.

CPU-only runs cannot see host / device mix-ups: on the first GPU run, the IR-label stage called ``.numpy()``
on the raw image that Lightning had moved to the GPU with the rest of the batch, and crashed. Skipped
without CUDA (CI has none); run on a GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checks import assert_scores_match_files
from test_end_to_end_esol import ESOL_TINY
from test_end_to_end_seam import TINY_SEAM

from src.pipeline.pipeline import run_pipeline
from src.pipeline.validate import finalize

pytestmark = [pytest.mark.slow, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# The segmentation's dense CRF at evaluation (off in the quick profile) reads the raw image on the host.
CRF = "segmentation.eval.crf={iterations:2,gaussian:{sxy:1,compat:3},bilateral:{sxy:67,srgb:3,compat:4}}"
RUNS = {
    "irnet_conta_crf": ("+baseline=irnet", "+conta=on", "conta.rounds=1", CRF),
    "seam_irnet": ("+baseline=seam_irnet", *TINY_SEAM),
    "seam_recam": ("+baseline=seam", "+debias=recam", *TINY_SEAM),
    "irnet_cda": ("+baseline=irnet", "+debias=cda"),
    "esol": ("+baseline=esol", *ESOL_TINY),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_pipeline_runs_on_gpu(make_cfg, tmp_path: Path, name: str) -> None:
    cfg = finalize(make_cfg("trainer=gpu", *RUNS[name]))
    results = run_pipeline(cfg, tmp_path / "run")
    last = max(results.rounds)
    assert last == (1 if name in ("irnet_conta_crf", "irnet_cda") else 0)
    assert "segmentation" in results.rounds[last]["stages"]
    assert_scores_match_files(results, round_index=last)
