from __future__ import annotations

import numpy as np
import pytest

from edgebrain.preprocess import PreprocessSpec, default_for_variant


def test_named_specs_match_keras_definitions() -> None:
    x = np.array([[[0, 127.5, 255]]], np.float32)
    assert np.allclose(PreprocessSpec.named("rescale", 1).apply(x), x / 255.0)
    assert np.allclose(PreprocessSpec.named("xception", 1).apply(x), x / 127.5 - 1.0)
    from edgebrain.tfenv import keras

    K = keras()
    rgb = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3)).astype(np.float32)
    ours = PreprocessSpec.named("caffe", 5).apply(rgb)
    theirs = K.applications.resnet50.preprocess_input(rgb.copy())
    assert np.allclose(ours, theirs, atol=1e-4)
    ours = PreprocessSpec.named("xception", 5).apply(rgb)
    assert np.allclose(ours, K.applications.xception.preprocess_input(rgb.copy()), atol=1e-5)


def test_custom_meanstd_and_round_trip() -> None:
    s = PreprocessSpec.named("meanstd:10,20,30/2,4,8", (8, 6))
    assert s.size == (8, 6)
    x = np.full((1, 1, 3), 50.0, np.float32)
    assert np.allclose(s.apply(x), [(50 - 10) / 2, (50 - 20) / 4, (50 - 30) / 8])
    assert PreprocessSpec.from_dict(s.to_dict()) == s
    assert np.allclose(s.invert(s.apply(x)), x)


@pytest.mark.parametrize("bad", ["nope", "meanstd:1,2/3,4,5", "meanstd:1,2,3/0,1,1"])
def test_unknown_specs_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        PreprocessSpec.named(bad)


def test_variant_defaults() -> None:
    assert default_for_variant("resnet50-lite") == "rescale"
    assert default_for_variant("resnet50-ft") == "caffe"
    assert default_for_variant("xception-ft") == "xception"
