"""Hydra callback: at the end of a multirun, one table of all jobs (``sweep_summary.md`` / ``.csv``)
and a plot of mIoU per round per job (``sweep_miou.png``), in the sweep directory.

Each job's ``results.json`` (src/pipeline/results.py) provides baseline, conta, seed, the per-round
headline numbers and the columns to show them in (named after the job's data splits, so a COCO sweep
shows ``seg val2014``); jobs that failed (no results.json) are listed as such. Other swept settings (e.g.
``profile.cam.lr=0.02,0.05``) go into an ``overrides`` column, read from each job's ``.hydra/overrides.yaml``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from src.utils.io import write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

# Columns of a job's results.json shown in the sweep table (the classifier's mAP and the threshold stay in
# each run's own table).
SKIPPED_COLUMNS = {"cls mAP", "best thr"}


# Overrides that have their own column.
OWN_COLUMNS = {"baseline", "conta", "seed"}


def job_overrides(job: Path) -> dict[str, str]:
    """The job's command-line overrides as key -> value (``+`` dropped); {} when Hydra wrote none."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    pairs = (str(o).split("=", 1) for o in OmegaConf.load(path))
    return {key.lstrip("+~"): value for key, value in (p for p in pairs if len(p) == 2)}


def swept_overrides(jobs: list[Path]) -> dict[str, str]:
    """Per job, the overrides whose value differs between jobs (the swept ones), as ``k=v k2=v2``."""
    per_job = {job.name: job_overrides(job) for job in jobs}
    keys = sorted({k for o in per_job.values() for k in o} - OWN_COLUMNS)
    varying = [k for k in keys if len({o.get(k) for o in per_job.values()}) > 1]
    return {name: " ".join(f"{k}={o[k]}" for k in varying if k in o) for name, o in per_job.items()}


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The metric columns of the jobs, in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        for title in row.get("_columns", ()):
            seen.setdefault(title, None)
    return list(seen)


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per (job, round) from the job folders under ``sweep_dir``."""
    rows = []
    jobs = sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and not p.name.startswith("."))
    overrides = swept_overrides(jobs)
    for job in jobs:
        results = job / "results.json"
        if not results.is_file():
            dry = (job / "plan.txt").is_file()  # written by dry_run=true instead of results
            rows.append({"job": job.name, "status": "dry run: plan.txt" if dry else
                         "no results.json (failed or still running)"})
            continue
        data = json.loads(results.read_text())
        columns = [(title, key) for title, key in data.get("columns", []) if title not in SKIPPED_COLUMNS]
        for entry in data["rounds"]:
            row = {"job": job.name, "status": "ok", "baseline": data.get("baseline"), "conta": data.get("conta"),
                   "seed": data.get("seed"), "overrides": overrides[job.name], "round": entry["round"],
                   "_columns": [title for title, _ in columns]}
            for title, key in columns:
                row[title] = entry["summary"].get(key)
            rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{100 * value:.1f}"
    return "-" if value is None else str(value)


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Table columns; ``overrides`` only when the sweep varies more than baseline, conta and seed."""
    swept = any(r.get("overrides") for r in rows)
    return ["job", "baseline", "conta", "seed", *(["overrides"] if swept else []), "round", *metric_columns(rows)]


def to_markdown(rows: list[dict[str, Any]]) -> str:
    header = table_columns(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['job']} | {row['status']} |" + " |" * (len(header) - 2))
            continue
        lines.append("| " + " | ".join(_cell(row.get(h)) for h in header) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.4))
    done = [r for r in rows if r["status"] == "ok"]
    # metrics some job reached (a stop_after=seeds sweep has no mask / segmentation numbers)
    seg = [t for t in metric_columns(done) if t.startswith("seg ")][:1]  # the first eval split
    metrics = [t for t in ("seed mIoU", "mask mIoU", *seg) if any(r.get(t) is not None for r in done)]
    jobs = sorted({r["job"] for r in done})
    labels = {r["job"]: f"{r['job']} {r['overrides']}".strip() for r in done}
    rounds = sorted({r["round"] for r in done})
    for k, title in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        for job in jobs:
            pts = sorted((r["round"], r[title]) for r in done if r["job"] == job and r.get(title) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=labels[job])
        ax.set_title(title)
        ax.set_xticks(rounds)
        ax.set_xlabel("round")
        ax.set_ylabel("mIoU (%)")
    if fig.axes:
        fig.axes[-1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes_atomic(path, buf.getvalue())


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    write_text_atomic(sweep_dir / "sweep_summary.md", "# Sweep summary\n\n" + to_markdown(rows))
    buf = io.StringIO()
    fields = ["job", "status", *table_columns(rows)[1:]]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(sweep_dir / "sweep_summary.csv", buf.getvalue())
    if any(r["status"] == "ok" for r in rows):
        plot(rows, sweep_dir / "sweep_miou.png")
    return rows


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = write_summary(sweep_dir)
        log.info(f"sweep summary ({sweep_dir / 'sweep_summary.md'}):\n" + to_markdown(rows))
