"""Entry point: ``python -m src.run +baseline=irnet +conta=on`` (Hydra app; config in conf/).

Composes the config, checks it, runs the pipeline (src/pipeline) and prints the results table.
Returns the last round's ``optimized_metric`` (default: segmentation mIoU on the val split), the number a
sweep optimises.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from src.pipeline.pipeline import prepare_data, run_pipeline
from src.pipeline.plan import describe_plan, plan
from src.pipeline.report import write_report
from src.pipeline.validate import ConfigError, check_writable, finalize
from src.utils import dist
from src.utils.logging import get_logger, quiet_lightning

log = get_logger(__name__)


def as_single_run_for_ddp_children(run_dir: Path) -> None:
    """Make a multirun job re-runnable alone. Lightning's DDP launcher starts ranks 1..N-1 by re-running
    ``sys.argv`` with ``hydra.run.dir`` set to the job's ``hydra.run.dir``; for a job of a multirun that
    would start the whole sweep again in each child. So the job's own overrides (without ``-m``) and its
    output directory are what the children get."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    sys.argv = [sys.argv[0], *hc.overrides.task]
    with read_write(hc.run):
        hc.run.dir = str(run_dir)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        cfg = finalize(cfg)
    except ConfigError as err:
        log.error(f"config error: {err}")
        sys.exit(2)
    quiet_lightning()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        check_writable(cfg.paths.cache_dir, "paths.cache_dir")
        check_writable(run_dir, "hydra.run.dir (the run directory)")
    except ConfigError as err:
        log.error(f"config error: {err}")
        sys.exit(2)
    as_single_run_for_ddp_children(run_dir)
    if cfg.print_config:
        log.info("resolved config:\n" + OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.dry_run:
        plan_text = describe_plan(plan(cfg))
        data = prepare_data(cfg)
        log.info(f"dry run: data ready ({data.layout.root}); stage plan:\n{plan_text}")
        (run_dir / "plan.txt").write_text(plan_text + "\n")
        return None
    launched_here = not dist.launched_externally()
    try:
        results = run_pipeline(cfg, run_dir)
    finally:
        # The next job of a multirun starts its own process group, and launches its own DDP children.
        dist.shutdown(forget_launch=launched_here)
    if dist.is_rank_zero():
        path = results.write()
        tensorboard = "TensorBoard" in str(OmegaConf.select(cfg, "logger._target_", default=""))
        report = write_report(results, results.data, run_dir,
                              tensorboard_dir=run_dir / "logs" / "report" if tensorboard else None)
        log.info(f"results: {path}\nreport: {report}\n{results.table()}")
    return results.optimized()


if __name__ == "__main__":
    main()
