"""Named preprocessing specs, recorded with every model and artifact.

A spec maps a uint8 RGB image of shape (H, W, 3) (already resized to the model
input) to the float32 tensor the model was trained on. The arithmetic works on
NumPy arrays and on TensorFlow tensors alike, so training (tf.data) and the
TensorFlow-free edge runtime apply exactly the same function.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# name -> (mode, mean, std); means/stds are in 0..255 pixel units, RGB order.
PRESETS: dict[str, dict[str, Any]] = {
    # The seed papers: rescale 1/255 -> [0, 1].
    "rescale": {"mode": "scale", "mean": [0.0, 0.0, 0.0], "std": [255.0, 255.0, 255.0]},
    # keras.applications.xception.preprocess_input ("tf" mode): [-1, 1].
    "xception": {"mode": "scale", "mean": [127.5, 127.5, 127.5], "std": [127.5, 127.5, 127.5]},
    # keras.applications.resnet50.preprocess_input ("caffe" mode): RGB->BGR, minus ImageNet BGR means.
    "caffe": {"mode": "caffe", "mean": [103.939, 116.779, 123.68], "std": [1.0, 1.0, 1.0]},
    # torchvision-style ImageNet mean/std on [0, 1].
    "imagenet": {
        "mode": "scale",
        "mean": [123.675, 116.28, 103.53],
        "std": [58.395, 57.12, 57.375],
    },
}


# How every stage resamples an image to the model input (Pillow filters; "area" is Pillow's BOX).
RESIZE_METHODS = ("nearest", "bilinear", "bicubic", "area")


@dataclass(frozen=True)
class PreprocessSpec:
    """How raw pixels become model input. ``name`` is one of PRESETS or ``meanstd``."""

    name: str = "rescale"
    height: int = 224
    width: int = 224
    channels: int = 3
    mode: str = "scale"  # "scale": (x - mean) / std ; "caffe": BGR then x - mean
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (255.0, 255.0, 255.0)
    resize: str = "bilinear"  # one of RESIZE_METHODS, applied by every stage (edgebrain.imageio)
    extra: dict[str, Any] = field(default_factory=dict)
    normalize: str = "none"  # per-image intensity normalisation (edgebrain.normalize), before mean/std

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_METHODS:
            raise ValueError(f"unknown resize method {self.resize!r}; choose one of {', '.join(RESIZE_METHODS)}")
        from .normalize import canonical

        object.__setattr__(self, "normalize", canonical(self.normalize))

    @classmethod
    def named(cls, name: str, size: int | tuple[int, int] = 224, **kw: Any) -> PreprocessSpec:
        """A preset (or meanstd:...) at ``size``. ``name`` may carry ``+resize=METHOD`` and
        ``+normalize=NAME`` (e.g. ``caffe+resize=nearest``): for models from other pipelines given
        with --preprocess on the command line."""
        name, opts = _split_options(name)
        kw = {**opts, **kw}
        h, w = (size, size) if isinstance(size, int) else size
        if name.startswith("meanstd:"):
            # meanstd:m1,m2,m3/s1,s2,s3 in 0..255 units
            try:
                m, s = name.split(":", 1)[1].split("/")
                mean = tuple(float(v) for v in m.split(","))
                std = tuple(float(v) for v in s.split(","))
                if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"bad custom preprocessing {name!r}: expected meanstd:M,M,M/S,S,S (0..255 units)"
                ) from None
            return cls(name="meanstd", height=h, width=w, mode="scale", mean=mean, std=std, **kw)
        if name not in PRESETS:
            raise ValueError(
                f"unknown preprocessing {name!r}; choose one of {sorted(PRESETS)} or meanstd:M,M,M/S,S,S"
            )
        p = PRESETS[name]
        return cls(
            name=name, height=h, width=w, mode=p["mode"], mean=tuple(p["mean"]), std=tuple(p["std"]), **kw
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        d = dict(d)
        d["mean"] = tuple(d.get("mean", (0.0, 0.0, 0.0)))
        d["std"] = tuple(d.get("std", (255.0, 255.0, 255.0)))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def size(self) -> tuple[int, int]:
        return (self.height, self.width)

    def apply(self, x: Any) -> Any:
        """uint8/float RGB pixels (..., H, W, 3) -> float32 model input. NumPy or tf tensors."""
        if isinstance(x, np.ndarray):
            x = x.astype(np.float32, copy=False)
            mean = np.asarray(self.mean, np.float32)
            std = np.asarray(self.std, np.float32)
        else:  # tf.Tensor
            import tensorflow as tf  # only reached from training code

            x = tf.cast(x, tf.float32)
            mean = tf.constant(self.mean, tf.float32)
            std = tf.constant(self.std, tf.float32)
        if self.normalize != "none":
            x = self._normalized(x)
        if self.mode == "caffe":
            x = x[..., ::-1]
        elif self.mode != "scale":
            raise ValueError(f"unknown preprocessing mode {self.mode!r}")
        return (x - mean) / std

    def _normalized(self, x: Any) -> Any:
        from .normalize import normalize, normalize_tf

        return normalize(x, self.normalize) if isinstance(x, np.ndarray) else normalize_tf(x, self.normalize)

    def invert(self, x: np.ndarray) -> np.ndarray:
        """Model input -> RGB pixels in 0..255 (float), for overlays (after any normalisation)."""
        x = x * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)
        if self.mode == "caffe":
            x = x[..., ::-1]
        return x


def _split_options(name: str) -> tuple[str, dict[str, str]]:
    """``"caffe+resize=nearest+normalize=percentile"`` -> ("caffe", {"resize": ..., "normalize": ...})."""
    base, *parts = name.split("+")
    opts: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in ("resize", "normalize") or not value:
            raise ValueError(f"bad preprocessing option {part!r} in {name!r}: expected +resize=METHOD "
                             f"({', '.join(RESIZE_METHODS)}) or +normalize=NAME")
        opts[key] = value
    return base, opts


def default_for_variant(variant: str) -> str:
    """The preprocessing a variant uses unless told otherwise."""
    if variant.endswith("-ft"):
        # Pretrained Keras applications expect their own preprocessing.
        return "caffe" if variant.startswith("resnet50") else "xception"
    return "rescale"  # the seed papers' 1/255
