"""Is CONTA's context prior M used by the classifier? Diagnostics of one run's round-r classifier.

    python -m experiments.conta_synthetic.diagnose RUN_DIR [ROUND] [DATA_ROOT]

Prints: how far the attention alpha is from uniform (max weight, entropy vs log n), how much M varies
between images, the classifier's weight on the M channel relative to the feature channels, and how much
the logits and CAMs change when M is replaced by zeros or by another image's M.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import albumentations as A
import torch
from omegaconf import OmegaConf

from src.data.datasets import WSSSDataset
from src.data.voc import VOCLayout
from src.models.conta import image_mask_vector
from src.pipeline.artifacts import ArtifactStore
from src.stages.classification import load_classifier


@torch.no_grad()
def main(run_dir: str, round_index: str = "1", data_root: str | None = None) -> None:
    run = Path(run_dir)
    r = int(round_index)
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    cls_art = ArtifactStore.read((run / f"round_{r}" / "classification").resolve())
    ctx_art = ArtifactStore.read((run / f"round_{r - 1}" / "confounder_set").resolve())
    if cls_art is None or ctx_art is None:
        raise SystemExit(f"{run}: round {r} has no finished classification or round {r - 1} no confounder set")
    # the net from the config its manifest provides, CONTA's context enabled from the confounder set's
    # options, both loaded strictly from the checkpoint, in eval mode
    net, prior, masks = load_classifier(cls_art, ctx_art)
    root = Path(data_root or json.loads((run / "results.json").read_text())["data_root"])
    layout = VOCLayout(root, list(cfg.data.layout.spec.class_names))
    ds = WSSSDataset(layout, "val", A.Compose([A.Normalize(mean=list(cfg.data.mean), std=list(cfg.data.std))]),
                     extras=[masks])
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    cmask = torch.stack([ds[i]["context_mask"] for i in range(len(ds))])
    x_m = image_mask_vector(cmask, prior.adjust.num_classes, prior.image_mask)
    alpha = prior.adjust.attention(x_m)
    m = prior(cmask)
    n = alpha.shape[1]
    entropy = float(-(alpha * alpha.clamp_min(1e-12).log()).sum(1).mean())
    w = net.classifier.weight[:, :, 0, 0]
    feats = net.features(images, m)
    contrib_m = (feats[:, -1:].mean((2, 3)) @ w[:, -1:].t()).abs().mean()
    contrib_f = (w[:, :-1] @ feats[:, :-1].mean((2, 3)).t()).abs().mean()
    logits = net(images, m)
    logits_zero = net(images, torch.zeros_like(m))
    logits_shuf = net(images, m.roll(1, 0))
    cams = net.cams(images, m).relu()
    cams_zero = net.cams(images, torch.zeros_like(m)).relu()
    print(f"round {r} classifier ({len(ds)} val images)")
    print(f"attention: mean max alpha {alpha.max(1).values.mean():.3f} (uniform 1/n = {1 / n:.3f}); "
          f"entropy {entropy:.3f} (uniform log n = {math.log(n):.3f})")
    print(f"M: mean {m.mean():.4f}, std over images of the per-pixel value {m.std(0).mean():.5f}, "
          f"std over pixels {m.std((1, 2, 3)).mean():.5f}")
    print(f"classifier weight |w_M| mean {w[:, -1].abs().mean():.4f} vs |w_feature| mean {w[:, :-1].abs().mean():.4f}")
    print(f"mean |logit contribution| of M {contrib_m:.4f} vs of the features {contrib_f:.4f}")
    print(f"logit change: M -> 0: {(logits - logits_zero).abs().mean():.4f}; M -> another image's M: "
          f"{(logits - logits_shuf).abs().mean():.5f}; mean |logit| {logits.abs().mean():.3f}")
    rel = ((cams - cams_zero).abs().sum() / cams.abs().sum()).item()
    print(f"CAM change when M -> 0: {100 * rel:.1f}% of the CAM mass")


if __name__ == "__main__":
    main(*sys.argv[1:4])
