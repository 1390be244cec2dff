"""AffinityNet: shapes, pair affinities against direct computations (ours and the reference's cropped layout),
affinity labels on a hand-made map, the loss by hand, param groups, loading."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from src.models.affinity import AffinityNet, pair_affinity
from src.models.resnet38d import ResNet38d, resnet38d
from src.ops.losses import affinity_loss
from src.ops.optim import build_sgd
from src.ops.pairs import affinity_labels_in_radius, half_plane_offsets, to_label_layout

RADIUS = 5  # the spec's AffinityNet pair radius (profile.affinity.radius)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions gain nothing from threads, and on a shared CPU the thread hand-offs dominate."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tiny_net(**kwargs) -> AffinityNet:
    torch.manual_seed(0)
    return AffinityNet(resnet38d("tiny", norm=kwargs.pop("norm", "frozen")), **kwargs)


def test_shapes_tiny_and_full() -> None:
    net = tiny_net().eval()
    with torch.no_grad():
        f = net(torch.randn(2, 3, 32, 40))
        aff = net.affinity(torch.randn(2, 3, 32, 40), RADIUS)
    assert f.shape == (2, 448, 4, 5) and f.min() > -1
    assert aff.shape == (2, 34, 4, 5) and aff.min() >= 0 and aff.max() <= 1
    with torch.device("meta"):  # full width: shapes only, nothing allocated
        full = AffinityNet(ResNet38d()).eval()
        assert full(torch.randn(1, 3, 16, 24)).shape == (1, 448, 2, 3)
    assert (full.f8_3.in_channels, full.f8_4.in_channels, full.f8_5.in_channels) == (512, 1024, 4096)


def test_pair_affinity_equals_direct_computation() -> None:
    torch.manual_seed(1)
    f = torch.randn(2, 5, 4, 6)
    for radius in (3, 5):
        aff = pair_affinity(f, radius)
        offsets = half_plane_offsets(radius)
        assert aff.shape == (2, len(offsets), 4, 6)
        expected = torch.zeros_like(aff)
        for o, (dy, dx) in enumerate(offsets):
            for y in range(4):
                for x in range(6):
                    if 0 <= y + dy < 4 and 0 <= x + dx < 6:
                        diff = f[:, :, y, x] - f[:, :, y + dy, x + dx]
                        expected[:, o, y, x] = torch.exp(-diff.abs().mean(1))
        torch.testing.assert_close(aff, expected, rtol=1e-6, atol=1e-7)


def test_label_layout_matches_reference_pair_indices() -> None:
    """The reference forward gathers pairs with indices_from = full[:-rf, rf:-rf] and, per offset,
    indices_to = full[dy:dy + h - rf, rf + dx:rf + dx + w - 2 rf] (rf = radius - 1)."""
    torch.manual_seed(2)
    radius, h, w = 5, 7, 11
    f = torch.randn(2, 8, h, w)
    rf = radius - 1
    full = np.arange(h * w).reshape(h, w)
    src = full[:-rf, rf:-rf].ravel()
    flat = f.flatten(2)
    expected = torch.stack([
        torch.exp(-(flat[:, :, src] - flat[:, :, full[dy:dy + h - rf, rf + dx:rf + dx + w - 2 * rf].ravel()])
                  .abs().mean(1))
        for dy, dx in half_plane_offsets(radius)], 1)
    ours = to_label_layout(pair_affinity(f, radius), radius)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="no pixel with all radius-5 partners"):
        to_label_layout(torch.zeros(1, 34, 4, 8), RADIUS)


def test_affinity_labels_on_a_hand_made_map() -> None:
    label = np.array([[0, 1, 1, 255],
                      [0, 0, 2, 1],
                      [255, 0, 2, 2]], np.uint8)
    # radius 2: offsets (0,1), (1,-1), (1,0), (1,1); sources rows 0..1 x cols 1..2 = labels 1, 1, 0, 2
    bg, fg, neg = affinity_labels_in_radius(label, radius=2)
    assert bg.shape == fg.shape == neg.shape == (4, 4) and bg.dtype == torch.float32
    np.testing.assert_array_equal(bg.numpy(), [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(fg.numpy(), [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 1]])
    np.testing.assert_array_equal(neg.numpy(), [[0, 0, 1, 1], [1, 1, 0, 1], [1, 1, 0, 0], [1, 0, 1, 0]])
    batched = affinity_labels_in_radius(torch.from_numpy(np.stack([label, label])), radius=2)
    assert all(torch.equal(b[1], s) for b, s in zip(batched, (bg, fg, neg)))
    unknown = np.full((3, 4), 255, np.uint8)
    assert all(t.sum() == 0 for t in affinity_labels_in_radius(unknown, radius=2))


def test_affinity_loss_by_hand() -> None:
    aff = torch.tensor([[0.5, 0.25], [0.9, 0.3]], requires_grad=True)
    bg = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    fg = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    neg = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    out = affinity_loss(aff, bg, fg, neg)
    e = 1e-5
    bg_loss = -math.log(0.5 + e) / (1 + e)
    fg_loss = -(math.log(0.25 + e) + math.log(0.3 + e)) / (2 + e)
    neg_loss = -math.log(1 + e - 0.9) / (1 + e)
    assert out["loss"].item() == pytest.approx(bg_loss / 4 + fg_loss / 4 + neg_loss / 2, rel=1e-5)
    assert out["fg_count"].item() == pytest.approx(2 + e)
    out["loss"].backward()
    assert aff.grad[1, 1].item() == pytest.approx(-1 / (0.3 + e) / (2 + e) / 4, rel=1e-5)


def test_loss_trains_head_and_unfrozen_backbone() -> None:
    net = tiny_net(norm="batch", freeze_stem=True).train()
    label = torch.randint(0, 3, (2, 6, 12))
    label[:, 0, 0] = 255
    aff = to_label_layout(net.affinity(torch.randn(2, 3, 48, 96), RADIUS), RADIUS)
    out = affinity_loss(aff, *affinity_labels_in_radius(label, RADIUS))
    out["loss"].backward()
    assert net.f9.weight.grad.abs().sum() > 0 and net.backbone.b4.conv_branch2a.weight.grad.abs().sum() > 0
    assert net.backbone.conv1a.weight.grad is None and net.backbone.b2_2.conv_branch2a.weight.grad is None


def test_param_groups() -> None:
    net = tiny_net()
    opt = build_sgd(net.param_groups(), lr=0.01, momentum=5e-4, weight_decay=5e-4)
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [
        ("backbone_weight", 0.01), ("new_weight", 0.1)]
    names = {id(p): n for n, p in net.named_parameters()}
    assert sorted(names[id(p)] for p in opt.param_groups[1]["params"]) == [
        "f8_3.weight", "f8_4.weight", "f8_5.weight", "f9.weight"]
    assert len(opt.param_groups[0]["params"]) == 43 - 8


def test_load_reference_layout(tmp_path: Path) -> None:
    src, dst = tiny_net(), tiny_net()
    with torch.no_grad():
        for p in src.parameters():
            p.uniform_(-0.1, 0.1)
    torch.save({k.removeprefix("backbone."): v for k, v in src.state_dict().items()}, tmp_path / "aff.pth")
    dst.load_weights(tmp_path / "aff.pth")
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(x), src.eval()(x), rtol=0, atol=0)
