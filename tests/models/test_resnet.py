"""ResNet backbones (src/models/resnet.py): shapes, strides and dilations, torchvision key names,
strict weight loading with clear errors, the three norm modes and input-channel expansion."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from src.models.resnet import FixedBatchNorm2d, ResNet, load_weights, resnet

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_keys(depth: int) -> set[str]:
    """torchvision.models.resnet<depth>().state_dict() keys, from its layout rules (fc included)."""
    block, layers = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
                     101: ("bottleneck", (3, 4, 23, 3))}[depth]
    convs = 2 if block == "basic" else 3
    keys = {"conv1.weight", "fc.weight", "fc.bias", *(f"bn1.{k}" for k in BN_KEYS)}
    for i, n in enumerate(layers, start=1):
        # a downsample shortcut where the shape changes: layers 2-4 (stride), and layer1 of bottleneck nets
        # (64 -> 256 channels)
        has_downsample = i > 1 or block == "bottleneck"
        for j in range(n):
            prefix = f"layer{i}.{j}"
            for c in range(1, convs + 1):
                keys.add(f"{prefix}.conv{c}.weight")
                keys.update(f"{prefix}.bn{c}.{k}" for k in BN_KEYS)
            if j == 0 and has_downsample:
                keys.add(f"{prefix}.downsample.0.weight")
                keys.update(f"{prefix}.downsample.1.{k}" for k in BN_KEYS)
    return keys


def test_torchvision_key_rule_matches_the_published_count():
    # torchvision's resnet50 state dict has 320 entries (161 parameters + 53 BN x 3 buffers) and
    # resnet18's 122: a check of the rule above, independent of the code under test
    assert len(torchvision_keys(50)) == 320
    assert len(torchvision_keys(18)) == 122


@pytest.mark.parametrize("depth", [18, 50, 101])
def test_state_dict_keys_are_torchvision_minus_fc(depth):
    model = resnet(depth)
    assert set(model.state_dict()) == torchvision_keys(depth) - {"fc.weight", "fc.bias"}


def test_resnet50_parameter_shapes_match_torchvision():
    state = resnet(50).state_dict()
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer1.0.conv1.weight"].shape == (64, 64, 1, 1)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert state["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert state["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert state["layer4.0.downsample.1.running_var"].shape == (2048,)
    assert sum(p.numel() for p in resnet(50).parameters()) == 25_557_032 - (2048 * 1000 + 1000)


STAGE_CHANNELS = {"tiny": [16, 16, 32, 64, 128], 18: [64, 64, 128, 256, 512], 50: [64, 256, 512, 1024, 2048],
                  101: [64, 256, 512, 1024, 2048]}


@pytest.mark.parametrize("depth", ["tiny", 18, 50, 101])
@pytest.mark.parametrize(("strides", "dilations", "sizes"), [
    ((2, 2, 2, 1), (1, 1, 1, 1), [8, 8, 4, 2, 2]),   # IRNet: output stride 16
    ((2, 2, 1, 1), (1, 1, 2, 4), [8, 8, 4, 4, 4]),   # DeepLab: output stride 8
])
def test_stage_shapes_and_strides(depth, strides, dilations, sizes):
    model = resnet(depth, strides=strides, dilations=dilations).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        outs = model.forward_stages(x)
        last = model(x)
    assert model.stage_channels == STAGE_CHANNELS[depth]
    assert model.out_channels == STAGE_CHANNELS[depth][-1]
    assert model.output_stride == 32 // sizes[-1]
    assert [tuple(o.shape) for o in outs] == [(1, c, s, s) for c, s in zip(STAGE_CHANNELS[depth], sizes)]
    torch.testing.assert_close(last, outs[-1])


def test_dilations_follow_torchvision_and_stride_sits_on_the_3x3():
    m = resnet(50, strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4))
    assert m.layer2[0].conv2.stride == (2, 2) and m.layer2[0].conv1.stride == (1, 1)  # "V1.5"
    assert m.layer3[0].conv2.stride == (1, 1) and m.layer3[0].downsample[0].stride == (1, 1)
    # the first block of a dilated layer keeps the previous dilation, the others take the new one
    assert [b.conv2.dilation for b in m.layer3] == [(1, 1)] + [(2, 2)] * 5
    assert [b.conv2.dilation for b in m.layer4] == [(2, 2), (4, 4), (4, 4)]
    assert [b.conv2.padding for b in m.layer4] == [(2, 2), (4, 4), (4, 4)]
    b18 = resnet(18, strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4))
    # basic blocks (torchvision has no dilated ones) dilate both 3x3 convs of a block alike
    assert [(b.conv1.dilation, b.conv2.dilation) for b in b18.layer4] == [((2, 2), (2, 2)), ((4, 4), (4, 4))]
    s16 = resnet(50, strides=(2, 2, 2, 1))
    assert s16.layer3[0].conv2.stride == (2, 2) and s16.layer4[0].conv2.stride == (1, 1)
    assert s16.layer4[0].downsample[0].stride == (1, 1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown ResNet depth 42"):
        resnet(42)
    with pytest.raises(ValueError, match="unknown norm 'group'"):
        resnet("tiny", norm="group")
    with pytest.raises(ValueError, match="4 entries"):
        ResNet(strides=(2, 2, 2))


# ----------------------------------------------------------------------------------------- weights
def torchvision_style_file(tmp_path, model: nn.Module, name: str = "weights.pth", **edit) -> str:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["fc.weight"] = torch.randn(1000, model.out_channels)
    state["fc.bias"] = torch.randn(1000)
    for key, value in edit.items():
        if value is None:
            del state[key.replace("__", ".")]
        else:
            state[key.replace("__", ".")] = value
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def test_load_weights_loads_torchvision_keys_and_ignores_fc(tmp_path):
    torch.manual_seed(0)
    source = resnet("tiny")
    with torch.no_grad():
        source.bn1.running_mean.uniform_()
    path = torchvision_style_file(tmp_path, source)
    target = resnet("tiny")
    assert not torch.equal(target.conv1.weight, source.conv1.weight)
    load_weights(target, path)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, msg=key)
    loaded = resnet("tiny", weights=path)  # the factory's path
    torch.testing.assert_close(loaded.layer4[0].conv2.weight, source.layer4[0].conv2.weight)
    # a Lightning-style checkpoint: {"state_dict": ...}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, ckpt)
    again = resnet("tiny")
    load_weights(again, ckpt)
    torch.testing.assert_close(again.bn1.running_mean, source.bn1.running_mean)


def test_load_weights_lists_missing_unexpected_and_shape_mismatch(tmp_path):
    model = resnet("tiny")
    path = torchvision_style_file(tmp_path, model, layer1__0__conv1__weight=None,
                                  layer9__0__conv1__weight=torch.zeros(1),
                                  bn1__weight=torch.zeros(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_weights(model, path)
    msg = str(info.value)
    assert path in msg
    assert "missing keys: layer1.0.conv1.weight" in msg
    assert "unexpected keys: layer9.0.conv1.weight" in msg
    assert "shape mismatches: bn1.weight: file (3,) vs model (16,)" in msg
    assert "fc." not in msg  # the head is ignored, not reported
    for key, value in model.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key]), key


def test_load_weights_of_another_depth_names_the_file(tmp_path):
    path = torchvision_style_file(tmp_path, resnet(18), "resnet18.pth")
    with pytest.raises(ValueError, match=r"resnet18\.pth does not fit ResNet: missing keys: .*\(\d+ in all\)"):
        load_weights(resnet(50), path)


def test_load_weights_missing_or_unreadable_file(tmp_path):
    missing = tmp_path / "nope" / "resnet50-19c8e357.pth"
    with pytest.raises(FileNotFoundError, match="resnet50-19c8e357.pth"):
        load_weights(resnet("tiny"), missing)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"could not read weight file .*bad\.pth"):
        load_weights(resnet("tiny"), bad)
    listed = tmp_path / "list.pth"
    torch.save([1, 2], listed)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_weights(resnet("tiny"), listed)


# -------------------------------------------------------------------------------------------- norms
def bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_batch_norm_updates_running_stats_in_train_mode():
    model = resnet("tiny", norm="batch").train()
    before = bn_stats(model)
    model(torch.randn(2, 3, 32, 32) * 3 + 1)
    after = bn_stats(model)
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])
    assert after["bn1.num_batches_tracked"].item() == 1


@pytest.mark.parametrize("norm", ["fixed", "frozen"])
def test_fixed_and_frozen_bn_never_update_running_stats(norm):
    torch.manual_seed(0)
    model = resnet("tiny", norm=norm)
    with torch.no_grad():  # non-trivial statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    assert all(isinstance(m, FixedBatchNorm2d) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn_stats(model)
    x = torch.randn(2, 3, 32, 32) * 3 + 1
    model.train()
    out_train = model(x)
    after = bn_stats(model)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), out_train.detach())  # train mode normalises like eval mode


def test_fixed_bn_affine_trains_frozen_bn_has_no_trainable_params():
    fixed, frozen = resnet("tiny", norm="fixed"), resnet("tiny", norm="frozen")
    bn_params = lambda m: [p for mod in m.modules() if isinstance(mod, nn.BatchNorm2d) for p in mod.parameters()]
    assert bn_params(fixed) and all(p.requires_grad for p in bn_params(fixed))
    assert bn_params(frozen) and not any(p.requires_grad for p in bn_params(frozen))
    convs = [m.weight for m in frozen.modules() if isinstance(m, nn.Conv2d)]
    assert all(p.requires_grad for p in convs)
    frozen(torch.randn(1, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in bn_params(frozen))
    assert frozen.conv1.weight.grad is not None and frozen.conv1.weight.grad.abs().sum() > 0


# -------------------------------------------------------------------------------- input channels
def test_expand_input_channels_keeps_the_output():
    torch.manual_seed(0)
    model = resnet("tiny").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    old_weight = model.conv1.weight.detach().clone()
    model.expand_input_channels(1)
    assert model.conv1.weight.shape == (16, 4, 7, 7) and model.conv1.in_channels == 4
    assert model.conv1.stride == (2, 2) and model.conv1.padding == (3, 3) and model.conv1.bias is None
    torch.testing.assert_close(model.conv1.weight[:, :3], old_weight)
    assert torch.count_nonzero(model.conv1.weight[:, 3]) == 0
    assert model.conv1.weight.requires_grad
    with torch.no_grad():
        for extra in (torch.zeros(2, 1, 32, 32), torch.randn(2, 1, 32, 32) * 5):
            torch.testing.assert_close(model(torch.cat([x, extra], 1)), ref)
    model(torch.cat([x, torch.randn(2, 1, 32, 32)], 1)).sum().backward()
    assert model.conv1.weight.grad[:, 3].abs().sum() > 0  # the new channel learns
