"""The six options that reproduce the IRNet / SEAM reference where our default differs (issue 17,
experiments/FIDELITY.md), each on a case computed by hand, and the paper profile choosing them."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import compose_config

from src.data.transforms import build_transform
from src.metrics.segmentation import CAMThresholdSweep
from src.ops.cams import multiscale_cams, pil_pyramid, torch_pyramid
from src.ops.labels import NO_VOTE, seed_labels, stride_labels
from src.ops.pairs import half_plane_offsets
from src.ops.random_walk import dense_affinity, label_region_mask
from src.stages.affinity import AffinityStage
from src.stages.pseudo_masks import AffinityRandomWalk
from src.stages.seeds import CAMInference
from src.utils.labels import IGNORE

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalised(pixels: np.ndarray | torch.Tensor, channel: int = 0) -> np.ndarray:
    return (np.asarray(pixels, np.float64) / 255.0 - MEAN[channel]) / STD[channel]


# ------------------------------------------------------------------------------ 1. the image pyramid

STEP = np.zeros((2, 8, 3), np.uint8)
STEP[:, 4:] = 200  # a vertical edge between columns 3 and 4
# x2 by bicubic, by hand: output j samples input position j / 2 - 0.25; Keys' kernel at distances
# (1.25, 0.25, 0.75, 1.75) has weights (-0.0703125, 0.8671875, 0.2265625, -0.0234375) for a = -0.5 (PIL)
# and (-0.10546875, 0.87890625, 0.26171875, -0.03515625) for a = -0.75 (torch). PIL rounds to uint8 and
# clips the undershoot at 0; torch keeps both.
PIL_ROW = [0, 0, 0, 0, 0, 0, 0, 41, 159, 214, 205, 200, 200, 200, 200, 200]  # 40.625, 159.375, 214.06, 204.69
TORCH_ROW = [0, 0, 0, 0, 0, -7.03125, -21.09375, 45.3125, 154.6875, 221.09375, 207.03125, 200, 200, 200, 200, 200]


def test_pil_pyramid_is_pil_bicubic_of_the_uint8_image_then_normalised() -> None:
    x = pil_pyramid(torch.from_numpy(STEP)[None], MEAN, STD)(2.0)
    assert x.shape == (1, 3, 4, 16) and x.dtype == torch.float32
    for c in range(3):
        expected = np.tile(normalised(PIL_ROW, c), (4, 1)).astype(np.float32)
        np.testing.assert_allclose(x[0, c].numpy(), expected, rtol=0, atol=0)
    # scale 1 is the normalised image itself, no resampling
    np.testing.assert_allclose(pil_pyramid(torch.from_numpy(STEP)[None], MEAN, STD)(1.0)[0, 0].numpy(),
                               normalised(STEP[..., 0], 0).astype(np.float32), rtol=0, atol=0)


def test_torch_pyramid_is_keys_a075_of_the_normalised_image() -> None:
    image = torch.from_numpy(normalised(STEP.transpose(2, 0, 1))).float()[None]
    x = torch_pyramid(image)(2.0)
    expected = (np.array(TORCH_ROW) / 255.0 - MEAN[0]) / STD[0]
    np.testing.assert_allclose(x[0, 0].numpy(), np.tile(expected, (4, 1)), atol=2e-6)
    # the two pyramids differ by 7.1 / 255 / std = 0.12 at the overshoot, and by 21.1 / 255 / std = 0.36
    # where PIL clips the undershoot: the size of the deviation measured on VOC images (FIDELITY.md)
    gap = (x - pil_pyramid(torch.from_numpy(STEP)[None], MEAN, STD)(2.0)).abs()[0, 0, 0]
    assert gap[6] == pytest.approx(21.09375 / 255 / STD[0], abs=1e-5)
    assert gap[9] == pytest.approx(7.09375 / 255 / STD[0], abs=1e-5)


class Recorder(nn.Module):
    """A 'CAM net' with output stride 1 that records its inputs: one map = channel 0 of the input."""

    output_stride = 1

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def seed_cams(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self.inputs.append(x.clone())
        return x[:, :1] + 3.0


def test_seed_inference_feeds_the_net_the_references_inputs() -> None:
    """pyramid=pil: at every scale the net sees PIL-rescaled, then normalised images (the reference's inputs,
    its ``VOC12ClassificationDatasetMSF``), the mirror image beside; the merge then sums exactly those maps."""
    gen = np.random.default_rng(0)
    raw = gen.integers(0, 256, (9, 14, 3), dtype=np.uint8)
    net = Recorder()
    module = CAMInference(net, [1.0, 0.5, 1.5], True, 4, dtype="float32", pyramid="pil", mean=MEAN, std=STD)
    image = torch.from_numpy(normalised(raw).astype(np.float32)).permute(2, 0, 1)  # ignored by pyramid=pil
    sample = {"id": "a", "image": image, "raw": torch.from_numpy(raw), "label": torch.tensor([1.0])}
    out = dict(module.predict_step([sample], 0))["a"]
    from PIL import Image

    expected_total = np.zeros((9, 14))
    for seen, size in zip(net.inputs, [(9, 14), (4, 7), (14, 21)]):  # round(9 * 0.5) = 4 (half to even)
        scaled = raw if size == (9, 14) else np.asarray(Image.fromarray(raw).resize(size[::-1], Image.BICUBIC))
        reference = np.stack([(scaled[..., c] / 255.0 - MEAN[c]) / STD[c] for c in range(3)]).astype(np.float32)
        np.testing.assert_allclose(seen[0].numpy(), reference, rtol=0, atol=0)
        np.testing.assert_allclose(seen[1].numpy(), reference[..., ::-1], rtol=0, atol=0)
        maps = torch.from_numpy(reference[:1] + 3.0)[None]
        expected_total += 2 * F.interpolate(maps, (9, 14), mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(out["high_res"][0], expected_total / (expected_total.max() + 1e-5), rtol=1e-6)


def test_pil_pyramid_needs_the_uint8_image() -> None:
    with pytest.raises(ValueError, match="uint8 images"):
        pil_pyramid(torch.zeros(1, 4, 4, 3), MEAN, STD)
    with pytest.raises(ValueError, match="mean and std"):
        CAMInference(Recorder(), [1.0], False, 4, pyramid="pil")


# ------------------------------------------------------------------------------ 3. threshold ties


def test_a_score_equal_to_the_threshold_is_background_as_the_reference() -> None:
    """The reference stacks a float32 plane at t with the float32 scores; argmax ties go to the background.
    float32(0.15) = 0.15000000596 lies above 0.15 in float64, so a float64 comparison called it foreground."""
    tie = np.float32(0.15)
    above = np.nextafter(tie, np.float32(1))
    scores = np.array([[[tie, 0.9], [0.1, above]]], np.float32)
    gt = np.array([[1, 1], [0, 0]], np.uint8)
    sweep = CAMThresholdSweep(2, [0.15, 0.5])
    sweep.update(scores, np.array([1]), gt)
    # at 0.15: pred [[0, 1], [0, 1]] -> gt 0: 1 bg + 1 fg, gt 1: 1 bg + 1 fg
    assert sweep.confusion(0).tolist() == [[1, 1], [1, 1]]
    assert sweep.results()["per_threshold"][0]["miou"] == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert seed_labels(scores, np.array([1]), 0.15).tolist() == [[0, 1], [0, 1]]  # the same rule
    stored16 = scores.astype(np.float16)  # float16(0.15) = 0.1500244 > float32(0.15): foreground
    sweep16 = CAMThresholdSweep(2, [0.15])
    sweep16.update(stored16, np.array([1]), gt)
    assert sweep16.confusion(0).tolist() == [[1, 1], [0, 2]]


# ------------------------------------------------------------------------------ 4. SEAM's way up


def ramp(x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """Stride-8 'CAM' independent of the image: 2 * row + 3 * column on the (H/8, W/8) grid."""
    b, _, h, w = x.shape
    rows = torch.arange(h // 8, dtype=torch.float32).view(-1, 1)
    cols = torch.arange(w // 8, dtype=torch.float32).view(1, -1)
    return (2 * rows + 3 * cols).expand(b, 1, -1, -1).contiguous()


def test_via_input_resizes_to_the_input_with_align_corners_then_to_the_image() -> None:
    """At scale 2 a 16 x 16 image becomes a 32 x 32 input and a 4 x 4 map. via_input: 4 -> 32 with
    align_corners=True is exactly linear (map index 3 p / 31 at pixel p), and 32 -> 16 with
    align_corners=False averages pixels 2x and 2x + 1: 3 (4x + 1) / 62 per unit slope. direct: 4 -> 16 with
    align_corners=False samples index (x + 0.5) / 4 - 0.5, clamped to [0, 3]."""
    image = torch.zeros(1, 3, 16, 16)
    _, via = multiscale_cams(ramp, image, [2.0], False, 4, 8, upsample="via_input")
    _, direct = multiscale_cams(ramp, image, [2.0], False, 4, 8, upsample="direct")
    idx = torch.arange(16, dtype=torch.float64)
    two_step = 3 * (4 * idx + 1) / 62
    one_step = ((idx + 0.5) / 4 - 0.5).clamp(0, 3)
    np.testing.assert_allclose(via[0, 0].numpy(), (2 * two_step[:, None] + 3 * two_step[None]).numpy(), atol=1e-5)
    np.testing.assert_allclose(direct[0, 0].numpy(), (2 * one_step[:, None] + 3 * one_step[None]).numpy(),
                               atol=1e-5)
    # the largest gap, at pixel (2, 2): 5 * (3 * 9 / 62 - 0.125)
    assert float((via - direct).abs().max()) == pytest.approx(5 * (27 / 62 - 0.125), abs=1e-5)


def test_via_input_at_scale_one_is_one_align_corners_resize() -> None:
    image = torch.zeros(1, 3, 24, 16)
    cam, high = multiscale_cams(ramp, image, [1.0], False, 4, 8, upsample="via_input")
    maps = ramp(image)
    up = F.interpolate(maps, (24, 16), mode="bilinear", align_corners=True)
    np.testing.assert_allclose(high.numpy(), up.numpy(), atol=1e-6)  # same size: the second step is identity
    np.testing.assert_allclose(cam.numpy(), F.interpolate(up, (6, 4), mode="bilinear", align_corners=False).numpy(),
                               atol=1e-6)
    with pytest.raises(ValueError, match=re.escape("upsample must be one of direct | via_input")):
        multiscale_cams(ramp, image, [1.0], False, 4, 8, upsample="bicubic")


# ------------------------------------------------------------------------ 5. crop padding (AffinityNet)


def padded_crop() -> torch.Tensor:
    """A 72 x 72 crop (9 x 9 cells of 8 px) of a 68 x 60 image at the top left, padded with NO_VOTE: cell
    row 8 holds 4 image rows, cell column 7 holds 4 image columns, column 8 none. Left half class 1 (cols
    < 32), right half background."""
    mask = torch.full((1, 72, 72), NO_VOTE, dtype=torch.long)
    mask[0, :68, :32] = 1
    mask[0, :68, 32:60] = 0
    return mask


def test_no_vote_padding_reproduces_the_zero_padded_scores() -> None:
    """By hand: no_vote = the reference (padding does not vote; only the all-padding column 8 is 255);
    unknown = padding counts as 255: a cell with 1/2 or 1/4 image pixels of class 1 is 255 (32 > 32 is
    false); a background cell is background when bg >= unknown (the 1/2 cells of column 7 and row 8) and
    255 when it is 1/4 image (cell (8, 7))."""
    mask = padded_crop()
    ref = stride_labels(mask, 8, num_classes=2, padding="no_vote")[0]
    ours = stride_labels(mask, 8, num_classes=2, padding="unknown")[0]
    expected_ref = torch.tensor([[1] * 4 + [0] * 4 + [IGNORE]] * 9)
    assert ref.tolist() == expected_ref.tolist()
    expected_ours = expected_ref.clone()
    expected_ours[8, :4] = IGNORE  # half-padded class-1 cells
    expected_ours[8, 7] = IGNORE   # a quarter image, background: bg 16/64 < unknown 48/64
    assert ours.tolist() == expected_ours.tolist()
    assert int((ref != ours).sum()) == 5
    # an image pixel of 255 still counts as unknown in both modes
    mask[0, :8, :8] = IGNORE
    assert stride_labels(mask, 8, 2, "no_vote")[0, 0, 0] == IGNORE


def test_no_vote_pads_to_the_stride_multiple_without_votes() -> None:
    mask = torch.ones(1, 10, 10, dtype=torch.long)  # 10 = 8 + 2: the bottom/right cells are mostly padding
    assert stride_labels(mask, 8, 1, "no_vote").tolist() == [[[1, 1], [1, 1]]]
    assert stride_labels(mask, 8, 1, "unknown").tolist() == [[[1, IGNORE], [IGNORE, IGNORE]]]


def test_the_affinity_crop_pads_labels_with_no_vote(tmp_path) -> None:
    """The configured crop (conf/refinement/affinity.yaml) pads the label map with NO_VOTE; padding=no_vote
    refuses a crop that pads with anything else."""
    cfg = compose_config(["+baseline=seam", "profile=paper", "profile.affinity.crop=72"], tmp_path)
    node = cfg.baseline.refinement.affinity
    assert node.padding == "no_vote"
    transform = build_transform(node.augment)
    image = np.zeros((40, 50, 3), np.uint8)
    out = transform(image=image, mask=np.ones((40, 50), np.uint8))
    assert out["mask"].shape == (72, 72) and set(np.unique(out["mask"])) == {1, NO_VOTE}
    assert int((out["mask"] == NO_VOTE).sum()) == 72 * 72 - 40 * 50
    kwargs = {k: node[k] for k in ("net", "radius", "epochs", "batch_size", "optim")}
    augment = [dict(step) for step in node.augment]
    for step in augment:
        if "fill_mask" in step:
            step["fill_mask"] = IGNORE
    with pytest.raises(ValueError, match="padding=no_vote reads the crop padding as label 254"):
        AffinityStage(**kwargs, augment=augment, padding="no_vote")
    AffinityStage(**kwargs, augment=augment, padding="unknown")  # padding is unknown, whatever its label
    with pytest.raises(ValueError, match=re.escape("padding must be one of unknown | no_vote")):
        AffinityStage(**kwargs, augment=augment, padding="zero")


# --------------------------------------------------------------------------- 6. the walk's pair region


def psa_pairs(height: int, width: int, radius: int) -> set[tuple[int, int]]:
    """The reference's pair set (get_indices_of_pairs), written out: sources in rows [0, h - r + 1) x
    cols [r - 1, w - r + 1), each paired with source + offset for every half-plane offset."""
    rf = radius - 1
    pairs = set()
    for y in range(0, height - rf):
        for x in range(rf, width - rf):
            for dy, dx in half_plane_offsets(radius):
                pairs.add((y * width + x, (y + dy) * width + x + dx))
    return pairs


def test_label_region_mask_gives_the_reference_pair_set() -> None:
    h, w, r = 5, 9, 3
    offsets = half_plane_offsets(r)
    aff = torch.ones(1, len(offsets), h, w) * label_region_mask(h, w, r)
    dense = dense_affinity(aff, offsets)[0]
    ours = {(int(i), int(j)) for i, j in torch.nonzero(torch.triu(dense, 1))}
    ref = {(min(a, b), max(a, b)) for a, b in psa_pairs(h, w, r)}
    assert ours == ref and len(ref) == 3 * 5 * len(offsets)  # sources: rows 0..2, cols 2..6
    assert not label_region_mask(2, 9, 3).any() and not label_region_mask(5, 4, 3).any()  # too small: none


class Flat(nn.Module):
    """AffinityNet stand-in: constant features, so every pair in the walk has affinity 1."""

    output_stride = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 4, x.shape[2] // 8, x.shape[3] // 8)


def test_label_region_walk_leaves_the_isolated_corner_alone(tmp_path) -> None:
    """With PSA's pairs (r = 5) the bottom-right node of a 6 x 10 grid is in no pair (sources: rows 0-1,
    cols 4-5; the offsets reaching 4 rows down move at most 2 columns): 64 steps keep its pooled scores.
    With every in-image pair it mixes with its neighbours."""
    assert all(10 * 6 - 1 not in pair for pair in psa_pairs(6, 10, 5))
    fg = np.zeros((1, 48, 80), np.float32)
    fg[0, 40:, 72:] = 1.0  # the object: only the bottom-right cell
    seeds = [{"keys": np.array([2]), "high_res": fg}]
    image = torch.zeros(1, 3, 48, 80)
    region = AffinityRandomWalk(Flat(), tmp_path, radius=5, beta=8, exp_times=6, alpha=6, pairs="label_region")
    every = AffinityRandomWalk(Flat(), tmp_path, radius=5, beta=8, exp_times=6, alpha=6, pairs="all")
    a, b = region.walk(image, seeds)[0], every.walk(image, seeds)[0]
    np.testing.assert_allclose(a[:, 5, 9].numpy(), [0.0, 1.0], atol=0)  # bg (1 - 1)^6 = 0, class 1: untouched
    assert float(a[1].sum()) == 1.0  # nothing flows out of the isolated node either
    assert float(b[1, 5, 9]) < 0.2 and float(b[1, 5, 6]) > 0.0


# ------------------------------------------------------------------------------ the profiles choose them


@pytest.mark.parametrize("baseline", ["irnet", "seam"])
def test_paper_profile_selects_the_reference_behaviour(tmp_path, baseline: str) -> None:
    paper = compose_config([f"+baseline={baseline}", "profile=paper"], tmp_path)
    seeds = paper.baseline.seeds
    assert (seeds.pyramid, seeds.dtype) == ("pil", "float32")
    assert seeds.upsample == ("direct" if baseline == "irnet" else "via_input")
    if baseline == "seam":
        assert paper.baseline.refinement.affinity.padding == "no_vote"
        assert paper.baseline.refinement.pseudo_masks.pairs == "label_region"
