"""Super-resolution front end: degradation model, x2/x4 nets, a short real training that must
beat bicubic on real Testing images, the sr-resnet50 pipeline and the int8 policy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgebrain import data as D
from edgebrain import sr as SR
from edgebrain.errors import ModelError


@pytest.fixture(scope="module")
def hr64(dataset: D.Dataset, cache_env: Path) -> D.Arrays:
    """Real Testing images at 64 px (16 per class)."""
    return D.load_arrays(D.subset(dataset.split("Testing"), 16, 0), (64, 64))


@pytest.fixture(scope="module")
def sr_x2(data_dir: Path, cache_env: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A really trained x2 SR net: 100 train images per class at 64 px, 4 epochs (~15-30 s),
    evaluated on 25 Testing images per class."""
    out = tmp_path_factory.mktemp("sr") / "x2"
    return SR.train_sr(data_dir, out, scale=2, hr_size=64, epochs=4, seed=1, width=0.5, per_class=100,
                       eval_per_class=25)


# ----------------------------------------------------------------------------- degradation


def test_degradation_is_deterministic_and_batch_independent(hr64: D.Arrays) -> None:
    x = hr64.x[:6]
    a = SR.degrade(x, 2, seed=5)
    assert a.shape == (6, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, SR.degrade(x, 2, seed=5))
    assert np.array_equal(a[:3], SR.degrade(x[:3], 2, seed=5))  # same image index, same draw
    assert np.array_equal(a[0], SR.degrade(x[0], 2, seed=5))
    assert not np.array_equal(a, SR.degrade(x, 2, seed=6))
    b = SR.degrade(x, 4, seed=5)
    assert b.shape == (6, 16, 16, 3)
    # a blurred, noisy copy: close to plain area downsampling, never identical
    area = x.reshape(6, 32, 2, 32, 2, 3).mean(axis=(2, 4))
    diff = np.abs(a.astype(float) - area)
    assert 0.5 < diff.mean() < 20
    with pytest.raises(ValueError, match="disagrees"):
        SR.degrade(x, 4, 0, SR.Degradation(scale=2))
    with pytest.raises(ValueError, match="not divisible"):
        SR.degrade(x[:, :63, :63], 2)
    noiseless = SR.Degradation(scale=2, blur_sigma=(0.0, 0.0), noise_sigma=(0.0, 0.0))
    assert np.abs(SR.degrade(x, 2, 0, noiseless).astype(float) - area).max() <= 0.5 + 1e-6


# ----------------------------------------------------------------------------- nets


@pytest.mark.parametrize("scale", [2, 4])
def test_sr_net_shapes_x2_x4(scale: int) -> None:
    from edgebrain.models.variants import build_sr

    m = build_sr(24, scale, width=0.25)
    assert m.input_shape == (None, 24, 24, 3)
    assert m.output_shape == (None, 24 * scale, 24 * scale, 3)
    assert SR.sr_scale_of(m) == scale
    anysize = SR.resize_sr(m, None)
    x = np.random.default_rng(0).random((2, 10, 14, 3)).astype(np.float32)
    assert anysize(x).shape == (2, 10 * scale, 14 * scale, 3)
    # an untrained net is (almost exactly) bilinear upsampling
    from edgebrain.tfenv import import_tf

    tf = import_tf()
    bil = tf.image.resize(x, (10 * scale, 14 * scale), "bilinear").numpy()
    assert np.abs(anysize(x).numpy() - bil).max() < 0.05


def test_sr_scale_out_of_range() -> None:
    from edgebrain.models.variants import build_sr

    with pytest.raises(ModelError, match="scale"):
        build_sr(16, 5)


# ----------------------------------------------------------------------------- real training


def test_sr_beats_bicubic_on_real_testing(sr_x2: dict) -> None:
    m = sr_x2["metrics"]
    assert m["split"] == "Testing" and m["n"] == 100
    gain = m["sr_minus_bicubic"]["psnr_db"]
    # after a short real training the net must beat bicubic, on average and on most images
    assert m["sr"]["psnr_db"]["mean"] > m["bicubic"]["psnr_db"]["mean"], m
    assert gain["ci95"][0] > 0.1, gain
    assert gain["win_rate"] >= 0.8, gain
    assert m["sr"]["ssim"]["mean"] > m["bicubic"]["ssim"]["mean"]
    assert m["bicubic"]["psnr_db"]["mean"] > m["bilinear"]["psnr_db"]["mean"]  # sanity of the baselines
    hist = sr_x2["history"]
    assert hist["loss"][-1] < hist["loss"][0]


def test_sr_folder_card_and_reload(sr_x2: dict, data_dir: Path) -> None:
    out = Path(sr_x2["out"])
    for name in ("model.keras", "model_card.json", "metrics.json", "history.json"):
        assert (out / name).is_file()
    card = json.loads((out / "model_card.json").read_text())
    assert card["variant"] == "sr-espcn-x2" and card["input_shape"] == [32, 32, 3]
    assert card["extra"]["sr"]["degradation"]["scale"] == 2
    assert card["metrics"]["psnr_gain_over_bicubic_db"] > 0
    model, rec = SR.load_sr(out)
    assert rec["hr_size"] == 64 and SR.sr_scale_of(model) == 2
    again = SR.evaluate_sr(out, data_dir, per_class=25, subset_seed=1)  # the card supplies size + degradation
    assert again["sr"]["psnr_db"]["mean"] == pytest.approx(sr_x2["metrics"]["sr"]["psnr_db"]["mean"], abs=1e-4)


