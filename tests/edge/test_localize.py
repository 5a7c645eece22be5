"""Localisation: occlusion maps on edge artifacts, Grad-CAM on Keras models, drift, overlays.

The box test needs ground truth, so it builds a model whose output depends on one region: a
centre-surround (difference-of-discs) detector for a bright 11-px disc, max-pooled over the
image and mapped to "glioma". A synthetic bright lesion is drawn into real Testing scans at
known, off-centre places (x != y, so a transposed map fails); the model is converted to a
full-integer int8 TFLite artifact and explained through the TensorFlow-free Predictor.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgebrain.localize import (
    Explanation,
    box_from_heatmap,
    box_iou,
    explain,
    gradcam,
    keras_prob_fn,
    occlusion,
    render_overlay,
    saliency_drift,
    write_overlay,
)
from edgebrain.predict import Predictor

# builds and converts a lesion detector (make test, not make test-fast)
pytestmark = pytest.mark.slow

S = 64  # model input size
R = 5  # lesion radius (model pixels)
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
SPOTS = [(44, 20), (17, 41)]  # lesion centres (x, y)


def with_lesion(scan: np.ndarray, cx: int, cy: int, r: int = R) -> np.ndarray:
    img = scan.copy()
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    img[np.hypot(xx - cx, yy - cy) <= r] = 255
    return img


def lesion_box(cx: int, cy: int, r: int = R) -> tuple[int, int, int, int]:
    return (cx - r, cy - r, cx + r + 1, cy + r + 1)


def contains(box: tuple[int, int, int, int] | None, x: int, y: int) -> bool:
    return box is not None and box[0] <= x < box[2] and box[1] <= y < box[3]


@pytest.fixture(scope="module")
def scans(data_dir: Path) -> list[np.ndarray]:
    """Real no-tumour scans at the model size (a few, from the Testing split)."""
    from edgebrain.imageio import load_for_model

    files = sorted((data_dir / "Testing" / "notumor").iterdir())
    return [load_for_model(f, (S, S)) for f in files[:24]]


@pytest.fixture(scope="module")
def lesion_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    from edgebrain.modelcard import ModelCard
    from edgebrain.preprocess import PreprocessSpec
    from edgebrain.tfenv import keras

    K = keras()
    k = 15
    yy, xx = np.mgrid[:k, :k]
    d = np.hypot(xx - k // 2, yy - k // 2)
    centre, ring = (d <= R).astype(np.float32), ((d > R + 1) & (d <= k // 2)).astype(np.float32)
    dog = centre / centre.sum() - ring / ring.sum()
    inp = K.Input((S, S, 3), name="image")
    x = K.layers.Conv2D(1, k, padding="same", activation="relu", name="detector")(inp)
    x = K.layers.GlobalMaxPooling2D(name="pool")(x)
    out = K.layers.Dense(4, activation="softmax", name="predictions")(x)
    model = K.Model(inp, out)
    model.get_layer("detector").set_weights([np.repeat(dog[:, :, None, None] / 3, 3, axis=2),
                                             np.array([-0.3], np.float32)])
    model.get_layer("predictions").set_weights([np.array([[20.0, 0, 0, 0]], np.float32),
                                                np.array([-2.0, 0, 0, 0], np.float32)])
    folder = tmp_path_factory.mktemp("lesion-model")
    model.save(folder / "model.keras")
    ModelCard("lesion-detector", CLASSES, PreprocessSpec.named("rescale", S), [S, S, 3]).save(folder)
    return model, folder


@pytest.fixture(scope="module")
def artifacts(lesion_model: tuple[object, Path], scans: list[np.ndarray],
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``edgebrain convert`` to int8 (full-integer; calibrated on real scans half of which carry a
    lesion somewhere, so the detector's range is known) and fp32 TFLite artifacts."""
    from edgebrain.convert import convert

    _, folder = lesion_model
    calib = tmp_path_factory.mktemp("lesion-calib")
    rng = np.random.default_rng(0)
    for i, s in enumerate(scans[8:]):
        img = s if i % 2 else with_lesion(s, *(int(v) for v in rng.integers(10, S - 10, 2)))
        Image.fromarray(img).save(calib / f"c{i:02d}.png")
    out = tmp_path_factory.mktemp("lesion-artifacts")
    arts = convert(folder / "model.keras", "tflite", "int8,fp32", out, calib=calib, calib_size=len(scans) - 8,
                   tflite_io="int8")
    return {a.precision: a.path for a in arts}


