"""CDA's instance-bank stage on hand-made pseudo-masks, its hand-over to the classifier, and ReCAM's
training loss (src/stages/instance_bank.py, src/stages/recam.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from src.data.bundle import DataBundle
from src.data.paste import PastedDataset
from src.models.cam_net import CAMNet
from src.models.recam import ReCAM, sce_loss
from src.models.resnet import resnet
from src.stages.core import MASKS, Artifact, ParameterError, Runtime, StageContext
from src.stages.instance_bank import INSTANCES, InstanceBankStage, pasting
from src.stages.recam import ReCAMModule, ReCAMStage
from src.utils.io import load_npz, save_label_png_atomic, save_rgb_png_atomic

PASTE = {"max_angle": 90, "max_size": 0.7}


class FakeLayout:
    """What the bank stage reads of a dataset layout: ids, classes and image paths."""

    def __init__(self, root: Path, ids: list[str], labels: np.ndarray) -> None:
        self.root, self._ids, self._labels = root, tuple(ids), labels
        self.num_classes, self.class_names = 3, ["a", "b", "c"]

    def ids(self, split: str) -> tuple[str, ...]:
        return self._ids

    def labels(self, split: str) -> np.ndarray:
        return self._labels

    def image_path(self, image_id: str) -> Path:
        return self.root / "images" / f"{image_id}.png"


def bank_context(tmp_path: Path, masks: dict[str, np.ndarray], labels: np.ndarray | None = None
                 ) -> tuple[StageContext, dict[str, np.ndarray]]:
    """Images, pseudo-masks and image labels (default: the classes of each mask) of a fake train split."""
    if labels is None:
        labels = np.array([[float(k in m) for k in (1, 2, 3)] for m in masks.values()], np.float32)
    images = {}
    for i, (image_id, mask) in enumerate(masks.items()):
        images[image_id] = np.random.default_rng(i).integers(0, 255, (*mask.shape, 3), dtype=np.uint8)
        save_rgb_png_atomic(tmp_path / "images" / f"{image_id}.png", images[image_id])
        save_label_png_atomic(tmp_path / "pseudo" / MASKS / f"{image_id}.png", mask)
    layout = FakeLayout(tmp_path, list(masks), labels)
    data = DataBundle(layout=layout, train_split="train", val_split="val", eval_splits=["val"], seed_eval_split=None,
                      mean=[0.0] * 3, std=[1.0] * 3, loader={})
    pseudo = Artifact("pseudo_masks", "f" * 64, tmp_path / "pseudo", {})
    ctx = StageContext(name="instance_bank", round=0, out_dir=tmp_path / "bank", inputs={"pseudo_masks": pseudo},
                       data=data, seed=0, runtime=Runtime(trainer={}))
    return ctx, images


def test_instance_bank_keeps_single_class_masks_of_10_to_70_percent_cropped_to_their_box(tmp_path):
    one = np.zeros((10, 10), np.uint8)
    one[2:6, 3:8] = 2          # class 2, 20 % of the image, box rows 2-5, cols 3-7
    one[2, 3] = 0              # a hole inside the box
    two = np.zeros((10, 10), np.uint8)
    two[:3, :5], two[5:, 5:] = 1, 3   # two classes: dropped
    small = np.zeros((10, 10), np.uint8)
    small[0, :5] = 1           # 5 %: dropped
    large = np.full((10, 10), 3, np.uint8)
    large[0] = 0               # 90 %: dropped
    third = np.zeros((10, 10), np.uint8)
    third[5:, :] = 3           # 50 %
    third[0, 0] = 255          # unknown pixels are no class
    ctx, images = bank_context(tmp_path, {"one": one, "two": two, "small": small, "large": large, "third": third})
    stage = InstanceBankStage(min_fraction=0.1, max_fraction=0.7, single_label_images=False, paste=PASTE,
                              inputs={"pseudo_masks": "pseudo_masks"})
    result = stage.run(ctx)
    assert result["counts"] == {"2": 1, "3": 1} and result["kept"] == 2 and result["images"] == 5
    files = sorted(p.relative_to(ctx.out_dir / INSTANCES).as_posix() for p in (ctx.out_dir / INSTANCES).rglob("*.npz"))
    assert files == ["2/one.npz", "3/third.npz"]
    saved = load_npz(ctx.out_dir / INSTANCES / "2" / "one.npz")
    np.testing.assert_array_equal(saved["image"], images["one"][2:6, 3:8])
    np.testing.assert_array_equal(saved["mask"], (one[2:6, 3:8] == 2).astype(np.uint8))
    assert stage.provides() == {"paste": PASTE, "folder": INSTANCES}
    # the classifier side: the bank artifact wraps a training set into the doubled, pasted one
    provides = {**stage.provides(), **result["provides"]}
    artifact = Artifact("instance_bank", "b" * 64, ctx.out_dir, {"provides": provides})
    inner = torch.utils.data.TensorDataset(torch.zeros(1))
    inner.transform, inner.target, inner.labels = None, None, np.zeros((1, 3), np.float32)
    assert isinstance(pasting(artifact, seed=0)(inner), PastedDataset)


def test_single_label_images_keeps_instances_of_images_labelled_with_that_class_alone(tmp_path):
    rider = np.zeros((10, 10), np.uint8)
    rider[2:6, 3:8] = 1        # the pseudo-mask paints one class...
    alone = rider.copy()
    labels = np.array([[1, 1, 0], [1, 0, 0]], np.float32)  # ...but the first image is labelled with two
    ctx, _ = bank_context(tmp_path, {"pair": rider, "alone": alone}, labels)
    kept = InstanceBankStage(min_fraction=0.1, max_fraction=0.7, single_label_images=True, paste=PASTE).run(ctx)
    assert kept["counts"] == {"1": 1}
    assert [p.name for p in (ctx.out_dir / INSTANCES / "1").iterdir()] == ["alone.npz"]
    ctx2, _ = bank_context(tmp_path / "all", {"pair": rider, "alone": alone}, labels)
    assert InstanceBankStage(min_fraction=0.1, max_fraction=0.7, single_label_images=False,
                             paste=PASTE).run(ctx2)["counts"] == {"1": 2}  # the official rule: the mask alone


def test_an_empty_bank_stops_with_the_rule_named(tmp_path):
    two = np.zeros((10, 10), np.uint8)
    two[:3, :5], two[5:, 5:] = 1, 3
    ctx, _ = bank_context(tmp_path, {"two": two})
    stage = InstanceBankStage(min_fraction=0.1, max_fraction=0.7, single_label_images=False, paste=PASTE)
    with pytest.raises(ValueError, match=r"the instance bank is empty: no pseudo-mask in .* holds exactly one "
                                         r"foreground class covering 0.1-0.7 of the image"):
        stage.run(ctx)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"min_fraction": 0.8, "max_fraction": 0.7}, "min_fraction must be <= max_fraction"),
    ({"max_fraction": 1.5}, "max_fraction must be <= 1.0, got 1.5"),
    ({"single_label_images": "yes"}, "single_label_images must be true or false, got 'yes'"),
    ({"paste": {"max_angle": 90}}, r"paste must hold exactly \['max_angle', 'max_size'\]"),
    ({"paste": {"max_angle": 9.5, "max_size": 0.7}}, "paste.max_angle must be an integer"),
    ({"paste": {"max_angle": 90, "max_size": 0.0}}, r"paste.max_size must be > 0.0"),
])
def test_bank_parameters_are_checked(kwargs, message):
    with pytest.raises(ParameterError, match=message):
        InstanceBankStage(**{"min_fraction": 0.1, "max_fraction": 0.7, "single_label_images": False, "paste": PASTE,
                             **kwargs})


def test_recam_loss_is_bce_plus_lambda_times_sce():
    torch.manual_seed(0)
    net = ReCAM(CAMNet(resnet("tiny", strides=(2, 2, 2, 1)), num_classes=3), net_lr_mult=0.1)
    optim = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "poly_power": 0.9, "poly_every": 1}
    module = ReCAMModule(net, optim, max_steps=1, loss_weight=0.5)
    x, label = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    terms = module.losses(x, label, None)
    logits, feats = net.class_features(x)
    bce = F.multilabel_soft_margin_loss(logits, label)
    sce = sce_loss(net.sce_logits(feats), label)
    torch.testing.assert_close(terms["bce"], bce)
    torch.testing.assert_close(terms["sce"], sce)
    torch.testing.assert_close(terms["loss"], bce + 0.5 * sce)
    # sce_logits is W_sce applied to every class feature: row k of image b = W_sce f_k
    torch.testing.assert_close(net.sce_logits(feats)[1, 2], net.sce.weight.flatten(1) @ feats[1, 2])
    assert math.isfinite(terms["loss"].item())


def test_recam_stage_parameters_are_checked():
    net = OmegaConf.create({"_target_": "src.models.recam.ReCAM", "net_lr_mult": 0.1})
    optim = OmegaConf.create({"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "poly_power": 0.9, "poly_every": 1})
    with pytest.raises(ParameterError, match="loss_weight must be >= 0.0, got -1"):
        ReCAMStage(net=net, loss_weight=-1, epochs=1, batch_size=2, optim=optim, augment=[])
    with pytest.raises(ParameterError, match="net.net_lr_mult must be a number, got None"):
        ReCAMStage(net=OmegaConf.create({"_target_": "x"}), loss_weight=1.0, epochs=1, batch_size=2, optim=optim,
                   augment=[])
