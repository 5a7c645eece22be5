"""A real training run on a small real-data subset learns."""

from __future__ import annotations

import json
from pathlib import Path

from edgebrain.modelcard import ModelCard
from edgebrain.models.variants import load_keras_model


def test_real_training_learns(trained_small: Path) -> None:
    metrics = json.loads((trained_small / "metrics.json").read_text())
    t = metrics["testing"]
    assert t["n"] == 200  # 50 per class, held out (Testing)
    # chance is 25 %: a model that learned nothing cannot pass this
    assert t["accuracy"] >= 0.60, t["accuracy"]
    assert t["macro_f1"] >= 0.55
    assert set(t["per_class"]) == {"glioma", "meningioma", "notumor", "pituitary"}
    cm = t["confusion_matrix"]
    assert sum(map(sum, cm)) == 200
    assert metrics["testing_dedup"]["n"] < 200


def test_model_card_and_files(trained_small: Path, data_dir: Path) -> None:
    for name in ("model.keras", "model_card.json", "history.json", "metrics.json"):
        assert (trained_small / name).is_file()
    card = ModelCard.find(trained_small / "model.keras")
    assert card is not None
    assert card.variant == "resnet50-lite"
    assert card.preprocess.name == "rescale" and card.preprocess.size == (64, 64)
    assert card.input_shape == [64, 64, 3]
    assert card.data["split_seed"] == 7 and len(card.data["manifest_hash"]) == 64
    assert card.metrics["testing_accuracy"] >= 0.60
    assert "tensorflow" in card.versions["packages"]
    m = load_keras_model(trained_small / "model.keras")
    assert m.output_shape == (None, 4)
    hist = json.loads((trained_small / "history.json").read_text())
    assert hist["loss"][-1] < hist["loss"][0]
