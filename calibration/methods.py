"""Which calibration methods each quantisation backend offers, and how they are named there.

=========  ==========================================  ================================
backend    methods (``--calib-method``)                 what the backend calls them
=========  ==========================================  ================================
tflite     minmax                                       TFLiteConverter representative
                                                        dataset (running min/max)
ort        minmax, entropy, percentile, distribution    onnxruntime.quantization
                                                        CalibrationMethod.*
nncf       minmax (presets: performance, mixed)         nncf.quantize statistics + bias
                                                        correction
=========  ==========================================  ================================

A method a backend does not offer is not silently swapped: :func:`resolve_method`
returns the backend's method plus a warning that the manifest records.
"""

from __future__ import annotations

METHODS: dict[str, dict[str, str]] = {
    "tflite": {"minmax": "min/max (TFLiteConverter representative_dataset)"},
    "ort": {
        "minmax": "MinMax",
        "entropy": "Entropy",
        "percentile": "Percentile",
        "distribution": "Distribution",
    },
    "nncf": {"minmax": "min/max statistics + bias correction (nncf.quantize; see --nncf-activation-range)"},
}

DEFAULT_METHOD = "minmax"
ALL_METHODS = sorted({m for ms in METHODS.values() for m in ms})


def resolve_method(backend: str, requested: str | None) -> tuple[str, str | None]:
    """-> (method used, warning or None). ``requested`` None means the default (minmax)."""
    if backend not in METHODS:
        raise ValueError(f"unknown calibration backend {backend!r}")
    want = (requested or DEFAULT_METHOD).lower()
    if want not in ALL_METHODS:
        raise ValueError(f"unknown calibration method {requested!r}; choose from {', '.join(ALL_METHODS)}")
    if want in METHODS[backend]:
        return want, None
    return DEFAULT_METHOD, (
        f"calibration method {want!r} is not offered by {backend} "
        f"(it offers {', '.join(METHODS[backend])}); used {DEFAULT_METHOD!r}"
    )
