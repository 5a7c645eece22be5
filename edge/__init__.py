"""edgebrain: brain-MRI tumour classifiers from the lab to clinic hardware.

Importing ``edgebrain`` never imports TensorFlow. Modules that need it
(``edgebrain.models``, ``edgebrain.train``, ``edgebrain.converters``) call
:func:`edgebrain.tfenv.import_tf`, which sets ``TF_USE_LEGACY_KERAS=1`` first so
that tensorflow-model-optimization gets the tf-keras it needs.
"""

from __future__ import annotations

import os

# Must be set before TensorFlow is imported anywhere in the process.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

CLASS_NAMES_DEFAULT = ("glioma", "meningioma", "notumor", "pituitary")

__all__ = ["__version__", "CLASS_NAMES_DEFAULT"]
