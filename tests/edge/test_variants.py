"""Every seed variant builds with the head of its figure."""

from __future__ import annotations

import time

import pytest

from edgebrain.errors import ModelError, WeightsUnavailableError
from edgebrain.models import VARIANTS, build_model
from edgebrain.models.variants import count_params


def _layer(m, name):  # type: ignore[no-untyped-def]
    return m.get_layer(name)


def _head(m) -> list[tuple[str, object]]:  # type: ignore[no-untyped-def]
    out = []
    for layer in m.layers:
        if layer.name.startswith("head_") or layer.name == "predictions":
            units = getattr(layer, "units", None)
            out.append((type(layer).__name__, units))
    return out


EXPECTED_HEADS = {
    "resnet50": [("GlobalAveragePooling2D", None), ("Flatten", None), ("Dropout", None), ("Dense", 128),
                 ("Dropout", None), ("Dense", 4)],
    "resnet50-lite": [("GlobalAveragePooling2D", None), ("Dense", 64), ("Dropout", None), ("Dense", 4)],
    "resnet50-ft": [("Flatten", None), ("Dense", 128), ("BatchNormalization", None), ("Dropout", None),
                    ("Dense", 4)],
    "xception": [("Flatten", None), ("Dropout", None), ("Dense", 128), ("Dropout", None), ("Dense", 4)],
    "xception-lite": [("Flatten", None), ("Dropout", None), ("Dense", 128), ("Dropout", None), ("Dense", 4)],
    "xception-ft": [("Flatten", None), ("Dropout", None), ("Dense", 128), ("BatchNormalization", None),
                    ("Dropout", None), ("Dense", 4)],
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(EXPECTED_HEADS))
def test_small_variants_build_with_their_heads(variant: str) -> None:
    m = build_model(variant, 64, width=0.25)
    assert m.input_shape == (None, 64, 64, 3)
    assert m.output_shape == (None, 4)
    head = _head(m)
    if variant == "resnet50":  # width < 1: custom backbone has no pooling layer inside
        assert head[-5:] == EXPECTED_HEADS[variant][1:]
    else:
        assert head == EXPECTED_HEADS[variant], head
    assert _layer(m, "predictions").activation.__name__ == "softmax"


@pytest.mark.slow
def test_ft_variants_have_l2() -> None:
    m = build_model("resnet50-ft", 64, width=0.25)
    assert _layer(m, "predictions").kernel_regularizer is not None
    assert _layer(m, "head_dense").kernel_regularizer is not None


@pytest.mark.slow
def test_full_size_parameter_counts_match_the_paper() -> None:
    # Figure 4: total 23,850,500; figure 7: total 23,039,124.
    assert count_params(build_model("resnet50", 224))["total"] == 23_850_500
    assert count_params(build_model("xception", 299))["total"] == 23_039_124


@pytest.mark.slow
def test_sr_resnet50_takes_half_size_input() -> None:
    m = build_model("sr-resnet50", 64, width=0.25)
    assert m.input_shape == (None, 32, 32, 3)
    assert m.output_shape == (None, 4)
    assert any("sr" == layer.name for layer in m.layers)


def test_unknown_variant_and_bad_sizes() -> None:
    with pytest.raises(ModelError, match="unknown variant"):
        build_model("vgg16")
    with pytest.raises(ModelError, match="input size"):
        build_model("xception", 64)
    with pytest.raises(ModelError, match="no ImageNet weights"):
        build_model("resnet50-lite", 64, weights="imagenet")
    with pytest.raises(ModelError, match="neither"):
        build_model("resnet50", 64, width=0.25, weights="/no/such/file.h5")


def test_imagenet_offline_fails_fast_with_a_clear_message(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # empty Keras cache
    t0 = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="Keras cache"):
        build_model("resnet50-ft", 64, weights="imagenet")
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_weights_path_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    m = build_model("resnet50-lite", 32, width=0.25)
    w = tmp_path / "w.weights.h5"
    m.save_weights(w)
    m2 = build_model("resnet50-lite", 32, width=0.25, weights=str(w))
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype("float32")
    assert np.allclose(m(x, training=False), m2(x, training=False), atol=1e-6)


def test_registry_lists_all_seed_variants() -> None:
    assert set(VARIANTS) == {"resnet50", "resnet50-lite", "resnet50-ft", "xception", "xception-lite",
                             "xception-ft", "sr-resnet50"}
