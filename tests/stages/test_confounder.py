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


class FixedSegmentation(torch.nn.Module):
    """A 'segmentation model' that predicts class 1 everywhere (K = 2 + background)."""

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        p = torch.zeros(images.shape[0], 3, *images.shape[2:])
        p[:, 1] = 1.0
        return p


def confounder_payload(from_truth: bool) -> dict:
    from src.stages.confounder_set import ConfounderPrediction

    mask = torch.zeros(4, 4, dtype=torch.long)
    mask[:2, 2:] = 2  # class 2 in the top-right quarter, one pixel ignored
    mask[3, 3] = 255
    sample = {"id": "a", "image": torch.zeros(3, 4, 4), "mask": mask, "label": torch.tensor([0.0, 1.0])}
    module = ConfounderPrediction(FixedSegmentation(), 2, (2, 2), soft=False, soft_image_mask=True,
                                  use_targets=False, image_masks_from_targets=from_truth)
    ((image_id, payload),) = module.predict_step([sample], 0)
    return payload


def test_image_masks_from_the_ground_truth_replace_x_m_but_not_c() -> None:
    model, truth = confounder_payload(False), confounder_payload(True)
    every_cell_class_1 = torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.ones(2, 2), torch.zeros(2, 2)
    for payload in (model, truth):  # C is the model's in both
        torch.testing.assert_close(payload["class_masks"], torch.stack(every_cell_class_1))
    assert model["label_map"].tolist() == [[1, 1], [1, 1]]
    assert truth["label_map"].tolist() == [[0, 2], [0, 0]]  # the ignored pixel counts for no class
    assert truth["probs"][:, 1, 1].tolist() == [0.75, 0.0, 0.0]


def test_ground_truth_image_masks_refuse_pseudo_mask_source() -> None:
    from src.stages.confounder_set import ConfounderSetStage
    from src.stages.core import ParameterError

    with pytest.raises(ParameterError, match="image_masks=ground_truth .* use source=segmentation"):
        ConfounderSetStage({"soft_image_mask": False}, "pseudo_masks", None, False, 1, image_masks="ground_truth")
