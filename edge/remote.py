"""The benchmark worker: measures one artifact in a fresh process, here or on a device.

TensorFlow-free (it ships to devices inside a zip of the edge modules, see
:func:`build_runtime_zip`). Two entry points::

    python -m edgebrain.remote measure JOB.json OUT.json        # one artifact, this process
    python -m edgebrain.remote run-bundle JOB.tar WORKDIR OUT.json  # every job in a bundle,
                                                                  # each in a fresh process

A job (JSON) names the artifact, the images, the threads / CPU affinity and the timing
rules. The worker, in order: pins the CPUs, decodes the first image, measures cold start
(runner load + first inference), warms up, times model-only batch-1 latency until both a
minimum count *and* a minimum duration are reached, measures throughput at a larger batch,
then runs every image from its file (decode + preprocess + infer, timed per image) and
returns the class probabilities, the timings, peak RSS and the device fingerprint. The
probabilities go back to the host, which computes the metrics.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tarfile
import time
import traceback
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from .artifact import Artifact, load_manifest
from .errors import EdgebrainError, ImageLoadError, IntegrityError
from .imageio import load_for_model
from .io import sha256_file
from .preprocess import PreprocessSpec
from .runtime import bound_call

T = TypeVar("T")

#: The TensorFlow-free modules a device needs (shipped as edgebrain/<name>.py in a zip).
REMOTE_MODULES = ("__init__", "preprocess", "imageio", "io", "errors", "artifact", "signing", "runtime", "progress",
                  "doctor", "remote")
RESULT_VERSION = 1

DEFAULT_TIMING: dict[str, Any] = {
    "warmup": 10,  # batch-1 runs before timing
    "min_runs": 50,  # timed batch-1 runs: at least this many ...
    "min_seconds": 3.0,  # ... and for at least this long
    "batch": 8,  # throughput batch size
    "throughput_min_runs": 5,
    "throughput_min_seconds": 2.0,
}


class WorkerError(EdgebrainError):
    pass


# ----------------------------------------------------------------------------- small helpers


def _progress(items: Sequence[T], description: str) -> Iterator[T]:
    """edgebrain.progress.track when rich is there (devices may not have it), else plain.

    ``EDGEBRAIN_PROGRESS=lines`` prints plain ``description: k/N`` lines (about every 10 %)
    instead: what an ssh run on a device streams back to the host."""
    if os.environ.get("EDGEBRAIN_PROGRESS") == "lines":
        n = len(items)
        step = max(1, n // 10)
        t0 = time.perf_counter()
        for k, it in enumerate(items, 1):
            yield it
            if k % step == 0 or k == n:
                print(f"{description}: {k}/{n} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        return
    try:
        import rich  # noqa: F401

        from .progress import track

        yield from track(items, description=description, total=len(items))
    except ImportError:
        yield from items


def set_affinity(cpus: Sequence[int] | None) -> list[int] | None:
    """Pin this process (and the threads it starts later) to ``cpus``; return the CPUs in use."""
    if cpus:
        if not hasattr(os, "sched_setaffinity"):
            raise WorkerError(f"--cpus is not supported on {platform.system()} (no sched_setaffinity)")
        try:
            os.sched_setaffinity(0, [int(c) for c in cpus])
        except (OSError, ValueError) as exc:
            have = sorted(os.sched_getaffinity(0))
            raise WorkerError(f"cannot pin to CPUs {list(cpus)} ({exc}); this device has CPUs {have}") from exc
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return None


def _proc_status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_mb() -> float | None:
    """Resident set size now (MB)."""
    return _proc_status_mb("VmRSS")


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process so far (MB)."""
    v = _proc_status_mb("VmHWM")
    if v is not None:
        return v
    try:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0
    except (ImportError, OSError):
        return None


