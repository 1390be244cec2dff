"""File I/O (src/utils/io.py): atomic writes leave either the old or the new file, never a partial
one; readers name the file at fault and refuse truncated JPEGs."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from PIL import Image

from src.utils.io import (
    ArtifactWriteError,
    _atomic_write,
    load_npz,
    read_image,
    read_label,
    save_jpeg_atomic,
    save_label_png_atomic,
    save_npz_atomic,
    write_json_atomic,
    write_text_atomic,
)


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json_atomic(path, {"b": np.float32(0.5), "a": np.arange(2)})
    assert path.read_text() == '{\n  "a": [\n    0,\n    1\n  ],\n  "b": 0.5\n}\n'
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert leftovers(path.parent) == []


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def half_then_crash(handle):
        handle.write(b"half of the new")
        raise KeyboardInterrupt  # a killed run

    with pytest.raises(KeyboardInterrupt):
        _atomic_write(path, half_then_crash)
    assert path.read_text() == "old" and leftovers(tmp_path) == []

    def disk_full(handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ArtifactWriteError, match=r"could not write .*a\.txt: No space left on device"):
        _atomic_write(path, disk_full)
    assert path.read_text() == "old" and leftovers(tmp_path) == []


def test_label_png_round_trip(tmp_path):
    label = np.array([[0, 1, 255], [20, 3, 0]], np.uint8)
    save_label_png_atomic(tmp_path / "p.png", label)
    with Image.open(tmp_path / "p.png") as img:
        assert img.mode == "P"
        assert img.getpalette()[3:6] == [128, 0, 0]  # the VOC palette: class 1 is dark red
    np.testing.assert_array_equal(read_label(tmp_path / "p.png"), label)
    save_label_png_atomic(tmp_path / "g.png", label.astype(np.int64), palette=False)
    np.testing.assert_array_equal(read_label(tmp_path / "g.png"), label)
    with pytest.raises(ValueError, match=r"bad\.png has values outside 0\.\.255"):
        save_label_png_atomic(tmp_path / "bad.png", np.array([[300]]))
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb\.png has mode 'RGB'"):
        read_label(tmp_path / "rgb.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"junk\.png"):
        read_label(tmp_path / "junk.png")
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        read_label(tmp_path / "nope.png")


@pytest.fixture
def jpeg(tmp_path):
    yy, xx = np.mgrid[0:40, 0:56]
    rgb = np.stack([xx * 4, yy * 5, np.full_like(xx, 60)], -1).astype(np.uint8)  # smooth: JPEG keeps it
    path = tmp_path / "ok.jpg"
    save_jpeg_atomic(path, rgb, quality=95)
    return path, rgb


def test_read_image_rgb(jpeg):
    path, rgb = jpeg
    img = read_image(path)
    assert img.shape == (40, 56, 3) and img.dtype == np.uint8
    assert np.abs(img.astype(int) - rgb.astype(int)).max() <= 8  # RGB order (BGR would be far off)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    save_jpeg_atomic(path.with_name("red.jpg"), red)
    assert read_image(path.with_name("red.jpg"))[..., 0].min() > 240


def test_read_image_refuses_truncated_jpeg(jpeg, tmp_path):
    path, _ = jpeg
    data = path.read_bytes()
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=rf"corrupt or truncated image file {bad}"):
        read_image(bad)
    # trailing bytes after a complete image are fine (some cameras write them)
    trailing = tmp_path / "trailing.jpg"
    trailing.write_bytes(data + b"\x00\x00")
    np.testing.assert_array_equal(read_image(trailing), read_image(path))
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"junk\.jpg"):
        read_image(junk)
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg"):
        read_image(tmp_path / "missing.jpg")


def test_npz_round_trip_and_corrupt_file(tmp_path):
    save_npz_atomic(tmp_path / "a.npz", cam=np.ones((2, 3, 3), np.float32), keys=np.array([1, 4]))
    out = load_npz(tmp_path / "a.npz")
    assert out["cam"].shape == (2, 3, 3) and out["keys"].tolist() == [1, 4]
    data = (tmp_path / "a.npz").read_bytes()
    (tmp_path / "b.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"corrupt or truncated array file .*b\.npz"):
        load_npz(tmp_path / "b.npz")
    assert leftovers(tmp_path) == []


def test_atomic_writes_get_the_umask_mode_not_mkstemps_0600(tmp_path, monkeypatch):
    """A cache shared by a group must stay readable: the file mode is what open() would give (0666 minus
    the umask read at import), not mkstemp's 0600."""
    import os
    import stat

    import src.utils.io as io_module

    old = os.umask(0o022)
    os.umask(old)
    assert io_module.FILE_MODE == 0o666 & ~old
    monkeypatch.setattr(io_module, "FILE_MODE", 0o644)  # as under the common umask 022
    target = tmp_path / "manifest.json"
    io_module.write_json_atomic(target, {"a": 1})
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
