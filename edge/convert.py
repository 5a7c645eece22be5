"""``edgebrain convert``: prune, quantise and convert a model into verified artifact folders.

One folder per (target, precision) under ``out``: the model file(s) plus ``manifest.json``
(source and artifact sha256, quantisation settings, the calibration manifest, pruning
report, preprocessing and classes from the model card, op counts, verification against the
source model, tool versions and the command line). Every artifact is verified right after
it is written: the validation split (or ``verify_n`` images of it) runs through the
artifact's edge runner and through the source model; an artifact whose top-1 agreement is
below ``min_agreement`` is moved aside to ``<name>.rejected`` (its manifest says so, and
``load_manifest`` refuses it) and the command fails. A model trained on fused MRI+CT input is
calibrated, verified and pruned on fused pairs (``ct_dir`` / ``ct_csv``, default the model card's).

Folders are built under temporary names and renamed when complete (edgebrain.io.atomic_dir):
a killed conversion never leaves a folder that looks like a finished artifact.
"""

from __future__ import annotations

import datetime as _dt
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import data as D
from .artifact import Artifact, load_manifest, write_manifest
from .errors import DataError, EdgebrainError
from .io import atomic_dir, atomic_write_json, environment_facts, sha256_file
from .memory import MB, PeakRSS
from .progress import BudgetExpired, Deadline, enabled, track

if TYPE_CHECKING:
    from edgebrain.calibration import CalibrationSet
    from edgebrain.converters.base import BuildContext, Target
    from edgebrain.converters.source import Source

DEFAULT_CALIB_SIZE = 256
DEFAULT_CALIB_SEED = 0
DEFAULT_MIN_AGREEMENT = 0.99
DEFAULT_INT8_FALLBACK_BELOW = 0.995
DEFAULT_PRUNE_EPOCHS = 2
DEFAULT_CHANNEL_EPOCHS = 6  # = converters.channel_pruning.ChannelPruneConfig's defaults
DEFAULT_CHANNEL_LR = 1e-3
FP32_MAX_DP = 1e-3  # an fp32 artifact must reproduce the source's probabilities this closely
SUMMARY = "convert_summary.json"
CALIB_LIST = "calibration_list.txt"


class ConvertFailed(EdgebrainError):
    """Some artifacts were rejected by verification or could not be built."""

    def __init__(self, message: str, summary: dict[str, Any], artifacts: list[Artifact]) -> None:
        super().__init__(message)
        self.summary = summary
        self.artifacts = artifacts


@dataclass
class _Job:
    target: Target
    precision: str
    dirname: str


def _say(msg: str) -> None:
    if enabled():
        print(msg, file=sys.stderr, flush=True)


def _as_list(v: str | Sequence[str]) -> list[str]:
    items = v.split(",") if isinstance(v, str) else list(v)
    out: list[str] = []
    for i in items:
        i = str(i).strip().lower()
        if i and i not in out:
            out.append(i)
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def cli_equivalent(model: Any, targets: list[str], precisions: list[str], out: Any, kw: dict[str, Any]) -> str:
    """The ``edgebrain convert`` command line equivalent to a Python API call."""
    parts = ["edgebrain", "convert", str(model), "--to", ",".join(targets), "--precision", ",".join(precisions),
             "--out", str(out)]
    for k, v in kw.items():
        if v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            parts.append(flag)
        elif isinstance(v, (list, tuple)):
            parts += [flag, ",".join(str(i) for i in v)]
        else:
            parts += [flag, str(v)]
    return shlex.join(parts)


# ----------------------------------------------------------------------------- data


class _Data:
    """The model's dataset (card data root or --data), its splits, loaded lazily."""

    def __init__(self, src: Source, data: str | Path | None) -> None:
        card = src.card
        cd = card.data if card is not None else {}
        self.root: Path | None = Path(data) if data is not None else (Path(cd["root"]) if cd.get("root") else None)
        self.seed = int(cd.get("split_seed", 42))
        self.fractions = dict(cd.get("fractions") or D.DEFAULT_FRACTIONS)
        self.expected_hash = cd.get("manifest_hash")
        self.warnings: list[str] = []
        self._ds: D.Dataset | None = None
        self._splits: dict[str, list[D.Sample]] | None = None
        # MRI+CT fusion (set by _fusion_setup): every split is loaded as fused pairs
        self.fusion: Any = None  # edgebrain.fusion.FusionSpec
        self.pairing: Any = None  # edgebrain.fusion.CTPairing over self.root
        self.unpaired: dict[str, int] = {}  # split -> images skipped for want of a CT partner
        if self.root is not None and not (self.root / "Training").is_dir():
            msg = f"dataset root {self.root} (from {'--data' if data else 'the model card'}) has no Training/ folder"
            if data is not None:
                raise DataError(msg)
            self.warnings.append(msg + ": pass --data DIR to calibrate/verify on the model's own splits")
            self.root = None

    @property
    def available(self) -> bool:
        return self.root is not None

    def dataset(self) -> D.Dataset:
        assert self.root is not None
        if self._ds is None:
            self._ds = D.scan(self.root)
            if self.expected_hash and self._ds.manifest_hash != self.expected_hash:
                self.warnings.append(
                    f"{self.root}: dataset content differs from the one in the model card (manifest hash); the "
                    "recomputed splits may not be the ones the model was trained with")
        return self._ds

    def splits(self) -> dict[str, list[D.Sample]]:
        if self._splits is None:
            self._splits = D.splits_for(self.dataset(), self.seed, self.fractions)
        return self._splits

    def arrays(self, split: str, size: tuple[int, int], n: int | None = None,
               per_class: int | None = None, seed: int = 0, resize: str = "bilinear") -> D.Arrays:
        samples = self.splits()[split]
        if self.fusion is not None:
            samples = self._paired(split, samples)
        if per_class:
            samples = D.subset(samples, per_class, seed)
        if n is not None and n < len(samples):
            from edgebrain.calibration import stratified_sample

            samples = stratified_sample(samples, n, seed)
        if self.fusion is not None:
            from .fusion import load_fused_arrays

            arr = load_fused_arrays(samples, self.pairing, self.fusion, size, desc=split)
        else:
            arr = D.load_arrays(samples, size, desc=split, resize=resize)
        for p, r in arr.failed:
            self.warnings.append(f"{split} image skipped: {p}: {r}")
        return arr

    def _paired(self, split: str, samples: list[D.Sample]) -> list[D.Sample]:
        """The samples of a split that have a CT partner (the others are counted and skipped)."""
        from edgebrain.converters.base import ConversionError

        kept: list[D.Sample] = []
        first = ""
        for s in samples:
            ct, why = self.pairing.partner(s.path)
            if ct is None:
                first = first or f"{s.path}: {why}"
            else:
                kept.append(s)
        skipped = len(samples) - len(kept)
        if skipped and split not in self.unpaired:
            self.warnings.append(f"{skipped} of {len(samples)} {split} images have no CT partner: skipped "
                                 f"(first: {first})")
        self.unpaired[split] = skipped
        if not kept:
            raise ConversionError(f"none of the {len(samples)} {split} images of {self.root} has a CT partner "
                                  f"({first}); give the CT images of the model's splits (--ct-dir DIR or "
                                  "--ct-csv CSV)")
        return kept


def _card_ct_source(src: Source) -> tuple[str | None, str | None, list[str]]:
    """The CT folder / pairs CSV the model card records from training (``extra.fusion``, else
    ``training.ct_dir`` / ``ct_csv``) -> (existing folder, existing CSV, recorded but missing)."""
    card = src.card
    if card is None:
        return None, None, []
    rec = card.extra.get("fusion") or {}
    tr = card.training or {}
    found: dict[str, str | None] = {"dir": None, "csv": None}
    missing: list[str] = []
    for kind, keys in (("dir", (rec.get("ct_dir"), tr.get("ct_dir"))), ("csv", (rec.get("csv"), tr.get("ct_csv")))):
        for v in keys:
            if not v:
                continue
            ok = Path(v).is_dir() if kind == "dir" else Path(v).is_file()
            if ok:
                found[kind] = str(v)
                break
            if str(v) not in missing:
                missing.append(str(v))
    return found["dir"], found["csv"], missing


