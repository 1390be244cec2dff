"""The round planner: which stages run in which round, and where each stage's inputs come from.

A round is the baseline's stages (``baseline.classification``, ``baseline.seeds``, every step of
``baseline.refinement``, then ``segmentation``) plus the stages the round methods add. A round method is
a config group listed in ``methods`` (``conta``, ``debias``); each may declare

* ``rounds``: how many rounds it needs after round 0 (the planner runs the largest number asked for);
* ``stages``: ``{name: {after: <stage>, when: every_round | before_next_round, stage: <stage config>}}``,
  stages inserted into every round, or only into the rounds that feed a next round (CONTA's confounder
  set);
* ``previous_round``: ``{consumer: {role: producer}}``, inputs a stage of round r >= 1 takes from round
  r - 1 (CONTA: the classifier and the seeds take the confounder set as ``context``). The consumer must
  list the role in its ``optional_inputs``;
* ``redirect``: ``{consumer: {role: stage}}``, an input of a baseline stage taken from another (earlier)
  stage of the same round instead (ReCAM: the seeds read ``model`` from ``recam``, not ``classification``).

A baseline may declare ``stages`` and ``previous_round`` of its own, in the same form (``enabled: false``
leaves an added stage out): ESOL's expansion and shrinkage stages sit between classification and seeds,
and take CONTA's context like the classifier does.

Round 0 gets no ``previous_round`` input and no ``before_next_round`` stage of its own config, so it is
the plain baseline and shares its artifacts (same fingerprints) with a run without the method.
Within a round, a stage's ``inputs: {role: stage}`` name earlier stages of the same round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from src.stages.core import Stage
from src.utils.config import check_choice

WHEN = ("every_round", "before_next_round")


@dataclass
class PlannedStage:
    name: str
    round: int
    spec: DictConfig  # the stage's config node: _target_ + its parameters
    key: str  # where that node sits in the run config (for messages)
    inputs: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def cls(self) -> type[Stage]:
        return get_class(self.spec._target_)


def round_methods(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(group, config) of every round method the run composes (``methods`` lists the groups)."""
    out = []
    for group in OmegaConf.select(cfg, "methods", default=[]) or []:
        node = OmegaConf.select(cfg, str(group))
        if node is not None:
            out.append((str(group), node))
    return out


