"""The model being converted: a tf-keras model from ``edgebrain train``, a Keras 3 ``.keras``
file from elsewhere, or an ONNX file.

:class:`Source` gives every target the same things: class names, input shape, the
preprocessing spec (from the model card, or ``--preprocess``/``--classes``, or an assumed
default that the manifest flags), a reference ``predict`` for verification and a
cached ONNX export. TensorFlow, Keras 3 and onnxruntime are imported only when needed.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgebrain import CLASS_NAMES_DEFAULT
from edgebrain.errors import ModelError
from edgebrain.io import sha256_path
from edgebrain.modelcard import CARD_NAME, ModelCard
from edgebrain.preprocess import PreprocessSpec
from edgebrain.runtime import _softmax_if_logits

FORMATS = ("tf-keras", "keras3", "onnx")
MIN_OPSET = 13
DEFAULT_OPSET = 17


@dataclass
class Source:
    path: Path  # the model file or SavedModel folder
    format: str  # tf-keras | keras3 | onnx
    sha256: str
    card: ModelCard | None
    class_names: list[str]
    spec: PreprocessSpec
    input_shape: list[int]  # [H, W, C]
    variant: str | None
    model: Any = None  # tf-keras or Keras 3 model (None for ONNX)
    onnx_file: Path | None = None  # ONNX sources: the NHWC graph actually converted
    warnings: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    derived_from: dict[str, Any] | None = None  # set when this is a pruned copy of another source
    export_tag: str = ""  # distinguishes this source's export files from another's in one workdir
    _session: Any = None
    _onnx_exports: dict[int, Path] = field(default_factory=dict)
    _equalized: tuple[Source, dict[str, Any]] | None = None

    # -------------------------------------------------------------- description

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": str(Path(self.path).resolve()), "sha256": self.sha256, "format": self.format,
                             "variant": self.variant}
        d.update(self.notes)
        return d

    @property
    def is_keras(self) -> bool:
        return self.format in ("tf-keras", "keras3")

    # -------------------------------------------------------------- inference

    def predict(self, x: np.ndarray, batch: int = 64) -> np.ndarray:
        """Class probabilities of the source model for preprocessed float32 NHWC input."""
        x = np.asarray(x, np.float32)
        outs: list[np.ndarray] = []
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            if self.is_keras:
                out = self.model(xb, training=False)
                y = out.numpy() if hasattr(out, "numpy") else np.asarray(out)
            else:
                sess = self._ort()
                y = sess.run(None, {sess.get_inputs()[0].name: xb})[0]
            outs.append(_softmax_if_logits(np.asarray(y)))
        return np.concatenate(outs) if outs else np.zeros((0, len(self.class_names)), np.float32)

    def _ort(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the reference: as written
            self._session = ort.InferenceSession(str(self.onnx_file), so, providers=["CPUExecutionProvider"])
        return self._session

    # -------------------------------------------------------------- exports

    def tf_function(self) -> Any:
        """A tf.function (batch dimension free) around a Keras model: the one graph every TF
        export traces."""
        from edgebrain.tfenv import import_tf

        if not self.is_keras:
            raise ModelError(f"{self.path}: not a Keras model")
        tf = import_tf()
        model = self.model
        spec = tf.TensorSpec((None, *self.input_shape), tf.float32, name="input")

        @tf.function(input_signature=[spec], autograph=False)
        def serve(x: Any) -> Any:
            return model(x, training=False)

        return serve

    def equalized(self, probe: np.ndarray | None = None) -> tuple[Source, dict[str, Any]]:
        """A copy of this (Keras) source with every depthwise -> pointwise pair rescaled by
        cross-layer equalisation (:mod:`edgebrain.converters.equalize`): the same function, weight
        ranges that suit one int8 scale per tensor. ``probe`` (preprocessed images) checks that the
        copy computes what the source does; the report records the largest probability difference.
        Cached: built once per source."""
        import dataclasses
        import importlib

        from .equalize import equalize_depthwise

        if self._equalized is not None:
            return self._equalized
        if not self.is_keras:
            raise ModelError(f"{self.path}: cross-layer equalisation needs a Keras model")
        keras_mod = importlib.import_module(type(self.model).__module__.split(".")[0])  # tf_keras or keras
        clone = keras_mod.models.clone_model(self.model)
        clone.set_weights(self.model.get_weights())
        rep = equalize_depthwise(clone)
        eq = dataclasses.replace(self, model=clone, export_tag="-equalized", _session=None, _onnx_exports={},
                                 _equalized=None, warnings=list(self.warnings), notes=dict(self.notes))
        if probe is not None and len(probe):
            dp = float(np.abs(self.predict(probe) - eq.predict(probe)).max())
            rep["max_abs_dp_vs_source"] = dp
            if dp > 1e-3:
                raise ModelError(f"{self.path}: the cross-layer equalised copy differs from the model "
                                 f"(max |dp| {dp:.2g} on {len(probe)} images); not used")
        self._equalized = (eq, rep)
        return self._equalized

    def export_onnx(self, workdir: Path, opset: int = DEFAULT_OPSET) -> Path:
        """The float ONNX graph (tf2onnx for Keras sources; the NHWC source graph for ONNX)."""
        if opset < MIN_OPSET:
            raise ModelError(f"ONNX opset {opset} is too old: use >= {MIN_OPSET}")
        if not self.is_keras:
            assert self.onnx_file is not None
            return self.onnx_file
        if opset in self._onnx_exports and self._onnx_exports[opset].is_file():
            return self._onnx_exports[opset]
        import logging

        from edgebrain.tfenv import import_tf

        tf = import_tf()
        import tf2onnx

        logging.getLogger("tf2onnx").setLevel(logging.ERROR)
        out = Path(workdir) / f"export{self.export_tag}-opset{opset}.onnx"
        spec = [tf.TensorSpec((None, *self.input_shape), tf.float32, name="input")]
        try:
            tf2onnx.convert.from_function(self.tf_function(), input_signature=spec, opset=opset,
                                          output_path=str(out))
        except Exception as exc:
            raise ModelError(f"{self.path}: tf2onnx could not export this model to ONNX "
                             f"({type(exc).__name__}: {exc})") from exc
        self._onnx_exports[opset] = out
        return out


# ----------------------------------------------------------------------------- loading


def _keras_zip_version(p: Path) -> str | None:
    try:
        with zipfile.ZipFile(p) as z:
            meta = json.loads(z.read("metadata.json"))
        return str(meta.get("keras_version") or "")
    except (zipfile.BadZipFile, KeyError, ValueError, OSError):
        return None


def detect_format(path: str | Path) -> tuple[str, Path]:
    """-> (format, the path to load). A model folder from ``edgebrain train`` resolves to its model.keras."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model not found: {p}")
    if p.is_dir():
        if (p / "model.keras").is_file():
            return detect_format(p / "model.keras")
        if (p / "saved_model.pb").is_file():
            return "tf-keras", p
        onnx = sorted(p.glob("*.onnx"))
        if len(onnx) == 1:
            return "onnx", onnx[0]
        raise ModelError(f"{p}: no model.keras, SavedModel or single .onnx file in this folder")
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        return "onnx", p
    if suffix == ".keras":
        ver = _keras_zip_version(p)
        if ver is None:
            raise ModelError(f"{p}: not a valid .keras archive (no metadata.json)")
        return ("keras3" if ver.startswith("3") else "tf-keras"), p
    if suffix in (".h5", ".hdf5"):
        return "tf-keras", p
    raise ModelError(f"{p}: unsupported model file {suffix or '(no suffix)'}: expected .keras, .h5, a SavedModel "
                     "folder or .onnx")


