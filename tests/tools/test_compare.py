"""experiments/miniature/compare.py counts only finished runs (results.json is rewritten after every stage)."""

from __future__ import annotations

import json
from pathlib import Path

from experiments.miniature.compare import finished


def write(run: Path, **fields) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "results.json").write_text(json.dumps({"rounds": [{"round": 0, "stages": {"segmentation": {}}}],
                                                  **fields}))
    return run


def test_a_multi_round_run_still_going_is_not_finished(tmp_path) -> None:
    assert not finished(write(tmp_path / "going", stages_planned=12, finished=False))
    assert finished(write(tmp_path / "done", stages_planned=12, finished=True))
    assert not finished(tmp_path / "absent")


def test_old_results_without_the_field_fall_back_to_the_last_round_segmentation(tmp_path) -> None:
    assert finished(write(tmp_path / "old"))
