"""ESOL's net (src/models/esol.py): continuity with the CAM net, the clip, what each stage trains, CONTA."""

from __future__ import annotations

import copy

import pytest
import torch

from src.models.cam_net import CAMNet
from src.models.esol import Clip, ESOLNet, reverse_gradient
from src.models.resnet import resnet

OPTIONS = dict(kernel_size=3, offset_groups=1, kernel_init="identity", clip={"mode": "none", "kappa": 0.5, "tau": 1.0},
               backbone="frozen", expansion_kernel="frozen", shrink_kernel="frozen", shrink_classifier="copy",
               head_lr_mult=10.0, offset_lr_mult=1.0)


def cam_net(seed: int = 0) -> CAMNet:
    torch.manual_seed(seed)
    return CAMNet(resnet("tiny", strides=[2, 2, 1, 1], norm="batch"), num_classes=3)


def esol(stage: str = "expansion", net: CAMNet | None = None, **changes) -> ESOLNet:
    return ESOLNet(copy.deepcopy(net) if net is not None else cam_net(), stage, **{**OPTIONS, **changes})


def randomise_offsets(head: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.offset.weight.copy_(torch.randn(head.offset.weight.shape, generator=g) * scale)
        head.offset.bias.copy_(torch.randn(head.offset.bias.shape, generator=g) * 0.5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_expansion_with_identity_kernel_zero_offsets_no_clip_is_the_cam_net(dtype, tol) -> None:
    base = cam_net().eval().to(dtype)
    net = esol(net=base).eval().to(dtype)
    x = torch.randn(2, 3, 40, 40, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(net(x), base(x), atol=tol, rtol=tol)
        torch.testing.assert_close(net.seed_cams(x), base.seed_cams(x), atol=tol, rtol=tol)
        assert net.seed_cams(x).abs().max() > 0.01  # a real comparison, not of zeros


def test_shrinkage_starts_as_the_expansion_it_loads() -> None:
    """W2 identity, zero shrinkage offsets, classifier copied: the shrinkage CAM is the expansion CAM, whatever
    the expansion's offsets and clip."""
    expansion = esol(clip={"mode": "relative", "kappa": 0.5, "tau": 1.0}).eval()
    randomise_offsets(expansion.expansion)
    shrinkage = esol("shrinkage", clip={"mode": "relative", "kappa": 0.5, "tau": 1.0}).eval()
    shrinkage.load_expansion(expansion.state_dict(), "test")
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert expansion.expansion.offsets(expansion.features(x)).abs().mean() > 0.1
        torch.testing.assert_close(shrinkage.seed_cams(x), expansion.seed_cams(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(shrinkage(x), expansion(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(shrinkage.expansion_cams(x), expansion.seed_cams(x), atol=1e-6, rtol=1e-6)
    assert torch.equal(shrinkage.shrink_classifier.weight, expansion.classifier.weight)


def test_clip_modes() -> None:
    f = torch.tensor([[[[-1.0, 2.0], [5.0, 8.0]]]], requires_grad=True)
    torch.testing.assert_close(Clip("none", 0.5, 1.0)(f), torch.tensor([[[[0.0, 2.0], [5.0, 8.0]]]]))
    torch.testing.assert_close(Clip("absolute", 0.5, 3.0)(f), torch.tensor([[[[0.0, 2.0], [3.0, 3.0]]]]))
    out = Clip("relative", 0.5, 1.0)(f)  # tau = 0.5 x 8
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 2.0], [4.0, 4.0]]]]))
    out.sum().backward()  # the cap is detached: only the unclipped positive position passes a gradient
    torch.testing.assert_close(f.grad, torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]]))
    per_channel = Clip("relative", 0.5, 1.0)(torch.tensor([[[[1.0, 2.0]], [[10.0, 20.0]]]]))
    torch.testing.assert_close(per_channel, torch.tensor([[[[1.0, 1.0]], [[10.0, 10.0]]]]))


def test_gradient_reversal() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, -2.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([-0.3, 0.6]))


def test_heads_start_on_the_regular_grid_with_identity_or_kaiming_kernels() -> None:
    net = esol(kernel_init="identity")
    w = net.expansion.dcn.weight
    assert torch.count_nonzero(net.expansion.offset.weight) == 0 and torch.count_nonzero(net.expansion.offset.bias) == 0
    assert torch.equal(w[:, :, 1, 1], torch.eye(w.shape[0])) and w.sum() == w.shape[0]
    kaiming = esol(kernel_init="kaiming").expansion.dcn.weight
    bound = (6.0 / (kaiming.shape[1] * 9)) ** 0.5  # kaiming_uniform_(nonlinearity='relu'): gain sqrt(2)
    assert kaiming.abs().max() <= bound and kaiming.abs().max() > 0.9 * bound


