"""``edgebrain predict ARTIFACT IMAGE_OR_DIR... [--json] [--top-k K] [--explain DIR]``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import click

from ..errors import EdgebrainError
from . import ct_options

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


class FatalError(click.ClickException):
    """Nothing could be classified (bad artifact, no images): exit 2, like a usage error."""

    exit_code = EXIT_USAGE


def _line(p: Any) -> str:
    tops = ", ".join(f"{k} {v:.1%}" for k, v in p.top_k)
    return f"{p.file}: {p.label} ({p.probability:.1%})  [{tops}]  {p.latency_ms:.1f} ms"


def _unique_stem(path: str, used: set[str]) -> str:
    stem = Path(path).stem or "image"
    name, n = stem, 2
    while name in used:
        name, n = f"{stem}-{n}", n + 1
    used.add(name)
    return name


def _load_reference(path: Path, threads: int | None, want_size: tuple[int, int]) -> Any:
    """An FP32 artifact folder -> Predictor; a .keras/.h5 model -> tf-keras model (needs TensorFlow)."""
    from ..artifact import is_artifact_dir

    if (path.is_dir() and is_artifact_dir(path)) or path.name == "manifest.json":
        from ..predict import Predictor

        ref: Any = Predictor(path, threads=threads)
        size = tuple(ref.size)
    elif path.suffix in (".keras", ".h5", ".hdf5") or path.is_dir():
        try:
            from ..converters.source import load_keras
        except ImportError as exc:
            raise FatalError(f"--explain-reference {path}: a Keras model needs the full install "
                             f"(TensorFlow): pip install 'edgebrain[full]' ({exc})") from exc
        ref = load_keras(path)[1]  # tf-keras or Keras 3
        size = tuple(int(d) for d in ref.input_shape[1:3])
    else:
        raise FatalError(f"--explain-reference {path}: expected an artifact folder or a .keras model")
    if size != tuple(want_size):
        raise FatalError(f"--explain-reference {path}: input size {size} differs from the artifact's "
                         f"{tuple(want_size)}; the maps would not be comparable")
    return ref


@click.command(name="predict")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout instead of lines.")
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many classes to list per image.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Interpreter threads (default: all cores).")
@click.option("--no-recursive", is_flag=True, help="Do not descend into sub-folders of IMAGE_OR_DIR.")
@click.option("--explain", "explain_dir", type=click.Path(path_type=Path), default=None,
              help="Write heatmap + box overlays (PNG) of the predicted class into this folder.")
@click.option("--explain-budget-s", type=click.FloatRange(min=0.0), default=10.0, show_default=True,
              help="Time budget per image for the occlusion map (the coarsest pass always runs).")
@click.option("--explain-patch", type=click.FloatRange(min=0.02, max=1.0), default=0.2, show_default=True,
              help="Occlusion patch side as a fraction of the model input.")
@click.option("--explain-reference", type=click.Path(path_type=Path), default=None,
              help="FP32 model to compare maps with: an artifact folder, or a .keras model (full install; "
                   "adds Grad-CAM). Reports the saliency drift and box IoU.")
@click.option("--verify-with", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Ed25519 public key (PEM or ssh-ed25519): refuse the artifact unless its manifest is signed "
                   "by this key (convert --sign).")
@click.option("--preprocess", default=None,
              help="For a raw .tflite/.onnx/.xml file without a manifest: rescale | xception | caffe | imagenet | "
                   "meanstd:M,M,M/S,S,S.")
@click.option("--classes", default=None,
              help="For a raw model file: class names in output order, comma-separated.")
@click.option("--input-size", type=click.IntRange(min=1), default=None,
              help="For a raw model file whose input size is dynamic.")
@ct_options("the MRI files", "the IMAGE_OR_DIR folder")
def command(artifact: Path, images: tuple[Path, ...], as_json: bool, top_k: int, threads: int | None,
            no_recursive: bool, explain_dir: Path | None, explain_budget_s: float, explain_patch: float,
            explain_reference: Path | None, verify_with: Path | None, preprocess: str | None, classes: str | None,
            input_size: int | None, ct_dir: Path | None, ct_csv: Path | None) -> None:
    """Classify IMAGE_OR_DIR... (JPEG, PNG, BMP, TIFF or DICOM; greyscale or RGB; any size) with
    the edge ARTIFACT, without TensorFlow. Folders are walked for image files.

    The input size, preprocessing and class names come from the artifact's manifest, whose
    hashes are checked first (a raw .tflite/.onnx/.xml file without one needs --preprocess and
    --classes, and --input-size when its input size is dynamic). Prints label, probabilities and latency (decode + preprocess +
    inference) per image. A file that cannot be read is reported by name and the others go on.

    \b
    A model trained on fused MRI+CT input (edgebrain train --fuse; the manifest records the
    fusion) needs --ct-dir or --ct-csv: each MRI is paired with its CT image, fused as the
    manifest says and classified; an MRI without a CT partner is reported by name and the
    others go on. Such a model is refused without them, and a plain model is refused with them.

    \b
    Exit status: 0 every image classified, 1 some images failed,
                 2 usage error (bad artifact or options, no images found).
    """
    from ..predict import Failure, Predictor, find_images
    from ..progress import track

    try:
        predictor = Predictor(_artifact_or_raw(artifact, preprocess, classes, input_size), threads=threads,
                              top_k=top_k, verify_with=verify_with)
        fusion = _fusion_check(predictor, ct_dir, ct_csv, explain_dir)
    except (EdgebrainError, OSError, ValueError) as exc:
        raise FatalError(str(exc)) from exc
    found, failures, skipped = find_images(images, recursive=not no_recursive)
    if not found and not failures:
        raise FatalError("no image files found in " + ", ".join(str(p) for p in images)
                         + (f" ({len(skipped)} other files skipped)" if skipped else ""))
    for f in failures:
        click.echo(f"error: {f.file}: {f.error}", err=True)
    pairing: Any = None
    if fusion is not None:
        try:
            pairing = _Pairings(ct_dir, ct_csv, images)
        except EdgebrainError as exc:
            raise FatalError(str(exc)) from exc

    ref: Any = None
    if explain_dir is not None and explain_reference is not None:
        try:
            ref = _load_reference(explain_reference, threads, predictor.size)
        except EdgebrainError as exc:
            raise FatalError(str(exc)) from exc

    preds: list[Any] = []
    used: set[str] = set()
    explained: list[dict[str, Any]] = []
    it = track(found, description="predicting", total=len(found)) if as_json else found
    for path in it:
        if pairing is not None:
            res = pairing.predict(predictor, path, top_k)
            if isinstance(res, Failure):
                failures.append(res)
                click.echo(f"error: {res.file}: {res.error}", err=True)
                continue
            pred = res
        elif explain_dir is None:
            res = next(iter(predictor.iter_predict([path], top_k)))
            if isinstance(res, Failure):
                failures.append(res)
                click.echo(f"error: {res.file}: {res.error}", err=True)
                continue
            pred = res
        else:
            try:
                pred = _explain_one(predictor, path, explain_dir, explain_budget_s, explain_patch, ref, top_k,
                                    used, explained)
            except EdgebrainError as exc:
                reason = getattr(exc, "reason", str(exc))
                failures.append(Failure(str(path), reason))
                click.echo(f"error: {path}: {reason}", err=True)
                continue
        preds.append(pred)
        if not as_json:
            click.echo(_line(pred))

    if explain_dir is not None and explained:
        from ..io import atomic_write_json

        atomic_write_json(explain_dir / "explanations.json",
                          {"artifact": predictor.describe(), "reference": str(explain_reference or "") or None,
                           "images": explained})

    lat = [p.latency_ms for p in preds]
    summary = {"images": len(preds) + len(failures), "ok": len(preds), "failed": len(failures),
               "skipped": len(skipped), "latency_ms_median": round(statistics.median(lat), 3) if lat else None}
    if as_json:
        doc = {"artifact": predictor.describe(), "predictions": [p.to_dict() for p in preds],
               "failures": [f.to_dict() for f in failures], "skipped": skipped, "summary": summary}
        if fusion is not None:
            doc["fusion"] = {**fusion.to_dict(), **pairing.describe()}
        if explain_dir is not None:
            doc["explain_dir"] = str(explain_dir)
        click.echo(json.dumps(doc, indent=2))
    else:
        med = f"; median {summary['latency_ms_median']:.1f} ms/image" if lat else ""
        click.echo(f"{len(preds)} classified, {len(failures)} failed{med} "
                   f"({predictor.runner.name}, {predictor.artifact.target}/{predictor.artifact.precision})",
                   err=True)
    if failures:
        click.get_current_context().exit(EXIT_SOME_FAILED)


def _artifact_or_raw(path: Path, preprocess: str | None, classes: str | None, input_size: int | None) -> Any:
    """An artifact folder/manifest as it is; a raw model file without a manifest -> an Artifact
    described by --preprocess/--classes/--input-size (which are refused for a real artifact)."""
    from ..artifact import is_artifact_dir, raw_artifact

    raw = path.is_file() and path.suffix.lower() in (".tflite", ".onnx", ".xml") and not is_artifact_dir(path.parent)
    given = [n for n, v in (("--preprocess", preprocess), ("--classes", classes), ("--input-size", input_size))
             if v is not None]
    if not raw:
        if given:
            raise EdgebrainError(f"{path}: {', '.join(given)} are for raw model files; an artifact's manifest "
                                 "already says them")
        return path
    from ..bench import _spec_for_raw

    spec = _spec_for_raw(path, preprocess, input_size, "raw model file")
    names = [c.strip() for c in (classes or "").split(",") if c.strip()]
    if not names:
        raise EdgebrainError(f"{path}: a raw model file needs --classes (comma-separated, in output order)")
    return raw_artifact(path, spec, names)


def _fusion_check(predictor: Any, ct_dir: Path | None, ct_csv: Path | None, explain_dir: Path | None) -> Any:
    """The artifact's fusion (None for plain MRI); refuses a mismatch with the CT options."""
    from ..fusion import require_fused_input, require_plain_input

    what = str(predictor.artifact.path)
    if ct_dir is None and ct_csv is None:
        require_plain_input(predictor.artifact, what=what)
        return None
    fusion = require_fused_input(predictor.artifact, what=what)
    if explain_dir is not None:
        raise EdgebrainError("--explain works on plain MRI inputs only; it does not take fused MRI+CT pairs")
    return fusion


