"""The one place TensorFlow and tf-keras are imported."""

from __future__ import annotations

import os
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
