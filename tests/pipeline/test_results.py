"""Per-run results (src/pipeline/results.py): summaries, deltas against round 0, results.json, table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from src.data.bundle import DataBundle
from src.pipeline.results import MetricMissingError, RunResults
from src.stages.core import Artifact


def artifact(stage: str, summary: dict, reused: bool = False) -> Artifact:
    manifest = {"metrics": {"summary": summary, "other": 1}, "duration_s": 12.5}
    return Artifact(stage, f"fp-{stage}", Path(f"/cache/{stage}"), manifest, reused=reused)


class FakeLayout:
    root = Path("/data/root")


def bundle(train: str = "train", val: str = "val", eval_splits=("val",), seed_eval: str = "train") -> DataBundle:
    return DataBundle(FakeLayout(), train, val, list(eval_splits), seed_eval, (0, 0, 0), (1, 1, 1), {})


@pytest.fixture
def results(tmp_path) -> RunResults:
    cfg = OmegaConf.create({"baseline": {"name": "irnet"}, "conta": {"name": "on"}, "profile": {"name": "quick"},
                            "data": {"name": "synthetic"}, "seed": 0, "optimized_metric": "segmentation/val/miou"})
    res = RunResults(cfg, tmp_path, bundle())
    res.record(0, "seeds", artifact("seeds", {"train/seed_miou": 0.40, "train/seed_best_threshold": 0.15},
                                    reused=True), 0.25)
    res.record(0, "segmentation", artifact("segmentation", {"val/miou": 0.50}), 10.0)
    res.record(1, "seeds", artifact("seeds", {"train/seed_miou": 0.45, "train/seed_best_threshold": 0.2}), 3.0)
    res.record(1, "segmentation", artifact("segmentation", {"val/miou": 0.48}), 11.0)
    return res


def test_summary_and_deltas(results):
    assert results.summary(0) == {"seeds/train/seed_miou": 0.40, "seeds/train/seed_best_threshold": 0.15,
                                  "segmentation/val/miou": 0.50}
    deltas = results.deltas()
    assert list(deltas) == [1]
    assert deltas[1] == {"seeds/train/seed_miou": pytest.approx(0.05), "segmentation/val/miou": pytest.approx(-0.02)}
    assert results.summary(7) == {}


def test_results_json(results, tmp_path):
    path = results.write()
    assert path == tmp_path / "results.json"
    data = json.loads(path.read_text())
    assert (data["baseline"], data["conta"], data["profile"], data["data"], data["seed"]) == (
        "irnet", "on", "quick", "synthetic", 0)
    assert [r["round"] for r in data["rounds"]] == [0, 1]
    seeds0 = data["rounds"][0]["stages"]["seeds"]
    assert seeds0["reused"] is True and seeds0["fingerprint"] == "fp-seeds" and seeds0["artifact"] == "/cache/seeds"
    assert data["rounds"][0]["timings_s"]["seeds"] == {"this_run": 0.25, "computed": 12.5}
    assert data["rounds"][1]["summary"]["segmentation/val/miou"] == 0.48
    assert data["deltas_vs_round0"]["1"]["segmentation/val/miou"] == pytest.approx(-0.02)
    assert data["total_time_s"] == pytest.approx(24.25)
    assert not list(tmp_path.glob("*.tmp"))


def test_table(results):
    lines = results.table().splitlines()
    header = lines[0].split()
    assert header[0] == "round"
    assert "seed fixed" in lines[0] and "best thr" in lines[0] and "seg val" in lines[0]
    assert "mask mIoU" not in lines[0] and "seed best" not in lines[0]  # no stage reported them
    assert lines[2].split() == ["0", "0.15", "40.0", "50.0"]
    assert lines[3].split() == ["1", "0.20", "45.0", "48.0"]
    assert lines[4].split() == ["1", "vs", "0", "-", "+5.0", "-2.0"]  # no delta of a threshold


def test_optimized_metric_is_the_last_rounds_value_and_missing_raises(results):
    assert results.optimized() == pytest.approx(0.48)
    results.cfg.optimized_metric = "segmentation/val2014/miou"
    with pytest.raises(MetricMissingError, match=r"optimized_metric='segmentation/val2014/miou' is not among"):
        results.optimized()
    results.cfg.optimized_metric = None
    assert results.optimized() is None


def test_columns_follow_the_data_configs_split_names(tmp_path):
    """COCO's splits are train2014 / val2014: the table's columns are named after them, not after VOC's."""
    cfg = OmegaConf.create({"baseline": {"name": "irnet"}, "seed": 0,
                            "optimized_metric": "segmentation/val2014/miou"})
    res = RunResults(cfg, tmp_path, bundle("train2014", "val2014", ["val2014"], "train2014"))
    res.record(0, "classification", artifact("classification", {"val2014/map": 0.9}), 1.0)
    res.record(0, "seeds", artifact("seeds", {"train2014/seed_miou": 0.3}), 1.0)
    res.record(0, "segmentation", artifact("segmentation", {"val2014/miou": 0.25}), 1.0)
    lines = res.table().splitlines()
    assert lines[0].split() == ["round", "cls", "mAP", "seed", "fixed", "seg", "val2014"]
    assert lines[2].split() == ["0", "90.0", "30.0", "25.0"]
    assert res.optimized() == pytest.approx(0.25)
    columns = json.loads(res.write().read_text())["columns"]
    assert ["seg val2014", "segmentation/val2014/miou"] in columns


def test_results_json_says_finished_once_every_planned_stage_is_in(tmp_path):
    cfg = OmegaConf.create({"baseline": {"name": "irnet"}, "seed": 0, "optimized_metric": None})
    res = RunResults(cfg, tmp_path, bundle())
    res.planned = 4  # two rounds of seeds + segmentation
    res.record(0, "seeds", artifact("seeds", {}), 1.0)
    res.record(0, "segmentation", artifact("segmentation", {"val/miou": 0.5}), 1.0)
    data = json.loads(res.write().read_text())
    assert (data["stages_planned"], data["finished"]) == (4, False)  # round 0 has its segmentation, round 1 not
    res.record(1, "seeds", artifact("seeds", {}), 1.0)
    res.record(1, "segmentation", artifact("segmentation", {"val/miou": 0.6}), 1.0)
    assert json.loads(res.write().read_text())["finished"] is True
