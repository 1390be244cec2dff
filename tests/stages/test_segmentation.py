"""Segmentation evaluation: test-time MSC takes the max branch, flip averages, CRF post-processing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from src.models.deeplab import msc_forward, predict_probs
from src.stages.segmentation import SegmentationModule


class Probe(torch.nn.Module):
    """Output stride 2: logits = avg-pooled first two channels (so mirror images give mirror outputs)."""

    def forward(self, x):
        return F.avg_pool2d(x[:, :2], 2)


def test_single_scale_probabilities_are_softmax_of_upsampled_logits() -> None:
    x = torch.randn(2, 3, 8, 12)
    expected = torch.softmax(F.interpolate(Probe()(x), (8, 12), mode="bilinear", align_corners=False), 1)
    torch.testing.assert_close(predict_probs(Probe(), x), expected)


def test_msc_uses_the_max_branch_and_flip_averages_logits() -> None:
    x = torch.randn(1, 3, 16, 16)
    outs = msc_forward(Probe(), x, [1.0, 0.5])
    logits = F.interpolate(outs[-1], (16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(predict_probs(Probe(), x, [1.0, 0.5]), torch.softmax(logits, 1))
    outs_f = msc_forward(Probe(), x.flip(-1), [1.0, 0.5])
    logits_f = F.interpolate(outs_f[-1], (16, 16), mode="bilinear", align_corners=False).flip(-1)
    torch.testing.assert_close(predict_probs(Probe(), x, [1.0, 0.5], flip=True),
                               torch.softmax((logits + logits_f) / 2, 1))


def test_predict_step_labels_with_and_without_crf() -> None:
    image = torch.zeros(3, 24, 24)
    image[0, :, 12:] = 3.0  # right half: channel 0 wins -> label 0; left half: channel 1 wins -> label 1
    image[1, :, :12] = 3.0
    raw = torch.zeros(24, 24, 3, dtype=torch.uint8)
    raw[:, 12:] = 200
    sample = {"id": "a", "image": image, "raw": raw}
    no_crf = {"msc": False, "scales": [1.0], "flip": False, "crf": None, "batch_size": 1}
    plain = SegmentationModule(Probe(), [1.0], {}, 1, no_crf)
    (image_id, labels), = plain.predict_step([sample], 0)
    assert image_id == "a" and labels[:, :10].max() == 1 and labels[:, 14:].max() == 0
    crf = {"iterations": 5, "gaussian": {"sxy": 1, "compat": 3}, "bilateral": {"sxy": 67, "srgb": 3, "compat": 4}}
    refined = SegmentationModule(Probe(), [1.0], {}, 1, {**no_crf, "crf": crf})
    (_, labels_crf), = refined.predict_step([sample], 0)
    assert (labels_crf[:, :10] == 1).all() and (labels_crf[:, 14:] == 0).all()
