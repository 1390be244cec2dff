"""Run the pipeline with config nodes replaced wholesale (what a command-line override cannot do: it merges
dicts), for the calibration probes of experiments/miniature/RESULTS.md.

    python -m experiments.miniature.probe OUT_DIR 'key.path=<yaml>' ... -- hydra overrides ...

Each ``key=<yaml>`` replaces the node at ``key`` after composition; the rest are ordinary overrides.
Prints the round-0 summary (per-class IoU of seeds, masks and segmentation).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

import src  # noqa: F401  (resolvers)
from src.pipeline.pipeline import run_pipeline
from src.pipeline.validate import CONF_DIR, finalize


def percent(iou: dict) -> dict:
    return {c: None if v is None else round(100 * v, 1) for c, v in iou.items()}


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    split = argv.index("--") if "--" in argv else len(argv)
    replacements = [a.split("=", 1) for a in argv[1:split]]
    overrides = argv[split + 1:]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        for key, text in replacements:
            OmegaConf.update(cfg, key, yaml.safe_load(text), merge=False, force_add=True)
        cfg.paths.output_dir = str(out)
        cfg.print_config = False
        cfg.progress = "none"
        del cfg.hydra
    cfg = finalize(cfg)
    results = run_pipeline(cfg, out)
    path = results.write()
    data = json.loads(path.read_text())
    for entry in data["rounds"]:
        print(f"round {entry['round']}:", {k: round(v, 4) for k, v in entry["summary"].items() if isinstance(v, float)})
        for stage, info in entry["stages"].items():
            m = info["metrics"]
            for key in ("best", "at_threshold"):
                if isinstance(m.get(key), dict) and "iou" in m[key]:
                    print(f"  {stage} {key}:", percent(m[key]["iou"]))
            if "iou" in m:
                print(f"  {stage}:", {c: None if v is None else round(100 * v, 1) for c, v in m["iou"].items()})
            for split in ("val", "val_deconfounded"):
                if isinstance(m.get(split), dict) and "iou" in m[split]:
                    print(f"  {stage} {split}:", percent(m[split]["iou"]))


if __name__ == "__main__":
    main(sys.argv[1:])
