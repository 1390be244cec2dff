"""The grid_sample deformable convolution against torchvision's definition (specs/esol.md section 3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.ops.deform_conv import DeformConv2d, deform_conv2d


def naive_deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask=None) -> np.ndarray:
    """torchvision's CPU kernel (bilinear_interpolate + deformable_im2col) as a per-pixel loop in float64."""
    x, offset, weight = (np.asarray(t, dtype=np.float64) for t in (x, offset, weight))
    b, c, h, w = x.shape
    o, cpg, kh, kw = weight.shape
    k = kh * kw
    groups = offset.shape[1] // (2 * k)
    wgroups = c // cpg
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1

    def sample(img, yy, xx):
        if yy <= -1 or yy >= h or xx <= -1 or xx >= w:
            return 0.0
        y0, x0 = math.floor(yy), math.floor(xx)
        ly, lx = yy - y0, xx - x0
        total = 0.0
        for (yi, xi, wt) in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                             (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
            if 0 <= yi < h and 0 <= xi < w:
                total += wt * img[yi, xi]
        return total

    out = np.zeros((b, o, ho, wo))
    for n in range(b):
        for oc in range(o):
            wg = oc // (o // wgroups)
            for oy in range(ho):
                for ox in range(wo):
                    acc = 0.0
                    for cc in range(cpg):
                        ch = wg * cpg + cc
                        g = ch // (c // groups)
                        for i in range(kh):
                            for j in range(kw):
                                t = i * kw + j
                                dy = offset[n, 2 * (g * k + t), oy, ox]
                                dx = offset[n, 2 * (g * k + t) + 1, oy, ox]
                                m = 1.0 if mask is None else float(mask[n, g * k + t, oy, ox])
                                yy = oy * sh - ph + i * dh + dy
                                xx = ox * sw - pw + j * dw + dx
                                acc += weight[oc, cc, i, j] * m * sample(x[n, ch], yy, xx)
                    out[n, oc, oy, ox] = acc + (0.0 if bias is None else float(bias[oc]))
    return out


def test_zero_offsets_are_conv2d() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 9)
    weight, bias = torch.randn(5, 4, 3, 3), torch.randn(5)
    for stride, padding, dilation in [((1, 1), (1, 1), (1, 1)), ((2, 1), (2, 0), (2, 1)), ((1, 2), (0, 1), (1, 2))]:
        expected = F.conv2d(x, weight, bias, stride, padding, dilation)
        offset = torch.zeros(2, 18, *expected.shape[-2:])
        got = deform_conv2d(x, offset, weight, bias, stride, padding, dilation)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        exact = deform_conv2d(x.double(), offset.double(), weight.double(), bias.double(), stride, padding, dilation)
        torch.testing.assert_close(exact, F.conv2d(x.double(), weight.double(), bias.double(), stride, padding,
                                                   dilation), atol=1e-12, rtol=1e-12)


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., y, x] = x[..., y + dy, x + dx], zero outside the image."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    yt, xt = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
    out[..., ys, xs] = x[..., yt, xt]
    return out


@pytest.mark.parametrize("dy, dx", [(1, 0), (0, -2), (-1, 3), (2, 2)])
def test_integer_offsets_are_a_conv_on_the_shifted_input(dy: int, dx: int) -> None:
    torch.manual_seed(1)
    x = torch.randn(1, 3, 6, 8, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    offset = torch.zeros(1, 18, 6, 8, dtype=torch.float64)
    offset[:, 0::2], offset[:, 1::2] = dy, dx
    got = deform_conv2d(x, offset, weight, padding=1)
    # every tap moves by (dy, dx): the same as padding first, then shifting the padded input
    padded = F.pad(x, (1, 1, 1, 1))
    expected = F.conv2d(shifted(padded, dy, dx), weight)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_random_offsets_match_the_naive_loop_including_points_outside() -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    weight = torch.randn(6, 2, 3, 2, dtype=torch.float64)  # 2 weight groups, a non-square kernel
    bias = torch.randn(6, dtype=torch.float64)
    stride, padding, dilation = (1, 2), (1, 1), (2, 1)
    ho = (5 + 2 - (2 * 2 + 1)) // 1 + 1
    wo = (6 + 2 - (1 * 1 + 1)) // 2 + 1
    offset = torch.randn(2, 2 * 2 * 6, ho, wo, dtype=torch.float64) * 2.5  # 2 offset groups, many points outside
    mask = torch.rand(2, 2 * 6, ho, wo, dtype=torch.float64)
    got = deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask)
    expected = naive_deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10, rtol=1e-10)
    outside = 0
    for t in range(6):
        i, j = divmod(t, 2)
        y = torch.arange(ho).view(-1, 1) * 1 - 1 + i * 2 + offset[:, 2 * t]
        xx = torch.arange(wo).view(1, -1) * 2 - 1 + j * 1 + offset[:, 2 * t + 1]
        outside += int(((y <= -1) | (y >= 5) | (xx <= -1) | (xx >= 6)).sum())
    assert outside > 10  # the case is exercised: many sampling points fall outside the image


