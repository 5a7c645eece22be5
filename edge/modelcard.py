"""The model card written next to every trained model, and read by every later command."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError
from .io import atomic_write_json, read_json
from .preprocess import PreprocessSpec

CARD_NAME = "model_card.json"
CARD_VERSION = 1


@dataclass
class ModelCard:
    variant: str
    class_names: list[str]
    preprocess: PreprocessSpec
    input_shape: list[int]  # (H, W, C) of the model input
    data: dict[str, Any] = field(default_factory=dict)  # root, manifest_hash, split seed, fractions, counts
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "card_version": CARD_VERSION,
            "variant": self.variant,
            "class_names": list(self.class_names),
            "input_shape": list(self.input_shape),
            "preprocess": self.preprocess.to_dict(),
            "data": self.data,
            "training": self.training,
            "metrics": self.metrics,
            "versions": self.versions,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        return cls(
            variant=d.get("variant", "unknown"),
            class_names=list(d["class_names"]),
            preprocess=PreprocessSpec.from_dict(d["preprocess"]),
            input_shape=list(d.get("input_shape", [])),
            data=d.get("data", {}),
            training=d.get("training", {}),
            metrics=d.get("metrics", {}),
            versions=d.get("versions", {}),
            extra=d.get("extra", {}),
        )

    def save(self, folder: str | Path) -> Path:
        p = Path(folder) / CARD_NAME
        atomic_write_json(p, self.to_dict())
        return p

    @classmethod
    def find(cls, model_path: str | Path) -> ModelCard | None:
        """The card beside a model file (or inside a model folder), if any."""
        p = Path(model_path)
        for cand in ([p / CARD_NAME] if p.is_dir() else []) + [p.parent / CARD_NAME]:
            if cand.is_file():
                try:
                    return cls.from_dict(read_json(cand))
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    what = f"missing {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
                    raise ModelError(f"{cand}: not a valid model card ({what}); fix it, or remove it and give "
                                     "--preprocess and --classes instead") from exc
        return None
