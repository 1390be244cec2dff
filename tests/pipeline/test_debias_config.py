"""The `debias` group (conf/debias: none, cda, recam) composed with every baseline and with CONTA: the plans,
the fingerprints of `debias=none` (today's path), the planner's `redirect`, and what results.json records."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from src.pipeline.plan import describe_plan, merge_role, plan, stage_fingerprint_spec
from src.pipeline.results import RunResults
from src.pipeline.validate import CONF_DIR, ConfigError, finalize

IRNET = ["classification", "seeds", "ir_labels", "irn", "pseudo_masks", "segmentation"]
SEAM = ["classification", "seeds", "affinity_labels", "affinity", "pseudo_masks", "segmentation"]



def names(stages) -> list[str]:
    return [st.name for st in stages]


def specs(cfg, stages) -> list[tuple]:
    return [(st.name, st.inputs, stage_fingerprint_spec(cfg, st)) for st in stages]


@pytest.mark.parametrize("baseline", ["irnet", "seam", "seam_irnet"])
@pytest.mark.parametrize("conta", [(), ("+conta=on",)], ids=["conta_absent", "conta_on"])
def test_debias_none_is_todays_path(composed, baseline, conta):
    today = finalize(composed(f"+baseline={baseline}", *conta))
    none = finalize(composed(f"+baseline={baseline}", *conta, "+debias=none"))
    assert today.debias.name == "none"  # an absent +debias means none
    a, b = plan(today), plan(none)
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert specs(today, ra) == specs(none, rb)  # same stages, inputs and fingerprints: the same cache
    assert describe_plan(a) == describe_plan(b)


def test_cda_plan_irnet(composed):
    cfg = finalize(composed("+baseline=irnet", "+debias=cda"))
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    rounds = plan(cfg)
    assert len(rounds) == 2
    assert names(rounds[0]) == IRNET[:5] + ["instance_bank", "segmentation"]
    assert names(rounds[1]) == IRNET  # the last round feeds no next one: no bank
    assert rounds[0][5].inputs == {"pseudo_masks": ("pseudo_masks", 0)}
    assert rounds[1][0].inputs == {"instances": ("instance_bank", 0)}
    # round 0 is the baseline: the same specs as debias=none (shared through the cache)
    none = finalize(composed("+baseline=irnet"))
    round0 = [st for st in rounds[0] if st.name != "instance_bank"]
    assert specs(cfg, round0) == specs(none, plan(none)[0])
    bank = stage_fingerprint_spec(cfg, rounds[0][5])["params"]
    assert bank["min_fraction"] == 0.1 and bank["max_fraction"] == 0.7 and bank["paste"] == {"max_angle": 90,
                                                                                             "max_size": 0.7}


def test_recam_plan_irnet(composed):
    cfg = finalize(composed("+baseline=irnet", "+debias=recam"))
    OmegaConf.to_container(cfg, resolve=True)
    (round0,) = plan(cfg)
    assert names(round0) == ["classification", "recam", *IRNET[1:]]
    assert round0[1].inputs == {"model": ("classification", 0)}
    assert round0[2].inputs == {"model": ("recam", 0)}  # the seeds read ReCAM's network
    assert describe_plan([round0]).startswith("round 0: classification -> recam -> seeds (model<-recam) -> ")
    none = finalize(composed("+baseline=irnet"))
    assert specs(cfg, round0[:1]) == specs(none, plan(none)[0][:1])  # the classifier itself is shared
    params = stage_fingerprint_spec(cfg, round0[1])["params"]
    assert params["augment"] == OmegaConf.to_container(cfg.baseline.classification.augment, resolve=True)
    assert params["loss_weight"] == 1.0 and params["net"]["net_lr_mult"] == 0.1


@pytest.mark.parametrize("option", ["none", "cda", "recam"])
def test_seam_composes_and_plans_with_each_option(composed, option):
    cfg = finalize(composed("+baseline=seam", f"+debias={option}"))
    OmegaConf.to_container(cfg, resolve=True)
    rounds = plan(cfg)
    expected = {"none": [SEAM], "cda": [SEAM[:5] + ["instance_bank", "segmentation"], SEAM],
                "recam": [["classification", "recam", *SEAM[1:]]]}[option]
    assert [names(r) for r in rounds] == expected
    if option == "recam":
        assert rounds[0][2].inputs["model"] == ("recam", 0)


def test_seam_cda_with_conta_both_feed_round_1_classification(composed):
    cfg = finalize(composed("+baseline=seam", "+debias=cda", "+conta=on"))
    rounds = plan(cfg)
    assert len(rounds) == 1 + max(cfg.conta.rounds, cfg.debias.rounds) == 4  # the larger of the two
    for r, stages in enumerate(rounds):
        last = r == len(rounds) - 1
        assert names(stages) == (SEAM[:5] + ([] if last else ["instance_bank"]) + ["segmentation"]
                                 + ([] if last else ["confounder_set"]))
        if r:
            assert stages[0].inputs == {"context": ("confounder_set", r - 1), "instances": ("instance_bank", r - 1)}
            assert stages[1].inputs == {"model": ("classification", r), "context": ("confounder_set", r - 1)}


def test_seam_recam_with_conta_fine_tunes_the_context_classifier(composed):
    cfg = finalize(composed("+baseline=seam", "+debias=recam", "+conta=on", "conta.rounds=1"))
    rounds = plan(cfg)
    assert names(rounds[0]) == ["classification", "recam", *SEAM[1:], "confounder_set"]
    recam, seeds = rounds[1][1], rounds[1][2]
    assert recam.inputs == {"model": ("classification", 1), "context": ("confounder_set", 0)}
    assert seeds.inputs == {"model": ("recam", 1), "context": ("confounder_set", 0)}
    assert "context" not in rounds[0][1].inputs


def test_redirect_errors_name_the_stage(composed):
    cfg = composed("+baseline=irnet", "+debias=recam")
    cfg.debias.redirect.seeds = {"model": "pseudo_masks"}
    with pytest.raises(ConfigError, match=r"a method redirects seeds.inputs.model to 'pseudo_masks', which is not an "
                                          r"earlier stage of the round"):
        finalize(cfg)
    cfg = composed("+baseline=irnet", "+debias=recam")
    cfg.debias.redirect.seeds = {"weights": "recam"}
    with pytest.raises(ConfigError, match=r"a method redirects input 'weights' of stage 'seeds' \(baseline.seeds\), "
                                          r"which has inputs \['model'\]"):
        finalize(cfg)


def test_bad_debias_settings_are_refused_before_any_work(composed):
    cfg = composed("+baseline=irnet", "+debias=cda")
    cfg.debias.instance_bank.max_fraction = 1.5
    with pytest.raises(ConfigError, match=r"debias.stages.instance_bank.stage.max_fraction must be <= 1.0, got 1.5"):
        finalize(cfg)
    cfg = composed("+baseline=irnet", "+debias=recam")
    cfg.debias.recam.loss_weight = -1.0
    with pytest.raises(ConfigError, match=r"debias.stages.recam.stage.loss_weight must be >= 0.0, got -1.0"):
        finalize(cfg)


def test_results_and_sweep_folders_name_the_debias_option(composed, tmp_path):
    cfg = finalize(composed("+baseline=irnet", "+debias=cda"))
    data = SimpleNamespace(layout=SimpleNamespace(root=tmp_path), train_split="train", val_split="val",
                           eval_splits=["val"], seed_eval_split="train", seed_metric_split="train")
    record = RunResults(cfg, tmp_path, data).as_dict()
    assert record["methods"] == {"conta": "off", "debias": "cda"}
    plain = RunResults(finalize(composed("+baseline=irnet")), tmp_path, data).as_dict()
    assert plain["methods"] == {"conta": "off", "debias": "none"}
    subdir = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "hydra" / "default.yaml"))["sweep"]["subdir"]
    assert "_debias-${oc.select:debias.name,none}_" in subdir


def test_two_methods_giving_one_role_different_sources_stop_with_both_named():
    table: dict = {}
    merge_role(table, "conta.previous_round", "classification", "context", "confounder_set")
    merge_role(table, "debias.previous_round", "classification", "context", "confounder_set")  # the same: fine
    assert table == {"classification": {"context": "confounder_set"}}
    with pytest.raises(ValueError, match=r"debias.previous_round.classification.context='instance_bank' conflicts "
                                         r"with another method's 'confounder_set'"):
        merge_role(table, "debias.previous_round", "classification", "context", "instance_bank")