def _fusion_setup(src: Source, dd: _Data, ct_dir: str | Path | None,
                  ct_csv: str | Path | None) -> tuple[str | Path | None, str | Path | None]:
    """Check the CT options against the source's fusion; for a fused model, resolve the CT source
    (given, else the one in the model card) and make ``dd`` load fused pairs. -> (ct_dir, ct_csv)."""
    from edgebrain.converters.base import ConversionError

    from .fusion import CTPairing, FusionError, fusion_of

    try:
        fs = fusion_of(src.spec)
    except FusionError as exc:
        raise ConversionError(f"{src.path}: the preprocessing's fusion record is invalid: {exc}") from exc
    given = ct_dir is not None or ct_csv is not None
    if fs is None:
        if given:
            raise ConversionError(
                f"{src.path} takes plain MRI images (its preprocessing records no MRI+CT fusion); --ct-dir / "
                "--ct-csv are only for models trained with --fuse. Drop the CT option.")
        return None, None
    if not given:
        ct_dir, ct_csv, missing = _card_ct_source(src)
        if ct_dir is None and ct_csv is None:
            where = (f" (the model card's {', '.join(missing)} no longer exist{'s' if len(missing) == 1 else ''})"
                     if missing else "")
            raise ConversionError(
                f"{src.path} was trained on fused MRI+CT input ({fs.method}, mode {fs.mode}): calibration and "
                f"verification need the CT images{where}. Give --ct-dir DIR (CT images mirroring the dataset "
                "layout) or --ct-csv CSV (mri,ct pairs).")
        _say(f"fusion: CT images from the model card: {ct_dir or ct_csv}")
    try:  # checks the CT folder / CSV now, before anything is built
        pairing = CTPairing(ct_dir=ct_dir, csv_path=ct_csv, mri_root=dd.root)
    except FusionError as exc:
        raise ConversionError(str(exc)) from exc
    if dd.available:  # without a dataset, calibration pairs on its own folder and verification falls back
        dd.fusion, dd.pairing = fs, pairing
    return ct_dir, ct_csv


# ----------------------------------------------------------------------------- verification


@dataclass
class _VerifySet:
    x: np.ndarray
    y: np.ndarray | None
    split: str
    ref: np.ndarray  # source probabilities
    note: str | None = None
    fusion: dict[str, Any] | None = None  # fused MRI+CT inputs: the spec, CT source, unpaired count
    batch: int = 32  # images per inference call (bounded by the memory budget for large models)


def _verify_set(src: Source, data: _Data, verify_n: int | None, calib: CalibrationSet | None) -> _VerifySet:
    from edgebrain.converters.base import inference_batch

    spec = src.spec
    if data.available:
        arr = data.arrays("val", spec.size, n=verify_n, resize=spec.resize)
        if len(arr.x):
            x = spec.apply(arr.x).astype(np.float32)
            fused = None
            if data.fusion is not None:
                fused = {**data.fusion.to_dict(), **data.pairing.describe(), "pairs": int(len(arr.x)),
                         "unpaired_skipped": data.unpaired.get("val", 0)}
            return _VerifySet(x, arr.y, "val", src.predict(x, batch=inference_batch(src)), fusion=fused)
    if calib is not None and len(calib):
        x = calib.x if verify_n is None else calib.x[:verify_n]
        y = calib.y[: len(x)] if (calib.y >= 0).all() else None
        return _VerifySet(x, y, "calib", src.predict(x, batch=inference_batch(src)),
                          "verified on the calibration images (no validation split known: pass --data DIR)",
                          fusion=calib.info.get("fusion"))
    n = verify_n or 32
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, size=(n, *spec.size, spec.channels), dtype=np.uint8)
    x = spec.apply(pix).astype(np.float32)
    return _VerifySet(x, None, "random-pixels", src.predict(x, batch=inference_batch(src)),
                      "verified on random-pixel images only (no images known: pass --data DIR)")


def _draft(build: Path, built: Any, target: Target, precision: str, src: Source) -> Artifact:
    """An in-memory artifact over a build folder, enough for a runner (not written, not hashed)."""
    return Artifact(build, {"model_file": built.model_file, "target": target.name, "precision": precision,
                            "runtime_options": built.runtime_options, "class_names": list(src.class_names),
                            "input_shape": list(src.input_shape), "preprocess": src.spec.to_dict(), "files": {}})


def _with_settings(ctx: BuildContext, settings: dict[str, Any]) -> BuildContext:
    """``ctx`` with int8 settings applied (``calib_method`` is the calibration method, the rest are
    target options)."""
    import dataclasses

    return dataclasses.replace(
        ctx, options={**ctx.options, **{k: v for k, v in settings.items() if k != "calib_method"}},
        calib_method=settings.get("calib_method", ctx.calib_method))


def _int8_choose(j: _Job, ctx: BuildContext, built: Any, build: Path, work: Path, vs: _VerifySet,
                 below: float | None, search: bool, threads: int | None,
                 src: Source) -> tuple[Any, Path, dict[str, Any]]:
    """Choose an int8 build on the verification (validation) images, never on the evaluation set.

    1. Search (``search``; only when verifying on the validation split): build each of the
       target's ``int8_candidates`` (calibration settings the backend offers besides its default,
       e.g. onnxruntime's percentile ranges) and keep the build with the highest top-1 agreement
       with the source, ties broken by the lower mean KL divergence of its probabilities from the
       source's: agreement on a few hundred images moves in steps of one image, the KL divergence
       ranks the settings that tie there.
    2. Fallback: when the best build so far agrees on fewer than ``below`` of the images, build
       the target's ``int8_fallbacks`` in order, on top of the settings chosen in 1, until one
       reaches ``below``; a fallback is kept only if it agrees on more images *and* its mean KL
       divergence from the source is not higher (it costs size or speed, so a lower KL alone does
       not justify it; and on a few hundred images one or two more agreeing images are within
       the noise when the whole probability vectors moved further from the source's).

    Settings the user chose explicitly are never overridden. Attempts and choices are recorded in
    ``quantization.selection`` and ``quantization.fallback``. Returns the chosen build, its folder
    and the settings it was built with (empty for the default)."""

    def key(v: dict[str, Any]) -> tuple[float, float]:
        return (float(v.get("top1_agreement", 0.0)), -float(v.get("mean_kl", float("inf"))))

    def measured(v: dict[str, Any]) -> dict[str, Any]:
        return {k: v[k] for k in ("top1_agreement", "mean_kl") if k in v}

    def label(settings: dict[str, Any]) -> str:
        return ", ".join(f"{k}={v}" for k, v in settings.items()) or "default"

    def agree(v: dict[str, Any]) -> float:
        return float(v.get("top1_agreement", 0.0))

    def kl(v: dict[str, Any]) -> float:
        return float(v.get("mean_kl", float("inf")))

    try:
        v0, _ = _verify(_draft(build, built, j.target, j.precision, src), j.target, vs, 0.0, threads)
        first: dict[str, Any] = measured(v0)
    except Exception as exc:  # the default does not even run: try the alternatives
        first = {"top1_agreement": 0.0, "error": f"{type(exc).__name__}: {exc}"}
    # (measured, built, folder, settings)
    best: tuple[dict[str, Any], Any, Path, dict[str, Any]] = (first, built, build, {})

    def attempt(settings: dict[str, Any], log: list[dict[str, Any]], why: str, fallback: bool = False) -> None:
        nonlocal best
        chosen_by_user = [k for k in settings if (ctx.calib_method is not None if k == "calib_method" else
                                                  k in ctx.explicit)]
        if chosen_by_user:
            log.append({"settings": label(settings), "skipped": f"set explicitly: {', '.join(chosen_by_user)}"})
            return
        full = {**best[3], **settings}
        if ctx.deadline is not None and ctx.deadline.expired():
            log.append({"settings": label(full), "skipped": f"time budget of {ctx.deadline.seconds:g} s spent"})
            return
        _say(f"{j.target.name} int8: {why}; trying {label(full)}")
        ctx2 = _with_settings(ctx, full)
        b2 = Path(tempfile.mkdtemp(prefix=f".{j.dirname}.alt-", dir=work))
        try:
            built2 = j.target.build(ctx2, j.precision, b2)
            v2, _ = _verify(_draft(b2, built2, j.target, j.precision, src), j.target, vs, 0.0, threads)
        except BudgetExpired as exc:  # stopped part-way (e.g. accuracy control): the best so far stands
            log.append({"settings": label(full), "stopped": str(exc)})
            _say(f"{j.target.name} int8: {exc}; keeping the best build verified so far")
            shutil.rmtree(b2, ignore_errors=True)
            return
        except Exception as exc:  # a setting that cannot be built is recorded, the best so far stands
            log.append({"settings": label(full), "error": f"{type(exc).__name__}: {exc}"})
            shutil.rmtree(b2, ignore_errors=True)
            return
        log.append({"settings": label(full), **measured(v2)})
        if built2.ops is not None and not built2.ops.get("int8_ops"):
            log[-1]["not_kept"] = "no int8 op left"
            shutil.rmtree(b2, ignore_errors=True)
            return
        # a fallback costs size or speed: it is kept only for more top-1 agreement, not a lower KL;
        # and not when it moved the probabilities further from the source's (higher mean KL): a
        # difference of an image or two is noise then
        if fallback:
            better = agree(v2) > agree(best[0]) and kl(v2) <= kl(best[0])
            if agree(v2) > agree(best[0]) and not better:
                log[-1]["not_kept"] = (f"agrees on more images but its mean KL divergence from the source is higher "
                                       f"({kl(v2):.3g} > {kl(best[0]):.3g}): within the noise of "
                                       f"{len(vs.x)} images")
        else:
            better = key(v2) > key(best[0])
        if better:
            if best[2] != build:
                shutil.rmtree(best[2], ignore_errors=True)
            best = (measured(v2), built2, b2, full)
        else:
            shutil.rmtree(b2, ignore_errors=True)

    extra: dict[str, Any] = {}
    candidates = j.target.int8_candidates_for(ctx) if search and vs.split == "val" else []
    if candidates:
        log: list[dict[str, Any]] = [{"settings": "default", **first}]
        for cand in candidates:
            attempt(cand, log, f"comparing calibration settings on {len(vs.x)} {vs.split} images")
        extra["selection"] = {
            "criterion": f"highest top-1 agreement with the source on the {len(vs.x)} {vs.split} images, then the "
                         "lowest mean KL divergence from the source's probabilities",
            "attempts": log, "chosen": label(best[3])}
    searched = dict(best[0])
    if below and agree(best[0]) < below:
        fb_log: list[dict[str, Any]] = [{"settings": label(best[3]), **best[0]}]
        for fb in j.target.int8_fallbacks_for(ctx):
            attempt(fb, fb_log, f"top-1 agreement {agree(best[0]):.4f} < {below} on {len(vs.x)} {vs.split} images",
                    fallback=True)
            if agree(best[0]) >= below:
                break
        if len(fb_log) > 1:
            extra["fallback"] = {
                "trigger": f"int8 top-1 agreement {agree(searched):.4f} < {below} on {len(vs.x)} {vs.split} images",
                "attempts": fb_log, "chosen": label(best[3])}
    chosen_built, chosen_dir = best[1], best[2]
    if extra:
        chosen_built.quantization = {**(chosen_built.quantization or {}), **extra}
        _say(f"{j.target.name} int8: keeping {label(best[3])} (top-1 agreement {agree(best[0]):.4f})")
    if best[3]:
        fb = extra.get("fallback")
        how = "fallback" if fb and fb["chosen"] != fb["attempts"][0]["settings"] else "calibration setting"
        chosen_built.warnings = [
            *chosen_built.warnings,
            f"int8 {how} chosen on the {vs.split} split: {label(best[3])} (top-1 agreement {agree(first):.4f} -> "
            f"{agree(best[0]):.4f}, mean KL {first.get('mean_kl', float('nan')):.3g} -> "
            f"{best[0].get('mean_kl', float('nan')):.3g})"]
        shutil.rmtree(build, ignore_errors=True)
    return chosen_built, chosen_dir, best[3]