def test_what_each_stage_trains() -> None:
    exp = esol()
    groups = {g.name: (list(g.params), g.lr_mult) for g in exp.param_groups()}
    assert sorted(groups) == ["classifier", "expansion_sampler"]
    assert groups["expansion_sampler"][1] == 10.0 and groups["classifier"][1] == 10.0
    assert not exp.expansion.dcn.weight.requires_grad and not any(p.requires_grad for p in exp.backbone.parameters())
    trained = esol(backbone="train", expansion_kernel="cls_only", offset_lr_mult=0.1)
    groups = {g.name: (list(g.params), g.lr_mult) for g in trained.param_groups()}
    assert sorted(groups) == ["backbone", "classifier", "expansion_kernel", "expansion_sampler"]
    assert groups["backbone"][1] == 1.0 and groups["expansion_sampler"][1] == pytest.approx(1.0)
    assert trained.expansion.dcn.weight.requires_grad

    shrink = esol("shrinkage")
    groups = {g.name: list(g.params) for g in shrink.param_groups()}
    assert sorted(groups) == ["classifier", "shrinkage_sampler"]
    assert groups["classifier"][0] is shrink.shrink_classifier.weight
    frozen = [shrink.backbone, shrink.expansion, shrink.classifier]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    shared = esol("shrinkage", shrink_classifier="shared", shrink_kernel="cls_only")
    groups = {g.name: list(g.params) for g in shared.param_groups()}
    assert groups["classifier"][0] is shared.classifier.weight and "shrinkage_kernel" in groups
    assert not hasattr(shared, "shrink_classifier")


def test_frozen_backbone_keeps_its_batchnorm_statistics_in_training_mode() -> None:
    net = esol().train()
    assert not net.backbone.training and net.expansion.training
    assert esol(backbone="train").train().backbone.training


@pytest.mark.parametrize("inject", ["feature", "input"])
def test_conta_context_joins_every_classifier_and_keeps_continuity(inject: str) -> None:
    base = cam_net()
    base.enable_context(inject)
    net = esol("shrinkage", net=cam_net())
    net.enable_context(inject)
    if inject == "feature":
        assert net.classifier.in_channels == net.shrink_classifier.in_channels == base.classifier.in_channels
        assert not net.classifier.weight.requires_grad and net.shrink_classifier.weight.requires_grad
    else:
        assert net.backbone.conv1.in_channels == 4
    exp = esol(net=cam_net())
    exp.enable_context(inject)
    exp.load_cam_net(base.state_dict(), "test")
    base.eval(), exp.eval()
    x, prior = torch.randn(2, 3, 40, 40), torch.rand(2, 1, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(exp(x, prior), base(x, prior), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pass `context`"):
        exp(x)


def test_loading_names_what_does_not_fit() -> None:
    net = esol()
    other = CAMNet(resnet("tiny", strides=[2, 2, 1, 1], norm="batch"), num_classes=5)
    with pytest.raises(ValueError, match="shape mismatches.*classifier.weight"):
        net.load_cam_net(other.state_dict(), "the other net")
    with pytest.raises(ValueError, match="unexpected.*expansion.offset.weight"):
        net.load_cam_net(esol().state_dict(), "an expansion net")
    with pytest.raises(ValueError, match="for the shrinkage net"):
        net.load_expansion(net.state_dict(), "x")


@pytest.mark.parametrize("change, message", [
    ({"stage": "both"}, "stage must be one of expansion | shrinkage"),
    ({"kernel_init": "zero"}, "kernel_init must be one of identity | kaiming"),
    ({"clip": {"mode": "soft", "kappa": 0.5, "tau": 1.0}}, "clip.mode must be one of relative | absolute | none"),
    ({"clip": {"mode": "relative", "kappa": 0.0, "tau": 1.0}}, "clip.kappa must be a number > 0"),
    ({"kernel_size": 2}, "kernel_size must be odd"),
    ({"backbone": "frozen_bn"}, "backbone must be one of frozen | train"),
    ({"shrink_classifier": "new"}, "shrink_classifier must be one of copy | shared"),
])
def test_bad_options_are_named(change, message) -> None:
    options = {**OPTIONS, "stage": "expansion", **change}
    stage = options.pop("stage")
    with pytest.raises(ValueError, match=message):
        ESOLNet(cam_net(), stage, **options)


def test_offset_bound_caps_the_offsets_and_is_the_raw_offset_near_zero() -> None:
    bounded, free = esol(offset_bound=1.5), esol()
    for net, scale in ((bounded, 40.0), (free, 40.0)):
        randomise_offsets(net.expansion, scale=scale)
    f = torch.randn(2, bounded.backbone.out_channels, 6, 6)
    raw = free.expansion_offsets(f)
    capped = bounded.expansion_offsets(f)
    assert raw.abs().max() > 10  # the unbounded sampler leaves a 6 x 6 map
    assert capped.abs().max() <= 1.5
    torch.testing.assert_close(capped, 1.5 * torch.tanh(raw / 1.5))
    small = torch.tensor([1e-3, -2e-3])
    torch.testing.assert_close(1.5 * torch.tanh(small / 1.5), small, atol=1e-8, rtol=1e-5)


def test_offset_bound_must_be_positive_or_null() -> None:
    with pytest.raises(ValueError, match="offset_bound must be null"):
        esol(offset_bound=0)
    assert esol(offset_bound=None).expansion.offset_bound is None
