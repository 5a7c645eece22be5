"""``edgebrain bench`` end to end on a really trained small model and the real Testing images.

One main run (reference + TFLite fp32/int8 + ONNX fp32 + OpenVINO fp32 on a stratified
Testing subset) feeds most checks; the figures are recomputed independently here (sklearn,
TensorFlow in this process, gzip) rather than trusted.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from edgebrain import data as D
from edgebrain.artifact import write_manifest
from edgebrain.bench import BenchError, BenchOptions, bench, validate_results
from edgebrain.errors import IntegrityError
from edgebrain.io import sha256_file
from edgebrain.modelcard import ModelCard

FAST = dict(warmup=3, min_runs=20, min_seconds=0.3, throughput_min_runs=3, throughput_min_seconds=0.2, n_boot=1000)


def build_artifacts(model_dir: Path, out: Path) -> dict[str, Path]:
    """TFLite fp32 + int8, ONNX fp32 and OpenVINO fp32 through ``edgebrain convert`` (verified there)."""
    from edgebrain.convert import convert

    model = model_dir / "model.keras"
    arts = convert(model, ["tflite"], ["fp32", "int8"], out, calib_size=32, verify_n=32, min_agreement=0.8)
    arts += convert(model, ["onnx", "openvino"], ["fp32"], out, verify_n=32)
    return {f"{a.target}-{a.precision}": a.path for a in arts}


@pytest.fixture(scope="module")
def arts(trained_small: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_artifacts(trained_small, tmp_path_factory.mktemp("arts"))


@pytest.fixture(scope="module")
def main_run(arts: dict[str, Path], data_dir: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench") / "out"
    doc = bench([arts[k] for k in ("tflite-fp32", "tflite-int8", "onnx-fp32", "openvino-fp32")], data_dir,
                device="host", out=out, per_class=20, options=BenchOptions(threads=1, cpus=[0], **FAST))
    return doc, out


def _records(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [doc["reference"], *doc["results"]]


def test_results_json_matches_its_schema(main_run: tuple[dict[str, Any], Path]) -> None:
    import jsonschema

    _, out = main_run
    doc = json.loads((out / "results.json").read_text())
    validate_results(doc)
    assert doc["schema_version"] == 1 and doc["kind"] == "edgebrain-bench-results"
    assert {(r["target"], r["precision"]) for r in doc["results"]} == {
        ("tflite", "fp32"), ("tflite", "int8"), ("onnx", "fp32"), ("openvino", "fp32")}
    assert doc["errors"] == []
    for field in ("target", "precision", "accuracy", "macro_f1", "per_class", "agreement", "latency_ms",
                  "throughput_ips", "cold_start_ms", "peak_rss_mb", "size_bytes", "device"):
        assert all(field in r for r in doc["results"]), field
    # The schema is not vacuous: a record without accuracy, or with a negative latency, is rejected.
    bad = json.loads(json.dumps(doc))
    del bad["results"][0]["accuracy"]
    with pytest.raises(jsonschema.ValidationError):
        validate_results(bad)
    bad = json.loads(json.dumps(doc))
    bad["results"][1]["latency_ms"]["p50"] = -1.0
    with pytest.raises(jsonschema.ValidationError):
        validate_results(bad)


def test_reference_ran_in_tensorflow_and_says_where(main_run: tuple[dict[str, Any], Path], trained_small: Path,
                                                    data_dir: Path) -> None:
    from edgebrain.models import load_keras_model
    from edgebrain.tfenv import import_tf
    from edgebrain.train import predict_probs

    doc, _ = main_run
    ref = doc["reference"]
    assert ref["target"] == "tensorflow" and ref["precision"] == "fp32"
    assert ref["artifact_sha256"] == sha256_file(trained_small / "model.keras")
    assert ref["device"]["runtime"].startswith("tensorflow ")
    tf = import_tf()
    if not tf.config.list_physical_devices("GPU"):
        assert ref["device"]["ran_on"].startswith("CPU") and "GPU" not in ref["device"]["ran_on"]
        assert ref["device"]["visible_gpus"] == []
    # FP32 means FP32: never TF32 (TensorFlow's default on Ampere+ GPUs), and recorded.
    assert ref["device"]["runtime_options"]["tf32"] is False and ref["device"]["execution_precision"] == "f32"
    # Recompute the reference's accuracy in this process, on the same images.
    card = ModelCard.find(trained_small / "model.keras")
    ds = D.scan(data_dir)
    by_rel = {s.rel: s for s in ds.samples}
    samples = [by_rel[i] for i in doc["_ids"]]
    arr = D.load_arrays(samples, card.preprocess.size, use_cache=False)
    probs = predict_probs(load_keras_model(trained_small / "model.keras"), arr.x, card.preprocess)
    acc = float(np.mean(probs.argmax(1) == arr.y))
    assert ref["accuracy"] == pytest.approx(acc, abs=1e-9)
    worker = doc["_probs"][f"{ref['name']}@host"]
    assert np.max(np.abs(worker - probs)) < 1e-4
    assert ref["accuracy"] > 0.5  # a really trained model, well above the 25% of chance


def test_accuracy_figures_are_consistent(main_run: tuple[dict[str, Any], Path]) -> None:
    doc, _ = main_run
    n = doc["data"]["n"]
    assert n == 80 and doc["data"]["n_requested"] == 80
    names = doc["data"]["class_names"]
    for r in _records(doc):
        cm = np.array(r["confusion_matrix"])
        assert cm.sum() == n == r["n"]
        assert r["accuracy"] == pytest.approx(np.trace(cm) / n)
        assert sum(r["per_class"][c]["support"] for c in names) == n
        tp = np.diag(cm)
        prec = np.divide(tp, cm.sum(0), out=np.zeros(len(tp)), where=cm.sum(0) > 0)
        rec = tp / cm.sum(1)
        f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros(len(tp)), where=(prec + rec) > 0)
        assert r["macro_f1"] == pytest.approx(f1.mean())
        lo, hi = r["accuracy_ci95"]
        assert lo <= r["accuracy"] <= hi and hi - lo > 0.05  # 80 images: a wide interval
        assert 0.0 <= r["ece"] <= 1.0
    for r in doc["results"]:
        flips = r["flips"]
        assert r["n_flips"] == len(flips) == round((1 - r["agreement"]) * n)
        assert all(f["label"] != f["ref_label"] for f in flips)
        b = sum(f["ref_label"] == f["true_label"] for f in flips)
        c = sum(f["label"] == f["true_label"] for f in flips)
        assert (r["mcnemar"]["b"], r["mcnemar"]["c"]) == (b, c)
        assert r["vs_reference"]["delta_accuracy_pp"] == pytest.approx(
            100 * (r["accuracy"] - doc["reference"]["accuracy"]))


def test_converted_models_agree_with_the_reference(main_run: tuple[dict[str, Any], Path]) -> None:
    doc, _ = main_run
    by = {f"{r['target']}-{r['precision']}": r for r in doc["results"]}
    for name in ("tflite-fp32", "onnx-fp32", "openvino-fp32"):
        assert by[name]["agreement"] >= 0.98, name
        assert by[name]["mcnemar"]["p_value"] > 0.5
    assert by["tflite-int8"]["agreement"] >= 0.85
    assert abs(by["tflite-int8"]["vs_reference"]["delta_accuracy_pp"]) <= 7.5
    assert by["openvino-fp32"]["device"]["execution_precision"] == "f32"  # never silently bf16


def test_deduplicated_figure(main_run: tuple[dict[str, Any], Path], data_dir: Path) -> None:
    from sklearn.metrics import accuracy_score

    doc, _ = main_run
    dedup = {s.rel for s in D.dedup_eval(D.scan(data_dir))}
    ids = doc["_ids"]
    mask = np.array([i in dedup for i in ids])
    assert doc["data"]["dedup_n"] == int(mask.sum()) < len(ids)
    ds = D.scan(data_dir)
    y = np.array([{s.rel: s.label for s in ds.samples}[i] for i in ids])
    for r in _records(doc):
        probs = doc["_probs"][f"{r['name']}@{r['device']['label']}"]
        assert r["dedup"]["n"] == int(mask.sum())
        assert r["dedup"]["accuracy"] == pytest.approx(accuracy_score(y[mask], probs[mask].argmax(1)))


def test_latency_resources_and_settings_are_recorded(main_run: tuple[dict[str, Any], Path],
                                                     arts: dict[str, Path]) -> None:
    from edgebrain.doctor import fingerprint

    doc, _ = main_run
    here = fingerprint()
    for r in _records(doc):
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert lat["n"] >= 20 and r["latency_s"] >= 0.3  # both minimums held
        assert r["cold_start_ms"] >= r["load_ms"] > 0
        assert r["e2e_ms"] > lat["min"]  # decode + preprocess come on top of the model
        assert r["throughput"]["batch"] == 8 and r["throughput_ips"] > 0
        assert r["peak_rss_mb"] >= r["rss_mb"]["before_load"] > 0
        dev = r["device"]
        assert dev["threads"] == 1 and dev["cpus"] == [0]
        assert dev["fingerprint"]["cpu"] == here["cpu"] and dev["fingerprint"]["isa"] == here["isa"]
        assert dev["fingerprint"]["packages"]["numpy"] == here["packages"]["numpy"]
    for r in doc["results"]:
        assert r["device"]["tensorflow_imported"] is False  # the edge worker never loads TF
        folder = arts[f"{r['target']}-{r['precision']}"]
        files = [folder / f for f in ("model.tflite", "model.onnx", "model.xml", "model.bin") if (folder / f).is_file()]
        assert r["size_bytes"] == sum(f.stat().st_size for f in files)
        assert r["gzip_bytes"] == len(gzip.compress(b"".join(f.read_bytes() for f in files), 9))
        assert r["vs_reference"]["speedup_p50"] == pytest.approx(
            doc["reference"]["latency_ms"]["p50"] / r["latency_ms"]["p50"])
    assert doc["host"]["load_average_start"] is not None


def test_markdown_table_is_sorted_by_latency(main_run: tuple[dict[str, Any], Path]) -> None:
    doc, out = main_run
    md = (out / "results.md").read_text()
    lines = md.split("## Speed and size", 1)[1].split("## Accuracy", 1)[0].splitlines()
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| model")]
    header = next(ln for ln in lines if ln.startswith("| model")).strip("|").split("|")
    cols = [h.strip() for h in header]
    for want in ("speed-up", "size ratio", "Δ acc pp", "p50 ms"):
        assert want in cols
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    assert cells[0][0].startswith("reference")
    p50 = [float(c[cols.index("p50 ms")]) for c in cells[1:]]
    assert p50 == sorted(p50) and len(p50) == 4
    assert [c[0] for c in cells[1:]] == [r["name"] for r in sorted(doc["results"], key=lambda r: r["latency_ms"]["p50"])]


def _chromium() -> str:
    exe = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(exe).is_file():
        pytest.fail("chromium is not installed (apt-get install -y chromium): the report must be checked in a "
                    "real browser", pytrace=False)
    return exe


def test_report_html_is_offline_and_renders_in_a_browser(main_run: tuple[dict[str, Any], Path],
                                                         tmp_path: Path) -> None:
    doc, out = main_run
    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    assert page.count('src="data:image/png;base64,') == 3
    probe = ('<script>window.addEventListener("load",()=>{const r=[...document.images].map('
             'i=>i.naturalWidth+"x"+i.naturalHeight);const d=document.createElement("pre");d.id="probe";'
             'd.textContent="IMGS "+r.join(" ");document.body.appendChild(d);});</script>')
    probe_html = tmp_path / "probe.html"
    probe_html.write_text(page.replace("</body>", probe + "</body>"))
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chr'}"]
    proc = subprocess.run([*base, "--virtual-time-budget=5000", "--dump-dom", probe_html.as_uri()],
                          capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    m = re.search(r'<pre id="probe">IMGS ([^<]*)</pre>', dom)
    assert m, f"the probe did not run: {proc.stderr[-500:]}"
    sizes = [tuple(int(v) for v in s.split("x")) for s in m.group(1).split()]
    assert len(sizes) == 3 and all(w > 100 and h > 100 for w, h in sizes), sizes
    for r in doc["results"]:  # every model has a row in both tables
        assert dom.count(f'data-model="{r["name"]}"') == 2
    assert re.search(r'<tr class="ref" data-model="[^"]+">', dom)
    shot = tmp_path / "report.png"
    subprocess.run([*base, "--window-size=1400,1800", f"--screenshot={shot}", (out / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_a_modified_artifact_is_refused(arts: dict[str, Path], data_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "tampered"
    shutil.copytree(arts["tflite-fp32"], bad)
    blob = bytearray((bad / "model.tflite").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / "model.tflite").write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match="sha256"):
        bench([bad], data_dir, out=tmp_path / "o", per_class=2, options=BenchOptions(**FAST))
    from edgebrain.cli import cli

    res = CliRunner().invoke(cli, ["bench", str(bad), "--data", str(data_dir), "--out", str(tmp_path / "o2"),
                                   "--per-class", "2"])
    assert res.exit_code != 0 and "modified" in res.output and "sha256" in res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_an_edited_manifest_or_an_added_file_is_refused(arts: dict[str, Path], tmp_path: Path) -> None:
    from edgebrain.artifact import load_manifest

    load_manifest(arts["tflite-fp32"])  # the untouched artifact loads
    edited = tmp_path / "edited"
    shutil.copytree(arts["tflite-fp32"], edited)
    m = json.loads((edited / "manifest.json").read_text())
    (edited / "manifest.json").write_text(json.dumps({**m, "artifact_sha256": "0" * 64}))
    with pytest.raises(IntegrityError, match="does not match its own digest"):
        load_manifest(edited)
    (edited / "manifest.json").write_text(json.dumps({**m, "files": {}}))
    with pytest.raises(IntegrityError, match="does not match its own digest"):
        load_manifest(edited)
    added = tmp_path / "added"
    shutil.copytree(arts["tflite-fp32"], added)
    (added / "model.bin").write_bytes(b"weights from elsewhere")
    with pytest.raises(IntegrityError, match="model.bin is not in the manifest"):
        load_manifest(added)
    (added / "model.bin").unlink()
    (added / "sub").mkdir()
    (added / "sub" / "manifest.json").write_text("{}")  # only the top-level manifest is exempt
    with pytest.raises(IntegrityError, match="sub/manifest.json is not in the manifest"):
        load_manifest(added)
    shutil.rmtree(added / "sub")
    (added / ".DS_Store").write_bytes(b"\0")  # what a copy from a Mac adds: harmless, allowed
    load_manifest(added)


def _rewrite(src: Path, dst: Path, **changes: Any) -> Path:
    """A copy of an artifact with manifest changes, re-hashed (a consistent, different artifact)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    for k, v in changes.items():
        m[k] = v
    write_manifest(dst, {k: v for k, v in m.items() if k not in ("files", "artifact_sha256")})
    return dst