def _verify(art: Artifact, target: Target, vs: _VerifySet, min_agreement: float,
            threads: int | None) -> tuple[dict[str, Any], list[str]]:
    from .metrics import agreement

    warnings: list[str] = []
    runner = target.load(art, threads=threads)
    outs = [np.asarray(runner.run(vs.x[i : i + vs.batch]))
            for i in track(range(0, len(vs.x), vs.batch), f"verifying {art.target} {art.precision}")]
    probs = np.concatenate(outs) if outs else np.zeros_like(vs.ref)
    if probs.shape != vs.ref.shape:
        return ({"n": int(len(vs.x)), "split": vs.split, "passed": False, "threshold": min_agreement,
                 "error": f"output shape {probs.shape} differs from the source's {vs.ref.shape}"}, warnings)
    ag = agreement(vs.ref, probs)
    res: dict[str, Any] = {
        "n": int(len(vs.x)),
        "split": vs.split,
        "top1_agreement": round(ag["top1_agreement"], 6),
        "max_abs_dp": round(ag["max_abs_dp"], 6),
        "mean_abs_dp": round(ag["mean_abs_dp"], 6),
        "mean_kl": float(f"{ag['mean_kl']:.6g}"),
        "threshold": min_agreement,
        "runtime": getattr(runner, "name", "?"),
        "device": getattr(runner, "device", "?"),
    }
    if vs.note:
        res["note"] = vs.note
    if vs.fusion is not None:
        res["fusion"] = {k: vs.fusion[k] for k in ("method", "mode", "ct_dir", "csv", "pairs", "unpaired_skipped")
                         if k in vs.fusion}
    if vs.y is not None:
        res["source_accuracy"] = round(float(np.mean(vs.ref.argmax(1) == vs.y)), 6)
        res["artifact_accuracy"] = round(float(np.mean(probs.argmax(1) == vs.y)), 6)
    actual = getattr(runner, "inference_precision", None)
    if actual is not None:
        import re

        m = re.search(r"'(\w+)'", str(actual))  # "<Type: 'bfloat16'>" -> bfloat16
        got = m.group(1) if m else str(actual)
        res["inference_precision_actual"] = got
        want = (art.manifest.get("runtime_options") or {}).get("inference_precision")
        names = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
        if want and names.get(want, want) != got:
            warnings.append(f"asked OpenVINO for {want} inference; the CPU plugin runs {got}")
    passed = ag["top1_agreement"] >= min_agreement
    if art.precision == "fp32":
        res["max_abs_dp_threshold"] = FP32_MAX_DP
        passed = passed and ag["max_abs_dp"] <= FP32_MAX_DP
    res["passed"] = bool(passed)
    return res, warnings


# ----------------------------------------------------------------------------- convert


def _model_name(path: Path) -> str:
    p = Path(path)
    if p.is_dir():
        return p.name
    return p.parent.name if p.stem == "model" and p.parent.name else p.stem


