"""Structured (channel) pruning: graph surgery is exact, nested backbones work, and convert
--prune-channels builds smaller, faster artifacts from a really trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def _x(size: int, n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


@pytest.mark.slow
def test_chains_in_a_resnet50_and_ratio_zero_is_identity() -> None:
    from edgebrain.converters.channel_pruning import find_chains, shrink
    from edgebrain.models import build_model

    m = build_model("resnet50", 32, width=0.25, weights="none")
    chains = find_chains(m)
    # the first two convolutions of each of the 16 bottlenecks; never one whose output is read twice
    assert len(chains) == 32
    assert {c["a"].rsplit("_", 2)[-2] for c in chains} == {"1", "2"}
    assert not any(c["a"].endswith(("_3_conv", "_0_conv")) or c["a"] == "conv1_conv" for c in chains)
    same, _ = shrink(m, 0.0)
    x = _x(32)
    np.testing.assert_array_equal(same(x).numpy(), m(x).numpy())


@pytest.mark.slow
def test_shrink_removes_exactly_the_dead_channels() -> None:
    """Channels whose batch-norm scale and shift are 0 contribute nothing: removing them (they rank
    last) must leave the outputs unchanged, which checks every slice (A's filters and bias, the
    batch-norm vectors, B's input channels)."""
    from edgebrain.converters.channel_pruning import find_chains, macs, shrink
    from edgebrain.models import build_model
    from edgebrain.tfenv import keras

    K = keras()
    m = build_model("resnet50", 32, width=0.25, weights="none")
    layers = {layer.name: layer for layer in m.layers}
    rng = np.random.default_rng(1)
    dead = {}
    for ch in find_chains(m):
        bn = layers[ch["between"][0]]
        assert isinstance(bn, K.layers.BatchNormalization)
        n = ch["channels"]
        idx = rng.choice(n, n // 4, replace=False)
        g, b, mean, var = bn.get_weights()
        g = rng.uniform(0.5, 1.5, n).astype(np.float32)
        b = rng.uniform(-0.5, 0.5, n).astype(np.float32)
        g[idx] = 0.0
        b[idx] = 0.0
        bn.set_weights([g, b, mean, var])
        dead[ch["a"]] = set(idx.tolist())
    small, info = shrink(m, 0.25, multiple=4)
    x = _x(32)
    np.testing.assert_allclose(small(x).numpy(), m(x).numpy(), atol=2e-5)
    s_layers = {layer.name: layer for layer in small.layers}
    for ch in info["chains"]:
        assert ch["kept"] == ch["channels"] - ch["channels"] // 4
        assert s_layers[ch["a"]].filters == ch["kept"]
        assert s_layers[ch["b"]].kernel.shape[2] == ch["kept"]
    assert macs(small) < 0.8 * macs(m)


@pytest.mark.slow
def test_nested_keras_applications_backbone() -> None:
    """Keras applications ResNet50 nested in a Functional model (the paper's layout)."""
    from edgebrain.converters.channel_pruning import find_chains, macs, shrink
    from edgebrain.models import build_model

    m = build_model("resnet50", 32, width=1.0, weights="none")
    chains = find_chains(m)
    assert len(chains) == 32 and all(c["a"].startswith("resnet50/") for c in chains), chains[:2]
    small, info = shrink(m, 0.25)
    kept = sorted({(c["channels"], c["kept"]) for c in info["chains"]})
    assert kept == [(64, 48), (128, 96), (256, 192), (512, 384)]
    assert small(_x(32, 2)).shape == (2, 4)
    assert 0.55 < macs(small) / macs(m) < 0.75


@pytest.mark.slow
def test_separable_chains_in_xception() -> None:
    """Keras applications Xception nested in a Functional model: the separable convolutions whose
    output is read only by the next one (never the third of a middle-flow block: it feeds the
    residual addition)."""
    from edgebrain.converters.channel_pruning import find_chains, macs, shrink
    from edgebrain.converters.pruning import _walk
    from edgebrain.models import build_model

    m = build_model("xception", 71, weights="none")
    chains = find_chains(m)
    names = {c["a"].split("/")[-1] for c in chains}
    middle = {f"block{b}_sepconv{i}" for b in range(5, 13) for i in (1, 2)}
    entry_exit = {f"block{b}_sepconv1" for b in (2, 3, 4, 13, 14)}
    assert names == middle | entry_exit | {"block1_conv1"}, sorted(names)
    assert all(c["a"].startswith("xception/") for c in chains)
    small, info = shrink(m, 0.25)
    kept = sorted({(c["channels"], c["kept"]) for c in info["chains"]})
    assert kept == [(32, 24), (128, 96), (256, 192), (728, 544), (1536, 1152)], kept
    sl = dict(_walk(small))
    b5 = sl["xception/block5_sepconv2"]  # both a chain's B (input 544) and the next chain's A (output 544)
    assert b5.depthwise_kernel.shape[2] == 544 and b5.pointwise_kernel.shape[2:] == (544, 544)
    assert small(_x(71, 2)).shape == (2, 4)
    assert 0.65 < macs(small) / macs(m) < 0.8


def test_separable_shrink_removes_exactly_the_dead_channels() -> None:
    """As for Conv2D: dead channels (batch-norm scale and shift 0) removed from separable chains,
    including a depth multiplier of 2 (pointwise rows c*2 and c*2+1 go with input channel c),
    leave the logits unchanged."""
    from edgebrain.converters.channel_pruning import find_chains, shrink
    from edgebrain.tfenv import keras

    K = keras()
    L = K.layers
    inp = K.Input((12, 12, 3))
    x = L.ReLU(name="r0")(L.BatchNormalization(name="bn0")(L.Conv2D(16, 3, padding="same", name="c0")(inp)))
    x = L.SeparableConv2D(32, 3, padding="same", depth_multiplier=2, name="s1")(x)
    x = L.Activation("relu", name="r1")(L.BatchNormalization(name="bn1")(x))
    x = L.SeparableConv2D(24, 3, padding="same", use_bias=False, name="s2")(x)
    x = L.ReLU(name="r2")(L.BatchNormalization(name="bn2")(x))
    x = L.Conv2D(8, 1, name="c3")(x)
    m = K.Model(inp, L.Dense(4, name="logits")(L.GlobalAveragePooling2D()(x)))
    chains = find_chains(m)
    assert [(c["a"], c["b"]) for c in chains] == [("c0", "s1"), ("s1", "s2"), ("s2", "c3")]
    rng = np.random.default_rng(2)
    for layer in m.layers:  # O(1) activations so a wrong slice shows
        if layer.weights and not isinstance(layer, L.BatchNormalization):
            layer.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in layer.get_weights()])
    for ch in chains:
        bn = m.get_layer(ch["between"][0])
        n = ch["channels"]
        g = rng.uniform(0.5, 1.5, n).astype(np.float32)
        b = rng.uniform(-0.5, 0.5, n).astype(np.float32)
        dead = rng.choice(n, n // 4, replace=False)
        g[dead] = 0.0
        b[dead] = 0.0
        bn.set_weights([g, b, rng.normal(0, 0.1, n).astype(np.float32), rng.uniform(0.5, 2, n).astype(np.float32)])
    small, info = shrink(m, 0.25, multiple=2)
    x = _x(12, 3)
    ref = m(x).numpy()
    assert ref.std() > 0.1
    np.testing.assert_allclose(small(x).numpy(), ref, rtol=1e-4, atol=1e-4)
    assert small.get_layer("s1").pointwise_kernel.shape[2:] == (24, 24)  # 12 kept inputs x multiplier 2
    assert small.get_layer("s2").depthwise_kernel.shape[2] == 24 and small.get_layer("c3").kernel.shape[2] == 18
    # removing live channels changes the output: the check above can fail
    worse, _ = shrink(m, 0.5, multiple=2)
    assert np.abs(worse(x).numpy() - ref).max() > 1e-2


@pytest.mark.slow
def test_refusals() -> None:
    from edgebrain.converters.channel_pruning import shrink
    from edgebrain.errors import ModelError
    from edgebrain.models import build_model

    m = build_model("resnet50", 32, width=0.25, weights="none")
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ModelError, match="fraction"):
            shrink(m, bad)
    from edgebrain.converters.channel_pruning import ChannelPruneConfig, prune_channels
    from edgebrain.preprocess import PreprocessSpec

    empty = (np.zeros((0, 32, 32, 3), np.uint8), np.zeros((0,), np.int64))
    with pytest.raises(ModelError, match="--channel-epochs"):
        prune_channels(m, ChannelPruneConfig(ratio=0.25, epochs=-1), PreprocessSpec.named("rescale", 32), 4,
                       empty, empty)
    with pytest.raises(ModelError, match="training images"):
        prune_channels(m, ChannelPruneConfig(ratio=0.25, epochs=1), PreprocessSpec.named("rescale", 32), 4,
                       empty, empty)
    # resnet50-lite: every pointwise output goes into a residual addition: nothing to prune safely
    with pytest.raises(ModelError, match="no prunable convolution chain"):
        shrink(build_model("resnet50-lite", 32, width=0.25), 0.25)


