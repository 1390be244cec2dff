"""``profile=paper`` end to end on real VOC files (../shared/data/voc_samples): the papers' backbones
(ResNet-50, ResNet-101, ResNet-38d full), freezing rules, optimiser quirks and the reference options of
issue 17, on random weight files written by our own builders in torchvision's and the converted
ResNet-38d layout (named with their sha256 prefix, as torchvision names its files, so the check runs).

Shrunk so CPU CI runs it in minutes: 2 train and 2 val images (the sample files, their own lists), crops
64-96, one epoch or two steps per training stage, seed scales [1.0, 0.5] (IRNet) and [0.5] (SEAM). Nothing
else deviates from the paper profile. About 2 minutes on one core."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from checks import assert_scores_match_files
from conftest import compose_config, shared_path

from src.models.resnet import resnet
from src.models.resnet38d import resnet38d
from src.pipeline.pipeline import run_pipeline
from src.pipeline.validate import finalize
from src.utils.io import load_npz, read_image, read_label

pytestmark = pytest.mark.slow

TRAIN, VAL = ["2007_000032", "2007_000039"], ["2007_000033", "2007_000042"]
SHRINK = {
    "irnet": ["profile.cam.epochs=1", "profile.cam.batch_size=2", "profile.cam.crop=64",
              "profile.cam.long_side=[64,96]", "profile.irn.epochs=1", "profile.irn.batch_size=2",
              "profile.irn.crop=96",  # IRN's radius 10 at stride 4 needs >= 80 px
              "baseline.seeds.scales=[1.0,0.5]"],
    "seam": ["profile.seam.epochs=1", "profile.seam.batch_size=2", "profile.seam.crop=64",
             "profile.seam.long_side=[64,96]", "profile.affinity.epochs=1", "profile.affinity.batch_size=2",
             "profile.affinity.crop=72",  # AffinityNet r = 5 needs a 9-cell-wide grid
             "baseline.seeds.scales=[0.5]"],  # ResNet-38d at full width: ~9 s per 500 x 375 pass on one core
}
COMMON = ["profile.deeplab.max_steps=2", "profile.deeplab.batch_size=2", "profile.deeplab.crop=64",
          "data.loader.num_workers=0", "data.loader.pin_memory=false",
          "data.loader.persistent_workers=false", "progress=none", "print_config=false"]
LABELS = {"irnet": ("cls_labels.npy",), "seam": ("psa_seam_format", "cls_labels.npy")}  # both formats


def sample_root(tmp_path: Path) -> Path:
    """A VOC root over the shared sample files with its own 2 + 2 image lists."""
    voc = shared_path("data", "voc_samples", "VOCdevkit", "VOC2012")
    root = tmp_path / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug"):
        (root / folder).symlink_to(voc / folder)
    for split, ids in (("train", TRAIN), ("val", VAL)):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def save_named(state: dict, folder: Path, name: str) -> Path:
    """``state`` saved as <name>-<first 8 hex digits of its sha256>.pth (torchvision's naming)."""
    tmp = folder / f"{name}.tmp"
    torch.save(state, tmp)
    path = folder / f"{name}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(path)
    return path


def torchvision_layout(depth: int) -> dict[str, torch.Tensor]:
    """A random ResNet in torchvision's file layout: our builder's keys (torchvision's names) plus the
    ImageNet head, without the BN counters the "V1" files predate."""
    state = {k: v for k, v in resnet(depth=depth).state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.randn(1000, 2048) * 0.01
    state["fc.bias"] = torch.zeros(1000)
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    converted = {k: v for k, v in resnet38d("full").state_dict().items() if not k.endswith("num_batches_tracked")}
    return {"resnet50": save_named(torchvision_layout(50), folder, "resnet50"),
            "resnet101": save_named(torchvision_layout(101), folder, "resnet101"),
            "resnet38d": save_named(converted, folder, "resnet38d")}


def checkpoint(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return torch.load(run / "round_0" / stage / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("baseline", ["irnet", "seam"])
def test_paper_profile_runs_end_to_end(tmp_path: Path, weights: dict[str, Path], baseline: str) -> None:
    root = sample_root(tmp_path)
    labels = shared_path("data", "voc_samples", "lists", *LABELS[baseline])
    cfg = finalize(compose_config([
        f"+baseline={baseline}", "profile=paper", "data=voc12", f"data.root={root}", f"data.labels_file={labels}",
        "data.train_split=train", "data.seed_eval_split=train",
        *[f"paths.weights.{name}={path}" for name, path in weights.items()], *SHRINK[baseline], *COMMON], tmp_path))
    results = run_pipeline(cfg, tmp_path / "run")
    summary = json.loads(results.write().read_text())["rounds"][0]["summary"]
    assert {"classification/val/map", "seeds/train/seed_best_miou", "pseudo_masks/train/mask_miou",
            "segmentation/val/miou"} <= set(summary)
    assert_scores_match_files(results)  # the paper profile's reported scores are those of its files
    run = tmp_path / "run"

    # the weight files were loaded, and the paper's freezing kept what it freezes
    if baseline == "irnet":
        stem = torch.load(weights["resnet50"], weights_only=True)["conv1.weight"]
        assert torch.equal(checkpoint(run, "classification")["net.backbone.conv1.weight"], stem)  # freeze_stem
    else:
        stem = torch.load(weights["resnet38d"], weights_only=True)["conv1a.weight"]
        assert torch.equal(checkpoint(run, "classification")["net.backbone.conv1a.weight"], stem)
        assert torch.equal(checkpoint(run, "affinity")["net.backbone.conv1a.weight"], stem)
    bn = torch.load(weights["resnet101"], weights_only=True)["layer3.5.bn2.running_var"]
    assert torch.equal(checkpoint(run, "segmentation")["net.backbone.layer3.5.bn2.running_var"], bn)  # norm: frozen

    for image_id in TRAIN:
        size = read_image(root / "JPEGImages" / f"{image_id}.jpg").shape[:2]
        seeds = load_npz(run / "round_0" / "seeds" / "cams" / f"{image_id}.npz")
        assert seeds["high_res"].dtype == np.float32 and seeds["high_res"].shape[1:] == size  # dtype: float32
        mask = read_label(run / "round_0" / "pseudo_masks" / "masks" / f"{image_id}.png")
        assert mask.shape == size and set(np.unique(mask)) - {0} <= set(seeds["keys"].tolist())
