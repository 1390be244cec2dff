"""SEAM and SEAM + IRNet stages: affinity labels from CAMs (hand-made maps), their stride-8 pooling against the
reference's pooled-score rule, SEAM seed inference (shapes, min-max normalisation, flip and scale merge), the
AffinityNet random walk on a tiny input, the training steps (SEAM siamese step with CONTA's prior, AffinityNet),
and the baseline configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.utils import instantiate

from src.models.affinity import AffinityNet
from src.models.conta import ContextPrior
from src.models.resnet38d import resnet38d
from src.models.seam import SEAM
from src.ops.cams import minmax_normalise, multiscale_cams
from src.ops.labels import affinity_label, alpha_scores, stride_labels
from src.ops.random_walk import pooled_scores, walk_labels
from src.pipeline.plan import plan
from src.pipeline.validate import finalize
from src.stages.affinity import AffinityModule
from src.stages.classification import SEAMClassificationModule
from src.stages.pseudo_masks import AffinityRandomWalk
from src.stages.seeds import CAMInference
from src.utils.labels import IGNORE

SEAM_LOSS = {"scale": 0.5, "ecr_topk": 0.2, "min_pool_fraction": 0.25,
             "loss_weights": {"min_pool": 1.0, "er": 1.0, "ecr": 1.0}}
OPTIM = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}


# ------------------------------------------------------------------------------------- affinity labels


def test_alpha_scores_by_hand() -> None:
    fg = np.array([[[0.5, 0.0]], [[0.25, 1.0]]], np.float32)  # 2 classes, a 1 x 2 image
    scores = alpha_scores(fg, 2)
    np.testing.assert_allclose(scores[0], [[0.25, 0.0]])  # (1 - 0.5)^2, (1 - 1)^2
    np.testing.assert_allclose(scores[1:], fg)
    empty = alpha_scores(np.zeros((0, 2, 3), np.float32), 4)
    assert empty.shape == (1, 2, 3) and np.all(empty == 1)


def test_affinity_label_hand_made_without_crf() -> None:
    # class 2 scores of 0.9 / 0.2 / 0.05 in three columns, class 5 of 0.6 in the last one
    fg = np.array([[[0.9, 0.2, 0.05, 0.0]], [[0.0, 0.0, 0.0, 0.6]]], np.float32)
    # alpha 4: bg = 1e-4 / 0.41 / 0.81 / 0.026 -> class 2, bg, bg, class 5  (confident foreground)
    # alpha 24: bg = 1e-24 / 0.0047 / 0.29 / 3e-10 -> class, class, bg, class  (confident background)
    out = affinity_label(fg, np.array([2, 5]), None, 4, 24, None)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[2, IGNORE, 0, 5]])


def test_affinity_label_high_alpha_background_wins() -> None:
    # with the CRF a pixel can be a class at the low alpha and background at the high one; the background
    # wins as in the reference (VOC12AffDataset). Without a CRF that takes alpha_low > alpha_high:
    fg = np.array([[[0.3]]], np.float32)
    assert affinity_label(fg, np.array([1]), None, 24, 24, None)[0, 0] == 1  # bg 0.7^24 = 2e-4 < 0.3
    assert affinity_label(fg, np.array([1]), None, 24, 1, None)[0, 0] == 0  # high: bg 0.7 > 0.3 wins


def test_affinity_label_with_crf_and_no_class() -> None:
    crf = {"iterations": 5, "gaussian": {"sxy": 3, "compat": 3}, "bilateral": {"sxy": 80, "srgb": 13, "compat": 10}}
    image = np.zeros((12, 16, 3), np.uint8)
    image[:, 8:] = 200
    fg = np.zeros((1, 12, 16), np.float32)
    fg[0, :, 8:] = 0.95  # a confident object on the bright half
    out = affinity_label(fg, np.array([3]), image, 4, 24, crf)
    assert out.shape == (12, 16) and set(np.unique(out)) <= {0, 3, IGNORE}
    assert np.all(out[:, 10:] == 3) and np.all(out[:, :6] == 0)
    none = affinity_label(np.zeros((0, 12, 16), np.float32), np.zeros(0, np.int64), image, 4, 24, crf)
    assert np.all(none == 0)


# ------------------------------------------------------------------------ stride-8 labels (training step)


def test_stride_labels_hand_made() -> None:
    mask = torch.full((1, 16, 24), IGNORE, dtype=torch.long)
    mask[0, :8, :8] = 2                       # cell (0, 0): pure class 2
    mask[0, :8, 8:16] = 0                     # cell (0, 1): pure background
    mask[0, :8, 16:24] = 1
    mask[0, :3, 16:24] = IGNORE               # cell (0, 2): class 1 40/64 > bg + unk 24/64 -> 1
    mask[0, 8:, :8] = 0
    mask[0, 8:12, :8] = IGNORE                # cell (1, 0): bg 32/64 >= 0 + 32/64 (tie -> background)
    mask[0, 8:, 8:16] = 0
    mask[0, 8:13, 8:16] = 1                   # cell (1, 1): class 40 > 24 -> 1 (bg 24 < 40)
    # cell (1, 2) stays all unknown -> unknown
    out = stride_labels(mask, 8, num_classes=3)
    assert out.tolist() == [[[2, 0, 1], [0, 1, IGNORE]]]


def test_stride_labels_pads_as_unknown() -> None:
    mask = torch.ones(1, 10, 10, dtype=torch.long)
    out = stride_labels(mask, 8, num_classes=1)
    # the bottom/right cells hold 2 x 8 / 2 x 2 image pixels and padding: unknown wins the majority
    assert out.shape == (1, 2, 2) and out.tolist() == [[[1, IGNORE], [IGNORE, IGNORE]]]


def test_stride_labels_equal_reference_pooled_argmax_for_one_class() -> None:
    """The reference pools one-hot (hard) CRF scores at alpha low / high and takes argmax (ties -> background);
    from the combined label map our rule is exact when a cell holds one class."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        la = (torch.rand(2, 16, 16, generator=gen) < torch.rand(1, generator=gen)).long()  # 1 = class at low alpha
        ha = la | (torch.rand(2, 16, 16, generator=gen) < 0.5).long()                        # class at high alpha
        combined = torch.where(la == 1, 1, IGNORE)
        combined = torch.where(ha == 0, 0, combined)

        def pooled_argmax(hard: torch.Tensor) -> torch.Tensor:
            frac = F.avg_pool2d(F.one_hot(hard, 2).permute(0, 3, 1, 2).float(), 8)
            return (frac[:, 1] > frac[:, 0]).long()  # argmax, ties -> channel 0

        ref = torch.where(pooled_argmax(la) == 1, 1, IGNORE)
        ref = torch.where(pooled_argmax(ha) == 0, 0, ref)
        assert torch.equal(stride_labels(combined, 8, num_classes=1), ref)


