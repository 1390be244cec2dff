"""ResNet-38d: shapes, key names, norm/freeze options, input expansion, strict loading, MXNet name mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from experiments.tools.convert_resnet38d import rename, torch_key
from src.models.resnet import FixedBatchNorm2d
from src.models.resnet38d import (
    BLOCK_NAMES,
    ResNet38d,
    from_reference_keys,
    load_state_strict,
    resnet38d,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions gain nothing from threads, and on a shared CPU the thread hand-offs dominate."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def full() -> ResNet38d:
    torch.manual_seed(0)
    return ResNet38d().eval()


def float_keys(model: nn.Module) -> list[str]:
    return [k for k, v in model.state_dict().items() if v.is_floating_point()]


def test_full_shapes_and_keys(full: ResNet38d) -> None:
    with torch.no_grad():
        d = full.forward_features(torch.randn(1, 3, 24, 24))
    assert {k: tuple(v.shape) for k, v in d.items()} == {
        "conv3": (1, 256, 6, 6), "conv4": (1, 512, 3, 3), "conv5": (1, 1024, 3, 3), "conv6": (1, 4096, 3, 3)}
    assert full.out_channels == 4096 and full.output_stride == 8
    keys = float_keys(full)
    assert len(keys) == 191 and sum(full.state_dict()[k].numel() for k in keys) == 105118656
    assert keys[:3] == ["conv1a.weight", "b2.bn_branch2a.weight", "b2.bn_branch2a.bias"]
    assert "b5.conv_branch1.weight" in keys and "b5_1.conv_branch1.weight" not in keys
    assert "b7.bn_branch2b2.running_var" in keys and keys[-1] == "bn7.running_var"
    assert full.b5.conv_branch2a.dilation == (1, 1) and full.b5_1.conv_branch2a.dilation == (2, 2)
    assert full.b6.conv_branch2b1.dilation == (4, 4) and full.b7.conv_branch2b1.out_channels == 2048
    assert full.b6.dropout_2b1.p == 0.3 and full.b7.dropout_2b2.p == 0.5


def test_tiny_is_the_same_topology_at_width_one_sixteenth(full: ResNet38d) -> None:
    tiny = resnet38d("tiny")
    assert tiny.conv1a.out_channels == 4 and tiny.out_channels == 256
    assert tiny.feature_channels == {"conv3": 16, "conv4": 32, "conv5": 64, "conv6": 256}
    assert float_keys(tiny) == float_keys(full)
    with torch.no_grad():
        d = tiny.eval().forward_features(torch.randn(2, 3, 32, 40), return_blocks=True)
    assert d["conv6"].shape == (2, 256, 4, 5) and d["conv3"].shape == (2, 16, 8, 10)
    assert [n for n in d if n in BLOCK_NAMES] == list(BLOCK_NAMES)
    assert d["b2"].shape[-1] == 20 and d["b7"].shape == (2, 256, 4, 5)


def test_norm_modes_and_freezing() -> None:
    frozen = ResNet38d(width=1 / 16)
    bns = [m for m in frozen.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, FixedBatchNorm2d) for m in bns)
    assert not any(p.requires_grad for m in bns for p in m.parameters())
    assert all(p.requires_grad for n, p in frozen.named_parameters() if "conv" in n)

    fixed = ResNet38d(width=1 / 16, norm="fixed", frozen_blocks=("conv1a", "b2"))
    assert isinstance(fixed.bn7, FixedBatchNorm2d) and fixed.bn7.weight.requires_grad
    assert fixed.b3.bn_branch2b1.bias.requires_grad
    assert not fixed.conv1a.weight.requires_grad
    assert not any(p.requires_grad for p in fixed.b2.parameters())
    assert fixed.b2_1.conv_branch2a.weight.requires_grad

    batch = ResNet38d(width=1 / 16, norm="batch").train()
    assert type(batch.bn7) is nn.BatchNorm2d
    before = batch.bn7.running_mean.clone()
    batch(torch.randn(2, 3, 16, 16))
    assert not torch.equal(before, batch.bn7.running_mean)
    with pytest.raises(ValueError, match="unknown ResNet-38d block 'b9'"):
        batch.freeze(["b9"])


def test_frozen_bn_ignores_train_mode() -> None:
    """Reference BN layers always use running statistics: same output in train and eval mode once the
    dropout layers (b6, b7) are off."""
    torch.manual_seed(0)
    net = ResNet38d(width=1 / 16)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = net.eval()(x)
        net.train()
        for m in net.modules():
            if isinstance(m, nn.Dropout2d):
                m.eval()
        torch.testing.assert_close(net(x), ref, rtol=0, atol=0)


def test_expand_input_channels_keeps_output() -> None:
    torch.manual_seed(0)
    net = ResNet38d(width=1 / 16, frozen_blocks=("conv1a",)).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
        net.expand_input_channels(1)
        out = net(torch.cat([x, torch.randn(1, 1, 16, 16)], 1))
    assert net.conv1a.weight.shape == (4, 4, 3, 3) and not net.conv1a.weight.requires_grad
    assert torch.all(net.conv1a.weight[:, 3] == 0)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert net.image_channels == 3


def test_load_weights_round_trip_and_strict_errors(tmp_path: Path) -> None:
    src, dst = ResNet38d(width=1 / 16), ResNet38d(width=1 / 16)
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "ok.pth")
    dst.load_weights(tmp_path / "ok.pth")  # BN counters absent, as in MXNet conversions: accepted
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, rtol=0, atol=0)

    wrong = dict(state)
    wrong.pop("b4_3.conv_branch2a.weight")
    wrong["fc8.weight"] = torch.zeros(21, 256, 1, 1)
    wrong["bn7.weight"] = torch.zeros(5)
    torch.save({"state_dict": wrong}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError) as err:
        dst.load_weights(tmp_path / "wrong.pth")
    msg = str(err.value)
    assert "missing keys: b4_3.conv_branch2a.weight" in msg
    assert "unexpected keys: fc8.weight" in msg
    assert "bn7.weight: file (5,) vs model (256,)" in msg and "wrong.pth" in msg

    with pytest.raises(ValueError, match="missing keys: .*b2.bn_branch2a.running_var"):
        full_width = ResNet38d(width=1 / 8)
        load_state_strict(full_width, {"conv1a.weight": torch.zeros(8, 3, 3, 3)})
    with pytest.raises(FileNotFoundError, match="convert_resnet38d"):
        dst.load_weights(tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_text("not a torch file")
    with pytest.raises(ValueError, match="could not read weight file"):
        dst.load_weights(tmp_path / "junk.pth")


def test_from_reference_keys() -> None:
    state = {"b4_1.conv_branch2a.weight": 1, "bn7.bias": 2, "conv1a.weight": 3, "fc8.weight": 4,
             "f9.weight": 5, "backbone.b2.bn_branch2a.bias": 6}
    assert from_reference_keys(state, {"fc8": "classifier"}) == {
        "backbone.b4_1.conv_branch2a.weight": 1, "backbone.bn7.bias": 2, "backbone.conv1a.weight": 3,
        "classifier.weight": 4, "f9.weight": 5, "backbone.b2.bn_branch2a.bias": 6}


def test_mxnet_names_map_to_our_keys() -> None:
    cases = {
        "arg:conv1a_weight": "conv1a.weight",
        "arg:res2a_branch1_weight": "b2.conv_branch1.weight",
        "arg:res4b5_branch2b1_weight": "b4_5.conv_branch2b1.weight",
        "arg:bn2a_branch2a_gamma": "b2.bn_branch2a.weight",
        "arg:bn5b2_branch2b1_beta": "b5_2.bn_branch2b1.bias",
        "aux:bn6a_branch2b2_moving_mean": "b6.bn_branch2b2.running_mean",
        "aux:bn7a_branch2a_moving_var": "b7.bn_branch2a.running_var",
        "arg:res7a_branch2b2_weight": "b7.conv_branch2b2.weight",
        "arg:bn7_gamma": "bn7.weight",
        "aux:bn7_moving_var": "bn7.running_var",
        "arg:linear1000_weight": None,
    }
    assert {k: torch_key(k) for k in cases} == cases
    with pytest.raises(ValueError, match="unexpected MXNet parameter name 'arg:fc9_weight'"):
        torch_key("arg:fc9_weight")
    state = rename({"arg:conv1a_weight": np.ones((2, 3, 3, 3), np.float64),
                    "arg:linear1000_bias": np.ones(3)})
    assert list(state) == ["conv1a.weight"] and state["conv1a.weight"].dtype == torch.float32


def test_every_key_has_an_mxnet_name(full: ResNet38d) -> None:
    """Inverse check: an MXNet-style name maps to each of our 191 float keys (so a real file maps fully)."""
    bn = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_var"}
    names = []
    for key in float_keys(full):
        parts = key.split(".")
        if key == "conv1a.weight":
            names.append("arg:conv1a_weight")
        elif parts[0] == "bn7":
            names.append(f"arg:bn7_{bn[parts[1]]}")
        else:
            stage, _, idx = parts[0][1:].partition("_")
            block = f"{stage}a" if not idx else f"{stage}b{idx}"
            kind, branch = parts[1].split("_", 1)
            if kind == "conv":
                names.append(f"res{block}_{branch}_weight")
            else:
                names.append(f"bn{block}_{branch}_{bn[parts[2]]}")
    assert [torch_key(n) for n in names] == float_keys(full)
