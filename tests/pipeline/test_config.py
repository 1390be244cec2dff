"""Config composition and early checks (src/pipeline/validate.py) and the stage plan
(src/pipeline/plan.py) built from the real conf/."""

from __future__ import annotations

import pytest
import yaml
from omegaconf import OmegaConf

from src.pipeline.plan import describe_plan, plan, stage_fingerprint_spec
from src.pipeline.validate import CONF_DIR, ConfigError, finalize

IRNET_STAGES = ["classification", "seeds", "ir_labels", "irn", "pseudo_masks", "segmentation"]
CONFOUNDER_STAGE = "confounder_set"  # the stage CONTA adds to each round that feeds a next one
CONTEXT_INPUT = "context"  # the role under which CONTA's stages of round r take it from round r - 1



def test_compose_irnet_with_conta(make_cfg):
    cfg = finalize(make_cfg("+baseline=irnet", "+conta=on"))
    assert cfg.baseline.name == "irnet"
    assert cfg.conta.name == "on" and cfg.conta.enabled is True and cfg.conta.rounds == 3
    assert cfg.conta.context.inject == "feature"
    assert cfg.baseline.classification.batch_size == 8  # the test profile's value, through interpolation
    assert cfg.segmentation.net.num_classes == cfg.data.num_classes + 1 == 7
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_missing_baseline_lists_the_choices(make_cfg):
    with pytest.raises(ConfigError) as info:
        finalize(make_cfg())
    msg = str(info.value)
    assert "+baseline=" in msg
    present = sorted(p.stem for p in CONF_DIR.joinpath("baseline").glob("*.yaml"))
    assert "irnet" in present
    for name in present:
        assert name in msg


def test_missing_conta_means_off(composed):
    cfg = composed("+baseline=irnet")
    assert OmegaConf.select(cfg, "conta") is None
    cfg = finalize(cfg)
    assert cfg.conta.name == "off" and cfg.conta.enabled is False and cfg.conta.rounds == 0
    rounds = plan(cfg)
    assert len(rounds) == 1
    assert [st.name for st in rounds[0]] == IRNET_STAGES  # no confounder set


@pytest.mark.parametrize(("override", "message"), [
    ("profile.cam.lr=-1", r"baseline\.classification\.optim\.lr must be > 0, got -1"),
    ("profile.cam.lr=0", r"baseline\.classification\.optim\.lr must be > 0"),
    ("profile.cam.batch_size=0", r"baseline\.classification\.batch_size must be >= 1, got 0"),
    ("profile.irn.batch_size=-2", r"baseline\.refinement\.irn\.batch_size must be >= 1, got -2"),
    ("profile.deeplab.weight_decay=-0.1", r"segmentation\.optim\.weight_decay must be >= 0"),
    ("profile.cam.epochs=0", r"baseline\.classification: set epochs >= 1"),
    ("conta.rounds=-1", r"conta\.rounds must be >= 0, got -1"),
    ("conta.rounds=1.5", r"conta\.rounds: Value '1.5' of type 'float' could not be converted to Integer"),
    ("seed=-3", r"seed must be >= 0"),
    ("trainer.devices=0", r"trainer\.devices must be >= 1"),
    ("conta.context.inject=middle", r"conta\.context\.inject: Invalid value 'middle', expected one of "
                                    r"\[feature, input\]"),
    ("conta.warm_start=everything", r"conta\.warm_start: Invalid value 'everything', expected one of "
                                    r"\[none, classifier, segmentation_backbone\]"),
    ("conta.context.image_mask=boxes", r"conta\.context\.image_mask: Invalid value 'boxes'"),
    ("conta.confounder_set.source=labels", r"conta\.confounder_set\.source: Invalid value 'labels'"),
    ("conta.confounder_set.image_masks=boxes", r"conta\.confounder_set\.image_masks: Invalid value 'boxes', "
                                               r"expected one of \[segmentation, ground_truth\]"),
    ("progress=fancy", r"progress: Invalid value 'fancy', expected one of \[rich, tqdm, none\]"),
    ("baseline.refinement.ir_labels.conf_bg=-0.5", r"baseline\.refinement\.ir_labels\.conf_bg must be >= 0.0"),
    ("baseline.refinement.ir_labels.conf_fg=bright", r"baseline\.refinement\.ir_labels\.conf_fg must be a number"),
    ("baseline.seeds.normalise=sum", r"baseline\.seeds: normalise must be one of max \| minmax, got 'sum'"),
    ("baseline.refinement.ir_labels.conf_fg=1.5", r"baseline\.refinement\.ir_labels\.conf_fg must be <= 1"),
])
def test_bad_values_name_the_key(composed, override, message):
    cfg = composed("+baseline=irnet", "+conta=on")
    key, value = override.split("=", 1)
    OmegaConf.update(cfg, key, yaml.safe_load(value), force_add=False)  # as the command-line override would
    with pytest.raises(ConfigError, match=message):
        finalize(cfg)


def test_bad_value_from_the_command_line(make_cfg):
    with pytest.raises(ConfigError, match=r"baseline\.classification\.optim\.lr must be > 0, got -1"):
        finalize(make_cfg("+baseline=irnet", "+conta=on", "profile.cam.lr=-1"))