# ---------------------------------------------------------------------------------------- SEAM seeds


class FakeSEAM(nn.Module):
    """cams(): raw CAM = mean colour per 8 x 8 cell (3 channels: bg + 2 classes); PCM CAM = 2 x that, ReLU'd."""

    output_stride = 8
    num_classes = 2

    def cams(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        cam = F.avg_pool2d(x, 8, ceil_mode=True)
        return cam, 2 * F.relu(cam)

    seed_cams = SEAM.seed_cams  # SEAM's seed rule (PCM CAM without the background channel), under test


def test_minmax_normalise_by_hand() -> None:
    maps = torch.tensor([[[1.0, 3.0], [5.0, -1.0]], [[7.0, 7.0], [7.0, 7.0]], [[2.0, 4.0], [6.0, 10.0]]])
    out = minmax_normalise(maps, torch.tensor([0, 2]))
    e = 1e-5
    # class 0: clipped at 0 -> min 0, max 5; class 2: min 2, max 10
    np.testing.assert_allclose(out[0].numpy(), [[(1 - e) / (5 + e), (3 - e) / (5 + e)], [(5 - e) / (5 + e), 0.0]],
                               rtol=1e-6)
    np.testing.assert_allclose(out[1].numpy(), [[0.0, (2 - e) / (8 + e)], [(4 - e) / (8 + e), (8 - e) / (8 + e)]],
                               rtol=1e-6)
    assert minmax_normalise(maps, torch.zeros(0, dtype=torch.long)).shape == (0, 2, 2)


def test_seam_seed_inference_shapes_and_normalisation() -> None:
    torch.manual_seed(0)
    net = SEAM(resnet38d("tiny", norm="batch"), num_classes=4, freeze_stem=False).eval()
    module = CAMInference(net, [0.5, 1.0], True, 4, dtype="float32", normalise="minmax")
    image = torch.randn(3, 37, 50)
    batch = [{"id": "a", "image": image, "label": torch.tensor([0.0, 1.0, 0.0, 1.0])},
             {"id": "b", "image": torch.randn(3, 37, 50), "label": torch.tensor([1.0, 0.0, 0.0, 0.0])}]
    out = dict(module.predict_step(batch, 0))
    assert out["a"]["keys"].tolist() == [2, 4] and out["b"]["keys"].tolist() == [1]
    assert out["a"]["cam"].shape == (2, 10, 13) and out["a"]["high_res"].shape == (2, 37, 50)
    for arrays in out.values():
        for key in ("cam", "high_res"):
            flat = arrays[key].reshape(len(arrays["keys"]), -1)
            assert flat.min() == 0.0 and np.all(flat.min(1) == 0)
            np.testing.assert_allclose(flat.max(1), 1.0, atol=1e-3)


def test_seam_seed_flip_and_scale_merge() -> None:
    """The stored maps are min-max(sum over scales of f(x) + mirror(f(mirror(x)))) of the PCM foreground maps."""
    net = FakeSEAM()
    scales = [1.0, 0.5]
    module = CAMInference(net, scales, True, 4, dtype="float32", normalise="minmax")
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(3, 32, 40, generator=gen)
    image[1, :, :20] += 2  # class 1 (channel 1) on the left: the mirror differs
    out = dict(module.predict_step([{"id": "x", "image": image, "label": torch.tensor([1.0, 1.0])}], 0))["x"]

    def raw(x: torch.Tensor, s: float) -> torch.Tensor:
        return multiscale_cams(module.cam_fn, x[None], [s], False, 4, 8)[1][0]

    total = sum(raw(image, s) + raw(image.flip(-1), s).flip(-1) for s in scales)
    expected = minmax_normalise(total, torch.tensor([0, 1]))
    np.testing.assert_allclose(out["high_res"], expected.numpy(), atol=1e-5)  # summation order
    # the PCM map (2 x ReLU) of channels 1.. is used, not the raw CAM nor the background channel
    direct = 2 * F.relu(F.avg_pool2d(image[None], 8))[0, 1:]
    assert torch.allclose(module.cam_fn(image[None], None)[0], direct)


# ------------------------------------------------------------------------------------ AffinityNet walk


class HalvesNet(nn.Module):
    """Features: 10 x the mean of the first image channel per 8 x 8 cell (a wall between the image halves)."""

    output_stride = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * F.avg_pool2d(x[:, :1], 8).repeat(1, 4, 1, 1)


def test_pooled_scores_by_hand() -> None:
    fg = np.zeros((1, 12, 16), np.float32)
    fg[0, :8, :8] = 0.5
    seeds = [{"keys": np.array([1]), "high_res": fg}, {"keys": np.zeros(0, np.int64), "high_res": fg[:0]}]
    out = pooled_scores(seeds, 2.0, (16, 16), 8)
    assert out.shape == (2, 2, 2, 2)
    # bg (1 - 0.5)^2 = 0.25 in the top-left cell, 1 elsewhere inside the image; zero padding rows 12..15
    np.testing.assert_allclose(out[0, 0].numpy(), [[0.25, 1.0], [0.5, 0.5]])
    np.testing.assert_allclose(out[0, 1].numpy(), [[0.5, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(out[1, 0].numpy(), [[1.0, 1.0], [0.5, 0.5]])
    assert torch.all(out[1, 1] == 0)


def test_affinity_random_walk_stays_within_the_wall(tmp_path) -> None:
    image = torch.zeros(1, 3, 36, 64)
    image[:, :, :, 32:] = 1.0  # left half / right half: affinity exp(-10) across the wall
    fg = np.zeros((1, 36, 64), np.float32)
    fg[0, :, :28] = 1.0  # a seed on 7/8 of the left half only; the rest of the image is background
    seeds = [{"keys": np.array([4]), "high_res": fg}]
    module = AffinityRandomWalk(HalvesNet(), tmp_path, radius=3, beta=8, exp_times=6, alpha=6)
    walked = module.walk(image, seeds)
    assert walked.shape == (1, 2, 5, 8)
    # 64 steps mix the left half to a (degree-weighted) average, ~7/8 class and ~1/8 background (the column of
    # background cells at x = 28..31), the same in every left cell; nothing crosses the wall to the right half
    left = walked[0, :, :4, :4]  # rows 0..3: the bottom row is half zero padding (less mass)
    assert torch.all(left[1] > 0.8) and torch.all(left[0] < 0.15)
    assert float(left[1].max() - left[1].min()) < 0.05
    assert torch.all(walked[0, 1, :, 4:] < 1e-6) and torch.all(walked[0, 0, :, 4:] > 0.49)  # bottom: half padding
    labels = walk_labels(walked[0], seeds[0]["keys"], (36, 64), 8)
    assert labels.shape == (36, 64) and labels.dtype == np.uint8
    assert np.all(labels[:, :28] == 4) and np.all(labels[:, 36:] == 0)


def test_affinity_random_walk_predict_step_on_tiny_net(tmp_path) -> None:
    from src.utils.io import save_npz_atomic

    torch.manual_seed(0)
    net = AffinityNet(resnet38d("tiny", norm="batch"), freeze_stem=False).eval()
    fg = np.random.default_rng(0).random((2, 20, 30)).astype(np.float16)
    save_npz_atomic(tmp_path / "im.npz", keys=np.array([1, 3], np.int16), cam=fg[:, ::4, ::4], high_res=fg)
    module = AffinityRandomWalk(net, tmp_path, radius=3, beta=8, exp_times=2, alpha=6)
    out = module.predict_step([{"id": "im", "image": torch.randn(3, 20, 30)}], 0)
    assert out[0][0] == "im" and out[0][1].shape == (20, 30) and set(np.unique(out[0][1])) <= {0, 1, 3}


# ------------------------------------------------------------------------------------- training steps


def test_seam_training_step_feeds_context_to_both_branches() -> None:
    torch.manual_seed(0)
    net = SEAM(resnet38d("tiny", norm="batch"), num_classes=3, freeze_stem=False)
    net.enable_context("feature")
    prior = ContextPrior(torch.rand(3, 4, 4), "foreground", "none")
    module = SEAMClassificationModule(net, OPTIM, max_steps=10, context=prior, **SEAM_LOSS)
    calls = []
    original = net.inject_feature

    def spy(f: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        calls.append((tuple(f.shape[-2:]), context is not None))
        return original(f, context)

    net.inject_feature = spy
    batch = {"image": torch.randn(2, 3, 48, 48), "label": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
             "context_mask": torch.randint(0, 4, (2, 4, 4))}
    loss = module.training_step(batch, 0)
    assert calls == [((6, 6), True), ((3, 3), True)]  # the crop and its 0.5 rescale, both with M
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    # M reaches the loss: the classifier's (zero-initialised) context channel gets a gradient
    assert net.classifier.weight.grad[:, -1].abs().sum() > 0
    logits = module(batch["image"], batch["context_mask"])
    assert logits.shape == (2, 3)


def test_affinity_training_step_pools_labels_and_trains() -> None:
    torch.manual_seed(0)
    net = AffinityNet(resnet38d("tiny", norm="batch"), freeze_stem=False)
    module = AffinityModule(net, radius=3, num_classes=2, optim=OPTIM, max_steps=10)
    mask = torch.zeros(2, 48, 48, dtype=torch.long)
    mask[:, 8:32, 8:32] = 1
    mask[:, 32:40] = IGNORE
    loss = module.training_step({"image": torch.randn(2, 3, 48, 48), "mask": mask}, 0)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert net.f9.weight.grad.abs().sum() > 0


# -------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("baseline", ["seam", "seam_irnet"])
def test_baseline_configs_compose(make_cfg, baseline: str) -> None:
    cfg = finalize(make_cfg(f"+baseline={baseline}", "+conta=on", "conta.rounds=1"))
    rounds = plan(cfg)
    names = [st.name for st in rounds[0]]
    refinement = (["affinity_labels", "affinity", "pseudo_masks"] if baseline == "seam"
                  else ["ir_labels", "irn", "pseudo_masks"])
    assert names == ["classification", "seeds", *refinement, "segmentation", "confounder_set"]
    # CONTA reaches SEAM's classifier and seeds in round 1 through the context input alone
    assert {st.name for st in rounds[1] if "context" in st.inputs} == {"classification", "seeds"}
    assert cfg.baseline.classification.module._target_ == "src.stages.classification.SEAMClassificationModule"
    # the loss weights of the config reach the training module (e.g. an ablation without L_ER)
    cfg.baseline.classification.module.loss_weights.er = 0.0
    stage = instantiate(cfg.baseline.classification, _recursive_=False)
    net = SEAM(resnet38d("tiny", norm="batch"), num_classes=cfg.data.num_classes, freeze_stem=False)
    module = stage.make_module(net, 10, None, {}, "val")
    assert isinstance(module, SEAMClassificationModule) and module.scale == cfg.profile.seam.scale
    assert module.loss_weights == {"min_pool": 1.0, "er": 0.0, "ecr": 1.0}
    if baseline == "seam_irnet":
        t = cfg.profile.seam.irn_thresholds
        assert cfg.baseline.refinement.ir_labels.conf_fg == t.conf_fg
        assert cfg.baseline.refinement.ir_labels.conf_bg == t.conf_bg
        assert cfg.baseline.refinement.pseudo_masks.bg_threshold == t.bg_threshold
        # seam_irnet's walk steps are its own (SEAM's seeds sit at IRN's grid), not IRNet's
        assert cfg.baseline.refinement.pseudo_masks.exp_times == cfg.profile.seam.irn_walk_exp_times == 0
        assert cfg.profile.irn.walk_exp_times == 2
        # and so are its IRN's epochs (on SEAM's seeds 12 left the masks below AffinityNet's)
        assert cfg.baseline.refinement.irn.epochs == cfg.profile.seam.irn_epochs == 48


def test_resnet38d_dropouts_option() -> None:
    rates = [m.p for m in resnet38d("tiny", dropouts=[0.0, 0.1]).modules() if isinstance(m, nn.Dropout2d)]
    assert rates == [0.0, 0.0, 0.1, 0.1]  # b6 (two), b7 (two)
    assert [m.p for m in resnet38d("tiny").modules() if isinstance(m, nn.Dropout2d)] == [0.3, 0.3, 0.5, 0.5]
    with pytest.raises(ValueError, match="one rate per bottleneck"):
        resnet38d("tiny", dropouts=[0.0])


def test_training_losses_are_fp32_and_finite_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    aff_module = AffinityModule(AffinityNet(resnet38d("tiny", norm="batch"), freeze_stem=False), radius=3,
                                num_classes=2, optim=OPTIM, max_steps=10)
    seam_module = SEAMClassificationModule(SEAM(resnet38d("tiny", norm="batch"), num_classes=2, freeze_stem=False),
                                           OPTIM, max_steps=10, **SEAM_LOSS)
    mask = torch.zeros(2, 48, 48, dtype=torch.long)
    mask[:, 8:32, 8:32] = 1
    image = torch.randn(2, 3, 48, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        aff_loss = aff_module.training_step({"image": image, "mask": mask}, 0)
        seam_loss = seam_module.training_step({"image": image, "label": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}, 0)
    for loss in (aff_loss, seam_loss):
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
