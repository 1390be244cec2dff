"""Benchmark: the classification stage's training data pipeline alone (WSSSDataset + albumentations).

Why: with a fast GPU step the loader can become the bottleneck; this measures how many training
samples per second the classification stage's pipeline delivers with ``--workers`` loader processes:
JPEG decode, the stage config's augmentation list (random long-side resize, normalise, flip, random
crop with padding), per-sample seeding, collation, through WSSSDataModule's train loader. The data is a
synthetic set generated into a temporary folder with ``src.data.synthetic.generate`` (JPEGs in the VOC
layout). Reference mode: IRNet's VOC12ClassificationDataset pipeline on the same files (PIL decode,
PIL bicubic long-side resize, numpy normalise / flip / padded random crop), same DataLoader settings.
``--size`` is the side of the generated images (default: 96 tiny, 448 paper ~ VOC), the crop is the
profile's. ``--iters`` batches are timed (``--repeats`` times, median) after ``--warmup`` batches (worker
start-up).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from experiments.bench import common

NAME = "data_loader"
PAPER_IMAGE = 448


def parser() -> argparse.ArgumentParser:
    p = common.build_parser(NAME, __doc__.splitlines()[0],
                            "side of the generated images in px (default: 96 tiny, 448 paper)",
                            "samples per batch (default: the profile's classification batch)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    return p


class ReferenceClassificationDataset(Dataset):
    """IRNet's classification training pipeline (voc12/dataloader.py + misc/imutils.py), for comparison."""

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, long_side: tuple[int, int], crop: int,
                 mean: Sequence[float], std: Sequence[float], seed: int) -> None:
        self.paths, self.labels, self.long_side, self.crop = list(paths), labels, long_side, crop
        self.mean, self.std, self.seed = np.asarray(mean, np.float32), np.asarray(std, np.float32), seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from PIL import Image

        rng = np.random.default_rng([self.seed, index])
        img = Image.open(self.paths[index]).convert("RGB")
        w, h = img.size
        scale = int(rng.integers(self.long_side[0], self.long_side[1] + 1)) / max(h, w)
        img = img.resize((math.ceil(w * scale), math.ceil(h * scale)), Image.BICUBIC)
        arr = (np.asarray(img, np.float32) / 255.0 - self.mean) / self.std
        if rng.random() < 0.5:
            arr = np.fliplr(arr)
        h, w = arr.shape[:2]
        c = self.crop
        out = np.zeros((c, c, 3), np.float32)
        y0, x0 = int(rng.integers(0, max(h - c, 0) + 1)), int(rng.integers(0, max(w - c, 0) + 1))
        oy, ox = int(rng.integers(0, max(c - h, 0) + 1)), int(rng.integers(0, max(c - w, 0) + 1))
        ch, cw = min(c, h), min(c, w)
        out[oy:oy + ch, ox:ox + cw] = arr[y0:y0 + ch, x0:x0 + cw]
        return {"img": torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))),
                "label": torch.from_numpy(self.labels[index].astype(np.float32))}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from src.data.datamodule import WSSSDataModule
    from src.data.datasets import WSSSDataset
    from src.data.synthetic import SyntheticSpec, generate
    from src.data.transforms import build_transform
    from src.data.voc import VOCLayout

    cfg = common.compose_config(args.backbone)
    spec = cfg.baseline.classification
    args.device = "cpu"
    s = common.settings_from(NAME, args, int(spec.batch_size), PAPER_IMAGE if args.backbone == "paper"
                             else int(cfg.data.layout.spec.image_size))
    workers = max(0, int(args.workers))
    n_images = s.batch * (s.warmup + s.iters * s.repeats)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        data_spec = SyntheticSpec(image_size=s.size, num_train=n_images, num_val=1, num_val_deconfounded=1,
                                  seed=s.seed)
        generate(data_spec, Path(tmp))
        layout = VOCLayout(tmp, data_spec.class_names)
        with common.PeakMemory(s.device) as mem:
            if s.reference:
                ids = layout.ids("train")
                dataset = ReferenceClassificationDataset(
                    [layout.image_path(i) for i in ids], layout.labels("train"),
                    tuple(int(v) for v in cfg.profile.cam.long_side), int(spec.crop_size),
                    list(cfg.data.mean), list(cfg.data.std), s.seed)
                loader = DataLoader(dataset, batch_size=s.batch, shuffle=True, drop_last=True, num_workers=workers,
                                    generator=torch.Generator().manual_seed(s.seed))
            else:
                dataset = WSSSDataset(layout, "train", build_transform(spec.augment), seed=s.seed)
                loader = WSSSDataModule(dataset, batch_size=s.batch, num_workers=workers,
                                        seed=s.seed).train_dataloader()
            batches = iter(loader)
            for _ in range(s.warmup):
                next(batches)
            blocks = []
            for _ in range(s.repeats):
                start = time.perf_counter()
                for _ in range(s.iters):
                    next(batches)
                blocks.append(time.perf_counter() - start)
            seconds = common.Timing(blocks)
            del batches
    return common.make_result(s, s.batch * s.iters, seconds, mem, workers=workers, crop=int(spec.crop_size),
                              note="samples/s of the loader alone; worker memory not included")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.main(f"experiments.bench.{NAME}", parser(), run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