def test_int8_policy_and_float_fallback(sr_x2: dict, hr64: D.Arrays, dataset: D.Dataset) -> None:
    model, _ = SR.load_sr(sr_x2["out"])
    calib_hr = D.load_arrays(D.subset(D.splits_for(dataset, 1)["calib"], 4, 0), (64, 64)).x
    calib = SR.degrade(calib_hr, 2, seed=3)
    ok = SR.int8_psnr_check(model, calib, hr64.x[:24], 2, budget_db=0.5)
    assert ok["n"] == 24 and ok["int8_size_bytes"] > 0
    assert ok["decision"] == ("int8" if ok["psnr_drop_db"] <= 0.5 else "float")
    assert abs(ok["float_psnr_db"] - ok["int8_psnr_db"]) < 5  # a real int8 model, not garbage
    strict = SR.int8_psnr_check(model, calib, hr64.x[:24], 2, budget_db=-1.0)
    assert strict["decision"] == "float"  # a budget no int8 model can meet keeps SR in float


# ----------------------------------------------------------------------------- sr-resnet50


@pytest.fixture(scope="module")
def sr_resnet50(sr_x2: dict, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgebrain.train import TrainConfig, train

    out = tmp_path_factory.mktemp("srr") / "sr-resnet50"
    train(TrainConfig(variant="sr-resnet50", data_dir=str(data_dir), out=str(out), input_size=64, width=0.25,
                      epochs=1, batch_size=32, per_class=24, eval_per_class=8, seed=3, sr_model=sr_x2["out"],
                      sr_int8_check=False))
    return out


def test_sr_resnet50_pipeline_files_card_and_three_way(sr_resnet50: Path, data_dir: Path) -> None:
    from edgebrain.modelcard import ModelCard
    from edgebrain.models.variants import load_keras_model

    for name in ("model.keras", "sr.keras", "classifier.keras", "model_card.json", "metrics.json"):
        assert (sr_resnet50 / name).is_file(), name
    card = ModelCard.find(sr_resnet50)
    assert card is not None and card.variant == "sr-resnet50"
    assert card.input_shape == [32, 32, 3] and card.preprocess.size == (32, 32)
    stages = card.extra["pipeline"]["stages"]
    assert [s["name"] for s in stages] == ["sr", "classifier"]
    assert stages[0]["input_shape"] == [32, 32, 3] and stages[0]["output_shape"] == [64, 64, 3]
    assert card.extra["sr"]["scale"] == 2 and card.extra["sr"]["source"].endswith("x2")
    metrics = json.loads((sr_resnet50 / "metrics.json").read_text())
    tw = metrics["sr_pipeline"]["three_way"]
    assert tw["n"] == 32
    for src in ("degraded", "resized"):
        for way in ("bicubic", "sr"):
            rec = tw[src][way]
            assert set(rec["recall"]) == {"glioma", "meningioma", "notumor", "pituitary"}
            assert sum(map(sum, rec["confusion_matrix"])) == 32
        mc = tw[src]["mcnemar_sr_vs_bicubic"]
        assert mc["b"] + mc["c"] <= 32 and 0.0 <= mc["p_value"] <= 1.0
    assert set(tw["native"]["recall"]) == set(card.class_names)
    again = SR.evaluate_pipeline(sr_resnet50, data_dir, per_class=8, seed=3)  # from the saved stage files
    for src in ("degraded", "resized"):
        assert again[src]["sr"]["confusion_matrix"] == tw[src]["sr"]["confusion_matrix"]
    # the assembled model is exactly SR stage -> classifier
    full = load_keras_model(sr_resnet50 / "model.keras")
    srm = load_keras_model(sr_resnet50 / "sr.keras")
    cls = load_keras_model(sr_resnet50 / "classifier.keras")
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(full(x).numpy(), cls(srm(x)).numpy(), atol=1e-5)
    # no optimizer state in the deployable files (nor in the nested classifier)
    import zipfile

    import h5py

    for name in ("model.keras", "classifier.keras"):
        with zipfile.ZipFile(sr_resnet50 / name) as z, h5py.File(z.open("model.weights.h5")) as h:
            keys: list[str] = []
            h.visit(keys.append)
            assert not [k for k in keys if k.endswith("optimizer")], name


# ----------------------------------------------------------------------------- CLI


def test_train_cli_help_lists_sr_and_fusion() -> None:
    from edgebrain.cli import cli

    r = CliRunner().invoke(cli, ["train", "--help"])
    assert r.exit_code == 0, r.output
    for opt in ("--scale", "--sr-model", "--fuse", "--ct-dir", "--ct-csv", "train sr"):
        assert opt in r.output


@pytest.mark.train
def test_train_sr_cli(data_dir: Path, cache_env: Path, tmp_path: Path) -> None:
    from edgebrain.cli import cli

    out = tmp_path / "x4"
    r = CliRunner().invoke(cli, ["train", "sr", "--scale", "4", "--size", "64", "--epochs", "1", "--per-class",
                                 "8", "--eval-per-class", "4", "--data", str(data_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert res["testing_n"] == 16
    card = json.loads((out / "model_card.json").read_text())
    assert card["input_shape"] == [16, 16, 3] and card["extra"]["sr"]["scale"] == 4
    bad = CliRunner().invoke(cli, ["train", "sr", "--scale", "4", "--size", "66", "--data", str(data_dir),
                                   "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "divisible" in bad.output
