"""IRN module: shapes on both backbones, frozen-backbone behaviour, param groups, hand-computed losses."""

from __future__ import annotations

import math

import pytest
import torch

from src.models.irn import IRN, MeanShift, stage_strides
from src.models.resnet import resnet
from src.ops.losses import affinity_from_edge, irn_loss_terms, pair_displacement
from src.ops.optim import build_sgd
from src.ops.path_index import PathIndex, affinity_labels


def tiny_irn(freeze: bool, **kwargs) -> IRN:
    torch.manual_seed(0)
    return IRN(resnet("tiny", strides=kwargs.pop("strides", (2, 2, 2, 1)), norm="batch"),
               freeze_backbone=freeze, **kwargs)


@pytest.mark.parametrize("size,expected", [((64, 64), (16, 16)), ((50, 70), (13, 18))])
def test_tiny_output_shapes(size, expected) -> None:
    model = tiny_irn(freeze=False).eval()
    assert model.backbone.stage_channels == [16, 16, 32, 64, 128]
    edge, dp = model(torch.randn(2, 3, *size))
    assert edge.shape == (2, 1, *expected) and dp.shape == (2, 2, *expected)


def test_resnet50_output_shapes_and_reference_widths() -> None:
    backbone = resnet(50, strides=(2, 2, 2, 1), norm="fixed")
    assert stage_strides(backbone) == [4, 4, 8, 16, 16]
    model = IRN(backbone).eval()
    # reference widths: 5 x 32 = 160 boundary channels, 64 + 128 + 256 = 448 displacement channels
    assert model.edge_fuse.in_channels == 160 and model.edge_fuse.bias is not None
    assert model.dp_out[0].in_channels == 448 and model.dp_mid_fuse[0].in_channels == 768
    assert [b[0].in_channels for b in model.edge_stages] == [64, 256, 512, 1024, 2048]
    with torch.no_grad():
        edge, dp = model(torch.randn(1, 3, 64, 64))
    assert edge.shape == (1, 1, 16, 16) and dp.shape == (1, 2, 16, 16)


def test_output_stride_32_backbone_still_gives_stride_4() -> None:
    model = tiny_irn(freeze=False, strides=(2, 2, 2, 2)).eval()
    assert stage_strides(model.backbone) == [4, 4, 8, 16, 32]
    edge, dp = model(torch.randn(1, 3, 72, 40))
    assert edge.shape == (1, 1, 18, 10) and dp.shape == (1, 2, 18, 10)


def test_frozen_backbone_gets_no_gradient_and_stays_in_eval() -> None:
    model = tiny_irn(freeze=True)
    model.train()
    assert model.training and not model.backbone.training
    assert all(not m.training for m in model.backbone.modules())
    assert model.edge_fuse.training and model.mean_shift.training
    bn = model.backbone.bn1
    stats = bn.running_mean.clone()
    edge, dp = model(torch.randn(2, 3, 32, 32))
    (edge.sum() + dp.sum()).backward()
    assert torch.equal(bn.running_mean, stats)  # eval-mode BN: statistics untouched
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.edge_parameters() + model.displacement_parameters())


def test_trainable_backbone_gets_gradient() -> None:
    model = tiny_irn(freeze=False)
    model.train()
    assert model.backbone.training
    edge, dp = model(torch.randn(2, 3, 32, 32))
    (edge.sum() + dp.sum()).backward()
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_param_groups_and_lr_multipliers() -> None:
    plain = tiny_irn(freeze=False)  # the net's own defaults: every group at the base lr
    assert [(g.name, g.lr_mult) for g in plain.param_groups()] == [
        ("edge", 1.0), ("displacement", 1.0), ("backbone", 1.0)]

    # the reference's multipliers (conf/refinement/irn.yaml): displacement branch at 10x
    frozen = tiny_irn(freeze=True, dp_lr_mult=10)
    groups = frozen.param_groups()
    assert [(g.name, g.lr_mult) for g in groups] == [("edge", 1.0), ("displacement", 10.0)]
    branch_ids = {id(p) for g in groups for p in g.params}
    non_backbone = {id(p) for n, p in frozen.named_parameters() if not n.startswith("backbone.")}
    assert branch_ids == non_backbone
    assert len(branch_ids) == sum(len(list(g.params)) for g in groups)  # no parameter twice
    opt = build_sgd(groups, lr=0.1, momentum=1e-4, weight_decay=1e-4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 1.0])  # spec: 0.1 / 1.0

    trainable = tiny_irn(freeze=False, dp_lr_mult=10)
    groups = trainable.param_groups()
    assert [(g.name, g.lr_mult) for g in groups] == [("edge", 1.0), ("displacement", 10.0), ("backbone", 1.0)]
    assert {id(p) for g in groups for p in g.params} == {id(p) for p in trainable.parameters()}


