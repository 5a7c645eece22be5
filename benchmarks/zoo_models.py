"""The conformance zoo: keras.applications networks as users bring them, built offline.

Each architecture is built with ``weights=None`` (no downloads) at a small input size, with a
4-class softmax head, as a Keras 3 model and as a tf-keras model, with the base network nested
(``Model(inp, head(base(inp)))``, the usual fine-tuning layout) or flattened (every layer at the
top level), and saved as Keras 3 ``.keras``, tf-keras ``.keras`` or a tf-keras SavedModel folder.
ONNX files are exported with tf2onnx: NHWC or NCHW input, fixed or dynamic batch, any input name.

Weights are random, or briefly fitted on a few hundred real images (:func:`fit_briefly`) so that
the classes separate and int8 agreement means something. One fitted weight list is shared by all
layouts and formats of an architecture, so every file of the zoo computes the same function.

Used by ``tests/zoo`` and ``benchmarks/zoo.py``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
LOG = logging.getLogger("edgebrain.zoo")


@dataclass(frozen=True)
class Arch:
    app: str  # keras.applications constructor
    preprocess: str  # the edgebrain --preprocess name of the network's Keras preprocessing
    min_size: int  # the smallest input the architecture accepts
    kwargs: tuple[tuple[str, Any], ...] = ()


# preprocess: Keras's own preprocess_input modes: "tf" -> xception ([-1, 1]), "caffe" -> caffe,
# "torch" -> imagenet; MobileNetV3 / EfficientNet rescale inside the model (raw 0..255 input).
RAW = "meanstd:0,0,0/1,1,1"
ZOO: dict[str, Arch] = {
    "resnet50": Arch("ResNet50", "caffe", 32),
    "xception": Arch("Xception", "xception", 71),
    "mobilenetv2": Arch("MobileNetV2", "xception", 32, (("alpha", 0.35),)),
    "mobilenetv3small": Arch("MobileNetV3Small", RAW, 32, (("minimalistic", False),)),
    "efficientnetb0": Arch("EfficientNetB0", RAW, 32),
    "densenet121": Arch("DenseNet121", "imagenet", 32),
    "vgg16": Arch("VGG16", "caffe", 32),
}
FLAVOURS = ("keras3", "tf-keras")
LAYOUTS = ("nested", "flat")


def keras_module(flavour: str) -> Any:
    """Keras 3 (``keras``) or tf-keras (``tf_keras``)."""
    from edgebrain.tfenv import import_tf

    import_tf()
    if flavour == "keras3":
        import keras

        return keras
    if flavour == "tf-keras":
        import tf_keras

        return tf_keras
    raise ValueError(f"unknown Keras flavour {flavour!r}: {FLAVOURS}")


def build(name: str, size: int, flavour: str = "keras3", layout: str = "nested", seed: int = 0) -> Any:
    """A keras.applications network with a 4-class softmax head (random weights)."""
    arch = ZOO[name]
    if size < arch.min_size:
        raise ValueError(f"{name} needs an input of at least {arch.min_size} px, not {size}")
    k = keras_module(flavour)
    k.utils.set_random_seed(seed)
    ctor = getattr(k.applications, arch.app)
    kw = dict(arch.kwargs)
    inp = k.Input((size, size, 3), name="image")
    if layout == "nested":
        base = ctor(weights=None, include_top=False, input_shape=(size, size, 3), pooling="avg", **kw)
        feat = base(inp)
    elif layout == "flat":
        base = ctor(weights=None, include_top=False, input_tensor=inp, pooling="avg", **kw)
        feat = base.output
    else:
        raise ValueError(f"unknown layout {layout!r}: {LAYOUTS}")
    out = k.layers.Dense(len(CLASSES), activation="softmax", name="tumour_head")(feat)
    return k.Model(inp, out, name=f"{name}_{layout}")


def real_images(data_dir: str | Path, size: int, per_class: int, split: str = "Training",
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC images, labels): a stratified subset of the real data at ``size``."""
    from edgebrain import data as D

    ds = D.scan(data_dir)
    samples = D.subset([s for s in ds.samples if s.split == split], per_class, seed=seed)
    arr = D.load_arrays(samples, (size, size), desc="zoo")
    return arr.x, arr.y