def stage_sources(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """Where a round's added stages and previous-round feeds come from: the baseline itself (its optional
    ``stages`` and ``previous_round``, in a method's form: ESOL's stages between classification and seeds),
    then the round methods."""
    return [("baseline", cfg.baseline), *round_methods(cfg)]


def num_rounds(cfg: DictConfig) -> int:
    return 1 + max([int(m.get("rounds", 0) or 0) for _, m in round_methods(cfg)], default=0)


def baseline_stages(cfg: DictConfig) -> dict[str, tuple[str, DictConfig]]:
    """The baseline's stages of one round, in order: name -> (config key, config node)."""
    stages: dict[str, tuple[str, DictConfig]] = {
        "classification": ("baseline.classification", cfg.baseline.classification),
        "seeds": ("baseline.seeds", cfg.baseline.seeds),
    }
    for name, spec in cfg.baseline.refinement.items():
        stages[str(name)] = (f"baseline.refinement.{name}", spec)
    stages["segmentation"] = ("segmentation", cfg.segmentation)
    return stages


def round_stages(cfg: DictConfig, feeds_next_round: bool) -> dict[str, tuple[str, DictConfig]]:
    """The stages of one round in order, the baseline's and the methods' added stages inserted after the stage
    each names (an entry with ``enabled: false`` is left out)."""
    stages = baseline_stages(cfg)
    for group, method in stage_sources(cfg):
        for name, entry in (method.get("stages") or {}).items():
            key = f"{group}.stages.{name}"
            when = check_choice(f"{key}.when", str(entry.get("when", "every_round")), WHEN)
            enabled = entry.get("enabled", True)
            if not isinstance(enabled, bool):
                raise ValueError(f"{key}.enabled must be true or false, got {enabled!r}")
            if not enabled or (when == "before_next_round" and not feeds_next_round):
                continue
            after = str(entry.after)
            if after not in stages:
                raise ValueError(f"{key}.after={after!r} is not a stage of the round ({list(stages)})")
            if name in stages:
                raise ValueError(f"{key}: a stage named {name!r} is already part of the round")
            names = list(stages)
            at = names.index(after) + 1
            items = list(stages.items())
            stages = dict([*items[:at], (str(name), (f"{key}.stage", entry.stage)), *items[at:]])
    return stages


def previous_round_feeds(cfg: DictConfig) -> dict[str, dict[str, str]]:
    """consumer -> {role: producer of round r - 1}, merged over the baseline and the methods (a null producer
    is no feed)."""
    feeds: dict[str, dict[str, str]] = {}
    for group, method in stage_sources(cfg):
        for consumer, roles in (method.get("previous_round") or {}).items():
            for role, producer in (roles or {}).items():
                if producer is None:
                    continue
                merge_role(feeds, f"{group}.previous_round", str(consumer), str(role), str(producer))
    return feeds


def merge_role(table: dict[str, dict[str, str]], where: str, consumer: str, role: str, source: str) -> None:
    """table[consumer][role] = source; two methods that give one role different sources are an error."""
    have = table.setdefault(consumer, {})
    if role in have and have[role] != source:
        raise ValueError(f"{where}.{consumer}.{role}={source!r} conflicts with another method's {have[role]!r}")
    have[role] = source


def input_redirects(cfg: DictConfig) -> dict[str, dict[str, str]]:
    """consumer -> {role: stage of the same round that replaces the consumer's own input}, over the methods."""
    redirects: dict[str, dict[str, str]] = {}
    for group, method in round_methods(cfg):
        for consumer, roles in (method.get("redirect") or {}).items():
            for role, source in (roles or {}).items():
                merge_role(redirects, f"{group}.redirect", str(consumer), str(role), str(source))
    return redirects


def plan(cfg: DictConfig) -> list[list[PlannedStage]]:
    """Every round's stages with their inputs resolved to (stage, round); ``stop_after`` cuts the last round."""
    total = num_rounds(cfg)
    feeds = previous_round_feeds(cfg)
    redirects = input_redirects(cfg)
    rounds: list[list[PlannedStage]] = []
    for r in range(total):
        specs = round_stages(cfg, feeds_next_round=r < total - 1)
        names = list(specs)
        stages = []
        for name, (key, spec) in specs.items():
            planned = PlannedStage(name, r, spec, key)
            for role, source in (spec.get("inputs") or {}).items():
                if source not in specs or names.index(source) >= names.index(name):
                    raise ValueError(f"{key}.inputs.{role}={source!r} is not an earlier stage of the round "
                                     f"({names})")
                planned.inputs[str(role)] = (str(source), r)
            for role, source in redirects.get(name, {}).items():
                if role not in planned.inputs:
                    raise ValueError(f"a method redirects input '{role}' of stage '{name}' ({key}), which has "
                                     f"inputs {sorted(planned.inputs)}")
                if source not in specs or names.index(source) >= names.index(name):
                    raise ValueError(f"a method redirects {name}.inputs.{role} to {source!r}, which is not an "
                                     f"earlier stage of the round ({names})")
                planned.inputs[role] = (source, r)
            if r > 0:
                for role, producer in feeds.get(name, {}).items():
                    if role not in planned.cls.optional_inputs:
                        raise ValueError(f"stage '{name}' ({key}) takes no input '{role}' from the previous "
                                         f"round; it takes {sorted(planned.cls.optional_inputs) or 'none'}")
                    if producer not in {st.name for st in rounds[r - 1]}:
                        raise ValueError(f"stage '{name}' takes '{role}' from '{producer}', which is not a "
                                         f"stage of round {r - 1} ({[st.name for st in rounds[r - 1]]})")
                    planned.inputs[role] = (producer, r - 1)
            stages.append(planned)
        rounds.append(stages)
    stop_after = OmegaConf.select(cfg, "stop_after")
    if stop_after is not None:
        names = [st.name for st in rounds[-1]]
        if str(stop_after) not in names:
            raise ValueError(f"stop_after={str(stop_after)!r} is not a stage of baseline "
                             f"{OmegaConf.select(cfg, 'baseline.name')}; choose one of {names}")
        rounds[-1] = rounds[-1][: names.index(str(stop_after)) + 1]
    return rounds


def describe_plan(rounds: list[list[PlannedStage]]) -> str:
    lines = []
    for r, stages in enumerate(rounds):
        parts = []
        for st in stages:
            own = st.spec.get("inputs") or {}
            extra = [f"{role}<-{src}@{rr}" if rr != r else f"{role}<-{src}" for role, (src, rr) in st.inputs.items()
                     if rr != r or own.get(role) != src]  # previous-round feeds and redirected inputs
            parts.append(st.name + (f" ({', '.join(extra)})" if extra else ""))
        lines.append(f"round {r}: " + " -> ".join(parts))
    return "\n".join(lines)


def stage_fingerprint_spec(cfg: DictConfig, st: PlannedStage) -> dict[str, Any]:
    """Everything a stage's output depends on, besides its input artifacts."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.pop("loader", None)  # worker counts do not change results
    data.get("layout", {}).pop("cache_dir", None)  # where the cache lives is not what it holds
    return {
        "stage": f"{st.cls.__module__}.{st.cls.__qualname__}",
        "version": st.cls.version,
        "params": OmegaConf.to_container(st.spec, resolve=True),
        "data": data,
        "seed": int(cfg.seed),
        "precision": str(OmegaConf.select(cfg, "trainer.precision", default="32")),
    }
