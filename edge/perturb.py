"""Intensity and resolution perturbations: training augmentation and the robustness suite.

Each perturbation maps a float32 image (H, W, 3) in 0..255 to a float32 image in 0..255 at a
given strength. The same functions serve ``edgebrain train`` (random strengths, see
:class:`Augment`) and ``edgebrain bench --robustness`` (fixed, graded strengths, see
:data:`SUITE`), so what a model was trained to withstand is what it is measured on.
NumPy and Pillow only: no TensorFlow.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image, ImageFilter

Rng = np.random.Generator


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 255.0).astype(np.float32, copy=False)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _grey(x: np.ndarray) -> bool:
    return bool(np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 1], x[..., 2]))


def gamma(x: np.ndarray, g: float, rng: Rng | None = None) -> np.ndarray:
    """255 * (x / 255) ** g: g < 1 brightens the mid-tones, g > 1 darkens them."""
    return _clip(np.float32(255.0) * np.power(x / np.float32(255.0), np.float32(g)))


def contrast(x: np.ndarray, c: float, rng: Rng | None = None) -> np.ndarray:
    """Scale the deviations from the image mean by ``c``."""
    m = np.float32(x.mean())
    return _clip(m + (x - m) * np.float32(c))


def brightness(x: np.ndarray, a: float, rng: Rng | None = None) -> np.ndarray:
    """Multiply every pixel by ``a`` (the seed's brightness enhancement)."""
    return _clip(x * np.float32(a))


def noise(x: np.ndarray, sigma: float, rng: Rng | None = None) -> np.ndarray:
    """Additive Gaussian noise, ``sigma`` in pixel units; a greyscale image stays greyscale."""
    rng = rng or np.random.default_rng(0)
    shape = (*x.shape[:-1], 1) if _grey(x) else x.shape
    return _clip(x + rng.normal(0.0, sigma, shape).astype(np.float32))


def blur(x: np.ndarray, sigma: float, rng: Rng | None = None) -> np.ndarray:
    """Gaussian blur, standard deviation ``sigma`` in pixels (Pillow's GaussianBlur)."""
    if sigma <= 0:
        return x
    im = Image.fromarray(_u8(x)).filter(ImageFilter.GaussianBlur(radius=float(sigma)))
    return np.asarray(im, np.float32)


def jpeg(x: np.ndarray, quality: float, rng: Rng | None = None) -> np.ndarray:
    """Encode as JPEG at ``quality`` (1..95) and decode again."""
    buf = io.BytesIO()
    Image.fromarray(_u8(x)).save(buf, format="JPEG", quality=int(round(quality)))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), np.float32)


