"""The sweep summary's seed groups (src/callbacks/sweep_summary.py): mean +- sample std over seeds, the
difference to conta=off / debias=none with a 95% Welch interval, on fake jobs with hand-computed numbers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from src.callbacks.sweep_summary import t_quantile, welch_interval, write_summary

COLUMNS = [["seed mIoU", "seeds/train/seed_miou"], ["mask mIoU", "pseudo_masks/train/mask_miou"]]


def fake_job(sweep: Path, num: int, baseline: str, debias: str, seed: int, masks: list[float],
             overrides: list[str] = ()) -> None:
    """A finished job: one round per mask mIoU (seed mIoU fixed at 0.4)."""
    folder = sweep / f"{num}_{baseline}_conta-off_debias-{debias}_seed{seed}"
    folder.mkdir(parents=True)
    rounds = [{"round": r, "summary": {"seeds/train/seed_miou": 0.4, "pseudo_masks/train/mask_miou": m}}
              for r, m in enumerate(masks)]
    (folder / "results.json").write_text(json.dumps({
        "baseline": baseline, "conta": "off", "methods": {"conta": "off", "debias": debias}, "seed": seed,
        "rounds": rounds, "columns": COLUMNS}))
    (folder / ".hydra").mkdir()
    lines = [f"+baseline={baseline}", f"+debias={debias}", f"seed={seed}", *overrides]
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in lines))


@pytest.mark.parametrize(("df", "expected"), [(1, 12.7062047362), (2, 4.3026527299), (4, 2.7764451052),
                                              (10, 2.2281388520), (30, 2.0422724563), (1e7, 1.9599640)])
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)
    # df = 2 has a closed form: t = (2p - 1) / sqrt(2 p (1 - p))
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-9)


def test_welch_interval_by_hand():
    # equal sample std 0.02, n = 3 each: se = sqrt(2 * 0.0004 / 3), Welch df = 2 (n - 1) = 4
    d = welch_interval([0.56, 0.58, 0.60], [0.50, 0.52, 0.54])
    se = math.sqrt(2 * 0.0004 / 3)
    assert d["diff"] == pytest.approx(0.06) and d["df"] == pytest.approx(4.0)
    assert d["low"] == pytest.approx(0.06 - 2.7764451052 * se) and d["high"] == pytest.approx(0.06 + 2.7764451052 * se)
    # unequal variances, unequal n: df = (va + vb)^2 / (va^2 / (na - 1) + vb^2 / (nb - 1))
    a, b = [1.0, 2.0, 4.0, 7.0], [0.0, 1.0]
    va, vb = 7.0 / 4, 0.5 / 2  # sample variances 7 and 0.5 over n
    assert welch_interval(a, b)["df"] == pytest.approx((va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 1))
    same = welch_interval([0.5, 0.5], [0.5, 0.5])
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0, "df": None}  # identical seeds: a zero-width interval
    assert welch_interval([0.5], [0.4, 0.6])["low"] is None  # one seed: no std, no interval


def test_seed_groups_mean_std_and_difference_to_none(tmp_path):
    for seed, (base, cda) in enumerate([(0.50, 0.56), (0.52, 0.58), (0.54, 0.60)]):
        fake_job(tmp_path, 3 * seed, "irnet", "none", seed, [base])
        fake_job(tmp_path, 3 * seed + 1, "irnet", "cda", seed, [base, cda])  # round 0 = the none job's
    fake_job(tmp_path, 9, "irnet", "recam", 0, [0.57])                       # a single seed
    fake_job(tmp_path, 10, "seam", "recam", 0, [0.30])                       # no seam reference job
    rows = write_summary(tmp_path)
    assert len(rows) == 11  # one row per (job, round)
    md = (tmp_path / "sweep_summary.md").read_text()
    # the per-job table names the debias option of each job
    assert "| job | baseline | conta | debias | seed | round | seed mIoU | mask mIoU |" in md
    assert "| 1_irnet_conta-off_debias-cda_seed0 | irnet | off | cda | 0 | 1 | 40.0 | 56.0 |" in md
    # mean +- sample std over seeds
    assert "| baseline | conta | debias | round | seeds | seed mIoU | mask mIoU |" in md
    assert "| irnet | off | none | 0 | 0, 1, 2 | 40.0 ± 0.0 | 52.0 ± 2.0 |" in md
    assert "| irnet | off | cda | 1 | 0, 1, 2 | 40.0 ± 0.0 | 58.0 ± 2.0 |" in md
    assert "| irnet | off | recam | 0 | 0 | 40.0 | 57.0 |" in md
    grouped = md.split("## Over seeds")[1].split("## Difference")[0]
    assert grouped.index("| irnet | off | none |") < grouped.index("| irnet | off | cda |")  # the reference first
    # differences: +6.0 +- 2.7764 * sqrt(2 * 0.0004 / 3) = [+1.47, +10.53]; round 0 of CDA holds the none jobs'
    # numbers: difference 0, and Welch's (unpaired) interval is as wide as the seed spread says
    assert "| irnet | off | cda | 1 | +0.0 [+0.0, +0.0] | +6.0 [+1.5, +10.5] |" in md
    assert "| irnet | off | cda | 0 | +0.0 [+0.0, +0.0] | +0.0 [-4.5, +4.5] |" in md
    assert "| irnet | off | recam | 0 | +0.0 | +5.0 |" in md  # one seed: no interval
    assert "| seam | off | recam |" in md.split("## Difference")[0] and "| seam |" not in md.split("## Difference")[1]
    with open(tmp_path / "sweep_groups.csv") as f:
        table = list(csv.DictReader(f))
    cda = next(r for r in table if r["debias"] == "cda" and r["round"] == "1" and r["metric"] == "mask mIoU")
    half = 2.7764451052 * math.sqrt(2 * 0.0004 / 3)
    assert float(cda["mean"]) == pytest.approx(0.58) and float(cda["std"]) == pytest.approx(0.02)
    assert float(cda["ref_mean"]) == pytest.approx(0.52) and cda["n"] == "3" and cda["ref_n"] == "3"
    assert float(cda["ci95_low"]) == pytest.approx(0.06 - half)
    assert float(cda["ci95_high"]) == pytest.approx(0.06 + half)
    assert float(cda["welch_df"]) == pytest.approx(4.0)


def test_jobs_with_other_settings_are_not_pooled(tmp_path):
    for seed in (0, 1):
        fake_job(tmp_path, seed, "irnet", "none", seed, [0.5 + 0.02 * seed], ["profile.cam.lr=0.05"])
        fake_job(tmp_path, 2 + seed, "irnet", "none", seed, [0.4 + 0.02 * seed], ["profile.cam.lr=0.1"])
        fake_job(tmp_path, 4 + seed, "irnet", "cda", seed, [0.5 + 0.02 * seed, 0.45], ["profile.cam.lr=0.1"])
    write_summary(tmp_path)
    md = (tmp_path / "sweep_summary.md").read_text()
    assert "| irnet | off | none | profile.cam.lr=0.05 | 0 | 0, 1 | 40.0 ± 0.0 | 51.0 ± 1.4 |" in md
    assert "| irnet | off | none | profile.cam.lr=0.1 | 0 | 0, 1 | 40.0 ± 0.0 | 41.0 ± 1.4 |" in md
    # cda at lr 0.1 is compared with none at lr 0.1 (41.0), not at 0.05: 45.0 - 41.0, sd 0 vs 0.0141 (df 1)
    half = 12.7062047362 * math.sqrt(0.0002 / 2)
    assert f"| irnet | off | cda | profile.cam.lr=0.1 | 1 | +0.0 [+0.0, +0.0] | +4.0 [{100 * (0.04 - half):+.1f}, " \
           f"{100 * (0.04 + half):+.1f}] |" in md
