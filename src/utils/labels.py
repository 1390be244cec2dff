"""Label-map conventions shared by every package: 0 = background, 1..K = classes, ``IGNORE`` = unknown
(object borders, padding, unconfident pixels); and the PASCAL VOC colour map that draws them
(class id i in colour ``voc_palette()[i]``)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

IGNORE = 255  # VOC's ignore label: never a class, never scored


@lru_cache(maxsize=1)
def voc_palette() -> np.ndarray:
    """(256, 3) uint8: the standard VOC palette (bit-interleaved label index; 255 = (224, 224, 192))."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for label in range(256):
        r = g = b = 0
        c = label
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[label] = (r, g, b)
    palette.flags.writeable = False
    return palette


def colorize(label: np.ndarray) -> np.ndarray:
    """RGB picture (H, W, 3) of a label map."""
    return voc_palette()[label]