@pytest.fixture(scope="module")
def int8(artifacts: dict[str, Path]) -> Predictor:
    return Predictor(artifacts["int8"], threads=2)


@pytest.fixture(scope="module")
def cases(int8: Predictor, scans: list[np.ndarray]) -> list[tuple[np.ndarray, int, int]]:
    """(image, cx, cy) where the int8 model really depends on the lesion: without it "glioma" is
    unlikely, with it likely (checked, so the localisation tests below are not vacuous)."""
    out = []
    for scan in scans[:8]:
        if int8.predict(scan).probabilities["glioma"] > 0.2:
            continue  # the scan itself has a lesion-like bright blob
        for cx, cy in SPOTS:
            img = with_lesion(scan, cx, cy)
            if int8.predict(img).probabilities["glioma"] > 0.8:
                out.append((img, cx, cy))
    assert len(out) >= 6, f"only {len(out)} usable lesion cases"
    return out[:6]


# ----------------------------------------------------------------------------- occlusion


def test_occlusion_box_lands_on_the_lesion(int8: Predictor, cases: list[tuple[np.ndarray, int, int]]) -> None:
    for img, cx, cy in cases:
        res = explain(int8, img, budget_s=1.0)
        e = res.occlusion
        assert res.prediction.label == "glioma" and e.class_name == "glioma"
        assert e.max_drop is not None and e.max_drop > 0.5  # covering the lesion removes the evidence
        assert contains(e.box, cx, cy), (e.box, (cx, cy))
        assert e.box is not None and (e.box[2] - e.box[0]) * (e.box[3] - e.box[1]) < 0.2 * S * S
        iou = box_iou(e.box, lesion_box(cx, cy))
        assert iou is not None and iou > 0.25, (e.box, lesion_box(cx, cy))
        peak = np.unravel_index(int(np.argmax(e.heatmap)), e.heatmap.shape)
        assert np.hypot(peak[1] - cx, peak[0] - cy) <= 2 * R


def test_occlusion_budget_coarse_to_fine(int8: Predictor, cases: list[tuple[np.ndarray, int, int]]) -> None:
    img, cx, cy = cases[0]
    coarse = occlusion(int8.infer, img, 0, budget_s=0.0)
    assert len(coarse.params["levels"]) == 1 and coarse.params["levels"][0]["stride"] == coarse.params["patch"]
    assert coarse.evaluations == 1 + 25  # baseline + the non-overlapping 5 x 5 grid of 13-px patches
    assert contains(coarse.box, cx, cy)
    t0 = time.perf_counter()
    fine = occlusion(int8.infer, img, 0, budget_s=1.5)
    took = time.perf_counter() - t0
    assert fine.evaluations > coarse.evaluations and len(fine.params["levels"]) >= 2
    assert took < 1.5 + 1.0, took  # the budget holds (one batch of slack)
    assert contains(fine.box, cx, cy)
    # finer levels cover the hot region first when the budget runs out
    partial = [lv for lv in fine.params["levels"] if lv["evaluated"] < lv["of"]]
    for lv in partial:
        assert lv["evaluated"] > 0


def test_occlusion_handles_fixed_batch_models(cases: list[tuple[np.ndarray, int, int]], int8: Predictor) -> None:
    img, cx, cy = cases[0]
    calls: list[int] = []

    def fixed_batch(xb: np.ndarray) -> np.ndarray:
        calls.append(len(xb))
        if len(xb) != 1:
            raise ValueError("model has a fixed batch of 1")
        return int8.infer(xb)

    e = occlusion(fixed_batch, img, 0, budget_s=0.0, batch=8)
    assert e.params["batch"] == 1 and contains(e.box, cx, cy)
    assert e.evaluations == 26


