"""The CLI filters TensorFlow's native start-up noise from stderr and keeps every other line."""

from __future__ import annotations

import subprocess
import sys

import pytest

NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796526752.039490    3535 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
    "GPU will not be used.",
    "E0000 00:00:1796526765.638649    3535 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error",
    "I0000 00:00:1796526752.039116    3535 port.cc:153] oneDNN custom operations are on.",
    "fully_quantize: 0, inference_type: 6, input_inference_type: FLOAT32, output_inference_type: FLOAT32",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
]
KEEP = ["E0000 00:00:1796526765.638649    3535 some_kernel.cc:52] a real error", "Traceback: keep me"]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_native_noise_is_dropped_and_other_lines_kept() -> None:
    payload = "".join(line + "\n" for line in NOISE + KEEP).encode()
    code = ("import os; from edgebrain.tfenv import quiet_native_logs; quiet_native_logs(); "
            f"os.write(2, {payload!r}); import sys; sys.exit(3)")
    r = _run(code)
    assert r.returncode == 3
    assert r.stderr.splitlines() == KEEP


@pytest.mark.slow
def test_real_tensorflow_import_is_quiet() -> None:
    r = _run("from edgebrain.tfenv import quiet_native_logs, import_tf; quiet_native_logs(); "
             "tf = import_tf(); tf.constant(1.0).numpy(); print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok"
    assert "cuda" not in r.stderr.lower() and "absl::InitializeLog" not in r.stderr, r.stderr


def test_everything_is_kept_when_asked() -> None:
    code = ("import os; os.environ['EDGEBRAIN_NATIVE_LOGS'] = '1'; from edgebrain.tfenv import quiet_native_logs; "
            f"quiet_native_logs(); os.write(2, {(NOISE[0] + chr(10)).encode()!r})")
    assert _run(code).stderr.splitlines() == [NOISE[0]]


def test_tensorflow_warnings_about_its_own_internals_are_dropped() -> None:
    code = ("import warnings; from edgebrain.tfenv import quiet_native_logs; quiet_native_logs(); "
            "warnings.warn('    Warning: tf.lite.Interpreter is deprecated and is scheduled', UserWarning); "
            "warnings.warn('a warning of our own', UserWarning)")
    err = _run(code).stderr
    assert "tf.lite.Interpreter" not in err and "a warning of our own" in err