def load_keras(path: str | Path, unsafe: bool = False) -> tuple[str, Any]:
    """A tf-keras or Keras 3 model file/folder -> (format, model), safe mode unless ``unsafe``."""
    fmt, p = detect_format(path)
    if fmt == "keras3":
        return fmt, _load_keras3(p, unsafe)
    if fmt == "tf-keras":
        from edgebrain.models import load_keras_model

        return fmt, load_keras_model(p, unsafe=unsafe)
    raise ModelError(f"{path}: an ONNX model, not a Keras model")


def _load_keras3(p: Path, unsafe: bool) -> Any:
    from edgebrain.tfenv import import_tf

    import_tf()
    try:
        import keras
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelError(f"{p} is a Keras 3 file: pip install keras>=3") from exc
    try:
        return keras.saving.load_model(p, compile=False, safe_mode=not unsafe)
    except ValueError as exc:
        msg = str(exc)
        if "safe_mode" in msg or "lambda" in msg.lower():
            raise ModelError(f"{p}: refused unsafe deserialisation (Lambda / arbitrary code). Re-run with "
                             "--unsafe only if you trust the file.") from exc
        raise ModelError(f"{p}: cannot load as a Keras 3 model: {exc}") from exc
    except Exception as exc:
        raise ModelError(f"{p}: cannot load as a Keras 3 model ({type(exc).__name__}: {exc})") from exc