def convert(
    model: str | Path,
    targets: str | Sequence[str],
    precisions: str | Sequence[str],
    out: str | Path,
    *,
    calib: str | Path | None = None,
    calib_size: int = DEFAULT_CALIB_SIZE,
    calib_seed: int = DEFAULT_CALIB_SEED,
    calib_method: str | None = None,
    prune: float | None = None,
    prune_epochs: int = DEFAULT_PRUNE_EPOCHS,
    prune_2x4: bool = False,
    prune_lr: float = 1e-4,
    prune_min_params: int = 1024,
    prune_per_class: int | None = None,
    prune_cluster: int | None = None,
    cluster_epochs: int = 1,
    prune_channels: float | None = None,
    channel_epochs: int = DEFAULT_CHANNEL_EPOCHS,
    channel_lr: float = DEFAULT_CHANNEL_LR,
    int8_fallback_below: float | None = DEFAULT_INT8_FALLBACK_BELOW,
    int8_search: bool = True,
    preprocess: str | None = None,
    classes: str | Sequence[str] | None = None,
    keep_float: str | Sequence[str] | None = None,
    data: str | Path | None = None,
    ct_dir: str | Path | None = None,
    ct_csv: str | Path | None = None,
    verify_n: int | None = None,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    no_verify: bool = False,
    allow_overlap: bool = False,
    unsafe: bool = False,
    overwrite: bool = False,
    threads: int | None = None,
    command: str | None = None,
    time_budget: float | None = None,
    sign: str | Path | None = None,
    resume: bool = False,
    **options: Any,
) -> list[Artifact]:
    """Convert ``model`` to every (target, precision) and verify each artifact.

    Returns the verified artifacts. Raises :class:`ConvertFailed` (after converting everything
    else) when an artifact was rejected by verification or could not be built; unsupported
    (target, precision) pairs are skipped with their reason (in ``convert_summary.json``).
    Target options (``tflite_io``, ``onnx_format``, ``nncf_preset``, ``max_drop`` ...) are
    keyword arguments; see :func:`target_options`.

    A model trained on fused MRI+CT input (its preprocessing records the fusion) is calibrated,
    verified and pruned on fused pairs: ``ct_dir`` (CT images mirroring the dataset layout) and/or
    ``ct_csv`` (``mri,ct`` pairs), by default the CT source recorded in the model card. A model
    without a fusion given ``ct_dir`` / ``ct_csv`` is refused.

    ``time_budget`` (seconds) bounds the whole run: the int8 search, its fallbacks and NNCF accuracy
    control stop when it is spent, keeping the best build verified so far; targets not started by
    then are listed as failed. Peak memory (RSS) per artifact and for the run is recorded in each
    manifest and in ``convert_summary.json`` (``memory``).

    ``sign``: an Ed25519 private key (PEM) that signs every manifest. One convert at a time writes
    into ``out`` (a lock file); work folders a killed run left there are removed. ``resume`` keeps
    the artifacts of an interrupted run that still verify (same source, target and precision) and
    converts only the rest.
    """
    from edgebrain.converters.base import CALIBRATED, PRECISIONS, ConversionError
    from edgebrain.converters.registry import get_target

    t_names = _as_list(targets)
    p_names = _as_list(precisions)
    if not t_names:
        raise ConversionError("no target given (--to tflite,onnx,openvino)")
    if not p_names:
        raise ConversionError("no precision given (--precision fp32,fp16,int8,...)")
    tgts = [get_target(t) for t in t_names]
    bad = [p for p in p_names if p not in PRECISIONS]
    if bad:
        raise ConversionError(f"unknown precision(s) {bad}; known: {', '.join(PRECISIONS)}")
    known = target_options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConversionError(f"unknown option(s) {unknown}; target options: {', '.join(sorted(known))}")
    opts = {k: (options[k] if options.get(k) is not None else v["default"]) for k, v in known.items()}
    if time_budget is not None and not time_budget > 0:
        raise ConversionError(f"--time-budget must be a positive number of seconds, got {time_budget}")
    if not 0.0 < min_agreement <= 1.0:
        raise ConversionError(f"--min-agreement must be in (0, 1], got {min_agreement}")
    if verify_n is not None and verify_n < 1:
        raise ConversionError(f"--verify-n must be >= 1, got {verify_n}")
    class_list: list[str] | None = None
    if isinstance(classes, str):
        class_list = [c.strip() for c in classes.split(",") if c.strip()] or None
    elif classes:
        class_list = [str(c) for c in classes]
    if command is None:
        command = cli_equivalent(model, t_names, p_names, out, {
            "calib": calib, "calib_size": calib_size if calib_size != DEFAULT_CALIB_SIZE else None,
            "calib_seed": calib_seed if calib_seed != DEFAULT_CALIB_SEED else None, "calib_method": calib_method,
            "prune": prune, "prune_epochs": prune_epochs if prune else None, "prune_2x4": prune_2x4,
            "prune_cluster": prune_cluster, "cluster_epochs": cluster_epochs if prune_cluster and cluster_epochs != 1 else None,
            "prune_channels": prune_channels,
            "channel_epochs": channel_epochs if prune_channels and channel_epochs != DEFAULT_CHANNEL_EPOCHS else None,
            "channel_lr": channel_lr if prune_channels and channel_lr != DEFAULT_CHANNEL_LR else None,
            "preprocess": preprocess, "classes": class_list, "keep_float": keep_float, "data": data,
            "ct_dir": ct_dir, "ct_csv": ct_csv, "verify_n": verify_n,
            "min_agreement": min_agreement if min_agreement != DEFAULT_MIN_AGREEMENT else None,
            "int8_fallback_below": (int8_fallback_below if int8_fallback_below != DEFAULT_INT8_FALLBACK_BELOW
                                    else None),
            "no_int8_search": not int8_search,  # --no-int8-search
            "no_verify": no_verify, "allow_overlap": allow_overlap, "unsafe": unsafe, "overwrite": overwrite,
            "time_budget": time_budget,
            **{k: v for k, v in options.items() if v is not None and v != known[k]["default"]}})

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    signing_key = _signing_key(sign)
    with _out_lock(out):
        _remove_stale_work(out)
        return _convert_in(out, model, tgts, p_names, calib=calib, calib_size=calib_size, calib_seed=calib_seed,
                           calib_method=calib_method, prune=prune, prune_epochs=prune_epochs, prune_2x4=prune_2x4,
                           prune_lr=prune_lr, prune_min_params=prune_min_params, prune_per_class=prune_per_class,
                           prune_cluster=prune_cluster, cluster_epochs=cluster_epochs,
                           prune_channels=prune_channels, channel_epochs=channel_epochs, channel_lr=channel_lr,
                           int8_fallback_below=int8_fallback_below, int8_search=int8_search, preprocess=preprocess,
                           classes=class_list, keep_float=keep_float, data=data, ct_dir=ct_dir, ct_csv=ct_csv,
                           verify_n=verify_n, min_agreement=min_agreement, no_verify=no_verify,
                           allow_overlap=allow_overlap, unsafe=unsafe, overwrite=overwrite, threads=threads,
                           command=command, opts=opts, given=frozenset(k for k, v in options.items() if v is not None),
                           calibrated=CALIBRATED, signing_key=signing_key, resume=resume,
                           time_budget=time_budget)


def _convert_in(out: Path, model: str | Path, tgts: list[Target], p_names: list[str], **kw: Any) -> list[Artifact]:
    """_convert in a fresh work folder under ``out`` (removed afterwards), with ``out`` locked."""
    work = Path(tempfile.mkdtemp(prefix=".convert-work-", dir=out))
    try:
        return _convert(model, tgts, p_names, out, work, **kw)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _signing_key(sign: str | Path | None) -> Any:
    """The private key for ``--sign``, loaded before any work (a bad key fails fast)."""
    if sign is None:
        return None
    from .signing import load_private_key

    return load_private_key(sign)


LOCK_FILE = ".edgebrain-convert.lock"


def _out_lock(out: Path) -> Any:
    """An exclusive lock on ``out`` (``filelock``): a second convert into the same folder is refused
    at once instead of racing the first (last writer wins)."""
    import contextlib

    from filelock import FileLock, Timeout

    from edgebrain.converters.base import ConversionError

    lock = FileLock(str(out / LOCK_FILE), timeout=0)

    @contextlib.contextmanager
    def held() -> Any:
        try:
            lock.acquire()
        except Timeout:
            raise ConversionError(f"another edgebrain convert is writing into {out} (lock {out / LOCK_FILE}); "
                                  "wait for it to finish or choose another --out") from None
        try:
            yield
        finally:
            lock.release()
    return held()


def _remove_stale_work(out: Path) -> None:
    """Work and half-written folders a killed convert left in ``out`` (only called with the lock held,
    so no other convert is using them)."""
    for pat in (".convert-work-*", ".*.partial-*", ".*.old-*"):
        for p in out.glob(pat):
            if p.is_dir() and not p.is_symlink():
                _say(f"removing {p} (left by an interrupted convert)")
                shutil.rmtree(p, ignore_errors=True)


def _kept_jobs(jobs: Sequence[Any], out: Path, overwrite: bool, resume: bool, original: dict[str, Any],
               signing_key: Any) -> dict[str, Artifact]:
    """Refuse existing output folders (unless ``overwrite``); with ``resume``, the verified ones kept."""
    from edgebrain.converters.base import ConversionError

    kept: dict[str, Artifact] = {}
    for j in jobs:
        folder = out / j.dirname
        if not folder.exists() or overwrite:
            continue
        if not resume:
            raise ConversionError(f"{folder} already exists (use --overwrite to replace it, or --resume to keep "
                                  "what an interrupted run finished)")
        kept[j.dirname] = _resumable(folder, j.target.name, j.precision, original.get("sha256"), signing_key)
        _say(f"--resume: keeping {folder} (verified)")
    return kept


def _resumable(folder: Path, target: str, precision: str, source_sha: str | None, signing_key: Any) -> Artifact:
    """An artifact an interrupted run finished, kept by ``--resume`` only when it still verifies
    (digest, file hashes, verification passed) and was made from the same source for the same
    target and precision (and, with ``--sign``, is signed by that key)."""
    from edgebrain.converters.base import ConversionError

    try:
        art = load_manifest(folder, public_key=signing_key.public_key() if signing_key is not None else None)
    except EdgebrainError as exc:
        raise ConversionError(f"--resume: {folder} exists but cannot be kept ({exc}); remove it or use "
                              "--overwrite") from exc
    m = art.manifest
    got = (m.get("target"), m.get("precision"), (m.get("source") or {}).get("sha256"))
    if got != (target, precision, source_sha):
        raise ConversionError(f"--resume: {folder} was made from another source or for another target/precision "
                              f"({got[0]} {got[1]}, source {str(got[2])[:12]}…); remove it or use --overwrite")
    return art


def target_options() -> dict[str, dict[str, Any]]:
    """Every registered target's options: name -> {default, help, targets}."""
    from edgebrain.converters.registry import TARGETS, target_names

    out: dict[str, dict[str, Any]] = {}
    for n in target_names():
        t = TARGETS[n]
        for k, v in t.options.items():
            e = out.setdefault(k, {"default": v, "help": t.option_help.get(k, ""), "targets": []})
            e["targets"].append(n)
    return out


