"""Classify images with an edge artifact: ``Predictor(artifact).predict(path_or_array)``.

TensorFlow-free: NumPy, Pillow (pydicom for DICOM) and one interpreter (LiteRT, tflite-runtime,
onnxruntime or OpenVINO, chosen by :func:`edgebrain.runtime.load_runner`). The input size,
preprocessing and class names come from the artifact's manifest, whose hashes are checked
when it is loaded.

A file that cannot be read is reported by name (:class:`Failure`); the others go on.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from .artifact import Artifact, load_manifest
from .errors import ImageLoadError, ModelError
from .imageio import IMAGE_SUFFIXES, as_rgb_array, is_dicom, load_resized, resize_rgb
from .runtime import Runner, load_runner

ImageInput = Union[str, Path, np.ndarray, Any]  # a path, an array or a PIL image

SUPPORTED_TYPES = "JPEG, PNG, BMP, TIFF, DICOM"


@dataclass
class Prediction:
    """One image's result. ``latency_ms`` is decode + preprocess + inference (wall clock)."""

    file: str | None
    label: str
    index: int
    probability: float
    probabilities: dict[str, float]
    top_k: list[tuple[str, float]]
    latency_ms: float
    timings_ms: dict[str, float] = field(default_factory=dict)  # decode, preprocess, infer
    image_size: tuple[int, int] | None = None  # (height, width) before resizing, when known
    explanation: dict[str, Any] | None = None
    ct_file: str | None = None  # fused MRI+CT input: the CT image paired with ``file``

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "file": self.file,
            "label": self.label,
            "index": self.index,
            "probability": round(self.probability, 6),
            "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()},
            "top_k": [{"label": k, "probability": round(v, 6)} for k, v in self.top_k],
            "latency_ms": round(self.latency_ms, 3),
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "image_size": list(self.image_size) if self.image_size else None,
        }
        if self.explanation is not None:
            d["explanation"] = self.explanation
        if self.ct_file is not None:
            d["ct_file"] = self.ct_file
        return d


@dataclass
class Failure:
    """A file that could not be classified, and why."""

    file: str
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "error": self.error}


@dataclass
class PredictionBatch:
    predictions: list[Prediction]
    failures: list[Failure]
    skipped: list[str] = field(default_factory=list)  # non-image files found while walking folders

    @property
    def ok(self) -> bool:
        return not self.failures

    def __len__(self) -> int:
        return len(self.predictions) + len(self.failures)

    def to_dict(self) -> dict[str, Any]:
        return {
            "predictions": [p.to_dict() for p in self.predictions],
            "failures": [f.to_dict() for f in self.failures],
            "skipped": list(self.skipped),
        }


# ----------------------------------------------------------------------------- input discovery


def _walk(folder: Path, recursive: bool) -> Iterator[Path]:
    try:
        entries = sorted(folder.iterdir(), key=lambda q: q.name)
    except OSError:
        return
    for q in entries:
        if q.name.startswith("."):
            continue
        if q.is_dir():
            if recursive and not q.is_symlink():  # linked folders are not followed (no cycles)
                yield from _walk(q, recursive)
        elif q.is_file():
            yield q


def find_images(inputs: Iterable[str | Path], recursive: bool = True
                ) -> tuple[list[Path], list[Failure], list[str]]:
    """Expand files and folders into image files.

    Returns (images, failures, skipped): a named file that does not exist or is not a supported
    type is a failure; inside folders, files that are not images are only listed as skipped.
    """
    images: list[Path] = []
    failures: list[Failure] = []
    skipped: list[str] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            images.append(p)

    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            for q in _walk(p, recursive):
                # DICOM files often have no extension (IM0001, 1.2.840...): check the magic number.
                if q.suffix.lower() in IMAGE_SUFFIXES or (q.suffix.lower() not in _NEVER_IMAGES and is_dicom(q)):
                    add(q)
                else:
                    skipped.append(str(q))
        elif not p.exists():
            failures.append(Failure(str(p), "file not found"))
        elif not p.is_file():
            failures.append(Failure(str(p), "not a regular file"))
        elif p.suffix.lower() in IMAGE_SUFFIXES or is_dicom(p):
            add(p)
        else:
            failures.append(Failure(
                str(p), f"unsupported file type {p.suffix or '(no extension)'!s} (supported: {SUPPORTED_TYPES})"
            ))
    return images, failures, skipped


