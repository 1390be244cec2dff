"""The speed options keep results: channels_last changes nothing but memory layout."""

from __future__ import annotations

import torch

from src.callbacks.performance import ModelPerformance
from src.models.cam_net import CAMNet
from src.models.resnet import resnet
from src.stages.classification import ClassificationModule


def module() -> ClassificationModule:
    torch.manual_seed(0)
    net = CAMNet(resnet("tiny", strides=(2, 2, 2, 1)), num_classes=3)
    return ClassificationModule(net, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}, 10).eval()


def test_channels_last_same_outputs_and_batch_converted() -> None:
    plain, fast = module(), module()
    ModelPerformance(channels_last=True).setup(None, fast, "fit")
    assert fast.net.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain.net(x), fast.net(x), rtol=1e-4, atol=1e-5)
    batch = {"image": x}
    ModelPerformance(channels_last=True).on_train_batch_start(None, fast, batch, 0)
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)


def test_compile_keeps_parameter_names(monkeypatch) -> None:
    m = module()
    names = sorted(m.state_dict())
    called = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: called.append(type(self).__name__))
    cb = ModelPerformance(compile=True)
    cb.setup(None, m, "fit")
    cb.setup(None, m, "predict")  # once only
    assert called == ["CAMNet"]
    assert sorted(m.state_dict()) == names
