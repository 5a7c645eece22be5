"""OpenVINO IR via ``openvino.convert_model`` (from the ONNX export, or the SavedModel).

* fp32: f32 IR, run with ``INFERENCE_PRECISION_HINT`` f32 (explicitly: on CPUs with
  AVX-512 bf16 / AMX OpenVINO otherwise runs "fp32" models in bf16);
* bf16: f32 IR, run with the bf16 hint (CPUs with native bf16);
* fp16: FP16-compressed weights (``compress_to_fp16``), computed in f32 unless
  ``openvino_fp16_compute`` says f16 (x86 CPUs without AVX512-FP16 map f16 to bf16);
* int8: ``nncf.quantize`` on the calibration set, or, with ``max_drop``,
  ``nncf.quantize_with_accuracy_control`` on the validation split (layers are reverted to
  float until the accuracy drop is within ``max_drop``). Unless layers stay float, NNCF
  quantises the FP16-compressed IR, as OpenVINO's own converter saves it by default: the
  weights become int8, the constants NNCF leaves unquantised (biases) stay FP16, and the
  per-channel dequantisation scales f32 (OpenVINO keeps those f32 on purpose). With accuracy
  control, a float head or float scopes it quantises the f32 IR, so layers kept or reverted to
  float keep f32 weights (``openvino_int8_ir`` fp16 / fp32 chooses explicitly).

``runtime_options.inference_precision`` is written to the manifest; the edge runner
(edgebrain.runtime.OpenVINORunner) applies it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgebrain.calibration import resolve_method
from edgebrain.progress import BudgetExpired, Deadline, Heartbeat

from .base import (
    BuildContext,
    Built,
    ConversionError,
    Target,
    equalize_wanted,
    equalized_source,
    inference_batch,
)
from .registry import register
from .source import DEFAULT_OPSET

MODEL_FILE = "model.xml"
WEIGHTS_FILE = "model.bin"
NON_COMPUTE = {"Input", "Parameter", "Output", "Result", "Const", "Constant", "Reorder"}
LAYOUT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Gather", "Concatenation", "Split"}
BOUNDARY = {"FakeQuantize"}  # (de)quantisation at the edges of int8 regions
QUANT_PRECISIONS = {"i8", "u8", "i4", "u4"}


def shorten_names(model: Any) -> dict[str, Any]:
    """Rename the nodes of an OpenVINO model to ``n0``, ``n1``, ... and drop the names of its
    intermediate tensors, in place, before ``openvino.save_model``. Parameters and Results keep
    their names, and so do the tensors the model reads and returns (the runner addresses them by
    name or index), so callers see the same interface. Returns what was done; ``bytes_saved``
    counts the UTF-8 bytes of the names dropped from the IR XML (before XML escaping)."""
    keep: set[tuple[str, int]] = set()  # (unique node name, output index) of the outputs returned
    for r in model.get_results():
        src = r.input_value(0)
        keep.add((src.get_node().get_name(), src.get_index()))
    nodes = tensors = chars = 0
    for i, op in enumerate(model.get_ordered_ops()):
        kind = op.get_type_name()
        if kind not in ("Parameter", "Result"):
            old = op.get_friendly_name()
            new = f"n{i}"
            chars += len(old.encode()) - len(new)
            op.set_friendly_name(new)
            nodes += 1
        for out in op.outputs():
            t = out.get_tensor()
            # a Result's output is the tensor it reads
            if kind in ("Parameter", "Result") or (op.get_name(), out.get_index()) in keep:
                continue
            names = t.get_names()
            if names:
                chars += len(",".join(sorted(names)).encode())
                t.set_names(set())
                tensors += 1
    return {"stripped": f"{nodes} node names shortened to n<i>, {tensors} intermediate tensor names dropped "
                        "(inputs and outputs keep theirs)", "bytes_saved": int(chars)}


def constant_bytes(xml: Path) -> dict[str, int]:
    """Bytes of the IR's constants by element type (``i8``, ``f16``, ``f32``, ...)."""
    import openvino as ov

    out: Counter[str] = Counter()
    for op in ov.Core().read_model(str(xml)).get_ops():
        if op.get_type_name() == "Constant":
            et = op.get_element_type()
            out[et.get_type_name()] += int(np.prod(op.get_output_shape(0), dtype=np.int64)) * et.size
    return dict(sorted(out.items()))


