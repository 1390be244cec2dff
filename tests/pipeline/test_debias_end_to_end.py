"""End-to-end tiny runs of `+debias=cda` and `+debias=recam` (IRNet baseline, real config and stages), alone
and with CONTA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from checks import assert_scores_match_files

from src.pipeline.pipeline import run_pipeline
from src.pipeline.validate import finalize
from src.stages.instance_bank import INSTANCES

pytestmark = pytest.mark.slow


def manifest(run: Path, r: int, stage: str) -> dict:
    return json.loads((run / f"round_{r}" / stage / "manifest.json").read_text())


def test_irnet_cda_shares_round_0_and_pastes_in_round_1(make_cfg, tmp_path: Path) -> None:
    none = run_pipeline(finalize(make_cfg("+baseline=irnet", "+debias=none")), tmp_path / "none")
    cda = run_pipeline(finalize(make_cfg("+baseline=irnet", "+debias=cda")), tmp_path / "cda")
    assert sorted(cda.rounds) == [0, 1]
    for stage, info in cda.rounds[0]["stages"].items():  # round 0 = the baseline, from the cache
        if stage != "instance_bank":
            assert info["reused"] and info["fingerprint"] == none.rounds[0]["stages"][stage]["fingerprint"], stage
    assert list(cda.rounds[1]["stages"]) == ["classification", "seeds", "ir_labels", "irn", "pseudo_masks",
                                             "segmentation"]
    assert not cda.rounds[1]["stages"]["classification"]["reused"]
    bank = manifest(tmp_path / "cda", 0, "instance_bank")
    assert bank["provides"]["paste"] == {"max_angle": 90, "max_size": 0.7}
    stored = sorted((tmp_path / "cda" / "round_0" / "instance_bank" / INSTANCES).rglob("*.npz"))
    assert len(stored) == bank["metrics"]["kept"] == sum(bank["provides"]["counts"].values()) > 0
    # round 1 trains on the 16 images and their 16 pasted versions: twice the steps of round 0 (batch 8)
    assert manifest(tmp_path / "cda", 0, "classification")["metrics"]["max_steps"] == 2
    assert manifest(tmp_path / "cda", 1, "classification")["metrics"]["max_steps"] == 4
    assert manifest(tmp_path / "cda", 1, "classification")["inputs"]["instances"]["stage"] == "instance_bank"
    assert_scores_match_files(cda, round_index=1)
    assert "1 vs 0" in cda.table()


def test_irnet_recam_seeds_read_the_fine_tuned_net(make_cfg, tmp_path: Path) -> None:
    none = run_pipeline(finalize(make_cfg("+baseline=irnet")), tmp_path / "none")
    recam = run_pipeline(finalize(make_cfg("+baseline=irnet", "+debias=recam")), tmp_path / "recam")
    stages = recam.rounds[0]["stages"]
    assert list(stages) == ["classification", "recam", "seeds", "ir_labels", "irn", "pseudo_masks", "segmentation"]
    assert stages["classification"]["reused"]  # the classifier is the baseline's
    assert stages["classification"]["fingerprint"] == none.rounds[0]["stages"]["classification"]["fingerprint"]
    assert stages["seeds"]["fingerprint"] != none.rounds[0]["stages"]["seeds"]["fingerprint"]
    made = manifest(tmp_path / "recam", 0, "recam")
    assert made["provides"]["net"]["_target_"] == "src.models.recam.ReCAM"
    assert made["provides"]["net"]["net"]["_target_"] == "src.models.cam_net.CAMNet"
    assert {"train/bce", "train/sce", "val/map"} <= set(made["metrics"]["final"])
    assert manifest(tmp_path / "recam", 0, "seeds")["inputs"]["model"]["stage"] == "recam"
    assert_scores_match_files(recam)


@pytest.mark.parametrize("option", ["cda", "recam"])
def test_irnet_debias_with_conta(make_cfg, tmp_path: Path, option: str) -> None:
    """Both methods in one run: CONTA's context and the de-biasing stage of round 1 work together."""
    run = run_pipeline(finalize(make_cfg("+baseline=irnet", f"+debias={option}", "+conta=on", "conta.rounds=1")),
                       tmp_path / "run")
    assert sorted(run.rounds) == [0, 1]
    inputs = manifest(tmp_path / "run", 1, "classification")["inputs"]
    assert inputs["context"]["stage"] == "confounder_set"
    if option == "cda":
        assert inputs["instances"]["stage"] == "instance_bank"
    else:
        recam_inputs = manifest(tmp_path / "run", 1, "recam")["inputs"]
        assert recam_inputs["context"]["stage"] == "confounder_set"
        assert manifest(tmp_path / "run", 1, "seeds")["inputs"]["model"]["stage"] == "recam"
    assert_scores_match_files(run, round_index=1)
