"""ONNX: tf2onnx export (opset >= 13) and onnxruntime quantisation.

* fp32: the tf2onnx export (or the ONNX source itself);
* fp16: ``onnxruntime.transformers.float16.convert_float_to_float16`` (float32 I/O kept);
* dynamic: ``quantize_dynamic`` (int8 weights, activations quantised at run time);
* int8: ``quantize_static`` on the calibration set after ``quant_pre_process``.

Int8 default: QOperator format, uint8 activations x int8 weights (U8S8), per-channel
weights. On x86 CPUs with VNNI this ran several times faster than fp32, while the QDQ
S8S8 form ran slower than fp32 for ResNet50 (see docs/convert.md and
benchmarks/results/convert.md for the measurements). ``onnx_format``,
``onnx_activations``, ``onnx_weights``, ``onnx_per_channel`` and ``onnx_reduce_range``
choose otherwise; use ``onnx_reduce_range`` on x86 CPUs without VNNI (AVX2 / AVX-512F only),
where U8S8 can saturate.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from edgebrain.calibration import resolve_method
from edgebrain.memory import MB, InsufficientMemory, require, step_budget
from edgebrain.progress import track

from .base import (
    BuildContext,
    Built,
    ConversionError,
    Target,
    equalize_wanted,
    equalized_source,
)
from .registry import register
from .source import DEFAULT_OPSET, MIN_OPSET

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
BOUNDARY = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
INTEGER_OPS = {"ConvInteger", "MatMulInteger", "QGemm", "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
HEAD_OPS = {"MatMul", "Gemm", "Softmax"}  # the classifier head, kept float with float_head
# ops between the last classifier layer and the output, kept float with float_logits
LOGITS_OPS = {"MatMul", "Gemm", "Add", "Softmax", "Sigmoid", "Identity", "Reshape", "Squeeze", "Flatten"}
# Histogram for entropy (KL) calibration: 2048 bins over the observed range, thresholds searched
# in steps of 128 quantised bins (the TensorRT recipe that ORT's calibrator implements).
ENTROPY_BINS = {"num_bins": 2048, "num_quantized_bins": 128}
LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Gather",
              "Concat", "Slice"}


def shorten_names(path: Path) -> dict[str, Any] | None:
    """Rename the intermediate tensors and initializers of the ONNX file at ``path`` to ``t0``,
    ``t1``, ... and its nodes to ``n0``, ``n1``, ...; drop doc strings. The graph's inputs and
    outputs keep their names, so runners and callers see the same interface. Graphs with
    subgraphs (If/Loop) are left as they are (returns None). Returns what was done."""
    import onnx

    before = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.initializer):
        return None
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    new: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return new.setdefault(name, f"t{len(new)}")

    for t in g.initializer:
        t.name = short(t.name)
    for i, n in enumerate(g.node):
        n.input[:] = [short(x) for x in n.input]
        n.output[:] = [short(x) for x in n.output]
        n.name = f"n{i}"
        n.doc_string = ""
    for v in g.value_info:
        v.name = short(v.name)
    g.doc_string = ""
    part = path.with_name(path.name + ".partial")
    onnx.save(model, str(part))
    part.replace(path)
    return {"stripped": f"{len(new)} tensor names shortened to t<i>, {len(g.node)} node names to n<i> "
                        "(graph inputs and outputs keep theirs)",
            "bytes_saved": before - path.stat().st_size}


def onnx_ops(path: Path) -> dict[str, Any]:
    """Count quantised vs float compute nodes of an ONNX graph.

    QOperator nodes (``QLinear*``, ``*Integer``) count as int8, and so does a node that reads only
    their 8-bit outputs (MaxPool on uint8); in QDQ graphs a node whose inputs (weights included) all
    come from DequantizeLinear counts as int8 (the runtime fuses it).
    Q/DQ nodes are ``boundary_ops``; pure layout ops (Reshape, Transpose, ...) are ``layout_ops``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}
    q: Counter[str] = Counter()
    f: Counter[str] = Counter()
    boundary = layout = 0
    # tensors holding 8-bit data: outputs of QuantizeLinear / QLinear* nodes, and of the nodes that
    # read only such tensors (QOperator graphs run MaxPool and layout ops directly on uint8)
    int8_data: set[str] = set()
    for n in g.node:
        t = n.op_type
        data_ins = [i for i in n.input if i and i not in inits]
        on_int8 = bool(data_ins) and all(i in int8_data for i in data_ins)
        if t in BOUNDARY:
            boundary += 1
            if t == "QuantizeLinear":
                int8_data.update(n.output)
        elif t.startswith("QLinear") or t in INTEGER_OPS:
            q[t] += 1
            if t.startswith("QLinear"):
                int8_data.update(n.output)
        elif t in LAYOUT_OPS or t == "Constant":
            layout += 1
            if on_int8:
                int8_data.update(n.output)
        elif on_int8:
            q[t] += 1
            int8_data.update(n.output)
        else:
            # QDQ: every input (weights and bias included) comes from a DequantizeLinear; a float
            # initializer feeding the node means it computes in float.
            ins = [i for i in n.input if i]
            srcs = [None if i in inits else producer.get(i) for i in ins]
            if ins and all(s is not None and s.op_type == "DequantizeLinear" for s in srcs):
                q[t] += 1
            else:
                f[t] += 1
    return {
        "int8_ops": int(sum(q.values())),
        "float_ops": int(sum(f.values())),
        "boundary_ops": boundary,
        "layout_ops": layout,
        "float_op_types": sorted(f),
        "op_counts": {"quantized": dict(sorted(q.items())), "float": dict(sorted(f.items()))},
        "opset": _default_opset(model) or None,
    }


