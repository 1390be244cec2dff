"""IRNet / psa / SEAM ``cls_labels.npy`` files are pickles; ``read_labels_file`` rebuilds numpy arrays and
nothing else, so a crafted file is refused before any of its code runs."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path

from src.data.voc import VOC_CLASSES, VOCLayout, read_labels_file


class WritesAFile:
    """Unpickled, this object calls open(marker, "w"): a payload that leaves a trace if it ever runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["cls_labels.npy", "psa_seam_format/cls_labels.npy"])
def test_both_reference_formats_load(name: str) -> None:
    """irn's int keys (numpy int32 scalars) and psa/SEAM's str keys: 12,031 float32 vectors of 20 classes."""
    path = shared_path("data", "voc_samples", "lists", name)
    table = read_labels_file(path)
    ordinary = np.load(path, allow_pickle=True).item()
    assert len(table) == len(ordinary) == 12031
    assert table.keys() == ordinary.keys()
    for key in list(ordinary)[:50]:
        assert table[key].dtype == np.float32 and np.array_equal(table[key], ordinary[key])
    key = next(iter(table))
    assert isinstance(key, str if "psa" in name else np.integer)


def test_a_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "cls_labels.npy"
    np.save(path, np.array({"2007_000032": WritesAFile(marker)}, dtype=object), allow_pickle=True)
    np.load(path, allow_pickle=True)  # the ordinary reader runs it: the payload is real
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError) as info:
        read_labels_file(path)
    assert str(path) in str(info.value) and "io.open" in str(info.value) and "refused" in str(info.value)
    assert not marker.exists()
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n")
    with pytest.raises(ValueError, match=f"labels file {path} was refused"):  # through the dataset reader too
        VOCLayout(tmp_path, VOC_CLASSES, image_dir=".", labels_file=path).labels("train")
    assert not marker.exists()


def test_other_contents_are_named(tmp_path: Path) -> None:
    plain = tmp_path / "plain.npy"
    np.save(plain, np.ones((3, 20), np.float32))
    with pytest.raises(ValueError, match=rf"labels file {plain} must hold a dict .* found a float32 array"):
        read_labels_file(plain)
    listed = tmp_path / "list.npy"
    np.save(listed, np.array([np.ones(20)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=f"labels file {listed} must hold a dict"):
        read_labels_file(listed)
    texts = tmp_path / "texts.npy"
    np.save(texts, np.array({"2007_000032": "person"}, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=f"labels file {texts}: entry '2007_000032' is a str"):
        read_labels_file(texts)
    tuple_keys = tmp_path / "tuple_keys.npy"
    np.save(tuple_keys, np.array({(1, 2): np.ones(20)}, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=f"labels file {tuple_keys}: key \\(1, 2\\) is a tuple"):
        read_labels_file(tuple_keys)
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"not an npy file")
    with pytest.raises(ValueError, match=f"unreadable labels file {garbage}"):
        read_labels_file(garbage)


def test_a_raw_pickle_under_the_npy_name_is_refused(tmp_path: Path) -> None:
    """A plain pickle (no npy header) is not read at all: the npy magic is checked first."""
    marker = tmp_path / "ran"
    path = tmp_path / "cls_labels.npy"
    path.write_bytes(pickle.dumps({"2007_000032": WritesAFile(marker)}))
    with pytest.raises(ValueError, match=f"unreadable labels file {path}"):
        read_labels_file(path)
    assert not marker.exists()
