"""Weight files: the sha256 prefix in a torchvision-style name is checked before loading
(src/models/weights.py ``read_state_dict``, the one loader of weight files)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

from src.models.resnet import load_weights, resnet
from src.models.weights import read_state_dict, sha256_prefix


def write_named(tmp_path: Path, state: dict, prefix: str | None = None) -> Path:
    """``state`` saved as resnet-<prefix>.pth, prefix = the first 8 hex digits of its sha256 by default."""
    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    digest = hashlib.sha256(plain.read_bytes()).hexdigest()
    named = tmp_path / f"resnet-{prefix or digest[:8]}.pth"
    plain.rename(named)
    return named


def test_names_declare_a_prefix_only_with_a_hex_suffix() -> None:
    assert sha256_prefix(Path("resnet50-19c8e357.pth")) == "19c8e357"
    assert sha256_prefix(Path("/w/resnet101-63fe2227.pth")) == "63fe2227"
    assert sha256_prefix(Path("resnet38d_ilsvrc.pth")) is None
    assert sha256_prefix(Path("deeplab-init.pth")) is None      # not hex
    assert sha256_prefix(Path("resnet50-beef.pth")) is None     # fewer than 8 digits: not a hash


def test_a_file_matching_its_name_loads(tmp_path: Path) -> None:
    net = resnet(depth="tiny", norm="batch")
    path = write_named(tmp_path, net.state_dict())
    other = resnet(depth="tiny", norm="batch")
    load_weights(other, path, ignore=())
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))


def test_a_file_that_is_not_the_one_its_name_declares_is_refused(tmp_path: Path) -> None:
    state = {"w": torch.arange(6.0)}
    good = write_named(tmp_path, state)
    actual = good.name.split("-")[1][:8]
    bad = good.with_name("resnet50-19c8e357.pth")
    good.rename(bad)
    with pytest.raises(ValueError) as info:
        read_state_dict(bad)
    msg = str(info.value)
    assert str(bad) in msg and "19c8e357" in msg and f"sha256 starts with {actual}" in msg
    assert "Download it again" in msg
    # a truncated download under the right name is caught the same way
    truncated = tmp_path / "trunc.pth"
    truncated.write_bytes(bad.read_bytes()[:-10])
    named = tmp_path / f"resnet-{actual}.pth"
    truncated.rename(named)
    with pytest.raises(ValueError, match=re.escape(f"the name says {actual}")):
        read_state_dict(named)


def test_names_without_a_hash_are_not_checked(tmp_path: Path) -> None:
    path = tmp_path / "resnet38d_ilsvrc.pth"
    torch.save({"w": torch.ones(2)}, path)
    assert torch.equal(read_state_dict(path)["w"], torch.ones(2))