def test_gradcam_on_the_keras_model(lesion_model: tuple[object, Path],
                                    cases: list[tuple[np.ndarray, int, int]]) -> None:
    from edgebrain.preprocess import PreprocessSpec

    model, _ = lesion_model
    spec = PreprocessSpec.named("rescale", S)
    for img, cx, cy in cases[:3]:
        g = gradcam(model, img, spec, 0)
        assert g.params["layer"] == "detector" and g.params["score"] == "logit"
        assert g.heatmap.shape == (S, S) and float(g.heatmap.max()) == pytest.approx(1.0)
        assert contains(g.box, cx, cy), (g.box, (cx, cy))


def test_gradcam_on_a_trained_model(trained_small: Path, data_dir: Path) -> None:
    from edgebrain.imageio import load_for_model
    from edgebrain.modelcard import ModelCard
    from edgebrain.models import load_keras_model

    card = ModelCard.find(trained_small)
    assert card is not None
    model = load_keras_model(trained_small / "model.keras")
    img = load_for_model(sorted((data_dir / "Testing" / "pituitary").iterdir())[0], card.preprocess.size)
    g = gradcam(model, img, card.preprocess, 3)
    assert g.heatmap.shape == tuple(card.preprocess.size) and np.isfinite(g.heatmap).all()
    assert g.heatmap.min() >= 0 and g.heatmap.max() <= 1 and g.heatmap.std() > 0
    assert g.params["layer"].startswith("lite_s4") and g.box is not None


# ----------------------------------------------------------------------------- drift


def test_saliency_drift_int8_vs_fp32(int8: Predictor, artifacts: dict[str, Path], lesion_model: tuple[object, Path],
                                     cases: list[tuple[np.ndarray, int, int]]) -> None:
    model, _ = lesion_model
    img, cx, cy = cases[0]
    fp32 = Predictor(artifacts["fp32"], threads=2)
    for ref in (fp32, model):  # an FP32 artifact, and the Keras model itself (adds Grad-CAM)
        res = explain(int8, img, budget_s=0.5, reference=ref)
        assert res.reference is not None and res.reference.positions == res.occlusion.positions
        d = res.drift
        assert d is not None and 0.0 <= d["drift"] < 0.2 and d["box_iou"] > 0.5, d
        assert (res.gradcam is not None) == (ref is model)
    same = occlusion(int8.infer, img, 0, budget_s=0.0)
    assert saliency_drift(same, same)["drift"] == pytest.approx(0.0, abs=1e-6)
    assert saliency_drift(same, same)["box_iou"] == 1.0
    # a map of the lesion elsewhere is a different map: high drift, disjoint boxes
    other_spot = [c for c in cases if (c[1], c[2]) != (cx, cy)][0]
    elsewhere = occlusion(int8.infer, other_spot[0], 0, positions=same.positions)
    d = saliency_drift(same, elsewhere)
    assert d["drift"] > 0.5 and d["box_iou"] == 0.0, d
    assert saliency_drift(same.heatmap, 1.0 - same.heatmap)["drift"] > 1.5  # inverted
    with pytest.raises(ValueError, match="shape"):
        saliency_drift(same.heatmap, same.heatmap[:10])


def test_keras_prob_fn_matches_the_artifact(lesion_model: tuple[object, Path], artifacts: dict[str, Path],
                                            cases: list[tuple[np.ndarray, int, int]]) -> None:
    from edgebrain.preprocess import PreprocessSpec

    model, _ = lesion_model
    x = np.stack([c[0] for c in cases])
    fn = keras_prob_fn(model, PreprocessSpec.named("rescale", S), batch=4)
    np.testing.assert_allclose(fn(x), Predictor(artifacts["fp32"]).infer(x), atol=1e-4)


# ----------------------------------------------------------------------------- boxes and overlays


