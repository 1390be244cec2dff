"""Deformable convolution (DCNv1/v2) in plain torch with torchvision's semantics (``torchvision.ops``
cannot be imported here), written with ``F.grid_sample`` (specs/esol.md section 3).

Layouts as torchvision's ``deform_conv2d``: input (B, C, H, W); weight (O, C / g_w, kh, kw); offset
(B, 2 G K, Ho, Wo) with K = kh kw taps in row-major order (k = i kw + j), channel 2k = dy and 2k + 1 = dx
of tap k, offset group g using channels [2Kg, 2K(g + 1)) and the input channels [g C / G, (g + 1) C / G);
optional mask (B, G K, Ho, Wo). Tap (i, j) of output (oy, ox) samples the input at
``y = oy s_h - p_h + i d_h + dy``, ``x = ox s_w - p_w + j d_w + dx`` (input pixels) bilinearly, zero outside
the image. ``grid_sample(align_corners=False)`` maps the normalised coordinate (2x + 1) / W - 1 back to x
exactly, and its zero padding gives torchvision's values at the -1 / W fringes; its backward is
torchvision's ``deformable_col2im`` / ``_coord`` (floor-based differences at integer positions).

The sampling grid is built and sampled in float32 (float64 inputs stay float64) with autocast off: in
half precision a coordinate of a 32-pixel map would be off by a large fraction of a pixel. The weighting
that follows is one matmul and runs under the ambient autocast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) for v in pair):
        raise ValueError(f"deform_conv2d: {name} must be an int or a pair of ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = (1, 1),
    padding: int | Sequence[int] = (0, 0),
    dilation: int | Sequence[int] = (1, 1),
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """torchvision's ``deform_conv2d`` (same arguments, layouts and values; see the module docstring)."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if input.dim() != 4 or weight.dim() != 4 or offset.dim() != 4:
        raise ValueError(f"deform_conv2d: input, offset and weight must be 4-D, got {tuple(input.shape)}, "
                         f"{tuple(offset.shape)}, {tuple(weight.shape)}")
    b, c, h, w = input.shape
    o, c_per_group, kh, kw = weight.shape
    k = kh * kw
    if c % c_per_group:
        raise ValueError(f"deform_conv2d: {c} input channels are not a multiple of the weight's {c_per_group}")
    weight_groups = c // c_per_group
    if o % weight_groups:
        raise ValueError(f"deform_conv2d: {o} output channels do not split into {weight_groups} weight groups")
    ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"deform_conv2d: a {kh}x{kw} kernel does not fit the {h}x{w} input with padding "
                         f"({ph}, {pw}) and dilation ({dh}, {dw})")
    if offset.shape[1] % (2 * k) or offset.shape[1] == 0:
        raise ValueError(f"deform_conv2d: offset has {offset.shape[1]} channels, not a multiple of 2 x {k} taps")
    groups = offset.shape[1] // (2 * k)
    if c % groups:
        raise ValueError(f"deform_conv2d: {c} input channels do not split into {groups} offset groups")
    if tuple(offset.shape) != (b, 2 * groups * k, ho, wo):
        raise ValueError(f"deform_conv2d: offset must be {(b, 2 * groups * k, ho, wo)}, got {tuple(offset.shape)}")
    if mask is not None and tuple(mask.shape) != (b, groups * k, ho, wo):
        raise ValueError(f"deform_conv2d: mask must be {(b, groups * k, ho, wo)}, got {tuple(mask.shape)}")

    exact = torch.float64 if input.dtype == torch.float64 else torch.float32
    with torch.autocast(input.device.type, enabled=False):
        dev = input.device
        tap_y = (torch.arange(kh, device=dev, dtype=exact) * dh).repeat_interleave(kw)  # (K,) row-major taps
        tap_x = (torch.arange(kw, device=dev, dtype=exact) * dw).repeat(kh)
        out_y = torch.arange(ho, device=dev, dtype=exact) * sh - ph
        out_x = torch.arange(wo, device=dev, dtype=exact) * sw - pw
        base_y = tap_y.view(k, 1, 1) + out_y.view(1, ho, 1)  # (K, Ho, 1)
        base_x = tap_x.view(k, 1, 1) + out_x.view(1, 1, wo)  # (K, 1, Wo)
        off = offset.to(exact).view(b, groups, k, 2, ho, wo)
        y = base_y + off[:, :, :, 0]  # (B, G, K, Ho, Wo)
        x = base_x + off[:, :, :, 1]
        grid = torch.stack(((2 * x + 1) / w - 1, (2 * y + 1) / h - 1), dim=-1)  # grid_sample's (x, y) order
        grid = grid.view(b * groups, k * ho, wo, 2)
        folded = input.to(exact).reshape(b * groups, c // groups, h, w)
        samples = F.grid_sample(folded, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        samples = samples.view(b, groups, c // groups, k, ho, wo)
        if mask is not None:
            samples = samples * mask.to(exact).view(b, groups, 1, k, ho, wo)
    # (B, C, K, Ho*Wo) -> per weight group (B, g_w, C/g_w * K, Ho*Wo); weight (g_w, O/g_w, C/g_w * K)
    samples = samples.reshape(b, weight_groups, c_per_group * k, ho * wo)
    kernel = weight.reshape(weight_groups, o // weight_groups, c_per_group * k)
    if not torch.is_autocast_enabled(input.device.type):
        samples = samples.to(weight.dtype)
    out = torch.matmul(kernel.unsqueeze(0), samples).reshape(b, o, ho, wo)
    if bias is not None:
        out = out + bias.view(1, o, 1, 1).to(out.dtype)
    return out


class DeformConv2d(nn.Module):
    """torchvision's ``DeformConv2d``: parameters ``weight`` (O, C / groups, kh, kw) and ``bias`` (O) with
    torchvision's initialisation; ``forward(input, offset, mask=None)``. The offsets come from elsewhere
    (an offset conv of the caller's)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"DeformConv2d: in_channels {in_channels} and out_channels {out_channels} must be "
                             f"divisible by groups {groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.padding = _pair(stride, "stride"), _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's: kaiming_uniform_(a=sqrt(5)) weights, uniform(+-1/sqrt(fan_in)) bias."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}")