def _default_opset(model: Any) -> int:
    """The default-domain opset a loaded ONNX model imports (0 if none)."""
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def source_opset(path: Path) -> int:
    """The default-domain opset an ONNX file imports."""
    import onnx

    return _default_opset(onnx.load(str(path), load_external_data=False))


class ONNXTarget(Target):
    name = "onnx"
    runtime = "onnxruntime"
    suffix = ".onnx"
    precisions = ("fp32", "fp16", "dynamic", "int8")
    not_supported = {
        "bf16": "onnxruntime's CPU provider has no bf16 convolution kernels (use openvino bf16)",
        "int16x8": "16-bit activation quantisation is not run by onnxruntime's CPU kernels (use tflite int16x8)",
    }
    # percentile ranges are compared with min/max on the validation split by every conversion
    int8_candidates = [{"calib_method": "percentile"}]
    int8_fallbacks = [{"float_head": True}]
    weight_scale_option = "onnx_per_channel"
    int8_fallbacks_after_per_tensor = [{"onnx_per_channel": True}, {"float_head": True}]
    options = {
        "opset": DEFAULT_OPSET,
        "onnx_format": "qoperator",
        "onnx_activations": "u8",
        "onnx_weights": "s8",
        "onnx_per_channel": "auto",
        "onnx_reduce_range": False,
        "float_head": False,
        "float_logits": True,
        "strip_names": True,
    }
    option_help = {
        "opset": f"ONNX opset of the export (>= {MIN_OPSET})",
        "onnx_format": "int8 graph form: qoperator (QLinearConv...) or qdq (Quantize/DequantizeLinear pairs)",
        "onnx_activations": "int8 activation type: u8 or s8",
        "onnx_weights": "int8 weight type: s8 or u8",
        "onnx_per_channel": "int8 weight scales: per-channel (True), per-tensor (False), or auto (default): "
                            "per-channel, except for a model with depthwise convolutions when the int8 build "
                            "is verified on the validation split: per-tensor after cross-layer equalisation "
                            "(--equalize), with per-channel as its first fallback",
        "equalize": "int8 (TFLite, ONNX, OpenVINO): cross-layer equalisation of depthwise -> pointwise convolution pairs "
                    "before quantising (see the tflite target)",
        "onnx_reduce_range": "7-bit weights (for x86 CPUs without VNNI, where U8S8 can saturate)",
        "float_logits": "int8 (ONNX, TFLite): keep the last classifier layer (logits, softmax) in float, so "
                        "close class scores are not rounded onto one 8-bit step (default on; costs classes x "
                        "features x 3 bytes)",
    }

    def build(self, ctx: BuildContext, precision: str, out: Path) -> Built:
        src = ctx.source
        opset = int(ctx.options.get("opset", DEFAULT_OPSET))
        equalization = None
        if precision == "int8" and equalize_wanted(ctx, self._per_channel(ctx)[0]):
            src, equalization = equalized_source(ctx)
        export = src.export_onnx(ctx.workdir, opset)
        dst = out / MODEL_FILE
        warnings: list[str] = []
        quant: dict[str, Any] | None = None
        calib_block: dict[str, Any] | None = None
        if precision == "fp32":
            shutil.copyfile(export, dst)
        elif precision == "fp16":
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            m16 = convert_float_to_float16(onnx.load(str(export)), keep_io_types=True)
            onnx.save(m16, str(dst))
            quant = {"scheme": "float16", "io": "float32", "tool": "onnxruntime.transformers.float16"}
        elif precision == "dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            pre = self._preprocessed(export, ctx.workdir)
            opt = ctx.options.get("onnx_per_channel", "auto")
            per_channel = opt if isinstance(opt, bool) else True
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                             reduce_range=bool(ctx.options.get("onnx_reduce_range", False)))
            quant = {"scheme": "dynamic", "weights": "int8", "per_channel": per_channel,
                     "activations": "uint8, quantised at run time", "tool": "onnxruntime.quantization.quantize_dynamic"}
        elif precision == "int8":
            opset = source_opset(export)
            if opset < MIN_OPSET:  # per-channel QDQ / QLinear ops need opset 13 in onnxruntime
                raise ConversionError(f"{src.path}: ONNX opset {opset}; int8 quantisation needs opset >= "
                                      f"{MIN_OPSET}: re-export the model, or upgrade it with "
                                      "onnx.version_converter.convert_version (fp32/fp16 convert as they are)")
            quant, calib_block, warn = self._static(ctx, export, dst)
            warnings += warn
            if equalization is not None:
                quant["equalization"] = equalization
        else:  # pragma: no cover - guarded by unsupported()
            raise ConversionError(f"onnx: unsupported precision {precision}")
        names = shorten_names(dst) if ctx.options.get("strip_names", True) else None
        ops = self.count_ops(dst)
        if precision == "int8" and ops and ops["float_ops"]:
            warnings.append(f"{ops['float_ops']} op(s) run in float: {', '.join(ops['float_op_types'])}")
        return Built(model_file=MODEL_FILE, quantization=quant, calibration=calib_block, ops=ops,
                     warnings=warnings, files=[MODEL_FILE], runtime_options={}, names=names)

    @staticmethod
    def _preprocessed(export: Path, workdir: Path) -> Path:
        """``quant_pre_process``: ORT graph optimisation (e.g. BatchNorm folding) + shape inference."""
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = Path(workdir) / (export.stem + "-pre.onnx")
        if not pre.is_file():  # reused within one run; written under another name, then renamed
            part = pre.with_name(pre.stem + ".partial.onnx")
            try:
                quant_pre_process(str(export), str(part), skip_symbolic_shape=True)
            except Exception as exc:
                part.unlink(missing_ok=True)
                raise ConversionError(f"{export}: onnxruntime quant_pre_process failed ({exc})") from exc
            part.replace(pre)
        return pre

    def _static(self, ctx: BuildContext, export: Path, dst: Path) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        import onnx
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        o = ctx.options
        fmt = str(o.get("onnx_format", "qoperator")).lower()
        formats = {"qoperator": QuantFormat.QOperator, "qdq": QuantFormat.QDQ}
        types = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
        act = str(o.get("onnx_activations", "u8")).lower()
        wt = str(o.get("onnx_weights", "s8")).lower()
        if fmt not in formats:
            raise ConversionError(f"--onnx-format must be qoperator or qdq, got {fmt!r}")
        if act not in types or wt not in types:
            raise ConversionError(f"--onnx-activations/--onnx-weights must be u8 or s8, got {act!r}/{wt!r}")
        method, warn = resolve_method("ort", ctx.calib_method)
        warnings = [warn] if warn else []
        cs = ctx.calib()
        pre = self._preprocessed(export, ctx.workdir)
        g = onnx.load(str(pre), load_external_data=False).graph
        inits = {i.name for i in g.initializer}
        input_name = [i.name for i in g.input if i.name not in inits][0]
        per_channel, why = self._per_channel(ctx)
        reduce_range = bool(o.get("onnx_reduce_range", False))
        float_head = bool(o.get("float_head", False))
        exclude = [n.name for n in g.node
                   if (float_head and n.op_type in HEAD_OPS) or any(sc in n.name for sc in ctx.float_scopes)]
        float_logits = bool(o.get("float_logits", True))
        logits = _logits_nodes(g) if float_logits else []
        exclude += [n for n in logits if n not in exclude]
        shared_acts = _shared_input_activations(g) if fmt == "qoperator" else []
        exclude += [n for n in shared_acts if n not in exclude]
        if ctx.float_scopes and not any(sc in n.name for n in g.node for sc in ctx.float_scopes):
            raise ConversionError(f"onnx: no node name contains {ctx.float_scopes} (the float stages of the "
                                  "model card); cannot keep them float")
        cm = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile, "distribution": CalibrationMethod.Distribution}[method]
        cache: Path | None = None
        try:
            # The ranges are collected here, a few images at a time (quantize_static would keep every
            # calibration image's activations until the end: tens of GB for a VGG16 at 240 px with
            # the histogram methods), and handed over as a calibration cache. Entropy: quantize_static
            # builds its calibrator with 128 histogram bins and 128 quantised bins, so the KL search
            # has a single candidate, the full range, and "entropy" silently equals min/max; the
            # library's own calibrator runs here at the usual 2048 bins.
            cache, streamed = stream_ranges(pre, cm, cs, input_name, ctx.workdir,
                                            ENTROPY_BINS if method == "entropy" else {})
            quantize_static(str(pre), str(dst), None, quant_format=formats[fmt], per_channel=per_channel,
                            reduce_range=reduce_range, activation_type=types[act], weight_type=types[wt],
                            calibrate_method=cm, nodes_to_exclude=exclude or None,
                            calibration_cache_path=str(cache))
        except InsufficientMemory:
            raise
        except Exception as exc:
            raise ConversionError(f"{export}: onnxruntime static quantisation failed "
                                  f"({type(exc).__name__}: {exc})") from exc
        finally:
            if cache is not None:
                cache.unlink(missing_ok=True)
        quant = {"scheme": "static", "format": fmt, "activations": f"{act} per-tensor", "weights": wt,
                 "per_channel": per_channel, "weight_scales": why, "reduce_range": reduce_range,
                 "tool": "onnxruntime.quantization.quantize_static", "preprocess": "quant_pre_process",
                 "float_head": float_head, "float_logits": bool(logits), "nodes_excluded": exclude,
                 "float_stages": list(ctx.float_stages), "float_scopes": list(ctx.float_scopes),
                 "activations_kept_float": shared_acts}
        if method == "entropy":
            quant["entropy_histogram"] = dict(ENTROPY_BINS)
        quant["calibration_streaming"] = streamed
        return quant, cs.manifest(method, "onnxruntime"), warnings

    def count_ops(self, model_file: Path) -> dict[str, Any] | None:
        return onnx_ops(model_file)