def test_a_convolution_read_elsewhere_is_not_pruned() -> None:
    """Chains stop where an output is read by anything else: a second consumer or a model output."""
    from edgebrain.converters.channel_pruning import find_chains
    from edgebrain.tfenv import keras

    K = keras()
    L = K.layers
    inp = K.Input((16, 16, 3))
    a = L.Conv2D(16, 3, padding="same", name="a")(inp)
    r = L.Activation("relu", name="a_relu")(L.BatchNormalization(name="a_bn")(a))
    b = L.Conv2D(16, 3, padding="same", name="b")(r)
    c = L.Conv2D(16, 1, name="c")(L.ReLU(name="b_relu")(b))
    d = L.Conv2D(16, 1, name="d")(c)
    head = L.Dense(4, name="head")(L.GlobalAveragePooling2D()(L.Add()([c, d])))
    assert [x["a"] for x in find_chains(K.Model(inp, head))] == ["a", "b"]  # c is read by d and by the Add
    # the same graph with a_relu also a model output: a's channels are read outside the chain
    assert [x["a"] for x in find_chains(K.Model(inp, [head, r]))] == ["b"]
    # a softmax over channels mixes them: no chain through it
    sm = L.Activation("softmax", name="sm")(L.Conv2D(8, 1, name="e")(inp))
    f = L.Conv2D(8, 1, name="f")(sm)
    assert find_chains(K.Model(inp, L.GlobalAveragePooling2D()(f))) == []