def _onnx_nhwc(p: Path, workdir: Path | None) -> tuple[Path, list[int], dict[str, Any]]:
    """Check an ONNX source's input; wrap an NCHW input with a Transpose so that every runner
    feeds NHWC. -> (path, [H, W, C], notes)."""
    import onnx
    from onnx import helper

    try:
        m = onnx.load(str(p))
    except Exception as exc:
        raise ModelError(f"{p}: not a readable ONNX file ({type(exc).__name__}: {exc})") from exc
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"{p}: expected one image input, found {len(inputs)}")
    inp = inputs[0]
    if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ModelError(f"{p}: the input must be float32")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ModelError(f"{p}: expected a 4-D image input, got shape {dims}")
    if dims[3] in (1, 3) and dims[1] not in (1, 3):
        if None in dims[1:]:
            raise ModelError(f"{p}: the input's height/width are not fixed ({dims})")
        notes: dict[str, Any] = {"layout": "NHWC"}
        if dims[0] is not None:
            return _free_batch(m, p, workdir, notes, int(dims[0])), [int(dims[1]), int(dims[2]), int(dims[3])], notes
        return p, [int(dims[1]), int(dims[2]), int(dims[3])], notes
    if dims[1] in (1, 3) and None not in dims[2:]:
        if workdir is None:
            raise ModelError(f"{p}: NCHW input needs a work folder to rewrite")
        c, h, w = int(dims[1]), int(dims[2]), int(dims[3])
        new_name = inp.name + "_nhwc"
        batch = inp.type.tensor_type.shape.dim[0]
        bdim = batch.dim_param or (batch.dim_value if batch.HasField("dim_value") else "N")
        new_in = helper.make_tensor_value_info(new_name, onnx.TensorProto.FLOAT, [bdim or "N", h, w, c])
        tr = helper.make_node("Transpose", [new_name], [inp.name], perm=[0, 3, 1, 2], name="edgebrain_nhwc_to_nchw")
        graph = m.graph
        graph.input.remove(inp)
        graph.input.insert(0, new_in)
        graph.node.insert(0, tr)
        notes = {"layout": "NCHW (a Transpose to NHWC was added at the input)"}
        if batch.HasField("dim_value") and batch.dim_value:
            return _free_batch(m, p, workdir, notes, int(batch.dim_value)), [h, w, c], notes
        out = Path(workdir) / "source-nhwc.onnx"
        onnx.save(m, str(out))
        return out, [h, w, c], notes
    raise ModelError(f"{p}: cannot tell the input layout from shape {dims}")


