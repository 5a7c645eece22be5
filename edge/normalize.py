"""Per-image intensity normalisation, part of the preprocessing spec (``PreprocessSpec.normalize``).

Scanners, archives and export tools differ in brightness, contrast and gamma. A per-image
normalisation maps each image (already resized to the model input) to a common intensity
range before the spec's mean/std, so the model sees the same thing whatever the source did.

Methods (``name`` or ``name:params``; output stays in 0..255 pixel units, float32):

* ``none``                      unchanged (the default; old model cards and manifests);
* ``percentile[:LO,HI]``        clip to the image's LO-th..HI-th percentiles (default 1, 99)
                                and rescale that range to 0..255 (invariant to brightness and
                                contrast changes);
* ``zscore[:K]``                per-image standardisation, (x - mean) / std clipped to +-K std
                                (default 3) and mapped to 0..255;
* ``histeq``                    histogram equalisation (scikit-image ``exposure.equalize_hist``,
                                256 bins; invariant to any monotonic intensity map up to ties);
* ``clahe[:CLIP]``              contrast-limited adaptive histogram equalisation
                                (scikit-image ``exposure.equalize_adapthist``, clip limit CLIP,
                                default 0.01).

One NumPy implementation serves every stage: the TensorFlow-free runtime calls it directly, and
training wraps the same function in ``tf.numpy_function``, so both give identical tensors.
scikit-image is needed only for ``histeq`` and ``clahe`` (``pip install 'edgebrain[normalize]'``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

METHODS = ("none", "percentile", "zscore", "histeq", "clahe")
_DEFAULTS: dict[str, tuple[float, ...]] = {"none": (), "percentile": (1.0, 99.0), "zscore": (3.0,),
                                           "histeq": (), "clahe": (0.01,)}


class NormalizeError(ValueError):
    """A normalisation name that cannot be parsed or used."""


def parse(name: str | None) -> tuple[str, tuple[float, ...]]:
    """``"percentile:2,98"`` -> ("percentile", (2.0, 98.0)); parameters default per method."""
    text = (name or "none").strip()
    method, _, rest = text.partition(":")
    if method not in METHODS:
        raise NormalizeError(f"unknown normalisation {text!r}; choose one of {', '.join(METHODS)} "
                             "(e.g. percentile:1,99, zscore:3, clahe:0.01)")
    want = len(_DEFAULTS[method])
    if not rest:
        return method, _DEFAULTS[method]
    try:
        params = tuple(float(v) for v in rest.split(","))
    except ValueError:
        raise NormalizeError(f"bad parameters in normalisation {text!r}: expected numbers") from None
    if len(params) != want:
        raise NormalizeError(f"normalisation {method!r} takes {want} parameter(s), got {text!r}")
    _check(method, params, text)
    return method, params


def _check(method: str, p: tuple[float, ...], text: str) -> None:
    ok = {"percentile": lambda: 0.0 <= p[0] < p[1] <= 100.0, "zscore": lambda: p[0] > 0.0,
          "clahe": lambda: 0.0 < p[0] <= 1.0}.get(method, lambda: True)()
    if not ok:
        raise NormalizeError(f"normalisation parameters out of range in {text!r}")


def canonical(name: str | None) -> str:
    """The recorded form: method plus every parameter, e.g. ``percentile:1,99``."""
    method, params = parse(name)
    return method if not params else f"{method}:{','.join(f'{v:g}' for v in params)}"


def _percentile(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    a, b = np.percentile(img, [lo, hi])
    if b <= a:
        return np.zeros_like(img)
    return (np.clip(img, a, b) - a) * np.float32(255.0 / (b - a))


def _zscore(img: np.ndarray, k: float) -> np.ndarray:
    sd = float(img.std(dtype=np.float64))
    if sd <= 0.0:
        return np.full_like(img, 127.5)
    z = (img - np.float32(img.mean(dtype=np.float64))) / np.float32(sd)
    return (np.clip(z, -k, k) + np.float32(k)) * np.float32(127.5 / k)


def _skimage_exposure() -> Any:
    try:
        from skimage import exposure
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise NormalizeError("histeq / clahe normalisation needs scikit-image: "
                             "pip install 'edgebrain[normalize]'") from exc
    return exposure


def _per_channel(img: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply ``fn`` (float [0, 1] 2-D -> float [0, 1]) per channel; greyscale stored as RGB once."""
    chans = [img[..., c] for c in range(img.shape[-1])]
    same = all(np.array_equal(chans[0], c) for c in chans[1:])
    outs = [fn(chans[0] / np.float32(255.0))] * len(chans) if same else [fn(c / np.float32(255.0)) for c in chans]
    return (np.stack(outs, axis=-1) * 255.0).astype(np.float32)


def _histeq(img: np.ndarray) -> np.ndarray:
    ex = _skimage_exposure()
    return _per_channel(img, lambda c: ex.equalize_hist(c, nbins=256))


def _clahe(img: np.ndarray, clip: float) -> np.ndarray:
    ex = _skimage_exposure()
    return _per_channel(img, lambda c: ex.equalize_adapthist(np.clip(c, 0.0, 1.0), clip_limit=clip))


def normalize_image(img: np.ndarray, method: str, params: tuple[float, ...]) -> np.ndarray:
    """One image (H, W, C) float32 in 0..255 -> normalised float32 (H, W, C)."""
    if method == "percentile":
        return _percentile(img, *params)
    if method == "zscore":
        return _zscore(img, *params)
    if method == "histeq":
        return _histeq(img)
    if method == "clahe":
        return _clahe(img, *params)
    return img


def normalize(x: np.ndarray, name: str | None) -> np.ndarray:
    """Images (..., H, W, C) in 0..255 -> float32 of the same shape, each image normalised on its own."""
    method, params = parse(name)
    x = np.asarray(x, dtype=np.float32)
    if method == "none":
        return x
    if x.ndim == 3:
        return np.ascontiguousarray(normalize_image(x, method, params), dtype=np.float32)
    flat = x.reshape((-1, *x.shape[-3:]))
    out = np.empty(flat.shape, np.float32)
    for i in range(len(flat)):
        out[i] = normalize_image(flat[i], method, params)
    return out.reshape(x.shape)


def normalize_tf(x: Any, name: str | None) -> Any:
    """The same normalisation inside a tf.data / TensorFlow graph (``tf.numpy_function`` over
    :func:`normalize`), so training and the edge runtime compute identical tensors."""
    import tensorflow as tf

    if parse(name)[0] == "none":
        return tf.cast(x, tf.float32)
    y = tf.numpy_function(lambda a: normalize(a, name), [tf.cast(x, tf.float32)], tf.float32, stateful=False)
    y.set_shape(x.shape)
    return y
