"""Bench statistics, the timing loop and the TensorFlow-free worker bundle (fast, no models)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgebrain.bench import bootstrap_ci, expected_calibration_error, mcnemar_exact
from edgebrain.remote import REMOTE_MODULES, build_runtime_zip, safe_extract, stats, time_loop


def test_bootstrap_ci_brackets_the_accuracy_with_the_binomial_width() -> None:
    correct = np.array([1] * 900 + [0] * 100)
    lo, hi = bootstrap_ci(correct, n_boot=4000, seed=1)
    assert lo < 0.9 < hi
    # binomial standard error 0.0095 -> a 95% interval about 3.7 pp wide
    assert 0.030 < hi - lo < 0.045
    lo2, hi2 = bootstrap_ci(correct[::10], n_boot=4000, seed=1)  # 10x fewer images: ~3x wider
    assert (hi2 - lo2) > 2.5 * (hi - lo)
    assert bootstrap_ci(correct, 500, seed=3) == bootstrap_ci(correct, 500, seed=3)


def test_mcnemar_exact_matches_the_binomial_tail() -> None:
    ref = np.array([True] * 10 + [False] * 2 + [True] * 50)
    new = np.array([False] * 10 + [True] * 2 + [True] * 50)
    m = mcnemar_exact(ref, new)
    assert (m["b"], m["c"]) == (10, 2)
    # two-sided exact: 2 * P(X <= 2), X ~ Bin(12, 0.5) = 2 * (1 + 12 + 66) / 4096
    assert m["p_value"] == pytest.approx(158 / 4096, rel=1e-9)
    same = mcnemar_exact(ref, ref)
    assert (same["b"], same["c"], same["p_value"]) == (0, 0, 1.0)


def test_ece_small_when_calibrated_and_large_when_overconfident() -> None:
    rng = np.random.default_rng(0)
    n = 20000
    conf = rng.uniform(0.3, 1.0, n)
    y = np.zeros(n, int)
    right = rng.uniform(size=n) < conf
    probs = np.zeros((n, 4))
    pred = np.where(right, 0, 1)
    probs[np.arange(n), pred] = conf
    other = (1 - conf) / 3
    for k in range(4):
        probs[:, k] = np.where(np.arange(4)[k] == pred, conf, other)
    assert expected_calibration_error(probs, y) < 0.03
    onehot = np.zeros((n, 4))
    onehot[np.arange(n), rng.integers(0, 2, n)] = 1.0  # always 100% sure, right half the time
    assert expected_calibration_error(onehot, y) == pytest.approx(0.5, abs=0.02)


def test_time_loop_needs_both_the_count_and_the_duration() -> None:
    times, secs = time_loop(lambda: time.sleep(0.002), min_runs=5, min_seconds=0.15)
    assert secs >= 0.15 and len(times) > 5  # duration-bound: many more than 5 runs
    assert all(t >= 1.9 for t in times)
    times, secs = time_loop(lambda: None, min_runs=40, min_seconds=0.0)
    assert len(times) == 40  # count-bound
    s = stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["p50"] == 3.0 and s["n"] == 5 and s["p90"] > s["p50"] and s["p99"] <= 100.0


def test_remote_worker_is_tensorflow_free() -> None:
    code = ("import sys, edgebrain.remote, edgebrain.runtime, edgebrain.doctor; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras', 'sklearn')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_runtime_zip_is_self_contained_and_importable(tmp_path: Path) -> None:
    z = build_runtime_zip(tmp_path / "edgebrain.zip")
    with zipfile.ZipFile(z) as zf:
        names = set(zf.namelist())
        assert names == {f"edgebrain/{m}.py" for m in REMOTE_MODULES}
        for n in names:  # every relative import resolves inside the zip
            tree = ast.parse(zf.read(n).decode())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                    assert f"edgebrain/{node.module.split('.')[0]}.py" in names, (n, node.module)
            for node in tree.body:  # module-level imports (preprocess.py imports TF lazily for tf tensors only)
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    assert not any(m.split(".")[0] in ("tensorflow", "tf_keras", "keras") for m in mods), n
    # Importable from the zip alone (-S: no site-packages edgebrain; numpy found via the explicit path).
    import numpy

    site = str(Path(numpy.__file__).parent.parent)
    code = (f"import sys; sys.path[:0] = [{str(z)!r}]; sys.path.append({site!r}); import edgebrain.remote as r; "
            "print(r.__file__); print('tensorflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    origin, tf_loaded = proc.stdout.split()
    assert origin.startswith(str(z)) and tf_loaded == "False"


def test_safe_extract_refuses_path_traversal(tmp_path: Path) -> None:
    import io
    import tarfile

    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as t:
        data = b"x"
        ti = tarfile.TarInfo("../escape.txt")
        ti.size = 1
        t.addfile(ti, io.BytesIO(data))
    from edgebrain.remote import WorkerError

    with pytest.raises(WorkerError, match="refusing"):
        safe_extract(bad, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_worker_reports_a_bad_job_instead_of_crashing(tmp_path: Path) -> None:
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"artifact": str(tmp_path / "nothing-here"), "manifest": None, "images": []}))
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "edgebrain.remote", "measure", str(job), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    res = json.loads(out.read_text())
    assert res["ok"] is False and "nothing-here" in res["error"] and "not found" in res["error"]


def test_bench_help_lists_the_options() -> None:
    from edgebrain.cli import cli

    res = CliRunner().invoke(cli, ["bench", "--help"])
    assert res.exit_code == 0, res.output
    for opt in ("--data", "--device", "--reference", "--out", "--eval-list", "--per-class", "--threads", "--cpus",
                "--preprocess", "--classes", "--ssh-identity", "--ssh-known-hosts", "--remote-python"):
        assert opt in res.output


def test_bench_help_is_fast_and_imports_nothing_heavy() -> None:
    code = ("import sys, time; t = time.time(); from edgebrain.cli import main; "
            "sys.argv = ['edgebrain', 'bench', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('tensorflow', 'numpy', 'sklearn', 'matplotlib', 'onnxruntime', 'openvino') "
            "if m in sys.modules]\nprint('HEAVY', heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr


def test_reference_device_label_comes_from_the_tensor_device() -> None:
    from edgebrain.bench import _device_label

    assert _device_label("/job:localhost/replica:0/task:0/device:GPU:0") == "GPU:0"
    assert _device_label("/job:localhost/replica:0/task:0/device:CPU:0") == "CPU:0"


def test_background_load_sees_another_busy_process() -> None:
    from edgebrain.remote import BackgroundLoad

    hog = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.3)
        meter = BackgroundLoad()
        time.sleep(1.0)
        share = meter.stop()
    finally:
        hog.wait(10)
    import os

    assert share is not None and share > 0.6 / (os.cpu_count() or 1)  # one busy process is ~1/ncpu of the machine


def test_agreement_mean_kl() -> None:
    """KL(ref || new) in nats: 0 for identical outputs, the textbook value otherwise, and larger
    for the output that moves more probability."""
    from edgebrain.metrics import agreement

    ref = np.array([[0.5, 0.5], [0.9, 0.1]])
    assert agreement(ref, ref)["mean_kl"] == pytest.approx(0.0, abs=1e-12)
    new = np.array([[0.25, 0.75], [0.9, 0.1]])
    expected = (0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)) / 2
    got = agreement(ref, new)
    assert got["mean_kl"] == pytest.approx(expected, rel=1e-9)
    assert got["top1_agreement"] == 0.5
    further = np.array([[0.1, 0.9], [0.9, 0.1]])
    assert agreement(ref, further)["mean_kl"] > got["mean_kl"]
    assert np.isfinite(agreement(ref, np.array([[1.0, 0.0], [1.0, 0.0]]))["mean_kl"])  # a zero is floored


class _PickyRunner:
    """A stand-in runtime that refuses some inputs: by pixel checksum, or everything but the very
    array object it was loaded with (the latency input)."""

    name = "picky"

    def __init__(self, refuse: set[float] | None = None, only_first_object: bool = False) -> None:
        self.refuse = refuse or set()
        self.only_first_object = only_first_object
        self.first: np.ndarray | None = None

    def run(self, x: np.ndarray) -> np.ndarray:
        if self.first is None:
            self.first = x
        key = round(float(np.asarray(x, np.float64).sum()), 3)
        if x.shape[0] != 1 or key in self.refuse or (self.only_first_object and x is not self.first):
            raise RuntimeError(f"refused input {key}")
        return np.full((x.shape[0], 4), 0.25, np.float32)


def _job(images: list[Path]) -> dict:
    timing = {"warmup": 1, "min_runs": 2, "min_seconds": 0.0, "batch": 4,
              "throughput_min_runs": 1, "throughput_min_seconds": 0.0}
    return {"images": [[p.name, str(p)] for p in images], "timing": timing, "label": "picky"}


def test_measure_names_each_image_the_runtime_refused_and_keeps_the_rest(data_dir: Path, tmp_path: Path) -> None:
    from edgebrain.imageio import load_for_model
    from edgebrain.preprocess import PreprocessSpec
    from edgebrain.remote import measure

    imgs = sorted((data_dir / "Testing" / "glioma").glob("*.jpg"))[:4]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    spec = PreprocessSpec(height=32, width=32)
    x_third = np.asarray(spec.apply(load_for_model(imgs[2], spec.size, spec.resize)), np.float64)
    runner = _PickyRunner(refuse={round(float(x_third.sum()), 3)})
    res = measure(_job([*imgs, broken]), lambda: runner, spec)
    assert res["ok"] is True
    problems = {f["file"]: f["problem"] for f in res["failed"]}
    assert set(problems) == {imgs[2].name, "broken.jpg"}
    assert problems[imgs[2].name].startswith("inference failed: RuntimeError: refused input")
    assert "inference" not in problems["broken.jpg"]
    assert res["ids"] == [imgs[0].name, imgs[1].name, imgs[3].name]
    assert len(res["probs"]) == 3
    assert res["throughput"]["batch"] == 1 and "not supported" in res["throughput"]["note"]


def test_measure_fails_clearly_when_no_image_could_be_run(data_dir: Path) -> None:
    from edgebrain.preprocess import PreprocessSpec
    from edgebrain.remote import WorkerError, measure

    imgs = sorted((data_dir / "Testing" / "meningioma").glob("*.jpg"))[:3]
    # Load and latency calls pass (they reuse the latency input); every per-image call is refused.
    runner = _PickyRunner(only_first_object=True)
    with pytest.raises(WorkerError, match=rf"no image could be run: {imgs[0].name}: inference failed"):
        measure(_job(imgs), lambda: runner, PreprocessSpec(height=32, width=32))