@pytest.fixture(scope="module")
def trained_resnet50(data_dir: Path, cache_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A really trained full-depth ResNet50 (width 0.25, 48 px, a stratified subset)."""
    from edgebrain.train import TrainConfig, train

    out = tmp_path_factory.mktemp("r50") / "r50"
    train(TrainConfig(variant="resnet50", data_dir=str(data_dir), out=str(out), input_size=48, width=0.25,
                      epochs=10, batch_size=32, lr=2e-3, per_class=120, eval_per_class=40, seed=3, patience=10))
    return out


@pytest.mark.long
@pytest.mark.slow
def test_convert_prune_channels_feeds_every_target(trained_resnet50: Path, tmp_path: Path) -> None:
    import onnx

    from edgebrain.convert import convert

    out = tmp_path / "out"
    arts = convert(trained_resnet50, "onnx,openvino", "int8", out, prune_channels=0.25, channel_epochs=3,
                   prune_per_class=120, calib_size=32, verify_n=64, min_agreement=0.8, int8_search=False)
    assert {a.target for a in arts} == {"onnx", "openvino"}
    pruned = out / "pruned-ch25" / "model.keras"
    assert pruned.is_file() and (out / "pruned-ch25" / "model_card.json").is_file()
    rep = arts[0].manifest["channel_pruning"]
    assert rep["ratio"] == 0.25 and len(rep["chains"]) == 32
    assert rep["macs_ratio"] < 0.8 and rep["params_ratio"] < 0.9
    # the saved pruned model holds its weights, not the fine-tuning optimizer's state too
    assert rep["weights_bytes"] < 1.3 * 4 * rep["params_after"], rep["weights_bytes"]
    assert rep["pruned_model"]["path"] == str(pruned)
    # a trained model: fine-tuning brings the pruned model back near the dense one on the validation split
    assert rep["pruned_val_accuracy"] >= rep["dense_val_accuracy"] - 0.1, rep
    for a in arts:
        assert a.path.name.endswith("-ch25")
        assert a.manifest["source"]["path"] == str((trained_resnet50 / "model.keras").resolve())
        assert a.manifest["pruning"] is None and a.manifest["verification"]["passed"]
    # the artifact really has fewer filters: conv5_block1_1_conv (256 -> 128 channels at this width) in
    # the ONNX graph (OIHW weights)
    g = onnx.load(str(next(a for a in arts if a.target == "onnx").model_file)).graph
    shapes = {tuple(t.dims) for t in g.initializer if len(t.dims) == 4}
    c5 = next(c for c in rep["chains"] if c["a"] == "conv5_block1_1_conv")
    assert (c5["channels"], c5["kept"]) == (128, 96)
    assert (96, 256, 1, 1) in shapes and (128, 256, 1, 1) not in shapes, sorted(shapes)


@pytest.mark.slow
def test_convert_prune_channels_refuses_a_model_without_chains(tiny_model: Path, tmp_path: Path) -> None:
    from edgebrain.convert import convert
    from edgebrain.errors import EdgebrainError

    with pytest.raises(EdgebrainError, match="no prunable convolution chain"):
        convert(tiny_model, "tflite", "fp32", tmp_path / "o", prune_channels=0.25, channel_epochs=0, no_verify=True)


def test_cli_help_lists_prune_channels() -> None:
    from click.testing import CliRunner

    from edgebrain.cli import cli

    r = CliRunner().invoke(cli, ["convert", "--help"])
    assert r.exit_code == 0 and "--prune-channels" in r.output and "--channel-epochs" in r.output

