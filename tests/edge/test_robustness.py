"""Perturbations, intensity augmentation, ``bench --robustness`` and the gate's robustness rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgebrain import perturb as P

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


@pytest.fixture(scope="module")
def scan(data_dir: Path) -> np.ndarray:
    from edgebrain.imageio import load_rgb

    return load_rgb(sorted((data_dir / "Testing" / "glioma").iterdir())[7])


def test_every_suite_condition_changes_a_real_scan(scan: np.ndarray) -> None:
    colour = scan.copy()
    colour[..., 0] = np.clip(colour[..., 0].astype(int) + 40, 0, 255)  # grayscale only changes colour scans
    for name, strengths in P.SUITE:
        for s in strengths:
            src = colour if name == "grayscale" else scan
            out = P.apply(name, src, s, seed=(0, 1, 2))
            assert out.dtype == np.uint8 and out.shape[-1] == 3
            assert out.shape != src.shape or not np.array_equal(out, src), (name, s)


def test_perturbations_are_seeded_and_keep_greyscale_grey(scan: np.ndarray) -> None:
    a = P.apply("noise", scan, 10.0, seed=(0, 3, 5))
    assert np.array_equal(a, P.apply("noise", scan, 10.0, seed=(0, 3, 5)))
    assert not np.array_equal(a, P.apply("noise", scan, 10.0, seed=(0, 3, 6)))
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])
    assert P.apply("resolution", scan, 512.0).shape == (512, 512, 3)
    assert P.apply("resolution", scan, 0.5).shape == (scan.shape[0] // 2, scan.shape[1] // 2, 3)
    assert P.apply("gamma", scan, 0.6).mean() > scan.mean() > P.apply("gamma", scan, 1.6).mean()
    with pytest.raises(ValueError, match="unknown perturbation"):
        P.apply("solarize", scan, 1.0)


def test_augment_is_seeded_and_off_means_unchanged(scan: np.ndarray) -> None:
    x = np.stack([scan[:96, :96], scan[50:146, 50:146]]).astype(np.float32)
    aug = P.Augment(gamma=(0.6, 1.6), contrast=(0.6, 1.4), noise=10, blur=1.5, jpeg=(30, 95), rescale=0.5, prob=1.0)
    a = aug.batch(x, np.random.default_rng(1))
    assert np.array_equal(a, aug.batch(x, np.random.default_rng(1)))
    assert not np.array_equal(a, x) and a.min() >= 0 and a.max() <= 255 and a.dtype == np.float32
    assert np.array_equal(P.Augment(gamma=(0.5, 2.0), prob=0.0).batch(x, np.random.default_rng(1)), x)
    assert not P.Augment().active and P.Augment.from_dict(aug.to_dict()) == aug
    with pytest.raises(ValueError, match="LOW,HIGH"):
        P.parse_range("1.5", "--aug-gamma")


def test_training_pipeline_applies_the_intensity_augmentation(scan: np.ndarray) -> None:
    from edgebrain.train import TrainConfig, _augmenter, augmenter_from_card

    x = np.stack([scan[:64, :64]] * 4).astype(np.float32)
    base = dict(variant="xception-lite", data_dir="", out="", brightness=(1.0, 1.0))
    plain = _augmenter(TrainConfig(**base))(x).numpy()
    assert np.array_equal(plain, x)
    cfg = TrainConfig(**base, aug_gamma=(0.6, 1.6), aug_noise=10.0, aug_prob=1.0)
    out = _augmenter(cfg)(x).numpy()
    assert out.shape == x.shape and not np.array_equal(out, x)
    assert not np.array_equal(out[0], out[1])  # per image, not per batch
    # fine-tuning reads the same augmentation back from the card
    card = {"variant": "xception-lite", "brightness": [1.0, 1.0], "aug_gamma": [0.6, 1.6], "aug_prob": 1.0}
    assert augmenter_from_card(card) is not None
    assert augmenter_from_card({"variant": "x", "brightness": [1.0, 1.0]}) is None


# ----------------------------------------------------------------------------- bench --robustness


@pytest.fixture(scope="module")
def rob_run(trained_small: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[dict[str, Any], Path, dict[str, Path]]:
    from edgebrain.bench import BenchOptions, bench
    from edgebrain.convert import convert

    arts = convert(trained_small / "model.keras", ["tflite"], ["fp32", "int8"], tmp_path_factory.mktemp("rob-arts"),
                   calib_size=32, verify_n=32, min_agreement=0.8)
    paths = {a.precision: a.path for a in arts}
    out = tmp_path_factory.mktemp("rob") / "out"
    fast = BenchOptions(threads=1, warmup=1, min_runs=3, min_seconds=0.05, throughput_min_runs=1,
                        throughput_min_seconds=0.05, n_boot=100)
    doc = bench([paths["fp32"], paths["int8"]], data_dir, device="host", out=out, per_class=10, options=fast,
                robustness=True, robustness_per_class=10)
    return doc, out, paths


@pytest.mark.train
@pytest.mark.slow
def test_bench_robustness_measures_every_model_under_every_condition(
        rob_run: tuple[dict[str, Any], Path, dict[str, Path]]) -> None:
    doc, out, _ = rob_run
    rob = doc["robustness"]
    n_cond = sum(len(s) for _, s in P.SUITE)
    assert rob["n"] == 40 and rob["reference"]["reference"] is True and len(rob["results"]) == 2
    for rec in [rob["reference"], *rob["results"]]:
        assert len(rec["conditions"]) == n_cond
        assert {c["perturbation"] for c in rec["conditions"]} == {n for n, _ in P.SUITE}
        assert set(rec["worst_by_perturbation"]) == {n for n, _ in P.SUITE}
        assert rec["worst_drop_pp"] == max(c["drop_pp"] for c in rec["conditions"])
        # the clean pass runs the same pipeline as the main benchmark: the same accuracy on the same images
        main = doc["reference"] if rec["reference"] else next(r for r in doc["results"] if r["name"] == rec["name"])
        assert rec["clean_accuracy"] == pytest.approx(main["accuracy"])
        # strong perturbations do change predictions
        assert min(c["stability"] for c in rec["conditions"]) < 1.0
    for rec in rob["results"]:
        assert len(rec["vs_reference"]) == n_cond
        drops = {c["label"]: c["drop_pp"] for c in rec["conditions"]}
        ref_drops = {c["label"]: c["drop_pp"] for c in rob["reference"]["conditions"]}
        for v in rec["vs_reference"]:
            assert v["extra_drop_pp"] == pytest.approx(drops[v["label"]] - ref_drops[v["label"]], abs=1e-3)
    # the FP32 TFLite artifact computes what the reference computes, perturbed or not
    fp32 = next(r for r in rob["results"] if r["precision"] == "fp32")
    assert min(c["agreement_reference"] for c in fp32["conditions"]) >= 0.95
    saved = json.loads((out / "results.json").read_text())
    assert saved["robustness"]["results"][0]["conditions"] == rob["results"][0]["conditions"]
    md = (out / "results.md").read_text()
    assert "## Robustness" in md and "gamma 0.6" in md and "degrades more than FP32" in md
    html = (out / "report.html").read_text()
    assert "<h2>Robustness</h2>" in html and html.count("data:image/png;base64") >= 4


@pytest.mark.train
@pytest.mark.slow
def test_gate_robustness_rule_on_real_results(rob_run: tuple[dict[str, Any], Path, dict[str, Path]],
                                              tmp_path: Path) -> None:
    from edgebrain.cli import cli

    doc, out, _ = rob_run
    worst = max(r["worst_drop_pp"] for r in doc["robustness"]["results"])
    common = ["gate", str(out / "results.json"), "--max-drop", "100", "--max-class-drop", "100",
              "--min-agreement", "0", "--json", str(tmp_path / "g.json")]
    ok = CliRunner().invoke(cli, [*common, "--max-robustness-drop", "100"])
    rep = json.loads((tmp_path / "g.json").read_text())
    checks = [c for s in rep["subjects"] for c in s["checks"] if c["name"] == "robustness"]
    assert ok.exit_code == 0, ok.output
    assert len(checks) == 2 and all(c["status"] == "pass" for c in checks)
    if worst > 0:
        bad = CliRunner().invoke(cli, [*common, "--max-robustness-drop", f"{worst / 2:g}"])
        assert bad.exit_code == 1, bad.output
        assert "worst drop" in bad.output


def _synthetic(tmp_path: Path, rob: dict[str, Any] | None) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_gate_helpers", Path(__file__).with_name("test_gate.py"))
    assert spec is not None and spec.loader is not None
    g = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(g)  # the gate tests' results builders
    folder, sha = g.make_artifact(tmp_path / "artifacts", "tflite-int8")
    doc = g.results_doc([g.record("tflite-int8", [0.95, 0.90, 0.99, 0.96], folder=folder, sha=sha)])
    if rob is not None:
        doc["robustness"] = rob
    p = tmp_path / "results.json"
    p.write_text(json.dumps(doc))
    return p


def _rob(worst: float, extra: float) -> dict[str, Any]:
    rec = {"name": "tflite-int8", "worst_drop_pp": worst, "worst_condition": "gamma 1.6",
           "max_extra_drop_pp": extra, "degrades_more_than_reference": ["gamma 1.6"] if extra > 1 else [],
           "worst_by_perturbation": {"gamma": {"strength": 1.6, "drop_pp": worst}}}
    return {"n": 200, "seed": 0, "suite": [], "reference": None, "results": [rec], "failed": []}


@pytest.mark.parametrize("rob, kw, status", [
    (_rob(4.0, 0.5), {"max_worst_drop": 5.0}, "pass"),
    (_rob(6.0, 0.5), {"max_worst_drop": 5.0}, "fail"),
    (_rob(4.0, 3.0), {"max_worst_drop": 5.0, "max_extra_drop": 2.0}, "fail"),
    (_rob(4.0, 1.5), {"max_extra_drop": 2.0}, "pass"),
    (None, {"max_worst_drop": 5.0}, "error"),
    ({"error": "RuntimeError: boom"}, {"max_worst_drop": 5.0}, "error"),
    ({**_rob(1.0, 0.0), "results": []}, {"max_worst_drop": 5.0}, "error"),
])
def test_gate_robustness_rule(tmp_path: Path, rob: dict[str, Any] | None, kw: dict[str, float], status: str) -> None:
    from edgebrain.gate import check_robustness, gate

    report = check_robustness(gate(_synthetic(tmp_path, rob)), **kw)
    (check,) = [c for c in report.subjects[0].checks if c.name == "robustness"]
    assert check.status == status, check.message
    assert report.exit_code == {"pass": 0, "fail": 1, "error": 2}[status]


def test_gate_without_the_rule_adds_no_check(tmp_path: Path) -> None:
    from edgebrain.gate import GateError, check_robustness, gate

    report = check_robustness(gate(_synthetic(tmp_path, None)))
    assert not [c for c in report.subjects[0].checks if c.name == "robustness"] and report.exit_code == 0
    with pytest.raises(GateError):
        check_robustness(report, max_worst_drop=-1)


def test_raw_resolution_files_run_through_the_suite(tmp_path: Path, scan: np.ndarray) -> None:
    """A 512 px greyscale JPEG (as archives store them) perturbs without error at every strength."""
    f = tmp_path / "raw.jpg"
    Image.fromarray(scan).convert("L").resize((512, 512)).save(f)
    from edgebrain.imageio import load_rgb

    rgb = load_rgb(f)
    for name, strengths in P.SUITE:
        for s in strengths:
            assert P.apply(name, rgb, s, seed=0).ndim == 3
