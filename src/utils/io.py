"""File I/O used by every stage: atomic writes (temp file + rename) and image/mask reading.

A reader never sees a half-written file: every artifact file is written to a temporary name in the
same directory and renamed into place, so a run killed at any moment leaves either the old state or
the complete new file. Errors name the file at fault.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from src.utils.labels import voc_palette

cv2.setNumThreads(1)

# mkstemp creates 0600 files; artifacts get the mode a plain open() would give (0666 minus the umask), so
# a cache shared by a group on a cluster stays readable. The umask is read once, at import.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


class ArtifactWriteError(OSError):
    """Writing an artifact failed (disk full, permissions); the target was left untouched."""


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), FILE_MODE)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError) and not isinstance(err, ArtifactWriteError):
            raise ArtifactWriteError(err.errno, f"could not write {path}: {err.strerror or err}") from err
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any, sort_keys: bool = True) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Uncompressed .npz (no pickle) written atomically."""

    def write(f):
        np.savez(f, **arrays)

    _atomic_write(path, write)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise
    except Exception as err:  # zipfile.BadZipFile, ValueError, EOFError...
        raise ValueError(f"corrupt or truncated array file {path}: {err}") from err


def save_label_png_atomic(path: Path, label: np.ndarray, palette: bool = True) -> None:
    """A uint8 label map as a PNG; with the VOC palette by default (pixel values are the class ids)."""
    if label.dtype != np.uint8:
        if label.min() < 0 or label.max() > 255:
            raise ValueError(f"label map for {path} has values outside 0..255")
        label = label.astype(np.uint8)
    img = Image.fromarray(label, mode="P" if palette else "L")
    if palette:
        img.putpalette(voc_palette().reshape(-1).tolist())

    def write(f):
        img.save(f, format="PNG")

    _atomic_write(path, write)


def save_rgb_png_atomic(path: Path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"could not encode {path}")
    write_bytes_atomic(path, buf.tobytes())


def save_jpeg_atomic(path: Path, rgb: np.ndarray, quality: int = 95) -> None:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"could not encode {path}")
    write_bytes_atomic(path, buf.tobytes())


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) via OpenCV; a missing, corrupt or truncated file raises naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    data = np.fromfile(str(path), dtype=np.uint8)
    if path.suffix.lower() in (".jpg", ".jpeg") and (data.size < 4 or data[-2] != 0xFF or data[-1] != 0xD9):
        # OpenCV decodes a truncated JPEG silently (grey bottom). Without the end marker at the very end
        # (some files carry trailing bytes), let PIL decide strictly whether the image is complete.
        check_jpeg_complete(path)
    # EXIF orientation is ignored: masks are stored in the file's pixel layout, images must match them.
    img = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise ValueError(f"corrupt or unreadable image file {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def check_jpeg_complete(path: Path) -> None:
    """Raise ValueError naming the file unless PIL decodes the whole JPEG (strict, no truncation)."""
    from PIL import ImageFile

    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, SyntaxError) as err:
        raise ValueError(f"corrupt or truncated image file {path}: {err}") from err
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def read_label(path: Path) -> np.ndarray:
    """Label map (H, W) uint8 from a palette ('P') or grey ('L') PNG: pixel values are class ids."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask not found: {path}")
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise ValueError(f"mask {path} has mode {img.mode!r}; expected a palette ('P') or grey ('L') "
                                 "PNG of class ids")
            return np.array(img, dtype=np.uint8)
    except (OSError, SyntaxError) as err:
        raise ValueError(f"corrupt or unreadable mask file {path}: {err}") from err