class BackgroundLoad:
    """How busy the machine's CPUs were with *other* processes while we timed (Linux /proc/stat).

    ``stop()`` returns the fraction of all CPUs' time (0..1) used by everything except this
    process between start and stop, or None where /proc/stat is unavailable. Anything above a
    few percent means the latency figures include contention.
    """

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.busy0 = self._busy_s()
        self.self0 = self._self_s()

    @staticmethod
    def _busy_s() -> float | None:
        try:
            with open("/proc/stat", encoding="ascii") as fh:
                parts = fh.readline().split()
            v = [int(x) for x in parts[1:9]]  # user nice system idle iowait irq softirq steal
            return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    @staticmethod
    def _self_s() -> float:
        t = os.times()
        return t.user + t.system

    def stop(self) -> float | None:
        busy1 = self._busy_s()
        if self.busy0 is None or busy1 is None:
            return None
        wall = time.perf_counter() - self.t0
        ncpu = os.cpu_count() or 1  # the "cpu" line of /proc/stat sums every CPU of the machine
        other = (busy1 - self.busy0) - (self._self_s() - self.self0)
        return round(min(1.0, max(0.0, other / (wall * ncpu))), 4) if wall > 0 else None


def stats(ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(ms, np.float64)
    if a.size == 0:
        raise WorkerError("no timings")
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean()),
            "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "min": float(a.min()), "max": float(a.max()),
            "n": int(a.size)}


def time_loop(fn: Callable[[], Any], min_runs: int, min_seconds: float) -> tuple[list[float], float]:
    """Call ``fn`` until at least ``min_runs`` calls *and* ``min_seconds`` have passed.
    Returns the per-call times (ms) and the total elapsed seconds."""
    times: list[float] = []
    clock = time.perf_counter
    start = clock()
    while True:
        t0 = clock()
        fn()
        t1 = clock()
        times.append((t1 - t0) * 1e3)
        if len(times) >= min_runs and (t1 - start) >= min_seconds:
            return times, t1 - start


_PRECISION_NAMES = {"float32": "f32", "f32": "f32", "bfloat16": "bf16", "bf16": "bf16", "float16": "f16",
                    "f16": "f16", "i8": "i8", "int8": "i8", "u8": "u8"}


def _precision_name(v: Any) -> str | None:
    """OpenVINO's element type (e.g. "<Type: 'float32'>") -> "f32" / "bf16" / "f16"."""
    if v is None:
        return None
    s = str(v)
    for token in s.replace("'", " ").replace("<", " ").replace(">", " ").replace(":", " ").split():
        if token.lower() in _PRECISION_NAMES:
            return _PRECISION_NAMES[token.lower()]
    return s


def runtime_identity() -> dict[str, Any]:
    """Where this worker's edgebrain code came from, and whether TensorFlow got imported."""
    return {"edgebrain_origin": str(Path(__file__).resolve()) if "__file__" in globals() else None,
            "tensorflow_imported": "tensorflow" in sys.modules, "python_executable": sys.executable}


# ----------------------------------------------------------------------------- measurement


