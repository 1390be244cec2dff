"""Segmentation metrics (src/metrics/segmentation.py) and the scoring of written files (src/stages/predict.py,
src/stages/seeds.py) against hand-computed numbers and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from src.data.bundle import DataBundle
from src.data.voc import VOCLayout
from src.metrics.segmentation import CAMThresholdSweep, SegmentationMetric, scores_from_confusion
from src.stages.predict import score_cam_folder, score_label_folder
from src.utils.io import save_jpeg_atomic, save_label_png_atomic, save_npz_atomic, write_text_atomic


def metric_confusion(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) confusion matrix [gt, pred] of two label maps by SegmentationMetric (gt 255 ignored)."""
    metric = SegmentationMetric(num_classes)
    metric.update(torch.from_numpy(np.asarray(pred)), torch.from_numpy(np.asarray(gt)))
    return metric.compute().numpy()


def counted_confusion(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """The same matrix counted pixel by pixel in numpy: the oracle of the SegmentationMetric tests."""
    conf = np.zeros((num_classes, num_classes), np.int64)
    valid = gt != 255
    np.add.at(conf, (gt[valid].astype(np.int64), pred[valid].astype(np.int64)), 1)
    return conf


# ------------------------------------------------------------------------------ scores_from_confusion
def test_scores_hand_computed_with_absent_class():
    # rows = ground truth, columns = prediction; class 2 never occurs (neither gt nor pred)
    conf = np.array([[3, 1, 0],
                     [2, 4, 0],
                     [0, 0, 0]])
    s = scores_from_confusion(conf, ["bg", "a", "b"])
    assert s["iou"]["bg"] == pytest.approx(3 / (4 + 5 - 3))
    assert s["iou"]["a"] == pytest.approx(4 / (6 + 5 - 4))
    assert s["iou"]["b"] is None
    assert s["miou"] == pytest.approx((0.5 + 4 / 7) / 2)  # nanmean: the absent class does not count
    assert s["precision"]["bg"] == pytest.approx(3 / 5)
    assert s["precision"]["a"] == pytest.approx(4 / 5)
    assert s["precision"]["b"] is None and s["recall"]["b"] is None
    assert s["recall"]["bg"] == pytest.approx(3 / 4)
    assert s["recall"]["a"] == pytest.approx(4 / 6)
    assert s["pixel_accuracy"] == pytest.approx(7 / 10)
    assert s["mean_precision"] == pytest.approx((3 / 5 + 4 / 5) / 2)
    assert s["mean_recall"] == pytest.approx((3 / 4 + 4 / 6) / 2)


def test_scores_class_only_predicted_counts_as_zero_iou():
    # class 1 is predicted once but never in ground truth: IoU 0 (it is present), recall undefined
    conf = np.array([[2, 1],
                     [0, 0]])
    s = scores_from_confusion(torch.tensor(conf))
    assert s["iou"] == {"0": pytest.approx(2 / 3), "1": 0.0}
    assert s["miou"] == pytest.approx(1 / 3)
    assert s["precision"]["1"] == 0.0
    assert s["recall"]["1"] is None
    assert s["recall"]["0"] == pytest.approx(2 / 3)
    assert s["pixel_accuracy"] == pytest.approx(2 / 3)


def test_scores_perfect_and_empty():
    s = scores_from_confusion(np.diag([5, 0, 7]))
    assert s["miou"] == 1.0 and s["pixel_accuracy"] == 1.0
    assert s["iou"]["1"] is None
    empty = scores_from_confusion(np.zeros((3, 3), np.int64))
    assert math.isnan(empty["miou"]) and math.isnan(empty["pixel_accuracy"])


# ------------------------------------------------------------------------------- SegmentationMetric
def test_segmentation_metric_hand_computed_ignores_255():
    gt = np.array([[0, 1, 255], [2, 2, 1]], np.uint8)
    pred = np.array([[0, 2, 1], [2, 0, 1]], np.uint8)
    expected = np.array([[1, 0, 0],
                         [0, 1, 1],
                         [1, 0, 1]])
    metric = SegmentationMetric(3)
    metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
    conf = metric.compute()
    assert isinstance(conf, torch.Tensor)
    np.testing.assert_array_equal(conf.numpy(), expected)
    np.testing.assert_array_equal(counted_confusion(pred, gt, 3), expected)  # the oracle below agrees


def test_segmentation_metric_equals_counted_confusion_and_ignores_255():
    rng = np.random.default_rng(0)
    n = 4
    metric = SegmentationMetric(n, class_names=["bg", "a", "b", "c"])
    total = np.zeros((n, n), np.int64)
    for _ in range(3):
        gt = rng.integers(0, n, (2, 9, 7)).astype(np.uint8)
        gt[rng.random(gt.shape) < 0.2] = 255
        pred = rng.integers(0, n, gt.shape).astype(np.uint8)
        metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
        total += counted_confusion(pred, gt, n)
    np.testing.assert_array_equal(metric.compute().numpy(), total)
    assert total.sum() < 3 * 2 * 9 * 7  # some pixels were ignored
    s = metric.scores()
    assert s == scores_from_confusion(total, ["bg", "a", "b", "c"])
    assert set(s["iou"]) == {"bg", "a", "b", "c"}


def test_segmentation_metric_prediction_at_ignored_pixels_is_irrelevant():
    gt = torch.tensor([[0, 1], [255, 255]])
    a, b = SegmentationMetric(2), SegmentationMetric(2)
    a.update(torch.tensor([[0, 1], [0, 0]]), gt)
    b.update(torch.tensor([[0, 1], [1, 1]]), gt)
    np.testing.assert_array_equal(a.compute().numpy(), [[1, 0], [0, 1]])
    np.testing.assert_array_equal(b.compute().numpy(), [[1, 0], [0, 1]])


# ----------------------------------------------------------------------------------- CAM threshold sweep
def brute_force(scores: np.ndarray, keys: np.ndarray, gt: np.ndarray, t: float, num_classes: int) -> np.ndarray:
    """Background plane at t, argmax (the first maximum wins: background on ties), keys -> class ids."""
    planes = np.concatenate([np.full((1, *gt.shape), t, np.float64), scores.astype(np.float64)])
    idx = planes.argmax(0)
    lut = np.concatenate([[0], np.asarray(keys, np.int64)])
    return metric_confusion(lut[idx], gt, num_classes)


def test_sweep_hand_computed_one_class():
    scores = np.array([[[0.2, 0.6], [0.9, 0.4]]])
    gt = np.array([[0, 1], [1, 255]], np.uint8)
    sweep = CAMThresholdSweep(2, [0.7, 0.3, 0.5])  # unsorted on purpose
    sweep.update(scores, np.array([1]), gt)
    np.testing.assert_array_equal(sweep.confusion(0), [[1, 0], [0, 2]])  # t = 0.3
    np.testing.assert_array_equal(sweep.confusion(1), [[1, 0], [0, 2]])  # t = 0.5
    np.testing.assert_array_equal(sweep.confusion(2), [[1, 0], [1, 1]])  # t = 0.7: 0.6 is background
    res = sweep.results(["bg", "x"])
    assert res["thresholds"] == [0.3, 0.5, 0.7]
    assert res["miou_per_threshold"] == pytest.approx([1.0, 1.0, 0.5])
    assert res["best_threshold"] == 0.3
    assert res["best"]["iou"]["x"] == 1.0


def test_sweep_hand_computed_keys_and_ties():
    # classes 1..3; this image holds keys 3 and 1 (in that order): the scores' rows map to those ids
    scores = np.array([[[0.5, 0.8, 0.2]],    # key 3
                       [[0.5, 0.1, 0.6]]])   # key 1
    gt = np.array([[3, 3, 1]], np.uint8)
    sweep = CAMThresholdSweep(4, [0.5, 0.6])
    sweep.update(scores, np.array([3, 1]), gt)
    # t = 0.5: pixel 0 ties with the background plane -> 0; pixel 1 -> 3; pixel 2 -> 1
    expected_05 = np.zeros((4, 4), np.int64)
    expected_05[3, 0] = 1
    expected_05[3, 3] = 1
    expected_05[1, 1] = 1
    np.testing.assert_array_equal(sweep.confusion(0), expected_05)
    # t = 0.6: pixel 2 (0.6) ties with the plane -> background
    expected_06 = expected_05.copy()
    expected_06[1, 1], expected_06[1, 0] = 0, 1
    np.testing.assert_array_equal(sweep.confusion(1), expected_06)


@pytest.mark.parametrize("seed", range(5))
def test_sweep_equals_brute_force_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    num_classes = 5  # background + 4
    thresholds = [k / 10 for k in range(0, 11)]  # the scores below are on the same grid: exact ties
    sweep = CAMThresholdSweep(num_classes, thresholds)
    images = []
    for i in range(6):
        h, w = rng.integers(3, 9, 2)
        n = 0 if i == 0 else int(rng.integers(1, num_classes))  # image 0 holds no class
        keys = np.sort(rng.choice(np.arange(1, num_classes), n, replace=False))
        scores = rng.integers(0, 11, (n, h, w)) / 10
        gt = rng.integers(0, num_classes, (h, w)).astype(np.uint8)
        gt[rng.random((h, w)) < 0.15] = 255
        sweep.update(scores, keys, gt)
        images.append((scores, keys, gt))
    for j, t in enumerate(thresholds):
        expected = sum(brute_force(s, k, g, t, num_classes) for s, k, g in images)
        np.testing.assert_array_equal(sweep.confusion(j), expected, err_msg=f"threshold {t}")
    res = sweep.results()
    for j, t in enumerate(thresholds):
        expected = sum(brute_force(s, k, g, t, num_classes) for s, k, g in images)
        m = scores_from_confusion(expected)["miou"]
        assert res["miou_per_threshold"][j] == pytest.approx(m, nan_ok=True)
    assert res["best_threshold"] == thresholds[int(np.nanargmax(res["miou_per_threshold"]))]


def test_sweep_merge_equals_single_pass():
    rng = np.random.default_rng(7)
    thresholds = [0.1, 0.3, 0.5]
    whole, a, b = (CAMThresholdSweep(3, thresholds) for _ in range(3))
    for i in range(4):
        scores = rng.random((2, 5, 5))
        gt = rng.integers(0, 3, (5, 5)).astype(np.uint8)
        whole.update(scores, np.array([1, 2]), gt)
        (a if i % 2 else b).update(scores, np.array([1, 2]), gt)
    a.merge_state(b)  # torchmetrics' merge: the histograms (a summed state) add up
    assert isinstance(a.hist, torch.Tensor)
    np.testing.assert_array_equal(a.hist.numpy(), whole.hist.numpy())
    assert a.results()["miou_per_threshold"] == whole.results()["miou_per_threshold"]


def test_sweep_image_without_class_is_all_background():
    sweep = CAMThresholdSweep(3, [0.2, 0.4])
    gt = np.array([[0, 2], [1, 255]], np.uint8)
    sweep.update(np.zeros((0, 2, 2)), np.zeros(0, np.int64), gt)
    expected = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0]])
    for j in range(2):
        np.testing.assert_array_equal(sweep.confusion(j), expected)


