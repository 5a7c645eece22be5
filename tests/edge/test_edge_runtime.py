"""The TensorFlow-free edge runtime: every artifact format runs, and TensorFlow is never imported.

Artifacts are converted from the tiny model (plumbing only: the runners' arithmetic is checked
against the Keras model on real scans, not the accuracy)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgebrain.artifact import load_manifest

# converts a model to three targets and runs each in subprocesses (make test, not make test-fast)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
# The TensorFlow-free modules (docs/interfaces.md) plus this issue's: Python 3.9 syntax, no TF import.
EDGE_MODULES = ["__init__", "preprocess", "imageio", "io", "errors", "artifact", "runtime", "progress", "doctor",
                "predict", "localize", "remote", "cli/__init__", "cli/predict"]


@pytest.fixture(scope="module")
def artifacts(tiny_model: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp32 TFLite, ONNX and OpenVINO IR artifacts of the tiny model from ``edgebrain convert``
    (TensorFlow runs here, in the test process; the runtime under test runs them in
    subprocesses without it)."""
    from edgebrain.convert import convert

    arts = convert(tiny_model, "tflite,onnx,openvino", "fp32", tmp_path_factory.mktemp("edge-artifacts"),
                   data=data_dir, verify_n=50)
    return {a.target: a.path for a in arts}


@pytest.fixture(scope="module")
def keras_probs(tiny_model: Path, data_dir: Path) -> tuple[list[Path], np.ndarray]:
    from edgebrain.imageio import load_for_model
    from edgebrain.modelcard import ModelCard
    from edgebrain.models import load_keras_model
    from edgebrain.train import predict_probs

    spec = ModelCard.find(tiny_model).preprocess  # type: ignore[union-attr]
    files = [sorted((data_dir / "Testing" / c).iterdir())[3] for c in CLASSES]
    x = np.stack([load_for_model(f, spec.size) for f in files])
    return files, predict_probs(load_keras_model(tiny_model), x, spec)


@pytest.mark.parametrize("target", ["tflite", "onnx", "openvino"])
def test_runner_matches_keras(artifacts: dict[str, Path], keras_probs: tuple[list[Path], np.ndarray],
                              target: str) -> None:
    from edgebrain.predict import Predictor

    files, want = keras_probs
    p = Predictor(artifacts[target], threads=1)
    got = np.array([[p.predict(f).probabilities[c] for c in CLASSES] for f in files])
    np.testing.assert_allclose(got, want, atol=1e-4)
    # batched inference (the occlusion maps use it) gives the same numbers as one at a time
    from edgebrain.imageio import load_for_model

    x = np.stack([load_for_model(f, p.size) for f in files] * 3)
    np.testing.assert_allclose(p.probabilities(x, batch_size=5), np.concatenate([want] * 3), atol=1e-4)


_SUBPROCESS = """
import json, sys
from edgebrain.predict import Predictor
p = Predictor(sys.argv[1], threads=1)
r = p.predict(sys.argv[2])
b = p.predict_many([sys.argv[2], sys.argv[2] + ".missing.jpg"])
from click.testing import CliRunner
from edgebrain.cli import cli
res = CliRunner().invoke(cli, ["predict", sys.argv[1], sys.argv[2], "--json", "--explain", sys.argv[3],
                               "--explain-budget-s", "0"])
print(json.dumps({"tensorflow": "tensorflow" in sys.modules, "label": r.label, "runtime": p.runner.name,
                  "batch": [len(b.predictions), len(b.failures)], "cli_exit": res.exit_code,
                  "tf_modules": sorted(m for m in sys.modules if m.startswith(("tensorflow", "tf_keras", "keras")))}))
"""


@pytest.mark.parametrize("target", ["tflite", "onnx", "openvino"])
def test_predicting_never_imports_tensorflow(artifacts: dict[str, Path], data_dir: Path, tmp_path: Path,
                                             target: str) -> None:
    img = sorted((data_dir / "Testing" / "pituitary").iterdir())[0]
    out = subprocess.run([sys.executable, "-c", _SUBPROCESS, str(artifacts[target]), str(img), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    assert rep["tensorflow"] is False and rep["tf_modules"] == [], rep
    assert rep["label"] in CLASSES and rep["batch"] == [1, 1] and rep["cli_exit"] == 0
    assert rep["runtime"].split()[0] == {"tflite": "ai-edge-litert", "onnx": "onnxruntime", "openvino": "openvino"}[target]
    assert (tmp_path / f"{img.stem}.occlusion.png").is_file()


def test_onnx_falls_back_to_openvino_when_onnxruntime_is_missing(artifacts: dict[str, Path],
                                                                 keras_probs: tuple[list[Path], np.ndarray],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from edgebrain import runtime
    from edgebrain.predict import Predictor

    class NoORT:
        def __init__(self, *a: object, **k: object) -> None:
            raise runtime.RuntimeUnavailable("onnxruntime is not installed")

    monkeypatch.setitem(runtime.RUNNERS, "onnx", NoORT)
    p = Predictor(artifacts["onnx"], threads=1)
    assert p.runner.name.startswith("openvino")
    files, want = keras_probs
    got = np.array([[p.predict(f).probabilities[c] for c in CLASSES] for f in files])
    np.testing.assert_allclose(got, want, atol=1e-4)

    monkeypatch.setitem(runtime.RUNNERS, "openvino", NoORT)
    with pytest.raises(runtime.RuntimeUnavailable, match="onnxruntime is not installed"):
        Predictor(artifacts["onnx"])


def test_openvino_precision_is_explicit(artifacts: dict[str, Path]) -> None:
    from edgebrain.runtime import load_runner

    r = load_runner(load_manifest(artifacts["openvino"]), threads=1)
    prec = str(r.inference_precision).lower()  # type: ignore[attr-defined]
    assert "float32" in prec or prec == "f32", prec  # never the bf16 default of AVX-512 bf16 CPUs


def test_runner_rejects_unknown_target(artifacts: dict[str, Path]) -> None:
    from edgebrain.artifact import Artifact
    from edgebrain.runtime import RuntimeUnavailable, load_runner

    art = load_manifest(artifacts["tflite"])
    bad = Artifact(art.path, {**art.manifest, "target": "coreml"})
    with pytest.raises(RuntimeUnavailable, match="coreml"):
        load_runner(bad)


@pytest.mark.parametrize("module", EDGE_MODULES)
def test_edge_modules_parse_as_python39(module: str) -> None:
    """The runtime must run on Raspberry Pi OS (Python 3.9): no 3.10+ syntax, postponed annotations."""
    src = (ROOT / "edge" / f"{module}.py").read_text()
    tree = ast.parse(src, feature_version=(3, 9))
    if module != "__main__":
        futures = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
        assert any(a.name == "annotations" for n in futures for a in n.names), module
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and any(k.arg == "strict" for k in node.keywords):
            assert not (isinstance(node.func, ast.Name) and node.func.id == "zip"), f"{module}: zip(strict=) is 3.10+"
