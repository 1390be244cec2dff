"""A DeepLab init in deeplab-pytorch's naming, converted, runs identically in our ResNet (Caffe variant)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from experiments.tools.convert_deeplab_init import convert
from src.models.resnet import ResNet
from src.models.weights import load_state_strict


class ConvBnReLU(nn.Sequential):
    """The Caffe-style unit of deeplab-pytorch (written here from its description, as a test double)."""

    def __init__(self, cin, cout, k, stride, pad, dil, relu=True):
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, k, stride, pad, dil, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))
        if relu:
            self.add_module("relu", nn.ReLU())


class Block(nn.Module):
    def __init__(self, cin, cout, stride, dil, down):
        super().__init__()
        mid = cout // 4
        self.reduce = ConvBnReLU(cin, mid, 1, stride, 0, 1)        # stride on the first 1x1 conv
        self.conv3x3 = ConvBnReLU(mid, mid, 3, 1, dil, dil)
        self.increase = ConvBnReLU(mid, cout, 1, 1, 0, 1, relu=False)
        self.shortcut = ConvBnReLU(cin, cout, 1, stride, 0, 1, relu=False) if down else nn.Identity()

    def forward(self, x):
        return F.relu(self.increase(self.conv3x3(self.reduce(x))) + self.shortcut(x))


class CaffeDeepLabTrunk(nn.Sequential):
    def __init__(self, blocks=(1, 2, 1, 1)):
        super().__init__()
        stem = nn.Sequential()
        stem.add_module("conv1", ConvBnReLU(3, 64, 7, 2, 3, 1))
        stem.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))
        self.add_module("layer1", stem)
        cfg = [(64, 256, 1, 1), (256, 512, 2, 1), (512, 1024, 1, 2), (1024, 2048, 1, 4)]
        for i, (n, (cin, cout, stride, dil)) in enumerate(zip(blocks, cfg)):
            layer = nn.Sequential()
            for j in range(n):
                layer.add_module(f"block{j + 1}", Block(cin if j == 0 else cout, cout, stride if j == 0 else 1, dil,
                                                        j == 0))
            self.add_module(f"layer{i + 2}", layer)


@torch.no_grad()
def test_converted_weights_give_the_same_features() -> None:
    torch.manual_seed(0)
    ref = CaffeDeepLabTrunk()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.8, 1.2)
            m.weight.data.uniform_(0.8, 1.2)
            m.bias.data.uniform_(-0.1, 0.1)
    ref.eval()
    state = {f"base.{k}": v for k, v in ref.state_dict().items()}
    state["base.aspp.c0.weight"] = torch.zeros(91, 2048, 3, 3)  # a COCO head: dropped
    ours = ResNet("bottleneck", layers=(1, 2, 1, 1), strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4), norm="frozen",
                  stride_in_1x1=True, ceil_pool=True, dilate_first_block=True).eval()
    load_state_strict(ours, convert(state))
    x = torch.randn(1, 3, 41, 45)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)