# -------------------------------------------------------------------------------- scoring written files
@pytest.fixture
def tiny_layout(tmp_path):
    root = tmp_path / "voc"
    gts = {"a": np.array([[0, 1], [1, 255]], np.uint8), "b": np.array([[2, 2], [0, 0]], np.uint8)}
    for image_id, gt in gts.items():
        save_jpeg_atomic(root / "JPEGImages" / f"{image_id}.jpg", np.zeros((2, 2, 3), np.uint8))
        save_label_png_atomic(root / "SegmentationClass" / f"{image_id}.png", gt)
    write_text_atomic(root / "ImageSets" / "Segmentation" / "train.txt", "a\nb\n")
    layout = VOCLayout(root, ["x", "y"])
    data = DataBundle(layout, train_split="train", val_split="train", eval_splits=["train"],
                      seed_eval_split="train", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), loader={})
    assert data.class_names == ["background", "x", "y"]
    return data, gts


def test_score_label_folder_reads_files(tiny_layout, tmp_path):
    data, gts = tiny_layout
    preds = {"a": np.array([[0, 1], [0, 2]], np.uint8), "b": np.array([[2, 0], [0, 0]], np.uint8)}
    for image_id, pred in preds.items():
        save_label_png_atomic(tmp_path / "pred" / f"{image_id}.png", pred)
    out = score_label_folder(data, ["a", "b"], tmp_path / "pred")
    conf = sum(metric_confusion(preds[i], gts[i], 3) for i in ("a", "b"))
    assert out["miou"] == pytest.approx(scores_from_confusion(conf)["miou"])
    # by hand: bg 3/4 right (+1 missed y pixel as bg), x: 1 of 2, y: 1 of 2
    assert out["iou"]["background"] == pytest.approx(3 / (3 + 2))
    assert out["iou"]["x"] == pytest.approx(1 / 2)
    assert out["iou"]["y"] == pytest.approx(1 / 2)
    assert out["images"] == 2
    save_label_png_atomic(tmp_path / "pred" / "a.png", np.zeros((3, 2), np.uint8))
    with pytest.raises(ValueError, match=r"a\.png is \(3, 2\), ground truth is \(2, 2\)"):
        score_label_folder(data, ["a"], tmp_path / "pred")


