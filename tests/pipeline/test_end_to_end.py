"""End-to-end runs of the quick pipeline on a tiny synthetic set (real config, real stages)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from checks import assert_scores_match_files

from src.pipeline.pipeline import run_pipeline
from src.pipeline.report import write_report
from src.pipeline.validate import finalize

pytestmark = pytest.mark.slow


def test_irnet_conta_off_runs_every_stage(make_cfg, tmp_path: Path) -> None:
    cfg = finalize(make_cfg("+baseline=irnet"))
    results = run_pipeline(cfg, tmp_path / "run")
    path = results.write()
    data = json.loads(path.read_text())
    assert [r["round"] for r in data["rounds"]] == [0]
    stages = data["rounds"][0]["stages"]
    assert list(stages) == ["classification", "seeds", "ir_labels", "irn", "pseudo_masks", "segmentation"]
    summary = data["rounds"][0]["summary"]
    assert {"seeds/train/seed_miou", "seeds/train/seed_best_miou", "pseudo_masks/train/mask_miou",
            "pseudo_masks/train/mask_best_miou", "segmentation/val/miou", "segmentation/val_deconfounded/miou"} \
        <= set(summary)
    assert_scores_match_files(results)  # quality: tests/pipeline/test_miniature_quality.py
    run = tmp_path / "run" / "round_0"
    assert len(list((run / "pseudo_masks" / "masks").glob("*.png"))) == 16
    assert len(list((run / "seeds" / "cams").glob("*.npz"))) == 16
    assert "seed best" in results.table()

    # stop_after=seeds: the same two stages (reused from the cache), nothing after them, a report still
    partial_cfg = finalize(make_cfg("+baseline=irnet", "stop_after=seeds", "optimized_metric=null"))
    partial = run_pipeline(partial_cfg, tmp_path / "partial")
    assert list(partial.rounds[0]["stages"]) == ["classification", "seeds"]
    assert all(info["reused"] for info in partial.rounds[0]["stages"].values())
    assert "mask mIoU" not in partial.table() and "seed best" in partial.table()
    report = write_report(partial, partial.data, tmp_path / "partial")
    assert "round_0_train.png" in report.read_text()
    assert not (tmp_path / "partial" / "round_0" / "segmentation").exists()


def test_irnet_conta_on_two_rounds_shares_round0_with_conta_off(make_cfg, tmp_path: Path) -> None:
    off = run_pipeline(finalize(make_cfg("+baseline=irnet", "+conta=off")), tmp_path / "off")
    on = run_pipeline(finalize(make_cfg("+baseline=irnet", "+conta=on", "conta.rounds=1")), tmp_path / "on")
    assert sorted(on.rounds) == [0, 1]
    # round 0 of conta=on is the baseline: every stage reused from the conta=off run
    for stage, info in on.rounds[0]["stages"].items():
        if stage != "confounder_set":
            assert info["reused"], stage
            assert info["fingerprint"] == off.rounds[0]["stages"][stage]["fingerprint"]
    assert not on.rounds[1]["stages"]["classification"]["reused"]
    confounder = tmp_path / "on" / "round_0" / "confounder_set"
    assert (confounder / "confounder_set.pt").is_file() and (confounder / "priors.png").is_file()
    assert "1 vs 0" in on.table()
    assert_scores_match_files(on, round_index=1)
