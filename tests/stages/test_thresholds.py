"""CAM-scale thresholds from the seeds' best threshold (``auto``) and the walked scores' threshold sweep."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from src.data.bundle import DataBundle
from src.data.voc import VOCLayout
from src.ops.random_walk import walked_labels, walked_scores
from src.stages.affinity_labels import AffinityLabelStage
from src.stages.core import WALKED, Artifact, ParameterError, alpha_for_threshold, auto_threshold
from src.stages.ir_labels import IRLabelStage
from src.stages.pseudo_masks import IRNRandomWalkStage
from src.utils.io import save_jpeg_atomic, save_label_png_atomic, save_npz_atomic, write_text_atomic


def seeds_artifact(tmp_path: Path, best: float | None) -> Artifact:
    provides = {} if best is None else {"best_threshold": best}
    return Artifact("seeds", "fp", tmp_path / "seeds", {"provides": provides})


def test_auto_threshold_is_the_seeds_best_plus_the_offset_clipped(tmp_path):
    seeds = seeds_artifact(tmp_path, 0.57)
    assert auto_threshold("auto", 0.10, seeds, "conf_fg") == pytest.approx(0.67)
    assert auto_threshold("auto", -0.10, seeds, "conf_bg") == pytest.approx(0.47)
    assert auto_threshold("auto", 0.60, seeds, "conf_fg") == 0.99  # clipped into (0, 1)
    assert auto_threshold("auto", -0.60, seeds, "conf_bg") == 0.01
    assert auto_threshold(0.3, 0.10, seeds, "conf_fg") == 0.3  # a number is used as given
    with pytest.raises(ParameterError, match=r"conf_fg must be <= 1.0, got 1.5"):
        auto_threshold(1.5, 0.0, seeds, "conf_fg")


def test_auto_threshold_without_scored_seeds_says_what_to_set(tmp_path):
    with pytest.raises(ValueError, match=r"conf_bg=auto needs the seeds' best threshold.*set conf_bg to a number"):
        auto_threshold("auto", -0.1, seeds_artifact(tmp_path, None), "conf_bg")


@pytest.mark.parametrize("threshold", [0.1, 0.26, 0.57, 0.9])
def test_alpha_for_threshold_puts_the_background_equal_to_the_score_there(threshold):
    alpha = alpha_for_threshold(threshold)
    assert (1 - threshold) ** alpha == pytest.approx(threshold)
    # with SEAM's VOC seeds (best ~0.26) the offsets of conf/refinement/affinity.yaml give ~4.5 / ~22 (paper 4 / 24)
    assert alpha_for_threshold(0.26) == pytest.approx(4.47, abs=0.01)
    assert alpha_for_threshold(0.10) == pytest.approx(21.85, abs=0.01)


def ctx_with_seeds(tmp_path: Path, best: float) -> SimpleNamespace:
    seeds = seeds_artifact(tmp_path, best)
    return SimpleNamespace(input=lambda role: seeds, optional=lambda role: None)


def test_ir_labels_resolve_auto_thresholds_from_the_seeds(tmp_path):
    stage = IRLabelStage("auto", "auto", {"conf_fg": 0.10, "conf_bg": -0.10}, None, 1)
    stage.build_module(ctx_with_seeds(tmp_path, 0.5))
    assert (stage._fg, stage._bg) == (pytest.approx(0.6), pytest.approx(0.4))
    scores = np.array([[[0.7, 0.5, 0.3]]], np.float32)  # one class, three pixels
    # 0.7 > conf_fg: class; 0.5 between: unknown; 0.3 < conf_bg: background
    np.testing.assert_array_equal(stage.label(scores, np.array([2]), None), [[2, 255, 0]])
    with pytest.raises(ValueError, match="conf_bg <= conf_fg"):
        IRLabelStage(0.2, 0.3, {"conf_fg": 0.1, "conf_bg": -0.1}, None, 1)


def test_affinity_labels_resolve_auto_alphas(tmp_path):
    stage = AffinityLabelStage("auto", "auto", {"alpha_low": 0.0, "alpha_high": -0.16}, None, 1)
    stage.build_module(ctx_with_seeds(tmp_path, 0.26))
    assert stage._low == pytest.approx(4.47, abs=0.01) and stage._high == pytest.approx(21.85, abs=0.01)


def tiny_data(tmp_path: Path) -> DataBundle:
    root = tmp_path / "voc"
    gt = np.array([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], np.uint8)
    save_jpeg_atomic(root / "JPEGImages" / "a.jpg", np.zeros((4, 4, 3), np.uint8))
    save_label_png_atomic(root / "SegmentationClass" / "a.png", gt)
    write_text_atomic(root / "ImageSets" / "Segmentation" / "train.txt", "a\n")
    return DataBundle(VOCLayout(root, ["x"]), "train", "train", ["train"], "train", (0.5,) * 3, (0.25,) * 3, {})


def test_walked_scores_upsample_and_divide_by_the_global_max():
    walked = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    up = walked_scores(walked, (3, 3), 2)  # 2 x 2 at stride 2 -> 4 x 4, cropped to 3 x 3
    assert up.shape == (1, 3, 3) and float(up.max()) == pytest.approx(1.0)
    assert float(up[0, 0, 0]) == pytest.approx(1.0) and float(up[0, 2, 2]) < float(up[0, 1, 1]) < 1.0
    assert walked_scores(torch.zeros(1, 2, 2), (4, 4), 2).abs().sum() == 0  # nothing walked: all zero
    labels = walked_labels(walked, np.array([3]), (3, 3), 0.5, 2)
    np.testing.assert_array_equal(labels > 0, (up[0] > 0.5).numpy())


def test_the_walk_scores_its_masks_at_the_configured_and_the_best_background_threshold(tmp_path):
    data = tiny_data(tmp_path)
    # the walked score of class 1 at stride 1: inside 0.9, a ring of 0.5 at the border, corners 0.1
    cam = np.array([[0.1, 0.5, 0.5, 0.1], [0.5, 0.9, 0.9, 0.5], [0.5, 0.9, 0.9, 0.5], [0.1, 0.5, 0.5, 0.1]])
    folder = tmp_path / "walk" / "masks"
    save_npz_atomic(folder.parent / WALKED / "a.npz", keys=np.array([1]), cam=cam[None].astype(np.float16),
                    edge=np.zeros((4, 4), np.float16))
    stage = IRNRandomWalkStage(96, 5, 10, 1, 0.3, 0.0, {"start": 0.0, "stop": 1.0, "step": 0.1}, 1)
    stage._threshold, stage._stride = 0.3, 1
    walked_mask = walked_labels(torch.from_numpy(cam[None]).float(), np.array([1]), (4, 4), 0.3, 1)
    save_label_png_atomic(folder / "a.png", walked_mask)
    res = stage.score(SimpleNamespace(data=data), folder)
    # at 0.3 the ring joins the object: IoU 4 / 12; from 0.6 (0.5 / 0.9 < t) exactly the object: IoU 1
    assert res["bg_threshold"] == 0.3 and res["iou"]["x"] == pytest.approx(4 / 12)
    assert res["summary"]["train/mask_miou"] == pytest.approx((4 / 12 + 4 / 12) / 2)  # background: 4 of 12
    assert res["summary"]["train/mask_best_threshold"] == pytest.approx(0.6)
    assert res["summary"]["train/mask_best_miou"] == pytest.approx(1.0)