def test_voc_needs_an_existing_root(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.root") as info:
        finalize(make_cfg("+baseline=irnet", "data=voc12", tiny=False))
    assert "data=voc12" in str(info.value)
    missing = tmp_path / "no" / "VOC2012"
    with pytest.raises(ConfigError, match=rf"data\.root={missing}: no such directory"):
        finalize(make_cfg("+baseline=irnet", "data=voc12", f"data.root={missing}", tiny=False))
    (tmp_path / "VOC2012").mkdir()
    cfg = finalize(make_cfg("+baseline=irnet", "data=voc12", f"data.root={tmp_path / 'VOC2012'}", tiny=False))
    assert cfg.data.num_classes == 20


# ------------------------------------------------------------------------------------------------ plan
def test_plan_with_conta_rounds_and_context_inputs(composed):
    cfg = composed("+baseline=irnet", "+conta=on")
    cfg.conta.rounds = 2
    cfg = finalize(cfg)
    rounds = plan(cfg)
    assert len(rounds) == 3  # round 0 (baseline) + conta.rounds
    for r, stages in enumerate(rounds):
        names = [st.name for st in stages]
        assert names == IRNET_STAGES + ([CONFOUNDER_STAGE] if r < 2 else []), r
        assert all(st.round == r for st in stages)
        for st in stages:
            has_context = CONTEXT_INPUT in st.inputs
            assert has_context == (r >= 1 and st.name in ("classification", "seeds")), (r, st.name)
            if has_context:
                assert st.inputs[CONTEXT_INPUT] == (CONFOUNDER_STAGE, r - 1)
            # every other input comes from an earlier stage of the same round
            for role, (source, source_round) in st.inputs.items():
                if role != CONTEXT_INPUT:
                    assert source_round == r and names.index(source) < names.index(st.name)
        confounder = stages[-1] if r < 2 else None
        if confounder is not None:
            assert confounder.inputs["model"] == ("segmentation", r)
    text = describe_plan(rounds)
    assert text.splitlines()[1].startswith("round 1: classification (context<-confounder_set@0) -> seeds "
                                           "(context<-confounder_set@0) -> ir_labels")
    assert len(text.splitlines()) == 3


@pytest.mark.parametrize(("warm", "source"), [("classifier", "classification"),
                                              ("segmentation_backbone", "segmentation")])
def test_plan_warm_start_inputs(composed, warm, source):
    cfg = composed("+baseline=irnet", "+conta=on")
    cfg.conta.warm_start = warm
    rounds = plan(finalize(cfg))
    assert "warm_start" not in rounds[0][0].inputs
    assert rounds[2][0].inputs["warm_start"] == (source, 1)


def test_stop_after_cuts_the_last_round_only(composed):
    cfg = composed("+baseline=irnet", "+conta=on")
    cfg.conta.rounds = 1
    cfg.stop_after = "seeds"
    cfg.optimized_metric = "seeds/train/seed_best_miou"
    rounds = plan(finalize(cfg))
    assert [st.name for st in rounds[0]] == IRNET_STAGES + [CONFOUNDER_STAGE]  # round 0 feeds round 1
    assert [st.name for st in rounds[1]] == ["classification", "seeds"]
    # the stages that run are the same stages (same fingerprints) as in a full run
    full = composed("+baseline=irnet", "+conta=on")
    full.conta.rounds = 1
    full = finalize(full)
    for a, b in zip(rounds[1], plan(full)[1]):
        assert stage_fingerprint_spec(cfg, a) == stage_fingerprint_spec(full, b), a.name
    off = composed("+baseline=seam")
    off.stop_after = "affinity"
    off.optimized_metric = None
    assert [st.name for st in plan(finalize(off))[0]] == ["classification", "seeds", "affinity_labels", "affinity"]


def test_optimized_metric_of_a_stage_that_does_not_run_is_refused_before_any_work(composed):
    cfg = composed("+baseline=irnet")
    cfg.stop_after = "seeds"
    with pytest.raises(ConfigError, match=r"optimized_metric=segmentation/val/miou names stage 'segmentation', "
                                          r"which the last round does not run"):
        finalize(cfg)


def test_stop_after_an_unknown_stage_lists_the_stages(composed):
    cfg = composed("+baseline=seam")
    cfg.stop_after = "irn"
    with pytest.raises(ConfigError, match=r"stop_after='irn' is not a stage of baseline seam; choose one of "
                                          r"\['classification', 'seeds', 'affinity_labels', 'affinity', "
                                          r"'pseudo_masks', 'segmentation'\]"):
        finalize(cfg)


def test_round0_fingerprint_specs_equal_with_conta_on_and_off(composed):
    on = finalize(composed("+baseline=irnet", "+conta=on"))
    off = finalize(composed("+baseline=irnet"))
    round0_on = [st for st in plan(on)[0] if st.name != CONFOUNDER_STAGE]
    round0_off = plan(off)[0]
    assert [st.name for st in round0_on] == [st.name for st in round0_off]
    for a, b in zip(round0_on, round0_off):
        assert a.inputs == b.inputs, a.name
        assert stage_fingerprint_spec(on, a) == stage_fingerprint_spec(off, b), a.name
    # while round 1 differs from round 0 by its input: CONTA's context (whose artifact's fingerprint holds
    # CONTA's options), so no CONTA setting can reach round 0
    round1 = plan(on)[1]
    assert round1[0].inputs[CONTEXT_INPUT] == (CONFOUNDER_STAGE, 0) and CONTEXT_INPUT not in round0_on[0].inputs
    confounder = plan(on)[0][-1]
    assert stage_fingerprint_spec(on, confounder)["params"]["context"] == OmegaConf.to_container(on.conta.context)
    # and a setting of one stage changes only that stage's spec
    lr = composed("+baseline=irnet")
    lr.profile.deeplab.lr = 0.5
    lr = finalize(lr)
    changed = [a.name for a, b in zip(plan(lr)[0], round0_off)
               if stage_fingerprint_spec(lr, a) != stage_fingerprint_spec(off, b)]
    assert changed == ["segmentation"]