def openvino_ops(xml: Path, inference_precision: str = "f32") -> dict[str, Any]:
    """Count the ops of the *compiled* model (what the CPU plugin really executes) by their
    runtime precision: ``int8_ops`` run in i8/u8, ``float_ops`` in f32/bf16/f16. FakeQuantize
    nodes left at the edges of int8 regions are ``boundary_ops``, pure data movement (Reshape,
    Transpose, ...) ``layout_ops``."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": inference_precision})
    q: Counter[str] = Counter()
    f: Counter[str] = Counter()
    precisions: Counter[str] = Counter()
    layout = boundary = 0
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        prec = info["runtimePrecision"].astype(str).lower()
        if kind in NON_COMPUTE:
            continue
        precisions[prec] += 1
        if kind in LAYOUT:
            layout += 1
        elif kind in BOUNDARY:
            boundary += 1
        elif prec in QUANT_PRECISIONS:
            q[kind] += 1
        else:
            f[kind] += 1
    fq = sum(1 for op in ov.Core().read_model(str(xml)).get_ops() if op.get_type_name() == "FakeQuantize")
    return {
        "int8_ops": int(sum(q.values())),
        "float_ops": int(sum(f.values())),
        "boundary_ops": boundary,
        "layout_ops": layout,
        "float_op_types": sorted(f),
        "fake_quantize_nodes": fq,
        "runtime_precisions": dict(sorted(precisions.items())),
        "op_counts": {"quantized": dict(sorted(q.items())), "float": dict(sorted(f.items()))},
        "counted_on": f"CPU plugin, INFERENCE_PRECISION_HINT={inference_precision}",
    }


class OpenVINOTarget(Target):
    name = "openvino"
    runtime = "openvino"
    suffix = ".xml"
    precisions = ("fp32", "fp16", "bf16", "int8")
    not_supported = {
        "dynamic": "OpenVINO has no dynamic-range quantisation (use int8, calibrated)",
        "int16x8": "OpenVINO's CPU plugin has no 16-bit activation quantisation",
    }
    # NNCF's fast bias correction is compared with the exact one on the validation split by every
    # conversion (which one agrees better depends on the model)
    int8_candidates = [{"nncf_fast_bias_correction": True}]
    int8_fallbacks = [{"max_drop": 0.003, "max_drop_metric": "agreement"}]
    weight_scale_option = "openvino_per_channel"
    # accuracy control, the last resort, reverts layers of the per-channel model
    int8_fallbacks_after_per_tensor = [{"openvino_per_channel": True},
                                       {"max_drop": 0.003, "max_drop_metric": "agreement", "openvino_per_channel": True}]
    options = {
        "openvino_from": "onnx",
        "nncf_preset": "performance",
        "max_drop": None,
        "max_drop_metric": "accuracy",
        "openvino_fp16_compute": "f32",
        "float_head": False,
        "nncf_fast_bias_correction": False,
        "nncf_activation_range": "minmax",
        "openvino_int8_ir": "auto",
        "openvino_per_channel": "auto",
        "equalize": "auto",
        "strip_names": True,
    }
    option_help = {
        "openvino_from": "what convert_model reads: onnx (the tf2onnx export / ONNX source) or saved_model",
        "nncf_preset": "NNCF preset: performance (symmetric activations) or mixed (asymmetric activations)",
        "max_drop": "int8 with accuracy control: largest allowed absolute top-1 drop on the validation split "
                    "(0.005 = 0.5 pp); layers are reverted to float until it holds",
        "max_drop_metric": "what --max-drop bounds: accuracy (top-1 vs the labels) or agreement (top-1 "
                           "agreement with the float model)",
        "openvino_fp16_compute": "compute precision for fp16 (compressed-weight) IR: f32 or f16",
        "nncf_fast_bias_correction": "NNCF fast bias correction (default off: the slower, more exact "
                                     "BiasCorrection, which kept top-1 agreement higher on our validation split)",
        "nncf_activation_range": "activation ranges from the calibration set: minmax (the smallest minimum and "
                                 "largest maximum seen, as TFLite and onnxruntime MinMax do) or mean_minmax "
                                 "(NNCF's own default: per-image extremes averaged, which clips outliers)",
        "openvino_int8_ir": "the IR NNCF quantises: fp16 (weights compressed to FP16 first, as openvino's "
                            "converter saves them; the biases stay FP16 in the int8 IR) or fp32; auto: fp16 "
                            "unless layers stay float (accuracy control, float head, float scopes), then fp32",
        "openvino_per_channel": "int8 weight scales: per-channel (True), per-tensor (False), or auto (default): "
                                "per-channel, except for a model with depthwise convolutions when the int8 "
                                "build is verified on the validation split: per-tensor after cross-layer "
                                "equalisation (--equalize), with per-channel as its first fallback",
        "equalize": "int8: cross-layer equalisation of depthwise -> pointwise convolution pairs before "
                    "quantising (see the tflite target)",
        "strip_names": "drop the names of intermediate nodes and tensors from the model file (see the tflite "
                       "target); OpenVINO: nodes are renamed n<i>, the inputs and outputs keep their names",
    }

    # ------------------------------------------------------------------ IR

    def int8_candidates_for(self, ctx: BuildContext) -> list[dict[str, Any]]:
        # accuracy control already searches (layer by layer, on the validation split) and is the
        # slow step: it is not run twice
        return [] if ctx.options.get("max_drop") is not None else list(self.int8_candidates)

    def _ov_model(self, ctx: BuildContext, src: Any = None) -> Any:
        import openvino as ov

        src = src or ctx.source
        how = str(ctx.options.get("openvino_from", "onnx")).lower()
        try:
            if how == "onnx" or not src.is_keras:
                return ov.convert_model(str(src.export_onnx(ctx.workdir, int(ctx.options.get("opset",
                                                                                               DEFAULT_OPSET)))))
            if how == "saved_model":
                return ov.convert_model(str(self._saved_model(ctx)))
        except ConversionError:
            raise
        except Exception as exc:
            raise ConversionError(f"{src.path}: openvino.convert_model failed ({type(exc).__name__}: {exc})") from exc
        raise ConversionError(f"--openvino-from must be onnx or saved_model, got {how!r}")

    @staticmethod
    def _saved_model(ctx: BuildContext) -> Path:
        from edgebrain.tfenv import import_tf

        tf = import_tf()
        d = Path(ctx.workdir) / "saved_model"
        if not (d / "saved_model.pb").is_file():
            fn = ctx.source.tf_function()
            module = tf.Module()
            module.model = ctx.source.model
            module.serve = fn
            tf.saved_model.save(module, str(d), signatures={"serving_default": fn.get_concrete_function()})
        return d

    # ------------------------------------------------------------------ build

    def build(self, ctx: BuildContext, precision: str, out: Path) -> Built:
        import openvino as ov

        src, equalization = ctx.source, None
        if precision == "int8" and equalize_wanted(ctx, self._per_channel(ctx)[0]):
            src, equalization = equalized_source(ctx)
        model = self._ov_model(ctx, src)
        xml = out / MODEL_FILE
        warnings: list[str] = []
        quant: dict[str, Any] | None = None
        calib_block: dict[str, Any] | None = None
        runtime = {"inference_precision": "f32"}
        compress = False
        if precision == "fp32":
            pass
        elif precision == "bf16":
            runtime = {"inference_precision": "bf16"}
            quant = {"scheme": "bf16 compute", "weights": "f32 in the IR"}
        elif precision == "fp16":
            compute = str(ctx.options.get("openvino_fp16_compute", "f32")).lower()
            if compute not in ("f32", "f16"):
                raise ConversionError(f"--openvino-fp16-compute must be f32 or f16, got {compute!r}")
            compress = True
            runtime = {"inference_precision": compute}
            quant = {"scheme": "fp16-compressed weights", "compute": compute}
        elif precision == "int8":
            ir, why = self._int8_ir(ctx)
            model = self._int8_base(ctx, model, ir)
            model, quant, calib_block, warn = self._int8(ctx, model)
            quant.update({"ir": ir, "ir_reason": why})
            if equalization is not None:
                quant["equalization"] = equalization
            warnings += warn
        else:  # pragma: no cover - guarded by unsupported()
            raise ConversionError(f"openvino: unsupported precision {precision}")
        names = shorten_names(model) if ctx.options.get("strip_names", True) else None
        ov.save_model(model, str(xml), compress_to_fp16=compress)
        if precision == "int8" and quant is not None:  # measured in the saved IR, not assumed
            cb = constant_bytes(xml)
            quant["constant_bytes"] = cb
            quant["unquantised_constants"] = "f16" if cb.get("f16") else "f32"
        ops = openvino_ops(xml, runtime["inference_precision"])
        if precision == "int8" and ops["float_ops"]:
            warnings.append(f"{ops['float_ops']} op(s) run in float: {', '.join(ops['float_op_types'])}")
        return Built(model_file=MODEL_FILE, quantization=quant, calibration=calib_block, ops=ops,
                     runtime_options=runtime, warnings=warnings, files=[MODEL_FILE, WEIGHTS_FILE], names=names)

    @staticmethod
    def _int8_ir(ctx: BuildContext) -> tuple[str, str]:
        """Which IR NNCF quantises, and why: ``(fp16|fp32, reason)``."""
        o = ctx.options
        ir = str(o.get("openvino_int8_ir") or "auto").lower()
        if ir not in ("auto", "fp16", "fp32"):
            raise ConversionError(f"--openvino-int8-ir must be fp16 or fp32, got {ir!r}")
        if ir != "auto":
            return ir, "chosen"
        if o.get("max_drop") is not None:
            return "fp32", ("accuracy control: layers it reverts to float keep f32 weights, and the drop is "
                            "measured against the f32 model")
        if o.get("float_head") or ctx.float_scopes or ctx.float_stages:
            return "fp32", "layers kept float keep f32 weights"
        return "fp16", "default: the FP16-compressed IR, as openvino.save_model writes it"

    @staticmethod
    def _int8_base(ctx: BuildContext, model: Any, ir: str) -> Any:
        """The model NNCF quantises: for ``fp16`` the FP16-compressed IR that
        ``openvino.save_model`` writes by default, read back from a folder of its own (OpenVINO
        memory-maps the weights it reads, so the file must not be reused)."""
        import tempfile

        import openvino as ov

        if ir == "fp32":
            return model
        d = Path(tempfile.mkdtemp(prefix="openvino-fp16-ir-", dir=ctx.workdir))
        try:
            ov.save_model(model, str(d / MODEL_FILE), compress_to_fp16=True)
            return ov.Core().read_model(str(d / MODEL_FILE))
        except Exception as exc:
            raise ConversionError(f"{ctx.source.path}: FP16 compression of the IR failed "
                                  f"({type(exc).__name__}: {exc})") from exc

    def _int8(self, ctx: BuildContext, model: Any) -> tuple[Any, dict[str, Any], dict[str, Any], list[str]]:
        import logging

        import nncf
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            QuantizationParameters,
        )
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        nncf.set_log_level(logging.ERROR)
        o = ctx.options
        preset_name = str(o.get("nncf_preset", "performance")).lower()
        presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
        if preset_name not in presets:
            raise ConversionError(f"--nncf-preset must be performance or mixed, got {preset_name!r}")
        method, warn = resolve_method("nncf", ctx.calib_method)
        warnings = [warn] if warn else []
        cs = ctx.calib()
        beat = Heartbeat(f"openvino int8: NNCF statistics and bias correction ({len(cs)} calibration images; "
                         "images fed so far)", at_once=False)

        def feed(x: Any) -> Any:
            beat.tick()
            return x

        calib_ds = nncf.Dataset(cs.batches(1), feed)
        max_drop = o.get("max_drop")
        fbc = bool(o.get("nncf_fast_bias_correction", False))
        act_range = str(o.get("nncf_activation_range", "minmax")).lower()
        ranges = {"minmax": RangeEstimatorParametersSet.MINMAX, "mean_minmax": RangeEstimatorParametersSet.MEAN_MINMAX}
        if act_range not in ranges:
            raise ConversionError(f"--nncf-activation-range must be minmax or mean_minmax, got {act_range!r}")
        per_channel, scales_why = self._per_channel(ctx)
        advanced = AdvancedQuantizationParameters(activations_range_estimator_params=ranges[act_range])
        if not per_channel:  # NNCF's default for weights is per-channel
            advanced.weights_quantization_params = QuantizationParameters(per_channel=False)
        float_head = bool(o.get("float_head", False))
        ignored = None
        if float_head or ctx.float_scopes:
            import re

            ignored = nncf.IgnoredScope(types=["MatMul", "Softmax"] if float_head else [],
                                        patterns=[f".*{re.escape(sc)}.*" for sc in ctx.float_scopes],
                                        validate=False)
        quant: dict[str, Any] = {"scheme": "static", "tool": "nncf", "preset": preset_name,
                                 "subset_size": len(cs), "fast_bias_correction": fbc, "activation_range": act_range,
                                 "float_head": float_head,
                                 "float_stages": list(ctx.float_stages), "float_scopes": list(ctx.float_scopes),
                                 "weights": f"int8 {'per-channel' if per_channel else 'per-tensor'} (symmetric)",
                                 "per_channel": per_channel, "weight_scales": scales_why,
                                 "activations": "8-bit per-tensor, " + (
                                     "symmetric (unsigned where the input is non-negative)"
                                     if preset_name == "performance" else "asymmetric")}
        try:
            if max_drop is None:
                qm = nncf.quantize(model, calib_ds, preset=presets[preset_name], subset_size=len(cs),
                                   fast_bias_correction=fbc, ignored_scope=ignored, advanced_parameters=advanced)
                quant["method"] = "nncf.quantize"
            else:
                if ctx.validation is None:
                    raise ConversionError("--max-drop needs a validation split (a model card with a data root, "
                                          "or --data DIR)")
                metric = str(o.get("max_drop_metric", "accuracy")).lower()
                if metric not in ("accuracy", "agreement"):
                    raise ConversionError(f"--max-drop-metric must be accuracy or agreement, got {metric!r}")
                xv, yv = ctx.validation()
                if metric == "agreement":  # the float model's own predictions are the reference
                    yv = ctx.source.predict(xv, batch=inference_batch(ctx.source)).argmax(1)
                items = [(xv[i : i + 1], int(yv[i])) for i in range(len(xv))]
                val_ds = nncf.Dataset(items, lambda item: item[0])

                validate = _budgeted_validation(ctx.deadline, len(items))

                qm = nncf.quantize_with_accuracy_control(
                    model, calib_ds, val_ds, validate, max_drop=float(max_drop),
                    drop_type=nncf.DropType.ABSOLUTE, preset=presets[preset_name], subset_size=len(cs),
                    fast_bias_correction=fbc, ignored_scope=ignored, advanced_quantization_parameters=advanced)
                quant.update({"method": "nncf.quantize_with_accuracy_control", "max_drop": float(max_drop),
                              "drop_type": "absolute", "metric": metric,
                              "validation": {"split": "val", "n": len(items)}})
        except (ConversionError, BudgetExpired):
            raise
        except Exception as exc:
            raise ConversionError(f"{ctx.source.path}: NNCF quantisation failed ({type(exc).__name__}: {exc})") from exc
        return qm, quant, {**cs.manifest(method, "nncf"), "preset": preset_name}, warnings


def _budgeted_validation(deadline: Deadline | None, n: int) -> Callable[[Any, Any], tuple[float, list[float]]]:
    """NNCF accuracy control's validation function (top-1 hits per image) that reports progress
    (a line at most every 30 s: evaluations done, time spent) and, when ``deadline`` is spent,
    raises :class:`~edgebrain.progress.BudgetExpired` before the next evaluation: accuracy control
    then stops and the caller keeps the best build verified so far."""
    beat = Heartbeat(f"openvino int8 accuracy control ({n} validation images per full evaluation)")

    def validate(compiled: Any, data: Any) -> tuple[float, list[float]]:
        if deadline is not None:
            deadline.check("the next accuracy-control evaluation")
        out = compiled.output(0)
        per = [float(np.argmax(compiled(x)[out], axis=-1)[0] == y) for x, y in data]
        beat.tick()
        return float(np.mean(per)) if per else 0.0, per

    return validate


register(OpenVINOTarget())
