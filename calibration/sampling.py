"""Choose, check, load and cache the calibration images.

Where the images come from (:func:`build_calibration`):

* the model card's calibration split: ``edgebrain.data.splits_for(scan(root), seed, fractions)["calib"]``
  recomputed from the card's data root, split seed and fractions (or ``--data``);
* ``--calib DIR`` in the Kaggle layout (``DIR/Training/<class>/...``: its calibration split is used);
* ``--calib DIR`` with one folder per class (``DIR/<class>/*``), names matching the model's classes;
* ``--calib DIR`` holding images directly (a flat folder: no labels, so no stratification).

The sample is stratified by class (proportional, at least one per class) and seeded. No
calibration image may share content (sha256) with the evaluation set (Testing): split
candidates that do are dropped before sampling, and a user folder that contains any is
refused unless ``allow_overlap`` (then the manifest carries a loud warning).

A model trained on fused MRI+CT input (``preprocess.extra["fusion"]``) is calibrated on fused
pairs, built exactly as in training (:func:`edgebrain.fusion.load_fused_arrays`): candidates
without a CT partner (``ct_dir`` / ``ct_csv``, paired as in ``edgebrain.fusion.CTPairing``) are
skipped and counted in the manifest's ``fusion`` block.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgebrain import data as D
from edgebrain.errors import DataError
from edgebrain.imageio import IMAGE_SUFFIXES
from edgebrain.io import atomic_write_bytes, sha256_file, sha256_text
from edgebrain.preprocess import PreprocessSpec


class CalibrationError(DataError):
    """A calibration set that cannot be used (missing, empty, wrong classes, overlapping Testing)."""


@dataclass
class CalibrationSource:
    kind: str  # "split" (model card / --data) | "kaggle" | "classes" | "flat"
    root: Path
    split: str  # "calib" for split-derived sets, "folder" for user folders
    candidates: list[D.Sample]
    problems: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class CalibrationSet:
    x: np.ndarray  # float32 (N, H, W, C), preprocessed with the model's spec
    y: np.ndarray  # int64 (N,), -1 where unlabelled
    samples: list[D.Sample]
    info: dict[str, Any]

    def __len__(self) -> int:
        return len(self.x)

    def manifest(self, method: str, backend: str) -> dict[str, Any]:
        """The ``calibration`` block of an artifact manifest."""
        return {**self.info, "method": method, "backend": backend}

    def list_text(self) -> str:
        return "".join(f"{s.sha256}  {s.rel}\n" for s in self.samples)

    def batches(self, batch: int = 1) -> list[np.ndarray]:
        return [self.x[i : i + batch] for i in range(0, len(self.x), batch)]


# ----------------------------------------------------------------------------- sources


def _image_files(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        if f.suffix.lower() in IMAGE_SUFFIXES:
            files.append(f)
        else:
            problems.append((str(f), f"not an image file ({f.suffix or 'no suffix'}); ignored"))
    return files, problems


def folder_samples(calib_dir: str | Path, class_names: Sequence[str], *, split_seed: int = 42,
                   fractions: dict[str, float] | None = None) -> CalibrationSource:
    """Index a ``--calib`` folder (Kaggle layout, one folder per class, or flat)."""
    root = Path(calib_dir)
    if not root.exists():
        raise CalibrationError(f"calibration folder not found: {root}")
    if not root.is_dir():
        raise CalibrationError(f"--calib must be a folder of images, got a file: {root}")
    names = list(class_names)
    if any((root / d).is_dir() for d in D.SPLIT_DIRS):
        ds = D.scan(root)
        unknown = sorted(set(ds.class_names) - set(names))
        if unknown:
            raise CalibrationError(
                f"{root}: class folders {unknown} are not among the model's classes {names}; "
                "calibration images must come from the model's own classes"
            )
        if not ds.split("Training"):
            raise CalibrationError(f"{root}: Kaggle layout without Training/ images: nothing to calibrate on "
                                   "(Testing is for evaluation only)")
        calib = D.splits_for(ds, split_seed, fractions)["calib"]
        relabelled = [D.Sample(s.path, names.index(s.class_name), s.class_name, "calib", s.sha256) for s in calib]
        return CalibrationSource("kaggle", root, "calib", relabelled, list(ds.problems))
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    flat, problems = _image_files(root)
    if subdirs:
        unknown = sorted(d.name for d in subdirs if d.name not in names)
        if unknown:
            raise CalibrationError(
                f"{root}: class folders {unknown} are not among the model's classes {names}; "
                "name the folders after the model's classes (or use a flat folder of images)"
            )
        samples: list[D.Sample] = []
        for d in subdirs:
            files, probs = _image_files(d)
            problems += probs
            for f in files:
                samples.append(D.Sample(f, names.index(d.name), d.name, "folder", _hash(f, problems)))
        for f in flat:
            problems.append((str(f), "image outside the class folders; ignored"))
        samples = [s for s in samples if s.sha256]
        if not samples:
            raise CalibrationError(f"{root}: the class folders hold no images")
        have = {s.class_name for s in samples}
        for cls in names:
            if cls not in have:  # the int8 ranges never see this class's images: said, not hidden
                problems.append((str(root / cls), f"no calibration image of class {cls!r}: the int8 ranges are "
                                                  "fitted without it"))
        return CalibrationSource("classes", root, "folder", samples, problems)
    samples = [D.Sample(f, -1, "unlabelled", "folder", _hash(f, problems)) for f in flat]
    samples = [s for s in samples if s.sha256]
    if not samples:
        raise CalibrationError(f"{root}: empty calibration folder (no images found)")
    return CalibrationSource("flat", root, "folder", samples, problems)


def _hash(f: Path, problems: list[tuple[str, str]]) -> str:
    try:
        return sha256_file(f)
    except OSError as exc:
        problems.append((str(f), f"unreadable: {exc}"))
        return ""


def split_source(data_root: str | Path, class_names: Sequence[str], split_seed: int,
                 fractions: dict[str, float] | None) -> CalibrationSource:
    ds = D.scan(data_root)
    if list(ds.class_names) != list(class_names):
        raise CalibrationError(
            f"{data_root}: dataset classes {ds.class_names} differ from the model's classes {list(class_names)}"
        )
    calib = D.splits_for(ds, split_seed, fractions)["calib"]
    if not calib:
        raise CalibrationError(f"{data_root}: the calibration split is empty (fractions {fractions})")
    return CalibrationSource("split", Path(data_root), "calib", calib, list(ds.problems))


def eval_hashes(root: str | Path) -> set[str]:
    """Content hashes of the evaluation set (the Testing folder) of a dataset root."""
    ds = D.scan(root)
    return {s.sha256 for s in ds.split("Testing")}


# ----------------------------------------------------------------------------- sampling


def stratified_sample(samples: Sequence[D.Sample], n: int, seed: int) -> list[D.Sample]:
    """``n`` samples, per-class proportional (largest remainder, at least one per class), seeded.
    Unlabelled samples (label -1) are sampled uniformly."""
    pool = sorted(samples, key=lambda s: s.rel)
    if n >= len(pool):
        return pool
    rng = np.random.default_rng(seed)
    by: dict[int, list[D.Sample]] = defaultdict(list)
    for s in pool:
        by[s.label].append(s)
    labels = sorted(by)
    total = len(pool)
    quota = {k: n * len(by[k]) / total for k in labels}
    alloc = {k: min(len(by[k]), max(1 if n >= len(labels) else 0, int(np.floor(q)))) for k, q in quota.items()}
    rest = n - sum(alloc.values())
    order = sorted(labels, key=lambda k: (-(quota[k] - np.floor(quota[k])), k))
    while rest > 0:
        progressed = False
        for k in order:
            if rest and alloc[k] < len(by[k]):
                alloc[k] += 1
                rest -= 1
                progressed = True
        if not progressed:
            break
    while rest < 0:  # the one-per-class floor overshot: take back from the largest classes
        k = max(labels, key=lambda k: alloc[k])
        alloc[k] -= 1
        rest += 1
    out: list[D.Sample] = []
    for k in labels:
        idx = rng.permutation(len(by[k]))[: alloc[k]]
        out.extend(by[k][i] for i in sorted(idx))
    return sorted(out, key=lambda s: s.rel)


def _paired_candidates(candidates: Sequence[D.Sample], mri_root: Path, ct_dir: str | Path | None,
                       ct_csv: str | Path | None) -> tuple[list[D.Sample], Any, dict[str, Any]]:
    """The candidates that have a CT partner, the pairing, and the record of the CT source."""
    from edgebrain.fusion import CTPairing, FusionError

    try:
        pairing = CTPairing(ct_dir=ct_dir, csv_path=ct_csv, mri_root=mri_root)
    except FusionError as exc:
        raise CalibrationError(f"calibration CT images: {exc}") from exc
    kept: list[D.Sample] = []
    unpaired: list[str] = []
    for s in candidates:
        ct, why = pairing.partner(s.path)
        if ct is None:
            unpaired.append(f"{s.path}: {why}")
        else:
            kept.append(s)
    if not kept:
        raise CalibrationError(f"none of the {len(candidates)} calibration candidates in {mri_root} has a CT "
                               f"partner ({unpaired[0] if unpaired else 'no candidates'}); give the CT images of "
                               "the calibration split (--ct-dir DIR or --ct-csv CSV)")
    info = {**pairing.describe(), "candidates_before_pairing": len(candidates), "unpaired_skipped": len(unpaired),
            "unpaired_examples": unpaired[:5]}
    return kept, pairing, info


def _list_hash(samples: Sequence[D.Sample]) -> str:
    return sha256_text("".join(f"{s.sha256}  {s.rel}\n" for s in sorted(samples, key=lambda s: s.rel)))


def _tensor_cache(samples: Sequence[D.Sample], spec: PreprocessSpec) -> Path:
    key = sha256_text(_list_hash(samples) + json.dumps(spec.to_dict(), sort_keys=True))[:24]
    return D.cache_dir() / f"calib-{key}.npz"


def build_calibration(
    spec: PreprocessSpec,
    class_names: Sequence[str],
    size: int = 256,
    seed: int = 0,
    *,
    calib_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    split_seed: int = 42,
    fractions: dict[str, float] | None = None,
    allow_overlap: bool = False,
    use_cache: bool = True,
    ct_dir: str | Path | None = None,
    ct_csv: str | Path | None = None,
) -> CalibrationSet:
    """Select and preprocess a calibration set; refuse overlap with the evaluation set.

    ``data_root`` is the model's dataset (from its card or ``--data``): its calibration split
    is the default source and its Testing folder the evaluation set checked for overlap.
    ``ct_dir`` / ``ct_csv``: the CT images of a model whose ``spec`` records an MRI+CT fusion
    (required for such a model, refused for any other); MRI paths pair relative to the folder
    the calibration images come from.
    """
    from edgebrain.fusion import fusion_of

    if size < 1:
        raise CalibrationError(f"--calib-size must be >= 1, got {size}")
    fusion = fusion_of(spec)
    if fusion is None and (ct_dir is not None or ct_csv is not None):
        raise CalibrationError("CT images (--ct-dir / --ct-csv) were given but the model's preprocessing records "
                               "no MRI+CT fusion: it takes plain MRI. Drop the CT option.")
    if fusion is not None and ct_dir is None and ct_csv is None:
        raise CalibrationError(f"the model was trained on fused MRI+CT input ({fusion.method}, mode {fusion.mode}): "
                               "calibration needs the CT images (--ct-dir DIR or --ct-csv CSV)")
    if calib_dir is not None:
        src = folder_samples(calib_dir, class_names, split_seed=split_seed, fractions=fractions)
    elif data_root is not None:
        src = split_source(data_root, class_names, split_seed, fractions)
    else:
        raise CalibrationError(
            "quantisation needs calibration images: pass --calib DIR (a folder of images, one folder per "
            "class, or a dataset in the Kaggle layout), or --data DIR, or convert a model with a model card"
        )
    warnings: list[str] = [f"{p}: {r}" for p, r in src.problems[:20]]

    # The evaluation set: Testing of the model's dataset and of a Kaggle-layout --calib folder.
    roots = [Path(r) for r in (data_root, calib_dir if src.kind == "kaggle" else None) if r is not None]
    roots = [r for r in roots if (r / "Testing").is_dir()]
    eval_set: set[str] = set()
    for r in roots:
        eval_set |= eval_hashes(r)
    overlap_check: dict[str, Any]
    candidates = list(src.candidates)
    excluded = 0
    if not roots:
        overlap_check = {"checked": False,
                         "reason": "no evaluation set known (pass --data DIR with a Testing/ folder)"}
        warnings.append("calibration images were NOT checked against the evaluation set: no Testing/ folder "
                        "known (pass --data DIR)")
    elif src.kind in ("split", "kaggle"):
        kept = [s for s in candidates if s.sha256 not in eval_set]
        excluded = len(candidates) - len(kept)
        candidates = kept
        overlap_check = {"checked": True, "eval_roots": [str(r) for r in roots], "eval_n": len(eval_set),
                         "excluded_from_candidates": excluded, "overlap": 0}
    else:
        bad = [s for s in candidates if s.sha256 in eval_set]
        overlap_check = {"checked": True, "eval_roots": [str(r) for r in roots], "eval_n": len(eval_set),
                         "overlap": len(bad)}
        if bad:
            names = ", ".join(str(s.path) for s in bad[:5]) + (" ..." if len(bad) > 5 else "")
            msg = (f"{len(bad)} calibration image(s) in {src.root} have the same content as images in the "
                   f"evaluation set (Testing): {names}")
            if not allow_overlap:
                raise CalibrationError(
                    msg + ". Calibrating on evaluation images makes the reported accuracy optimistic. Remove "
                    "them, or pass --allow-overlap to proceed anyway (recorded in the manifest)."
                )
            loud = "WARNING: " + msg + " (--allow-overlap): accuracy measured on Testing is optimistic"
            print(loud, file=sys.stderr)
            warnings.append(loud)
            overlap_check["allowed"] = True
    if not candidates:
        raise CalibrationError(f"{src.root}: no calibration candidates left after removing evaluation-set images")

    pairing: Any = None
    fusion_info: dict[str, Any] | None = None
    if fusion is not None:
        candidates, pairing, fusion_info = _paired_candidates(candidates, src.root, ct_dir, ct_csv)
        fusion_info = {**fusion.to_dict(), **fusion_info}
        if fusion_info["unpaired_skipped"]:
            warnings.append(f"{fusion_info['unpaired_skipped']} calibration candidate(s) have no CT partner: "
                            f"skipped (first: {fusion_info['unpaired_examples'][0]})")

    chosen = stratified_sample(candidates, size, seed)
    if len(chosen) < size:
        warnings.append(f"asked for {size} calibration images; only {len(chosen)} available in {src.root}")

    cpath = _tensor_cache(chosen, spec)
    x: np.ndarray | None = None
    failed: list[tuple[str, str]] = []
    samples = chosen
    if fusion is not None:  # load_fused_arrays caches by MRI and CT content
        from edgebrain.fusion import load_fused_arrays

        arr = load_fused_arrays(chosen, pairing, fusion, spec.size, use_cache=use_cache, desc="calibration")
        failed = arr.failed
        samples = arr.samples
        x = spec.apply(arr.x).astype(np.float32) if len(arr.x) else np.zeros((0, *spec.size, 3), np.float32)
    elif use_cache and cpath.is_file():
        try:
            z = np.load(cpath, allow_pickle=False)
            ok = set(z["ok"].tolist())
            samples = [s for s in chosen if s.rel in ok]
            x = z["x"]
            if len(x) != len(samples):
                x = None
            failed = [(str(s.path), "failed to decode (cached)") for s in chosen if s.rel not in ok]
        except Exception:
            x = None
    if x is None:
        arr = D.load_arrays(chosen, spec.size, use_cache=use_cache, desc="calibration", resize=spec.resize)
        failed = arr.failed
        samples = arr.samples
        x = spec.apply(arr.x).astype(np.float32) if len(arr.x) else np.zeros((0, *spec.size, 3), np.float32)
        if use_cache and len(x):
            import io

            buf = io.BytesIO()
            np.savez(buf, x=x, ok=np.array([s.rel for s in samples]))
            atomic_write_bytes(cpath, buf.getvalue())
    for p, r in failed:
        warnings.append(f"calibration image skipped: {p}: {r}")
    if not samples:
        raise CalibrationError(f"{src.root}: none of the {len(chosen)} chosen calibration images could be read")

    labelled = all(s.label >= 0 for s in samples)
    per_class = D.class_counts(samples, class_names) if labelled else None
    info = {
        "source": src.kind,
        "root": str(src.root),
        "split": src.split,
        "size": len(samples),
        "requested_size": size,
        "seed": seed,
        "split_seed": split_seed if src.kind in ("split", "kaggle") else None,
        "fractions": fractions if src.kind in ("split", "kaggle") else None,
        "stratified": labelled,
        "per_class": per_class,
        "list_hash": _list_hash(samples),
        "candidates": len(candidates),
        "overlap_check": overlap_check,
        "preprocess": spec.name,
        "warnings": warnings,
    }
    if fusion_info is not None and pairing is not None:
        cts = [pairing.find(s.path) for s in samples]
        fusion_info["pairs"] = len(samples)
        fusion_info["ct_list_hash"] = sha256_text("".join(f"{sha256_file(c)}  {s.rel}\n"
                                                          for s, c in zip(samples, cts) if c is not None))
        info["fusion"] = fusion_info
    y = np.array([s.label for s in samples], np.int64)
    return CalibrationSet(x=x, y=y, samples=list(samples), info=info)
