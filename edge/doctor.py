"""Machine facts that decide which artifact is fast here (``edgebrain doctor``)."""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from .io import package_versions

ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "asimdhp", "sve", "i8mm", "bf16")
INTERPRETERS = {
    "ai-edge-litert": "ai_edge_litert.interpreter",
    "tflite-runtime": "tflite_runtime.interpreter",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "tensorflow": "tensorflow",
}


def cpu_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            key, _, val = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and val.strip():
                model = val.strip()
            if key in ("flags", "features"):
                flags.update(val.split())
    except OSError:
        pass
    present = {f: (f in flags) for f in ISA_FLAGS}
    return {"model": model, "arch": platform.machine(), "logical_cores": os.cpu_count(),
            "isa": present, "int8_dot_product": present.get("avx512_vnni") or present.get("avx_vnni")
            or present.get("amx_int8") or present.get("asimddp"),
            "bf16": present.get("avx512_bf16") or present.get("amx_bf16") or present.get("bf16")}


def memory_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def gpu_info() -> dict[str, Any]:
    """GPU presence without importing TensorFlow (nvidia-smi / device nodes)."""
    info: dict[str, Any] = {"present": False, "devices": []}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            names = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
            info["devices"] = names
            info["present"] = bool(names)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


def interpreters() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, mod in INTERPRETERS.items():
        if name == "tensorflow":
            continue  # importing TF is slow; its version is in the package list
        try:
            importlib.import_module(mod)
            out[name] = "ok"
        except Exception as exc:  # a broken install is a finding, not a crash
            out[name] = f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return out


def fingerprint() -> dict[str, Any]:
    """What every bench result records about the machine it ran on."""
    cpu = cpu_info()
    return {
        "hostname": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu["model"],
        "arch": cpu["arch"],
        "cores": cpu["logical_cores"],
        "isa": sorted(k for k, v in cpu["isa"].items() if v),
        "memory_mb": memory_mb(),
        "packages": {k: v for k, v in package_versions().items() if v},
    }


def report() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_info(),
        "memory_mb": memory_mb(),
        "gpu": gpu_info(),
        "packages": package_versions(),
        "interpreters": interpreters(),
        "env": {k: os.environ.get(k) for k in ("TF_USE_LEGACY_KERAS", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")},
    }
