"""CONTA's confounder set: class averages by hand, the stage's artifact, and resuming round r+1 from it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from src.callbacks.confounder_set import ConfounderSetCallback
from src.models.conta import NORMALIZE_MODES, ContextAdjustment
from src.pipeline.pipeline import plan, run_pipeline
from src.pipeline.validate import finalize
from src.stages.confounder_set import area_resize


def test_class_averages_by_hand() -> None:
    """Two classes, 2x2 masks: c_1 averages images 0 and 1 (they carry class 1), c_2 only image 2."""
    cb = ConfounderSetCallback(num_classes=2, size=(2, 2))
    bg = torch.zeros(2, 2)
    m0 = torch.stack([bg, torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.zeros(2, 2)])
    m1 = torch.stack([bg, torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.zeros(2, 2)])
    m2 = torch.stack([bg, torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])])
    cb.add(m0, torch.tensor([1.0, 0.0]))
    cb.add(m1, torch.tensor([1.0, 0.0]))
    cb.add(m2, torch.tensor([0.0, 1.0]))  # class 1 predicted here but not in the labels: not counted
    c = cb.reduce()
    torch.testing.assert_close(c[0], torch.tensor([[1.0, 0.5], [0.0, 0.0]]))
    torch.testing.assert_close(c[1], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    assert cb.counts.tolist() == [2.0, 1.0]


def test_class_never_labelled_stays_zero() -> None:
    cb = ConfounderSetCallback(num_classes=3, size=(1, 1))
    cb.add(torch.ones(4, 1, 1), torch.tensor([1.0, 0.0, 0.0]))
    assert cb.reduce()[:, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_area_resize_gives_covered_fractions() -> None:
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1
    mask[0, 2, 2] = 1
    torch.testing.assert_close(area_resize(mask, (2, 2))[0], torch.tensor([[1.0, 0.0], [0.0, 0.25]]))


def test_normalize_max_keeps_the_pattern() -> None:
    c = torch.rand(3, 4, 4)
    paper = ContextAdjustment(c, "foreground", "none")
    scaled = ContextAdjustment(c, "foreground", "max")
    scaled.load_state_dict(paper.state_dict())
    x = torch.rand(2, 16)
    m, s = paper(x), scaled(x)
    assert torch.allclose(s.flatten(1).amax(1), torch.ones(2))
    torch.testing.assert_close(s, m / m.flatten(1).amax(1).view(-1, 1, 1, 1))
    assert "max" in NORMALIZE_MODES


def test_conta_off_plans_exactly_the_baseline(make_cfg) -> None:
    off = plan(finalize(make_cfg("+baseline=irnet")))
    assert len(off) == 1
    assert [s.name for s in off[0]] == ["classification", "seeds", "ir_labels", "irn", "pseudo_masks", "segmentation"]
    assert all("context" not in s.inputs for s in off[0])


@pytest.mark.slow
def test_round_one_resumes_from_the_saved_confounder_set(make_cfg, tmp_path: Path) -> None:
    cfg = finalize(make_cfg("+baseline=irnet", "+conta=on", "conta.rounds=1", "progress=none"))
    first = run_pipeline(cfg, tmp_path / "a")
    # lose everything of round 1 (as if the run had been killed right after saving C)
    for info in first.rounds[1]["stages"].values():
        for path in sorted(Path(info["artifact"]).rglob("*"), reverse=True):
            path.unlink() if path.is_file() or path.is_symlink() else path.rmdir()
        Path(info["artifact"]).rmdir()
    second = run_pipeline(cfg, tmp_path / "b")
    assert all(info["reused"] for info in second.rounds[0]["stages"].values())  # incl. confounder_set
    assert not second.rounds[1]["stages"]["classification"]["reused"]
    c_path = Path(second.rounds[0]["stages"]["confounder_set"]["artifact"]) / "confounder_set.pt"
    saved = torch.load(c_path, weights_only=True)
    stride = math.prod(cfg.profile.cam.backbone.strides) * 2  # conv1, layer2-4, and the stem's max pool
    side = cfg.profile.cam.crop // stride
    assert saved["confounders"].shape == (6, side, side)  # n classes x (crop / the classifier's output stride)^2
    assert second.summary(1) == first.summary(1)  # the same C gives the same round 1