def test_offset_groups_use_their_own_channels() -> None:
    torch.manual_seed(3)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    weight = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    offset = torch.randn(1, 2 * 2 * 9, 6, 6, dtype=torch.float64)
    got = deform_conv2d(x, offset, weight, padding=1)
    np.testing.assert_allclose(got.numpy(), naive_deform_conv2d(x, offset, weight, None, (1, 1), (1, 1), (1, 1)),
                               atol=1e-10, rtol=1e-10)
    # group 0 (channels 0-1) reads offset channels 0..17, group 1 (channels 2-3) channels 18..35
    half = deform_conv2d(x[:, :2], offset[:, :18], weight[:, :2], padding=1) \
        + deform_conv2d(x[:, 2:], offset[:, 18:], weight[:, 2:], padding=1)
    torch.testing.assert_close(got, half, atol=1e-12, rtol=1e-12)


def test_gradcheck_small_case() -> None:
    torch.manual_seed(4)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    offset = (torch.rand(1, 18, 4, 4, dtype=torch.float64) * 3 - 1.5 + 0.123).requires_grad_()
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(1, 9, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: deform_conv2d(*a[:4], 1, 1, 1, a[4]), (x, offset, weight, bias, mask),
                                    eps=1e-6, atol=1e-5)


def test_module_has_torchvision_parameter_names() -> None:
    torch.manual_seed(5)
    conv = DeformConv2d(4, 6, 3, padding=1, bias=True)
    assert [n for n, _ in conv.named_parameters()] == ["weight", "bias"]
    assert conv.weight.shape == (6, 4, 3, 3)
    x, offset = torch.randn(2, 4, 8, 8), torch.rand(2, 18, 8, 8) * 4 - 2
    torch.testing.assert_close(conv(x, offset), deform_conv2d(x, offset, conv.weight, conv.bias, 1, 1, 1))


def test_grid_stays_fp32_under_autocast() -> None:
    """A 0/1 stripe pattern along a 256-pixel row sampled 0.37 px to the right: 0.37 or 0.63 everywhere. A bf16
    grid (spacing 2^-8 of the normalised range = 0.5 px here) would be off by up to 0.5; only the final
    bf16 matmul rounds (relative 2^-9)."""
    width = 256
    x = (torch.arange(width) % 2).float().view(1, 1, 1, width)
    weight = torch.ones(1, 1, 1, 1)
    offset = torch.zeros(1, 2, 1, width)
    offset[:, 1] = 0.37
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_conv2d(x, offset, weight)
    assert out.dtype == torch.bfloat16
    v = x[0, 0, 0]
    expected = 0.63 * v[:-1] + 0.37 * v[1:]
    assert (out[0, 0, 0, :-1].float() - expected).abs().max() < 5e-3


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="offset must be"):
        deform_conv2d(torch.zeros(1, 2, 5, 5), torch.zeros(1, 18, 4, 4), torch.zeros(3, 2, 3, 3), padding=1)
    with pytest.raises(ValueError, match="not a multiple of 2 x 9"):
        deform_conv2d(torch.zeros(1, 2, 5, 5), torch.zeros(1, 10, 5, 5), torch.zeros(3, 2, 3, 3), padding=1)
