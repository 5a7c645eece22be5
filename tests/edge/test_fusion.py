"""MRI+CT fusion: methods, pairing (name / CSV) with clear errors, load_fused, and a fused model
whose card records the fusion and whose evaluation and Predictor path honour it.

No real CT is available: CT inputs are synthetic renderings of the real MRI scans
(edgebrain.fusion.synthetic_ct)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgebrain import data as D
from edgebrain import fusion as F
from edgebrain.imageio import load_rgb
from edgebrain.preprocess import PreprocessSpec


@pytest.fixture(scope="module")
def pair(dataset: D.Dataset) -> tuple[np.ndarray, np.ndarray]:
    mri = load_rgb(D.subset(dataset.split("Training"), 1, 4)[1].path)  # a real meningioma slice
    return mri, F.synthetic_ct(mri, seed=1)


# ----------------------------------------------------------------------------- methods


@pytest.mark.parametrize("method", F.METHODS)
@pytest.mark.parametrize("mode", F.MODES)
def test_fusion_shape_range_and_channels(pair: tuple[np.ndarray, np.ndarray], method: str, mode: str) -> None:
    mri, ct = pair
    out = F.fuse(mri, ct, F.FusionSpec(method=method, mode=mode))
    assert out.shape == mri.shape and out.dtype == np.uint8
    assert out.max() > 200 and out.min() == 0  # full range used, nothing wrapped
    if mode == "rgb":
        assert np.abs(out[..., 0].astype(int) - np.rint(F.to_gray(mri) * 255)).max() <= 1  # R = MRI
        assert np.abs(out[..., 1].astype(int) - np.rint(F.to_gray(ct) * 255)).max() <= 1  # G = CT
    else:
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    fused = out[..., 2].astype(float)
    # the fused channel is neither input: it carries both
    assert np.corrcoef(fused.ravel(), F.to_gray(mri).ravel())[0, 1] > 0.7
    assert np.corrcoef(fused.ravel(), F.to_gray(ct).ravel())[0, 1] > 0.7
    for src in (mri, ct):
        assert np.abs(fused - np.rint(F.to_gray(src) * 255)).mean() > 2


@pytest.mark.parametrize("method", F.METHODS)
def test_feature_present_in_only_one_modality_survives(pair: tuple[np.ndarray, np.ndarray], method: str) -> None:
    mri, ct = pair
    spec = F.FusionSpec(method=method, mode="fused")
    base = F.fuse(mri, ct, spec)[..., 0].astype(float)
    ct_lesion = ct.copy()
    ct_lesion[100:108, 60:68] = 255  # a calcification-like spot only CT shows
    with_ct = F.fuse(mri, ct_lesion, spec)[..., 0].astype(float)
    mri_lesion = mri.copy()
    mri_lesion[120:128, 150:158] = 255  # an enhancing spot only MRI shows
    with_mri = F.fuse(mri_lesion, ct, spec)[..., 0].astype(float)
    ct_gain = with_ct[100:108, 60:68].mean() - base[100:108, 60:68].mean()
    mri_gain = with_mri[120:128, 150:158].mean() - base[120:128, 150:158].mean()
    ct_in = 255 - F.to_gray(ct)[100:108, 60:68].mean() * 255
    mri_in = 255 - F.to_gray(mri)[120:128, 150:158].mean() * 255
    assert ct_gain > 0.4 * ct_in, (ct_gain, ct_in)
    assert mri_gain > 0.4 * mri_in, (mri_gain, mri_in)
    # and it stays local: far from the spot the image is unchanged
    assert np.abs(with_ct[:40, 150:] - base[:40, 150:]).max() <= 1


@pytest.mark.parametrize("method", F.METHODS)
def test_fusing_an_image_with_itself_returns_it(pair: tuple[np.ndarray, np.ndarray], method: str) -> None:
    mri, _ = pair
    out = F.fuse(mri, mri, F.FusionSpec(method=method, mode="fused"))
    assert np.abs(out[..., 0].astype(int) - np.rint(F.to_gray(mri) * 255)).max() <= 1


def test_laplacian_pyramid_is_invertible(pair: tuple[np.ndarray, np.ndarray]) -> None:
    g = F.to_gray(pair[0])[:223, :201]  # odd sizes
    for levels in (1, 3, 5):
        assert np.abs(F.reconstruct_laplacian(F.laplacian_pyramid(g, levels)) - g).max() < 1e-5


def test_fusion_spec_validation_and_ct_resampling(pair: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(F.FusionError, match="unknown fusion method"):
        F.FusionSpec(method="pca").validated()
    with pytest.raises(F.FusionError, match="mode"):
        F.FusionSpec(mode="bgr").validated()
    with pytest.raises(F.FusionError, match="wavelet"):
        F.FusionSpec(wavelet="nope").validated()
    mri, ct = pair
    small_ct = ct[::2, ::2]  # co-registered CT on a coarser grid
    assert F.fuse(mri, small_ct).shape == mri.shape


# ----------------------------------------------------------------------------- pairing


@pytest.fixture(scope="module")
def few(dataset: D.Dataset) -> list[D.Sample]:
    return D.subset(dataset.split("Training"), 2, 11) + D.subset(dataset.split("Testing"), 1, 11)


@pytest.fixture(scope="module")
def ct_dir(few: list[D.Sample], data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ct") / "ct"
    res = F.make_synthetic_ct_dir(few, data_dir, out, seed=0)
    assert res["written"] == len(few) and not res["failed"]
    assert (out / "SYNTHETIC.txt").is_file()
    return out


def test_pairing_by_name(few: list[D.Sample], ct_dir: Path, data_dir: Path) -> None:
    p = F.CTPairing(ct_dir=ct_dir, mri_root=data_dir)
    cts = p.pair([s.path for s in few])
    for s, c in zip(few, cts):
        assert c.stem == s.path.stem and c.parent.name == s.class_name and c.suffix == ".png"
    # without the MRI root the unique stem still pairs
    assert F.CTPairing(ct_dir=ct_dir).find(few[0].path) == cts[0]


def test_unpaired_files_are_named(few: list[D.Sample], ct_dir: Path, data_dir: Path, dataset: D.Dataset) -> None:
    extra = [s for s in dataset.split("Training") if s not in few][:3]
    p = F.CTPairing(ct_dir=ct_dir, mri_root=data_dir)
    with pytest.raises(F.FusionError) as ei:
        p.pair([s.path for s in few + extra])
    msg = str(ei.value)
    assert "3 MRI file(s) have no CT partner" in msg
    for s in extra:
        assert s.path.name in msg
    with pytest.raises(F.FusionError, match="CT folder not found"):
        F.CTPairing(ct_dir=ct_dir / "nope")
    with pytest.raises(F.FusionError, match="--ct-dir"):
        F.CTPairing()


def test_pairing_by_csv(few: list[D.Sample], ct_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    rows = ["mri,ct"] + [f"{s.rel},{s.rel.rsplit('.', 1)[0]}.png" for s in few]
    good = tmp_path / "pairs.csv"
    good.write_text("\n".join(rows) + "\n")
    p = F.CTPairing(ct_dir=ct_dir, csv_path=good, mri_root=data_dir)
    assert [c.name for c in p.pair([s.path for s in few])] == [s.path.stem + ".png" for s in few]
    # CT paths relative to the CSV's folder when no --ct-dir is given
    rel = tmp_path / "ct"
    rel.symlink_to(ct_dir)
    rows2 = ["MRI,CT"] + [f"{s.rel},ct/{s.rel.rsplit('.', 1)[0]}.png" for s in few]
    (tmp_path / "p2.csv").write_text("\n".join(rows2) + "\n")
    assert len(F.CTPairing(csv_path=tmp_path / "p2.csv", mri_root=data_dir).pair([s.path for s in few])) == len(few)
    # errors: missing column, duplicate row, unpaired MRI, CT named but missing
    (tmp_path / "bad.csv").write_text("image,other\na,b\n")
    with pytest.raises(F.FusionError, match="'mri' and 'ct'"):
        F.CTPairing(ct_dir=ct_dir, csv_path=tmp_path / "bad.csv")
    (tmp_path / "dup.csv").write_text("\n".join(rows + [rows[1]]) + "\n")
    with pytest.raises(F.FusionError, match="listed twice"):
        F.CTPairing(ct_dir=ct_dir, csv_path=tmp_path / "dup.csv", mri_root=data_dir)
    (tmp_path / "short.csv").write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(F.FusionError, match=few[-1].path.name):
        F.CTPairing(ct_dir=ct_dir, csv_path=tmp_path / "short.csv", mri_root=data_dir).pair([s.path for s in few])
    (tmp_path / "gone.csv").write_text(rows[0] + f"\n{few[0].rel},no/such.png\n")
    with pytest.raises(F.FusionError, match="named but missing"):
        F.CTPairing(ct_dir=ct_dir, csv_path=tmp_path / "gone.csv", mri_root=data_dir).pair([few[0].path])


def test_load_fused_from_paths_and_spec(few: list[D.Sample], ct_dir: Path, data_dir: Path) -> None:
    fs = F.FusionSpec(method="laplacian")
    spec = PreprocessSpec.named("rescale", 48, extra={"fusion": fs.to_dict()})
    ct = F.CTPairing(ct_dir=ct_dir, mri_root=data_dir).find(few[0].path)
    assert ct is not None
    x = F.load_fused(few[0].path, ct, spec)
    assert x.shape == (48, 48, 3) and x.dtype == np.uint8
    assert np.array_equal(x, F.load_fused(few[0].path, ct, fs, 48))
    assert F.fusion_of(spec) == fs and F.fusion_of(PreprocessSpec.named("rescale", 48)) is None
    with pytest.raises(F.FusionError, match="fused MRI\\+CT"):
        F.require_plain_input(spec)
    from edgebrain.errors import ImageLoadError

    with pytest.raises(ImageLoadError, match="CT partner"):
        F.load_fused(few[0].path, ct_dir / "missing.png", spec)


# ----------------------------------------------------------------------------- a fused model


@pytest.fixture(scope="module")
def fused_model(data_dir: Path, dataset: D.Dataset, cache_env: Path,
                tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small resnet50-lite trained on wavelet-fused MRI + synthetic-CT pairs (2 epochs)."""
    from edgebrain.train import TrainConfig, train

    seed, per_class, eval_pc = 5, 12, 4
    splits = D.splits_for(dataset, seed, {"val": 0.10, "calib": 0.05})
    needed = (D.subset(splits["train"], per_class, seed) + D.subset(splits["val"], 4, seed)
              + D.subset(dataset.split("Testing"), eval_pc, seed))
    root = tmp_path_factory.mktemp("fusedrun")
    ct = root / "ct"
    F.make_synthetic_ct_dir(needed, data_dir, ct, seed=0)
    out = root / "model"
    train(TrainConfig(variant="resnet50-lite", data_dir=str(data_dir), out=str(out), input_size=32, width=0.25,
                      epochs=2, batch_size=16, per_class=per_class, eval_per_class=eval_pc, seed=seed,
                      fuse="wavelet", ct_dir=str(ct)))
    return out, ct


