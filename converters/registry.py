"""The registry of conversion targets.

Every ``*_target.py`` module in this package is imported on first use and registers its
:class:`~edgebrain.converters.base.Target`. Those modules import their toolkits
(TensorFlow, onnxruntime, OpenVINO) lazily, so this stays fast to import.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from .base import ConversionError, Target

TARGETS: dict[str, Target] = {}
_loaded = False


def register(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


def _discover() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    pkg_dir = Path(__file__).parent
    for info in sorted(pkgutil.iter_modules([str(pkg_dir)]), key=lambda i: i.name):
        if info.name.endswith("_target"):
            importlib.import_module(f"{__package__}.{info.name}")


def get_target(name: str) -> Target:
    _discover()
    key = name.strip().lower()
    if key not in TARGETS:
        raise ConversionError(f"unknown target {name!r}; available: {', '.join(sorted(TARGETS))}")
    return TARGETS[key]


def target_names() -> list[str]:
    _discover()
    return sorted(TARGETS)


_discover()
