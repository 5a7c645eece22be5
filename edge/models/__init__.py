"""Model variants from the seed papers (TensorFlow / tf-keras)."""

from .variants import VARIANTS, VariantInfo, build_model, load_keras_model

__all__ = ["VARIANTS", "VariantInfo", "build_model", "load_keras_model"]