def _shared_input_activations(g: Any) -> list[str]:
    """Relu/Clip nodes whose input tensor is also read elsewhere (or is a graph output).

    onnxruntime's QOperator quantiser removes every Relu/Clip that follows a quantised op and lets the
    producer's output range, narrowed to the activation's, do the clipping; but it narrows that range
    only when the activation is the tensor's sole consumer. With another consumer the activation is
    dropped and nothing clips: in Xception each residual sum feeds the next block's ReLU *and* the
    next addition, and the int8 model silently ran without those ReLUs (validation agreement 96.7 %
    instead of 99.5 %). These nodes are kept float (dequantise, Relu, quantise) instead."""
    consumers = Counter(i for n in g.node for i in n.input if i)
    outputs = {o.name for o in g.output}
    return [n.name for n in g.node
            if n.op_type in ("Relu", "Clip") and n.name and n.input
            and (consumers[n.input[0]] > 1 or n.input[0] in outputs)]


def _logits_nodes(g: Any) -> list[str]:
    """The final classifier layer: the nodes from the graph output back through the softmax, bias
    and layout ops to (and including) the last MatMul/Gemm; none if the output is not such a layer."""
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}
    out: list[str] = []
    t = g.output[0].name
    while t in producer:
        n = producer[t]
        if n.op_type not in LOGITS_OPS or not n.name:  # unnamed nodes cannot be excluded one by one
            return []
        out.append(n.name)
        if n.op_type in {"MatMul", "Gemm"}:
            return out
        t = next((i for i in n.input if i in producer and i not in inits), "")
    return []