def preprocess(name: str, x_uint8: np.ndarray) -> np.ndarray:
    """The network's preprocessing (edgebrain's implementation of the named spec)."""
    from edgebrain.preprocess import PreprocessSpec

    spec = PreprocessSpec.named(ZOO[name].preprocess, x_uint8.shape[1:3])
    return np.asarray(spec.apply(x_uint8), np.float32)


def fit_briefly(model: Any, name: str, x_uint8: np.ndarray, y: np.ndarray, epochs: int = 3,
                batch: int = 32, lr: float = 2e-3, seed: int = 0) -> dict[str, float]:
    """A few epochs of Adam on real images. BatchNorm momentum is lowered first so that the
    moving statistics (what inference uses) follow the data within those few steps."""
    k = model.__class__.__module__.split(".")[0]
    km = keras_module("keras3" if k == "keras" else "tf-keras")
    km.utils.set_random_seed(seed)
    for layer in _all_layers(model):
        if type(layer).__name__ == "BatchNormalization":
            layer.momentum = 0.6
    model.compile(optimizer=km.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    xp = preprocess(name, x_uint8)
    hist = model.fit(xp, y, epochs=epochs, batch_size=batch, verbose=0, shuffle=True)
    for layer in _all_layers(model):
        if type(layer).__name__ == "BatchNormalization":
            layer.momentum = 0.99
    return {"loss": float(hist.history["loss"][-1]), "accuracy": float(hist.history["accuracy"][-1])}


def _all_layers(model: Any) -> list[Any]:
    out: list[Any] = []
    for layer in model.layers:
        out += _all_layers(layer) if getattr(layer, "layers", None) else [layer]
    return out


def copy_weights(src: Any, dst: Any, probe: np.ndarray) -> float:
    """Give ``dst`` (another flavour/layout of the same network) ``src``'s weights; -> the largest
    output difference on ``probe`` (raises when the two do not compute the same function)."""
    dst.set_weights(src.get_weights())
    a = np.asarray(src(probe, training=False))
    b = np.asarray(dst(probe, training=False))
    d = float(np.abs(a - b).max())
    if d > 1e-4:
        raise RuntimeError(f"{dst.name}: weights copied from {src.name} compute something else (max |dp| {d:.3g})")
    return d


def save(model: Any, folder: Path, fmt: str) -> Path:
    """Save as ``keras3`` (.keras), ``tf-keras`` (.keras) or ``savedmodel`` (tf-keras folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt in ("keras3", "tf-keras"):
        p = folder / "model.keras"
        model.save(p)
        return p
    if fmt == "savedmodel":
        p = folder / "saved_model"
        model.save(p, save_format="tf")
        return p
    raise ValueError(f"unknown save format {fmt!r}")


def export_onnx(model: Any, path: Path, *, nchw: bool = False, dynamic_batch: bool = True,
                input_name: str = "pixel_values", opset: int = 17) -> Path:
    """tf2onnx export of a Keras model; NCHW input (a transpose in front) and a fixed batch of 1
    on request."""
    import tf2onnx

    from edgebrain.tfenv import import_tf

    tf = import_tf()
    h, w, c = (int(v) for v in model.input_shape[1:])
    batch = None if dynamic_batch else 1
    shape = (batch, c, h, w) if nchw else (batch, h, w, c)
    spec = [tf.TensorSpec(shape, tf.float32, name=input_name)]

    @tf.function(input_signature=spec, autograph=False)
    def serve(x: Any) -> Any:
        return model(tf.transpose(x, [0, 2, 3, 1]) if nchw else x, training=False)

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    path.parent.mkdir(parents=True, exist_ok=True)
    tf2onnx.convert.from_function(serve, input_signature=spec, opset=opset, output_path=str(path))
    return path


@dataclass
class ZooEntry:
    """One zoo model file and what a user would pass with it."""

    id: str  # e.g. xception-keras3-nested
    arch: str
    path: Path
    preprocess: str
    size: int
    kind: str  # keras3 | tf-keras | savedmodel | onnx
    note: str = ""


def build_family(name: str, size: int, out: Path, data_dir: str | Path | None, *, fit_per_class: int = 80,
                 epochs: int = 3, formats: tuple[str, ...] = ("keras3", "tf-keras", "savedmodel"),
                 layouts: tuple[str, ...] = LAYOUTS, onnx: tuple[dict[str, Any], ...] = ()) -> list[ZooEntry]:
    """Every requested file of one architecture, sharing one (briefly fitted, if ``data_dir``) set
    of weights: Keras 3 / tf-keras ``.keras`` and SavedModel, nested and flat, plus ONNX exports
    (dicts of :func:`export_onnx` keyword arguments). Files already in ``out`` from the same recipe
    (``out/<name>-fit.json``) are reused."""
    import json

    recipe = {"size": size, "fit": data_dir is not None, "per_class": fit_per_class, "epochs": epochs}
    planned = _planned(name, size, out, formats, layouts, onnx)
    fit_file = out / f"{name}-fit.json"
    if fit_file.is_file() and json.loads(fit_file.read_text()).get("recipe") == recipe \
            and all(e.path.exists() for e in planned):
        return planned
    ref = build(name, size, "keras3", "nested")
    stats: dict[str, float] = {}
    if data_dir is not None:
        x, y = real_images(data_dir, size, fit_per_class)
        stats = fit_briefly(ref, name, x, y, epochs=epochs)
        LOG.info("%s@%d fitted on %d images: %s", name, size, len(x), stats)
    probe = preprocess(name, real_images(data_dir, size, 2, split="Training", seed=1)[0]) if data_dir is not None \
        else np.random.default_rng(0).uniform(-1, 1, (4, size, size, 3)).astype(np.float32)
    arch = ZOO[name]
    entries: list[ZooEntry] = []
    models: dict[tuple[str, str], Any] = {("keras3", "nested"): ref}
    for fmt in formats:
        flavour = "keras3" if fmt == "keras3" else "tf-keras"
        for layout in layouts:
            key = (flavour, layout)
            if key not in models:
                models[key] = build(name, size, flavour, layout)
                copy_weights(ref, models[key], probe)
            eid = f"{name}-{fmt}-{layout}"
            p = save(models[key], out / eid, fmt)
            entries.append(ZooEntry(eid, name, p, arch.preprocess, size, fmt))
    for kw in onnx:
        layout = "nchw" if kw.get("nchw") else "nhwc"
        batch = "dynbatch" if kw.get("dynamic_batch", True) else "batch1"
        eid = f"{name}-onnx-{layout}-{batch}"
        p = export_onnx(ref, out / eid / f"{name}.onnx", **kw)
        entries.append(ZooEntry(eid, name, p, arch.preprocess, size, "onnx",
                                note=f"input {kw.get('input_name', 'pixel_values')}"))
    out.mkdir(parents=True, exist_ok=True)
    fit_file.write_text(json.dumps({"recipe": recipe, "fit": stats}))
    return entries


def _planned(name: str, size: int, out: Path, formats: tuple[str, ...], layouts: tuple[str, ...],
             onnx: tuple[dict[str, Any], ...]) -> list[ZooEntry]:
    """The entries :func:`build_family` writes (paths as it names them)."""
    arch = ZOO[name]
    size_of = {"keras3": "model.keras", "tf-keras": "model.keras", "savedmodel": "saved_model"}
    es = [ZooEntry(f"{name}-{f}-{lay}", name, out / f"{name}-{f}-{lay}" / size_of[f], arch.preprocess, size, f)
          for f in formats for lay in layouts]
    for kw in onnx:
        eid = (f"{name}-onnx-{'nchw' if kw.get('nchw') else 'nhwc'}-"
               f"{'dynbatch' if kw.get('dynamic_batch', True) else 'batch1'}")
        es.append(ZooEntry(eid, name, out / eid / f"{name}.onnx", arch.preprocess, size, "onnx",
                           note=f"input {kw.get('input_name', 'pixel_values')}"))
    return es