def _resolve(base: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else base / q


def measure(job: dict[str, Any], make_runner: Callable[[], Any], spec: PreprocessSpec,
            base: Path = Path(".")) -> dict[str, Any]:
    """The measurements for one model (see the module docstring). ``make_runner`` loads it."""
    timing = {**DEFAULT_TIMING, **(job.get("timing") or {})}
    images = [(str(i), _resolve(base, p)) for i, p in job["images"]]
    if not images:
        raise WorkerError("no images to run")
    size = spec.size
    failed: list[dict[str, str]] = []

    def prep(path: Path) -> np.ndarray:
        return np.asarray(spec.apply(load_for_model(path, size, spec.resize)), np.float32)[None]

    # The latency input: the first image that decodes (real data, not zeros).
    x0 = None
    for _, p in images:
        try:
            x0 = prep(p)
            break
        except ImageLoadError:
            continue
    if x0 is None:
        raise WorkerError(f"none of the {len(images)} images could be decoded (first: {images[0][1]})")

    rss_before = rss_mb()
    t0 = time.perf_counter()
    runner = make_runner()
    t1 = time.perf_counter()
    y0 = runner.run(x0)
    t2 = time.perf_counter()
    rss_loaded = rss_mb()
    n_classes = int(np.asarray(y0).shape[-1])

    # Model-only latency: the inference call with the input bound, as the runtimes' own tools time it.
    call = bound_call(runner, x0)
    for _ in range(int(timing["warmup"])):
        call()
    meter = BackgroundLoad()
    lat, lat_s = time_loop(call, int(timing["min_runs"]), float(timing["min_seconds"]))
    background = meter.stop()

    # Throughput: a larger batch of distinct real images; batch 1 when the model's batch is fixed.
    batch = max(1, int(timing["batch"]))
    tp: dict[str, Any] = {"batch": batch}
    if batch > 1:
        xs: list[np.ndarray] = []
        for _, p in images:
            if len(xs) >= batch:
                break
            try:
                xs.append(prep(p))
            except ImageLoadError:
                pass
        while len(xs) < batch:
            xs.append(x0)
        xb = np.concatenate(xs[:batch])
        try:
            yb = runner.run(xb)
            if np.asarray(yb).shape[0] != batch:
                raise WorkerError(f"batch {batch} returned {np.asarray(yb).shape[0]} rows")
        except Exception as exc:  # a fixed-batch model: fall back to sequential batch 1
            tp = {"batch": 1, "note": f"batch {batch} not supported by this model ({type(exc).__name__}); "
                                      "throughput is sequential batch 1"}
            runner.run(x0)
    if tp["batch"] > 1:
        runner.run(xb)  # warm the new shape
        times, secs = time_loop(lambda: runner.run(xb), int(timing["throughput_min_runs"]),
                                float(timing["throughput_min_seconds"]))
    else:
        times, secs = time_loop(lambda: runner.run(x0), int(timing["throughput_min_runs"]),
                                float(timing["throughput_min_seconds"]))
    tp.update({"runs": len(times), "seconds": secs, "images_per_s": tp["batch"] * len(times) / secs})
    if tp["batch"] > 1:
        runner.run(x0)  # back to batch 1 before the per-image pass

    # Every image from its file: decode + preprocess + infer, timed per image.
    ids: list[str] = []
    probs: list[list[float]] = []
    e2e: list[float] = []
    dec: list[float] = []
    inf: list[float] = []
    clock = time.perf_counter
    for ident, p in _progress(images, f"{job.get('label', 'model')}: {len(images)} images"):
        a = clock()
        try:
            x = prep(p)
        except ImageLoadError as exc:
            failed.append({"file": ident, "problem": exc.reason})
            continue
        b = clock()
        try:
            y = runner.run(x)
        except Exception as exc:  # one image the runtime cannot take must not lose the rest
            failed.append({"file": ident, "problem": f"inference failed: {type(exc).__name__}: {exc}"[:500]})
            continue
        c = clock()
        ids.append(ident)
        probs.append([float(v) for v in np.asarray(y, np.float64)[0]])
        e2e.append((c - a) * 1e3)
        dec.append((b - a) * 1e3)
        inf.append((c - b) * 1e3)

    if images and not ids:
        raise WorkerError(f"no image could be run: {failed[0]['file']}: {failed[0]['problem']}")
    from .doctor import fingerprint

    out: dict[str, Any] = {
        "ok": True,
        "result_version": RESULT_VERSION,
        "label": job.get("label"),
        "runtime": getattr(runner, "name", type(runner).__name__),
        "ran_on": getattr(runner, "device", "CPU"),
        "execution_precision": _precision_name(getattr(runner, "inference_precision", None)),
        "n_classes": n_classes,
        "cold_start_ms": (t2 - t0) * 1e3,
        "load_ms": (t1 - t0) * 1e3,
        "first_infer_ms": (t2 - t1) * 1e3,
        "warmup": int(timing["warmup"]),
        "latency_ms": stats(lat),
        "latency_seconds": lat_s,
        "background_cpu": background,
        "throughput": tp,
        "throughput_ips": tp["images_per_s"],
        "e2e_ms": stats(e2e) if e2e else None,
        "decode_ms": stats(dec) if dec else None,
        "infer_ms": stats(inf) if inf else None,
        "ids": ids,
        "probs": probs,
        "failed": failed,
        "rss_mb": {"before_load": rss_before, "after_load": rss_loaded, "peak": peak_rss_mb()},
        "fingerprint": fingerprint(),
        **runtime_identity(),
    }
    return out


def _artifact_for_job(job: dict[str, Any], base: Path) -> Artifact:
    """Load the job's artifact, hash-checked here (on the device, after the copy)."""
    path = _resolve(base, job["artifact"])
    if not path.exists():
        raise IntegrityError(f"{path}: artifact not found on this device")
    if job.get("manifest") is None:
        art = load_manifest(path)  # refuses modified files
    else:  # a raw model file from elsewhere: the host computed the manifest, check the hashes
        folder = path if path.is_dir() else path.parent
        art = Artifact(folder, dict(job["manifest"]))
        for rel, want in (art.manifest.get("files") or {}).items():
            got = sha256_file(folder / rel)
            if got != want:
                raise IntegrityError(f"{folder / rel}: sha256 {got[:12]}… differs from {want[:12]}… "
                                     "(changed since the benchmark started, or a bad copy)")
    want = job.get("expected_sha256")
    if want and art.manifest.get("artifact_sha256") != want:
        raise IntegrityError(f"{path}: artifact_sha256 differs from what the host checked")
    return art


def measure_job(job: dict[str, Any], base: Path) -> dict[str, Any]:
    """Run one artifact job (affinity first, so runtime thread pools inherit it)."""
    cpus_in_use = set_affinity(job.get("cpus"))
    threads = job.get("threads") or (len(cpus_in_use) if cpus_in_use else os.cpu_count())
    art = _artifact_for_job(job, base)
    from .runtime import load_runner

    opts = dict(job.get("runtime_options") or {})
    res = measure(job, lambda: load_runner(art, threads=threads, **opts), art.preprocess, base)
    res.update({"threads": threads, "cpus": cpus_in_use, "runtime_options": opts})
    stages = (art.manifest.get("pipeline") or {}).get("stages") or []
    if stages:
        res["stages"] = measure_stages(art, stages, threads, opts, {**DEFAULT_TIMING, **(job.get("timing") or {})})
    return res


def measure_stages(art: Artifact, stages: Sequence[dict[str, Any]], threads: int | None, opts: dict[str, Any],
                   timing: dict[str, Any]) -> list[dict[str, Any]]:
    """Model-only batch-1 latency of each stage file of a multi-stage artifact (same runner type).
    Input content does not change a CNN's latency: a fixed pseudo-random tensor of the stage's shape."""
    from .runtime import RUNNERS

    out: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    for st in stages:
        rec: dict[str, Any] = {"name": st.get("name"), "model_file": st.get("model_file"),
                               "precision": st.get("precision"), "input_shape": st.get("input_shape")}
        try:
            shape = [int(v) for v in st["input_shape"]]
            x = rng.random((1, *shape), dtype=np.float32)
            # the stage's own runtime options (e.g. OpenVINO's inference precision), else the artifact's;
            # the job's (device profile) options override both, as for the whole model
            sopts = {**(art.manifest.get("runtime_options") or {}), **(st.get("runtime_options") or {}),
                     **{k: v for k, v in opts.items() if v is not None}}
            runner = RUNNERS[art.target](art.path / st["model_file"], threads=threads, **sopts)
            runner.run(x)
            call = bound_call(runner, x)
            for _ in range(int(timing["warmup"])):
                call()
            lat, secs = time_loop(call, int(timing["min_runs"]), float(timing["min_seconds"]))
            rec.update({"latency_ms": stats(lat), "latency_s": secs,
                        "execution_precision": _precision_name(getattr(runner, "inference_precision", None))})
        except Exception as exc:  # one stage failing to time is reported, the artifact's figures stand
            rec["error"] = f"{type(exc).__name__}: {exc}"
        out.append(rec)
    return out


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj), encoding="utf-8")
    os.replace(tmp, path)


