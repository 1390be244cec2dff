"""Loading weights strictly: every key must match, or the run stops with the keys listed.

Used for ImageNet backbone files, converted reference checkpoints and our own stage checkpoints (the
reference code loads non-strictly and can silently train with random layers; specs/deeplab.md).
A file named as torchvision names its downloads (``resnet50-19c8e357.pth``: the first hex digits of the
file's sha256 after the last ``-``) is checked against that prefix first: a truncated, corrupted or
foreign file is the most common weight complaint, and it otherwise fails late or not at all.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn as nn

from src.utils.logging import get_logger

log = get_logger(__name__)

# torchvision / torch.hub file names: <name>-<first 8+ hex digits of the sha256>.<ext> (torch.hub's rule)
HASH_SUFFIX = re.compile(r"-([0-9a-f]{8,64})\.")


def sha256_prefix(path: Path) -> str | None:
    """The sha256 prefix a file's name declares (``resnet50-19c8e357.pth`` -> ``19c8e357``), or None."""
    match = HASH_SUFFIX.search(Path(path).name)
    return match.group(1) if match else None


def check_sha256_prefix(path: Path) -> None:
    """Stop with a clear message when a file's sha256 does not start with the prefix its name declares
    (names without such a suffix are not checked)."""
    prefix = sha256_prefix(path)
    if prefix is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    actual = digest.hexdigest()
    if not actual.startswith(prefix):
        raise ValueError(
            f"weight file {path} is not the file its name declares: its sha256 starts with {actual[:len(prefix)]}, "
            f"the name says {prefix} (a truncated or corrupted download, or another file under this name). "
            "Download it again (torchvision's URL ends in the same file name); a file of your own must not end "
            "in -<hex digits>")


def read_state_dict(path: str | Path, hint: str = "") -> dict[str, torch.Tensor]:
    """A state dict from a local torch file (a plain state dict or a checkpoint holding ``state_dict``),
    read as data only (``weights_only=True``), after the name's sha256 check (:func:`check_sha256_prefix`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path} (set the path in conf/paths or on the command line; "
                                f"nothing is downloaded at run time{'; ' + hint if hint else ''})")
    check_sha256_prefix(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"could not read weight file {path}: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"weight file {path} does not hold a state dict")
    return state


def mismatch_report(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                    expected: set[str] | None = None) -> str | None:
    """The missing / unexpected / shape-mismatching keys of ``state`` against ``own``, or None."""
    expected = set(own) if expected is None else expected
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in expected & set(state) if tuple(state[k].shape) != tuple(own[k].shape))

    def show(items: list[str]) -> str:
        return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

    parts = [f"{title}: {show(items)}" for title, items in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if items]
    return "; ".join(parts) or None


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state dict",
                      keys: Iterable[str] | None = None, hint: str = "") -> None:
    """Load ``state`` into ``model`` checking every key of ``keys`` (default: all of the model's).

    BN ``num_batches_tracked`` counters may be absent (MXNet conversions have none; they are only read
    when BN momentum is None): those are set to 0. Model keys outside ``keys`` are left untouched.
    """
    own = model.state_dict()
    expected = set(own) if keys is None else set(keys)
    state = dict(state)
    for k in expected - set(state):
        if k.endswith("num_batches_tracked"):
            state[k] = torch.zeros_like(own[k])
    report = mismatch_report(own, state, expected)
    if report:
        raise ValueError(f"{source} does not fit {type(model).__name__}{' ' + hint if hint else ''}: {report}")
    model.load_state_dict(state, strict=keys is None)
    log.info(f"loaded {len(state)} tensors from {source}")