def _convert(model: str | Path, tgts: list[Target], p_names: list[str], out: Path, work: Path, *,
             calib: str | Path | None, calib_size: int, calib_seed: int, calib_method: str | None,
             prune: float | None, prune_epochs: int, prune_2x4: bool, prune_lr: float, prune_min_params: int,
             prune_per_class: int | None, prune_cluster: int | None, cluster_epochs: int,
             prune_channels: float | None, channel_epochs: int, channel_lr: float,
             int8_fallback_below: float | None, int8_search: bool, preprocess: str | None, classes: list[str] | None,
             keep_float: str | Sequence[str] | None, data: str | Path | None,
             ct_dir: str | Path | None, ct_csv: str | Path | None, verify_n: int | None,
             min_agreement: float, no_verify: bool, allow_overlap: bool, unsafe: bool, overwrite: bool,
             threads: int | None, command: str,
             opts: dict[str, Any], calibrated: frozenset[str], given: frozenset[str],
             time_budget: float | None = None, signing_key: Any = None, resume: bool = False) -> list[Artifact]:
    from edgebrain.converters.base import BuildContext, ConversionError, file_sizes
    from edgebrain.converters.source import load_source

    deadline, mem = Deadline(time_budget), PeakRSS()
    src = load_source(model, unsafe=unsafe, preprocess=preprocess, classes=classes, workdir=work)
    original = src.describe()
    dd = _Data(src, data)
    ct_dir, ct_csv = _fusion_setup(src, dd, ct_dir, ct_csv)
    run_warnings: list[str] = list(src.warnings) + dd.warnings
    tag = ""
    if prune_cluster is not None and prune is None:
        raise ConversionError("--prune-cluster clusters the pruned layers: give --prune too")
    ch_tag = _channel_tag(prune_channels)
    if prune_channels is not None:
        tag = "-" + ch_tag
    if prune is not None:
        tag += "-" + _pruned_name(prune, prune_2x4, prune_cluster).split("-", 1)[1]

    # ---- plan
    jobs: list[_Job] = []
    skipped: list[dict[str, str]] = []
    for t in tgts:
        for p in p_names:
            why = t.unsupported(p, src.format)
            if why:
                skipped.append({"target": t.name, "precision": p, "reason": why})
                _say(f"skipping {t.name} {p}: {why}")
            else:
                jobs.append(_Job(t, p, f"{t.name}-{p}{tag}"))
    if not jobs:
        raise ConversionError("nothing to convert: " + "; ".join(f"{s['target']} {s['precision']}: {s['reason']}"
                                                                 for s in skipped))
    kept = _kept_jobs(jobs, out, overwrite, resume, original, signing_key)
    jobs = [j for j in jobs if j.dirname not in kept]
    pruned_dirs = ([f"pruned-{ch_tag}"] if prune_channels is not None else []) + (
        [_pruned_name(prune, prune_2x4, prune_cluster, ch_tag)] if prune is not None else [])
    for d in pruned_dirs:
        if (out / d).exists() and not overwrite and not resume:
            raise ConversionError(f"{out / d} already exists (use --overwrite to replace it)")

    # ---- calibration (built once, before any conversion: refusals fail fast)
    cal: CalibrationSet | None = None
    if any(j.precision in calibrated for j in jobs):
        from edgebrain.calibration import build_calibration

        _say(f"calibration: {calib_size} images from {calib or dd.root or '(none)'}")
        cal = build_calibration(
            src.spec, src.class_names, calib_size, calib_seed, calib_dir=calib,
            data_root=dd.root,
            split_seed=dd.seed, fractions=dd.fractions, allow_overlap=allow_overlap, ct_dir=ct_dir, ct_csv=ct_csv)
        run_warnings += [w for w in cal.info.get("warnings", []) if "WARNING" in w or "NOT checked" in w]

    # ---- pruning (after calibration: a refused calibration set fails before the fine-tuning)
    pruning: dict[str, Any] | None = None
    channel_pruning: dict[str, Any] | None = None
    if prune_channels is not None:  # structured first: the sparsity is then of the smaller model's weights
        src, channel_pruning = _prune_channels(src, dd, out, ratio=prune_channels, epochs=channel_epochs,
                                               lr=channel_lr, per_class=prune_per_class, command=command)
    if prune is not None:
        src, pruning = _prune(src, dd, out, prune=prune, epochs=prune_epochs, structured=prune_2x4, lr=prune_lr,
                              min_params=prune_min_params, per_class=prune_per_class, command=command,
                              clusters=prune_cluster, cluster_epochs=cluster_epochs, channel_tag=ch_tag)

    val_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def validation() -> tuple[np.ndarray, np.ndarray]:
        if "v" not in val_cache:
            arr = dd.arrays("val", src.spec.size, resize=src.spec.resize)
            val_cache["v"] = (src.spec.apply(arr.x).astype(np.float32), arr.y)
        return val_cache["v"]

    scopes, stages = _float_scopes(src, keep_float)
    ctx = BuildContext(source=src, workdir=work, options=opts, calibration=(lambda: cal) if cal is not None else None,
                       validation=validation if dd.available else None, calib_method=calib_method,
                       float_scopes=scopes, float_stages=stages,
                       explicit=given, deadline=deadline,
                       int8_checked=not no_verify and bool(int8_fallback_below))
    if scopes:
        _say(f"int8: ops named *{'*, *'.join(scopes)}* stay float ({', '.join(stages)})")

    pipe = _pipeline_for(src, work, unsafe, pruning is not None or channel_pruning is not None, run_warnings)
    if pipe is not None:
        _say(f"pipeline: stage files {', '.join(st.name for st in pipe.stages)} are converted with each artifact")

    vs: _VerifySet | None = None
    if not no_verify:
        vs = _verify_set(src, dd, verify_n, cal)
        vs.batch = _verify_batch(src)
        _say(f"verification: {len(vs.x)} images ({vs.split}) against the source model")

    src_name = _model_name(Path(original["path"]))
    card = src.card
    artifacts: list[Artifact] = []
    rejected: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    records: list[dict[str, Any]] = []
    for name, art in kept.items():
        artifacts.append(art)
        records.append({"name": name, "path": str(art.path), "target": art.target, "precision": art.precision,
                        "status": "kept", "verification": art.manifest.get("verification")})
    for j in jobs:
        if deadline.expired():
            failed.append(_not_started(j, deadline))
            _say(f"NOT STARTED {j.target.name} {j.precision}: {failed[-1]['error']}")
            continue
        _say(f"converting {j.target.name} {j.precision} -> {out / j.dirname}")
        section = mem.section().start()
        build = Path(tempfile.mkdtemp(prefix=f".{j.dirname}.build-", dir=work))
        try:
            built = j.target.build(ctx, j.precision, build)
            chosen: dict[str, Any] = {}
            if j.precision == "int8" and vs is not None and (
                    (int8_fallback_below and j.target.int8_fallbacks_for(ctx))
                    or (int8_search and vs.split == "val" and j.target.int8_candidates_for(ctx))):
                built, build, chosen = _int8_choose(j, ctx, built, build, work, vs, int8_fallback_below,
                                                    int8_search, threads, src)
            # (OpenVINO: the IR's FakeQuantize nodes count too; the host's CPU plugin may lack int8 kernels)
            if j.precision in ("int8", "int16x8") and built.ops is not None and not built.ops.get("int8_ops") \
                    and not built.ops.get("fake_quantize_nodes"):
                shutil.rmtree(build, ignore_errors=True)
                raise EdgebrainError(
                    f"{j.precision} was asked for but no operation of the converted model runs in integer "
                    f"(float: {', '.join([*built.ops.get('float_op_types', []), *built.ops.get('hybrid_op_types', [])]) or '?'}); an artifact "
                    f"labelled {j.precision} that computes in float is not written")
        except Exception as exc:  # one target failing never stops the others
            msg = str(exc) if isinstance(exc, EdgebrainError) else f"{type(exc).__name__}: {exc}"
            failed.append({"target": j.target.name, "precision": j.precision, "error": msg})
            _say(f"FAILED {j.target.name} {j.precision}: {msg}")
            continue
        warnings = list(run_warnings) + list(built.warnings)
        stage_entries: list[dict[str, Any]] = []
        stage_files: list[str] = []
        if pipe is not None:
            try:
                # the stages are built with the int8 settings chosen for the whole model
                stage_entries, stage_files, sw = pipe.build(j.target, j.precision, _with_settings(ctx, chosen),
                                                            build, cal)
                warnings += sw
            except Exception as exc:  # a stage that cannot be converted fails the whole artifact
                msg = str(exc) if isinstance(exc, EdgebrainError) else f"{type(exc).__name__}: {exc}"
                failed.append({"target": j.target.name, "precision": j.precision, "error": msg})
                _say(f"FAILED {j.target.name} {j.precision}: {msg}")
                continue
        manifest: dict[str, Any] = {
            "name": f"{src_name}-{j.dirname}",
            "target": j.target.name,
            "precision": j.precision,
            "model_file": built.model_file,
            "source": original,
            "class_names": list(src.class_names),
            "input_shape": list(src.input_shape),
            "preprocess": src.spec.to_dict(),
            "model_card": ({"variant": card.variant, "data": card.data, "metrics": card.metrics}
                           if card is not None else None),
            "quantization": built.quantization,
            "calibration": ({**built.calibration, "list_file": CALIB_LIST} if built.calibration else None),
            "pruning": pruning,
            "channel_pruning": channel_pruning,
            "runtime_options": built.runtime_options,
            "ops": built.ops,
            "names": built.names,
            "size": file_sizes(build, built.files),
            "runtime": j.target.runtime,
        }
        if pipe is not None:
            manifest["pipeline"] = {"stages": stage_entries}
        built_hash = sha256_file(build / built.model_file)
        verification: dict[str, Any] | None = None
        if vs is not None:
            try:
                draft = Artifact(build, {**manifest, "files": {}})
                verification, vw = _verify(draft, j.target, vs, min_agreement, threads)
                warnings += vw
            except Exception as exc:
                verification = {"n": int(len(vs.x)), "split": vs.split, "passed": False, "threshold": min_agreement,
                                "error": f"the artifact did not load or run: {type(exc).__name__}: {exc}"}
            # How much the figure proves: only the validation split is held-out evidence; calibration
            # images flatter int8, random pixels test plumbing only.
            calib_why = ("the int8 ranges were fitted on them" if j.precision in ("int8", "int16x8")
                         else "a small sample, not the validation split")
            verification["evidence"] = {"val": "validation split",
                                        "calib": f"calibration images (weak: {calib_why})"}.get(
                vs.split, "random pixels (weak: plumbing only)")
            q = built.quantization or {}
            if q.get("selection") or q.get("fallback"):
                verification["selected_on_these_images"] = True
                verification["selection_note"] = (
                    "the int8 settings were chosen on these same images (best of the builds in "
                    "quantization.selection / .fallback), so this agreement is optimistic; Testing, which no "
                    "conversion step sees, is the independent figure (edgebrain bench)")
            if pipe is not None:
                try:
                    pv = pipe.verify(j.target, build, stage_entries, vs, min_agreement, j.precision, threads)
                except Exception as exc:
                    pv = {"n": int(len(vs.x)), "split": vs.split, "passed": False,
                          "error": f"the stage files did not load or run: {type(exc).__name__}: {exc}"}
                manifest["pipeline"]["verification"] = pv
                if not pv["passed"] and verification.get("passed"):
                    verification["passed"] = False
                    verification["error"] = "pipeline stage files: " + (pv.get("error") or (
                        f"the chained stages agree with the source on {pv['top1_agreement']:.4f} of top-1 "
                        f"labels (threshold {min_agreement}), max |dp| {pv['max_abs_dp']}"))
            if vs.note:
                warnings.append(vs.note)
        else:
            warnings.append("NOT verified against the source model (--no-verify)")
        section.stop()
        manifest.update({
            "memory": section.to_dict(),
            "verification": verification if verification is not None else {"skipped": True},
            "versions": environment_facts(),
            "command": command,
            "created": _now(),
            "warnings": warnings,
        })
        ok = verification is None or bool(verification.get("passed"))
        final = out / j.dirname
        dest = final if ok else out / f"{j.dirname}.rejected"
        try:
            with atomic_dir(dest, overwrite=overwrite or not ok) as tmp:  # exists? checked again at the rename
                for f in [*built.files, *stage_files]:
                    (tmp / f).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(build / f, tmp / f)
                if built.calibration is not None and cal is not None:
                    (tmp / CALIB_LIST).write_text(cal.list_text())
                written = write_manifest(tmp, manifest, signing_key)
                if written["artifact_sha256"] != built_hash:
                    raise ConversionError(f"{dest}: the copied model file differs from the verified one")
        except FileExistsError as exc:  # appeared while this run converted: never replaced silently
            raise ConversionError(str(exc)) from exc
        shutil.rmtree(build, ignore_errors=True)
        rec = {"name": j.dirname, "path": str(dest), "target": j.target.name, "precision": j.precision,
               **manifest["size"], "verification": manifest["verification"], "ops": built.ops,
               "memory": manifest["memory"]}
        if pipe is not None:
            rec["pipeline_stages"] = [{k: e[k] for k in ("name", "model_file", "precision")} for e in stage_entries]
        if ok:
            stale = out / f"{j.dirname}.rejected"
            if stale.exists():
                shutil.rmtree(stale, ignore_errors=True)
            artifacts.append(load_manifest(final))
            rec["status"] = "ok"
        else:
            if final.exists() and overwrite:
                shutil.rmtree(final, ignore_errors=True)  # an older artifact must not pass for this run's
            why = verification.get("error") if verification else None
            why = why or (f"top-1 agreement {verification['top1_agreement']:.4f} < {min_agreement}"
                          if verification and verification.get("top1_agreement", 1) < min_agreement
                          else f"max |dp| {verification and verification.get('max_abs_dp')} > {FP32_MAX_DP}")
            rejected.append({"target": j.target.name, "precision": j.precision, "path": str(dest), "reason": why})
            rec["status"] = "rejected"
            _say(f"REJECTED {j.target.name} {j.precision}: {why}; moved to {dest}")
        records.append(rec)

    summary = {
        "kind": "edgebrain-convert-summary",
        "created": _now(),
        "command": command,
        "source": original,
        "pruning": ({k: pruning[k] for k in ("target_sparsity", "achieved_overall", "pruned_model")}
                    if pruning else None),
        "channel_pruning": ({k: channel_pruning[k] for k in ("ratio", "macs_ratio", "params_ratio", "pruned_model")}
                            if channel_pruning else None),
        "calibration": ({k: v for k, v in cal.info.items() if k != "warnings"} if cal is not None else None),
        "artifacts": records,
        "skipped": skipped,
        "rejected": rejected,
        "failed": failed,
        "warnings": run_warnings,
        "memory": _memory_summary(mem, records),
        "time_budget": _budget_summary(deadline),
    }
    atomic_write_json(out / SUMMARY, summary)
    if rejected or failed:
        lines = [f"{r['target']} {r['precision']}: rejected ({r['reason']}) -> {r['path']}" for r in rejected]
        lines += [f"{f['target']} {f['precision']}: failed: {f['error']}" for f in failed]
        raise ConvertFailed("conversion incomplete:\n  " + "\n  ".join(lines), summary, artifacts)
    return artifacts