def test_score_label_folder_rejects_out_of_range_prediction_ids(tiny_layout, tmp_path):
    """SegmentationMetric does not check class ids (torchmetrics with validate_args=False); the scoring of
    written label maps does, for the predictions."""
    data, _ = tiny_layout
    save_label_png_atomic(tmp_path / "pred" / "a.png", np.full((2, 2), 5, np.uint8))
    with pytest.raises(ValueError, match=r"a\.png holds class id 5 >= 3"):
        score_label_folder(data, ["a"], tmp_path / "pred")


def test_score_cam_folder_reads_npz(tiny_layout, tmp_path):
    data, gts = tiny_layout
    save_npz_atomic(tmp_path / "cams" / "a.npz", high_res=np.array([[[0.1, 0.9], [0.4, 0.8]]]), keys=np.array([1]))
    save_npz_atomic(tmp_path / "cams" / "b.npz", high_res=np.array([[[0.6, 0.2], [0.1, 0.1]]]), keys=np.array([2]))
    out = score_cam_folder(data, ["a", "b"], tmp_path / "cams", [0.3, 0.5], 0.5)
    # t = 0.5: a -> [[0,1],[0,-]], b -> [[2,0],[0,0]]
    conf = np.array([[3, 0, 0], [1, 1, 0], [1, 0, 1]])
    assert out["at_threshold"]["miou"] == pytest.approx(scores_from_confusion(conf)["miou"])
    # t = 0.3: a pixel (1,0) 0.4 -> x (correct); best threshold is 0.3
    conf03 = np.array([[3, 0, 0], [0, 2, 0], [1, 0, 1]])
    assert out["miou_per_threshold"][0.3] == pytest.approx(scores_from_confusion(conf03)["miou"])
    assert out["best_threshold"] == 0.3
    assert out["threshold"] == 0.5 and out["images"] == 2