def _free_batch(m: Any, p: Path, workdir: Path | None, notes: dict[str, Any], fixed: int) -> Path:
    """An ONNX graph whose batch is fixed (e.g. 1) with the batch made free, so that calibration,
    verification and the runners can feed batches; checked against one image at a time. A graph that
    cannot run another batch size (a reshape to the fixed batch, say) is refused with what to do."""
    import onnxruntime as ort

    if workdir is None:
        raise ModelError(f"{p}: a fixed-batch ONNX model needs a work folder to rewrite")
    g = m.graph
    for v in list(g.input[:1]) + list(g.output):
        dims = v.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value"):
            dims[0].dim_param = "N"
    del g.value_info[:]  # shapes recorded with the fixed batch; onnxruntime infers them again
    reshapes = _free_reshape_batch(g, fixed)
    out = Path(workdir) / "source-nhwc.onnx"
    import onnx

    onnx.save(m, str(out))
    try:
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        shape = [int(d) for d in sess.get_inputs()[0].shape[1:]]
        x = np.random.default_rng(0).uniform(-1, 1, (2, *shape)).astype(np.float32)
        both = sess.run(None, {name: x})[0]
        one = np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(2)])
        ok = both.shape == one.shape and np.allclose(both, one, atol=1e-4)
    except Exception as exc:
        ok, why = False, f"{type(exc).__name__}: {str(exc).split('Status Message:')[0][-300:]}"
    else:
        why = "batch of 2 differs from two batches of 1"
    if not ok:
        raise ModelError(f"{p}: the model's batch size is fixed at {fixed} and it cannot run other batch sizes "
                         f"({why}); export it with a dynamic batch dimension (e.g. tf2onnx / torch.onnx "
                         "dynamic_axes) and convert that file")
    notes["batch"] = (f"fixed at {fixed} in the file; made free (checked against single images)"
                      + (f"; {reshapes} Reshape target shape(s) take the batch from their input" if reshapes else ""))
    return out


