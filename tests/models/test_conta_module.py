"""CONTA's context adjustment (src/models/conta.py) and its injection into the CAM classifier
(src/models/cam_net.py)."""

from __future__ import annotations

import math

import pytest
import torch

from src.models.cam_net import CAMNet
from src.models.conta import ContextAdjustment, image_mask_vector
from src.models.resnet import resnet

C1 = [[1.0, 0.0], [0.0, 0.0]]
C2 = [[0.0, 0.5], [0.5, 1.0]]


def hand_module(image_mask: str = "foreground") -> ContextAdjustment:
    module = ContextAdjustment(torch.tensor([C1, C2]), image_mask)
    with torch.no_grad():
        module.w1.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        module.w2.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))
    return module


def test_prior_hand_computed():
    module = hand_module()
    x_m = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    # W1 x = (2, 0); W2 c1 = (1, 0); W2 c2 = (0, 1) -> logits (2, 0) / sqrt(2)
    a1 = 1 / (1 + math.exp(-2 / math.sqrt(2)))
    a2 = 1 - a1
    alpha = module.attention(x_m)
    torch.testing.assert_close(alpha, torch.tensor([[a1, a2]]))
    m = module(x_m)
    assert m.shape == (1, 1, 2, 2)
    expected = (a1 * torch.tensor(C1) + a2 * torch.tensor(C2)) / 2  # sum_i alpha_i c_i P(c_i), P = 1/n
    torch.testing.assert_close(m[0, 0], expected)
    # equal logits -> equal weights -> M is the plain mean of C over n
    torch.testing.assert_close(module(torch.tensor([[1.0, 1.0, 0.0, 0.0]]))[0, 0],
                               (torch.tensor(C1) + torch.tensor(C2)) / 4)


def test_prior_hand_computed_per_class():
    module = hand_module("per_class")
    x_m = torch.tensor([[[3.0, 0, 0, 0], [0, 2.0, 0, 0]]])  # (B, n, hw)
    # logit_1 = (W1 X1) . (W2 c1) = (3, 0) . (1, 0) = 3; logit_2 = (0, 2) . (0, 1) = 2
    l1, l2 = 3 / math.sqrt(2), 2 / math.sqrt(2)
    a1 = math.exp(l1) / (math.exp(l1) + math.exp(l2))
    torch.testing.assert_close(module.attention(x_m), torch.tensor([[a1, 1 - a1]]))
    torch.testing.assert_close(module(x_m)[0, 0], (a1 * torch.tensor(C1) + (1 - a1) * torch.tensor(C2)) / 2)


@pytest.mark.parametrize("mode", ["foreground", "label_map", "per_class"])
def test_attention_sums_to_one_and_trains(mode):
    torch.manual_seed(0)
    n, h, w = 3, 4, 5
    module = ContextAdjustment(torch.rand(n, h, w), mode)
    labels = torch.randint(0, n + 1, (2, h, w))
    x_m = image_mask_vector(labels, n, mode)
    alpha = module.attention(x_m)
    assert alpha.shape == (2, n)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2))
    assert (alpha > 0).all()
    m = module(x_m)
    assert m.shape == (2, 1, h, w)
    (m * torch.randn_like(m)).sum().backward()
    assert module.w1.weight.grad is not None and module.w1.weight.grad.abs().sum() > 0
    assert module.w2.weight.grad is not None and module.w2.weight.grad.abs().sum() > 0
    assert module.w1.weight.shape == (n, h * w) and module.w2.weight.shape == (n, h * w)
    assert not module.confounders.requires_grad


def test_bad_confounder_set_or_mode():
    with pytest.raises(ValueError, match=r"\(n, h, w\)"):
        ContextAdjustment(torch.rand(3, 4))
    with pytest.raises(ValueError, match="conta.image_mask"):
        ContextAdjustment(torch.rand(2, 3, 3), "boxes")
    with pytest.raises(ValueError, match="conta.image_mask"):
        image_mask_vector(torch.zeros(1, 2, 2), 2, "boxes")


def test_image_mask_vector_from_labels():
    labels = torch.tensor([[[0, 1], [2, 255]]])  # 255 (unknown) counts as background
    torch.testing.assert_close(image_mask_vector(labels, 2, "foreground"), torch.tensor([[0.0, 1, 1, 0]]))
    torch.testing.assert_close(image_mask_vector(labels, 2, "label_map"), torch.tensor([[0.0, 0.5, 1.0, 0]]))
    torch.testing.assert_close(image_mask_vector(labels, 2, "per_class"),
                               torch.tensor([[[0.0, 1, 0, 0], [0, 0, 1, 0]]]))


