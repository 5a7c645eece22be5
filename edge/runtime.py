"""The TensorFlow-free edge runtime: load an artifact and run it.

Interpreters, in order of preference for ``.tflite``: ``ai-edge-litert`` (LiteRT), then
``tflite-runtime`` (fallback only: 2.14 crashes under NumPy 2). ``.onnx`` runs on
onnxruntime, OpenVINO IR (``.xml``) on openvino. Nothing here imports TensorFlow.

Every runner takes *preprocessed* float32 NHWC input (the manifest's spec applied)
and returns class probabilities; int8-I/O models are (de)quantised inside the runner.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from .artifact import Artifact
from .errors import EdgebrainError


class RuntimeUnavailable(EdgebrainError):
    pass


class Runner(Protocol):
    name: str  # e.g. "ai-edge-litert 2.3.0"
    device: str  # what it really runs on, e.g. "CPU"

    def run(self, x: np.ndarray) -> np.ndarray: ...


def bound_call(runner: Any, x: np.ndarray) -> Callable[[], Any]:
    """The runtime's inference call with ``x`` already bound to the model input, as the runtimes' own
    benchmark tools time it (OpenVINO ``benchmark_app``, LiteRT ``benchmark_model``): model-only latency.
    Input copy/quantisation and output post-processing belong to the end-to-end figure instead.
    Runners without ``bind`` fall back to ``run(x)``."""
    bind = getattr(runner, "bind", None)
    if bind is None:
        return lambda: runner.run(x)
    return bind(x)


def _softmax_if_logits(y: np.ndarray) -> np.ndarray:
    y = y.astype(np.float32)
    s = y.sum(axis=-1, keepdims=True)
    if np.all(y >= -1e-4) and np.allclose(s, 1.0, atol=2e-2):
        return y
    e = np.exp(y - y.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def tflite_interpreter_class() -> tuple[Any, str]:
    try:
        from importlib.metadata import version

        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, f"ai-edge-litert {version('ai-edge-litert')}"
    except ImportError:
        pass
    try:
        import numpy

        if int(numpy.__version__.split(".")[0]) >= 2:
            print("warning: using tflite-runtime under NumPy 2 (known to crash with 2.14); "
                  "install ai-edge-litert", file=sys.stderr)
        from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]

        return Interpreter, "tflite-runtime"
    except ImportError as exc:
        raise RuntimeUnavailable(
            "no TFLite interpreter: pip install ai-edge-litert (or tflite-runtime as a fallback)"
        ) from exc


class TFLiteRunner:
    device = "CPU"

    def __init__(self, model_file: Path, threads: int | None = None, delegate: str | None = None,
                 **_: Any) -> None:
        Interpreter, self.name = tflite_interpreter_class()
        delegates = None
        if delegate:  # an external delegate library, e.g. libedgetpu.so.1
            try:
                mod = sys.modules[Interpreter.__module__]
                delegates = [mod.load_delegate(delegate)]
            except (ValueError, OSError, AttributeError) as exc:
                raise RuntimeUnavailable(f"TFLite delegate {delegate!r} could not be loaded: {exc}") from exc
            self.device = f"delegate:{delegate}"
        self.interp = Interpreter(model_path=str(model_file), num_threads=threads or os.cpu_count(),
                                  experimental_delegates=delegates)
        self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]
        self._batch = int(self.inp["shape"][0])

    def _resize(self, n: int) -> None:
        if n != self._batch:
            shape = list(self.inp["shape"])
            shape[0] = n
            self.interp.resize_tensor_input(self.inp["index"], shape)
            self.interp.allocate_tensors()
            self.inp = self.interp.get_input_details()[0]
            self.out = self.interp.get_output_details()[0]
            self._batch = n

    def _set_input(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        self._resize(len(x))
        dt = self.inp["dtype"]
        if dt in (np.int8, np.uint8, np.int16):
            scale, zp = self.inp["quantization"]
            info = np.iinfo(dt)
            x = np.clip(np.rint(x / scale + zp), info.min, info.max).astype(dt)
        self.interp.set_tensor(self.inp["index"], x)

    def bind(self, x: np.ndarray) -> Callable[[], Any]:
        self._set_input(x)
        return self.interp.invoke

    def run_raw(self, x: np.ndarray) -> np.ndarray:
        """The model's output as computed (dequantised), without the softmax-if-logits step."""
        self._set_input(x)
        self.interp.invoke()
        y = self.interp.get_tensor(self.out["index"])
        if self.out["dtype"] in (np.int8, np.uint8, np.int16):
            scale, zp = self.out["quantization"]
            y = (y.astype(np.float32) - zp) * scale
        return np.asarray(y, np.float32)

    def run(self, x: np.ndarray) -> np.ndarray:
        return _softmax_if_logits(self.run_raw(x))


