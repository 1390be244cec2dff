"""IRNet's IR labels on a hand-made CAM: confident foreground / background and 255 elsewhere."""

from __future__ import annotations

import numpy as np

from src.ops.labels import confident_labels, ir_label

# two classes (ids 3 and 5) on a 1 x 6 strip of scores
SCORES = np.array([
    [[0.90, 0.40, 0.20, 0.04, 0.00, 0.00]],   # class 3
    [[0.10, 0.10, 0.25, 0.02, 0.50, 0.06]],   # class 5
], np.float32)
KEYS = np.array([3, 5])


def test_confident_labels_without_crf() -> None:
    # background plane at 0.30: foreground wherever a class score beats it, else 0
    assert confident_labels(SCORES, KEYS, 0.30, None, None).tolist() == [[3, 3, 0, 0, 5, 0]]
    # at 0.05 almost everything is foreground
    assert confident_labels(SCORES, KEYS, 0.05, None, None).tolist() == [[3, 3, 5, 0, 5, 5]]


def test_ir_label_rules() -> None:
    # fg map (0.30): 3 3 0 0 5 0 ; bg map (0.05): 3 3 5 0 5 5
    # -> classes from the fg map, 0 where both say background, 255 where they disagree
    out = ir_label(SCORES, KEYS, None, conf_fg=0.30, conf_bg=0.05, crf=None)
    assert out.dtype == np.uint8
    assert out.tolist() == [[3, 3, 255, 0, 5, 255]]


def test_image_without_classes_is_all_background() -> None:
    empty = np.zeros((0, 2, 3), np.float32)
    assert (ir_label(empty, np.array([], int), None, 0.3, 0.05, None) == 0).all()


def test_crf_keeps_a_clear_layout() -> None:
    """With the CRF (IRNet's settings) a large, well-separated object keeps its label and surroundings."""
    image = np.zeros((40, 40, 3), np.uint8)
    image[10:30, 10:30] = (220, 30, 30)
    scores = np.zeros((1, 40, 40), np.float32)
    scores[0, 12:28, 12:28] = 0.9
    crf = {"iterations": 10, "gt_prob": 0.7, "gaussian": {"sxy": 3, "compat": 3},
           "bilateral": {"sxy": 50, "srgb": 5, "compat": 10}}
    out = ir_label(scores, np.array([2]), image, 0.30, 0.05, crf)
    assert out[20, 20] == 2 and out[0, 0] == 0 and out[39, 39] == 0
    assert set(np.unique(out)) <= {0, 2, 255}
