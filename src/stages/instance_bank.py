"""CDA's instance bank (../shared/specs/debias.md): object instances cut from a round's pseudo-masks, which
the next round's classifier pastes into its training images (src/data/paste.py).

Output: ``instances/<class id>/<image id>.npz`` (``image``: the uint8 pixels of the mask's bounding box,
``mask``: its binary mask), one per train image whose pseudo-mask holds exactly one foreground class
covering ``[min_fraction, max_fraction]`` of the image (with ``single_label_images``, not in the official
code, also only images labelled with that class alone: a pseudo-mask that paints a labelled companion with
the kept class, e.g. a horse as rider, then gives no instance). The manifest provides the paste options (``paste``)
and the number of instances per class (``counts``); the classification stage reads both through
:func:`pasting`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch.utils.data import Dataset

from src.data.paste import PASTE_OPTIONS, InstanceBank, PastedDataset, crop_instance, select_instance
from src.stages.core import MASKS, Artifact, ParameterError, Stage, StageContext, check_number, container
from src.utils import dist
from src.utils.io import read_image, read_label, save_npz_atomic
from src.utils.logging import get_logger

log = get_logger(__name__)

INSTANCES = "instances"  # the bank's folder in its artifact


class InstanceBankStage(Stage):
    """Builds the instance bank from the ``pseudo_masks`` input over the train split (module docstring)."""

    def __init__(self, min_fraction: float, max_fraction: float, single_label_images: bool, paste: Mapping[str, Any],
                 inputs: Mapping[str, str] | None = None) -> None:
        super().__init__(inputs)
        check_number("min_fraction", min_fraction, 0.0, 1.0)
        check_number("max_fraction", max_fraction, 0.0, 1.0)
        if min_fraction > max_fraction:
            raise ParameterError(f"min_fraction must be <= max_fraction, got {min_fraction} > {max_fraction}")
        paste = dict(container(paste))
        if sorted(paste) != sorted(PASTE_OPTIONS):
            raise ParameterError(f"paste must hold exactly {list(PASTE_OPTIONS)}, got {sorted(paste)}")
        check_number("paste.max_angle", paste["max_angle"], 0, 180, integer=True)
        check_number("paste.max_size", paste["max_size"], 0.0, 1.0, low_open=True)
        self.paste = paste
        if not isinstance(single_label_images, bool):
            raise ParameterError(f"single_label_images must be true or false, got {single_label_images!r}")
        self.min_fraction, self.max_fraction, self.single_label = min_fraction, max_fraction, single_label_images

    def provides(self) -> dict[str, Any]:
        return {"paste": dict(self.paste), "folder": INSTANCES}

    def run(self, ctx: StageContext) -> dict[str, Any]:
        layout, split = ctx.data.layout, ctx.data.train_split
        masks = ctx.input("pseudo_masks").file(MASKS)
        out = ctx.out_dir / INSTANCES
        out.mkdir(parents=True, exist_ok=True)
        ids = layout.ids(split)
        labels = dict(zip(ids, layout.labels(split))) if self.single_label else {}
        rank, world = dist.global_rank(), dist.world_size()
        for image_id in ids[rank::world]:  # each rank writes its own shard of the files
            mask = read_label(masks / f"{image_id}.png")
            k = select_instance(mask, layout.num_classes, self.min_fraction, self.max_fraction)
            if k is None or (self.single_label and [int(c) + 1 for c in labels[image_id].nonzero()[0]] != [k]):
                continue
            target = out / str(k) / f"{image_id}.npz"
            if target.is_file():  # written before an interruption
                continue
            pixels, binary = crop_instance(read_image(layout.image_path(image_id)), mask, k)
            save_npz_atomic(target, image=pixels, mask=binary.astype("uint8"))
        dist.barrier()
        counts = {str(k): n for k, n in InstanceBank(out).counts().items()}
        total = sum(counts.values())
        names = ctx.data.class_names
        log.info(f"instance bank: {total} of {len(ids)} train images kept "
                 f"({', '.join(f'{names[int(k)]} {n}' for k, n in counts.items()) or 'none'})")
        if total == 0:
            raise ValueError(
                f"the instance bank is empty: no pseudo-mask in {masks} holds exactly one foreground class covering "
                f"{self.min_fraction:g}-{self.max_fraction:g} of the image; CDA has nothing to paste (widen "
                "debias.instance_bank.min_fraction / max_fraction, or check the pseudo-masks)")
        return {"summary": {}, "counts": counts, "kept": total, "images": len(ids),
                "provides": {"counts": counts}}


def pasting(instances: Artifact, seed: int) -> Callable[[Any], Dataset]:
    """Wraps a classification training dataset with CDA's pasting from an instance-bank artifact."""
    bank = InstanceBank(instances.file(str(instances.need("folder"))))
    options = instances.need("paste")
    return lambda dataset: PastedDataset(dataset, bank, options, seed)