def test_box_from_heatmap() -> None:
    h = np.zeros((40, 50), np.float32)
    h[5:10, 30:45] = 1.0  # the peak's blob
    h[20:35, 2:12] = 0.8  # a second, separate blob above the threshold
    assert box_from_heatmap(h, 0.5) == (30, 5, 45, 10)
    h[10:20, 8:31] = 0.6  # a bridge joins them
    assert box_from_heatmap(h, 0.5) == (2, 5, 45, 35)
    assert box_from_heatmap(h, 0.7) == (30, 5, 45, 10)
    assert box_from_heatmap(np.zeros((8, 8))) is None and box_from_heatmap(np.ones((8, 8))) is None
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 10, 10), None) is None


def test_overlay_png(tmp_path: Path, data_dir: Path) -> None:
    from edgebrain.imageio import load_rgb

    original = load_rgb(sorted((data_dir / "Testing" / "glioma").iterdir())[0])  # 224 x 224
    heat = np.zeros((S, S), np.float32)
    heat[10:20, 40:50] = 1.0
    e = Explanation("occlusion", 0, heat, box_from_heatmap(heat), class_name="glioma")
    assert e.box_in((224, 224)) == (140, 35, 175, 70)
    p = write_overlay(tmp_path / "sub" / "o.png", original, e, "glioma 97%")
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size == (256, 256)  # enlarged to 256 px for viewing
        px = np.asarray(im.convert("RGB")).astype(int)
    big = np.asarray(Image.fromarray(original).resize((256, 256), Image.BILINEAR)).astype(int)
    # inside the hot region the colour map shows; far from it the scan is untouched
    hot, orig = px[55:75, 170:190], big[55:75, 170:190]
    assert np.array_equal(orig[..., 0], orig[..., 1])  # a grey scan ...
    assert (hot[..., 0] - hot[..., 1]).mean() > 40  # ... tinted with jet's dark red at the peak
    assert np.array_equal(px[200:250, 20:60], big[200:250, 20:60])
    # the box outline is drawn in green at the scaled box
    x0, y0, x1, y1 = e.box_in((256, 256))  # type: ignore[misc]
    edge = px[y0 + (y1 - y0) // 2, x0]
    assert edge[1] == 255 and edge[0] == 0 and edge[2] == 0
    assert render_overlay(original, Explanation("occlusion", 0, np.zeros((S, S), np.float32), None))[:8] == \
        b"\x89PNG\r\n\x1a\n"


def test_cli_explain_with_an_fp32_artifact_reference(artifacts: dict[str, Path], scans: list[np.ndarray],
                                                     tmp_path: Path) -> None:
    """The TensorFlow-free way to get a drift score: an FP32 artifact as the reference."""
    from click.testing import CliRunner

    from edgebrain.cli import cli

    img = with_lesion(scans[0], *SPOTS[0])
    big = np.asarray(Image.fromarray(img).resize((200, 200), Image.NEAREST))
    Image.fromarray(big).save(tmp_path / "case.png")
    out = tmp_path / "maps"
    res = CliRunner().invoke(cli, ["predict", str(artifacts["int8"]), str(tmp_path / "case.png"), "--json",
                                   "--explain", str(out), "--explain-budget-s", "0.5",
                                   "--explain-reference", str(artifacts["fp32"])])
    assert res.exit_code == 0, res.output
    ex = json.loads(res.stdout)["predictions"][0]["explanation"]
    assert set(ex["files"]) == {"occlusion", "reference_occlusion"}
    assert ex["drift"]["box_iou"] > 0.5
    x0, y0, x1, y1 = ex["occlusion"]["box_original"]  # in the 200 px file's pixels
    assert x0 <= SPOTS[0][0] * 200 / S < x1 and y0 <= SPOTS[0][1] * 200 / S < y1
    # a reference that is not a model is refused up front (exit 2), not per image
    res = CliRunner().invoke(cli, ["predict", str(artifacts["int8"]), str(tmp_path / "case.png"),
                                   "--explain", str(out), "--explain-reference", str(tmp_path)])
    assert res.exit_code == 2
