"""Per-image intensity normalisation and the resize method: part of the preprocessing spec,
recorded, and applied identically by training, calibration and the TensorFlow-free runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgebrain.normalize import NormalizeError, canonical, normalize
from edgebrain.preprocess import RESIZE_METHODS, PreprocessSpec

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
NORMALIZE = ["none", "percentile:1,99", "zscore:3", "histeq", "clahe:0.01"]


@pytest.fixture(scope="module")
def files(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One real Testing scan per class, plus a 512 px greyscale ('L') JPEG made from one: the
    raw-archive kind of file, so the resize really resamples a different resolution and mode."""
    out = tmp_path_factory.mktemp("norm-files")
    picked = [sorted((data_dir / "Testing" / c).iterdir())[5] for c in CLASSES]
    raw = out / "glioma_raw512.jpg"
    with Image.open(picked[0]) as im:
        im.convert("L").resize((512, 512), Image.BICUBIC).save(raw, quality=92)
    return [*picked, raw]


@pytest.fixture(scope="module")
def tflite_fp32(tiny_model: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgebrain.convert import convert

    arts = convert(tiny_model, "tflite", "fp32", tmp_path_factory.mktemp("norm-art"), data=data_dir, verify_n=8)
    return arts[0].path


_RUNTIME = """
import json, sys
import numpy as np
from edgebrain.artifact import Artifact, load_manifest
from edgebrain.predict import Predictor
art = load_manifest(sys.argv[1])
files, combos = json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {}
for resize, norm in combos:
    pre = {**art.manifest["preprocess"], "name": "xception", "mean": [127.5] * 3, "std": [127.5] * 3,
           "resize": resize, "normalize": norm}
    p = Predictor(Artifact(art.path, {**art.manifest, "preprocess": pre}), threads=1, warmup=False)
    out[f"{resize}|{norm}"] = np.concatenate([p.preprocess(p.load(f)[0]) for f in files])
np.savez(sys.argv[4], **out)
print(json.dumps({"tf_modules": sorted(m for m in sys.modules if m.startswith(("tensorflow", "tf_keras")))}))
"""


def _training_tensors(files: list[Path], spec: PreprocessSpec) -> np.ndarray:
    """What ``edgebrain train`` feeds the model: load_split, then the tf.data pipeline."""
    from edgebrain import data as D
    from edgebrain.train import load_split, make_dataset

    samples = [D.Sample(f, i % 4, CLASSES[i % 4], "Training", f"sha-{f.name}") for i, f in enumerate(files)]
    arr = load_split(samples, spec, "test")
    assert not arr.failed
    ds = make_dataset(arr.x, arr.y, spec, len(files), 4, shuffle=False, seed=0)
    return np.concatenate([xb.numpy() for xb, _ in ds])


def _calibration_tensors(files: list[Path], spec: PreprocessSpec, tmp: Path) -> np.ndarray:
    """What ``edgebrain convert`` calibrates on (a --calib folder, one folder per class)."""
    from edgebrain.calibration.sampling import build_calibration

    for i, f in enumerate(files):
        d = tmp / CLASSES[i % 4]
        d.mkdir(parents=True, exist_ok=True)
        (d / f.name).write_bytes(f.read_bytes())
    cal = build_calibration(spec, CLASSES, size=len(files), calib_dir=tmp, use_cache=False)
    order = {s.path.name: i for i, s in enumerate(cal.samples)}
    return np.stack([cal.x[order[f.name]] for f in files])


@pytest.mark.slow
def test_runtime_training_and_calibration_give_identical_tensors(files: list[Path], tflite_fp32: Path,
                                                                 tmp_path: Path, cache_env: Path) -> None:
    combos = [[r, n] for r in RESIZE_METHODS for n in NORMALIZE]
    npz = tmp_path / "runtime.npz"
    out = subprocess.run([sys.executable, "-c", _RUNTIME, str(tflite_fp32), json.dumps([str(f) for f in files]),
                          json.dumps(combos), str(npz)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["tf_modules"] == []
    runtime = np.load(npz)
    seen: dict[str, np.ndarray] = {}
    for resize, norm in combos:
        spec = PreprocessSpec.named("xception", 32, resize=resize, normalize=norm)
        got = runtime[f"{resize}|{norm}"]
        train = _training_tensors(files, spec)
        assert got.shape == train.shape == (len(files), 32, 32, 3)
        assert got.dtype == train.dtype == np.float32
        np.testing.assert_array_equal(got, train, err_msg=f"runtime vs training, {resize} / {norm}")
        calib = _calibration_tensors(files, spec, tmp_path / f"calib-{resize}-{norm.split(':')[0]}")
        np.testing.assert_array_equal(got, calib, err_msg=f"runtime vs calibration, {resize} / {norm}")
        seen[f"{resize}|{norm}"] = got
    # every option really changes the tensor (a no-op option would pass the checks above)
    for resize in RESIZE_METHODS:
        for norm in NORMALIZE[1:]:
            assert not np.array_equal(seen[f"{resize}|{norm}"], seen[f"{resize}|none"]), (resize, norm)
    for norm in NORMALIZE:
        for resize in RESIZE_METHODS[1:]:
            assert not np.array_equal(seen[f"{resize}|{norm}"], seen[f"nearest|{norm}"]), (resize, norm)


def test_old_cards_keep_bilinear_and_no_normalisation() -> None:
    old = {"name": "rescale", "height": 64, "width": 64, "channels": 3, "mode": "scale",
           "mean": [0, 0, 0], "std": [255, 255, 255], "extra": {}}
    s = PreprocessSpec.from_dict(old)
    assert (s.resize, s.normalize) == ("bilinear", "none")
    x = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(s.apply(x), x / np.float32(255.0))
    d = s.to_dict()
    assert d["resize"] == "bilinear" and d["normalize"] == "none"


def test_spec_records_and_round_trips_the_new_fields() -> None:
    s = PreprocessSpec.named("xception", 96, resize="area", normalize="percentile")
    assert s.normalize == "percentile:1,99"  # the parameters are recorded, not only the name
    assert PreprocessSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s


@pytest.mark.parametrize("bad", [{"resize": "lanczos"}, {"normalize": "equalise"}, {"normalize": "percentile:5"},
                                 {"normalize": "percentile:99,1"}, {"normalize": "clahe:x"}])
def test_bad_resize_or_normalisation_is_refused(bad: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="resize|normalisation"):
        PreprocessSpec.named("rescale", 32, **bad)


def test_percentile_and_zscore_undo_contrast_and_brightness() -> None:
    rng = np.random.default_rng(1)
    img = rng.normal(100, 30, (48, 48, 1)).clip(0, 255).repeat(3, axis=-1).astype(np.float32)
    shifted = img * np.float32(1.3) + np.float32(12.0)  # brighter, more contrast
    for name in ("percentile", "zscore"):
        a, b = normalize(img, name), normalize(shifted, name)
        assert np.abs(a - b).max() < 0.05, name
        assert np.abs(img - shifted).max() > 10


def test_histeq_undoes_a_gamma_change() -> None:
    rng = np.random.default_rng(2)
    img = np.rint(rng.uniform(0, 255, (48, 48, 1))).repeat(3, axis=-1).astype(np.float32)
    g = np.float32(255.0) * (img / np.float32(255.0)) ** np.float32(0.6)
    a, b = normalize(img, "histeq"), normalize(g, "histeq")
    assert np.abs(a - b).mean() < 2.0 < np.abs(img - g).mean()


def test_batch_and_single_images_normalise_the_same() -> None:
    x = np.random.default_rng(3).integers(0, 256, (3, 16, 16, 3)).astype(np.float32)
    for name in NORMALIZE:
        batch = normalize(x, name)
        for i in range(3):
            np.testing.assert_array_equal(batch[i], normalize(x[i], name))


def test_canonical_names() -> None:
    assert canonical(None) == "none"
    assert canonical("clahe") == "clahe:0.01"
    assert canonical("zscore:2.5") == "zscore:2.5"
    with pytest.raises(NormalizeError):
        canonical("zscore:0")


def test_command_line_preprocess_carries_resize_and_normalisation() -> None:
    s = PreprocessSpec.named("caffe+resize=nearest+normalize=percentile", 32)
    assert (s.name, s.mode, s.resize, s.normalize) == ("caffe", "caffe", "nearest", "percentile:1,99")
    assert PreprocessSpec.named("meanstd:1,2,3/4,5,6+resize=area", 8).resize == "area"
    for bad in ("caffe+resize=lanczos", "caffe+size=3", "caffe+resize"):
        with pytest.raises(ValueError):
            PreprocessSpec.named(bad, 32)


@pytest.mark.slow
def test_a_foreign_model_converts_and_predicts_with_its_resize_method(tiny_model: Path, data_dir: Path,
                                                                      tmp_path: Path) -> None:
    """A model from another pipeline (no model card; Keras ImageDataGenerator resizes with
    'nearest'): --preprocess names the method, the manifest records it, predict applies it."""
    from click.testing import CliRunner

    from edgebrain.cli import cli
    from edgebrain.imageio import load_rgb, resize_rgb
    from edgebrain.predict import Predictor

    raw = tmp_path / "foreign" / "model.keras"
    raw.parent.mkdir()
    raw.write_bytes(tiny_model.read_bytes())
    res = CliRunner().invoke(cli, ["convert", str(raw), "--to", "tflite", "--precision", "fp32", "--out",
                                   str(tmp_path / "art"), "--preprocess", "rescale+resize=nearest",
                                   "--classes", ",".join(CLASSES), "--data", str(data_dir), "--verify-n", "8"])
    assert res.exit_code == 0, res.output
    man = json.loads(next((tmp_path / "art").rglob("manifest.json")).read_text())
    assert man["preprocess"]["resize"] == "nearest" and man["preprocess"]["normalize"] == "none"
    p = Predictor(next((tmp_path / "art").rglob("manifest.json")).parent, threads=1)
    f = sorted((data_dir / "Testing" / "glioma").iterdir())[0]
    rgb = load_rgb(f)
    np.testing.assert_array_equal(p.load(f)[0], resize_rgb(rgb, (32, 32), "nearest"))
    assert not np.array_equal(p.load(f)[0], resize_rgb(rgb, (32, 32), "bilinear"))
