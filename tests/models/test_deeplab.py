"""DeepLab-v2 (src/models/deeplab.py): ASPP, multi-scale inputs (MSC), the MSC loss (src/ops/losses.py) and
the reference's parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from src.models.deeplab import ASPP, DeepLabV2, msc_forward, predict_probs
from src.models.resnet import resnet
from src.ops.losses import msc_loss
from src.ops.optim import build_sgd


def tiny_deeplab(num_classes: int = 5) -> DeepLabV2:
    torch.manual_seed(0)
    backbone = resnet("tiny", strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4))
    return DeepLabV2(backbone, num_classes).eval()


def test_output_shape_is_stride_8():
    net = tiny_deeplab()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 48))
    assert out.shape == (2, 5, 4, 6)
    assert net.output_stride == 8


def test_aspp_is_the_sum_of_four_dilated_branches():
    torch.manual_seed(1)
    aspp = ASPP(8, 3)
    assert [b.dilation for b in aspp.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert [b.padding for b in aspp.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    for b in aspp.branches:
        assert torch.count_nonzero(b.bias) == 0
        assert 0.005 < b.weight.std().item() < 0.015  # N(0, 0.01)
        torch.nn.init.normal_(b.bias)  # non-zero biases, so the sum includes them
    x = torch.randn(2, 8, 7, 9)
    with torch.no_grad():
        out = aspp(x)
        manual = sum(F.conv2d(x, b.weight, b.bias, padding=b.padding, dilation=b.dilation) for b in aspp.branches)
    assert out.shape == (2, 3, 7, 9)
    torch.testing.assert_close(out, manual)


def test_msc_returns_scales_plus_max():
    net = tiny_deeplab()
    x = torch.randn(1, 3, 48, 40)
    scales = [1.0, 0.75, 0.5]
    with torch.no_grad():
        outs = msc_forward(net, x, scales)
        assert len(outs) == 4
        assert [tuple(o.shape[-2:]) for o in outs] == [(6, 5), (5, 4), (3, 3), (6, 5)]
        # each scale is the net on the resized image
        torch.testing.assert_close(outs[1], net(F.interpolate(x, scale_factor=0.75, mode="bilinear",
                                                              align_corners=False)))
        ups = [outs[0]] + [F.interpolate(o, size=(6, 5), mode="bilinear", align_corners=False) for o in outs[1:3]]
        expected = torch.maximum(torch.maximum(ups[0], ups[1]), ups[2])
        torch.testing.assert_close(outs[3], expected)
        assert (outs[3] >= outs[0]).all()
        single = msc_forward(net, x, [1.0])
        assert len(single) == 1
        torch.testing.assert_close(single[0], outs[0])


def test_msc_loss_hand_computed():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]], [[-1.0, 3.0]]]])  # (1, 3, 1, 2)
    target = torch.tensor([[[1, 255]]])
    expected = -math.log(math.exp(0.0) / (math.exp(2.0) + math.exp(0.0) + math.exp(-1.0)))
    assert msc_loss([logits], target).item() == pytest.approx(expected, rel=1e-6)
    target2 = torch.tensor([[[0, 2]]])
    e2 = -math.log(math.exp(3.0) / (math.exp(0.0) + math.exp(1.0) + math.exp(3.0)))
    e1 = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0 + math.exp(-1.0)))
    assert msc_loss([logits], target2).item() == pytest.approx((e1 + e2) / 2, rel=1e-6)
    # two outputs: the sum of their losses
    assert msc_loss([logits, logits], target2).item() == pytest.approx(e1 + e2, rel=1e-6)


def test_msc_loss_shrinks_labels_with_nearest():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (1, 4, 4))
    logits = torch.randn(1, 3, 2, 2)
    expected = F.cross_entropy(logits, target[:, ::2, ::2])  # nearest at scale 1/2 keeps rows/cols 0, 2
    torch.testing.assert_close(msc_loss([logits], target), expected)


def test_msc_loss_ignores_255():
    torch.manual_seed(0)
    outs = [torch.randn(2, 4, 6, 6, requires_grad=True), torch.randn(2, 4, 3, 3, requires_grad=True)]
    target = torch.randint(0, 4, (2, 6, 6))
    target[:, :3] = 255
    loss = msc_loss(outs, target)
    # what the network predicts where the label is 255 does not matter
    perturbed = [o.detach().clone() for o in outs]
    perturbed[0][:, :, :3] += torch.randn(2, 4, 3, 6) * 10
    perturbed[1][:, :, :1] += torch.randn(2, 4, 1, 3) * 10  # rows 0 of the 3x3 map come from label rows 0
    torch.testing.assert_close(msc_loss(perturbed, target), loss.detach())
    loss.backward()
    assert outs[0].grad[:, :, :3].abs().max() == 0
    assert outs[0].grad[:, :, 3:].abs().max() > 0
    # only valid pixels count: equal to the CE over the valid half alone
    torch.testing.assert_close(msc_loss([outs[0].detach()[:, :, 3:]], target[:, 3:]),
                               F.cross_entropy(outs[0].detach(), target, ignore_index=255))


def test_param_groups_1x_10x_20x_and_no_decay_on_biases():
    net = tiny_deeplab()
    # the reference recipe (conf/segmentation/deeplab_v2.yaml): ASPP weights 10x, biases 20x without decay
    groups = net.param_groups(head_lr_mult=10, head_bias_lr_mult=20, head_bias_weight_decay=0.0)
    opt = build_sgd(groups, lr=0.01, momentum=0.9, weight_decay=5e-4)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert [g["name"] for g in opt.param_groups] == ["backbone", "aspp_weight", "aspp_bias"]
    assert by_name["backbone"]["lr"] == pytest.approx(0.01)
    assert by_name["aspp_weight"]["lr"] == pytest.approx(0.1)
    assert by_name["aspp_bias"]["lr"] == pytest.approx(0.2)
    assert by_name["backbone"]["weight_decay"] == 5e-4
    assert by_name["aspp_weight"]["weight_decay"] == 5e-4
    assert by_name["aspp_bias"]["weight_decay"] == 0.0
    assert {id(p) for p in by_name["aspp_bias"]["params"]} == {id(b.bias) for b in net.aspp.branches}
    assert {id(p) for p in by_name["aspp_weight"]["params"]} == {id(b.weight) for b in net.aspp.branches}
    every = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in net.parameters())  # each parameter exactly once


def test_predict_probs_max_over_scales_and_flip():
    net = tiny_deeplab(3)
    x = torch.randn(1, 3, 32, 40)
    probs = predict_probs(net, x, scales=(1.0, 0.5))
    assert probs.shape == (1, 3, 32, 40)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 32, 40))
    with torch.no_grad():
        fused = msc_forward(net, x, (1.0, 0.5))[-1]
        expected = torch.softmax(F.interpolate(fused, size=(32, 40), mode="bilinear", align_corners=False), 1)
        torch.testing.assert_close(probs, expected)
        flipped = predict_probs(net, x, flip=True)
        a = F.interpolate(net(x), size=(32, 40), mode="bilinear", align_corners=False)
        b = F.interpolate(net(x.flip(-1)), size=(32, 40), mode="bilinear", align_corners=False).flip(-1)
        torch.testing.assert_close(flipped, torch.softmax((a + b) / 2, 1))