def test_image_mask_vector_from_probabilities():
    probs = torch.tensor([[[[0.5, 0.1]], [[0.3, 0.0]], [[0.2, 0.9]]]])  # (1, 3, 1, 2): bg, class 1, class 2
    torch.testing.assert_close(image_mask_vector(probs, 2, "foreground"), torch.tensor([[0.5, 0.9]]))
    torch.testing.assert_close(image_mask_vector(probs, 2, "label_map"),
                               torch.tensor([[(0.3 * 1 + 0.2 * 2) / 2, (0.9 * 2) / 2]]))
    torch.testing.assert_close(image_mask_vector(probs, 2, "per_class"), torch.tensor([[[0.3, 0.0], [0.2, 0.9]]]))
    # one-hot probabilities give what the label map gives
    labels = torch.tensor([[[0, 2], [1, 1]]])
    onehot = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    for mode in ("foreground", "label_map", "per_class"):
        torch.testing.assert_close(image_mask_vector(onehot, 2, mode), image_mask_vector(labels, 2, mode))


# -------------------------------------------------------------------------------------- CAMNet + M
def nets(inject: str) -> tuple[CAMNet, CAMNet]:
    torch.manual_seed(0)
    plain = CAMNet(resnet("tiny", strides=(2, 2, 2, 1)), num_classes=4).eval()
    with_context = CAMNet(resnet("tiny", strides=(2, 2, 2, 1)), num_classes=4).eval()
    with_context.load_state_dict(plain.state_dict())
    with_context.enable_context(inject)
    return plain, with_context


@pytest.mark.parametrize("inject", ["feature", "input"])
def test_context_channel_is_neutral_until_trained(inject):
    plain, net = nets(inject)
    x = torch.randn(2, 3, 32, 32)
    priors = [torch.zeros(2, 1, 3, 3), torch.rand(2, 1, 3, 3), torch.rand(2, 1, 5, 4) * 4]
    with torch.no_grad():
        ref = plain(x)
        ref_cams = plain.cams(x)
        for prior in priors:
            torch.testing.assert_close(net(x, prior), ref)
            torch.testing.assert_close(net.cams(x, prior), ref_cams)
    if inject == "feature":
        assert net.classifier.in_channels == plain.classifier.in_channels + 1
        assert net.feature_channels == 129
        assert torch.count_nonzero(net.classifier.weight[:, -1]) == 0
    else:
        assert net.backbone.conv1.in_channels == 4
        assert torch.count_nonzero(net.backbone.conv1.weight[:, 3]) == 0


@pytest.mark.parametrize("inject", ["feature", "input"])
def test_different_priors_give_different_logits_once_trained(inject):
    _, net = nets(inject)
    torch.manual_seed(1)
    with torch.no_grad():  # what training does to the new channel's weights
        if inject == "feature":
            net.classifier.weight[:, -1] = torch.randn(4, 1, 1)
        else:
            net.backbone.conv1.weight[:, 3] = torch.randn(16, 7, 7)
    x = torch.randn(2, 3, 32, 32)
    a, b = torch.zeros(2, 1, 3, 3), torch.rand(2, 1, 3, 3) + 0.5
    with torch.no_grad():
        la, lb = net(x, a), net(x, b)
    assert la.shape == (2, 4)
    assert (la - lb).abs().max() > 1e-3
    # gradients reach the new weights through the prior
    net.train()
    net(x, b).sum().backward()
    grad = net.classifier.weight.grad[:, -1] if inject == "feature" else net.backbone.conv1.weight.grad[:, 3]
    assert grad.abs().sum() > 0


def test_context_must_match_the_net():
    plain, net = nets("feature")
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="CONTA is not enabled"):
        plain(x, torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="pass `context`"):
        net(x)
    with pytest.raises(ValueError, match="pass `context`"):
        net.cams(x)
    with pytest.raises(ValueError, match="conta.inject"):
        plain.enable_context("middle")
    net.enable_context("feature")  # a second call changes nothing
    assert net.classifier.in_channels == 129


def test_cam_net_shapes_and_param_groups():
    torch.manual_seed(0)
    net = CAMNet(resnet("tiny", strides=(2, 2, 2, 1)), num_classes=4, classifier_lr_mult=10)
    x = torch.randn(2, 3, 48, 32)
    assert net.cams(x).shape == (2, 4, 3, 2)
    assert net.classifier.bias is None
    # the logits are the classifier on the average feature = the average of the CAMs (linear head)
    torch.testing.assert_close(net(x), net.cams(x).mean((2, 3)))
    groups = net.param_groups()
    assert [(g.name, g.lr_mult) for g in groups] == [("backbone", 1.0), ("classifier", 10)]
    frozen = CAMNet(resnet("tiny"), num_classes=4, freeze_stem=True)
    assert not frozen.backbone.conv1.weight.requires_grad and not frozen.backbone.bn1.weight.requires_grad
    assert frozen.backbone.layer1[0].conv1.weight.requires_grad