# Extensions that are certainly not DICOM (skip the magic-number read while walking folders).
_NEVER_IMAGES = {".txt", ".json", ".csv", ".md", ".html", ".xml", ".py", ".zip", ".gz", ".pdf", ".npy"}


# ----------------------------------------------------------------------------- the predictor


class Predictor:
    """Load an artifact once, classify many images.

    ``artifact``: an artifact folder (or its manifest.json / model file), or an
    :class:`~edgebrain.artifact.Artifact`. ``verify_with``: an Ed25519 public key (or its PEM
    file): the artifact must be signed by it. ``threads`` goes to the interpreter
    (default: all cores). ``warmup`` runs one inference at load so that the first image's
    latency is not the interpreter's allocation time.
    """

    def __init__(self, artifact: str | Path | Artifact, threads: int | None = None, top_k: int = 3,
                 verify: bool = True, warmup: bool = True, verify_with: Any = None, **runner_options: Any) -> None:
        t0 = time.perf_counter()
        if isinstance(artifact, Artifact) and verify_with is not None:
            artifact = artifact.path  # re-read: the signature covers the manifest as stored
        self.artifact = (artifact if isinstance(artifact, Artifact)
                         else load_manifest(artifact, verify=verify, public_key=verify_with))
        self.spec = self.artifact.preprocess
        shape = self.artifact.manifest.get("input_shape") or [self.spec.height, self.spec.width,
                                                               self.spec.channels]
        self.size: tuple[int, int] = (int(shape[0]), int(shape[1]))
        if self.size != self.spec.size:
            raise ModelError(f"{self.artifact.path}: manifest input_shape {shape} disagrees with its "
                             f"preprocessing size {self.spec.size}")
        self.channels = int(shape[2]) if len(shape) > 2 else 3
        self.threads = threads
        self.runner: Runner = load_runner(self.artifact, threads=threads, **runner_options)
        self.default_top_k = max(1, int(top_k))
        self._class_names: list[str] = self.artifact.class_names
        self._lut_cache: tuple[np.ndarray, tuple[int, int, int]] | None = None
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self.warmup_ms: float | None = None
        if warmup:
            t1 = time.perf_counter()
            self.infer(np.zeros((1, *self.size, 3), np.uint8))
            self.warmup_ms = (time.perf_counter() - t1) * 1e3

    # -------------------------------------------------------------- properties

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    def describe(self) -> dict[str, Any]:
        m = self.artifact.manifest
        return {
            "artifact": str(self.artifact.path), "name": self.artifact.name, "target": self.artifact.target,
            "precision": self.artifact.precision, "artifact_sha256": m.get("artifact_sha256"),
            "runtime": self.runner.name, "device": self.runner.device, "threads": self.threads,
            "input_size": list(self.size), "preprocess": self.spec.name, "class_names": self.class_names,
            "load_ms": round(self.load_ms, 1),
        }

    # -------------------------------------------------------------- steps

    def load(self, x: ImageInput) -> tuple[np.ndarray, tuple[int, int]]:
        """A path, array or PIL image -> (uint8 RGB at the model size, original (height, width))."""
        if isinstance(x, (str, Path)):
            p = Path(x)
            if p.suffix.lower() not in IMAGE_SUFFIXES and p.is_file() and not is_dicom(p):
                raise ImageLoadError(p, f"unsupported file type {p.suffix or '(no extension)'} "
                                        f"(supported: {SUPPORTED_TYPES})")
            return load_resized(p, self.size, self.spec.resize)
        try:
            rgb = as_rgb_array(x)
        except ValueError as exc:
            raise ImageLoadError("<array>", str(exc)) from exc
        return resize_rgb(rgb, self.size, self.spec.resize), (int(rgb.shape[0]), int(rgb.shape[1]))

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 RGB (N, H, W, 3) or (H, W, 3) at the model size -> float32 NHWC model input.

        uint8 input goes through a 256-entry lookup table per channel built from the manifest's
        spec: bitwise the same float32 values as ``spec.apply`` (tested), several times faster."""
        if rgb.ndim == 3:
            rgb = rgb[None]
        if rgb.dtype != np.uint8 or self.channels != 3 or rgb.shape[-1] != 3:
            x = self.spec.apply(rgb)
            if self.channels == 1:
                x = x.mean(axis=-1, keepdims=True)
            return np.ascontiguousarray(x, dtype=np.float32)
        lut, perm = self._lut
        if lut.ndim == 1:
            return np.take(lut, rgb)
        x = np.empty(rgb.shape, np.float32)
        for c in range(3):
            x[..., c] = np.take(lut[:, c], rgb[..., perm[c]])
        return x

    @property
    def _lut(self) -> tuple[np.ndarray, tuple[int, int, int]]:
        if self._lut_cache is None:
            # spec.apply on 256 grey pixels: row v holds every channel's output for input value v
            vals = np.repeat(np.arange(256, dtype=np.float32)[:, None], 3, axis=1)
            table = np.ascontiguousarray(self.spec.apply(vals), dtype=np.float32)
            perm = (2, 1, 0) if self.spec.mode == "caffe" else (0, 1, 2)
            same = all(np.array_equal(table[:, 0], table[:, c]) for c in (1, 2))
            self._lut_cache = (table[:, 0].copy() if same else table, perm)
        return self._lut_cache

    def infer(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 RGB batch at the model size -> probabilities (N, classes)."""
        return self._infer(self.preprocess(rgb))

    def _check_classes(self, probs: np.ndarray) -> None:
        n = int(probs.shape[-1])
        if not self._class_names:
            self._class_names = [f"class_{i}" for i in range(n)]
        elif len(self._class_names) != n:
            raise ModelError(f"{self.artifact.path}: the model has {n} outputs but the manifest lists "
                             f"{len(self._class_names)} class names")

    def _infer(self, inp: np.ndarray) -> np.ndarray:
        probs = np.asarray(self.runner.run(inp), np.float32)
        self._check_classes(probs)
        return probs

    # -------------------------------------------------------------- public API

    def predict(self, x: ImageInput, top_k: int | None = None, name: str | None = None) -> Prediction:
        """Classify one image (path, array or PIL image). Raises ImageLoadError for bad files."""
        t0 = time.perf_counter()
        rgb, orig = self.load(x)
        t1 = time.perf_counter()
        inp = self.preprocess(rgb)
        t2 = time.perf_counter()
        probs = self._infer(inp)
        t3 = time.perf_counter()
        if isinstance(x, (str, Path)):
            name = name or str(x)
        return self._make(probs[0], top_k, name, (t3 - t0) * 1e3,
                          {"decode": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3, "infer": (t3 - t2) * 1e3},
                          orig)

    def predict_fused(self, mri: ImageInput, ct: ImageInput, top_k: int | None = None,
                      name: str | None = None) -> Prediction:
        """Classify one co-registered MRI + CT pair with a model trained on fused input: both images
        are fused as the manifest records (``preprocess.extra.fusion``), at the MRI's resolution, then
        resized to the model size, exactly as :func:`edgebrain.fusion.load_fused` does. Raises
        ImageLoadError naming the file (for the CT: "CT partner of <mri>: ...") and FusionError for
        a model that records no fusion. ``latency_ms`` includes decoding both images and fusing."""
        from .fusion import load_fused, require_fused_input

        fs = require_fused_input(self.artifact, what=str(self.artifact.path))
        label = name or (str(mri) if isinstance(mri, (str, Path)) else "<array>")
        t0 = time.perf_counter()
        m = self._decode(mri, label)
        try:
            c = self._decode(ct, str(ct) if isinstance(ct, (str, Path)) else "<array>")
        except ImageLoadError as exc:
            raise ImageLoadError(exc.path, f"CT partner of {label}: {exc.reason}") from exc
        t1 = time.perf_counter()
        rgb = load_fused(m, c, fs, self.size)
        t2 = time.perf_counter()
        inp = self.preprocess(rgb)
        t3 = time.perf_counter()
        probs = self._infer(inp)
        t4 = time.perf_counter()
        pred = self._make(probs[0], top_k, label, (t4 - t0) * 1e3,
                          {"decode": (t1 - t0) * 1e3, "fuse": (t2 - t1) * 1e3, "preprocess": (t3 - t2) * 1e3,
                           "infer": (t4 - t3) * 1e3}, (int(m.shape[0]), int(m.shape[1])))
        pred.ct_file = str(ct) if isinstance(ct, (str, Path)) else None
        return pred

    @staticmethod
    def _decode(x: ImageInput, label: str) -> np.ndarray:
        """A path, array or PIL image -> uint8 RGB at its own size (no resizing)."""
        if isinstance(x, (str, Path)):
            from .imageio import load_rgb

            p = Path(x)
            if p.suffix.lower() not in IMAGE_SUFFIXES and p.is_file() and not is_dicom(p):
                raise ImageLoadError(p, f"unsupported file type {p.suffix or '(no extension)'} "
                                        f"(supported: {SUPPORTED_TYPES})")
            return load_rgb(p)
        try:
            return as_rgb_array(x)
        except ValueError as exc:
            raise ImageLoadError(label, str(exc)) from exc

    def _make(self, p: np.ndarray, top_k: int | None, name: str | None, latency: float,
              timings: dict[str, float], orig: tuple[int, int] | None) -> Prediction:
        k = min(len(p), max(1, top_k or self.default_top_k))
        order = np.argsort(-p, kind="stable")
        names = self._class_names
        i = int(order[0])
        return Prediction(
            file=name, label=names[i], index=i, probability=float(p[i]),
            probabilities={names[j]: float(p[j]) for j in range(len(p))},
            top_k=[(names[int(j)], float(p[int(j)])) for j in order[:k]],
            latency_ms=latency, timings_ms=timings, image_size=orig,
        )

    def iter_predict(self, inputs: Iterable[ImageInput], top_k: int | None = None
                     ) -> Iterator[Prediction | Failure]:
        """Predict each input in order, yielding a Failure (file + reason) instead of raising."""
        for i, x in enumerate(inputs):
            label = str(x) if isinstance(x, (str, Path)) else f"<array {i}>"
            try:
                yield self.predict(x, top_k, name=label)
            except ImageLoadError as exc:
                yield Failure(label, exc.reason)
            except Exception as exc:  # one bad input never ends the run; the reason is kept
                yield Failure(label, f"{type(exc).__name__}: {exc}")

    def predict_many(self, inputs: Iterable[ImageInput] | str | Path, top_k: int | None = None,
                     recursive: bool = True, progress: bool = False) -> PredictionBatch:
        """Classify files, folders (walked for image files) or arrays; failures are collected."""
        if isinstance(inputs, (str, Path)):
            inputs = [inputs]
        items = list(inputs)
        paths = [x for x in items if isinstance(x, (str, Path))]
        failures: list[Failure] = []
        skipped: list[str] = []
        todo: list[ImageInput] = []
        if paths:
            found, failures, skipped = find_images(paths, recursive)
            todo.extend(found)
        todo.extend(x for x in items if not isinstance(x, (str, Path)))
        it: Iterable[ImageInput] = todo
        if progress:
            from .progress import track

            it = track(todo, description="predicting", total=len(todo))
        preds: list[Prediction] = []
        for r in self.iter_predict(it, top_k):
            if isinstance(r, Failure):
                failures.append(r)
            else:
                preds.append(r)
        return PredictionBatch(preds, failures, skipped)

    def probabilities(self, rgb_batch: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Probabilities for a uint8 RGB batch already at the model size (batched inference)."""
        out = [self.infer(rgb_batch[i:i + batch_size]) for i in range(0, len(rgb_batch), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self._class_names)), np.float32)


def predict(artifact: str | Path | Artifact, images: Sequence[ImageInput] | str | Path, top_k: int = 3,
            threads: int | None = None) -> PredictionBatch:
    """One-shot convenience: load ``artifact`` and classify ``images`` (files, folders or arrays)."""
    return Predictor(artifact, threads=threads, top_k=top_k).predict_many(images, top_k)


__all__ = ["Failure", "Prediction", "PredictionBatch", "Predictor", "find_images", "predict"]