FLOAT_TYPES = (1, 10)  # onnx.TensorProto.FLOAT, FLOAT16
BYTES = {1: 4, 10: 2}
# the most images one calibration pass runs (quantize_static's readers used 16)
MAX_CALIB_BATCH = 16
# histogram methods hold a pass's activations and, while histogramming one tensor, two copies of it
HISTOGRAM_COPIES = 3
# onnxruntime's working memory per image in flight, as a multiple of the model's activation bytes
# (arena, im2col buffers, layout transposes): 5.2 GB peak for a VGG16 at 240 px (127 MB of
# activations per image) calibrating 16 images per pass, ~2x the activations
RUNTIME_FACTOR = 2


def activation_sizes(model: Path) -> dict[str, int]:
    """Bytes per image of every float activation of ``model`` (after ONNX shape inference): the
    tensors onnxruntime's calibrators read. The batch dimension is left out; other unknown
    dimensions count as 1 (the figure is then a lower bound)."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    try:
        m = onnx.shape_inference.infer_shapes(m)
    except Exception as exc:  # an estimate only: fall back to the declared shapes
        log.warning("%s: ONNX shape inference failed (%s); activation sizes are a lower bound", model, exc)
    inits = {i.name for i in m.graph.initializer}
    sizes: dict[str, int] = {}
    for vi in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
        t = vi.type.tensor_type
        if vi.name in inits or t.elem_type not in FLOAT_TYPES or len(t.shape.dim) < 2:
            continue
        n = 1
        for d in t.shape.dim[1:]:
            n *= d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
        sizes[vi.name] = n * BYTES[t.elem_type]
    return sizes


def activation_bytes_per_image(model: Path) -> int:
    """Bytes of all float activations of one image (see :func:`activation_sizes`)."""
    return int(sum(activation_sizes(model).values()))


def calibration_batch(per_image: int, largest: int, histogram: bool, budget: int) -> int:
    """Images per calibration pass within ``budget`` bytes: onnxruntime's working memory for the
    images in flight (``RUNTIME_FACTOR`` x their activations), and for the histogram methods also
    every activation of the pass handed back to the calibrator, plus two copies of one tensor."""
    hold = calibration_batch_bytes(per_image, largest, histogram, 1)
    return int(max(1, min(MAX_CALIB_BATCH, budget // max(hold, 1))))


class _OneBatch:
    """A CalibrationDataReader over one batch (the calibrators read a reader to its end)."""

    def __init__(self, input_name: str, xb: Any) -> None:
        self._items = [{input_name: xb}]

    def get_next(self) -> dict[str, Any] | None:
        return self._items.pop() if self._items else None


def stream_ranges(model: Path, method: Any, cs: Any, input_name: str, workdir: Path,
                  extra_options: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Activation ranges of ``model`` on the calibration set ``cs`` by onnxruntime's own calibrator
    (``create_calibrator``, the op types ``quantize_static`` calibrates), fed one pass of a few
    images at a time: min/max ranges merge exactly; the histogram methods (entropy, percentile,
    distribution) add each pass to their running histograms, so memory is bounded by one pass
    instead of growing with the calibration set. Checks beforehand that one image fits in the
    available memory (:class:`~edgebrain.memory.InsufficientMemory` otherwise). Returns the
    calibration cache (``quantize_static(calibration_cache_path=...)``) and what was held."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.calibrate import save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    sizes = activation_sizes(model)
    per, largest = sum(sizes.values()), max(sizes.values(), default=0)
    histogram = method != CalibrationMethod.MinMax
    budget = step_budget()
    batch = calibration_batch(per, largest, histogram, budget)
    name = str(method).rsplit(".", 1)[-1].lower()
    hold = calibration_batch_bytes(per, largest, histogram, batch)
    require(f"onnx int8 calibration ({name}) of {model.name}", hold + 2 * model.stat().st_size,
            hint="Use a machine with more memory or a smaller input size")
    tmp = Path(tempfile.mkdtemp(prefix="ort-calib-", dir=workdir))
    try:
        calibrator = create_calibrator(model, list(set(QLinearOpsRegistry) | set(QDQRegistry)),
                                       augmented_model_path=str(tmp / "augmented.onnx"), calibrate_method=method,
                                       extra_options=dict(extra_options))
        for xb in track(cs.batches(batch), f"onnx int8: {name} calibration, {batch} image(s) per pass"):
            with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print a line per pass
                calibrator.collect_data(_OneBatch(input_name, xb))
        with contextlib.redirect_stdout(io.StringIO()):
            ranges = calibrator.compute_data()
        del calibrator
        cache = Path(workdir) / f"{model.stem}.{name}-ranges.json"
        save_tensors_data(ranges, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache, {"images_per_pass": batch, "passes": -(-len(cs) // batch),
                   "activation_mb_per_image": round(per / MB, 3), "held_mb_per_pass": round(hold / MB, 3),
                   "budget_mb": round(budget / MB, 3),
                   "all_images_at_once_mb": round(per * len(cs) / MB, 3) if histogram else None}


def calibration_batch_bytes(per_image: int, largest: int, histogram: bool, batch: int) -> int:
    """Bytes a calibration pass of ``batch`` images holds (see :func:`calibration_batch`)."""
    run = RUNTIME_FACTOR * per_image
    return batch * (run + per_image + (HISTOGRAM_COPIES - 1) * largest if histogram else run)


register(ONNXTarget())