def test_wrong_source_and_fused_inputs_are_refused(arts: dict[str, Path], data_dir: Path, tmp_path: Path) -> None:
    from edgebrain.fusion import FusionError

    m = json.loads((arts["tflite-fp32"] / "manifest.json").read_text())
    other = _rewrite(arts["tflite-fp32"], tmp_path / "other-source",
                     source={**m["source"], "sha256": "0" * 64})
    with pytest.raises(IntegrityError, match="not the model these artifacts were converted from"):
        bench([other], data_dir, out=tmp_path / "o1", per_class=1)
    with pytest.raises(BenchError, match="different source models"):
        bench([arts["tflite-fp32"], other], data_dir, out=tmp_path / "o2", per_class=1)
    fused = _rewrite(arts["onnx-fp32"], tmp_path / "fused", preprocess={
        **m["preprocess"], "extra": {"fusion": {"method": "weighted", "mode": "rgb", "weight": 0.5}}})
    with pytest.raises(FusionError, match="fused MRI\\+CT"):
        bench([fused], data_dir, out=tmp_path / "o3", per_class=1, no_reference=True)
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def _small_dataset(data_dir: Path, root: Path) -> Path:
    """3 real Testing images per class (symlinks), 1 Training image per class, and one corrupt file."""
    ds = D.scan(data_dir)
    for split, k in (("Testing", 3), ("Training", 1)):
        for c in ds.class_names:
            (root / split / c).mkdir(parents=True)
            for s in [s for s in ds.split(split) if s.class_name == c][:k]:
                (root / split / c / s.path.name).symlink_to(s.path)
    (root / "Testing" / "glioma" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_raw_files_bad_images_and_a_failing_artifact(arts: dict[str, Path], data_dir: Path, tmp_path: Path) -> None:
    from edgebrain.cli import cli

    ds_dir = _small_dataset(data_dir, tmp_path / "ds")
    raw = tmp_path / "raw" / "int8.tflite"
    raw.parent.mkdir()
    shutil.copy(arts["tflite-int8"] / "model.tflite", raw)
    # A raw file needs its preprocessing and classes.
    with pytest.raises(BenchError, match="--preprocess"):
        bench([raw], ds_dir, out=tmp_path / "x", no_reference=True)
    # An artifact whose (hash-consistent) model file no runtime can load: reported, the rest still run.
    broken = tmp_path / "broken-art"
    broken.mkdir()
    (broken / "model.tflite").write_bytes(b"TFL3 this is not a flatbuffer" * 10)
    m = json.loads((arts["tflite-fp32"] / "manifest.json").read_text())
    keep = {k: m[k] for k in ("target", "precision", "model_file", "source", "class_names", "input_shape",
                              "preprocess", "verification")}
    write_manifest(broken, {**keep, "name": "broken"})
    spec = m["preprocess"]
    names = ",".join(m["class_names"])
    # A two-stage artifact (manifest "pipeline"): every stage file is timed with the same runner.
    staged = tmp_path / "staged"
    shutil.copytree(arts["tflite-fp32"], staged)
    shutil.copy(staged / "model.tflite", staged / "classifier.tflite")
    stage = {"name": "classifier", "model_file": "classifier.tflite", "precision": "fp32",
             "input_shape": m["input_shape"], "output_shape": [len(m["class_names"])]}
    write_manifest(staged, {**{k: v for k, v in m.items() if k not in ("files", "artifact_sha256")},
                            "pipeline": {"stages": [stage]}})
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, [
        "bench", str(raw), str(broken), str(staged), "--data", str(ds_dir), "--out", str(out),
        "--no-reference", "--preprocess", spec["name"], "--classes", names, "--precision", "int8",
        "--min-runs", "5", "--min-seconds", "0.1", "--warmup", "1", "--threads", "1"])
    assert res.exit_code == 1, res.output
    doc = json.loads((out / "results.json").read_text())
    validate_results(doc)
    assert [e["name"] for e in doc["errors"]] == ["broken"] and "broken" in res.output
    assert doc["reference"] is None
    assert {r["name"] for r in doc["results"]} == {"int8", json.loads((arts["tflite-fp32"] / "manifest.json").read_text())["name"]}
    raw_rec = next(r for r in doc["results"] if r["name"] == "int8")
    assert raw_rec["precision"] == "int8" and raw_rec["artifact_sha256"] == sha256_file(raw)
    assert raw_rec["agreement"] is None and raw_rec["mcnemar"] is None
    assert [f["file"] for f in doc["data"]["failed"]] == ["Testing/glioma/broken.jpg"]
    md = (out / "results.md").read_text()
    assert "broken.jpg" in md and "## Pipeline stages" in md
    st = next(r for r in doc["results"] if r["name"] != "int8")["stages"]
    assert [x["name"] for x in st] == ["classifier"] and st[0]["latency_ms"]["n"] >= 5 and "error" not in st[0]
    assert doc["data"]["n"] == 12 and doc["data"]["n_requested"] == 13
    assert doc["data"]["dedup_n"] == 12  # Testing/Training share no images here


def test_eval_list(arts: dict[str, Path], data_dir: Path, tmp_path: Path) -> None:
    ds = D.scan(data_dir)
    chosen = D.subset(D.dedup_eval(ds), 2, seed=5)
    lst = tmp_path / "dedup.txt"
    D.write_list(lst, chosen)
    doc = bench([arts["tflite-fp32"]], data_dir, out=tmp_path / "o", eval_list=lst, no_reference=True,
                options=BenchOptions(threads=1, **FAST))
    assert doc["data"]["split"] == "list:dedup.txt" and doc["data"]["n"] == 8
    assert doc["data"]["dedup_n"] is None and doc["results"][0]["dedup"] is None
    assert doc["_ids"] == [s.rel for s in chosen]
    with pytest.raises(BenchError, match="exists"):
        bench([arts["tflite-fp32"]], data_dir, out=tmp_path / "o", eval_list=lst, no_reference=True)
