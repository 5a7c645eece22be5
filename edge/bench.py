"""``edgebrain bench``: accuracy and speed of artifacts on a device, against the FP32 reference.

For each artifact x device, one fresh worker process (:mod:`edgebrain.remote`, TensorFlow-free,
here or on the device over SSH) measures cold start, model-only batch-1 latency, throughput,
end-to-end time per image from its file, and peak RSS, and returns the class probabilities
for every evaluation image. The FP32 source model runs the same way in TensorFlow (on a GPU
when one is visible; the record says what it really ran on). The host then computes accuracy
with a bootstrap CI, macro-F1, per-class figures, the confusion matrix, top-1 agreement and
McNemar's exact test against the reference, expected calibration error and the list of
flipped images, and writes ``results.json`` (schema: ``edgebrain/schemas/results.schema.json``),
``results.md`` and ``report.html``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shlex
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import __version__
from . import data as D
from .artifact import MANIFEST, Artifact, load_manifest, raw_artifact
from .errors import DataError, EdgebrainError, IntegrityError
from .io import atomic_dir, atomic_write_json, atomic_write_text, sha256_path, sha256_text
from .modelcard import ModelCard
from .preprocess import PreprocessSpec
from .remote import DEFAULT_TIMING, build_runtime_zip, run_jobs

SCHEMA_VERSION = 1
KIND = "edgebrain-bench-results"
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "results.schema.json"
KERAS_SUFFIXES = {".keras", ".h5", ".hdf5"}
BUSY_WARN = 0.05  # warn when other processes took more than this share of the CPUs during timing
EDGE_SUFFIXES = {".tflite", ".onnx", ".xml"}


class BenchError(EdgebrainError):
    pass


@dataclass
class BenchOptions:
    threads: int | None = None  # None: the profile's, else every CPU the worker may use
    cpus: list[int] | None = None  # CPU affinity (os.sched_setaffinity), recorded
    warmup: int = DEFAULT_TIMING["warmup"]
    min_runs: int = DEFAULT_TIMING["min_runs"]
    min_seconds: float = DEFAULT_TIMING["min_seconds"]
    batch: int = DEFAULT_TIMING["batch"]
    throughput_min_runs: int = DEFAULT_TIMING["throughput_min_runs"]
    throughput_min_seconds: float = DEFAULT_TIMING["throughput_min_seconds"]
    n_boot: int = 2000  # bootstrap resamples for the accuracy CI
    ece_bins: int = 15
    seed: int = 0  # bootstrap and --per-class subset seed
    job_timeout: float | None = None  # seconds per model (None: no limit)
    max_flips: int = 500  # flipped images listed per record
    reference_device: str = "auto"  # "auto" (GPU when visible) | "cpu"

    def timing(self) -> dict[str, Any]:
        return {"warmup": self.warmup, "min_runs": self.min_runs, "min_seconds": self.min_seconds,
                "batch": self.batch, "throughput_min_runs": self.throughput_min_runs,
                "throughput_min_seconds": self.throughput_min_seconds}


@dataclass
class SSHOptions:
    identity: str | None = None
    known_hosts: str | None = None
    options: list[str] = field(default_factory=list)
    remote_python: str = "python3"
    keep_remote: bool = False
    connect_timeout: int = 20


@dataclass
class Item:
    """One model to benchmark: an edge artifact (folder or raw file) or a Keras model (TensorFlow)."""

    path: Path  # as given
    kind: str  # "edge" | "keras"
    name: str
    target: str
    precision: str
    spec: PreprocessSpec
    class_names: list[str]
    sha256: str
    model_files: list[Path]
    artifact: Artifact | None = None
    raw_manifest: dict[str, Any] | None = None  # for raw edge files: the manifest computed here
    source: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return int(sum(p.stat().st_size for p in self.model_files))

    def gzip_bytes(self) -> int:
        data = b"".join(p.read_bytes() for p in self.model_files)
        return len(gzip.compress(data, compresslevel=9))


# ----------------------------------------------------------------------------- statistics


def bootstrap_ci(correct: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap CI of the mean of a 0/1 vector (accuracy)."""
    c = np.asarray(correct, np.float64)
    if c.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, np.float64)
    chunk = max(1, int(4_000_000 // max(1, c.size)))
    for i in range(0, n_boot, chunk):
        k = min(chunk, n_boot - i)
        means[i:i + k] = c[rng.integers(0, c.size, size=(k, c.size))].mean(axis=1)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return [float(lo), float(hi)]


def mcnemar_exact(ref_correct: np.ndarray, new_correct: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test: b = reference right / new wrong, c = reference wrong / new right;
    two-sided exact binomial p-value (scipy.stats.binomtest) on the discordant pairs."""
    from scipy.stats import binomtest

    r = np.asarray(ref_correct, bool)
    n = np.asarray(new_correct, bool)
    b = int(np.sum(r & ~n))
    c = int(np.sum(~r & n))
    p = 1.0 if b + c == 0 else float(binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue)
    return {"b": b, "c": c, "p_value": min(1.0, p), "test": "exact binomial (two-sided)"}


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (top-1 confidence vs accuracy)."""
    p = np.asarray(probs, np.float64)
    if len(p) == 0:
        return float("nan")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(y)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def accuracy_block(y: np.ndarray, probs: np.ndarray, class_names: Sequence[str], n_boot: int, seed: int,
                   ece_bins: int) -> dict[str, Any]:
    from .metrics import classification_metrics

    m = classification_metrics(y, probs, class_names)
    correct = probs.argmax(axis=1) == y
    return {
        "n": m["n"], "accuracy": m["accuracy"], "accuracy_ci95": bootstrap_ci(correct, n_boot, seed),
        "macro_f1": m["macro_f1"], "per_class": m["per_class"], "confusion_matrix": m["confusion_matrix"],
        "ece": expected_calibration_error(probs, y, ece_bins),
    }


# ----------------------------------------------------------------------------- resolving inputs


def _detect_hw(path: Path) -> tuple[int, int] | None:
    """Input height/width of a raw model file, when static."""
    try:
        if path.suffix == ".tflite":
            from .runtime import tflite_interpreter_class

            Interp, _ = tflite_interpreter_class()
            shape = Interp(model_path=str(path)).get_input_details()[0]["shape"]
            return int(shape[1]), int(shape[2])
        if path.suffix == ".onnx":
            import onnxruntime as ort

            shape = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
            return int(shape[1]), int(shape[2])
        if path.suffix == ".xml":
            import openvino as ov

            ps = ov.Core().read_model(str(path)).input(0).get_partial_shape()
            return int(ps[1].get_length()), int(ps[2].get_length())
    except Exception:
        return None
    return None


def _refuse_nchw_onnx(path: Path) -> None:
    """The edge runners feed NHWC images: a raw NCHW ONNX file is refused with the way out."""
    if path.suffix.lower() != ".onnx":
        return
    try:
        import onnx

        m = onnx.load(str(path), load_external_data=False)
        inits = {i.name for i in m.graph.initializer}
        inp = next(i for i in m.graph.input if i.name not in inits)
        dims = [d.dim_value or None for d in inp.type.tensor_type.shape.dim]
    except Exception:
        return  # unreadable here: the runner says why
    if len(dims) == 4 and dims[1] in (1, 3) and dims[3] not in (1, 3):
        raise BenchError(f"{path}: input {inp.name!r} is NCHW {dims}; the edge runners feed NHWC images. Run "
                         "`edgebrain convert` on it first (it adds a transpose at the input and writes a manifest)")


def _spec_for_raw(path: Path, preprocess: str | None, input_size: int | None, what: str) -> PreprocessSpec:
    _refuse_nchw_onnx(path)
    if not preprocess:
        raise BenchError(f"{path}: a {what} without a manifest needs --preprocess (e.g. rescale, caffe, "
                         "xception, imagenet or meanstd:M,M,M/S,S,S) and --classes")
    size: Any = input_size
    if size is None and path.suffix in EDGE_SUFFIXES:
        size = _detect_hw(path)
    if size is None:
        raise BenchError(f"{path}: cannot read the model's input size; give --input-size")
    try:
        return PreprocessSpec.named(preprocess, size)
    except ValueError as exc:
        raise BenchError(f"--preprocess: {exc}") from exc


def resolve_item(path: str | Path, preprocess: str | None = None, classes: Sequence[str] | None = None,
                 input_size: int | None = None, precision: str | None = None,
                 spec: PreprocessSpec | None = None) -> Item:
    """An artifact folder / manifest / raw model file / Keras model -> Item (hash-checked).
    ``spec`` overrides ``preprocess``/``input_size`` for files without a manifest or card."""
    p = Path(path)
    if not p.exists():
        raise BenchError(f"{p}: no such file or folder")
    if p.is_file() and p.name == MANIFEST:
        p = p.parent
    folder = p if p.is_dir() else p.parent
    if (folder / MANIFEST).is_file() and (p.is_dir() or p.suffix in EDGE_SUFFIXES):
        art = load_manifest(folder)  # refuses modified files and failed verification
        if p.is_file() and art.model_file.resolve() != p.resolve():
            raise BenchError(f"{p}: the manifest beside it describes {art.model_file.name}, not this file")
        files = [folder / art.manifest["model_file"]]
        if art.target == "openvino":
            b = files[0].with_suffix(".bin")
            if b.is_file():
                files.append(b)
        return Item(folder, "edge", art.name, art.target, art.precision, art.preprocess, art.class_names,
                    str(art.manifest["artifact_sha256"]), files, artifact=art, source=art.manifest.get("source"),
                    warnings=list(art.manifest.get("warnings") or []))
    if p.is_file() and p.suffix.lower() in EDGE_SUFFIXES:
        spec = spec or _spec_for_raw(p, preprocess, input_size, "raw model file")
        if not classes:
            raise BenchError(f"{p}: a raw model file needs --classes (comma-separated, in the model's output "
                             "order)")
        art = raw_artifact(p, spec, list(classes), precision=precision or "unknown")
        files = [p]
        if art.target == "openvino":
            b = p.with_suffix(".bin")
            if not b.is_file():
                raise BenchError(f"{p}: the OpenVINO weights file {b.name} is missing")
            art.manifest["files"][b.name] = sha256_path(b)
            files.append(b)
        art.manifest["name"] = p.stem
        return Item(p, "edge", p.stem, art.target, art.precision, spec, list(classes), art.manifest["artifact_sha256"],
                    files, artifact=art, raw_manifest=art.manifest, source=None,
                    warnings=[f"{p.name}: raw file without a manifest: preprocessing and classes come from "
                              "the command line; precision is " + (precision or "unknown")])
    keras_dir = p.is_dir() and (p / "saved_model.pb").is_file()
    if p.is_dir() and (p / "model.keras").is_file():
        p = p / "model.keras"
    if keras_dir or p.suffix.lower() in KERAS_SUFFIXES:
        card = ModelCard.find(p)
        if spec is None and card is not None and not preprocess:
            spec, names = card.preprocess, list(classes or card.class_names)
        else:
            spec = spec or _spec_for_raw(p, preprocess, input_size or (card.preprocess.height if card else None),
                                         "Keras model")
            names = list(classes or (card.class_names if card else []))
        if not names:
            raise BenchError(f"{p}: no model_card.json beside it: give --classes")
        files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
        from .converters.source import detect_format

        return Item(p, "keras", p.stem if p.is_file() else p.name, "tensorflow", "fp32", spec, names,
                    sha256_path(p), files, source={"path": str(p), "format": detect_format(p)[0]})
    raise BenchError(f"{p}: not an artifact folder (no {MANIFEST}), nor a .tflite/.onnx/.xml/.keras/.h5 file")


def check_signed(items: Sequence[Item], public_key: str | Path | None) -> None:
    """With ``public_key`` (``--verify-with``): every benchmarked item must be an artifact folder whose
    manifest carries a valid Ed25519 signature by that key (raw model files and Keras models cannot be)."""
    if public_key is None:
        return
    from .signing import load_public_key

    key = load_public_key(public_key)
    for it in items:
        if it.artifact is None or it.raw_manifest is not None:
            raise BenchError(f"{it.path}: --verify-with accepts only signed artifact folders, not a raw or Keras "
                             "model file")
        load_manifest(it.artifact.path, public_key=key)


def resolve_reference(items: Sequence[Item], reference: str | Path | None,
                      preprocess: str | None, classes: Sequence[str] | None,
                      input_size: int | None, warnings: list[str]) -> Item:
    """The FP32 source model: --reference, else the artifacts' manifest source (hash-checked)."""
    sources = {}
    for it in items:
        if it.kind == "edge" and it.source and it.source.get("path"):
            sources.setdefault((it.source.get("sha256"), it.source["path"]), []).append(it.name)
    if reference is None:
        if not sources:
            raise BenchError("no FP32 reference: the artifacts carry no source model path; pass --reference MODEL "
                             "(the Keras model they were converted from), or --no-reference")
        shas = {k[0] for k in sources}
        if len(shas) > 1:
            listing = "; ".join(f"{path} ({', '.join(names)})" for (_, path), names in sources.items())
            raise BenchError(f"the artifacts come from different source models ({listing}); bench them "
                             "separately or pass --reference")
        (sha, src_path), _ = next(iter(sources.items()))
        ref_path = Path(src_path)
        if not ref_path.exists():
            raise BenchError(f"the FP32 source model recorded in the manifests is not there: {ref_path}; "
                             "pass --reference MODEL")
        got = sha256_path(ref_path)
        if sha and got != sha:
            raise IntegrityError(f"{ref_path}: sha256 {got[:12]}… differs from the source recorded in the "
                                 f"manifests ({sha[:12]}…): it is not the model these artifacts were converted "
                                 "from. Pass --reference to compare with it anyway.")
    else:
        ref_path = Path(reference)
        got = sha256_path(ref_path) if ref_path.exists() else ""
        for (sha, src), names in sources.items():
            if sha and got and sha != got:
                warnings.append(f"--reference {ref_path} is not the recorded source of {', '.join(names)} "
                                f"({src}); agreement is against a different model")
    # Spec and classes: the card beside it, else what the artifacts say, else the command line.
    first = next((it for it in items if it.kind == "edge"), None)
    if ModelCard.find(ref_path) is None and first is not None and not preprocess:
        ref = resolve_item(ref_path, None, classes or first.class_names, None, spec=first.spec)
    else:
        ref = resolve_item(ref_path, preprocess, classes, input_size)
    if ref.kind == "edge" and ref.precision not in ("fp32", "unknown"):
        warnings.append(f"the reference {ref_path} is a {ref.precision} model, not FP32")
    if ref.kind == "edge" and ref.precision == "unknown":
        warnings.append(f"the reference {ref_path} records no precision; it is labelled fp32 on trust (it "
                        "should be the float32 model the artifacts were converted from)")
        ref.precision = "fp32"
    ref.name = ref.path.name if ref.path.name != "model.keras" else f"{ref.path.parent.name}/{ref.path.name}"
    for it in items:
        if it.spec.to_dict() != ref.spec.to_dict():
            warnings.append(f"{it.name}: preprocessing {it.spec.name}@{it.spec.height} differs from the "
                            f"reference's {ref.spec.name}@{ref.spec.height}")
    return ref


def select_samples(data_dir: str | Path, split: str = "Testing", eval_list: str | Path | None = None,
                   per_class: int | None = None, seed: int = 0
                   ) -> tuple[D.Dataset, list[D.Sample], set[str] | None, dict[str, Any]]:
    # Every file is hashed (a fraction of a second for this dataset): the deduplicated list and
    # list_hash then rest on the files as they are, not on what MANIFEST.sha256 says they were.
    ds = D.scan(data_dir, verify_hashes=True)
    changed = [p for p, r in ds.problems if r == "content differs from MANIFEST.sha256"]
    if changed:
        print(f"warning: {len(changed)} image(s) differ from {Path(data_dir) / 'MANIFEST.sha256'} (e.g. "
              f"{changed[0]}); their actual content hashes are used", file=sys.stderr)
    if eval_list:
        samples = D.read_list(eval_list, ds)
        split_name = f"list:{Path(eval_list).name}"
    else:
        if split not in D.SPLIT_DIRS:
            raise DataError(f"--split must be one of {', '.join(D.SPLIT_DIRS)}")
        samples = ds.split(split)
        split_name = split
        if split == "Training":
            print("warning: evaluating on Training images: models saw them during training", file=sys.stderr)
    if per_class:
        samples = D.subset(samples, per_class, seed)
    if not samples:
        raise DataError(f"{data_dir}: no images to evaluate in {split_name}")
    dedup: set[str] | None = None
    if not eval_list and split == "Testing":
        dedup = {s.rel for s in D.dedup_eval(ds)}
    info = {
        "root": str(Path(data_dir).resolve()), "split": split_name, "n_requested": len(samples),
        "list_hash": sha256_text("".join(f"{s.sha256}  {s.rel}\n" for s in samples)),
        "class_names": list(ds.class_names), "per_class": per_class,
        "eval_list": str(eval_list) if eval_list else None, "manifest_hash": ds.manifest_hash,
        "scan_problems": [{"file": p, "problem": r} for p, r in ds.problems],
    }
    return ds, samples, dedup, info


def _class_perm(item: Item, class_names: Sequence[str]) -> list[int]:
    """Column order mapping the item's outputs to the dataset's class order."""
    if sorted(item.class_names) != sorted(class_names):
        raise BenchError(f"{item.path}: classes {item.class_names} do not match the dataset's {list(class_names)}")
    return [item.class_names.index(c) for c in class_names]


# ----------------------------------------------------------------------------- the reference worker (TF)


def _device_label(tf_device: str) -> str:
    """'/job:localhost/replica:0/task:0/device:GPU:0' -> 'GPU:0'."""
    s = tf_device.rsplit("device:", 1)[-1] if "device:" in tf_device else tf_device
    return s.strip("/") or "CPU"


class KerasRunner:
    """A tf-keras model behind a tf.function; ``device`` says where the ops really ran."""

    def __init__(self, model_path: str, threads: int | None, where: str = "auto", unsafe: bool = False) -> None:
        from .tfenv import import_tf

        tf = import_tf()
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(1)
        self.tf = tf
        gpus = tf.config.list_physical_devices("GPU") if where == "auto" else []
        self.visible_gpus = [g.name for g in tf.config.list_physical_devices("GPU")]
        self.gpu_names = []
        for g in gpus:
            try:
                self.gpu_names.append(tf.config.experimental.get_device_details(g).get("device_name", g.name))
            except Exception:
                self.gpu_names.append(g.name)
        self._place = "/GPU:0" if gpus else "/CPU:0"
        # TensorFlow runs float32 matmuls and convolutions in TF32 on Ampere and newer GPUs by default
        # (10-bit mantissa): not an FP32 reference. Turned off everywhere, and recorded.
        tf.config.experimental.enable_tensor_float_32_execution(False)
        self.inference_precision = "f32"
        self.tf32 = bool(tf.config.experimental.tensor_float_32_execution_enabled())
        from .converters.source import load_keras

        with tf.device(self._place):
            self.format, self.model = load_keras(model_path, unsafe=unsafe)  # tf-keras or Keras 3
        model = self.model

        @tf.function(reduce_retracing=True)
        def fn(x: Any) -> Any:
            return model(x, training=False)

        self.fn = fn
        self.name = f"tensorflow {tf.__version__}"
        self.device = "unknown (not run yet)"

    def bind(self, x: np.ndarray) -> Any:
        """The tf.function call on an input already on the device (``.numpy()`` waits for the result)."""
        with self.tf.device(self._place):
            xc = self.tf.constant(np.asarray(x, np.float32))
        fn, place, tf = self.fn, self._place, self.tf

        def call() -> Any:
            with tf.device(place):
                return fn(xc).numpy()
        return call

    def run(self, x: np.ndarray) -> np.ndarray:
        with self.tf.device(self._place):
            y = self.fn(self.tf.constant(np.asarray(x, np.float32)))
        label = _device_label(y.device)
        if label.startswith("GPU") and self.gpu_names:
            label = f"{label} ({self.gpu_names[0]})"
        self.device = label
        from .runtime import _softmax_if_logits

        return _softmax_if_logits(y.numpy())


def _keras_job(job: dict[str, Any], base: Path) -> dict[str, Any]:
    from .remote import measure, set_affinity

    cpus = set_affinity(job.get("cpus"))
    threads = job.get("threads") or (len(cpus) if cpus else os.cpu_count())
    spec = PreprocessSpec.from_dict(job["preprocess"])
    holder: dict[str, KerasRunner] = {}

    def make() -> KerasRunner:
        holder["r"] = KerasRunner(job["model"], threads, job.get("where", "auto"), bool(job.get("unsafe")))
        return holder["r"]

    res = measure(job, make, spec, base)
    r = holder["r"]
    res.update({"threads": threads, "cpus": cpus, "runtime_options": {"placement": r._place, "tf32": r.tf32},
                "visible_gpus": r.visible_gpus, "tensorflow_imported": True})
    return res


def _keras_worker_main(argv: list[str]) -> int:
    from .remote import worker_main

    return worker_main(argv[0], argv[1], run=_keras_job)


KERAS_WORKER = [sys.executable, "-c",
                "import sys; from edgebrain.bench import _keras_worker_main; sys.exit(_keras_worker_main(sys.argv[1:]))"]


# ----------------------------------------------------------------------------- running


def _threads_cpus(dev: Any, opts: BenchOptions) -> tuple[int | None, list[int] | None]:
    cpus = opts.cpus or dev.profile.cpus
    threads = opts.threads or (len(cpus) if opts.cpus else None) or dev.profile.threads
    return threads, cpus


def _edge_job(item: Item, dev: Any, opts: BenchOptions, images: list[list[str]], artifact_ref: str,
              label: str) -> dict[str, Any]:
    threads, cpus = _threads_cpus(dev, opts)
    return {"label": label, "artifact": artifact_ref, "manifest": item.raw_manifest,
            "expected_sha256": item.sha256, "images": images, "threads": threads, "cpus": cpus,
            "runtime_options": dev.profile.target_options(item.target), "timing": opts.timing()}


def _keras_job_spec(item: Item, dev: Any, opts: BenchOptions, images: list[list[str]], label: str,
                    unsafe: bool) -> dict[str, Any]:
    threads, cpus = _threads_cpus(dev, opts)
    return {"label": label, "model": str(item.path.resolve()), "preprocess": item.spec.to_dict(),
            "images": images, "threads": threads, "cpus": cpus, "timing": opts.timing(),
            "where": opts.reference_device, "unsafe": unsafe}


def _run_local(items: Sequence[Item], dev: Any, opts: BenchOptions, samples: Sequence[D.Sample],
               unsafe: bool, feed: dict[str, Path] | None = None) -> list[dict[str, Any]]:
    feed = feed or {}
    images = [[s.rel, str(feed.get(s.rel, s.path).resolve())] for s in samples]
    out: list[dict[str, Any] | None] = [None] * len(items)
    with tempfile.TemporaryDirectory(prefix="edgebrain-bench-") as td:
        tdp = Path(td)
        for kind, worker in (("keras", KERAS_WORKER), ("edge", None)):
            idx = [i for i, it in enumerate(items) if it.kind == kind]
            if not idx:
                continue
            files = []
            for i in idx:
                it = items[i]
                label = it.name
                if kind == "keras":
                    job = _keras_job_spec(it, dev, opts, images, label, unsafe)
                else:
                    ref = str((it.artifact.path if it.raw_manifest is None else it.path).resolve())  # type: ignore[union-attr]
                    job = _edge_job(it, dev, opts, images, ref, label)
                jf = f"job-{i:03d}.json"
                (tdp / jf).write_text(json.dumps(job), encoding="utf-8")
                files.append(jf)
            env = dict(os.environ)
            for i, res in zip(idx, run_jobs(tdp, files, worker=worker, timeout=opts.job_timeout, env=env)):
                out[i] = res
    return [r for r in out if r is not None]


def _tar_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = int(time.time())
    tar.addfile(ti, io.BytesIO(data))


def _safe_name(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)[:60] or "model"


def _run_remote(items: Sequence[Item], dev: Any, opts: BenchOptions, samples: Sequence[D.Sample],
                ssh: SSHOptions, feed: dict[str, Path] | None = None) -> list[dict[str, Any]]:
    """Copy the edge runtime zip, the artifacts and the images to the device, run there, fetch results.
    ``feed``: relative image path -> the file to ship instead (fused MRI+CT inputs, lossless PNG)."""
    from .devices import SSHError, SSHTransport

    assert dev.address is not None
    results: list[dict[str, Any] | None] = [None] * len(items)
    runnable = []
    for i, it in enumerate(items):
        if it.kind != "edge":
            results[i] = {"ok": False, "error": "Keras models run in TensorFlow on the host only; convert them "
                                                "to an edge artifact to benchmark them on a device"}
        else:
            runnable.append(i)
    if not runnable:
        return [r for r in results if r is not None]
    tr = SSHTransport(dev.address, ssh.identity, ssh.known_hosts, ssh.connect_timeout, ssh.options)
    feed = feed or {}
    arcs = {s.rel: f"images/{s.rel}" + (".fused.png" if s.rel in feed else "") for s in samples}
    images = [[s.rel, arcs[s.rel]] for s in samples]
    with tempfile.TemporaryDirectory(prefix="edgebrain-bench-ssh-") as td:
        tdp = Path(td)
        bundle = tdp / "job.tar"
        jobs = []
        with tarfile.open(bundle, "w") as tar:
            for s in samples:
                tar.add(str(feed.get(s.rel, s.path)), arcname=arcs[s.rel])
            for i in runnable:
                it = items[i]
                adir = f"artifacts/{i:03d}-{_safe_name(it.name)}"
                if it.raw_manifest is None:
                    assert it.artifact is not None
                    for rel in [*it.artifact.manifest["files"], MANIFEST]:
                        tar.add(str(it.artifact.path / rel), arcname=f"{adir}/{rel}")
                    ref = adir
                else:
                    for f in it.model_files:
                        tar.add(str(f), arcname=f"{adir}/{f.name}")
                    ref = f"{adir}/{it.model_files[0].name}"
                job = _edge_job(it, dev, opts, images, ref, it.name)
                jf = f"job-{i:03d}.json"
                data = json.dumps(job).encode()
                _tar_bytes(tar, jf, data)
                jobs.append(jf)
            _tar_bytes(tar, "jobs.json", json.dumps({"jobs": jobs, "timeout": opts.job_timeout}).encode())
        zpath = build_runtime_zip(tdp / "edgebrain.zip")
        rdir = tr.mkdtemp("edgebrain-bench")
        try:
            mb = (bundle.stat().st_size + zpath.stat().st_size) / 1e6
            print(f"{dev.label}: copying {len(samples)} images and {len(runnable)} artifact(s) ({mb:.1f} MB) "
                  f"to {rdir}", file=sys.stderr)
            # --timeout bounds each model on the device; the copies get ten minutes each, and the
            # remote run that much per model plus ten minutes for unpacking and start-up.
            copy_limit = None if opts.job_timeout is None else 600.0
            tr.put([zpath, bundle], rdir, timeout=copy_limit)
            q = shlex.quote
            cmd = (f"cd {q(rdir)} && PYTHONPATH={q(rdir + '/edgebrain.zip')} EDGEBRAIN_QUIET=1 "
                   f"EDGEBRAIN_PROGRESS=lines {q(ssh.remote_python)} -m edgebrain.remote run-bundle job.tar "
                   f"{q(rdir)} {q(rdir + '/results.json')}")
            total = None if opts.job_timeout is None else opts.job_timeout * len(runnable) + 600
            try:
                tr.run(cmd, stream_stderr=True, timeout=total)
            except SSHError as exc:
                msg = str(exc)
                if "No module named" in msg:
                    msg += (f"\nThe device's {ssh.remote_python} lacks a package the edge runtime needs: install "
                            "numpy, pillow and a runtime (ai-edge-litert, onnxruntime or openvino) there, or "
                            "point --remote-python at a virtualenv's python")
                raise SSHError(msg) from exc
            tr.get(f"{rdir}/results.json", tdp / "results.json", timeout=copy_limit)
        finally:
            if not ssh.keep_remote:
                try:
                    tr.remove(rdir)
                except SSHError as exc:
                    print(f"warning: could not remove {rdir} on the device: {exc}", file=sys.stderr)
        fetched = json.loads((tdp / "results.json").read_text(encoding="utf-8"))
    for i, res in zip(runnable, fetched["results"]):
        res["transport"] = dev.address.url
        results[i] = res
    return [r for r in results if r is not None]


# ----------------------------------------------------------------------------- records


def _device_block(dev: Any, res: dict[str, Any], reference: bool = False) -> dict[str, Any]:
    from .devices import compare_facts

    fp = res.get("fingerprint") or {}
    warns = compare_facts(dev.profile, fp) if not reference else []
    return {
        "profile": dev.profile.name if not reference else "host",
        "label": dev.label if not reference else "host",
        "transport": dev.transport if not reference else "local",
        "fingerprint": fp,
        "runtime": res.get("runtime"),
        "threads": res.get("threads"),
        "cpus": res.get("cpus"),
        "ran_on": res.get("ran_on"),
        "execution_precision": res.get("execution_precision"),
        "runtime_options": res.get("runtime_options") or {},
        "edgebrain_origin": res.get("edgebrain_origin"),
        "tensorflow_imported": res.get("tensorflow_imported"),
        "visible_gpus": res.get("visible_gpus"),
        "profile_facts": dev.profile.facts if not reference else None,
        "warnings": warns,
    }


def _record(item: Item, dev: Any, res: dict[str, Any], ids: list[str], y: np.ndarray,
            class_names: Sequence[str], ref: dict[str, Any] | None, dedup: set[str] | None,
            opts: BenchOptions, sizes: dict[str, tuple[int, int]], is_reference: bool = False) -> dict[str, Any]:
    pos = {i: k for k, i in enumerate(res["ids"])}
    perm = _class_perm(item, class_names)
    probs = np.asarray([res["probs"][pos[i]] for i in ids], np.float64)[:, perm]
    acc = accuracy_block(y, probs, class_names, opts.n_boot, opts.seed, opts.ece_bins)
    pred = probs.argmax(1)
    rec: dict[str, Any] = {
        "artifact": str(item.path), "name": item.name, "artifact_sha256": item.sha256,
        "target": item.target, "precision": item.precision, "kind": item.kind,
        "device": _device_block(dev, res, is_reference),
        "n": acc["n"], "accuracy": acc["accuracy"], "accuracy_ci95": acc["accuracy_ci95"],
        "macro_f1": acc["macro_f1"], "per_class": acc["per_class"], "confusion_matrix": acc["confusion_matrix"],
        "ece": acc["ece"],
    }
    if ref is not None:
        rp = ref["_probs"]
        rpred = rp.argmax(1)
        flips_idx = np.nonzero(rpred != pred)[0]
        rec["agreement"] = float(np.mean(rpred == pred))
        rec["mcnemar"] = mcnemar_exact(rpred == y, pred == y)
        rec["flips"] = [{"file": ids[k], "true_label": class_names[int(y[k])],
                         "ref_label": class_names[int(rpred[k])], "ref_prob": float(rp[k].max()),
                         "label": class_names[int(pred[k])], "prob": float(probs[k].max())}
                        for k in flips_idx[: opts.max_flips]]
        rec["n_flips"] = int(len(flips_idx))
    else:
        rec.update({"agreement": None, "mcnemar": None, "flips": [], "n_flips": 0})
    if dedup is not None:
        mask = np.array([i in dedup for i in ids], bool)
        if mask.any():
            d = accuracy_block(y[mask], probs[mask], class_names, opts.n_boot, opts.seed, opts.ece_bins)
            rec["dedup"] = {"n": d["n"], "accuracy": d["accuracy"], "accuracy_ci95": d["accuracy_ci95"],
                            "macro_f1": d["macro_f1"], "per_class": d["per_class"]}
        else:
            rec["dedup"] = None
    else:
        rec["dedup"] = None
    e2e = res.get("e2e_ms") or {}
    size, gz = sizes[str(item.path)]
    rec.update({
        "latency_ms": res["latency_ms"], "latency_s": res.get("latency_seconds"),
        "background_cpu": res.get("background_cpu"),
        "throughput_ips": res["throughput_ips"], "throughput": res["throughput"],
        "cold_start_ms": res["cold_start_ms"], "load_ms": res["load_ms"], "first_infer_ms": res["first_infer_ms"],
        "e2e_ms": e2e.get("p50"), "e2e": {"total": res.get("e2e_ms"), "decode_preprocess": res.get("decode_ms"),
                                          "infer": res.get("infer_ms")},
        "peak_rss_mb": (res.get("rss_mb") or {}).get("peak"), "rss_mb": res.get("rss_mb"),
        "size_bytes": size, "gzip_bytes": gz, "warmup": res.get("warmup"),
        "worker_wall_s": res.get("worker_wall_s"),
        "stages": res.get("stages"),
        "warnings": list(item.warnings),
    })
    preferred = list((getattr(dev.profile, "precision", None) or {}).get("preferred") or [])
    if not is_reference and item.kind == "edge" and preferred and item.precision not in preferred:
        rec["warnings"].append(f"the {dev.profile.name} profile does not list {item.precision} among the "
                               f"precisions this device runs well ({', '.join(preferred)})")
    bg = res.get("background_cpu")
    if bg is not None and bg > BUSY_WARN:
        rec["warnings"].append(f"other processes used {100 * bg:.0f}% of the CPUs while latency was timed: the "
                               "latency figures include contention (benchmark on a quiet machine)")
    rec["_probs"] = probs
    return rec


def _vs_reference(rec: dict[str, Any], ref: dict[str, Any] | None) -> None:
    if ref is None:
        rec["vs_reference"] = None
        return
    rec["vs_reference"] = {
        "speedup_p50": ref["latency_ms"]["p50"] / rec["latency_ms"]["p50"],
        "speedup_mean": ref["latency_ms"]["mean"] / rec["latency_ms"]["mean"],
        "size_ratio": rec["size_bytes"] / ref["size_bytes"] if ref["size_bytes"] else None,
        "delta_accuracy_pp": (rec["accuracy"] - ref["accuracy"]) * 100.0,
        "delta_macro_f1": rec["macro_f1"] - ref["macro_f1"],
        "reference_device": ref["device"]["ran_on"],
    }


# ----------------------------------------------------------------------------- the command


def validate_results(doc: dict[str, Any]) -> None:
    """Validate against the JSON Schema shipped in the package (needs jsonschema)."""
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(doc)


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def bench(
    artifacts: Sequence[str | Path],
    data_dir: str | Path,
    device: str | Sequence[str] = "host",
    reference: str | Path | None = None,
    out: str | Path | None = None,
    *,
    options: BenchOptions | None = None,
    threads: int | None = None,
    cpus: Sequence[int] | None = None,
    ssh: SSHOptions | None = None,
    split: str = "Testing",
    eval_list: str | Path | None = None,
    per_class: int | None = None,
    preprocess: str | None = None,
    classes: Sequence[str] | None = None,
    input_size: int | None = None,
    precision: str | None = None,
    no_reference: bool = False,
    overwrite: bool = False,
    unsafe: bool = False,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    ct_dir: str | Path | None = None,
    ct_csv: str | Path | None = None,
    robustness: bool = False,
    robustness_per_class: int | None = 50,
    verify_with: str | Path | None = None,
) -> dict[str, Any]:
    """Benchmark artifacts on one or more devices against the FP32 reference; write results to ``out``.

    Returns the results document (also written as ``out/results.json``), plus two keys that are
    not written: ``_ids`` (the evaluated images, relative paths) and ``_probs`` ("name@device" ->
    class probabilities aligned with ``_ids``, in ``data.class_names`` order). Artifacts that fail
    (missing runtime, crash) are listed under ``errors``; the others are still measured.

    Models trained on fused MRI+CT input need ``ct_dir`` and/or ``ct_csv`` (pairing as in
    ``edgebrain train --fuse``, relative to ``data_dir``): every evaluation MRI is fused with its
    CT partner on the host (:func:`edgebrain.fusion.load_fused`, at the model input size) and the
    fused images, written as lossless PNG, are what every worker (and the reference) decodes. An
    MRI without a CT partner is listed in ``data.failed`` and counted in ``data.fusion.n_failed``.

    ``robustness``: also run the perturbation suite (:mod:`edgebrain.robustness`) on the host, on
    a seeded subsample of ``robustness_per_class`` images per class (None: every image), into
    ``robustness`` of the results.
    """
    from .devices import parse_device

    opts = options or BenchOptions()
    if threads is not None or cpus is not None:  # shortcuts for the two most common options
        from dataclasses import replace

        opts = replace(opts, threads=threads if threads is not None else opts.threads,
                       cpus=list(cpus) if cpus is not None else opts.cpus)
    ssh = ssh or SSHOptions()
    say = log or (lambda m: print(m, file=sys.stderr))
    t_start = time.time()
    load_start = _loadavg()
    if not artifacts:
        raise BenchError("no artifacts given")
    if opts.cpus and opts.threads and opts.threads > len(opts.cpus):
        say(f"warning: {opts.threads} threads on {len(opts.cpus)} pinned CPU(s) oversubscribes them")
    devices = [parse_device(d) for d in ([device] if isinstance(device, str) else list(device))]
    if out is not None and Path(out).exists() and not overwrite:
        raise BenchError(f"{out} exists (use --overwrite to replace it)")

    ds, samples, dedup, data_info = select_samples(data_dir, split, eval_list, per_class, opts.seed)
    warnings: list[str] = []
    items = [resolve_item(a, preprocess, classes, input_size, precision) for a in artifacts]
    check_signed(items, verify_with)
    fusion = _fusion_of_items(items, ct_dir, ct_csv)
    for it in items:
        _class_perm(it, ds.class_names)
        card = (it.artifact.manifest.get("model_card") if it.artifact else None) or {}
        mh = (card.get("data") or {}).get("manifest_hash")
        if mh and mh != ds.manifest_hash:
            warnings.append(f"{it.name}: its model was trained on a different dataset version "
                            f"(manifest hash {mh[:12]}… vs {ds.manifest_hash[:12]}…)")
    ref_item = None if no_reference else resolve_reference(items, reference, preprocess, classes, input_size,
                                                           warnings)
    if ref_item is not None:
        _fusion_of_items([ref_item], ct_dir, ct_csv, fusion, what=f"the reference {ref_item.path}")
        _class_perm(ref_item, ds.class_names)
    for w in warnings:
        say(f"warning: {w}")

    host = next((d for d in devices if d.is_local), None) or parse_device("host")
    say(f"bench: {len(items)} artifact(s) x {len(devices)} device(s), {len(samples)} images "
        f"({data_info['split']}), reference: {ref_item.path if ref_item else 'none'}")

    # Fused MRI+CT models: the fused inputs are made once, here, and every run decodes those.
    fused_tmp = tempfile.TemporaryDirectory(prefix="edgebrain-fused-") if fusion is not None else None
    feed: dict[str, Path] | None = None
    host_failed: dict[str, str] = {}
    fusion_info: dict[str, Any] | None = None
    run_samples = list(samples)
    try:
        if fusion is not None:
            assert fused_tmp is not None
            feed, host_failed, fusion_info = _fused_inputs(samples, data_dir, ct_dir, ct_csv, fusion,
                                                           items[0].spec.size, Path(fused_tmp.name))
            for rel, why in host_failed.items():
                say(f"error: {rel}: {why}")
            run_samples = [s for s in samples if s.rel in feed]
            say(f"fusion: {len(feed)} MRI+CT pair(s) fused ({fusion.method}, mode {fusion.mode}), "
                f"{len(host_failed)} MRI image(s) failed")

        # Reference first (host, TensorFlow), then every device.
        runs: list[tuple[Item, Any, dict[str, Any]]] = []
        ref_res = None
        if ref_item is not None:
            ref_res = _run_local([ref_item], host, opts, run_samples, unsafe, feed)[0]
            if not ref_res.get("ok"):
                raise BenchError(f"the reference {ref_item.path} failed: {ref_res.get('error')}")
        for dev in devices:
            if dev.is_local:
                res_list = _run_local(items, dev, opts, run_samples, unsafe, feed)
            else:
                res_list = _run_remote(items, dev, opts, run_samples, ssh, feed)
            runs.extend((it, dev, r) for it, r in zip(items, res_list))
    finally:
        if fused_tmp is not None:
            fused_tmp.cleanup()

    for it, _, r in runs:
        if r.get("ok") and int(r.get("n_classes", 0)) != len(it.class_names):
            r.update({"ok": False, "error": f"the model outputs {r.get('n_classes')} classes but its manifest "
                                            f"lists {len(it.class_names)} ({', '.join(it.class_names)})"})
    if ref_res is not None and ref_item is not None and int(ref_res.get("n_classes", 0)) != len(ref_item.class_names):
        raise BenchError(f"the reference {ref_item.path} outputs {ref_res.get('n_classes')} classes, not "
                         f"{len(ref_item.class_names)}")
    errors = [{"artifact": str(it.path), "name": it.name, "device": dev.label, "error": r.get("error", "?")}
              for it, dev, r in runs if not r.get("ok")]
    for e in errors:
        say(f"error: {e['name']} on {e['device']}: {e['error']}")
    ok_runs = [(it, dev, r) for it, dev, r in runs if r.get("ok")]
    all_res = [r for _, _, r in ok_runs] + ([ref_res] if ref_res else [])
    # Evaluate on the images every run decoded (a failure is reported by name, never hidden).
    by_rel = {s.rel: s for s in samples}
    failed: dict[str, str] = dict(host_failed)
    for r in all_res:
        for f in r.get("failed", []):
            failed.setdefault(f["file"], f["problem"])
    id_sets = [set(r["ids"]) for r in all_res]
    common = [s.rel for s in samples if all(s.rel in ids for ids in id_sets)]
    for rel in failed:
        say(f"warning: skipped {by_rel[rel].path if rel in by_rel else rel}: {failed[rel]}")
    y = np.asarray([by_rel[i].label for i in common], np.int64)
    if all_res and not common:
        raise DataError("no image could be evaluated by every model")

    sizes: dict[str, tuple[int, int]] = {}
    for it in [*items, *([ref_item] if ref_item else [])]:
        if str(it.path) not in sizes:
            sizes[str(it.path)] = (it.size_bytes, it.gzip_bytes())
    ref_rec = None
    if ref_item is not None and ref_res is not None:
        ref_rec = _record(ref_item, host, ref_res, common, y, ds.class_names, None, dedup, opts, sizes, True)
        ref_rec.update({"agreement": 1.0, "mcnemar": None, "flips": [], "n_flips": 0})
    records = [_record(it, dev, r, common, y, ds.class_names, ref_rec, dedup, opts, sizes) for it, dev, r in ok_runs]
    for rec in records:
        _vs_reference(rec, ref_rec)
    if ref_rec is not None:
        ref_rec["vs_reference"] = None

    data_info.update({
        "n": len(common), "dedup_n": (sum(1 for i in common if i in dedup) if dedup is not None else None),
        "failed": [{"file": k, "problem": v} for k, v in failed.items()],
    })
    if fusion_info is not None:
        data_info["fusion"] = fusion_info
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or f"edgebrain.bench.bench({[str(a) for a in artifacts]!r}, {str(data_dir)!r})",
        "edgebrain_version": __version__,
        "data": data_info,
        "reference": ref_rec,
        "results": records,
        "errors": errors,
        "warnings": warnings,
        "devices": [{"label": d.label, "profile": d.profile.name, "transport": d.transport,
                     "profile_source": d.profile.source} for d in devices],
        "options": {"timing": opts.timing(), "threads": opts.threads, "cpus": opts.cpus, "n_boot": opts.n_boot,
                    "ece_bins": opts.ece_bins, "seed": opts.seed, "reference_device": opts.reference_device},
        "host": {"load_average_start": load_start, "load_average_end": _loadavg(), "wall_s": time.time() - t_start},
    }
    if robustness:
        doc["robustness"] = robustness_block([it for it, _, _ in ok_runs], ref_item, samples, ds.class_names,
                                             opts, robustness_per_class, unsafe, say, fusion is not None)
    probs_store = {}
    for rec in ([ref_rec] if ref_rec else []) + records:
        probs_store[f"{rec['name']}@{rec['device']['label']}"] = rec.pop("_probs")
    doc["host"]["wall_s"] = round(time.time() - t_start, 3)
    try:  # a results file that does not match its own schema is a bug: never write it
        validate_results(json.loads(json.dumps(doc, default=_jsonable)))
    except ImportError:
        say("note: jsonschema is not installed; results.json was not validated against its schema")
    if out is not None:
        write_outputs(doc, Path(out), overwrite=overwrite)
    doc["_probs"] = probs_store
    doc["_ids"] = common
    return doc


def _fusion_of_items(items: Sequence[Item], ct_dir: str | Path | None, ct_csv: str | Path | None,
                     expected: Any = None, what: str | None = None) -> Any:
    """The MRI+CT fusion every item expects (None: plain MRI). Without CT options a fused model is
    refused; with them a plain one is, and so are models that differ in fusion or input size."""
    from .fusion import require_fused_input, require_plain_input

    if ct_dir is None and ct_csv is None:
        for it in items:
            require_plain_input(it.spec, what=what or str(it.path))  # bench feeds plain MRI images
        return None
    found: list[tuple[Any, tuple[int, int] | None, Item | None]] = []
    for it in items:
        found.append((require_fused_input(it.spec, what=what or str(it.path)), it.spec.size, it))
    if expected is not None:
        found.insert(0, (expected, None, None))
    first = found[0][0]
    for f, _, it in found[1:]:
        if f != first:
            raise BenchError(f"{what or (it.path if it else '?')} expects fusion {f.to_dict()}, another model "
                             f"{first.to_dict()}: bench models with different fusions separately")
    sizes = {sz for _, sz, _ in found if sz is not None}
    if len(sizes) > 1:
        raise BenchError(f"the fused models take different input sizes {sorted(sizes)}: the fused inputs are made "
                         "once at the model size, so bench them separately")
    return first


def _fused_inputs(samples: Sequence[D.Sample], data_dir: str | Path, ct_dir: str | Path | None,
                  ct_csv: str | Path | None, fusion: Any, size: tuple[int, int], out: Path
                  ) -> tuple[dict[str, Path], dict[str, str], dict[str, Any]]:
    """Pair every MRI with its CT image and fuse them (edgebrain.fusion.load_fused, at the model
    size: the same pixels training and ``Predictor`` inputs get), written as lossless PNG under
    ``out``. -> (relative MRI path -> PNG, relative MRI path -> why it failed, the fusion record)."""
    from PIL import Image

    from .errors import ImageLoadError
    from .fusion import CTPairing, FusionError, load_fused
    from .progress import track
    from .remote import stats

    pairing = CTPairing(ct_dir, ct_csv, mri_root=data_dir)
    feed: dict[str, Path] = {}
    failed: dict[str, str] = {}
    ms: list[float] = []
    for k, s in enumerate(track(list(samples), description=f"fusing {len(samples)} MRI+CT pairs")):
        ct, problem = pairing.partner(s.path)
        if ct is None:
            failed[s.rel] = str(problem)
            continue
        t0 = time.perf_counter()
        try:
            x = load_fused(s.path, ct, fusion, size)
        except ImageLoadError as exc:
            failed[s.rel] = exc.reason if Path(exc.path) == Path(s.path) else f"{exc.path}: {exc.reason}"
            continue
        ms.append((time.perf_counter() - t0) * 1e3)
        dst = out / f"{k:06d}.png"
        Image.fromarray(x).save(dst, format="PNG")  # lossless: the workers decode exactly x
        feed[s.rel] = dst
    if not feed:
        listed = "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:5])
        raise FusionError(f"none of the {len(samples)} MRI images could be paired with a CT image and fused "
                          f"({listed}{' ...' if len(failed) > 5 else ''})")
    info = {**fusion.to_dict(), **pairing.describe(), "input_size": [int(size[0]), int(size[1])],
            "n_fused": len(feed), "n_failed": len(failed),
            "inputs": "fused on the host by edgebrain.fusion.load_fused at the model input size and written as "
                      "lossless PNG; every worker (reference included) decodes those, so e2e/decode timings "
                      "exclude the fusion itself",
            "fuse_ms_host": stats(ms)}
    return feed, failed, info


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def write_outputs(doc: dict[str, Any], out: Path, overwrite: bool = False) -> None:
    from .report import render_html, render_markdown

    clean = {k: v for k, v in doc.items() if not k.startswith("_")}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        atomic_write_json(tmp / "results.json", clean)
        atomic_write_text(tmp / "results.md", render_markdown(clean))
        atomic_write_text(tmp / "report.html", render_html(clean))


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and validate a results.json."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BenchError(f"{p}: cannot read bench results ({exc})") from exc
    if doc.get("kind") != KIND:
        raise BenchError(f"{p}: not an edgebrain bench results file")
    try:
        validate_results(doc)
    except ImportError:
        pass
    except Exception as exc:
        raise BenchError(f"{p}: does not match the results schema: {getattr(exc, 'message', exc)}") from exc
    return doc


__all__ = ["BenchError", "BenchOptions", "SSHOptions", "bench", "bootstrap_ci", "expected_calibration_error",
           "load_results", "mcnemar_exact", "resolve_item", "validate_results", "write_outputs"]


def robustness_block(items: Sequence[Item], ref_item: Item | None, samples: Sequence[D.Sample],
                     class_names: Sequence[str], opts: BenchOptions, per_class: int | None, unsafe: bool,
                     say: Callable[[str], None], fused: bool) -> dict[str, Any]:
    """The robustness suite for every artifact that ran (once each, on the host), or the reason it
    could not run; never fails the benchmark itself."""
    from .robustness import evaluate

    if fused:
        return {"error": "the robustness suite perturbs plain MRI scans; models on fused MRI+CT input are not covered"}
    seen: dict[str, Item] = {}
    for it in items:
        seen.setdefault(str(it.path), it)
    try:
        return evaluate(list(seen.values()), ref_item, samples, class_names, per_class=per_class, seed=opts.seed,
                        threads=opts.threads, unsafe=unsafe, say=say)
    except (EdgebrainError, OSError, RuntimeError, ValueError) as exc:
        say(f"error: robustness suite: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}