def worker_main(job_path: str, out_path: str,
                run: Callable[[dict[str, Any], Path], dict[str, Any]] = measure_job) -> int:
    """Measure one job; always leave an answer in ``out_path`` (an error is an answer)."""
    jp = Path(job_path)
    try:
        job = json.loads(jp.read_text(encoding="utf-8"))
        res = run(job, jp.parent)
        code = 0
    except Exception as exc:
        msg = str(exc) if isinstance(exc, EdgebrainError) else f"{type(exc).__name__}: {exc}"
        res = {"ok": False, "error": msg, "traceback": traceback.format_exc()[-4000:], **runtime_identity()}
        code = 3
    _write_json(Path(out_path), res)
    return code


# ----------------------------------------------------------------------------- many jobs


def run_jobs(jobdir: Path, job_files: Sequence[str], worker: Sequence[str] | None = None,
             timeout: float | None = None, env: dict[str, str] | None = None,
             describe: Callable[[str, dict[str, Any]], str] | None = None) -> list[dict[str, Any]]:
    """Each job in a fresh subprocess (so RSS and cold start are its own). Never raises for one
    bad job: its answer says what went wrong."""
    worker = list(worker or [sys.executable, "-m", "edgebrain.remote", "measure"])
    results: list[dict[str, Any]] = []
    for jf in _progress(list(job_files), f"benchmarking {len(job_files)} model(s)"):
        job_path = jobdir / jf
        out_path = jobdir / (Path(jf).stem + ".result.json")
        if out_path.exists():
            out_path.unlink()
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([*worker, str(job_path), str(out_path)], stdin=subprocess.DEVNULL,
                                  env=env, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
        wall = time.perf_counter() - t0
        if out_path.is_file():
            res = json.loads(out_path.read_text(encoding="utf-8"))
        elif rc is None:
            res = {"ok": False, "error": f"timed out after {timeout:.0f} s"}
        else:
            res = {"ok": False, "error": f"the worker process died (exit code {rc}"
                                         f"{', a crash in the runtime' if rc and rc < 0 else ''}) "
                                         "before writing a result"}
        res["job"] = jf
        res["worker_wall_s"] = wall
        res.setdefault("label", jf)
        results.append(res)
        if describe:
            print(describe(jf, res), file=sys.stderr, flush=True)
    return results


def safe_extract(tar_path: Path, dest: Path) -> None:
    """Extract a bundle, refusing absolute paths, '..', links and devices."""
    dest = dest.resolve()
    with tarfile.open(tar_path, "r") as tf:
        for m in tf.getmembers():
            target = (dest / m.name).resolve()
            if not (m.isfile() or m.isdir()) or (target != dest and dest not in target.parents):
                raise WorkerError(f"{tar_path}: refusing bundle member {m.name!r}")
        if sys.version_info >= (3, 12):
            tf.extractall(dest, filter="data")
        else:  # members were checked above
            tf.extractall(dest)  # noqa: S202


def _describe(jf: str, res: dict[str, Any]) -> str:
    what = res.get("label") or jf
    if not res.get("ok"):
        return f"[device] {what}: FAILED: {str(res.get('error'))[:300]}"
    return (f"[device] {what}: p50 {res['latency_ms']['p50']:.2f} ms, {len(res.get('ids', []))} images, "
            f"{res.get('worker_wall_s', 0):.1f} s")


def run_bundle(bundle: str, workdir: str, out: str) -> int:
    """On the device: unpack the bundle and run every job, each in a fresh process."""
    wd = Path(workdir)
    jobdir = wd / "job"
    jobdir.mkdir(parents=True, exist_ok=True)
    safe_extract(Path(bundle), jobdir)
    spec = json.loads((jobdir / "jobs.json").read_text(encoding="utf-8"))
    jobs, timeout = (spec, None) if isinstance(spec, list) else (spec["jobs"], spec.get("timeout"))
    env = dict(os.environ)
    env.setdefault("EDGEBRAIN_QUIET", "1")
    results = run_jobs(jobdir, jobs, env=env, describe=_describe, timeout=timeout)
    from .doctor import fingerprint

    _write_json(Path(out), {"results": results, "fingerprint": fingerprint(), **runtime_identity()})
    # A job that failed is in the results (with its error); the bundle itself ran.
    return 0


# ----------------------------------------------------------------------------- shipping


def build_runtime_zip(dest: str | Path) -> Path:
    """A zip of the TensorFlow-free edge modules, importable with ``sys.path``/``PYTHONPATH``."""
    src = Path(__file__).resolve().parent
    dest = Path(dest)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        for name in REMOTE_MODULES:
            f = src / f"{name}.py"
            if not f.is_file():
                raise WorkerError(f"edge module {f} is missing; cannot build the device bundle")
            z.writestr(f"edgebrain/{name}.py", f.read_text(encoding="utf-8"))
    return dest


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: python -m edgebrain.remote measure JOB.json OUT.json\n"
             "       python -m edgebrain.remote run-bundle BUNDLE.tar WORKDIR OUT.json")
    if len(args) == 3 and args[0] == "measure":
        return worker_main(args[1], args[2])
    if len(args) == 4 and args[0] == "run-bundle":
        try:
            return run_bundle(args[1], args[2], args[3])
        except Exception as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
