"""Does CONTA help on the synthetic confounded set? Aggregates a sweep over seeds.

    python -m src.run -m +baseline=irnet +conta=on,off seed=0,1,2 hydra.sweep.dir=outputs/conta_sweep
    python -m experiments.conta_synthetic.analyze outputs/conta_sweep [DATA_ROOT]

Per round (mean and sample std over seeds): seed / pseudo-mask mIoU (train), segmentation mIoU (val,
val_deconfounded), and the two biases CONTA targets:
* pair leakage: the share of ground-truth pixels of one pair class (rider, horse) labelled as its partner;
* context leakage: the share of visible water (the context texture, ``ContextRegion``) labelled boat.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np

from src.utils.io import read_label

PAIR = ("rider", "horse")
CONTEXT_CLASS = "boat"


def leakage(confusion: list[list[int]], names: list[str], gt: str, pred: str) -> float:
    conf = np.asarray(confusion, np.float64)
    i, j = names.index(gt), names.index(pred)
    return float(conf[i, j] / max(1.0, conf[i].sum()))


def context_leakage(pred_dir: Path, data_root: Path, class_id: int) -> float | None:
    """Fraction of visible context-texture pixels predicted as ``class_id``."""
    hits = total = 0
    for pred_path in sorted(pred_dir.glob("*.png")):
        region_path = data_root / "ContextRegion" / pred_path.name
        if not region_path.is_file():
            continue
        region = read_label(region_path) > 0
        if region.any():
            total += int(region.sum())
            hits += int((read_label(pred_path)[region] == class_id).sum())
    return hits / total if total else None


def round_metrics(run_dir: Path, entry: dict, data_root: Path) -> dict[str, float]:
    stages = entry["stages"]
    out = dict(entry["summary"])
    names = ["background", *json.loads((data_root / "summary.json").read_text())["spec"]["class_names"]]
    boat = names.index(CONTEXT_CLASS)
    for stage, key, split in (("seeds", "at_threshold", "train"), ("pseudo_masks", None, "train"),
                              ("segmentation", "val", "val"), ("segmentation", "val_deconfounded", "val_deconfounded")):
        metrics = stages.get(stage, {}).get("metrics", {})
        scores = metrics.get(key) if key else metrics
        if not scores or "confusion" not in scores:
            continue
        a, b = PAIR
        out[f"{stage}/{split}/pair_leakage"] = (leakage(scores["confusion"], names, a, b)
                                                + leakage(scores["confusion"], names, b, a)) / 2
        for cls in (*PAIR, CONTEXT_CLASS):
            out[f"{stage}/{split}/iou_{cls}"] = scores["iou"].get(cls)
    r = entry["round"]
    masks = run_dir / f"round_{r}" / "pseudo_masks" / "masks"
    if masks.is_dir():
        out["pseudo_masks/train/context_leakage"] = context_leakage(masks, data_root, boat)
    for split in ("val", "val_deconfounded"):
        preds = run_dir / f"round_{r}" / "segmentation" / "predictions" / split
        if preds.is_dir():
            out[f"segmentation/{split}/context_leakage"] = context_leakage(preds, data_root, boat)
    return out


ROWS = [
    ("seed mIoU (train)", "seeds/train/seed_miou"),
    ("seed mIoU, best threshold", "seeds/train/seed_best_miou"),
    ("pseudo-mask mIoU (train)", "pseudo_masks/train/mask_miou"),
    ("segmentation mIoU (val)", "segmentation/val/miou"),
    ("segmentation mIoU (val_deconfounded)", "segmentation/val_deconfounded/miou"),
    ("seed IoU rider / horse / boat", ("seeds/train/iou_rider", "seeds/train/iou_horse", "seeds/train/iou_boat")),
    ("pseudo-mask IoU rider / horse / boat",
     ("pseudo_masks/train/iou_rider", "pseudo_masks/train/iou_horse", "pseudo_masks/train/iou_boat")),
    ("pair leakage: seeds", "seeds/train/pair_leakage"),
    ("pair leakage: pseudo-masks", "pseudo_masks/train/pair_leakage"),
    ("pair leakage: segmentation (val_deconfounded)", "segmentation/val_deconfounded/pair_leakage"),
    ("water labelled boat: pseudo-masks", "pseudo_masks/train/context_leakage"),
    ("water labelled boat: segmentation (val_deconfounded)", "segmentation/val_deconfounded/context_leakage"),
]


def fmt(values: list[float]) -> str:
    values = [100 * v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main(sweep_dir: str, data_root_arg: str | None = None) -> None:
    per_round: dict[int, list[dict]] = {}
    seeds = set()
    for results in sorted(Path(sweep_dir).glob("*/results.json")):
        data = json.loads(results.read_text())
        if data.get("conta") != "on":
            continue
        seeds.add(data["seed"])
        run_dir = results.parent
        data_root = Path(data_root_arg or data["data_root"])
        for entry in data["rounds"]:
            per_round.setdefault(entry["round"], []).append(round_metrics(run_dir, entry, data_root))
    rounds = sorted(per_round)
    print(f"# CONTA on the synthetic set: IRNet baseline, {len(seeds)} seeds ({sorted(seeds)})\n")
    print("Mean ± sample std over seeds, in %. Round 0 = the baseline (= conta off); rounds >= 1 = CONTA.\n")
    print("| metric | " + " | ".join(f"round {r}" for r in rounds) + " |")
    print("|---|" + "---|" * len(rounds))
    for title, key in ROWS:
        cells = []
        for r in rounds:
            if isinstance(key, tuple):
                cells.append(" / ".join(fmt([m.get(k) for m in per_round[r]]) for k in key))
            else:
                cells.append(fmt([m.get(key) for m in per_round[r]]))
        print(f"| {title} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
