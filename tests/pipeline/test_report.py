"""Reporting: report.md with pictures per round, TensorBoard scalars and images, the sweep summary."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.callbacks.sweep_summary import write_summary
from src.pipeline.pipeline import run_pipeline
from src.pipeline.report import write_report
from src.pipeline.validate import finalize


def tags(folder: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"scalars": [], "images": []}
    for events in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        out["scalars"] += acc.Tags()["scalars"]
        out["images"] += acc.Tags()["images"]
    return out


@pytest.mark.slow
def test_report_and_tensorboard(make_cfg, tmp_path: Path) -> None:
    cfg = finalize(make_cfg("+baseline=irnet", "+conta=on", "conta.rounds=1", "logger=tensorboard",
                            "progress=none", "trainer.log_every_n_steps=1"))
    run_dir = tmp_path / "run"
    results = run_pipeline(cfg, run_dir)
    report = write_report(results, results.data, run_dir, tensorboard_dir=run_dir / "logs" / "report")
    text = report.read_text()
    for r in (0, 1):
        assert f"## Round {r}" in text
        assert (run_dir / "report" / f"round_{r}_train.png").is_file()
        assert (run_dir / "report" / f"round_{r}_val_deconfounded.png").is_file()
    assert "round_0/confounder_set/priors.png" in text and (run_dir / "round_0/confounder_set/priors.png").is_file()
    assert "seed best" in text and "| rider |" in text  # the per-class table
    scalars = tags(run_dir / "logs" / "round_0" / "classification")["scalars"]
    assert "train/loss" in scalars and "val/map" in scalars
    assert "train/loss" in tags(run_dir / "logs" / "round_1" / "segmentation")["scalars"]
    assert set(tags(run_dir / "logs" / "report")["images"]) >= {"report/round_0_train", "report/round_1_val"}


def fake_job(folder: Path, baseline: str, conta: str, seed: int, seg: list[float]) -> None:
    folder.mkdir(parents=True)
    rounds = [{"round": r, "summary": {"seeds/train/seed_miou": 0.3 + 0.01 * r, "segmentation/val/miou": v}}
              for r, v in enumerate(seg)]
    columns = [["cls mAP", "classification/val/map"], ["seed mIoU", "seeds/train/seed_miou"],
               ["seed best", "seeds/train/seed_best_miou"], ["mask mIoU", "pseudo_masks/train/mask_miou"],
               ["seg val", "segmentation/val/miou"], ["seg val_deconfounded", "segmentation/val_deconfounded/miou"]]
    (folder / "results.json").write_text(json.dumps({"baseline": baseline, "conta": conta, "seed": seed,
                                                     "rounds": rounds, "columns": columns}))


def test_sweep_summary_lists_every_job_and_round(tmp_path: Path) -> None:
    fake_job(tmp_path / "0_irnet_conta-on_seed0", "irnet", "on", 0, [0.5, 0.55, 0.6])
    fake_job(tmp_path / "1_irnet_conta-off_seed0", "irnet", "off", 0, [0.5])
    (tmp_path / "2_seam_conta-on_seed0").mkdir()  # a failed job: no results.json
    (tmp_path / "3_seam_conta-off_seed0").mkdir()
    (tmp_path / "3_seam_conta-off_seed0" / "plan.txt").write_text("round 0: classification -> seeds\n")
    rows = write_summary(tmp_path)
    assert len(rows) == 6
    assert "| 3_seam_conta-off_seed0 | dry run: plan.txt |" in (tmp_path / "sweep_summary.md").read_text()
    md = (tmp_path / "sweep_summary.md").read_text()
    assert "| 0_irnet_conta-on_seed0 | irnet | on | 0 | 2 | 32.0 | - | - | 60.0 | - |" in md
    assert "2_seam_conta-on_seed0 | no results.json" in md
    with open(tmp_path / "sweep_summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["round"] for r in table if r["job"].startswith("0_")] == ["0", "1", "2"]
    assert (tmp_path / "sweep_miou.png").stat().st_size > 1000


def test_sweep_summary_shows_swept_settings(tmp_path: Path) -> None:
    """Jobs that differ by more than baseline/conta/seed get an overrides column with what differs."""
    for num, lr in enumerate(("0.02", "0.05")):
        job = tmp_path / f"{num}_seam_conta-off_seed0"
        fake_job(job, "seam", "off", 0, [0.4 + num / 10])
        (job / ".hydra").mkdir()
        (job / ".hydra" / "overrides.yaml").write_text(
            f"- +baseline=seam\n- stop_after=seeds\n- profile.seam.lr={lr}\n- seed=0\n")
    write_summary(tmp_path)
    md = (tmp_path / "sweep_summary.md").read_text()
    assert "| job | baseline | conta | seed | overrides | round |" in md
    assert "| 0_seam_conta-off_seed0 | seam | off | 0 | profile.seam.lr=0.02 | 0 | 30.0 |" in md
    assert "| 1_seam_conta-off_seed0 | seam | off | 0 | profile.seam.lr=0.05 | 0 | 30.0 |" in md
    with open(tmp_path / "sweep_summary.csv") as f:
        assert [r["overrides"] for r in csv.DictReader(f)] == ["profile.seam.lr=0.02", "profile.seam.lr=0.05"]