class ONNXRunner:
    device = "CPU"

    def __init__(self, model_file: Path, threads: int | None = None, providers: list[str] | None = None,
                 **_: Any) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeUnavailable("onnxruntime is not installed: pip install onnxruntime") from exc
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(str(model_file), so, providers=providers or ["CPUExecutionProvider"])
        self.input_name = self.sess.get_inputs()[0].name
        self.name = f"onnxruntime {ort.__version__}"
        self.device = ",".join(self.sess.get_providers())

    def bind(self, x: np.ndarray) -> Callable[[], Any]:
        # An IOBinding holds the input in ORT's memory, like ORT's perf test: no per-call feed copy.
        binding = self.sess.io_binding()
        binding.bind_cpu_input(self.input_name, np.ascontiguousarray(x, np.float32))
        binding.bind_output(self.sess.get_outputs()[0].name)
        sess = self.sess
        return lambda: sess.run_with_iobinding(binding)

    def run_raw(self, x: np.ndarray) -> np.ndarray:
        """The model's output as computed, without the softmax-if-logits step."""
        return np.asarray(self.sess.run(None, {self.input_name: np.asarray(x, np.float32)})[0], np.float32)

    def run(self, x: np.ndarray) -> np.ndarray:
        return _softmax_if_logits(self.run_raw(x))


class OpenVINORunner:
    def __init__(self, model_file: Path, threads: int | None = None, device: str = "CPU",
                 inference_precision: str = "f32", performance_hint: str = "LATENCY", **_: Any) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise RuntimeUnavailable("openvino is not installed: pip install openvino") from exc
        core = ov.Core()
        model = core.read_model(str(model_file))
        # Always explicit: on bf16-capable CPUs OpenVINO otherwise runs "fp32" models in bf16.
        cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": performance_hint}
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(model, device, cfg)
        self.request = self.compiled.create_infer_request()
        self.name = f"openvino {ov.__version__}"
        # Where it really runs (AUTO / MULTI pick a device): OpenVINO's own answer, else the request.
        try:
            self.device = ",".join(str(d) for d in self.compiled.get_property("EXECUTION_DEVICES")) or device
        except Exception:  # noqa: BLE001 - older plugins lack the property
            self.device = device
        try:
            self.inference_precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        except Exception:  # noqa: BLE001 - AUTO does not expose it
            self.inference_precision = None

    def bind(self, x: np.ndarray) -> Callable[[], Any]:
        import openvino as ov

        self._bound = np.ascontiguousarray(x, np.float32)  # kept alive while the request uses it
        self.request.set_input_tensor(ov.Tensor(self._bound, shared_memory=True))
        return self.request.infer

    def run_raw(self, x: np.ndarray) -> np.ndarray:
        """The model's output as computed (a copy), without the softmax-if-logits step."""
        x = np.ascontiguousarray(x, np.float32)
        # share_inputs: no copy of the input (infer is synchronous); the output is copied here.
        res = self.request.infer({0: x}, share_inputs=True)
        return np.array(next(iter(res.values())), np.float32)

    def run(self, x: np.ndarray) -> np.ndarray:
        return _softmax_if_logits(self.run_raw(x))


RUNNERS: dict[str, type] = {"tflite": TFLiteRunner, "onnx": ONNXRunner, "openvino": OpenVINORunner}

# Interpreters that can run each target, best first. OpenVINO reads ONNX files directly, so an
# ONNX artifact still runs on a device that has only openvino installed.
FALLBACKS: dict[str, tuple[str, ...]] = {"tflite": ("tflite",), "onnx": ("onnx", "openvino"),
                                         "openvino": ("openvino",)}


def _registered_target(name: str) -> Any:
    """The converters registry's target ``name`` when it defines its own ``load`` (None on a device
    that ships only the edge runtime, or for a target without one)."""
    try:
        from edgebrain.converters import TARGETS
        from edgebrain.converters.base import Target
    except ImportError:
        return None
    t = TARGETS.get(name)
    return t if t is not None and type(t).load is not Target.load else None


def load_runner(art: Artifact, threads: int | None = None, use_registry: bool = True, **options: Any) -> Runner:
    """A runner for an artifact, using the manifest's runtime options unless overridden.

    The first interpreter installed for the artifact's target is used (``FALLBACKS``); the
    runner's ``name`` says which one ran.
    """
    if art.target not in RUNNERS:
        # A target added as one module in converters/ brings its own runner (Target.load).
        # (Its load reads the manifest's runtime options itself; per-call options do not apply.)
        target = _registered_target(art.target) if use_registry else None
        if target is not None:
            return target.load(art, threads=threads)  # type: ignore[no-any-return]
        raise RuntimeUnavailable(f"no edge runner for target {art.target!r} (have: {', '.join(RUNNERS)})")
    opts = dict(art.manifest.get("runtime_options") or {})
    opts.update({k: v for k, v in options.items() if v is not None})
    missing: list[str] = []
    for kind in FALLBACKS.get(art.target, (art.target,)):
        try:
            return RUNNERS[kind](art.model_file, threads=threads, **opts)  # type: ignore[no-any-return]
        except RuntimeUnavailable as exc:
            missing.append(str(exc))
    raise RuntimeUnavailable(f"cannot run {art.model_file.name} ({art.target}): " + "; ".join(missing))