class _Pairings:
    """CT partners for the MRI files found under each IMAGE_OR_DIR argument: pairing by relative
    path and the CSV's 'mri' column are relative to the folder argument the file was found in
    (files given directly: the current folder)."""

    def __init__(self, ct_dir: Path | None, ct_csv: Path | None, inputs: tuple[Path, ...]) -> None:
        from ..fusion import CTPairing

        self.ct_dir, self.ct_csv = ct_dir, ct_csv
        # deepest folder first: a file belongs to the most specific folder argument
        self.roots = sorted({Path(p).absolute() for p in inputs if Path(p).is_dir()}, key=lambda r: -len(r.parts))
        self._by_root: dict[Path, Any] = {}
        first = self.roots[0] if self.roots else Path.cwd()
        self._by_root[first] = CTPairing(ct_dir, ct_csv, mri_root=first)  # checks the CT folder / CSV now
        self._first = self._by_root[first]

    def _for(self, path: Path) -> Any:
        from ..fusion import CTPairing

        rp = path.absolute()
        root = next((r for r in self.roots if r in rp.parents), Path.cwd())
        if root not in self._by_root:
            self._by_root[root] = CTPairing(self.ct_dir, self.ct_csv, mri_root=root)
        return self._by_root[root]

    def predict(self, predictor: Any, path: Path, top_k: int) -> Any:
        from ..predict import Failure

        ct, problem = self._for(Path(path)).partner(Path(path).absolute())
        if ct is None:
            return Failure(str(path), str(problem))
        try:
            return predictor.predict_fused(path, ct, top_k, name=str(path))
        except EdgebrainError as exc:
            return Failure(str(path), getattr(exc, "reason", str(exc)))
        except Exception as exc:  # one bad pair never ends the run; the reason is kept
            return Failure(str(path), f"{type(exc).__name__}: {exc}")

    def describe(self) -> dict[str, Any]:
        return dict(self._first.describe())