def test_model_card_records_fusion(fused_model: tuple[Path, Path]) -> None:
    from edgebrain.modelcard import ModelCard

    out, ct = fused_model
    card = ModelCard.find(out)
    assert card is not None
    assert card.preprocess.extra["fusion"]["method"] == "wavelet"
    assert card.preprocess.extra["fusion"]["mode"] == "rgb"
    assert F.fusion_of(card) == F.FusionSpec(method="wavelet")
    assert card.extra["fusion"]["ct_dir"] == str(ct.resolve()) and card.extra["fusion"]["pairing"] == "name"
    assert card.training["fuse"] == "wavelet"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["testing"]["n"] == 16


def test_fused_model_downstream_honours_fusion(fused_model: tuple[Path, Path], dataset: D.Dataset,
                                               data_dir: Path, tmp_path: Path) -> None:
    from edgebrain.artifact import raw_artifact
    from edgebrain.modelcard import ModelCard
    from edgebrain.models.variants import load_keras_model
    from edgebrain.predict import Predictor
    from edgebrain.tfenv import import_tf
    from edgebrain.train import evaluate_model

    out, ct = fused_model
    card = ModelCard.find(out)
    assert card is not None
    model = load_keras_model(out / "model.keras")
    # evaluation without the CT images is refused, with them it reproduces the training metrics
    with pytest.raises(F.FusionError, match="CT"):
        evaluate_model(model, dataset, card.preprocess, 4, 5)
    again = evaluate_model(model, dataset, card.preprocess, 4, 5, ct=str(ct))
    saved = json.loads((out / "metrics.json").read_text())
    assert again["testing"]["confusion_matrix"] == saved["testing"]["confusion_matrix"]
    # the Predictor path: load_fused(mri, ct, artifact) -> Predictor.predict(array)
    tf = import_tf()
    tfl = tmp_path / "fused.tflite"
    tfl.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    art = raw_artifact(tfl, card.preprocess, card.class_names, precision="fp32")
    assert F.fusion_of(art) == F.FusionSpec(method="wavelet")
    sample = D.subset(dataset.split("Testing"), 4, 5)[0]
    ct_file = F.CTPairing(ct_dir=ct, mri_root=data_dir).find(sample.path)
    assert ct_file is not None
    x = F.load_fused(sample.path, ct_file, art)
    pred = Predictor(art, threads=1).predict(x)
    ref = model(card.preprocess.apply(x[None]), training=False).numpy()[0]
    assert pred.label == card.class_names[int(ref.argmax())]
    with pytest.raises(F.FusionError):  # the guard for commands that feed plain MRI
        F.require_plain_input(art)


def test_training_with_unpaired_ct_fails_clearly(data_dir: Path, cache_env: Path, tmp_path: Path,
                                                 few: list[D.Sample]) -> None:
    from edgebrain.train import TrainConfig, train

    ct = tmp_path / "ct"
    F.make_synthetic_ct_dir(few, data_dir, ct)
    with pytest.raises(F.FusionError, match="no CT partner"):
        train(TrainConfig(variant="resnet50-lite", data_dir=str(data_dir), out=str(tmp_path / "m"), input_size=32,
                          width=0.25, epochs=1, per_class=4, fuse="weighted", ct_dir=str(ct)))
    assert not (tmp_path / "m").exists()
    from edgebrain.errors import DataError

    with pytest.raises(DataError, match="--fuse"):
        train(TrainConfig(variant="resnet50-lite", data_dir=str(data_dir), out=str(tmp_path / "m"),
                          ct_dir=str(ct)))
