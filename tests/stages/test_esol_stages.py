"""ESOL's training stages: gradient routing (specs/esol.md section 8), the area term, config checks, the plan."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from src.models.cam_net import CAMNet
from src.models.esol import ESOLNet
from src.models.resnet import resnet
from src.ops.losses import area_loss, positive_soft_margin_loss
from src.pipeline.plan import describe_plan, plan
from src.pipeline.validate import ConfigError, finalize
from src.stages.expansion import ExpansionModule
from src.stages.shrinkage import ShrinkageModule

OPTIONS = dict(kernel_size=3, offset_groups=1, kernel_init="identity",
               clip={"mode": "relative", "kappa": 0.7, "tau": 1.0}, backbone="frozen", expansion_kernel="frozen",
               shrink_kernel="frozen", shrink_classifier="copy", head_lr_mult=10.0, offset_lr_mult=1.0)
OPTIM = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "poly_power": 0.9, "poly_every": 1}


def make_net(stage: str = "expansion", **changes) -> ESOLNet:
    torch.manual_seed(0)
    net = ESOLNet(CAMNet(resnet("tiny", strides=[2, 2, 1, 1], norm="batch"), num_classes=3), stage,
                  **{**OPTIONS, **changes})
    g = torch.Generator().manual_seed(1)
    heads = [net.expansion] + ([net.shrinkage] if stage == "shrinkage" else [])
    with torch.no_grad():  # offsets away from zero, and an offset conv that depends on its input
        for head in heads:
            head.offset.weight.copy_(torch.randn(head.offset.weight.shape, generator=g) * 0.05)
            head.offset.bias.copy_(torch.rand(head.offset.bias.shape, generator=g) + 0.1)
    return net.train()


def batch() -> dict:
    g = torch.Generator().manual_seed(2)
    return {"image": torch.randn(2, 3, 40, 40, generator=g), "label": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])}


def grads(params) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in params]


def plain_cls_grads(net: ESOLNet, data: dict, params, detach_offset_input: bool = True,
                    loss_fn=F.multilabel_soft_margin_loss) -> list[torch.Tensor]:
    """d L_cls / d params of the expansion net without any routing (no reversal)."""
    f = net.features(data["image"])
    offsets = net.expansion.offsets(f.detach() if detach_offset_input else f)
    logits = net.logits(net.expand(f, offsets), None, net.classifier)
    return list(torch.autograd.grad(loss_fn(logits, data["label"]), list(params), allow_unused=True))


def backward(module, data: dict) -> dict:
    module.net.zero_grad(set_to_none=True)
    terms = module.step_losses(data)
    terms["loss"].backward()
    return terms


# ------------------------------------------------------------------------------------------- expansion
@pytest.mark.parametrize("lambda_e", [1.0, 0.3])
def test_expansion_sampler_gets_minus_lambda_times_the_cls_gradient(lambda_e: float) -> None:
    net = make_net()
    module = ExpansionModule(net, OPTIM, 10, lambda_e, "all", "simultaneous")
    data = batch()
    sampler, classifier = list(net.expansion.offset.parameters()), list(net.classifier.parameters())
    expected_sampler = plain_cls_grads(net, data, sampler)
    expected_classifier = plain_cls_grads(net, data, classifier)
    backward(module, data)
    for got, want in zip(grads(sampler), expected_sampler):
        assert want.abs().max() > 1e-6
        torch.testing.assert_close(got, -lambda_e * want, atol=1e-7, rtol=1e-5)
    for got, want in zip(grads(classifier), expected_classifier):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)
    # W1 frozen (the default): no gradient, not trained; the frozen backbone: no gradient either
    assert net.expansion.dcn.weight.grad is None and not net.expansion.dcn.weight.requires_grad
    assert all(p.grad is None for p in net.backbone.parameters())


def test_expansion_backbone_gets_no_gradient_through_the_offset_conv_input() -> None:
    net = make_net(backbone="train")
    module = ExpansionModule(net, OPTIM, 10, 1.0, "all", "simultaneous")
    data = batch()
    backbone = [p for p in net.backbone.parameters() if p.requires_grad]
    through_dcn_only = plain_cls_grads(net, data, backbone, detach_offset_input=True)
    through_both = plain_cls_grads(net, data, backbone, detach_offset_input=False)
    backward(module, data)
    got = grads(backbone)
    for g, want in zip(got, through_dcn_only):
        torch.testing.assert_close(g, want, atol=1e-7, rtol=1e-5)
    # the check is not vacuous: through the offset conv the backbone would get a different gradient
    assert max((a - b).abs().max() for a, b in zip(through_dcn_only, through_both)) > 1e-6


def test_expansion_w1_trains_only_on_the_minimising_loss_under_cls_only() -> None:
    net = make_net(expansion_kernel="cls_only")
    module = ExpansionModule(net, OPTIM, 10, 1.0, "all", "simultaneous")
    data = batch()
    (want,) = plain_cls_grads(net, data, [net.expansion.dcn.weight])
    backward(module, data)
    torch.testing.assert_close(net.expansion.dcn.weight.grad, want, atol=1e-7, rtol=1e-5)


def test_expansion_positive_classes_route_the_two_losses() -> None:
    net = make_net()
    module = ExpansionModule(net, OPTIM, 10, 0.5, "positive", "simultaneous")
    data = batch()
    sampler, classifier = list(net.expansion.offset.parameters()), list(net.classifier.parameters())
    want_sampler = plain_cls_grads(net, data, sampler, loss_fn=positive_soft_margin_loss)
    want_classifier = plain_cls_grads(net, data, classifier)
    terms = backward(module, data)
    assert set(terms) >= {"cls", "inverse", "loss"}
    for got, want in zip(grads(sampler), want_sampler):
        torch.testing.assert_close(got, -0.5 * want, atol=1e-7, rtol=1e-5)
    for got, want in zip(grads(classifier), want_classifier):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)


def test_expansion_alternate_updates_one_side_per_step(monkeypatch) -> None:
    net = make_net()
    module = ExpansionModule(net, OPTIM, 10, 1.0, "all", "alternate")
    data = batch()
    want_sampler = plain_cls_grads(net, data, list(net.expansion.offset.parameters()))
    want_classifier = plain_cls_grads(net, data, list(net.classifier.parameters()))
    for step, minimising in ((0, True), (1, False)):
        monkeypatch.setattr(ExpansionModule, "global_step", property(lambda self, s=step: s))
        backward(module, data)
        sampler, classifier = grads(net.expansion.offset.parameters()), grads(net.classifier.parameters())
        if minimising:
            assert all(g is None for g in sampler)
            for g, want in zip(classifier, want_classifier):
                torch.testing.assert_close(g, want, atol=1e-7, rtol=1e-5)
        else:
            assert all(g is None for g in classifier)
            for g, want in zip(sampler, want_sampler):
                torch.testing.assert_close(g, -want, atol=1e-7, rtol=1e-5)


def test_expansion_tracks_the_mean_absolute_offset() -> None:
    net = make_net()
    module = ExpansionModule(net, OPTIM, 10, 1.0, "all", "simultaneous")
    data = batch()
    module.step_losses(data)
    with torch.no_grad():
        want = net.expansion.offsets(net.features(data["image"])).abs().mean()
    torch.testing.assert_close(module.offset_abs.compute(), want)


# ------------------------------------------------------------------------------------------- shrinkage
@pytest.mark.parametrize("kernel_train", ["frozen", "cls_only"])
def test_shrinkage_trains_nothing_before_the_clip_and_the_classifier_on_cls_only(kernel_train: str) -> None:
    net = make_net("shrinkage", shrink_kernel=kernel_train)
    module = ShrinkageModule(net, OPTIM, 10, 0.4, "max")
    data = batch()
    head, sampler = list(net.shrink_classifier.parameters()), list(net.shrinkage.offset.parameters())
    w2 = [net.shrinkage.dcn.weight]

    def losses():
        g = net.clipped(data["image"])
        shrunk = net.shrink(g, net.shrinkage.offsets(g))
        cls = F.multilabel_soft_margin_loss(net.logits(shrunk, None, net.shrink_classifier), data["label"])
        return cls, area_loss(net.class_maps(shrunk, None, net.shrink_classifier), data["label"])

    cls, area = losses()
    want_head = torch.autograd.grad(cls, head, retain_graph=True)
    want_sampler = torch.autograd.grad(cls + 0.4 * area, sampler, retain_graph=True)
    area_on_head = torch.autograd.grad(area, head, retain_graph=True)
    want_w2 = torch.autograd.grad(cls, w2, retain_graph=True) if kernel_train == "cls_only" else None
    backward(module, data)
    before_clip = [*net.backbone.parameters(), *net.expansion.parameters(), *net.classifier.parameters()]
    assert all(p.grad is None for p in before_clip)
    for g, want, other in zip(grads(head), want_head, area_on_head):
        torch.testing.assert_close(g, want, atol=1e-7, rtol=1e-5)
        assert other.abs().max() > 1e-6  # the area term would move the classifier: it is kept out
    for g, want in zip(grads(sampler), want_sampler):
        torch.testing.assert_close(g, want, atol=1e-7, rtol=1e-5)
    if kernel_train == "cls_only":
        torch.testing.assert_close(net.shrinkage.dcn.weight.grad, want_w2[0], atol=1e-7, rtol=1e-5)
    else:
        assert net.shrinkage.dcn.weight.grad is None


# ------------------------------------------------------------------------------------------- area term
def test_area_loss_invariances() -> None:
    g = torch.Generator().manual_seed(3)
    cam = torch.randn(2, 3, 6, 8, generator=g)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    base = area_loss(cam, labels)
    torch.testing.assert_close(area_loss(7.5 * cam, labels), base, atol=1e-5, rtol=1e-5)  # scale-invariant
    constant = torch.full((1, 1, 6, 8), 3.0)
    assert area_loss(constant, torch.ones(1, 1)).item() == pytest.approx(1.0, abs=1e-5)
    onehot = torch.zeros(1, 1, 6, 8)
    onehot[0, 0, 2, 5] = 4.0
    assert area_loss(onehot, torch.ones(1, 1)).item() == pytest.approx(1 / 48, rel=1e-5)
    # only present classes count: an absent class's map changes nothing
    changed = cam.clone()
    changed[0, 1] = 100.0
    torch.testing.assert_close(area_loss(changed, labels), base)
    by_hand = torch.stack([(F.relu(cam[b, c]) / (F.relu(cam[b, c]).max() + 1e-5)).mean()
                           for b, c in ((0, 0), (0, 2), (1, 1), (1, 2))]).mean()
    torch.testing.assert_close(base, by_hand)
    torch.testing.assert_close(area_loss(cam, labels, "none"),
                               torch.stack([F.relu(cam[b, c]).mean() for b, c in ((0, 0), (0, 2), (1, 1), (1, 2))])
                               .mean())
    assert area_loss(cam, torch.zeros(2, 3)).item() == 0.0
    with pytest.raises(ValueError, match="area normalise must be one of max | none"):
        area_loss(cam, labels, "sum")


def test_positive_soft_margin_is_the_present_part_of_the_soft_margin() -> None:
    logits = torch.tensor([[0.3, -1.2, 2.0], [1.0, 0.5, -0.7]])
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    negative = -((1 - labels) * F.logsigmoid(-logits)).sum(1).mean() / 3
    torch.testing.assert_close(positive_soft_margin_loss(logits, labels) + negative,
                               F.multilabel_soft_margin_loss(logits, labels))


# ----------------------------------------------------------------------------------- config and plan
def test_esol_plan_orders_the_stages_and_feeds_conta_context(make_cfg) -> None:
    cfg = finalize(make_cfg("+baseline=esol", "+conta=on", "conta.rounds=1"))
    rounds = plan(cfg)
    names = [st.name for st in rounds[0]]
    assert names[:5] == ["classification", "expansion", "shrinkage", "expansion_seeds", "seeds"]
    by_name = {st.name: st for st in rounds[1]}
    for name in ("classification", "expansion", "shrinkage", "expansion_seeds", "seeds"):
        assert by_name[name].inputs["context"] == ("confounder_set", 0), name
    assert by_name["expansion"].inputs["model"] == ("classification", 1)
    assert by_name["shrinkage"].inputs["model"] == ("expansion", 1)
    assert by_name["seeds"].inputs["model"] == ("shrinkage", 1)
    assert by_name["expansion_seeds"].inputs["model"] == ("expansion", 1)
    assert "context" not in {st.name: st for st in rounds[0]}["expansion"].inputs
    text = describe_plan(rounds)
    assert "expansion (context<-confounder_set@0)" in text

    off = plan(finalize(make_cfg("+baseline=esol", "baseline.esol.eval_expansion=false")))
    assert [st.name for st in off[0]][:4] == ["classification", "expansion", "shrinkage", "seeds"]


def test_esol_nets_build_from_their_config_and_share_the_expansion_keys(make_cfg) -> None:
    cfg = finalize(make_cfg("+baseline=esol"))
    stages = cfg.baseline.stages
    expansion, shrinkage = (instantiate(stages[n].stage.net) for n in ("expansion", "shrinkage"))
    assert (expansion.stage, shrinkage.stage) == ("expansion", "shrinkage")
    assert set(expansion.state_dict()) < set(shrinkage.state_dict())
    shrinkage.load_expansion(copy.deepcopy(expansion.state_dict()), "test")
    assert expansion.clip.mode == "relative" and expansion.clip.kappa == 0.5
    # the quick profile bounds both samplers (the miniature's 6 x 6 maps); the paper profile keeps the spec's
    assert expansion.expansion.offset_bound == 0.25 and shrinkage.shrinkage.offset_bound == 0.25
    paper = finalize(make_cfg("+baseline=esol", "profile=paper")).baseline.stages.expansion.stage.net
    assert paper.offset_bound is None


@pytest.mark.parametrize("override, message", [
    ("baseline.esol.clip.mode=soft", "baseline.stages.expansion.stage.net.clip.mode must be one of"),
    ("baseline.esol.expansion.inverse_classes=some", "baseline.stages.expansion.stage.module.inverse_classes"),
    ("baseline.esol.expansion.lambda_e=0", "module.lambda_e must be > 0.0"),
    ("baseline.esol.shrink.area.normalise=sum", "baseline.stages.shrinkage.stage.module.area_normalise"),
    ("baseline.esol.shrink.lambda_a=-1", "module.lambda_a must be >= 0.0"),
    ("baseline.esol.eval_expansion=maybe", "baseline.stages.expansion_seeds.enabled must be true or false"),
])
def test_bad_esol_options_stop_before_any_work(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        finalize(make_cfg("+baseline=esol", override))
