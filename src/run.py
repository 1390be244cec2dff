"""Entry point: ``python -m src.run +baseline=irnet +conta=on`` (Hydra app; config in conf/).

Composes the config, checks it, runs the pipeline (src/pipeline) and prints the results table.
Returns the last round's segmentation mIoU on val, the number a sweep optimises.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from src.pipeline.pipeline import describe_plan, plan, prepare_data, run_pipeline
from src.pipeline.report import write_report
from src.pipeline.validate import ConfigError, finalize
from src.utils import dist
from src.utils.logging import get_logger, quiet_lightning

log = get_logger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        cfg = finalize(cfg)
    except ConfigError as err:
        log.error(f"config error: {err}")
        sys.exit(2)
    quiet_lightning()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.print_config:
        log.info("resolved config:\n" + OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.dry_run:
        plan_text = describe_plan(plan(cfg))
        data = prepare_data(cfg)
        log.info(f"dry run: data ready ({data.layout.root}); stage plan:\n{plan_text}")
        (run_dir / "plan.txt").write_text(plan_text + "\n")
        return None
    results = run_pipeline(cfg, run_dir)
    if dist.is_rank_zero():
        path = results.write()
        tensorboard = "TensorBoard" in str(OmegaConf.select(cfg, "logger._target_", default=""))
        report = write_report(results, results.data, run_dir,
                              seed_threshold=float(OmegaConf.select(cfg, "baseline.seeds.eval_threshold",
                                                                    default=0.15)),
                              tensorboard_dir=run_dir / "logs" / "report" if tensorboard else None)
        log.info(f"results: {path}\nreport: {report}\n{results.table()}")
    last = results.summary(max(results.rounds)) if results.rounds else {}
    return last.get("segmentation/val/miou")


if __name__ == "__main__":
    main()
