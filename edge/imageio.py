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


def _short(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` cut to ``limit`` characters (some decoders put whole buffers in messages)."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + "…"


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
        raise ImageLoadError(path, f"unreadable DICOM ({_short(exc)})") from exc
    spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1 and arr.ndim == (4 if spp > 1 else 3):
        arr = arr[arr.shape[0] // 2]  # multi-frame: the middle frame
    if spp > 1:
        # Colour (RGB, or YBR which pydicom 3 converts to RGB): no modality/VOI windowing.
        photometric = str(getattr(ds, "PhotometricInterpretation", "")).upper()
        if photometric.startswith("YBR") and int(pydicom.__version__.split(".")[0]) < 3:
            from pydicom.pixel_data_handlers.util import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        rgb = arr[..., :3]
        return rgb if rgb.dtype == np.uint8 else _to_uint8(rgb)
    if arr.ndim != 2:
        raise ImageLoadError(path, f"unsupported DICOM pixel data shape {arr.shape}")
    out = _dicom_grey_to_uint8(path, ds, arr)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 255 - out
    if out.size and int(out.min()) == int(out.max()):
        raise ImageLoadError(path, f"decodes to a constant image (every pixel {int(out[0, 0])} after the "
                                   "modality and VOI transforms): nothing to classify")
    return np.stack([out] * 3, axis=-1)


def _window_problem(ds: Any) -> str | None:
    """Why the first WindowCenter/WindowWidth pair cannot be used (non-finite, width < 1), or None."""
    try:
        wc, ww = _first(ds.WindowCenter), _first(ds.WindowWidth)
    except (TypeError, ValueError, StopIteration) as exc:
        return f"unreadable VOI window ({exc})"
    if not (np.isfinite(wc) and np.isfinite(ww)):
        return f"non-finite VOI window (WindowCenter={wc}, WindowWidth={ww})"
    if ww < 1:
        return f"degenerate VOI window (WindowWidth={ww} < 1)"
    return None


def _dicom_grey_to_uint8(path: Path, ds: Any, arr: np.ndarray) -> np.ndarray:
    """Greyscale pixel data -> uint8 with pydicom's own modality LUT / rescale and VOI LUT / window
    (LINEAR, LINEAR_EXACT, SIGMOID): the VOI output range maps to 0..255; without a VOI transform
    the finite pixel range does. Non-finite or degenerate windows are refused by name."""
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

    try:
        with np.errstate(all="ignore"):
            mod = np.asarray(apply_modality_lut(arr, ds), np.float64)
    except Exception as exc:  # noqa: BLE001 - any malformed modality LUT is this file's problem
        raise ImageLoadError(path, f"invalid modality LUT / rescale ({_short(exc)})") from exc
    if not np.all(np.isfinite(mod)):
        raise ImageLoadError(path, "non-finite pixel values after the modality rescale (RescaleSlope="
                                   f"{getattr(ds, 'RescaleSlope', None)}, RescaleIntercept="
                                   f"{getattr(ds, 'RescaleIntercept', None)})")
    has_lut = bool(ds.get("VOILUTSequence"))
    has_window = "WindowCenter" in ds or "WindowWidth" in ds
    if not has_lut and not has_window:
        return _to_uint8(mod)
    if not has_lut:
        why = _window_problem(ds) if ("WindowCenter" in ds and "WindowWidth" in ds) else \
            "incomplete VOI window (WindowCenter and WindowWidth must both be present)"
        if why:
            raise ImageLoadError(path, why)
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if has_lut:  # a LUT is indexed by (integer) modality values; its range is its own entries'
                out = np.asarray(apply_voi_lut(np.rint(mod).astype(np.int64), ds), np.float64)
                n, first = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor[:2])
                ends = np.asarray(apply_voi_lut(np.arange(first, first + (n or 65536)), ds), np.float64)
            else:  # the window's output range: what the extremes map to
                out = np.asarray(apply_voi_lut(mod, ds), np.float64)
                ends = np.asarray(apply_voi_lut(np.array([-1e300, 1e300]), ds), np.float64)
            lo, hi = float(ends.min()), float(ends.max())
    except Exception as exc:  # noqa: BLE001 - a malformed VOI LUT / window is this file's problem
        raise ImageLoadError(path, f"invalid VOI LUT / window ({_short(exc)})") from exc
    if not (np.all(np.isfinite(out)) and np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        raise ImageLoadError(path, f"the VOI transform gives no usable range ({lo} .. {hi})")
    return _to_uint8(out, lo, hi)


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
        with warnings.catch_warnings():
            # Pillow's decompression-bomb warning is an error here, whatever filters are installed.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # forces a full decode: truncated files fail here
                return pil_to_rgb(im)
    except UnidentifiedImageError as exc:
        raise ImageLoadError(path, "not an image Pillow can identify (unsupported or corrupt)") from exc
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageLoadError(path, f"image too large: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(path, f"corrupt or truncated image ({exc})") from exc


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow image -> uint8 RGB. 16-bit and float greyscale are min-max scaled to 0..255;
    alpha is dropped; palette, bilevel and CMYK images are converted."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return np.stack([_to_uint8(np.asarray(im))] * 3, axis=-1)
    if im.mode in ("RGBA", "LA", "P", "PA", "RGBa", "La"):
        im = im.convert("RGBA").convert("RGB")
    elif im.mode != "RGB":
        im = im.convert("L").convert("RGB") if im.mode != "L" else im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def resize_rgb(rgb: np.ndarray, size: tuple[int, int], method: str = "bilinear") -> np.ndarray:
    """Resize uint8 RGB to (height, width)."""
    h, w = size
    if rgb.shape[0] == h and rgb.shape[1] == w:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((w, h), _RESAMPLE[method]), dtype=np.uint8)


_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
             "area": Image.BOX}


def load_for_model(path: PathLike, size: tuple[int, int], method: str = "bilinear") -> np.ndarray:
    """Decode and resize to ``size`` (height, width): uint8 RGB (see :func:`load_resized`)."""
    return load_resized(path, size, method)[0]


def load_resized(path: PathLike, size: tuple[int, int], method: str = "bilinear"
                 ) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode and resize to ``size`` (height, width) -> (uint8 RGB, original (height, width)).

    Pixel-for-pixel the same as ``resize_rgb(load_rgb(path), size, method)``; 8-bit greyscale
    and RGB files take a faster path (resized by Pillow before any copy into NumPy, greyscale
    resized as one channel).
    """
    p = Path(path)
    if p.suffix.lower() in _FAST_SUFFIXES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(p)
            with im:
                if im.mode in ("L", "RGB"):
                    im.load()
                    orig = (int(im.size[1]), int(im.size[0]))
                    h, w = size
                    if im.size != (w, h):
                        if im.mode == "RGB":
                            # Greyscale scans saved as RGB (most RGB MRI JPEGs decode to R == G == B):
                            # resize one channel instead of three; Pillow resamples channels
                            # independently, so the result is identical.
                            a = np.asarray(im)
                            if np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2]):
                                im = Image.fromarray(np.ascontiguousarray(a[..., 0]))
                        im = im.resize((w, h), _RESAMPLE[method])
                    if im.mode == "L":
                        g = np.asarray(im, dtype=np.uint8)
                        return np.repeat(g[..., None], 3, axis=-1), orig
                    return np.asarray(im, dtype=np.uint8), orig
        except Exception:
            pass  # the general path below reports the problem by name
    rgb = load_rgb(p)
    return resize_rgb(rgb, size, method), (int(rgb.shape[0]), int(rgb.shape[1]))


_FAST_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


def as_rgb_array(x: Any) -> np.ndarray:
    """An in-memory image -> uint8 RGB (H, W, 3).

    Accepts a Pillow image or an array (H, W) / (H, W, 1|3|4) of any dtype: uint8 is taken as
    is; integers within 0..255 are cast; floats within [0, 1] are scaled by 255 and floats
    within [0, 255] rounded; anything else (16-bit, negative, other float ranges) is min-max
    scaled to 0..255. Alpha is dropped.
    """
    if isinstance(x, Image.Image):
        return pil_to_rgb(x)
    arr = np.asarray(x)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"expected an image array (H, W[, C]) with C in 1, 3, 4; got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        if arr.dtype.kind not in "iuf":
            raise ValueError(f"unsupported image array dtype {arr.dtype}")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            arr = _to_uint8(arr)
        else:
            lo, hi = float(arr.min()), float(arr.max())
            if arr.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
                arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
            elif lo >= 0.0 and hi <= 255.0:
                arr = np.rint(arr).astype(np.uint8) if arr.dtype.kind == "f" else arr.astype(np.uint8)
            else:
                arr = _to_uint8(arr)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])
