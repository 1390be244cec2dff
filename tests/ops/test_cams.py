"""Seeds: multi-scale + flip CAM merge, sizes, class selection and normalisation (IRNet's make_cam)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from src.ops.cams import keep_and_normalise, multiscale_cams, scaled_size, strided_size


def test_sizes_follow_the_reference() -> None:
    assert strided_size((375, 500), 4) == (94, 125)
    assert strided_size((96, 96), 4) == (24, 24)
    assert scaled_size((35, 21), 0.5) == (18, 10)  # Python round: 17.5 -> 18 (half to even), 10.5 -> 10


def linear_cams(x: torch.Tensor, prior=None) -> torch.Tensor:
    """A 'network' with output stride 4: two class maps = average-pooled channel 0 and its negation."""
    pooled = F.avg_pool2d(x[:, :1], 4)
    return torch.cat([pooled, -pooled], 1)


def test_flip_merge_is_relu_then_flip_back_and_add() -> None:
    img = torch.randn(1, 3, 16, 24)
    cam, high = multiscale_cams(linear_cams, img, [1.0], flip=True, cam_stride=4, output_stride=4)
    maps = linear_cams(img)
    flipped = linear_cams(img.flip(-1))
    expected = F.relu(maps) + F.relu(flipped).flip(-1)  # ReLU before the flip-back
    torch.testing.assert_close(cam, F.interpolate(expected, (4, 6), mode="bilinear", align_corners=False))
    assert high.shape == (1, 2, 16, 24)


def test_scales_are_summed_at_both_output_sizes() -> None:
    img = torch.randn(2, 3, 20, 28)
    single = {s: multiscale_cams(linear_cams, img, [s], flip=False, cam_stride=4, output_stride=4)
              for s in (1.0, 0.5, 1.5)}
    cam, high = multiscale_cams(linear_cams, img, [1.0, 0.5, 1.5], flip=False, cam_stride=4, output_stride=4)
    torch.testing.assert_close(cam, sum(v[0] for v in single.values()))
    torch.testing.assert_close(high, sum(v[1] for v in single.values()))
    assert cam.shape == (2, 2, 5, 7) and high.shape == (2, 2, 20, 28)


def test_high_res_is_upsampled_to_the_stride_multiple_then_cropped() -> None:
    img = torch.randn(1, 3, 18, 22)  # 18 = not a multiple of 4: up-size 20 x 24, then the top-left 18 x 22
    _, high = multiscale_cams(linear_cams, img, [1.0], flip=False, cam_stride=4, output_stride=4)
    maps = F.relu(linear_cams(img))
    expected = F.interpolate(maps, (20, 24), mode="bilinear", align_corners=False)[..., :18, :22]
    torch.testing.assert_close(high, expected)


def test_keep_only_the_image_classes_each_divided_by_its_max() -> None:
    maps = torch.zeros(4, 2, 2)
    maps[1] = torch.tensor([[1.0, 2.0], [0.0, 4.0]])
    maps[3] = torch.tensor([[0.5, 0.0], [0.0, 0.25]])
    out = keep_and_normalise(maps, torch.tensor([1, 3]))
    torch.testing.assert_close(out[0], torch.tensor([[0.25, 0.5], [0.0, 1.0]]) * 4 / (4 + 1e-5))
    torch.testing.assert_close(out[1], torch.tensor([[1.0, 0.0], [0.0, 0.5]]) * 0.5 / (0.5 + 1e-5))
    assert keep_and_normalise(maps, torch.tensor([], dtype=torch.long)).shape == (0, 2, 2)


def test_prior_is_passed_to_the_net_for_image_and_mirror() -> None:
    seen = []

    def with_prior(x, prior):
        seen.append(None if prior is None else prior.shape[0])
        return linear_cams(x)

    img = torch.randn(3, 3, 8, 8)
    multiscale_cams(with_prior, img, [1.0, 0.5], flip=True, cam_stride=4, output_stride=4,
                    prior=torch.rand(3, 1, 2, 2))
    assert seen == [6, 6]  # batch = 3 images + 3 mirror images, the prior doubled alongside
