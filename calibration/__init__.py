"""Calibration sets for post-training quantisation.

A calibration set is a stratified, seeded sample of images, preprocessed exactly as the
model card says, that never shares content with the evaluation set (Testing). Its
manifest (image-list hash, per-class counts, size, seed, method, split) is recorded in
every int8 artifact, so a quantised model can be reproduced and audited.

TensorFlow-free: NumPy, Pillow and the edgebrain data helpers only.
"""

from __future__ import annotations

from .methods import METHODS, resolve_method
from .sampling import (
    CalibrationError,
    CalibrationSet,
    CalibrationSource,
    build_calibration,
    eval_hashes,
    folder_samples,
    stratified_sample,
)

__all__ = [
    "METHODS",
    "CalibrationError",
    "CalibrationSet",
    "CalibrationSource",
    "build_calibration",
    "eval_hashes",
    "folder_samples",
    "resolve_method",
    "stratified_sample",
]
