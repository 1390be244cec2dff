"""The quick pipeline earns its place on the default synthetic set: each stage against its input, every
class present, the reported scores equal to the files (tests/pipeline/checks.py).

The run is `make demo`'s round 0 (IRNet; the same config as `python -m src.run +baseline=irnet`) and the
SEAM baseline, seed 0, on 2 threads (set here: the thread count changes float summation order and, on
these small nets, the numbers by a few points; an 80-image set swung by 10). Measured on the 2-core CPU of
experiments/BENCHMARKS.md with today's profile (DeepLab lr 0.005, AffinityNet 12 epochs;
experiments/miniature/RESULTS.md "Update of 2026-12-07 (night)"): IRNet seeds 69.1 -> masks 86.8 -> seg val
84.7 (the README's demo table, round 0); SEAM seeds 88.7 -> masks 94.2 -> seg val 94.1. On another 2-core CPU
(AMD EPYC) with DeepLab at lr 0.01, SEAM's seeds were 89.6 -> masks 94.4 -> seg val 84.5, the horse's
segmentation IoU at 62.5 from masks at 92.7: the quick DeepLab's outcome swings most between CPUs, and its
lr 0.005 is what steadied it on this one. The margins leave room for another CPU's rounding, not for a stage
that degrades.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checks import assert_scores_match_files, per_class
from conftest import compose_config

from src.pipeline.pipeline import run_pipeline
from src.pipeline.validate import finalize

pytestmark = pytest.mark.slow

QUIET = ["print_config=false", "progress=none"]
THREADS = 2
FOREGROUND = ["rider", "horse", "boat", "ball", "box", "star"]


def quick_run(tmp: Path, baseline: str):
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        results = run_pipeline(finalize(compose_config([*QUIET, f"+baseline={baseline}"], tmp)), tmp / "run")
    finally:
        torch.set_num_threads(threads)
    results.write()
    print(baseline, {k: round(100 * v, 1) for k, v in results.summary(0).items() if "miou" in k})  # shown with -s
    return results


@pytest.fixture(scope="module")
def irnet(tmp_path_factory):
    return quick_run(tmp_path_factory.mktemp("irnet"), "irnet")


@pytest.fixture(scope="module")
def seam(tmp_path_factory):
    return quick_run(tmp_path_factory.mktemp("seam"), "seam")


def test_irnet_each_stage_beats_or_keeps_its_input(irnet):
    s = irnet.summary(0)
    seeds, masks, seg = s["seeds/train/seed_best_miou"], s["pseudo_masks/train/mask_miou"], s["segmentation/val/miou"]
    assert seeds >= 0.65  # measured 69.1 (3 seeds: 73.3 +- 3.9)
    assert masks >= seeds + 0.10  # the refinement gains (measured +17.7; on VOC IRNet's gains 18)
    assert seg >= masks - 0.08  # segmentation close to its masks (measured -2.1; at DeepLab lr 0.01: -4.0)
    assert not irnet.warnings()


def test_irnet_no_class_vanishes(irnet):
    for stage, path in (("seeds", ("best", "iou")), ("pseudo_masks", ("iou",)), ("segmentation", ("val", "iou"))):
        iou = per_class(irnet, 0, stage, *path)
        low = {c: iou[c] for c in FOREGROUND if iou[c] is None or iou[c] < 0.20}
        assert not low, f"{stage}: classes below 20 IoU: {low}"


def test_irnet_scores_equal_the_files(irnet):
    assert_scores_match_files(irnet)


def test_the_walked_scores_sweep_brackets_the_configured_threshold(irnet):
    metrics = irnet.rounds[0]["stages"]["pseudo_masks"]["metrics"]
    seeds = irnet.rounds[0]["stages"]["seeds"]["metrics"]
    # the quick profile's walk background is auto: the seeds' best threshold - 0.10
    assert metrics["bg_threshold"] == pytest.approx(seeds["best_threshold"] - 0.10)
    sweep = metrics["threshold_sweep"]["miou_per_threshold"]
    assert max(sweep.values()) == pytest.approx(metrics["best"]["miou"])
    assert metrics["best"]["miou"] >= metrics["miou"]  # the best of the sweep is at least the configured one


def test_seam_each_stage_keeps_its_input(seam):
    s = seam.summary(0)
    seeds, masks, seg = s["seeds/train/seed_best_miou"], s["pseudo_masks/train/mask_miou"], s["segmentation/val/miou"]
    assert seeds >= 0.80  # measured 88.7 / 89.6 on two CPUs (3 seeds: 89.5 +- 4.1 / 90.5 +- 2.9)
    assert masks >= seeds + 0.03  # measured +5.5 (3 seeds: +4.3; another CPU: +4.8, +4.1), the 12-epoch AffinityNet
    # measured -0.1 (3 seeds: -0.4); at DeepLab lr 0.01 -8.3 (3 seeds: -6.4), -9.9 on another CPU: the
    # issue's "within 5" plus room for another CPU's rounding
    assert seg >= masks - 0.08
    for stage, path in (("seeds", ("best", "iou")), ("pseudo_masks", ("iou",)), ("segmentation", ("val", "iou"))):
        iou = per_class(seam, 0, stage, *path)
        assert min(iou[c] for c in FOREGROUND) >= 0.20, (stage, iou)
    assert_scores_match_files(seam)
