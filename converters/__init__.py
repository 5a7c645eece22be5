"""Conversion targets for ``edgebrain convert``.

Each target (``tflite_target``, ``onnx_target``, ``openvino_target``) implements
:class:`edgebrain.converters.base.Target` and registers itself in
:mod:`edgebrain.converters.registry` (``get_target(name)``, ``TARGETS``). Toolkits
(TensorFlow, tf2onnx, onnxruntime, OpenVINO, NNCF) are imported inside the functions that
use them, so importing this package stays fast.
"""

from __future__ import annotations

from .base import CALIBRATED, PRECISIONS, BuildContext, Built, ConversionError, Target
from .registry import TARGETS, get_target, register, target_names

__all__ = [
    "CALIBRATED",
    "PRECISIONS",
    "TARGETS",
    "BuildContext",
    "Built",
    "ConversionError",
    "Target",
    "get_target",
    "register",
    "target_names",
]
