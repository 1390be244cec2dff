"""End-to-end ESOL runs on the tiny synthetic set (real config, real stages): every stage runs, the samplers'
offsets move off the regular grid, and CONTA's context reaches the ESOL stages of round 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checks import assert_scores_match_files

from src.pipeline.pipeline import run_pipeline
from src.pipeline.validate import finalize

pytestmark = pytest.mark.slow

# the CAM net at output stride 8: the quick profile's 16 leaves 3 x 3 maps on the tiny 48 px images
ESOL_TINY = ["profile.esol.epochs=2", "profile.esol.shrink_epochs=2", "profile.esol.batch_size=8",
             "profile.cam.backbone.strides=[2,2,1,1]"]
STAGES = ["classification", "expansion", "shrinkage", "expansion_seeds", "seeds", "ir_labels", "irn",
          "pseudo_masks", "segmentation"]


def test_esol_runs_every_stage_and_moves_the_offsets(make_cfg, tmp_path: Path) -> None:
    results = run_pipeline(finalize(make_cfg("+baseline=esol", *ESOL_TINY)), tmp_path / "run")
    data = json.loads(results.write().read_text())
    stages = data["rounds"][0]["stages"]
    assert list(stages) == STAGES
    for name in ("expansion", "shrinkage"):
        metrics = stages[name]["metrics"]
        history = metrics["offset_abs_per_epoch"]
        assert len(history) == 2 and all(v > 0 for v in history), (name, history)  # the grid starts at 0
        assert metrics["summary"]["train/offset_abs"] == history[-1]
        assert "val/map" in metrics["summary"]
    assert {"expansion_seeds/train/seed_best_miou", "seeds/train/seed_best_miou", "pseudo_masks/train/mask_miou",
            "segmentation/val/miou"} <= set(data["rounds"][0]["summary"])
    assert_scores_match_files(results)
    run = tmp_path / "run" / "round_0"
    for name in ("seeds", "expansion_seeds"):
        assert len(list((run / name / "cams").glob("*.npz"))) == 16
    # the seeds read the shrinkage net, the expansion seeds the expansion net
    seeds_manifest = json.loads((run / "seeds" / "manifest.json").read_text())
    assert seeds_manifest["inputs"]["model"]["stage"] == "shrinkage"
    shrink = torch.load(run / "shrinkage" / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    expand = torch.load(run / "expansion" / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert shrink["net.shrinkage.offset.weight"].abs().max() > 0  # the shrinkage sampler trained (zero init)
    torch.testing.assert_close(shrink["net.expansion.offset.weight"], expand["net.expansion.offset.weight"])
    torch.testing.assert_close(shrink["net.backbone.conv1.weight"], expand["net.backbone.conv1.weight"])


def test_esol_with_conta_feeds_the_context_to_the_esol_stages(make_cfg, tmp_path: Path) -> None:
    cfg = finalize(make_cfg("+baseline=esol", "+conta=on", "conta.rounds=1", *ESOL_TINY))
    results = run_pipeline(cfg, tmp_path / "run")
    assert sorted(results.rounds) == [0, 1]
    assert list(results.rounds[1]["stages"]) == STAGES
    run = tmp_path / "run" / "round_1"
    for name in ("expansion", "shrinkage", "expansion_seeds", "seeds"):
        manifest = json.loads((run / name / "manifest.json").read_text())
        assert manifest["inputs"]["context"]["stage"] == "confounder_set", name
    shrink = torch.load(run / "shrinkage" / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("context.") for k in shrink)  # CONTA's module travels with the ESOL nets
    feature = shrink["net.backbone.layer4.0.conv2.weight"].shape[0]
    assert shrink["net.shrink_classifier.weight"].shape[1] == feature + 1  # the prior's channel
