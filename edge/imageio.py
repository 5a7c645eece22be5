"""Image loading for the edge runtime and training: JPEG/PNG/BMP/TIFF and DICOM.

Only NumPy and Pillow (and pydicom for DICOM) are used: no TensorFlow.
Every failure raises :class:`ImageLoadError` naming the file and the problem.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageLoadError

PathLike = Union[str, Path]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}

# Pillow refuses decompression bombs; keep its guard but as an error, not a warning.
warnings.simplefilter("error", Image.DecompressionBombWarning)


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in {".dcm", ".dicom"}:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def _to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    arr = arr.astype(np.float32)
    if lo is None or hi is None:
        finite = arr[np.isfinite(arr)]
        if finite.size == 0:
            raise ValueError("image has no finite pixel values")
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    out = (arr - lo) / (hi - lo) * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _first(v: Any) -> float:
    """DICOM window values may be multi-valued: take the first."""
    if not isinstance(v, (str, bytes)) and hasattr(v, "__iter__"):
        v = next(iter(v))
    return float(v)


def _load_dicom(path: Path) -> np.ndarray:
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImageLoadError(path, "DICOM needs pydicom: pip install 'edgebrain[dicom]'") from exc
    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array
    except Exception as exc:
        raise ImageLoadError(path, f"unreadable DICOM ({type(exc).__name__}: {exc})") from exc
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        arr = arr[arr.shape[0] // 2]  # multi-frame: the middle frame
    arr = arr.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    arr = arr * slope + intercept
    lo = hi = None
    wc, ww = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if wc is not None and ww is not None:
        wc, ww = _first(wc), _first(ww)
        if ww > 0:
            lo, hi = wc - ww / 2.0, wc + ww / 2.0
    out = _to_uint8(arr, lo, hi)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 255 - out
    if out.ndim == 2:
        out = np.stack([out] * 3, axis=-1)
    return out[..., :3]


def load_rgb(path: PathLike) -> np.ndarray:
    """Decode any supported file to a uint8 RGB array (H, W, 3)."""
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(path, "file not found")
    if not path.is_file():
        raise ImageLoadError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    if is_dicom(path):
        return _load_dicom(path)
    try:
        with Image.open(path) as im:
            im.load()  # forces a full decode: truncated files fail here
            return pil_to_rgb(im)
    except UnidentifiedImageError as exc:
        raise ImageLoadError(path, "not an image Pillow can identify (unsupported or corrupt)") from exc
    except Image.DecompressionBombWarning as exc:
        raise ImageLoadError(path, f"image too large: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(path, f"corrupt or truncated image ({exc})") from exc


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return np.stack([_to_uint8(np.asarray(im))] * 3, axis=-1)
    if im.mode in ("RGBA", "LA", "P", "PA"):
        im = im.convert("RGBA").convert("RGB")
    elif im.mode != "RGB":
        im = im.convert("L").convert("RGB") if im.mode != "L" else im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def resize_rgb(rgb: np.ndarray, size: tuple[int, int], method: str = "bilinear") -> np.ndarray:
    """Resize uint8 RGB to (height, width)."""
    h, w = size
    if rgb.shape[0] == h and rgb.shape[1] == w:
        return rgb
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
                "area": Image.BOX}[method]
    return np.asarray(Image.fromarray(rgb).resize((w, h), resample), dtype=np.uint8)


def load_for_model(path: PathLike, size: tuple[int, int], method: str = "bilinear") -> np.ndarray:
    return resize_rgb(load_rgb(path), size, method)


def as_rgb_array(x: Any) -> np.ndarray:
    """Accept an in-memory array (H, W), (H, W, 1|3|4) of any dtype -> uint8 RGB."""
    arr = np.asarray(x)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image array (H, W[, C]); got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = _to_uint8(arr) if arr.dtype.kind == "f" or arr.max() > 255 else arr.astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr[..., :3]