def rescale(x: np.ndarray, f: float, rng: Rng | None = None) -> np.ndarray:
    """Down-scale by ``f`` (< 1) and back up to the same size (bilinear): lost resolution."""
    h, w = x.shape[:2]
    sh, sw = max(1, int(round(h * f))), max(1, int(round(w * f)))
    if (sh, sw) == (h, w):
        return x
    im = Image.fromarray(_u8(x)).resize((sw, sh), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    return np.asarray(im, np.float32)


def grayscale(x: np.ndarray, strength: float = 1.0, rng: Rng | None = None) -> np.ndarray:
    """RGB -> luminance (ITU-R 601, Pillow's 'L') in all three channels."""
    return np.asarray(Image.fromarray(_u8(x)).convert("L").convert("RGB"), np.float32)


def resolution(x: np.ndarray, target: float, rng: Rng | None = None) -> np.ndarray:
    """The scan at another resolution: ``target`` <= 4 is a factor of the size, larger values a
    side length in pixels (bicubic). Changes the image size: the model's resize comes after."""
    h, w = x.shape[:2]
    f = target if target <= 4 else target / max(h, w)
    sh, sw = max(1, int(round(h * f))), max(1, int(round(w * f)))
    if (sh, sw) == (h, w):
        return x
    return _clip(np.asarray(Image.fromarray(_u8(x)).resize((sw, sh), Image.BICUBIC), np.float32))


PERTURBATIONS: dict[str, Callable[..., np.ndarray]] = {
    "gamma": gamma, "contrast": contrast, "brightness": brightness, "noise": noise, "blur": blur,
    "jpeg": jpeg, "rescale": rescale, "grayscale": grayscale, "resolution": resolution,
}

# The robustness suite of `edgebrain bench --robustness`: (perturbation, strengths), each strength
# on the original-resolution image before the model's own resize.
SUITE: tuple[tuple[str, tuple[float, ...]], ...] = (
    ("gamma", (0.6, 0.8, 1.25, 1.6)),
    ("contrast", (0.6, 0.8, 1.2, 1.4)),
    ("noise", (5.0, 10.0, 20.0)),
    ("blur", (0.5, 1.0, 2.0)),
    ("jpeg", (90.0, 60.0, 30.0)),
    ("resolution", (0.5, 0.75, 512.0)),
    ("grayscale", (1.0,)),
)


def apply(name: str, rgb: np.ndarray, strength: float, seed: int | tuple[int, ...] = 0) -> np.ndarray:
    """Perturb one uint8 RGB image -> uint8 RGB (what a scanner or archive would have stored)."""
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; choose one of {', '.join(PERTURBATIONS)}")
    rng = np.random.default_rng(seed)
    return _u8(PERTURBATIONS[name](np.asarray(rgb, np.float32), strength, rng))


# ----------------------------------------------------------------------------- training augmentation

Range = Optional[tuple[float, float]]


@dataclass(frozen=True)
class Augment:
    """Intensity augmentation for training; each named option is applied to an image with
    probability ``prob`` at a strength drawn uniformly from its range (None / 0: off)."""

    gamma: Range = None  # e.g. (0.7, 1.5)
    contrast: Range = None  # e.g. (0.7, 1.3)
    noise: float = 0.0  # max Gaussian sigma, pixels
    blur: float = 0.0  # max Gaussian blur sigma, pixels
    jpeg: Range = None  # JPEG quality range, e.g. (30, 95)
    rescale: float = 0.0  # min down-scaling factor, e.g. 0.5 (down then up again)
    prob: float = 0.5

    @property
    def active(self) -> bool:
        return bool(self.gamma or self.contrast or self.noise or self.blur or self.jpeg or self.rescale)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Augment:
        d = dict(d or {})
        out: dict[str, Any] = {}
        for k in cls.__dataclass_fields__:
            if d.get(k) is not None:
                v = d[k]
                out[k] = tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v)
        return cls(**out)

    def ops(self) -> list[tuple[str, float, float]]:
        """(perturbation, low, high) for every active option."""
        ops: list[tuple[str, float, float]] = []
        for name in ("gamma", "contrast", "jpeg"):
            r = getattr(self, name)
            if r:
                ops.append((name, float(r[0]), float(r[1])))
        if self.noise:
            ops.append(("noise", 0.0, float(self.noise)))
        if self.blur:
            ops.append(("blur", 0.0, float(self.blur)))
        if self.rescale:
            ops.append(("rescale", float(self.rescale), 1.0))
        return ops

    def image(self, x: np.ndarray, rng: Rng) -> np.ndarray:
        """Augment one float32 image (H, W, 3) in 0..255."""
        for name, lo, hi in self.ops():
            if rng.random() < self.prob:
                x = PERTURBATIONS[name](x, float(rng.uniform(lo, hi)), rng)
        return x

    def batch(self, x: np.ndarray, rng: Rng) -> np.ndarray:
        """Augment a float32 batch (N, H, W, 3) in 0..255 image by image."""
        out = np.array(x, np.float32, copy=True)
        for i in range(len(out)):
            out[i] = self.image(out[i], rng)
        return out


def parse_range(text: str | None, what: str) -> Range:
    """``"0.7,1.5"`` -> (0.7, 1.5); None / "" -> None."""
    if not text:
        return None
    try:
        lo, hi = (float(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"{what}: expected LOW,HIGH (e.g. 0.7,1.5), got {text!r}") from None
    if not lo <= hi:
        raise ValueError(f"{what}: LOW must not exceed HIGH, got {text!r}")
    return (lo, hi)
