"""Methods side by side on the miniature: mean ± sample std over seeds of the last round of each run.

    python -m experiments.miniature.compare LABEL=RUN_GLOB [LABEL=RUN_GLOB ...] [--oracle LABEL]

e.g. ``none='/work/runs/baselines/*irnet*' cda='/work/runs/debias/*irnet*cda*'``. Per label: seed (best
threshold), pseudo-mask and segmentation mIoU; the pair classes' (rider, horse) IoU at seeds and masks;
pair leakage (share of one pair class's pixels labelled as the other) and water labelled boat in the
masks. With ``--oracle``, each label's share of the baseline-to-oracle gap on the pair's mask IoU that it
recovers (the first label is the baseline), with the 95% Welch interval of the difference. Why one
script: experiments/miniature/RESULTS.md and
experiments/debias_synthetic/RESULTS.md quote these tables; their numbers come from the runs' results.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
from pathlib import Path

from experiments.conta_synthetic.analyze import PAIR, context_leakage, leakage
from src.callbacks.sweep_summary import welch_interval

ROWS = [
    ("seeds, best thr (mIoU)", "seed_best"),
    ("pseudo-masks (mIoU)", "masks"),
    ("seg val (mIoU)", "seg_val"),
    ("seg val_deconfounded (mIoU)", "seg_vd"),
    ("seeds: rider / horse IoU", ("seed_rider", "seed_horse")),
    ("masks: rider / horse IoU", ("mask_rider", "mask_horse")),
    ("masks: mean IoU of ball, box, star", "mask_clean"),
    ("masks: pair leakage", "mask_leak"),
    ("masks: water labelled boat", "mask_water"),
    ("masks: boat IoU", "mask_boat"),
]
CLEAN = ("ball", "box", "star")


def last_round(run: Path) -> dict[str, float | None]:
    data = json.loads((run / "results.json").read_text())
    entry = max(data["rounds"], key=lambda e: e["round"])
    stages, s = entry["stages"], entry["summary"]
    names = ["background", *json.loads((Path(data["data_root"]) / "summary.json").read_text())["spec"]["class_names"]]
    masks = stages["pseudo_masks"]["metrics"]
    seeds = stages["seeds"]["metrics"]["best"]
    out = {"seed_best": s.get("seeds/train/seed_best_miou"), "masks": s.get("pseudo_masks/train/mask_miou"),
           "seg_val": s.get("segmentation/val/miou"), "seg_vd": s.get("segmentation/val_deconfounded/miou"),
           "seed_rider": seeds["iou"]["rider"], "seed_horse": seeds["iou"]["horse"],
           "mask_rider": masks["iou"]["rider"], "mask_horse": masks["iou"]["horse"],
           "mask_boat": masks["iou"]["boat"],
           "mask_clean": statistics.mean(masks["iou"][c] for c in CLEAN),
           "mask_leak": (leakage(masks["confusion"], names, *PAIR)
                         + leakage(masks["confusion"], names, *PAIR[::-1])) / 2}
    folder = run / f"round_{entry['round']}" / "pseudo_masks" / "masks"
    root = Path(data["data_root"])
    out["mask_water"] = context_leakage(folder, root, names.index("boat")) if folder.is_dir() else None
    return out


def finished(run: Path) -> bool:
    """results.json is rewritten after every stage; it says ``finished`` once every planned stage of every round
    is in (older files without the field: a segmentation in the last round, which a multi-round run still going
    also has)."""
    path = run / "results.json"
    if not path.is_file():
        return False
    results = json.loads(path.read_text())
    if "finished" in results:
        return bool(results["finished"])
    return "segmentation" in max(results["rounds"], key=lambda e: e["round"])["stages"]


def cell(values: list[float | None]) -> str:
    v = [100 * x for x in values if x is not None]
    if not v:
        return "-"
    return f"{v[0]:.1f}" if len(v) == 1 else f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}"


def pair_mean(m: dict) -> float:
    return (m["mask_rider"] + m["mask_horse"]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="+", help="LABEL=GLOB of run folders (each with results.json)")
    parser.add_argument("--oracle", help="the label of the oracle group (gap recovered on the pair's mask IoU)")
    args = parser.parse_args()
    groups: dict[str, list[dict]] = {}
    for item in args.groups:
        label, pattern = item.split("=", 1)
        runs = sorted(Path(p) for p in glob.glob(pattern) if finished(Path(p)))
        if not runs:
            raise SystemExit(f"{label}: no finished run (results.json through segmentation) matches {pattern}")
        groups[label] = [last_round(r) for r in runs]
    labels = list(groups)
    print("| metric (%) | " + " | ".join(f"{k} (n={len(groups[k])})" for k in labels) + " |")
    print("|---|" + "---|" * len(labels))
    for title, key in ROWS:
        keys = key if isinstance(key, tuple) else (key,)
        print(f"| {title} | " + " | ".join(" / ".join(cell([m[k] for m in groups[g]]) for k in keys)
                                           for g in labels) + " |")
    pair = {g: [pair_mean(m) for m in groups[g]] for g in labels}
    print("| masks: pair mean IoU | " + " | ".join(cell(pair[g]) for g in labels) + " |")
    if args.oracle:
        base, oracle = statistics.mean(pair[labels[0]]), statistics.mean(pair[args.oracle])
        gap = oracle - base
        sd = statistics.stdev(pair[labels[0]]) if len(pair[labels[0]]) > 1 else float("nan")
        print(f"\nbaseline ({labels[0]}) pair mask IoU {100 * base:.1f}, oracle {100 * oracle:.1f}: gap "
              f"{100 * gap:.1f}; baseline seed-to-seed std {100 * sd:.1f}")
        for g in labels[1:]:
            if g == args.oracle:
                continue
            d = statistics.mean(pair[g]) - base
            ci = welch_interval(pair[g], pair[labels[0]])
            interval = ("" if ci["low"] is None else
                        f", 95% Welch interval [{100 * ci['low']:+.1f}, {100 * ci['high']:+.1f}]")
            print(f"- {g}: {100 * d:+.1f} on the pair{interval} ({d / gap:.0%} of the gap; "
                  f"{'more' if abs(d) > 2 * sd else 'not more'} than twice the baseline's std)")


if __name__ == "__main__":
    main()
