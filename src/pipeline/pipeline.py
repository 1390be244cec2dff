"""Rounds of stages: plan them from the config, run them through the artifact store, report.

Round r (r = 0 .. conta.rounds; with conta off there is only round 0):
classification -> seeds -> refinement steps (baseline config) -> segmentation -> [confounder set].
With CONTA, rounds r >= 1 feed the confounder set of round r-1 to the stages that use it
(``Stage.uses_context``); round 0 never sees CONTA's config, so it is the baseline and shares its
artifacts with a ``conta=off`` run of the same config.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from src.pipeline.artifacts import Artifact, ArtifactStore
from src.pipeline.results import RunResults
from src.pipeline.stage import DataBundle, Stage, StageContext
from src.utils import dist
from src.utils.logging import get_logger

log = get_logger(__name__)

CONTEXT_INPUT = "context"
CONFOUNDER_STAGE = "confounder_set"


@dataclass
class PlannedStage:
    name: str
    round: int
    spec: DictConfig
    inputs: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def cls(self) -> type[Stage]:
        return get_class(self.spec._target_)


def conta_enabled(cfg: DictConfig) -> bool:
    return bool(OmegaConf.select(cfg, "conta.enabled", default=False))


def num_rounds(cfg: DictConfig) -> int:
    return 1 + (int(cfg.conta.rounds) if conta_enabled(cfg) else 0)


def round_specs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The stages of one round, in order, by name."""
    specs: dict[str, DictConfig] = {
        "classification": cfg.baseline.classification,
        "seeds": cfg.baseline.seeds,
    }
    for name, spec in cfg.baseline.refinement.items():
        specs[str(name)] = spec
    specs["segmentation"] = cfg.segmentation
    return specs


def plan(cfg: DictConfig) -> list[list[PlannedStage]]:
    rounds = []
    for r in range(num_rounds(cfg)):
        stages = []
        specs = round_specs(cfg)
        for name, spec in specs.items():
            inputs = {}
            for role, source in (spec.get("inputs") or {}).items():
                if source not in specs or list(specs).index(source) >= list(specs).index(name):
                    raise ValueError(
                        f"stage '{name}': input '{role}' names '{source}', which is not an earlier stage of the "
                        f"round ({list(specs)})"
                    )
                inputs[str(role)] = (str(source), r)
            planned = PlannedStage(name, r, spec, inputs)
            if r > 0 and planned.cls.uses_context:
                planned.inputs[CONTEXT_INPUT] = (CONFOUNDER_STAGE, r - 1)
            if r > 0 and name == "classification":
                warm = str(cfg.conta.warm_start)
                if warm == "classifier":
                    planned.inputs["warm_start"] = ("classification", r - 1)
                elif warm == "segmentation_backbone":
                    planned.inputs["warm_start"] = ("segmentation", r - 1)
            stages.append(planned)
        if r < num_rounds(cfg) - 1:
            stages.append(PlannedStage(CONFOUNDER_STAGE, r, cfg.conta.confounder_set,
                                       {"model": ("segmentation", r), "pseudo_masks": ("pseudo_masks", r)}))
        rounds.append(stages)
    stop_after = OmegaConf.select(cfg, "stop_after")
    if stop_after is not None:
        names = [st.name for st in rounds[-1]]
        rounds[-1] = rounds[-1][: names.index(str(stop_after)) + 1]
    return rounds


def describe_plan(rounds: list[list[PlannedStage]]) -> str:
    lines = []
    for r, stages in enumerate(rounds):
        parts = []
        for st in stages:
            extra = [f"{role}<-{src}@{rr}" for role, (src, rr) in st.inputs.items() if rr != r]
            parts.append(st.name + (f" ({', '.join(extra)})" if extra else ""))
        lines.append(f"round {r}: " + " -> ".join(parts))
    return "\n".join(lines)


def stage_fingerprint_spec(cfg: DictConfig, st: PlannedStage) -> dict[str, Any]:
    """Everything a stage's output depends on, besides its input artifacts."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.pop("loader", None)  # worker counts do not change results
    data.get("layout", {}).pop("cache_dir", None)  # where the cache lives is not what it holds
    spec: dict[str, Any] = {
        "stage": f"{st.cls.__module__}.{st.cls.__qualname__}",
        "version": st.cls.version,
        "params": OmegaConf.to_container(st.spec, resolve=True),
        "data": data,
        "seed": int(cfg.seed),
        "precision": str(OmegaConf.select(cfg, "trainer.precision", default="32")),
    }
    if CONTEXT_INPUT in st.inputs or st.name == CONFOUNDER_STAGE:
        spec["conta"] = OmegaConf.to_container(cfg.conta.context, resolve=True)
    return spec


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
    if d.get("check_labels", True):
        for split in {s for s in (bundle.seed_eval_split, bundle.val_split) if s}:
            layout.check_labels_against_masks(split)
    return bundle


def run_pipeline(cfg: DictConfig, run_dir: Path) -> RunResults:
    """Run (or reuse) every stage of every round; returns the results also written to the run dir."""
    run_dir = Path(run_dir)
    rounds = plan(cfg)
    log.info("stage plan:\n" + describe_plan(rounds))
    data = prepare_data(cfg)
    store = ArtifactStore(cfg.paths.cache_dir, run_dir, OmegaConf.to_container(cfg.artifacts.reuse, resolve=True))
    results = RunResults(cfg, run_dir, data)
    produced: dict[tuple[str, int], Artifact] = {}
    total = sum(len(s) for s in rounds)
    k = 0
    for r, stages in enumerate(rounds):
        specs = {st.name: st.spec for st in stages}
        for st in stages:
            k += 1
            log.info(f"[round {r}/{len(rounds) - 1} | stage {k}/{total}] {st.name}")
            inputs = {role: produced[src] for role, src in st.inputs.items()}
            stage: Stage = instantiate(st.spec, _recursive_=False)
            start = time.time()
            # Each stage starts from its own seed, so its result does not depend on which earlier stages
            # were reused from the cache (round-independent: round r differs from round 0 only by CONTA).
            pl.seed_everything(stage_seed(int(cfg.seed), st.name), workers=True, verbose=False)

            def run(out_dir: Path, stage=stage, st=st, inputs=inputs, specs=specs, k=k) -> dict:
                ctx = StageContext(cfg=cfg, name=st.name, round=st.round, out_dir=out_dir, inputs=inputs,
                                   data=data, run_dir=run_dir, specs=specs,
                                   progress_label=f"round {st.round}/{len(rounds) - 1} · {k}/{total} {st.name}")
                return stage.run(ctx)

            artifact = store.produce(st.name, r, stage_fingerprint_spec(cfg, st), inputs, run)
            produced[(st.name, r)] = artifact
            results.record(r, st.name, artifact, time.time() - start)
            if dist.is_rank_zero():
                results.write()
    return results
