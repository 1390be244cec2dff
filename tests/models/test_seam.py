"""SEAM network (shapes, PCM, gradient isolation, param groups, CONTA hooks, loading) and its loss terms
against hand computations and an independent numpy composition of one training step."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from src.models.resnet38d import ResNet38d, resnet38d
from src.models.seam import SEAM, pcm_seed
from src.ops.losses import (
    classification_loss,
    ecr_loss,
    equivariant_loss,
    max_norm,
    max_onehot,
    min_pool_loss,
    rescale,
    seam_step_losses,
    with_background,
)
from src.ops.optim import build_sgd


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions gain nothing from threads, and on a shared CPU the thread hand-offs dominate."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


E = 1e-5
# The reference's hyper-parameters (specs/seam.md, train_SEAM.py; conf/classification/seam.yaml ``module``):
# the siamese branch at scale 0.3, L_ECR over the top 20 % errors, the min-pool term over h*w//4 pixels, and
# every term of the total counted once.
SCALE, ECR_TOPK, MIN_POOL_FRACTION = 0.3, 0.2, 0.25
LOSS_WEIGHTS = {"min_pool": 1.0, "er": 1.0, "ecr": 1.0}
REFERENCE = {"scale": SCALE, "topk": ECR_TOPK, "min_pool_fraction": MIN_POOL_FRACTION, "weights": LOSS_WEIGHTS}


def tiny_seam(**kwargs) -> SEAM:
    torch.manual_seed(0)
    backbone_kw = {k: kwargs.pop(k) for k in ("norm",) if k in kwargs}
    return SEAM(resnet38d("tiny", **backbone_kw), num_classes=20, **kwargs)


# ------------------------------------------------------------------------------------------ network


def test_shapes_tiny_and_full() -> None:
    net = tiny_seam().eval()
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        cam, cam_rv = net(x)
        small, small_rv = net.cams(x)
    assert cam.shape == cam_rv.shape == (2, 21, 32, 40)
    assert small.shape == small_rv.shape == (2, 21, 4, 5)
    assert net.f9.in_channels == 195 and net.f9.out_channels == 192 and net.classifier.bias is None
    torch.testing.assert_close(cam, F.interpolate(small, (32, 40), mode="bilinear", align_corners=True))

    with torch.device("meta"):  # full width: shapes only, nothing allocated
        full = SEAM(ResNet38d()).eval()
        cam, cam_rv = full(torch.randn(1, 3, 24, 24))
    assert full.classifier.in_channels == 4096
    assert full.f8_3.in_channels == 512 and full.f8_4.in_channels == 1024
    assert cam.shape == cam_rv.shape == (1, 21, 24, 24)


def test_pcm_seed() -> None:
    cam = torch.tensor([[[[2.0, -1.0]], [[4.0, 1.0]], [[1.0, 3.0]]]])  # (1, 3, 1, 2): bg, fg1, fg2
    seed = pcm_seed(cam)
    fg1 = torch.tensor([4 - E, 1 - E]) / (4 + E)
    fg2 = torch.tensor([1 - E, 3 - E]) / (3 + E)
    expected_bg = 1 - torch.maximum(fg1, fg2)
    torch.testing.assert_close(seed[0, 0, 0], expected_bg)
    torch.testing.assert_close(seed[0, 1, 0], torch.stack([fg1[0], torch.tensor(0.0)]))
    torch.testing.assert_close(seed[0, 2, 0], torch.stack([torch.tensor(0.0), fg2[1]]))
    assert not pcm_seed(cam.requires_grad_(True)).requires_grad


def test_pcm_equals_direct_pairwise_formula() -> None:
    """cam_rv[:, j] = sum_i cam[:, i] a_ij / (sum_i a_ij + 1e-5), a_ij = ReLU(cos(f9 f_i, f9 f_j)), the cosine
    with 1e-5 added to the norms."""
    net = tiny_seam()
    torch.manual_seed(1)
    cam, f = torch.rand(1, 21, 3, 4), torch.randn(1, 195, 3, 4)
    with torch.no_grad():
        ours = net.pcm(cam, f)[0].reshape(21, -1).double().numpy()
        g = net.f9(f)[0].reshape(192, -1).double().numpy()
    g = g / (np.linalg.norm(g, axis=0, keepdims=True) + E)
    c = cam[0].reshape(21, -1).double().numpy()
    expected = np.zeros_like(c)
    for j in range(12):
        a = np.array([max(0.0, float(g[:, i] @ g[:, j])) for i in range(12)])
        expected[:, j] = (c * a).sum(1) / (a.sum() + E)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)


def test_pcm_properties() -> None:
    net = tiny_seam()
    torch.manual_seed(2)
    f = torch.randn(2, 195, 6, 5)
    # columns of the affinity sum to ~1: a constant CAM stays constant (any CAM size, resized inside)
    const = torch.full((2, 21, 3, 2), 0.7)
    with torch.no_grad():
        out = net.pcm(const, f)
    assert out.shape == (2, 21, 6, 5)
    torch.testing.assert_close(out, torch.full_like(out, 0.7), rtol=1e-4, atol=1e-5)
    # the refined CAM is a convex-like mix: within the CAM's range per class
    cam = torch.rand(2, 21, 6, 5)
    with torch.no_grad():
        out = net.pcm(cam, f)
    lo, hi = cam.flatten(2).min(-1)[0][..., None, None], cam.flatten(2).max(-1)[0][..., None, None]
    assert torch.all(out <= hi + 1e-6) and torch.all(out >= lo * (1 - 1e-4) - 1e-6)


def test_pcm_inputs_are_detached() -> None:
    """cam_rv trains only f8_3, f8_4, f9; the raw CAM trains the classifier and the backbone."""
    net = tiny_seam(norm="batch", freeze_stem=False).train()
    cam, cam_rv = net(torch.randn(2, 3, 32, 32))
    cam_rv.sum().backward()
    assert all(p.grad is None for p in net.backbone.parameters()) and net.classifier.weight.grad is None
    for m in (net.f8_3, net.f8_4, net.f9):
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0
    net.zero_grad(set_to_none=True)
    cam.sum().backward()
    assert net.f9.weight.grad is None and net.f8_3.weight.grad is None
    assert net.classifier.weight.grad is not None and net.backbone.b4.conv_branch2a.weight.grad is not None


def test_freeze_stem_and_param_groups() -> None:
    net = tiny_seam()  # paper setting: frozen BN, conv1a/b2/b2_1/b2_2 frozen
    groups = net.param_groups()
    assert [(g.name, g.lr_mult, g.weight_decay) for g in groups] == [
        ("backbone_weight", 1.0, None), ("backbone_bias", 2.0, 0.0), ("new_weight", 10.0, None),
        ("new_bias", 20.0, 0.0)]
    opt = build_sgd(groups, lr=0.01, momentum=5e-4, weight_decay=5e-4)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        ("backbone_weight", 0.01, 5e-4), ("new_weight", 0.1, 5e-4)]
    names = {id(p): n for n, p in net.named_parameters()}
    trained = sorted(names[id(p)] for p in opt.param_groups[0]["params"])
    frozen_prefixes = ("backbone.conv1a", "backbone.b2.", "backbone.b2_1.", "backbone.b2_2.")
    expected = sorted(n for n, p in net.named_parameters() if n.startswith("backbone.") and "conv" in n
                      and not n.startswith(frozen_prefixes))
    assert trained == expected and len(trained) == 43 - 8  # 43 convs, 8 in conv1a + b2*
    assert sorted(names[id(p)] for p in opt.param_groups[1]["params"]) == [
        "classifier.weight", "f8_3.weight", "f8_4.weight", "f9.weight"]

    quick = tiny_seam(norm="batch", freeze_stem=False)
    opt = build_sgd(quick.param_groups(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["backbone_bias"]["lr"] == 0.02 and by_name["backbone_bias"]["weight_decay"] == 0.0
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in quick.modules())
    assert len(by_name["backbone_bias"]["params"]) == n_bn
    assert len(by_name["backbone_weight"]["params"]) == 43 + n_bn


def test_context_injection_keeps_cams() -> None:
    x = torch.randn(1, 3, 32, 32)
    for inject in ("feature", "input"):
        net = tiny_seam().eval()
        with torch.no_grad():
            ref = net(x)
            net.enable_context(inject)
            out = net(x, context=torch.rand(1, 1, 4, 4))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert net.backbone.conv1a.in_channels == 4
    with pytest.raises(ValueError, match="pass `context`"):
        net(x)
    net = tiny_seam()
    net.enable_context("feature")
    assert net.classifier.in_channels == 257
    new_weights = next(g for g in net.param_groups() if g.name == "new_weight").params
    assert any(p is net.classifier.weight for p in new_weights)


def test_load_weights_reference_and_own_layout(tmp_path: Path) -> None:
    src, dst = tiny_seam(), tiny_seam()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in src.parameters():
            p.uniform_(-0.1, 0.1)
    reference = {}
    for k, v in src.state_dict().items():
        k = k.removeprefix("backbone.")
        reference["fc8.weight" if k == "classifier.weight" else k] = v
    torch.save(reference, tmp_path / "resnet38_SEAM.pth")
    dst.load_weights(tmp_path / "resnet38_SEAM.pth")
    src.eval(), dst.eval()
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "ours.ckpt")
    dst.load_weights(tmp_path / "ours.ckpt")
    reference.pop("f9.weight")
    torch.save(reference, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing keys: f9.weight"):
        dst.load_weights(tmp_path / "bad.pth")


# ------------------------------------------------------------------------------------------- losses


def test_max_norm_by_hand() -> None:
    x = torch.tensor([[[-1.0, 0.0], [2.0, 4.0]], [[3.0, 3.0], [3.0, 3.0]], [[1.0, 2.0], [3.0, 5.0]]])
    out = max_norm(x)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.0], [2 - E, 4 - E]]) / (4 + E))
    assert torch.all(out[1] == 0)
    torch.testing.assert_close(out[2], torch.tensor([[0.0, 1 - E], [2 - E, 4 - E]]) / (4 + E))
    torch.testing.assert_close(max_norm(x[None])[0], out)
    with pytest.raises(ValueError, match="3-D or 4-D"):
        max_norm(torch.zeros(2, 2))


def test_classification_loss_by_hand() -> None:
    cam = torch.zeros(1, 3, 2, 2)
    cam[0, 0] = 100.0  # background: ignored
    cam[0, 1] = 2.0
    cam[0, 2, 1, 1] = -4.0  # mean -1
    loss = classification_loss(cam, torch.tensor([[1.0, 0.0]]))
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_equivariant_loss_by_hand() -> None:
    a = torch.tensor([[[[5.0, 5.0]], [[0.2, 0.4]], [[0.0, 1.0]]]])
    b = torch.tensor([[[[0.0, 0.0]], [[0.1, 0.4]], [[0.5, 0.0]]]])
    assert equivariant_loss(a, b).item() == pytest.approx((0.1 + 0.0 + 0.5 + 1.0) / 4, rel=1e-6)


def test_ecr_loss_by_hand() -> None:
    other = torch.tensor([[[[7.0, 7.0], [7.0, 7.0]],
                           [[0.9, 0.2], [0.5, 0.0]],
                           [[0.1, 0.6], [0.5, 0.0]]]])
    target = max_onehot(with_background(other))
    expected_target = torch.tensor([[[[0.1, 0.4], [0.5, 1.0]],
                                     [[0.9, 0.0], [0.5, 0.0]],
                                     [[0.0, 0.6], [0.5, 0.0]]]])
    torch.testing.assert_close(target, expected_target)
    # k = int(3 * 2 * 2 * 0.2) = 2: the two largest errors against a zero map are 1.0 and 0.9
    assert ecr_loss(torch.zeros(1, 3, 2, 2), other, ECR_TOPK).item() == pytest.approx(0.95, rel=1e-6)
    rv = expected_target.clone()
    rv[0, 2, 0, 1] = 0.0  # one error of 0.6, the rest 0: top-2 mean 0.3
    assert ecr_loss(rv, other, ECR_TOPK).item() == pytest.approx(0.3, rel=1e-6)


def test_min_pool_loss_by_hand() -> None:
    a = torch.tensor([[0.3, -1.0, 0.8, 0.1], [0.0, 0.7, 0.2, 0.6]])
    b = torch.tensor([[0.2, -2.0, 0.9, 0.4], [0.05, 0.1, 0.1, 0.1]])
    x = torch.stack([a, b])[None]  # (1, 2, 2, 4): per-pixel max [.3, -1, .9, .4, .05, .7, .2, .6]
    # k = 8 // 4 = 2 smallest maxima: -1 -> ReLU 0, and 0.05
    assert min_pool_loss(x, MIN_POOL_FRACTION).item() == pytest.approx(0.05 / 2, rel=1e-6)
    batch = torch.cat([x, torch.full_like(x, 0.5)])
    assert min_pool_loss(batch, MIN_POOL_FRACTION).item() == pytest.approx((0.05 + 1.0) / 4, rel=1e-6)


def bilinear_ramp(h: int, w: int, coeffs: torch.Tensor) -> torch.Tensor:
    """Maps a + b y + c x + d x y on the unit square sampled on an h x w grid: bilinear resizing with
    align_corners=True reproduces them exactly; with non-negative coefficients min/max sit at the corners."""
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None, :]
    a, b, c, d = (coeffs[..., i, None, None] for i in range(4))
    return a + b * y + c * x + d * x * y


def test_er_vanishes_for_an_equivariant_map() -> None:
    torch.manual_seed(3)
    coeffs = torch.rand(2, 21, 4)
    cam1, cam2 = bilinear_ramp(40, 50, coeffs), bilinear_ramp(12, 15, coeffs)
    assert rescale(cam1, SCALE).shape == cam2.shape
    labels = torch.ones(2, 20)
    rv1, rv2 = torch.rand(2, 21, 40, 50), torch.rand(2, 21, 12, 15)
    terms = seam_step_losses(cam1, rv1, cam2, rv2, labels, **REFERENCE)
    assert terms["er"].item() < 1e-6
    flipped = seam_step_losses(cam1, rv1, cam2.flip(-1), rv2, labels, **REFERENCE)
    assert flipped["er"].item() > 0.05
    with pytest.raises(ValueError, match="rescale\\(img, 0.3\\)"):
        seam_step_losses(cam1, rv1, cam1, rv1, labels, **REFERENCE)


def test_step_losses_route_gradients_as_reference() -> None:
    """L_cls and L_ER reach the raw CAMs only; L_ECR and the min-pool term reach the PCM CAMs only."""
    torch.manual_seed(4)
    cams = [torch.randn(2, 5, 20, 20, requires_grad=True), torch.randn(2, 5, 20, 20, requires_grad=True),
            torch.randn(2, 5, 6, 6, requires_grad=True), torch.randn(2, 5, 6, 6, requires_grad=True)]
    terms = seam_step_losses(*[c.abs() for c in cams], torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]]), **REFERENCE)
    for key, reaches in (("cls", (0, 2)), ("er", (0, 2)), ("ecr", (1, 3)), ("min_pool", (1, 3))):
        grads = torch.autograd.grad(terms[key], cams, allow_unused=True, retain_graph=True)
        reached = [g is not None and bool(g.abs().sum() > 0) for g in grads]
        assert reached == [i in reaches for i in range(4)], key
    total = terms["cls"] + terms["min_pool"] + terms["er"] + terms["ecr"]
    torch.testing.assert_close(terms["loss"], total)
    torch.testing.assert_close(terms["ecr"], terms["ecr1"] + terms["ecr2"])


def test_step_loss_weights_scale_the_terms() -> None:
    """loss_weights (an ablation option) scale min_pool / er / ecr in the total; the terms stay as they are."""
    torch.manual_seed(5)
    cams = [torch.randn(2, 5, 20, 20).abs(), torch.randn(2, 5, 20, 20).abs(),
            torch.randn(2, 5, 6, 6).abs(), torch.randn(2, 5, 6, 6).abs()]
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1]])
    ref = seam_step_losses(*cams, labels, **REFERENCE)
    ablated = seam_step_losses(*cams, labels, **{**REFERENCE, "weights": {"min_pool": 1.0, "er": 0.0, "ecr": 0.5}})
    torch.testing.assert_close(ablated["er"], ref["er"])
    torch.testing.assert_close(ablated["loss"], ref["cls"] + ref["min_pool"] + 0.5 * ref["ecr"])
    assert float(ref["er"]) > 0  # so dropping it changes the total
    with pytest.raises(ValueError, match=r"SEAM loss weights are \['ecr', 'er', 'min_pool'\], got .*'erc'"):
        seam_step_losses(*cams, labels, **{**REFERENCE, "weights": {**LOSS_WEIGHTS, "erc": 1.0}})
    with pytest.raises(ValueError, match=r"SEAM loss weights are \['ecr', 'er', 'min_pool'\], got \['ecr', 'er'\]"):
        seam_step_losses(*cams, labels, **{**REFERENCE, "weights": {"er": 1.0, "ecr": 1.0}})  # one missing


# --------------------------------------------------------- one step against an independent numpy version


def np_max_norm(p: np.ndarray) -> np.ndarray:
    p = np.maximum(p, 0)
    lo, hi = p.min((2, 3), keepdims=True), p.max((2, 3), keepdims=True)
    return np.maximum(p - lo - E, 0) / (hi - lo + E)


def np_resize(p: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return F.interpolate(torch.from_numpy(p), size, mode="bilinear", align_corners=True).numpy()


def np_step(cam1, rv1, cam2, rv2, labels) -> dict[str, float]:
    n, c = cam1.shape[:2]
    mask = np.concatenate([np.ones((n, 1)), labels], 1)[:, :, None, None].astype(np.float32)

    def cls(cam):
        x = cam[:, 1:].mean((2, 3))
        return np.mean(-(labels * np.log(1 / (1 + np.exp(-x))) + (1 - labels) * np.log(1 / (1 + np.exp(x)))))

    def minpool(rv):
        m = (rv * mask)[:, 1:].max(1).reshape(n, -1)
        k = m.shape[1] // 4
        return np.maximum(np.sort(m, 1)[:, :k], 0).sum() / (k * n)

    hs, ws = cam2.shape[-2:]
    a = np_resize(np_max_norm(cam1), (hs, ws)) * mask
    a_rv = np_resize(np_max_norm(rv1), (hs, ws)) * mask
    b, b_rv = np_max_norm(cam2) * mask, np_max_norm(rv2) * mask
    er = np.abs(a[:, 1:] - b[:, 1:]).mean()

    def ecr(rv, other):
        t = other.copy()
        t[:, 0] = 1 - t[:, 1:].max(1)
        fg = t[:, 1:]
        fg[fg != fg.max(1, keepdims=True)] = 0
        err = np.abs(t - rv).reshape(n, -1)
        k = int(c * hs * ws * 0.2)
        return np.sort(err, 1)[:, ::-1][:, :k].mean()

    out = {"cls": (cls(cam1) + cls(cam2)) / 2, "min_pool": (minpool(rv1) + minpool(rv2)) / 2, "er": er,
           "ecr": ecr(a_rv, b) + ecr(b_rv, a)}
    out["loss"] = sum(out.values())
    return out


def test_step_losses_match_numpy_composition() -> None:
    rng = np.random.default_rng(0)
    n, c, h, w = 3, 6, 30, 40
    hs, ws = int(h * 0.3), int(w * 0.3)
    cam1 = rng.normal(size=(n, c, h, w)).astype(np.float32)
    rv1 = rng.uniform(0, 1, (n, c, h, w)).astype(np.float32)
    cam2 = rng.normal(size=(n, c, hs, ws)).astype(np.float32)
    rv2 = rng.uniform(0, 1, (n, c, hs, ws)).astype(np.float32)
    labels = np.array([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0], [1, 1, 1, 0, 1]], np.float32)
    ours = seam_step_losses(*(torch.from_numpy(a) for a in (cam1, rv1, cam2, rv2, labels)), **REFERENCE)
    expected = np_step(cam1, rv1, cam2, rv2, labels)
    for key, value in expected.items():
        assert ours[key].item() == pytest.approx(value, rel=1e-4, abs=1e-6), key