def _free_reshape_batch(g: Any, fixed: int) -> int:
    """Reshape nodes whose constant target shape starts with the fixed batch (exporters bake it in,
    e.g. [1, C, 1, 1]) get 0 there instead: "copy the input's dimension" in ONNX. -> how many.
    Whether that is right for every such node is checked by the caller (batch vs single images)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in g.initializer}
    live = {g.input[0].name}  # tensors computed from the image (the rest are weights and constants)
    for node in g.node:  # ONNX graphs are topologically sorted
        if any(i in live for i in node.input):
            live.update(node.output)
    n = 0
    for node in g.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in inits \
                or node.input[0] not in live:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        shape = numpy_helper.to_array(inits[node.input[1]])
        if shape.ndim != 1 or len(shape) < 2 or int(shape[0]) != fixed:
            continue
        new = shape.copy()
        new[0] = 0
        name = f"{node.input[1]}_free_batch_{n}"
        g.initializer.append(numpy_helper.from_array(new, name))
        node.input[1] = name
        n += 1
    return n


def _output_dim(model: Any) -> int | None:
    try:
        shape = model.output_shape
        return int(shape[-1]) if shape[-1] is not None else None
    except Exception:
        return None


def load_source(path: str | Path, *, unsafe: bool = False, preprocess: str | None = None,
                classes: list[str] | None = None, workdir: Path | None = None) -> Source:
    """Load a model to convert. Lambda layers / arbitrary code are refused unless ``unsafe``."""
    fmt, p = detect_format(path)
    card = ModelCard.find(path) or ModelCard.find(p)
    sha = sha256_path(p)
    warnings: list[str] = []
    notes: dict[str, Any] = {}
    model = None
    onnx_file = None
    if fmt == "tf-keras":
        from edgebrain.models.variants import load_keras_model

        model = load_keras_model(p, unsafe=unsafe)
        shape = list(model.input_shape[1:]) if not isinstance(model.input_shape, list) else None
        out_dim = _output_dim(model)
    elif fmt == "keras3":
        model = _load_keras3(p, unsafe)
        ish = model.input_shape
        shape = list(ish[1:]) if isinstance(ish, tuple) else None
        out_dim = _output_dim(model)
    else:
        onnx_file, shape, notes = _onnx_nhwc(p, workdir)
        out_dim = None
    if shape is None:
        raise ModelError(f"{p}: the model must have exactly one image input")
    if card is not None and card.input_shape:
        if None in shape:
            shape = list(card.input_shape)
        elif [int(v) for v in shape] != [int(v) for v in card.input_shape]:
            raise ModelError(f"{p}: input shape {shape} differs from the model card's {card.input_shape}")
    if None in shape or len(shape) != 3:
        raise ModelError(f"{p}: the input shape {shape} is not a fixed (H, W, C); give the model a fixed input size")
    shape = [int(v) for v in shape]

    if card is not None:
        spec = card.preprocess
        if (spec.height, spec.width) != (shape[0], shape[1]):
            raise ModelError(f"{p}: model card preprocessing size {spec.size} differs from the input {shape}")
        if preprocess:
            mine = PreprocessSpec.named(preprocess, (shape[0], shape[1]))
            if (mine.mode, mine.mean, mine.std) != (spec.mode, spec.mean, spec.std):
                raise ModelError(f"--preprocess {preprocess} contradicts the model card ({spec.name}); "
                                 "the card is what the model was trained with: drop --preprocess")
        class_names = list(card.class_names)
        if classes and list(classes) != class_names:
            raise ModelError(f"--classes {','.join(classes)} contradicts the model card's {class_names}")
        variant: str | None = card.variant
    else:
        variant = None
        warnings.append(f"no {CARD_NAME} beside {p}: preprocessing and classes come from the command line")
        if preprocess:
            try:
                spec = PreprocessSpec.named(preprocess, (shape[0], shape[1]))
            except ValueError as exc:
                raise ModelError(str(exc)) from exc
        else:
            spec = PreprocessSpec.named("rescale", (shape[0], shape[1]), extra={"assumed": True})
            warnings.append("no model card and no --preprocess: preprocessing 'rescale' (x/255) is ASSUMED, "
                            "not known; predictions are wrong if the model expects something else")
        if classes:
            class_names = list(classes)
        elif out_dim in (None, len(CLASS_NAMES_DEFAULT)):
            class_names = list(CLASS_NAMES_DEFAULT)
            warnings.append(f"no model card and no --classes: class names {class_names} are ASSUMED")
        else:
            class_names = [f"class_{i}" for i in range(out_dim or 0)]
            warnings.append(f"no model card and no --classes: classes named {class_names}")
    if out_dim is not None and out_dim != len(class_names):
        raise ModelError(f"{p}: the model has {out_dim} outputs but {len(class_names)} class names")
    if shape[2] != spec.channels:
        raise ModelError(f"{p}: model input has {shape[2]} channels; preprocessing gives {spec.channels}")
    src = Source(path=p, format=fmt, sha256=sha, card=card, class_names=class_names, spec=spec,
                 input_shape=shape, variant=variant, model=model, onnx_file=onnx_file, warnings=warnings,
                 notes=notes)
    if fmt == "onnx":
        try:
            n_out = src.predict(np.zeros((1, *shape), np.float32)).shape[-1]
        except Exception as exc:
            raise ModelError(f"{p}: onnxruntime cannot run this model ({type(exc).__name__}: {exc})") from exc
        if n_out != len(class_names):
            raise ModelError(f"{p}: the model has {n_out} outputs but {len(class_names)} class names")
    return src


def from_keras_model(model: Any, like: Source, path: Path, sha256: str, derived: dict[str, Any]) -> Source:
    """A Source for an in-memory tf-keras model derived from ``like`` (e.g. its pruned copy)."""
    return Source(path=path, format="tf-keras", sha256=sha256, card=like.card, class_names=like.class_names,
                  spec=like.spec, input_shape=like.input_shape, variant=like.variant, model=model,
                  warnings=list(like.warnings), notes=dict(like.notes), derived_from=derived)