def _explain_one(predictor: Any, path: Path, out: Path, budget_s: float, patch: float, ref: Any,
                 top_k: int, used: set[str], explained: list[dict[str, Any]]) -> Any:
    from ..localize import explain, write_overlay

    res = explain(predictor, path, budget_s=budget_s, patch=patch, reference=ref, top_k=top_k)
    pred = res.prediction
    stem = _unique_stem(str(path), used)
    files: dict[str, str] = {}
    title = f"{pred.label} {pred.probability:.0%} | occlusion ({predictor.artifact.precision})"
    if res.occlusion.box is None:
        title += " | no region changes it"
    files["occlusion"] = str(write_overlay(out / f"{stem}.occlusion.png", res.original, res.occlusion, title))
    if res.reference is not None:
        files["reference_occlusion"] = str(write_overlay(
            out / f"{stem}.reference-occlusion.png", res.original, res.reference,
            f"{pred.label} | occlusion (reference)"))
    if res.gradcam is not None:
        files["gradcam"] = str(write_overlay(out / f"{stem}.gradcam.png", res.original, res.gradcam,
                                             f"{pred.label} | Grad-CAM (reference)"))
    info = {**res.to_dict(), "files": files}
    pred.explanation = info
    explained.append({"file": str(path), "label": pred.label, **info})
    return pred