def _verify_batch(src: Source) -> int:
    from edgebrain.converters.base import inference_batch

    return inference_batch(src, 32)


def _not_started(j: _Job, deadline: Deadline) -> dict[str, str]:
    return {"target": j.target.name, "precision": j.precision,
            "error": f"not started: the time budget of {deadline.seconds:g} s was spent "
                     f"({deadline.elapsed():.0f} s elapsed)"}


def _memory_summary(mem: PeakRSS, records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"peak_rss_mb": round(mem.overall / MB, 1), "measured": mem.method(),
            "per_artifact_mb": {r["name"]: r["memory"]["peak_rss_mb"] for r in records if r.get("memory")}}


def _budget_summary(deadline: Deadline) -> dict[str, Any] | None:
    if deadline.seconds is None:
        return None
    return {"seconds": deadline.seconds, "elapsed_s": round(deadline.elapsed(), 1), "spent": deadline.expired()}


# ----------------------------------------------------------------------------- pipeline stages

STAGES_DIR = "stages"


@dataclass
class _Stage:
    name: str
    file: Path  # the stage's own source model (card ``stages[i].file``)
    source: Source
    input_shape: list[int]
    output_shape: list[int] | None
    io_space: str | None
    keep_float: bool  # int8: the card's int8 policy says "float"
    workdir: Path  # this stage's own scratch folder (exports and quant_pre_process caches)


