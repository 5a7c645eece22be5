"""TFLite / LiteRT: fp32, fp16, dynamic-range, full-integer int8 and 16x8, with
``tf.lite.TFLiteConverter``. Int8 models are inspected op by op (LiteRT interpreter
``_get_ops_details``) so that any op left in float is listed in the manifest."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgebrain.calibration import resolve_method
from edgebrain.progress import Heartbeat

from .base import (
    BuildContext,
    Built,
    ConversionError,
    Target,
    equalize_wanted,
    equalized_source,
)
from .registry import register

MODEL_FILE = "model.tflite"
# Ops that only move data between float and integer at the model's edges.
BOUNDARY_OPS = {"QUANTIZE", "DEQUANTIZE"}
FLOAT_TYPES = {"float32", "float16", "float64"}
QUANT_TYPES = {"int8", "uint8", "int16"}


def strip_tensor_names(blob: bytes) -> tuple[bytes, dict[str, Any]]:
    """``blob`` without the model description, subgraph and tensor names (``flatbuffer_utils``, as
    TensorFlow's ``strip_strings``), but with its signatures, which name only the inputs and
    outputs (so ``get_signature_runner`` still works). Returns the model and what was removed."""
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    m = fbu.convert_bytearray_to_object(bytearray(blob))
    n = 0
    m.description = None
    for sg in m.subgraphs:
        sg.name = None
        for t in sg.tensors:
            n += t.name is not None
            t.name = None
    out = bytes(fbu.convert_object_to_bytearray(m))
    return out, {"stripped": f"{n} tensor names, model description (signatures kept)",
                 "bytes_saved": len(blob) - len(out)}


def tflite_ops(model: bytes | Path) -> dict[str, Any]:
    """Count the ops of a .tflite model by the dtypes they compute in.

    ``int8_ops``: ops whose activations are int8/uint8/int16; ``float_ops``: ops computing in
    float (QUANTIZE/DEQUANTIZE at the edges are counted separately as ``boundary_ops``);
    ``hybrid_ops``: float activations with int8 weights (dynamic-range models)."""
    from edgebrain.runtime import tflite_interpreter_class

    Interpreter, _ = tflite_interpreter_class()
    interp = (Interpreter(model_content=model) if isinstance(model, (bytes, bytearray))
              else Interpreter(model_path=str(model)))
    tensors = {d["index"]: d for d in interp.get_tensor_details()}
    int8_types: Counter[str] = Counter()
    float_types: Counter[str] = Counter()
    hybrid_types: Counter[str] = Counter()
    boundary = 0
    for op in interp._get_ops_details():
        name = op["op_name"]
        if name in BOUNDARY_OPS:
            boundary += 1
            continue
        acts = [np.dtype(tensors[i]["dtype"]).name for i in list(op["inputs"]) + list(op["outputs"])
                if i >= 0 and i in tensors]
        # int32 tensors are biases/shapes/indices; classify by the activations.
        if any(t in FLOAT_TYPES for t in acts) and any(t in ("int8", "uint8") for t in acts):
            hybrid_types[name] += 1
        elif any(t in FLOAT_TYPES for t in acts):
            float_types[name] += 1
        elif any(t in QUANT_TYPES for t in acts):
            int8_types[name] += 1
        else:
            float_types[name] += 1  # int32-only ops (shape arithmetic) count as not quantised
    return {
        "int8_ops": int(sum(int8_types.values())),
        "float_ops": int(sum(float_types.values())),
        "boundary_ops": boundary,
        "hybrid_ops": int(sum(hybrid_types.values())),
        "float_op_types": sorted(float_types),
        "hybrid_op_types": sorted(hybrid_types),
        "op_counts": {"quantized": dict(sorted(int8_types.items())), "float": dict(sorted(float_types.items())),
                      "hybrid": dict(sorted(hybrid_types.items()))},
    }


class TFLiteTarget(Target):
    name = "tflite"
    runtime = "ai-edge-litert (LiteRT)"
    suffix = ".tflite"
    precisions = ("fp32", "fp16", "dynamic", "int8", "int16x8")
    source_formats = ("tf-keras", "keras3")
    not_supported = {"bf16": "TFLite has no bf16 model type"}
    int8_fallbacks = [{"float_head": True}]  # already per-channel (or set by the user)
    weight_scale_option = "tflite_per_channel"
    per_tensor_without_depthwise = True
    int8_fallbacks_after_per_tensor = [{"tflite_per_channel": True}, {"tflite_per_channel": True, "float_head": True}]
    options = {"tflite_io": "float", "tflite_float_fallback": True, "tflite_per_channel": "auto", "float_head": False,
               "float_logits": True, "equalize": "auto", "strip_names": True}
    option_help = {
        "tflite_io": "int8 model inputs/outputs: 'float' (QUANTIZE/DEQUANTIZE inside the model) or 'int8' "
                     "(fully integer; the runner quantises the input)",
        "tflite_float_fallback": "if an op has no int8 kernel, keep it in float (listed in the manifest) "
                                 "instead of failing",
        "tflite_per_channel": "int8 weight scales: per-channel (True), per-tensor (False: one scale per "
                              "tensor, a smaller file; depthwise convolutions need cross-layer equalisation "
                              "for it), or auto (default): per-tensor when the int8 build is verified on the "
                              "validation split (after equalisation for a model with depthwise convolutions), "
                              "with per-channel as its first fallback; per-channel when not verified",
        "float_head": "int8: keep the classifier head (fully-connected layers and softmax) in float; the "
                      "convolutions stay int8 (all targets)",
        "equalize": "int8 (TFLite, ONNX, OpenVINO): cross-layer equalisation of depthwise -> pointwise convolution pairs "
                    "before quantising (an exact rescaling of the float weights that suits one scale per "
                    "tensor): auto (default: with per-tensor weight scales on models with depthwise "
                    "convolutions), true (always), false (never)",
        "strip_names": "drop the debugging names of intermediate tensors and nodes from the model "
                       "file, every precision (default on): TFLite tensor names, as TensorFlow's strip_strings "
                       "does but keeping the signature; ONNX names shortened to t0, t1, ... (inputs and outputs "
                       "keep theirs). Tens of kB, a few % of a small model's int8 file",
    }

    def unsupported(self, precision: str, source_format: str) -> str | None:
        if source_format == "onnx" and precision in self.precisions:
            return ("an ONNX source converts to the onnx and openvino targets only (no ONNX -> TFLite path): "
                    "give the original Keras model (.keras / SavedModel) for a TFLite artifact")
        return super().unsupported(precision, source_format)

    def int8_fallbacks_for(self, ctx: BuildContext) -> list[dict[str, Any]]:
        fallbacks = super().int8_fallbacks_for(ctx)
        if str(ctx.options.get("tflite_io", "float")).lower() == "int8":  # a float head needs float I/O
            fallbacks = [f for f in fallbacks if not f.get("float_head")]
        return fallbacks

    def build(self, ctx: BuildContext, precision: str, out: Path) -> Built:
        from edgebrain.tfenv import import_tf

        tf = import_tf()
        src = ctx.source
        io = str(ctx.options.get("tflite_io", "float")).lower()
        if io not in ("float", "int8"):
            raise ConversionError(f"--tflite-io must be float or int8, got {io!r}")
        warnings: list[str] = []
        quant: dict[str, Any] | None = None
        calib_block: dict[str, Any] | None = None

        def representative(c: Any) -> dict[str, Any]:
            cs = ctx.calib()
            method, warn = resolve_method("tflite", ctx.calib_method)
            if warn:
                warnings.append(warn)

            def gen() -> Any:
                beat = Heartbeat(f"tflite {precision} calibration", total=len(cs), at_once=False)
                for xb in cs.batches(1):
                    yield [xb]
                    beat.tick()

            c.representative_dataset = gen
            return cs.manifest(method, "tflite")

        model = src.model
        equalization = None
        if precision in ("int8", "int16x8") and equalize_wanted(ctx, self._per_channel(ctx)[0]):
            eq, equalization = equalized_source(ctx)
            model = eq.model
        c = tf.lite.TFLiteConverter.from_keras_model(model)
        if precision == "fp32":
            pass
        elif precision == "fp16":
            c.optimizations = [tf.lite.Optimize.DEFAULT]
            c.target_spec.supported_types = [tf.float16]
            quant = {"scheme": "float16 weights", "compute": "float32 (weights dequantised at load on CPU)"}
        elif precision == "dynamic":
            c.optimizations = [tf.lite.Optimize.DEFAULT]
            quant = {"scheme": "dynamic range", "weights": "int8 per-channel", "activations": "float, "
                     "quantised on the fly per op"}
        elif precision == "int8":
            c.optimizations = [tf.lite.Optimize.DEFAULT]
            calib_block = representative(c)
            c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            if io == "int8":
                c.inference_input_type = tf.int8
                c.inference_output_type = tf.int8
            per_channel, why = self._per_channel(ctx)
            c._experimental_disable_per_channel = not per_channel
            quant = {"scheme": "full integer",
                     "weights": "int8 " + ("per-channel" if per_channel else "per-tensor") + " (symmetric)",
                     "weight_scales": why,
                     "activations": "int8 per-tensor (asymmetric)", "io": io, "float_fallback": False}
        elif precision == "int16x8":
            c.optimizations = [tf.lite.Optimize.DEFAULT]
            calib_block = representative(c)
            c.target_spec.supported_ops = [
                tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
            quant = {"scheme": "16x8", "weights": "int8", "activations": "int16", "io": "float",
                     "float_fallback": False}
        else:  # pragma: no cover - guarded by unsupported()
            raise ConversionError(f"tflite: unsupported precision {precision}")

        float_head = bool(ctx.options.get("float_head", False)) and precision == "int8"
        # the last classifier layer stays float (default): not with int8 model I/O or a float head
        float_logits = (bool(ctx.options.get("float_logits", True)) and precision == "int8" and not float_head
                        and str(ctx.options.get("tflite_io", "float")).lower() == "float")
        scopes = list(ctx.float_scopes) if precision == "int8" else []
        if ctx.float_scopes and precision != "int8":
            warnings.append(f"float stages {ctx.float_stages} are kept float for int8 only; {precision} "
                            "quantises them")
        if io == "int8" and (float_head or scopes):
            # selective quantisation keeps float ops, so the model's inputs/outputs are float
            raise ConversionError("--tflite-io int8 (a fully integer model) cannot keep "
                                  + ("the classifier head" if float_head else f"ops named *{'*, *'.join(scopes)}*")
                                  + " float; use --tflite-io float for that")
        try:
            if float_head or float_logits or scopes:
                blob, logits_nodes = self._selective(tf, c, float_head, scopes, float_logits)
                float_logits = bool(logits_nodes)  # False when the model does not end in a dense layer
                assert quant is not None
                kept = (["the classifier head (FULLY_CONNECTED, SOFTMAX)"] if float_head else []) + (
                    ["the last classifier layer (FULLY_CONNECTED, SOFTMAX)"] if float_logits else []) + (
                    [f"ops named *{'*, *'.join(scopes)}*"] if scopes else [])
                quant.update({"float_head": float_head, "float_logits": float_logits,
                              "float_logits_nodes": logits_nodes, "io": "float",
                              "float_stages": list(ctx.float_stages), "float_scopes": scopes,
                              "scheme": f"full integer except {' and '.join(kept)} (float)" if kept
                              else "full integer"})
            else:
                blob = c.convert()
                if quant is not None and precision == "int8":
                    quant["float_logits"] = False
        except ConversionError:
            raise
        except Exception as exc:
            if precision not in ("int8", "int16x8") or not ctx.options.get("tflite_float_fallback", True):
                raise ConversionError(f"{src.path}: TFLite conversion to {precision} failed "
                                      f"({type(exc).__name__}: {str(exc)[:800]})") from exc
            # Some op has no integer kernel: allow float builtins and say which ops stayed float.
            c.target_spec.supported_ops = list(c.target_spec.supported_ops) + [tf.lite.OpsSet.TFLITE_BUILTINS]
            try:
                blob = c.convert()
            except Exception as exc2:
                raise ConversionError(f"{src.path}: TFLite conversion to {precision} failed "
                                      f"({type(exc2).__name__}: {str(exc2)[:800]})") from exc2
            assert quant is not None
            if scopes:  # never quantise a stage the model card keeps float
                raise ConversionError(f"{src.path}: TFLite selective quantisation failed, so ops named "
                                      f"*{'*, *'.join(scopes)}* cannot be kept float ({type(exc).__name__}: "
                                      f"{str(exc)[:400]})") from exc
            if float_head or float_logits:
                warnings.append("the classifier " + ("head" if float_head else "layer") + " could not be kept "
                                f"float (selective quantisation failed: {str(exc).splitlines()[0][:200]}); it is int8")
            quant.update({"float_fallback": True, "float_head": False, "float_logits": False,
                          "float_logits_nodes": []})
            warnings.append(f"full-integer {precision} was not possible ({str(exc).splitlines()[0][:200]}); "
                            "ops without integer kernels stay in float (see ops.float_op_types)")
        if equalization is not None and quant is not None:
            quant["equalization"] = equalization
        names = None
        if ctx.options.get("strip_names", True):
            blob, names = strip_tensor_names(blob)
        (out / MODEL_FILE).write_bytes(blob)
        ops = self.count_ops(out / MODEL_FILE)
        if precision in ("int8", "int16x8") and ops and ops["float_ops"]:
            warnings.append(f"{ops['float_ops']} op(s) run in float: {', '.join(ops['float_op_types'])}")
        if precision in ("int8", "int16x8") and ops and ops["hybrid_ops"]:
            warnings.append(f"{ops['hybrid_ops']} op(s) run in float with int8 weights (hybrid): "
                            f"{', '.join(ops['hybrid_op_types'])}")
        return Built(model_file=MODEL_FILE, quantization=quant, calibration=calib_block, ops=ops,
                     warnings=warnings, files=[MODEL_FILE], names=names)

    @staticmethod
    def _selective(tf: Any, c: Any, float_head: bool, scopes: list[str],
                   float_logits: bool = False) -> tuple[bytes, list[str]]:
        """Selective quantisation (``QuantizationDebugger`` with ``denylisted_ops`` /
        ``denylisted_nodes``): the classifier head (fully-connected layers, softmax), or only its
        last layer, and/or the ops whose names contain one of ``scopes`` stay float, everything else
        is int8. Returns the model and the nodes kept float for ``float_logits``."""
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        c.inference_input_type = tf.float32
        c.inference_output_type = tf.float32
        rep = c.representative_dataset
        nodes: list[str] = []
        logits: list[str] = []
        dbg = None
        if scopes or float_logits:
            from edgebrain.sr import quantizable_nodes

            listed, dbg = quantizable_nodes(c, rep)  # calibrated once, reused below
        if scopes:
            nodes = [n for _, n in listed if any(s in n for s in scopes)]
            if not nodes:
                raise ConversionError(f"tflite: no quantisable op name contains {scopes} (the float stages of "
                                      "the model card); cannot keep them float")
        if float_logits:  # the last FULLY_CONNECTED and what follows it (softmax)
            fc = [i for i, (op, _) in enumerate(listed) if op == "FULLY_CONNECTED"]
            logits = [n for _, n in listed[fc[-1]:] if n not in nodes] if fc else []
            nodes += logits
        options = tf.lite.experimental.QuantizationDebugOptions(
            denylisted_ops=["FULLY_CONNECTED", "SOFTMAX"] if float_head else None, denylisted_nodes=nodes or None)
        if dbg is None:
            dbg = tf.lite.experimental.QuantizationDebugger(converter=c, debug_dataset=rep, debug_options=options)
        else:
            dbg.options = options
        return bytes(dbg.get_nondebug_quantized_model()), logits

    def count_ops(self, model_file: Path) -> dict[str, Any] | None:
        return tflite_ops(model_file)


register(TFLiteTarget())
