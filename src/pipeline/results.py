"""Per-run results: ``results.json`` and the end-of-run table.

Every stage returns metrics with a ``summary`` dict of headline scalars named ``split/metric``
(``train/seed_miou``, ``train/mask_miou``, ``val/miou``...); the table shows them per round, and with
a round method the deltas against round 0. The table's columns and the metric a run returns
(``optimized_metric``) take their split names from the data config, so COCO's ``val2014`` columns show
as VOC's ``val`` ones do.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.data.bundle import DataBundle
from src.stages.core import Artifact
from src.utils.io import write_json_atomic


def table_columns(data: DataBundle) -> list[tuple[str, str, str]]:
    """(column title, stage, summary key) of the end-of-run table, in order; absent ones are skipped."""
    s, v = data.seed_metric_split, data.val_split
    return [
        ("cls mAP", "classification", f"{v}/map"),
        ("seed best", "seeds", f"{s}/seed_best_miou"),  # the protocol's headline: at the best threshold
        ("best thr", "seeds", f"{s}/seed_best_threshold"),
        ("seed fixed", "seeds", f"{s}/seed_miou"),  # at the configured threshold (eval_threshold)
        ("mask mIoU", "pseudo_masks", f"{s}/mask_miou"),
        ("mask best", "pseudo_masks", f"{s}/mask_best_miou"),
        *[(f"seg {e}", "segmentation", f"{e}/miou") for e in data.eval_splits],
    ]


class MetricMissingError(KeyError):
    """The run's ``optimized_metric`` is not among its results."""


def _fmt(value: Any, key: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if "threshold" in key:
        return f"{value:.2f}"
    return f"{100 * value:.1f}" if isinstance(value, (int, float)) else str(value)


class RunResults:
    def __init__(self, cfg: DictConfig, run_dir: Path, data: DataBundle) -> None:
        self.cfg, self.run_dir, self.data = cfg, Path(run_dir), data
        self.rounds: dict[int, dict[str, Any]] = {}
        self.columns = table_columns(data)
        self.planned = 0  # stages the plan holds (all rounds): the run is finished once each is recorded

    def record(self, round_index: int, stage: str, artifact: Artifact, seconds: float) -> None:
        entry = self.rounds.setdefault(round_index, {"round": round_index, "stages": {}, "timings_s": {}})
        entry["stages"][stage] = {
            "metrics": artifact.metrics,
            "artifact": str(artifact.path),
            "fingerprint": artifact.fingerprint,
            "reused": artifact.reused,
        }
        entry["timings_s"][stage] = {"this_run": round(seconds, 2),
                                     "computed": artifact.manifest.get("duration_s")}

    def summary(self, round_index: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for stage, info in self.rounds.get(round_index, {}).get("stages", {}).items():
            for key, value in (info["metrics"].get("summary") or {}).items():
                out[f"{stage}/{key}"] = value
        return out

    def optimized(self) -> float | None:
        """The last round's ``optimized_metric`` (what a sweep optimises); None when it is set to null."""
        key = OmegaConf.select(self.cfg, "optimized_metric")
        if key is None:
            return None
        last = self.summary(max(self.rounds)) if self.rounds else {}
        if key not in last:
            raise MetricMissingError(f"optimized_metric={key!r} is not among this run's results "
                                     f"({sorted(last)}); set optimized_metric to one of them, or to null")
        return float(last[key])

    def warnings(self) -> list[str]:
        """Stages that score below their input (on VOC each stage gains: masks above the best-threshold seeds,
        segmentation a few points below its masks)."""
        s = self.data.seed_metric_split
        out = []
        for r in sorted(self.rounds):
            summary = self.summary(r)
            seeds, masks = summary.get(f"seeds/{s}/seed_best_miou"), summary.get(f"pseudo_masks/{s}/mask_miou")
            if seeds is not None and masks is not None and masks < seeds:
                out.append(f"round {r}: the pseudo-masks ({100 * masks:.1f} mIoU) score below the seeds at their best "
                           f"threshold ({100 * seeds:.1f}): the refinement loses")
            seg = summary.get(f"segmentation/{self.data.val_split}/miou")
            if seg is not None and masks is not None and seg < masks - 0.10:
                out.append(f"round {r}: segmentation on {self.data.val_split} ({100 * seg:.1f} mIoU) is more than 10 "
                           f"points below the pseudo-masks it trained on ({100 * masks:.1f})")
        return out

    def deltas(self) -> dict[int, dict[str, float]]:
        """Each round's headline numbers minus round 0's."""
        base = self.summary(0)
        out = {}
        for r in sorted(self.rounds):
            if r == 0:
                continue
            cur = self.summary(r)
            out[r] = {k: cur[k] - base[k] for k in cur
                      if k in base and isinstance(cur[k], (int, float)) and isinstance(base[k], (int, float))
                      and "threshold" not in k}
        return out

    def as_dict(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "baseline": OmegaConf.select(cfg, "baseline.name"),
            "conta": OmegaConf.select(cfg, "conta.name", default="off"),
            "methods": {g: OmegaConf.select(cfg, f"{g}.name") for g in OmegaConf.select(cfg, "methods", default=[])
                        if OmegaConf.select(cfg, f"{g}.name") is not None},
            "profile": OmegaConf.select(cfg, "profile.name"),
            "data": OmegaConf.select(cfg, "data.name"),
            "data_root": str(self.data.layout.root),
            "splits": {"train": self.data.train_split, "val": self.data.val_split,
                       "eval": list(self.data.eval_splits), "seed_eval": self.data.seed_eval_split},
            "columns": [[title, f"{stage}/{key}"] for title, stage, key in self.columns],
            "optimized_metric": OmegaConf.select(cfg, "optimized_metric"),
            "seed": OmegaConf.select(cfg, "seed"),
            "rounds": [dict(self.rounds[r], summary=self.summary(r)) for r in sorted(self.rounds)],
            "deltas_vs_round0": {str(k): v for k, v in self.deltas().items()},
            "warnings": self.warnings(),
            "total_time_s": round(sum(t["this_run"] for e in self.rounds.values()
                                      for t in e["timings_s"].values()), 2),
            # results.json is rewritten after every stage: a reader tells a finished run by these two
            "stages_planned": self.planned,
            "finished": self.finished,
        }

    @property
    def finished(self) -> bool:
        return self.planned > 0 and sum(len(e["stages"]) for e in self.rounds.values()) >= self.planned

    def write(self) -> Path:
        path = self.run_dir / "results.json"
        write_json_atomic(path, self.as_dict(), sort_keys=False)
        return path

    def table(self) -> str:
        """Plain-text table: one row per round, then delta rows against round 0."""
        columns = [c for c in self.columns
                   if any(f"{c[1]}/{c[2]}" in self.summary(r) for r in self.rounds)]
        header = ["round", *[c[0] for c in columns]]
        rows = []
        for r in sorted(self.rounds):
            s = self.summary(r)
            rows.append([str(r), *[_fmt(s.get(f"{c[1]}/{c[2]}"), c[2]) for c in columns]])
        for r, d in self.deltas().items():
            rows.append([f"{r} vs 0", *[
                "-" if f"{c[1]}/{c[2]}" not in d else f"{100 * d[f'{c[1]}/{c[2]}']:+.1f}" for c in columns]])
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
        return "\n".join(lines)