class _Pipeline:
    """The stages of a multi-stage source (``card.extra.pipeline.stages``): each stage's own model
    file is converted with the same target and precision as the composite and stored in the
    artifact under ``stages/<name>/``. Calibration: stage 0 takes the composite's calibration
    images; stage i > 0 takes the float source stage i - 1's outputs for them (the input the
    stage sees inside the composite)."""

    def __init__(self, src: Source, work: Path, unsafe: bool) -> None:
        from edgebrain.converters.base import ConversionError
        from edgebrain.converters.source import Source, detect_format
        from edgebrain.io import sha256_path
        from edgebrain.models.variants import load_keras_model
        from edgebrain.preprocess import PreprocessSpec

        card = src.card
        rec = (card.extra.get("pipeline") or {}) if card is not None else {}
        folder = Path(src.path).parent
        self.stages: list[_Stage] = []
        self._inputs: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}
        for i, st in enumerate(rec.get("stages") or []):
            name = str(st.get("name") or f"stage{i}")
            if not st.get("file"):
                raise ConversionError(f"pipeline stage {name!r}: the model card gives no file")
            f = Path(st["file"])
            f = f if f.is_absolute() else folder / f
            what = f"pipeline stage {name!r} ({f})"
            try:
                fmt, path = detect_format(f)
                model = load_keras_model(path, unsafe=unsafe)
            except EdgebrainError as exc:
                raise ConversionError(f"{what}: {exc}") from exc
            if fmt != "tf-keras":
                raise ConversionError(f"{what}: a stage must be a tf-keras model, not {fmt}")
            shape = [int(v) for v in st.get("input_shape") or []]
            got = list(model.input_shape[1:]) if not isinstance(model.input_shape, list) else None
            if got is None or [None if v is None else int(v) for v in got] != shape or len(shape) != 3:
                raise ConversionError(f"{what}: input shape {got} differs from the card's {shape or None}")
            out_shape = [int(v) for v in st["output_shape"]] if st.get("output_shape") else None
            if out_shape is not None and [None if v is None else int(v) for v in model.output_shape[1:]] != out_shape:
                raise ConversionError(f"{what}: output shape {list(model.output_shape[1:])} differs from the "
                                      f"card's {out_shape}")
            if self.stages and self.stages[-1].output_shape not in (None, shape):
                raise ConversionError(f"{what}: input {shape} does not match the previous stage's output "
                                      f"{self.stages[-1].output_shape}")
            last = i == len(rec["stages"]) - 1
            stage_src = Source(path=path, format=fmt, sha256=sha256_path(path), card=None,
                               class_names=list(src.class_names) if last else [],
                               spec=PreprocessSpec.named("rescale", (shape[0], shape[1])), input_shape=shape,
                               variant=f"{src.variant}:{name}", model=model)
            wd = work / f"stage-{i}-{name}"
            wd.mkdir(parents=True, exist_ok=True)
            self.stages.append(_Stage(name, Path(st["file"]), stage_src, shape, out_shape, st.get("io_space"),
                                      (st.get("int8_policy") or {}).get("decision") == "float", wd))
        if not self.stages:
            raise ConversionError(f"{src.path}: the model card's pipeline lists no stages")
        if self.stages[0].input_shape != list(src.input_shape):
            raise ConversionError(f"pipeline stage {self.stages[0].name!r}: input {self.stages[0].input_shape} "
                                  f"differs from the model's {src.input_shape}")

    def float_inputs(self, x: np.ndarray) -> list[np.ndarray]:
        """Each stage's input when ``x`` (composite input) runs through the float source stages
        (cached: the calibration and verification arrays are the same for every artifact)."""
        key = id(x)
        hit = self._inputs.get(key)
        if hit is not None and hit[0] is x:
            return hit[1]
        outs = [np.asarray(x, np.float32)]
        for st in self.stages[:-1]:
            ys = [np.asarray(st.source.model(outs[-1][i : i + 32], training=False), np.float32)
                  for i in range(0, len(outs[-1]), 32)]
            outs.append(np.concatenate(ys) if ys else np.zeros((0, *(st.output_shape or [])), np.float32))
        self._inputs[key] = (x, outs)
        return outs

    def precision(self, st: _Stage, precision: str) -> str:
        return "fp32" if precision == "int8" and st.keep_float else precision

    def build(self, target: Target, precision: str, ctx: BuildContext, build: Path,
              cal: CalibrationSet | None) -> tuple[list[dict[str, Any]], list[str], list[str]]:
        """Convert every stage into ``build/stages/<name>/`` -> (manifest stage entries, files, warnings).
        Raises ConversionError naming the stage that could not be converted."""
        from dataclasses import replace

        from edgebrain.converters.base import CALIBRATED, BuildContext, ConversionError, file_sizes

        entries: list[dict[str, Any]] = []
        files: list[str] = []
        warnings: list[str] = []
        cal_inputs: list[np.ndarray] | None = None
        user_scopes = [s for s in ctx.float_stages if s.startswith("--keep-float")]
        if user_scopes and precision == "int8":
            warnings.append(f"{', '.join(user_scopes)} applies to the composite model only; the stage files are "
                            "quantised per the card's int8 policy")
        for i, st in enumerate(self.stages):
            prec = self.precision(st, precision)
            why = target.unsupported(prec, st.source.format)
            if why:
                raise ConversionError(f"pipeline stage {st.name!r} ({st.file}): {why}")
            stage_cal = None
            if prec in CALIBRATED:
                if cal is None:
                    raise ConversionError(f"pipeline stage {st.name!r}: {prec} needs calibration images")
                if cal_inputs is None:
                    cal_inputs = self.float_inputs(cal.x)
                note = ("the composite's calibration images" if i == 0 else
                        f"the float source stage {self.stages[i - 1].name!r}'s outputs for the composite's "
                        "calibration images")
                stage_cal = replace(cal, x=cal_inputs[i], info={**cal.info, "stage_input": note})
            opts = {**ctx.options, "max_drop": None,
                    "float_head": bool(ctx.options.get("float_head")) and i == len(self.stages) - 1}
            sctx = BuildContext(source=st.source, workdir=st.workdir, options=opts,
                                calibration=(lambda c=stage_cal: c) if stage_cal is not None else None,
                                calib_method=ctx.calib_method)
            rel = f"{STAGES_DIR}/{st.name}"
            out = build / rel
            out.mkdir(parents=True, exist_ok=True)
            try:
                b = target.build(sctx, prec, out)
            except Exception as exc:
                msg = str(exc) if isinstance(exc, EdgebrainError) else f"{type(exc).__name__}: {exc}"
                raise ConversionError(f"pipeline stage {st.name!r} ({st.file}) could not be converted to "
                                      f"{target.name} {prec}: {msg}") from exc
            if ctx.options.get("max_drop") is not None and prec == "int8":
                warnings.append(f"stage {st.name}: --max-drop applies to the composite model only; the stage "
                                "file is quantised without accuracy control")
            warnings += [f"stage {st.name}: {w}" for w in b.warnings]
            files += [f"{rel}/{f}" for f in b.files]
            ops = {k: b.ops[k] for k in ("int8_ops", "float_ops", "hybrid_ops") if k in b.ops} if b.ops else None
            entries.append({
                "name": st.name, "model_file": f"{rel}/{b.model_file}", "input_shape": list(st.input_shape),
                "output_shape": list(st.output_shape) if st.output_shape else None, "precision": prec,
                "kept_float_by_policy": prec != precision, "source": {"file": st.file.as_posix(),
                                                                       "sha256": st.source.sha256},
                "runtime_options": dict(b.runtime_options), "ops": ops,
                "calibration_input": stage_cal.info["stage_input"] if stage_cal is not None else None,
                "calibration_method": (b.calibration or {}).get("method"),
                **file_sizes(out, b.files),
            })
        return entries, files, warnings

    def verify(self, target: Target, build: Path, entries: list[dict[str, Any]], vs: _VerifySet,
               min_agreement: float, precision: str, threads: int | None) -> dict[str, Any]:
        """Run the converted stage files one after the other on the verification images: the chain
        must reproduce the source model like the composite artifact does (top-1 agreement, and
        max |dp| for fp32); each intermediate output is compared with the float source stage's."""
        from edgebrain.runtime import _softmax_if_logits

        from .metrics import agreement

        ref_inputs = self.float_inputs(vs.x)
        x = vs.x
        per_stage: list[dict[str, Any]] = []
        for i, (st, e) in enumerate(zip(self.stages, entries)):
            draft = Artifact(build, {"target": target.name, "precision": e["precision"],
                                     "model_file": e["model_file"], "runtime_options": e["runtime_options"],
                                     "preprocess": {}, "files": {}})
            runner = target.load(draft, threads=threads)
            ys = [np.asarray(runner.run_raw(x[k : k + 32]), np.float32) for k in range(0, len(x), 32)]
            y = np.concatenate(ys)
            rec: dict[str, Any] = {"name": st.name, "precision": e["precision"],
                                   "runtime": getattr(runner, "name", "?")}
            if i < len(self.stages) - 1:
                want = ref_inputs[i + 1]
                if y.shape != want.shape:
                    raise ValueError(f"stage {st.name!r} output shape {y.shape} differs from the source "
                                     f"stage's {want.shape}")
                d = np.abs(y - want)
                rec.update({"max_abs_diff": round(float(d.max()), 6), "mean_abs_diff": round(float(d.mean()), 6)})
                if st.io_space == "rgb/255":
                    mse = float(np.mean((np.clip(y, 0, 1) - np.clip(want, 0, 1)) ** 2))
                    psnr = 100.0 if mse <= 1e-10 else min(100.0, float(10 * np.log10(1.0 / mse)))  # capped
                    rec["psnr_db_vs_source"] = round(psnr, 3)
            per_stage.append(rec)
            x = y
        probs = _softmax_if_logits(x)
        if probs.shape != vs.ref.shape:
            raise ValueError(f"the chained stages output {probs.shape}, the source model {vs.ref.shape}")
        ag = agreement(vs.ref, probs)
        res: dict[str, Any] = {"n": int(len(vs.x)), "split": vs.split,
                               "top1_agreement": round(ag["top1_agreement"], 6),
                               "max_abs_dp": round(ag["max_abs_dp"], 6), "threshold": min_agreement,
                               "stages": per_stage}
        passed = ag["top1_agreement"] >= min_agreement
        if precision == "fp32":
            res["max_abs_dp_threshold"] = FP32_MAX_DP
            passed = passed and ag["max_abs_dp"] <= FP32_MAX_DP
        res["passed"] = bool(passed)
        return res