def test_mean_shift_only_in_eval() -> None:
    shift = MeanShift(2)
    shift.running_mean.copy_(torch.tensor([1.0, -2.0]))
    x = torch.zeros(1, 2, 2, 2)
    assert torch.equal(shift.train()(x), x)
    assert torch.equal(shift.eval()(x)[0, :, 0, 0], torch.tensor([-1.0, 2.0]))


# ------------------------------------------------------------------------------ hand-computed loss
#
# Radius 2 on a 2 x 3 grid: one source pixel (0, 1); offsets in PathIndex order (0,1), (1,0), (1,-1), (1,1)
# (paths of length 2, 2, 4, 4: diagonal paths hold all four corners of their 2 x 2 box).
EDGE = torch.tensor([[0.1, 0.2, 0.5], [0.3, 0.4, 0.6]])
# source 0.2; (0,1): max(.2,.5) ; (1,0): max(.2,.4) ; (1,-1): max(.2,.1,.3,.4) ; (1,1): max(.2,.5,.4,.6)
AFF = [0.5, 0.6, 0.6, 0.4]
LABELS = torch.tensor([[[0, 1, 1], [255, 1, 0]],   # fg, fg, ignored, neg
                       [[0, 0, 0], [0, 2, 2]]], dtype=torch.uint8)  # bg, neg, bg, neg


def test_path_index_of_the_hand_example() -> None:
    pi = PathIndex(2, (2, 3))
    assert pi.search_dst.tolist() == [[0, 1], [1, 0], [1, -1], [1, 1]]
    assert pi.src_indices.tolist() == [1]
    assert pi.dst_indices[:, 0].tolist() == [2, 4, 3, 5]


def test_loss_terms_by_hand() -> None:
    pi = PathIndex(2, (2, 3))
    eps = 1e-5
    logits = torch.logit(EDGE).expand(2, 1, 2, 3)
    torch.testing.assert_close(affinity_from_edge(torch.sigmoid(logits), pi),
                               torch.tensor(AFF).view(1, 4, 1).expand(2, 4, 1))

    bg_pos, fg_pos, neg = affinity_labels(LABELS, pi)
    assert bg_pos[:, :, 0].tolist() == [[0, 0, 0, 0], [1, 0, 1, 0]]
    assert fg_pos[:, :, 0].tolist() == [[1, 1, 0, 0], [0, 0, 0, 0]]
    assert neg[:, :, 0].tolist() == [[0, 0, 0, 1], [0, 1, 0, 1]]

    dp = torch.zeros(2, 2, 2, 3)
    dp[0, :, 0, 1] = torch.tensor([1.0, 2.0])   # image 0: only the source moves
    dp[1, :, 0, 1] = torch.tensor([-1.0, 0.5])
    dp[1, :, 1, 0] = torch.tensor([0.5, 0.5])   # image 1: partner (1,0) of offset (1,-1) moves as well
    pair = pair_displacement(dp, pi)
    assert pair[1, :, 2, 0].tolist() == [-1.5, 0.0]

    terms = irn_loss_terms(logits, dp, bg_pos, fg_pos, neg, pi)
    bg = (-math.log(0.5 + eps) - math.log(0.6 + eps)) / (2 + eps)
    fg = (-math.log(0.5 + eps) - math.log(0.6 + eps)) / (2 + eps)
    # batch-global: 1 negative in image 0 (a = .4), 2 in image 1 (a = .6, .4); not the mean of per-image means
    ng = (-2 * math.log(1 + eps - 0.4) - math.log(1 + eps - 0.6)) / (3 + eps)
    # fg pairs of image 0: pair_disp (1, 2) vs targets (0, 1) and (1, 0): |1|+|1| + |0|+|2| = 4
    dp_fg = 4 / (2 * 2 + eps)
    # bg pairs of image 1: offset (0,1): |(-1, .5)| = 1.5 ; offset (1,-1): |(-1.5, 0)| = 1.5
    dp_bg = 3 / (2 * 2 + eps)
    expected = {"bg_pos_aff": bg, "fg_pos_aff": fg, "pos_aff": (bg + fg) / 2, "neg_aff": ng,
                "dp_fg": dp_fg, "dp_bg": dp_bg, "total": ((bg + fg) / 2 + ng) / 2 + (dp_fg + dp_bg) / 2}
    assert set(terms) == set(expected)
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value, rel=1e-5), key


def test_affinity_labels_validity_rule() -> None:
    pi = PathIndex(2, (2, 3))
    labels = torch.tensor([[[0, 30, 30], [30, 255, 0]]])
    bg_pos, fg_pos, neg = affinity_labels(labels, pi)
    assert fg_pos[0, :, 0].tolist() == [1, 0, 1, 0] and neg[0, :, 0].tolist() == [0, 0, 0, 1]
    # the reference rule (labels < 21 are valid) drops class 30 entirely
    bg_pos, fg_pos, neg = affinity_labels(labels, pi, num_classes=21)
    assert fg_pos.sum() == 0 and neg.sum() == 0 and bg_pos.sum() == 0