def test_seed_metrics_widens_a_sweep_whose_best_is_its_end(tiny_layout, tmp_path):
    """A best threshold at the upper end of the sweep is only a lower bound: the sweep goes on to 1."""
    from types import SimpleNamespace

    from src.stages.seeds import seed_metrics, widen

    data, _ = tiny_layout
    save_npz_atomic(tmp_path / "cams" / "a.npz", high_res=np.array([[[0.1, 0.9], [0.4, 0.8]]]), keys=np.array([1]))
    save_npz_atomic(tmp_path / "cams" / "b.npz", high_res=np.array([[[0.6, 0.2], [0.1, 0.1]]]), keys=np.array([2]))
    assert data.seed_eval_ids() == ["a", "b"] and data.seed_metric_split == "train"
    ctx = SimpleNamespace(data=data)
    # 0.05 labels the 0.1 background pixels as foreground, 0.1 does not: the best is the top of the sweep
    capped = seed_metrics(ctx, tmp_path / "cams", 0.1, [0.05, 0.1])
    assert capped["widened_from"] == 0.1 and max(capped["miou_per_threshold"]) == 0.95
    assert capped["summary"]["train/seed_best_threshold"] == 0.1  # ties keep the lowest threshold
    assert capped["provides"] == {"best_threshold": 0.1}
    # scoring only the new thresholds and merging gives what one sweep over the widened range gives
    whole = score_cam_folder(data, ["a", "b"], tmp_path / "cams", widen([0.05, 0.1], 0.1), 0.1)
    assert capped["miou_per_threshold"] == whole["miou_per_threshold"]
    assert capped["best"] == whole["best"] and capped["at_threshold"] == whole["at_threshold"]
    inside = seed_metrics(ctx, tmp_path / "cams", 0.1, [0.05, 0.1, 0.3])
    assert inside["summary"]["train/seed_best_threshold"] == 0.1 and "widened_from" not in inside
    assert widen([0.0, 0.2, 0.4], 0.4) == [0.0, 0.2, 0.4, 0.6, 0.8] and widen([0.0, 0.2, 0.4], 0.2) is None
    assert widen([0.5, 1.0], 1.0) is None
