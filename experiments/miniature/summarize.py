"""Per-class IoU tables of runs (their results.json) for experiments/miniature/RESULTS.md.

    python -m experiments.miniature.summarize RUN_DIR [RUN_DIR ...] [--round R]

One block per run: the headline numbers of the round, then per class the IoU (%) of the seeds at their best
threshold, of the pseudo-masks, and of the segmentation on each eval split. ``--aggregate``: one table of
mean ± sample std over the runs (e.g. a sweep's seeds), with the pair classes' gap to the unconfounded ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def per_class(metrics: dict, *path: str) -> dict | None:
    node = metrics
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def columns(stages: dict) -> list[tuple[str, dict]]:
    out = []
    if "seeds" in stages:
        out.append(("seeds", per_class(stages["seeds"]["metrics"], "best", "iou")))
    for name in stages:
        if name.endswith("seeds") and name != "seeds":
            out.append((name, per_class(stages[name]["metrics"], "best", "iou")))
    if "pseudo_masks" in stages:
        out.append(("masks", per_class(stages["pseudo_masks"]["metrics"], "iou")))
    seg = stages.get("segmentation", {}).get("metrics", {})
    for split, value in seg.items():
        if isinstance(value, dict) and "iou" in value:
            out.append((f"seg {split}", value["iou"]))
    return [(t, c) for t, c in out if c]


def describe(run: Path, round_index: int) -> str:
    data = json.loads((run / "results.json").read_text())
    entry = next(r for r in data["rounds"] if r["round"] == round_index)
    lines = [f"### {run.name} (round {round_index})", ""]
    lines.append(", ".join(f"{k} {100 * v:.1f}" if "threshold" not in k else f"{k} {v:.2f}"
                           for k, v in entry["summary"].items() if isinstance(v, float)))
    cols = columns(entry["stages"])
    if cols:
        names = list(cols[0][1])
        lines += ["", "| class | " + " | ".join(t for t, _ in cols) + " |", "|---|" + "---|" * len(cols)]
        for name in names:
            lines.append(f"| {name} | " + " | ".join("-" if c.get(name) is None else f"{100 * c[name]:.1f}"
                                                   for _, c in cols) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--round", type=int, default=0)
    args = parser.parse_args()
    for run in args.runs:
        print(describe(run, args.round))




# ------------------------------------------------------------------------------------ mean +- std over seeds
def stage_values(entry: dict) -> dict[str, dict[str, float]]:
    """{column: {"mIoU": value, class: IoU...}} of one round of one run."""
    out = {}
    for title, iou in columns(entry["stages"]):
        out[title] = {k: v for k, v in iou.items() if v is not None}
    summary = entry["summary"]
    keys = {"masks": "pseudo_masks/train/mask_miou", "seg val": "segmentation/val/miou",
            "seg val_deconfounded": "segmentation/val_deconfounded/miou"}
    keys.update({t: f"{t}/train/seed_best_miou" for t in out if t.endswith("seeds")})  # seeds, expansion_seeds
    for title, key in keys.items():
        if key in summary and title in out:
            out[title]["mIoU"] = summary[key]
    return out


def mean_std(values: list[float]) -> str:
    a = 100 * np.asarray(values, dtype=np.float64)
    return f"{a.mean():.1f} ± {a.std(ddof=1):.1f}" if len(a) > 1 else f"{a.mean():.1f}"


def aggregate(runs: list[Path], round_index: int, pair: tuple[str, ...] = ("rider", "horse")) -> str:
    """Mean ± sample std over the runs (seeds) of every column's mIoU and per-class IoU, and the pair gap:
    mean pair-class IoU minus the mean of the unconfounded foreground classes (the context class excluded)."""
    per_run = []
    for run in runs:
        data = json.loads((run / "results.json").read_text())
        per_run.append(stage_values(next(r for r in data["rounds"] if r["round"] == round_index)))
    titles = [t for t in per_run[0] if all(t in r for r in per_run)]
    rows = ["mIoU", *[c for c in per_run[0][titles[0]] if c != "mIoU"]]
    lines = [f"{len(runs)} runs, round {round_index}, IoU (%) mean ± sample std", "",
             "| class | " + " | ".join(titles) + " |", "|---|" + "---|" * len(titles)]
    for row in rows:
        cells = [mean_std([r[t][row] for r in per_run]) if all(row in r[t] for r in per_run) else "-" for t in titles]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    gaps = []
    for t in titles:
        classes = [c for c in per_run[0][t] if c not in ("mIoU", "background", "boat", *pair)]
        gap = [np.mean([r[t][c] for c in pair]) - np.mean([r[t][c] for c in classes]) for r in per_run]
        gaps.append(mean_std(gap))
    lines.append("| pair gap | " + " | ".join(gaps) + " |")
    return "\n".join(lines) + "\n"


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--aggregate", action="store_true", help="one mean ± std table over the runs")
    args = parser.parse_args()
    if args.aggregate:
        print(aggregate(args.runs, args.round))
        return
    for run in args.runs:
        print(describe(run, args.round))


if __name__ == "__main__":
    cli()
