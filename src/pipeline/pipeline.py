"""Run the planned rounds of stages through the artifact store (src/pipeline/plan.py says which)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.data.bundle import DataBundle
from src.pipeline.artifacts import ArtifactStore
from src.pipeline.plan import PlannedStage, describe_plan, plan, stage_fingerprint_spec
from src.pipeline.results import RunResults
from src.stages.core import Artifact, Runtime, Stage, StageContext
from src.utils import dist
from src.utils.logging import get_logger

log = get_logger(__name__)


def stage_seed(seed: int, stage: str) -> int:
    return int(np.random.SeedSequence([seed, *stage.encode()]).generate_state(1)[0])


def prepare_data(cfg: DictConfig) -> DataBundle:
    layout = instantiate(cfg.data.layout)
    d = cfg.data
    bundle = DataBundle(
        layout=layout,
        train_split=d.train_split,
        val_split=d.val_split,
        eval_splits=list(d.eval_splits),
        seed_eval_split=d.get("seed_eval_split"),
        mean=list(d.mean),
        std=list(d.std),
        loader=OmegaConf.to_container(d.loader, resolve=True),
    )
    for split in {bundle.train_split, bundle.val_split, *bundle.eval_splits}:
        layout.ids(split)  # fails early, naming the missing list
    for split in {bundle.train_split, bundle.val_split}:
        layout.labels(split)  # fails early on a bad labels file or mask (read once, then cached)
    if d.check_labels:
        for split in {s for s in (bundle.seed_eval_split, bundle.val_split) if s}:
            layout.check_labels_against_masks(split)
    return bundle


def runtime(cfg: DictConfig, run_dir: Path) -> Runtime:
    """The Trainer settings every stage shares."""
    return Runtime(trainer=OmegaConf.to_container(cfg.trainer, resolve=True), logger=cfg.get("logger"),
                   callbacks=cfg.get("callbacks"), log_dir=Path(run_dir) / "logs")


def build_stage(st: PlannedStage) -> Stage:
    """The stage object of a planned stage (its constructor checks its parameters)."""
    return instantiate(st.spec, _recursive_=False)


def run_pipeline(cfg: DictConfig, run_dir: Path) -> RunResults:
    """Run (or reuse) every stage of every round; returns the results also written to the run dir."""
    run_dir = Path(run_dir)
    rounds = plan(cfg)
    log.info("stage plan:\n" + describe_plan(rounds))
    data = prepare_data(cfg)
    store = ArtifactStore(cfg.paths.cache_dir, run_dir, OmegaConf.to_container(cfg.artifacts.reuse, resolve=True))
    results = RunResults(cfg, run_dir, data)
    settings = runtime(cfg, run_dir)
    produced: dict[tuple[str, int], Artifact] = {}
    total = sum(len(s) for s in rounds)
    results.planned = total
    k = 0
    warned: set[str] = set()
    for r, stages in enumerate(rounds):
        for st in stages:
            k += 1
            log.info(f"[round {r}/{len(rounds) - 1} | stage {k}/{total}] {st.name}")
            inputs = {role: produced[src] for role, src in st.inputs.items()}
            stage = build_stage(st)
            start = time.time()
            # Each stage starts from its own seed, so its result does not depend on which earlier stages
            # were reused from the cache (round-independent: round r differs from round 0 only by the methods).
            pl.seed_everything(stage_seed(int(cfg.seed), st.name), workers=True, verbose=False)
            ctx_args = {"name": st.name, "round": st.round, "inputs": inputs, "data": data, "seed": int(cfg.seed),
                        "runtime": settings, "label": f"round {st.round}/{len(rounds) - 1} · {k}/{total} {st.name}"}

            def run(out_dir: Path, stage=stage, ctx_args=ctx_args) -> dict:
                return stage.run(StageContext(out_dir=out_dir, **ctx_args))

            artifact = store.produce(st.name, r, stage_fingerprint_spec(cfg, st), inputs, run,
                                     provides=stage.provides())
            produced[(st.name, r)] = artifact
            results.record(r, st.name, artifact, time.time() - start)
            if dist.is_rank_zero():
                results.write()
                for warning in set(results.warnings()) - warned:
                    warned.add(warning)
                    log.warning(warning)
    return results
