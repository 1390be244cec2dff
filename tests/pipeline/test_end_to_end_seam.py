"""End-to-end runs of the SEAM and SEAM + IRNet baselines on the tiny synthetic set (real config, real stages),
and CONTA on SEAM switched on by config alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from checks import assert_scores_match_files

from src.pipeline.pipeline import run_pipeline
from src.pipeline.validate import finalize
from src.utils.io import load_npz, read_label

pytestmark = pytest.mark.slow

# conftest.TINY shrinks the data and IRNet / DeepLab blocks; these shrink the SEAM and AffinityNet blocks.
# radius 3: the 48 px crops give 6 x 6 AffinityNet maps (radius 5 needs more than 8 columns).
TINY_SEAM = [
    "profile.seam.epochs=1",
    "profile.seam.batch_size=8",
    "profile.seam.crop=48",
    "profile.seam.long_side=[40,56]",
    "profile.affinity.epochs=1",
    "profile.affinity.batch_size=8",
    "profile.affinity.crop=48",
    "profile.affinity.radius=3",
    "profile.seam.irn_epochs=1",  # seam_irnet's IRN (its own epochs, not profile.irn's)
]
N_TRAIN = 16  # conftest.TINY


def summary_values(data: dict, keys: tuple[str, ...]) -> None:
    assert set(keys) <= set(data["rounds"][0]["summary"])


def test_seam_conta_off_runs_every_stage(make_cfg, tmp_path: Path) -> None:
    cfg = finalize(make_cfg("+baseline=seam", *TINY_SEAM))
    results = run_pipeline(cfg, tmp_path / "run")
    data = json.loads(results.write().read_text())
    assert [r["round"] for r in data["rounds"]] == [0]
    assert list(data["rounds"][0]["stages"]) == ["classification", "seeds", "affinity_labels", "affinity",
                                                 "pseudo_masks", "segmentation"]
    summary_values(data, ("classification/val/map", "seeds/train/seed_miou", "seeds/train/seed_best_miou",
                          "affinity_labels/train/aff_label_coverage", "pseudo_masks/train/mask_miou",
                          "segmentation/val/miou", "segmentation/val_deconfounded/miou"))
    run = tmp_path / "run" / "round_0"
    cams = sorted((run / "seeds" / "cams").glob("*.npz"))
    assert len(cams) == N_TRAIN
    seeds = load_npz(cams[0])
    assert seeds["high_res"].shape[1:] == (48, 48) and seeds["cam"].shape[1:] == (12, 12)
    assert seeds["high_res"].min() >= 0 and seeds["high_res"].max() <= 1
    labels = sorted((run / "affinity_labels" / "labels").glob("*.png"))
    masks = sorted((run / "pseudo_masks" / "masks").glob("*.png"))
    assert len(labels) == len(masks) == N_TRAIN
    for path in labels[:4]:
        assert set(np.unique(read_label(path))) <= {0, 255, *range(1, cfg.data.num_classes + 1)}
    assert read_label(masks[0]).shape == (48, 48)
    assert (run / "affinity" / "model.ckpt").is_file()
    assert "mask mIoU" in results.table()


def test_seam_irnet_feeds_seam_seeds_to_irn(make_cfg, tmp_path: Path) -> None:
    cfg = finalize(make_cfg("+baseline=seam_irnet", *TINY_SEAM))
    results = run_pipeline(cfg, tmp_path / "run")
    stages = results.rounds[0]["stages"]
    assert list(stages) == ["classification", "seeds", "ir_labels", "irn", "pseudo_masks", "segmentation"]
    # the IRNet stages ran on the SEAM seeds artifact, with the thresholds of the seam_irnet config
    ir_manifest = json.loads((tmp_path / "run" / "round_0" / "ir_labels" / "manifest.json").read_text())
    assert stages["seeds"]["fingerprint"] in json.dumps(ir_manifest)
    assert cfg.baseline.refinement.ir_labels.conf_fg == cfg.profile.seam.irn_thresholds.conf_fg
    assert {"seeds/train/seed_miou", "ir_labels/train/ir_label_coverage", "pseudo_masks/train/mask_miou",
            "segmentation/val/miou"} <= set(results.summary(0))
    assert_scores_match_files(results)
    assert len(list((tmp_path / "run" / "round_0" / "pseudo_masks" / "masks").glob("*.png"))) == N_TRAIN


def test_seam_conta_on_by_config_alone(make_cfg, tmp_path: Path) -> None:
    on = run_pipeline(finalize(make_cfg("+baseline=seam", "+conta=on", "conta.rounds=1", *TINY_SEAM)),
                      tmp_path / "on")
    assert sorted(on.rounds) == [0, 1]
    assert list(on.rounds[0]["stages"])[-1] == "confounder_set"
    # round 1: SEAM's classifier trained with the context prior (its checkpoint holds the context module)
    import torch

    ckpt = torch.load(tmp_path / "on" / "round_1" / "classification" / "model.ckpt", map_location="cpu",
                      weights_only=False)
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("context.") for k in keys)
    widened = ckpt["state_dict"]["net.classifier.weight"]
    assert widened.shape[1] == 128 + 1  # the quick trunk's 128 features (tiny ResNet layer4) + the prior channel
    for stage in ("classification", "seeds", "pseudo_masks", "segmentation"):
        assert not on.rounds[1]["stages"][stage]["reused"], stage
    assert_scores_match_files(on, round_index=1)
    assert "1 vs 0" in on.table()
