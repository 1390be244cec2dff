"""ReCAM (src/models/recam.py): class features, L_sce on hand-checked cases, its CAM rule on IRNet's CAM net
and on SEAM's net, CONTA's extra channel, the parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from src.models.cam_net import CAMNet
from src.models.recam import ReCAM, class_features, sce_loss
from src.models.resnet import resnet
from src.models.resnet38d import resnet38d
from src.models.seam import SEAM


def test_class_features_by_hand():
    # C = 2 channels, a 1 x 2 map: position 0 holds (1, 0), position 1 holds (0, 2)
    f = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])
    w_bce = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 2, 1, 1)
    cams = F.conv2d(f, w_bce)  # class 0: (1, 0); class 1: (0, 2)
    feats = class_features(f, cams)
    # cam_0 / (1 + 1e-5) = (1, 0) -> f_0 = mean((1,0)*1, (0,2)*0) = (0.5, 0) / (1 + 1e-5)
    # cam_1 / (2 + 1e-5) = (0, 1) -> f_1 = mean((1,0)*0, (0,2)*1) = (0, 1) * 2 / (2 + 1e-5)
    expected = torch.tensor([[[0.5 / (1 + 1e-5), 0.0], [0.0, 2.0 / (2 + 1e-5)]]])
    torch.testing.assert_close(feats, expected)


def test_sce_loss_by_hand():
    # image 0 holds both classes: row 0 = (0, 0) -> CE(target 0) = ln 2; row 1 = (0, ln 3) -> CE(target 1) =
    # -ln(3/4); image 1 holds class 0 only: row 0 = (ln 3, 0) -> ln(4/3), its row 1 is not counted
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)]],
                           [[math.log(3), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    expected = ((math.log(2) + math.log(4 / 3)) / 2 + math.log(4 / 3)) / 2
    assert sce_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    # an image without a class adds 0 but counts in the batch (the reference divides by the batch size)
    empty = torch.cat([logits, torch.zeros(1, 2, 2)])
    assert sce_loss(empty, torch.cat([labels, torch.zeros(1, 2)])).item() == pytest.approx(expected * 2 / 3, rel=1e-6)


def tiny_cam_net() -> CAMNet:
    torch.manual_seed(0)
    return CAMNet(resnet("tiny", strides=(2, 2, 2, 1)), num_classes=4).eval()


def tiny_seam() -> SEAM:
    torch.manual_seed(0)
    return SEAM(resnet38d("tiny"), num_classes=4).eval()


@pytest.mark.parametrize("make", [tiny_cam_net, tiny_seam], ids=["irnet_cam_net", "seam"])
def test_recam_cam_is_relu_of_the_product_of_both_classifiers(make):
    net = make()
    recam = ReCAM(net, net_lr_mult=0.1).eval()
    torch.nn.init.normal_(recam.sce.weight)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = net.features(x)
        first = net.first_class_channel
        w_bce = net.classifier.weight[first:first + 4]
        expected = F.relu(F.conv2d(f, recam.sce.weight * w_bce))
        torch.testing.assert_close(recam.seed_cams(x), expected)
        assert recam.seed_cams(x).shape == (2, 4, *f.shape[-2:])
        # the BCE logits are the wrapped classifier's foreground class scores (GAP of W_bce f)
        torch.testing.assert_close(recam(x), F.conv2d(f, w_bce).mean(dim=(2, 3)))


def test_seam_features_are_what_its_classifier_reads():
    net = tiny_seam()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        cam, _ = net.cams(x)
        torch.testing.assert_close(net.classifier(net.features(x)), cam)


def test_cam_net_logits_equal_recam_logits():
    net = tiny_cam_net()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ReCAM(net, 0.1)(x), net(x))


def test_context_channel_widens_w_sce_with_a_zero_column():
    net = tiny_cam_net()
    recam = ReCAM(net, 0.1)
    before = recam.sce.weight.detach().clone()
    recam.enable_context("feature")
    assert recam.sce.in_channels == net.feature_channels == before.shape[1] + 1
    torch.testing.assert_close(recam.sce.weight[:, :-1], before)
    assert recam.sce.weight[:, -1].abs().sum() == 0
    prior = torch.rand(1, 1, 4, 4)
    assert recam.eval().seed_cams(torch.randn(1, 3, 32, 32), prior).shape == (1, 4, 2, 2)  # stride 16


def test_param_groups_and_refusals():
    net = tiny_cam_net()
    recam = ReCAM(net, 0.1)
    groups = {g.name: g for g in recam.param_groups()}
    assert {k: g.lr_mult for k, g in groups.items()} == {"backbone": 0.1, "bce_classifier": 0.1, "sce_classifier": 1.0}
    n_all = sum(1 for _ in recam.parameters())
    assert sum(len(list(g.params)) for g in recam.param_groups()) == n_all  # every parameter, once
    with pytest.raises(ValueError, match="ReCAM needs a classifier without bias"):
        ReCAM(CAMNet(resnet("tiny"), num_classes=4, classifier_bias=True), 0.1)
    with pytest.raises(TypeError, match="ReCAM needs a classifier net with 'features'"):
        ReCAM(torch.nn.Conv2d(3, 4, 1), 0.1)
