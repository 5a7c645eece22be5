"""The one place TensorFlow and tf-keras are imported."""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
from typing import Any

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def import_tf() -> Any:
    import tensorflow as tf

    return tf


def keras() -> Any:
    """tf-keras (Keras 2), which tensorflow-model-optimization requires."""
    import tf_keras

    return tf_keras


def set_seed(seed: int) -> None:
    tf = import_tf()
    keras().utils.set_random_seed(seed)
    try:
        tf.config.experimental.enable_op_determinism()
    except Exception:  # pragma: no cover - older TF
        pass


# Lines TensorFlow's native code writes to stderr on a CPU-only machine before (and despite)
# TF_CPP_MIN_LOG_LEVEL: the CUDA probe, oneDNN notice, absl preamble, tf.data attribute notes.
NATIVE_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IWE]\d{4} [\d:.]+\s+\d+ (port\.cc|cudart_stub\.cc|cuda_platform\.cc|cuda_executor\.cc|cuda_dnn\.cc"
    r"|cuda_fft\.cc|cuda_blas\.cc|node_def_util\.cc|cpu_feature_guard\.cc|gpu_device\.cc):\d+\].*"
    r"|To enable the following instructions: .* in other operations, rebuild TensorFlow.*"
    r"|This TensorFlow binary is optimized to use available CPU instructions.*"
    r"|fully_quantize: \d+, inference_type: \d+, input_inference_type: \w+, output_inference_type: \w+"
    r"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.)$"
)
# Python warnings TensorFlow raises about its own internals (its converter calibrates with the
# deprecated tf.lite.Interpreter; edgebrain runs artifacts with ai-edge-litert).
LIBRARY_NOISE = [r"(?s)\s*Warning: tf\.lite\.Interpreter is deprecated",
                 r"Statistics for quantized inputs were expected, but not specified"]
_quiet: dict[str, Any] = {}


def quiet_native_logs() -> None:
    """Route file descriptor 2 through a filter that drops TensorFlow's native start-up noise
    (``NATIVE_NOISE``) and passes every other line unchanged. Idempotent; undone at exit after the
    last line is flushed. ``EDGEBRAIN_NATIVE_LOGS=1`` keeps everything."""
    if _quiet or os.environ.get("EDGEBRAIN_NATIVE_LOGS") == "1":
        return
    import warnings

    for pattern in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    try:
        saved = os.dup(2)
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
    except OSError:
        return

    def pump() -> None:
        with os.fdopen(r, "rb", buffering=0) as src:
            buf = b""
            while chunk := src.read(65536):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not NATIVE_NOISE.match(line.decode("utf-8", "replace").rstrip("\r")):
                        os.write(saved, line + b"\n")
            if buf:
                os.write(saved, buf)

    t = threading.Thread(target=pump, name="edgebrain-stderr-filter", daemon=True)
    t.start()
    _quiet.update(saved=saved, thread=t)
    atexit.register(_restore_stderr)


def _restore_stderr() -> None:
    saved, t = _quiet.get("saved"), _quiet.get("thread")
    if saved is None:
        return
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os.dup2(saved, 2)  # closes the pipe's last write end: the pump sees EOF
    t.join(timeout=5)
    _quiet.clear()
