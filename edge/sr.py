"""Learned super-resolution front end (x2 / x4) and the ``sr-resnet50`` pipeline.

* :func:`degrade` - the low-resolution model: Gaussian point-spread blur, area
  downsampling, Rician (magnitude-MRI) noise, 8-bit quantisation; seeded, deterministic.
* :func:`train_sr` - self-supervised training of the ESPCN-style net
  (:func:`edgebrain.models.variants.build_sr`) on (degraded, original) pairs made from the
  *train* split only; writes an SR model folder (``model.keras`` + ``model_card.json``).
* :func:`evaluate_sr` - PSNR / SSIM (``tf.image.psnr`` / ``tf.image.ssim``) on Testing
  against bicubic and bilinear upsampling of the same low-resolution inputs.
* :func:`prepare_classifier_training`, :func:`assemble`, :func:`three_way` - the
  ``sr-resnet50`` variant: a classifier trained on native and SR-enhanced images, shipped as
  one Keras model (LR image -> SR -> classifier), evaluated bicubic vs SR vs native.
* :func:`int8_psnr_check` - how much full-int8 TFLite costs the SR stage in PSNR, and the
  float-fallback decision against a stated budget.

The SR net works on RGB pixels scaled to [0, 1] (the ``rescale`` preprocessing).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import data as D
from .errors import DataError, ModelError
from .io import atomic_dir, atomic_write_json, environment_facts
from .modelcard import ModelCard
from .preprocess import PreprocessSpec

MODEL_FILE = "model.keras"
SR_STAGE_FILE = "sr.keras"
CLASSIFIER_STAGE_FILE = "classifier.keras"
EVAL_SEED = 20240  # degradation seed for Testing: fixed, different from any training seed
DEFAULT_PSNR_BUDGET_DB = 0.5


# ----------------------------------------------------------------------------- degradation


@dataclass(frozen=True)
class Degradation:
    """The low-resolution acquisition model used to make training pairs and test inputs.

    Per image: Gaussian PSF with sigma drawn from ``blur_sigma`` (x ``scale``, HR pixels),
    area (box) downsampling by ``scale`` (pixel grid aligned with bicubic/bilinear resizing),
    Rician noise with sigma drawn from ``noise_sigma`` (fraction of full scale), rounding to
    8 bits."""

    scale: int = 2
    blur_sigma: tuple[float, float] = (0.35, 0.6)
    noise_sigma: tuple[float, float] = (0.0, 0.02)
    kind: str = "gaussian-psf+area+rician+uint8"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blur_sigma"] = list(self.blur_sigma)
        d["noise_sigma"] = list(self.noise_sigma)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Degradation:
        return cls(scale=int(d.get("scale", 2)), blur_sigma=tuple(d.get("blur_sigma", (0.35, 0.6))),  # type: ignore[arg-type]
                   noise_sigma=tuple(d.get("noise_sigma", (0.0, 0.02))),  # type: ignore[arg-type]
                   kind=str(d.get("kind", cls.kind)))


def _degrade_one(img: np.ndarray, deg: Degradation, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    s = deg.scale
    h, w = img.shape[:2]
    x = img.astype(np.float32) / 255.0
    sigma = float(rng.uniform(*deg.blur_sigma)) * s
    if sigma > 0:
        x = gaussian_filter(x, sigma=(sigma, sigma, 0), mode="reflect", truncate=3.0)
    x = x.reshape(h // s, s, w // s, s, x.shape[2]).mean(axis=(1, 3))
    ns = float(rng.uniform(*deg.noise_sigma))
    if ns > 0:
        # Rician: magnitude of a complex signal with Gaussian noise in both parts; one noise
        # field for all channels (grey MRI stored as RGB stays grey).
        n1 = rng.normal(0.0, ns, size=x.shape[:2] + (1,)).astype(np.float32)
        n2 = rng.normal(0.0, ns, size=x.shape[:2] + (1,)).astype(np.float32)
        x = np.sqrt((x + n1) ** 2 + n2**2)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def degrade(hr: np.ndarray, scale: int = 2, seed: int = 0, model: Degradation | None = None,
            progress: bool = False) -> np.ndarray:
    """uint8 RGB (H, W, 3) or (N, H, W, 3) -> low-resolution uint8 (H/scale, W/scale).

    Image ``i`` of a batch uses the generator ``default_rng([seed, i])``: the result depends
    only on the seed and the image's position, never on batch size or call history."""
    deg = model or Degradation(scale=scale)
    if deg.scale != scale:
        raise ValueError(f"scale {scale} disagrees with the degradation model's scale {deg.scale}")
    arr = np.asarray(hr)
    single = arr.ndim == 3
    if single:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images (N, H, W, 3); got shape {np.asarray(hr).shape}")
    s = deg.scale
    if arr.shape[1] % s or arr.shape[2] % s:
        raise ValueError(f"image size {arr.shape[1]}x{arr.shape[2]} is not divisible by the scale {s}")
    out = np.empty((arr.shape[0], arr.shape[1] // s, arr.shape[2] // s, 3), np.uint8)
    idx: Sequence[int] = range(arr.shape[0])
    if progress:
        from .progress import track

        idx = list(track(idx, description=f"degrading {arr.shape[0]} images x{s}"))
    for i in idx:
        out[i] = _degrade_one(arr[i], deg, np.random.default_rng([int(seed), int(i)]))
    return out[0] if single else out


def upscale(lr: np.ndarray, scale: int, method: str = "bicubic") -> np.ndarray:
    """Classical upsampling (Pillow) of uint8 RGB (N, h, w, 3) or (h, w, 3)."""
    from .imageio import resize_rgb

    arr = np.asarray(lr)
    single = arr.ndim == 3
    if single:
        arr = arr[None]
    h, w = arr.shape[1] * scale, arr.shape[2] * scale
    out = np.stack([resize_rgb(a, (h, w), method) for a in arr])
    return out[0] if single else out


# ----------------------------------------------------------------------------- model helpers


def _keras_model(model: Any) -> Any:
    if isinstance(model, (str, Path)):
        from .models.variants import load_keras_model

        p = Path(model)
        return load_keras_model(p / MODEL_FILE if p.is_dir() else p)
    return model


def sr_scale_of(model: Any) -> int:
    """The upscaling factor of an SR Keras model (from its shuffle layer)."""
    for layer in model.layers:
        if layer.__class__.__name__ == "DepthToSpace":
            return int(layer.scale)
    raise ModelError(f"{model.name}: no DepthToSpace layer: not an edgebrain SR model")


def sr_width_of(model: Any) -> float:
    feat = [layer for layer in model.layers if layer.name.endswith("_feat")]
    if not feat:
        raise ModelError(f"{model.name}: not an edgebrain SR model (no *_feat layer)")
    return float(feat[0].filters) / 64.0


def resize_sr(model: Any, lr_size: int | None, name: str = "sr") -> Any:
    """The same SR net (same weights) rebuilt for another input size (None: any size)."""
    from .models.variants import build_sr

    new = build_sr(lr_size, sr_scale_of(model), width=sr_width_of(model), name=name)
    new.set_weights(model.get_weights())
    return new


def sr_apply(model: Any, lr: np.ndarray, batch: int = 64) -> np.ndarray:
    """Run an SR net on uint8 RGB (N, h, w, 3) -> uint8 (N, h*s, w*s, 3) (clipped, rounded)."""
    m = _keras_model(model)
    if m.input_shape[1] is not None and m.input_shape[1] != lr.shape[1]:
        m = resize_sr(m, None)
    out = []
    for i in range(0, len(lr), batch):
        y = m(lr[i : i + batch].astype(np.float32) / 255.0, training=False).numpy()
        out.append(np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8))
    s = sr_scale_of(m)
    return np.concatenate(out) if out else np.zeros((0, lr.shape[1] * s, lr.shape[2] * s, 3), np.uint8)


# ----------------------------------------------------------------------------- metrics


def psnr_ssim(pred: np.ndarray, ref: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-image PSNR (dB) and SSIM of uint8 images (tf.image.psnr / tf.image.ssim, max 1.0)."""
    from .tfenv import import_tf

    tf = import_tf()
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch: {pred.shape} vs {ref.shape}")
    ps, ss = [], []
    for i in range(0, len(pred), batch):
        a = tf.constant(pred[i : i + batch].astype(np.float32) / 255.0)
        b = tf.constant(ref[i : i + batch].astype(np.float32) / 255.0)
        ps.append(tf.image.psnr(a, b, max_val=1.0).numpy())
        ss.append(tf.image.ssim(a, b, max_val=1.0).numpy())
    p = np.concatenate(ps).astype(np.float64)
    # identical images give inf PSNR: cap at 100 dB so means stay finite
    return np.minimum(p, 100.0), np.concatenate(ss).astype(np.float64)


def _summary(v: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(v)), "median": float(np.median(v)), "std": float(np.std(v))}


def _paired(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    d = a - b
    half = 1.96 * float(np.std(d, ddof=1)) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"mean": float(np.mean(d)), "ci95": [float(np.mean(d) - half), float(np.mean(d) + half)],
            "win_rate": float(np.mean(d > 0))}


def compare_upscalers(model: Any, hr: np.ndarray, scale: int, seed: int = EVAL_SEED,
                      degradation: Degradation | None = None, labels: np.ndarray | None = None,
                      class_names: Sequence[str] | None = None, lr: np.ndarray | None = None) -> dict[str, Any]:
    """SR vs bicubic vs bilinear on ``degrade(hr)`` (or on the given ``lr`` images, e.g. plain
    resizes): PSNR/SSIM against ``hr`` and paired differences."""
    deg = degradation or Degradation(scale=scale)
    lr_given = lr
    if lr is None:
        lr = degrade(hr, scale, seed, deg)
    elif lr.shape[1] * scale != hr.shape[1] or lr.shape[2] * scale != hr.shape[2]:
        raise ValueError(f"LR {lr.shape[1:3]} x{scale} does not match HR {hr.shape[1:3]}")
    outs = {"sr": sr_apply(model, lr), "bicubic": upscale(lr, scale, "bicubic"),
            "bilinear": upscale(lr, scale, "bilinear")}
    per = {k: psnr_ssim(v, hr) for k, v in outs.items()}
    res: dict[str, Any] = {
        "n": int(len(hr)), "scale": int(scale), "hr_size": [int(hr.shape[1]), int(hr.shape[2])],
        "lr_size": [int(lr.shape[1]), int(lr.shape[2])],
        "degradation": deg.to_dict() if lr_given is None else "given LR images", "degradation_seed": seed,
        "metric_library": "tf.image.psnr / tf.image.ssim (max_val 1.0, 11x11 Gaussian window), uint8 outputs",
    }
    for k, (p, s) in per.items():
        res[k] = {"psnr_db": _summary(p), "ssim": _summary(s)}
    res["sr_minus_bicubic"] = {"psnr_db": _paired(per["sr"][0], per["bicubic"][0]),
                               "ssim": _paired(per["sr"][1], per["bicubic"][1])}
    if labels is not None and class_names is not None:
        res["per_class"] = {
            c: {"n": int(np.sum(labels == i)),
                "sr_psnr_db": float(np.mean(per["sr"][0][labels == i])),
                "bicubic_psnr_db": float(np.mean(per["bicubic"][0][labels == i]))}
            for i, c in enumerate(class_names) if np.any(labels == i)
        }
    return res


def evaluate_sr(model: Any, data_dir: str | Path, hr_size: int | None = None, split: str = "Testing",
                per_class: int | None = None, seed: int = EVAL_SEED, degradation: Degradation | None = None,
                subset_seed: int = 0) -> dict[str, Any]:
    """PSNR/SSIM of an SR model (folder, file or Keras model) on ``split`` vs bicubic/bilinear.

    ``hr_size`` defaults to the size recorded in the model's card."""
    m = _keras_model(model)
    card = None
    if isinstance(model, (str, Path)):
        p = Path(model)
        card = ModelCard.find(p / MODEL_FILE if p.is_dir() else p)
    sr_info = (card.extra.get("sr") if card else None) or {}
    scale = sr_scale_of(m)
    hr = int(hr_size or sr_info.get("hr_size") or 0)
    if not hr:
        raise ModelError("evaluate_sr: give hr_size (no model card with the training size)")
    if degradation is None and sr_info.get("degradation"):
        degradation = Degradation.from_dict(sr_info["degradation"])
    ds = D.scan(data_dir)
    samples = ds.split(split) if split in D.SPLIT_DIRS else D.splits_for(ds)[split]
    if not samples:
        raise DataError(f"{data_dir}: no {split} images")
    if per_class:
        samples = D.subset(samples, per_class, subset_seed)
    arr = D.load_arrays(samples, (hr, hr), desc=split)
    res = compare_upscalers(m, arr.x, scale, seed, degradation, arr.y, ds.class_names)
    res.update({"split": split, "subset_per_class": per_class,
                "failed_files": [{"path": p, "problem": r} for p, r in arr.failed]})
    return res


# ----------------------------------------------------------------------------- training


def _patch_pairs(hr: np.ndarray, lr: np.ndarray, scale: int, patch: int, rng: np.random.Generator,
                 tries: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """One aligned (LR patch, HR patch) per image; of ``tries`` random spots, the most textured
    (most of a brain MRI is black background)."""
    n, h, w = lr.shape[:3]
    if patch >= min(h, w):
        return lr, hr
    xs_l = np.empty((n, patch, patch, 3), np.uint8)
    xs_h = np.empty((n, patch * scale, patch * scale, 3), np.uint8)
    for i in range(n):
        best, best_v = (0, 0), -1.0
        for _ in range(tries):
            r, c = int(rng.integers(0, h - patch + 1)), int(rng.integers(0, w - patch + 1))
            v = float(lr[i, r : r + patch, c : c + patch, 0].std())
            if v > best_v:
                best, best_v = (r, c), v
        r, c = best
        xs_l[i] = lr[i, r : r + patch, c : c + patch]
        xs_h[i] = hr[i, r * scale : (r + patch) * scale, c * scale : (c + patch) * scale]
    return xs_l, xs_h


def fit_sr(hr_train: np.ndarray, hr_val: np.ndarray, scale: int = 2, epochs: int = 10, seed: int = 42,
           width: float = 0.5, patch: int | None = None, batch_size: int = 32, lr: float = 1e-3,
           degradation: Degradation | None = None, verbose: int = 0) -> tuple[Any, dict[str, list[float]]]:
    """Train an SR net on arrays of high-resolution uint8 images. Each epoch draws fresh
    degradations (seed + epoch) and fresh patches; the best epoch on the validation images
    (PSNR, fixed degradation) is kept. Returns (fully convolutional model, history)."""
    from .models.variants import build_sr
    from .tfenv import keras, set_seed

    K = keras()
    set_seed(seed)
    deg = degradation or Degradation(scale=scale)
    if deg.scale != scale:
        raise ValueError(f"degradation scale {deg.scale} != SR scale {scale}")
    if len(hr_train) == 0:
        raise DataError("no training images for the SR net")
    patch = patch or max(8, 48 // scale)
    model = build_sr(None, scale, width=width, name="sr")
    steps = max(1, int(np.ceil(len(hr_train) / batch_size))) * max(1, epochs)
    sched = K.optimizers.schedules.CosineDecay(lr, decay_steps=steps, alpha=0.05)
    model.compile(optimizer=K.optimizers.Adam(sched), loss="mse")
    lr_val = degrade(hr_val, scale, seed + 10_000, deg) if len(hr_val) else None
    rng = np.random.default_rng(seed)
    hist: dict[str, list[float]] = {"loss": [], "val_psnr_db": [], "val_bicubic_psnr_db": []}
    best_w, best_p = model.get_weights(), -np.inf
    bic_val = float(np.mean(psnr_ssim(upscale(lr_val, scale), hr_val)[0])) if lr_val is not None else float("nan")
    from .progress import track

    for ep in track(range(epochs), description=f"SR x{scale} epochs", total=epochs):
        lr_tr = degrade(hr_train, scale, seed + ep, deg)
        xl, xh = _patch_pairs(hr_train, lr_tr, scale, patch, rng)
        h = model.fit(xl.astype(np.float32) / 255.0, xh.astype(np.float32) / 255.0, batch_size=batch_size,
                      epochs=1, shuffle=True, verbose=verbose)
        hist["loss"].append(float(h.history["loss"][-1]))
        if lr_val is not None:
            p = float(np.mean(psnr_ssim(sr_apply(model, lr_val), hr_val)[0]))
            hist["val_psnr_db"].append(p)
            hist["val_bicubic_psnr_db"].append(bic_val)
            if p > best_p:
                best_p, best_w = p, model.get_weights()
        else:
            best_w = model.get_weights()
    model.set_weights(best_w)
    return model, hist


def train_sr(data_dir: str | Path, out: str | Path, scale: int = 2, hr_size: int = 96, epochs: int = 10,
             seed: int = 42, width: float = 0.5, patch: int | None = None, batch_size: int = 32,
             lr: float = 1e-3, per_class: int | None = None, eval_per_class: int | None = None,
             val_fraction: float = 0.10, calib_fraction: float = 0.05,
             degradation: Degradation | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Self-supervised SR training on the *train* split (never Testing), evaluated on Testing.

    Writes ``out/model.keras`` (input ``hr_size/scale`` px), ``model_card.json`` (task
    super-resolution, degradation model, metrics), ``history.json`` and ``metrics.json``."""
    from .tfenv import import_tf

    if hr_size % scale:
        raise DataError(f"--size {hr_size} must be divisible by the scale {scale}")
    if hr_size < 16 * scale:
        raise DataError(f"--size {hr_size} too small for x{scale} (need >= {16 * scale})")
    tf = import_tf()
    deg = degradation or Degradation(scale=scale)
    ds = D.scan(data_dir)
    splits = D.splits_for(ds, seed, {"val": val_fraction, "calib": calib_fraction})
    tr_s, va_s = splits["train"], splits["val"]
    if per_class:
        tr_s = D.subset(tr_s, per_class, seed)
        va_s = D.subset(va_s, max(4, per_class // 4), seed)
    tr = D.load_arrays(tr_s, (hr_size, hr_size), desc="train")
    va = D.load_arrays(va_s, (hr_size, hr_size), desc="val")
    for p, r in tr.failed + va.failed:
        print(f"warning: skipped {p}: {r}", file=sys.stderr)
    t0 = time.time()
    model, hist = fit_sr(tr.x, va.x, scale, epochs, seed, width, patch, batch_size, lr, deg)
    secs = time.time() - t0
    lr_size = hr_size // scale
    fixed = resize_sr(model, lr_size)
    metrics = evaluate_sr(fixed, data_dir, hr_size, per_class=eval_per_class, seed=EVAL_SEED, degradation=deg,
                          subset_seed=seed)
    from .models.variants import count_params

    card = ModelCard(
        variant=f"sr-espcn-x{scale}",
        class_names=[],
        preprocess=PreprocessSpec.named("rescale", lr_size),
        input_shape=[lr_size, lr_size, 3],
        data={"root": str(Path(data_dir).resolve()), "manifest_hash": ds.manifest_hash, "split_seed": seed,
              "fractions": {"val": val_fraction, "calib": calib_fraction},
              "counts": {"train": len(tr.x), "val": len(va.x)}, "per_class_subset": per_class,
              "skipped_files": [{"path": p, "problem": r} for p, r in tr.failed + va.failed]},
        training={"epochs": epochs, "batch_size": batch_size, "lr": lr, "width": width,
                  "patch_lr": patch or max(8, 48 // scale), "loss": "mse", "seconds": round(secs, 1),
                  "params": count_params(fixed), "tf_version": tf.__version__, "seed": seed},
        metrics={"testing_psnr_db": metrics["sr"]["psnr_db"]["mean"],
                 "testing_ssim": metrics["sr"]["ssim"]["mean"],
                 "testing_bicubic_psnr_db": metrics["bicubic"]["psnr_db"]["mean"],
                 "testing_bicubic_ssim": metrics["bicubic"]["ssim"]["mean"],
                 "psnr_gain_over_bicubic_db": metrics["sr_minus_bicubic"]["psnr_db"]["mean"],
                 "ssim_gain_over_bicubic": metrics["sr_minus_bicubic"]["ssim"]["mean"],
                 "testing_n": metrics["n"]},
        versions=environment_facts(),
        extra={"task": "super-resolution", "command": " ".join(sys.argv),
               "sr": {"scale": scale, "hr_size": hr_size, "lr_size": lr_size, "width": width,
                      "degradation": deg.to_dict(), "space": "rgb/255 ([0, 1])",
                      "output_shape": [hr_size, hr_size, 3]}},
    )
    with atomic_dir(out, overwrite=overwrite) as tmp:
        fixed.save(tmp / MODEL_FILE)
        card.save(tmp)
        atomic_write_json(tmp / "history.json", hist)
        atomic_write_json(tmp / "metrics.json", metrics)
    return {"out": str(out), "card": card.to_dict(), "metrics": metrics, "history": hist}


def load_sr(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """An SR model folder (or model file) -> (Keras model, card.extra['sr'] or {})."""
    p = Path(path)
    f = p / MODEL_FILE if p.is_dir() else p
    m = _keras_model(f)
    sr_scale_of(m)
    card = ModelCard.find(f)
    return m, ((card.extra.get("sr") if card else None) or {})


# ----------------------------------------------------------------------------- sr-resnet50


@dataclass
class SRTrainingSet:
    """Arrays for training the classifier behind the SR stage."""

    x: np.ndarray  # uint8 HR-size images: native, then SR-enhanced
    y: np.ndarray
    source: np.ndarray  # 0 = native, 1 = SR-enhanced
    info: dict[str, Any] = field(default_factory=dict)


def sr_enhanced(sr_model: Any, hr: np.ndarray, scale: int, seed: int,
                degradation: Degradation | None = None) -> np.ndarray:
    """SR(degrade(hr)): the SR-enhanced version of each image, at the original size."""
    return sr_apply(sr_model, degrade(hr, scale, seed, degradation, progress=True))


def prepare_classifier_training(sr_model: Any, x: np.ndarray, y: np.ndarray, scale: int, seed: int,
                                degradation: Degradation | None = None, mix: str = "native+sr") -> SRTrainingSet:
    """The classifier sees native images and SR-enhanced ones (the SR paper's "both original
    and enhanced"). ``mix``: native+sr | sr | native."""
    if mix not in ("native+sr", "sr", "native"):
        raise ValueError(f"unknown SR training mix {mix!r} (native+sr | sr | native)")
    parts_x, parts_y, src = [], [], []
    if mix in ("native+sr", "native"):
        parts_x.append(x)
        parts_y.append(y)
        src.append(np.zeros(len(x), np.int8))
    if mix in ("native+sr", "sr"):
        parts_x.append(sr_enhanced(sr_model, x, scale, seed, degradation))
        parts_y.append(y)
        src.append(np.ones(len(x), np.int8))
    return SRTrainingSet(np.concatenate(parts_x), np.concatenate(parts_y), np.concatenate(src),
                         {"mix": mix, "degradation_seed": seed, "n_native": int(len(x)) if "native" in mix else 0,
                          "n_sr": int(len(x)) if "sr" in mix else 0})


def assemble(sr_model: Any, classifier: Any, lr_size: int) -> Any:
    """One Keras model: LR image (rescaled) -> SR stage (frozen) -> classifier."""
    from .tfenv import keras

    K = keras()
    sr = resize_sr(sr_model, lr_size, name="sr")
    sr.trainable = False
    if getattr(classifier, "optimizer", None) is not None:  # keep training state out of the artifact
        classifier = K.Model(classifier.inputs, classifier.outputs, name=classifier.name)
    inp = K.Input((lr_size, lr_size, 3), name="input_lowres")
    return K.Model(inp, classifier(sr(inp)), name="sr_resnet50")


def split_stages(model: Any) -> tuple[Any, Any]:
    """(SR stage, classifier) sub-models of an assembled sr-resnet50."""
    sr = [layer for layer in model.layers if layer.name == "sr"]
    cls = [layer for layer in model.layers if hasattr(layer, "layers") and layer.name != "sr"]
    if not sr or not cls:
        raise ModelError(f"{model.name}: not an sr-resnet50 pipeline (needs 'sr' and a classifier sub-model)")
    return sr[0], cls[-1]


def _cls_metrics(classifier: Any, x: np.ndarray, y: np.ndarray, spec: PreprocessSpec,
                 class_names: Sequence[str]) -> dict[str, Any]:
    from .metrics import classification_metrics
    from .train import predict_probs

    probs = predict_probs(classifier, x, spec)
    m = classification_metrics(y, probs, class_names)
    m["recall"] = {c: v["recall"] for c, v in m["per_class"].items()}
    m["_correct"] = probs.argmax(1) == np.asarray(y)
    return m


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, Any]:
    """Exact McNemar test (scipy binomial test on the discordant pairs): b = only A right,
    c = only B right."""
    from scipy.stats import binomtest

    b = int(np.sum(correct_a & ~correct_b))
    c = int(np.sum(~correct_a & correct_b))
    p = float(binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
    return {"b": b, "c": c, "p_value": p}


def three_way(sr_model: Any, classifier: Any, hr: np.ndarray, y: np.ndarray, spec_hr: PreprocessSpec,
              class_names: Sequence[str], scale: int, seed: int = EVAL_SEED,
              degradation: Degradation | None = None, lr_resized: np.ndarray | None = None) -> dict[str, Any]:
    """Low-resolution Testing inputs classified three ways: bicubic -> classifier,
    SR -> classifier, and (reference) native -> classifier. ``degraded`` uses the
    degradation model; ``resized`` (when given) the plain bilinear downsizing every
    downstream command applies."""
    out: dict[str, Any] = {"native": _cls_metrics(classifier, hr, y, spec_hr, class_names)}
    sources = {"degraded": degrade(hr, scale, seed, degradation)}
    if lr_resized is not None:
        sources["resized"] = lr_resized
    for name, lr in sources.items():
        out[name] = {
            "lr_size": [int(lr.shape[1]), int(lr.shape[2])],
            "bicubic": _cls_metrics(classifier, upscale(lr, scale, "bicubic"), y, spec_hr, class_names),
            "sr": _cls_metrics(classifier, sr_apply(sr_model, lr), y, spec_hr, class_names),
        }
        out[name]["sr_minus_bicubic_accuracy"] = out[name]["sr"]["accuracy"] - out[name]["bicubic"]["accuracy"]
        out[name]["mcnemar_sr_vs_bicubic"] = mcnemar(out[name]["sr"]["_correct"], out[name]["bicubic"]["_correct"])
    for rec in [out["native"]] + [out[k][w] for k in sources for w in ("bicubic", "sr")]:
        rec.pop("_correct")
    out["degradation_seed"] = seed
    out["n"] = int(len(y))
    return out


def prepare_sr_resnet50(cfg: Any, size: int, tr: D.Arrays, va: D.Arrays
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Any, dict[str, Any]]:
    """The SR stage (loaded from ``cfg.sr_model`` or trained on the train arrays) and the
    classifier's training/validation arrays: native + SR-enhanced (``cfg.sr_mix``)."""
    scale = int(cfg.sr_scale)
    if size % scale:
        raise DataError(f"sr-resnet50: --size {size} must be divisible by the SR scale {scale}")
    deg = Degradation(scale=scale)
    if cfg.sr_model:
        sr_model, rec = load_sr(cfg.sr_model)
        if sr_scale_of(sr_model) != scale:
            raise ModelError(f"{cfg.sr_model}: SR model is x{sr_scale_of(sr_model)}, --scale is x{scale}")
        if rec.get("degradation"):
            deg = Degradation.from_dict(rec["degradation"])
        info: dict[str, Any] = {"source": str(Path(cfg.sr_model).resolve()), "trained_with": rec}
        sr_model = resize_sr(sr_model, None)
    else:
        t0 = time.time()
        sr_model, hist = fit_sr(tr.x, va.x, scale, cfg.sr_epochs, cfg.seed, cfg.sr_width, degradation=deg)
        info = {"source": "trained with the classifier (same train split)", "epochs": cfg.sr_epochs,
                "width": cfg.sr_width, "seconds": round(time.time() - t0, 1), "history": hist}
    info.update({"scale": scale, "hr_size": size, "lr_size": size // scale, "degradation": deg.to_dict(),
                 "classifier_training_mix": cfg.sr_mix})
    trs = prepare_classifier_training(sr_model, tr.x, tr.y, scale, cfg.seed + 1, deg, cfg.sr_mix)
    vas = prepare_classifier_training(sr_model, va.x, va.y, scale, cfg.seed + 2, deg, cfg.sr_mix)
    info["classifier_training_set"] = trs.info
    return trs.x, trs.y, vas.x, vas.y, sr_model, info


def evaluate_sr_resnet50(sr_model: Any, classifier: Any, ds: D.Dataset, spec_hr: PreprocessSpec, cfg: Any,
                         calib_samples: Sequence[D.Sample], sr_info: dict[str, Any]) -> dict[str, Any]:
    """Three-way Testing evaluation, SR quality (PSNR/SSIM vs bicubic), the SR stage's int8
    check (calibrated on the calib split) and the ``pipeline`` record for the card."""
    scale = int(sr_info["scale"])
    hr_size = int(sr_info["hr_size"])
    lr_size = hr_size // scale
    deg = Degradation.from_dict(sr_info["degradation"])
    test = ds.split("Testing")
    if cfg.eval_per_class:
        test = D.subset(test, cfg.eval_per_class, cfg.seed)
    hr = D.load_arrays(test, (hr_size, hr_size), desc="Testing (HR)")
    lr = D.load_arrays(test, (lr_size, lr_size), desc="Testing (LR)")
    if [s.rel for s in hr.samples] != [s.rel for s in lr.samples]:
        raise DataError("Testing images decoded differently at the two sizes")
    tw = three_way(sr_model, classifier, hr.x, hr.y, spec_hr, ds.class_names, scale, EVAL_SEED, deg, lr.x)
    quality = compare_upscalers(sr_model, hr.x, scale, EVAL_SEED, deg)
    policy: dict[str, Any] | None = None
    if getattr(cfg, "sr_int8_check", True):
        cal = D.load_arrays(D.subset(calib_samples, 25, cfg.seed), (hr_size, hr_size), desc="calib")
        policy = int8_psnr_check(sr_model, degrade(cal.x, scale, cfg.seed + 3, deg), hr.x[:200], scale,
                                 DEFAULT_PSNR_BUDGET_DB, EVAL_SEED, deg)
        policy["calibration_split"] = "calib"
    summary = {"native": tw["native"]["accuracy"],
               **{src: {"bicubic": tw[src]["bicubic"]["accuracy"], "sr": tw[src]["sr"]["accuracy"]}
                  for src in ("degraded", "resized")}}
    return {
        "summary": summary, "three_way": tw,
        "sr_quality": {k: quality[k] for k in ("n", "scale", "sr", "bicubic", "bilinear", "sr_minus_bicubic")},
        "int8": policy,
        "pipeline": pipeline_record(scale, lr_size, hr_size, spec_hr, policy, len(ds.class_names)),
    }


def evaluate_pipeline(folder: str | Path, data_dir: str | Path, per_class: int | None = None,
                      seed: int = 0) -> dict[str, Any]:
    """Re-run the three-way Testing evaluation of a saved sr-resnet50 folder (its sr.keras and
    classifier.keras), e.g. after a change of evaluation seed or on another copy of the data."""
    from .models.variants import load_keras_model

    folder = Path(folder)
    card = ModelCard.find(folder / MODEL_FILE)
    if card is None or "sr" not in card.extra:
        raise ModelError(f"{folder}: no sr-resnet50 model card")
    info = card.extra["sr"]
    sr_model = load_keras_model(folder / SR_STAGE_FILE)
    cls = load_keras_model(folder / CLASSIFIER_STAGE_FILE)
    stage = card.extra["pipeline"]["stages"][1]
    spec_hr = PreprocessSpec.from_dict(stage["preprocess"])
    ds = D.scan(data_dir)
    test = ds.split("Testing")
    if per_class:
        test = D.subset(test, per_class, seed)
    hr_size, lr_size, scale = int(info["hr_size"]), int(info["lr_size"]), int(info["scale"])
    hr = D.load_arrays(test, (hr_size, hr_size), desc="Testing (HR)")
    lr = D.load_arrays(test, (lr_size, lr_size), desc="Testing (LR)")
    return three_way(sr_model, cls, hr.x, hr.y, spec_hr, ds.class_names, scale, EVAL_SEED,
                     Degradation.from_dict(info["degradation"]), lr.x)


def save_stages(folder: str | Path, composite: Any) -> dict[str, str]:
    """Write the SR stage and the classifier of an assembled pipeline as their own files."""
    from .train import save_model

    sr, cls = split_stages(composite)
    folder = Path(folder)
    save_model(sr, folder / SR_STAGE_FILE)
    save_model(cls, folder / CLASSIFIER_STAGE_FILE)
    return {"sr": SR_STAGE_FILE, "classifier": CLASSIFIER_STAGE_FILE}


def pipeline_record(scale: int, lr_size: int, hr_size: int, spec_hr: PreprocessSpec,
                    sr_precision_policy: dict[str, Any] | None = None, num_classes: int | None = None
                    ) -> dict[str, Any]:
    """``card.extra['pipeline']``: what convert / bench need to handle the stages separately."""
    return {
        "stages": [
            {"name": "sr", "file": SR_STAGE_FILE, "role": f"super-resolution x{scale}",
             "input_shape": [lr_size, lr_size, 3], "output_shape": [hr_size, hr_size, 3],
             "io_space": "rgb/255", "layer_prefix": "sr/",
             "int8_policy": sr_precision_policy or {"budget_psnr_drop_db": DEFAULT_PSNR_BUDGET_DB,
                                                     "decision": "unmeasured"}},
            {"name": "classifier", "file": CLASSIFIER_STAGE_FILE, "role": "classifier",
             "input_shape": [hr_size, hr_size, 3], "output_shape": [num_classes] if num_classes else None,
             "preprocess": spec_hr.to_dict()},
        ],
        "composite_file": MODEL_FILE,
        "custom_layers": ["edgebrain>DepthToSpace (tf.nn.depth_to_space)"],
    }


# ----------------------------------------------------------------------------- int8


def tflite_int8(model: Any, calib: np.ndarray, denylist_prefixes: Sequence[str] = ()) -> bytes:
    """Full-integer TFLite (int8 weights and activations, float I/O) calibrated on ``calib``
    (float model inputs). Ops whose node names contain one of ``denylist_prefixes`` (e.g.
    ``"/sr/"``: the SR stage of an sr-resnet50) stay float, through TFLite's selective
    quantisation (``QuantizationDebugger`` with ``denylisted_nodes``)."""
    from .tfenv import import_tf

    tf = import_tf()

    def rep() -> Any:
        for i in range(len(calib)):
            yield [calib[i : i + 1].astype(np.float32)]

    def converter() -> Any:
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = rep
        return conv

    if not denylist_prefixes:
        return bytes(converter().convert())
    listed, dbg = quantizable_nodes(converter(), rep)
    deny = [n for _, n in listed if any(p in n for p in denylist_prefixes)]
    if not deny:
        raise ModelError(f"no quantisable node matches {list(denylist_prefixes)}")
    dbg.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=deny)
    return bytes(dbg.get_nondebug_quantized_model())


def quantizable_nodes(converter: Any, rep: Any) -> tuple[list[tuple[str, str]], Any]:
    """``(op type, name)`` of the nodes TFLite quantises (from the QuantizationDebugger's layer
    dump), in graph order, and the debugger. The debugger calibrates on the converter's whole
    representative dataset (once) and runs 2 images for the dump; set its ``options`` (denylist)
    and call ``get_nondebug_quantized_model()`` to quantise without calibrating again."""
    import csv
    import io

    from .tfenv import import_tf

    tf = import_tf()

    def few() -> Any:
        for i, item in enumerate(rep()):
            if i >= 2:
                break
            yield item

    dbg = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=few)
    dbg.run()
    buf = io.StringIO()
    dbg.layer_statistics_dump(buf)
    buf.seek(0)
    return [(r["op_name"], r["tensor_name"]) for r in csv.DictReader(buf)], dbg


def run_tflite(model_bytes: bytes, x: np.ndarray, batch: int = 1) -> np.ndarray:
    """Run a TFLite model (ai-edge-litert) on float inputs; returns raw float outputs."""
    from .runtime import tflite_interpreter_class

    Interpreter, _ = tflite_interpreter_class()
    it = Interpreter(model_content=model_bytes, num_threads=1)
    inp = it.get_input_details()[0]
    out = it.get_output_details()[0]
    it.resize_tensor_input(inp["index"], [batch, *x.shape[1:]])
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    out = it.get_output_details()[0]
    ys = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch].astype(np.float32)
        if len(xb) != batch:
            it.resize_tensor_input(inp["index"], [len(xb), *x.shape[1:]])
            it.allocate_tensors()
            inp = it.get_input_details()[0]
            out = it.get_output_details()[0]
        if inp["dtype"] != np.float32:
            s, zp = inp["quantization"]
            xb = np.clip(np.rint(xb / s + zp), -128, 127).astype(inp["dtype"])
        it.set_tensor(inp["index"], xb)
        it.invoke()
        yb = it.get_tensor(out["index"])
        if out["dtype"] != np.float32:
            s, zp = out["quantization"]
            yb = (yb.astype(np.float32) - zp) * s
        ys.append(yb.astype(np.float32))
    return np.concatenate(ys)


def int8_psnr_check(sr_model: Any, calib_lr: np.ndarray, test_hr: np.ndarray, scale: int,
                    budget_db: float = DEFAULT_PSNR_BUDGET_DB, seed: int = EVAL_SEED,
                    degradation: Degradation | None = None) -> dict[str, Any]:
    """PSNR of the SR stage in float vs full-int8 TFLite on degraded Testing images, and the
    deployment decision: int8 when the drop is within ``budget_db``, else keep SR in float."""
    test_lr = degrade(test_hr, scale, seed, degradation)
    m = resize_sr(_keras_model(sr_model), int(test_lr.shape[1]))
    q = tflite_int8(m, calib_lr.astype(np.float32) / 255.0)
    y_q = run_tflite(q, test_lr.astype(np.float32) / 255.0, batch=16)
    sr_q = np.clip(np.rint(y_q * 255.0), 0, 255).astype(np.uint8)
    p_f = psnr_ssim(sr_apply(m, test_lr), test_hr)
    p_q = psnr_ssim(sr_q, test_hr)
    p_b = psnr_ssim(upscale(test_lr, scale), test_hr)
    drop = float(np.mean(p_f[0]) - np.mean(p_q[0]))
    return {
        "n": int(len(test_hr)), "calibration_n": int(len(calib_lr)),
        "float_psnr_db": float(np.mean(p_f[0])), "int8_psnr_db": float(np.mean(p_q[0])),
        "bicubic_psnr_db": float(np.mean(p_b[0])),
        "float_ssim": float(np.mean(p_f[1])), "int8_ssim": float(np.mean(p_q[1])),
        "psnr_drop_db": drop, "budget_psnr_drop_db": budget_db,
        "int8_beats_bicubic": bool(np.mean(p_q[0]) > np.mean(p_b[0])),
        "decision": "int8" if drop <= budget_db else "float",
        "int8_size_bytes": len(q),
    }