def _pipeline_for(src: Source, work: Path, unsafe: bool, pruned: bool, warnings: list[str]) -> _Pipeline | None:
    card = src.card
    rec = (card.extra.get("pipeline") or {}) if card is not None else {}
    if not rec.get("stages"):
        return None
    composite = rec.get("composite_file")
    if composite and Path(src.path).name != Path(composite).name:
        warnings.append(f"{src.path.name} is not the pipeline's composite model ({composite}): its stage files "
                        "are not converted")
        return None
    if pruned:
        warnings.append("pipeline stage files are not converted for a pruned model (the card's stage files are "
                        "the unpruned ones): bench reports no per-stage latency")
        return None
    if not src.is_keras:
        warnings.append(f"pipeline stage files are converted for Keras sources only, not {src.format}")
        return None
    return _Pipeline(src, work, unsafe)


def _float_scopes(src: Source, keep_float: str | Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Node-name substrings kept float in int8: ``--keep-float`` plus every pipeline stage whose int8
    policy in the model card says "float" (``card.extra.pipeline.stages[i].int8_policy.decision``)."""
    scopes: list[str] = []
    stages: list[str] = []
    if keep_float:
        items = keep_float.split(",") if isinstance(keep_float, str) else list(keep_float)
        for it in items:
            if it.strip():
                scopes.append(it.strip())
                stages.append(f"--keep-float {it.strip()}")
    card = src.card
    pipeline = (card.extra.get("pipeline") or {}) if card is not None else {}
    for st in pipeline.get("stages") or []:
        policy = st.get("int8_policy") or {}
        prefix = st.get("layer_prefix")
        if policy.get("decision") == "float" and prefix:
            scope = "/" + str(prefix).strip("/") + "/"
            if scope not in scopes:
                scopes.append(scope)
                stages.append(str(st.get("name", prefix)))
    return scopes, stages


def _pruned_name(prune: float, structured: bool, clusters: int | None = None, channel_tag: str = "") -> str:
    return ("pruned-" + (f"{channel_tag}-" if channel_tag else "") + f"sparse{round(prune * 100)}"
            + ("-2x4" if structured else "") + (f"-c{int(clusters)}" if clusters else ""))


def _channel_tag(ratio: float | None) -> str:
    return "" if ratio is None else f"ch{round(ratio * 100)}"


def _save_pruned(model: Any, src: Source, folder: Path, rep: dict[str, Any], key: str, command: str) -> Source:
    """Write a pruned tf-keras model (+ its model card and report) atomically -> a Source for it."""
    from edgebrain.converters.source import from_keras_model
    from edgebrain.modelcard import ModelCard

    with atomic_dir(folder, overwrite=True) as tmp:
        model.save(tmp / "model.keras")
        if src.card is not None:
            d = src.card.to_dict()
            d.setdefault("extra", {})[key] = {"from": src.describe(), "report": rep, "command": command}
            ModelCard.from_dict(d).save(tmp)
        atomic_write_json(tmp / f"{key}.json", rep)
    sha = sha256_file(folder / "model.keras")
    rep["pruned_model"] = {"path": str((folder / "model.keras").resolve()), "sha256": sha}
    return from_keras_model(model, src, folder / "model.keras", sha, derived=src.describe())


def _prune_channels(src: Source, dd: _Data, out: Path, *, ratio: float, epochs: int, lr: float,
                    per_class: int | None, command: str) -> tuple[Source, dict[str, Any]]:
    from edgebrain.converters.base import ConversionError
    from edgebrain.converters.channel_pruning import ChannelPruneConfig, prune_channels
    from edgebrain.train import augmenter_from_card

    if src.format != "tf-keras":
        raise ConversionError(
            f"--prune-channels needs a tf-keras model; {src.path} is {src.format}. Convert without "
            "--prune-channels, or prune the model where it was trained.")
    if not dd.available and epochs:
        raise ConversionError("--prune-channels fine-tunes on the train split: the model card's data root is "
                              "missing; pass --data DIR")
    _say(f"channel pruning: removing {ratio:.0%} of the prunable channels, {epochs} fine-tuning epoch(s)")
    empty = (np.zeros((0, *src.spec.size, 3), np.uint8), np.zeros((0,), np.int64))
    tr = dd.arrays("train", src.spec.size, per_class=per_class, resize=src.spec.resize) if epochs else None
    va = dd.arrays("val", src.spec.size, resize=src.spec.resize) if dd.available else None
    cfg = ChannelPruneConfig(ratio=float(ratio), epochs=int(epochs), lr=float(lr))
    # fine-tune with the augmentation the model was trained with (model card), if any
    augment = augmenter_from_card(src.card.training) if src.card is not None and epochs else None
    try:
        pruned, rep = prune_channels(src.model, cfg, src.spec, len(src.class_names),
                                     (tr.x, tr.y) if tr is not None else empty,
                                     (va.x, va.y) if va is not None else empty, augment=augment)
    except EdgebrainError:
        raise
    except Exception as exc:  # Keras / TensorFlow: say which step and which model
        raise EdgebrainError(f"{src.path}: channel pruning failed ({type(exc).__name__}: {str(exc)[:600]}); "
                             "convert without --prune-channels to skip it") from exc
    if per_class:
        rep["fine_tuning"]["per_class_subset"] = per_class
    _say(f"channel pruning: {rep['channels_before']} -> {rep['channels_after']} channels in "
         f"{len(rep['chains'])} chains, MACs x{rep['macs_ratio']}, params x{rep['params_ratio']}")
    new = _save_pruned(pruned, src, out / f"pruned-{_channel_tag(ratio)}", rep, "channel_pruning", command)
    return new, rep


def _prune(src: Source, dd: _Data, out: Path, *, prune: float, epochs: int, structured: bool, lr: float,
           min_params: int, per_class: int | None, command: str, clusters: int | None = None,
           cluster_epochs: int = 1, channel_tag: str = "") -> tuple[Source, dict[str, Any]]:
    from edgebrain.converters.base import ConversionError
    from edgebrain.converters.pruning import PruneConfig, prune_model

    if src.format != "tf-keras":
        raise ConversionError(
            f"--prune needs a tf-keras model (tensorflow-model-optimization works on tf-keras); {src.path} is "
            f"{src.format}. Convert without --prune, or prune the model where it was trained.")
    if not dd.available:
        raise ConversionError("--prune fine-tunes on the train split: the model card's data root is missing; "
                              "pass --data DIR")
    _say(f"pruning to {prune:.0%} sparsity, {epochs} fine-tuning epoch(s)"
         + (f", then {clusters}-cluster sparsity-preserving clustering, {cluster_epochs} epoch(s)" if clusters else ""))
    tr = dd.arrays("train", src.spec.size, per_class=per_class, resize=src.spec.resize)
    va = dd.arrays("val", src.spec.size, resize=src.spec.resize)
    cfg = PruneConfig(sparsity=float(prune), epochs=int(epochs), lr=float(lr), structured=structured,
                      min_params=int(min_params), clusters=clusters, cluster_epochs=int(cluster_epochs))
    try:
        pruned, rep = prune_model(src.model, cfg, src.spec, len(src.class_names), (tr.x, tr.y), (va.x, va.y))
    except EdgebrainError:
        raise
    except Exception as exc:  # tfmot / TensorFlow: say which step and which model, not a bare traceback
        raise EdgebrainError(f"{src.path}: pruning with tensorflow-model-optimization failed "
                             f"({type(exc).__name__}: {str(exc)[:600]}); convert without --prune to skip "
                             "pruning") from exc
    if per_class:
        rep["fine_tuning"]["per_class_subset"] = per_class
    new = _save_pruned(pruned, src, out / _pruned_name(prune, structured, clusters, channel_tag), rep, "pruning",
                       command)
    if clusters:  # the int8 weight-scale rule reads it (converters/base.py weight_scales)
        new.notes["weight_clusters"] = int(clusters)
    return new, rep
