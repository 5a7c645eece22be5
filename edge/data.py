"""The Kaggle Brain Tumor MRI layout: ``<root>/{Training,Testing}/<class>/<image>``.

* deterministic, stratified, seeded splits of Training into train / val / calib;
  Testing is only ever used for evaluation;
* exact-duplicate detection by content hash (within and across splits) and the
  deduplicated evaluation list;
* decoding to uint8 arrays at a model's input size, cached on disk, with every
  unreadable file reported by name (never silently dropped).
"""

from __future__ import annotations

import errno
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import DataError, ImageLoadError
from .imageio import IMAGE_SUFFIXES, load_for_model
from .io import atomic_write_bytes, read_json, sha256_file, sha256_text

SPLIT_DIRS = ("Training", "Testing")
DEFAULT_FRACTIONS = {"val": 0.10, "calib": 0.05}


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    class_name: str
    split: str  # Training | Testing (folder), refined later to train/val/calib/test
    sha256: str

    @property
    def rel(self) -> str:
        return f"{self.split}/{self.class_name}/{self.path.name}"


@dataclass
class Dataset:
    root: Path
    class_names: list[str]
    samples: list[Sample]
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) found while scanning

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    @property
    def manifest_hash(self) -> str:
        """Hash of (relative path, content hash) for every sample: identifies the data a model saw."""
        lines = sorted(f"{s.sha256}  {s.rel}" for s in self.samples)
        return sha256_text("\n".join(lines))


def default_data_dir() -> Path:
    """``$EDGEBRAIN_DATA`` or the project's shared copy beside the checkout."""
    env = os.environ.get("EDGEBRAIN_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in [Path.cwd(), *Path.cwd().parents, *here.parents]:
        cand = parent / "shared" / "data" / "brain-tumor-mri-224"
        if cand.is_dir():
            return cand
        cand = parent.parent / "shared" / "data" / "brain-tumor-mri-224"
        if cand.is_dir():
            return cand
    return Path("../shared/data/brain-tumor-mri-224")


def _read_manifest(root: Path) -> dict[str, str]:
    mf = root / "MANIFEST.sha256"
    out: dict[str, str] = {}
    if mf.is_file():
        for line in mf.read_text().splitlines():
            parts = line.strip().split(None, 1)
            if len(parts) == 2:
                out[parts[1].lstrip("*")] = parts[0]
    return out


def scan(root: str | Path, verify_hashes: bool = False) -> Dataset:
    """Index a dataset folder. Hashes come from MANIFEST.sha256 when present (checked if asked)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"dataset folder not found: {root}. Point --data at a folder with Training/ and Testing/ "
            "(the Kaggle Brain Tumor MRI layout), or set EDGEBRAIN_DATA."
        )
    splits = [d for d in SPLIT_DIRS if (root / d).is_dir()]
    if not splits:
        raise DataError(f"{root} has neither Training/ nor Testing/ folders")
    classes = sorted({c.name for d in splits for c in (root / d).iterdir() if c.is_dir()})
    if not classes:
        raise DataError(f"{root}: no class folders under {', '.join(splits)}")
    known = _read_manifest(root)
    samples: list[Sample] = []
    problems: list[tuple[str, str]] = []
    for split in splits:  # what lies beside the class folders is not silently ignored either
        for f in _entries(root / split, problems):
            if not f.name.startswith(".") and not f.is_dir():
                problems.append((str(f), entry_problem(f) or "a file outside any class folder"))
    for split in splits:
        for ci, cname in enumerate(classes):
            cdir = root / split / cname
            if not cdir.is_dir():
                continue
            for f in _entries(cdir, problems):
                if f.name.startswith("."):
                    continue
                why = entry_problem(f)
                if why:
                    problems.append((str(f), why))
                    continue
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    problems.append((str(f), f"unsupported file type {f.suffix or '(none)'}"))
                    continue
                rel = f"{split}/{cname}/{f.name}"
                try:
                    h = known.get(rel)
                    if h is None or verify_hashes:
                        actual = sha256_file(f)
                        if h is not None and actual != h:
                            problems.append((str(f), "content differs from MANIFEST.sha256"))
                        h = actual
                except OSError as exc:
                    problems.append((str(f), f"unreadable: {exc}"))
                    continue
                samples.append(Sample(f, ci, cname, split, h))
    return Dataset(root, classes, samples, problems)


def _entries(folder: Path, problems: list[tuple[str, str]]) -> list[Path]:
    """A folder's entries, sorted; an unreadable folder is a problem, listed, not a crash."""
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        problems.append((str(folder), f"cannot list this folder ({exc.strerror or exc})"))
        return []


def entry_problem(f: Path) -> str | None:
    """Why a dataset entry is not a readable image file (dangling link, link loop, folder, socket ...)."""
    if f.is_symlink():
        try:
            f.resolve(strict=True)
        except RuntimeError:
            return "symbolic link loop"
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "symbolic link loop"
            return "dangling symbolic link (its target does not exist)"
    if f.is_dir():
        return "a folder where an image file was expected"
    if not f.is_file():
        return "not a regular file (socket, FIFO or device)"
    return None


def stratified_split(
    samples: Sequence[Sample],
    fractions: dict[str, float] | None = None,
    seed: int = 42,
) -> dict[str, list[Sample]]:
    """Split (Training) samples into train + the named fractions, per class, seeded.

    Exact duplicates are kept together (grouped by content hash), so one image never
    lands in two splits: calibration and validation stay disjoint from training.
    """
    fractions = dict(DEFAULT_FRACTIONS if fractions is None else fractions)
    if sum(fractions.values()) >= 1.0:
        raise ValueError("split fractions must sum to < 1")
    rng = np.random.default_rng(seed)
    out: dict[str, list[Sample]] = {"train": [], **{k: [] for k in fractions}}
    by_class: dict[int, dict[str, list[Sample]]] = defaultdict(lambda: defaultdict(list))
    for s in sorted(samples, key=lambda s: s.rel):
        by_class[s.label][s.sha256].append(s)
    for label in sorted(by_class):
        groups = list(by_class[label].values())
        order = rng.permutation(len(groups))
        groups = [groups[i] for i in order]
        n = sum(len(g) for g in groups)
        targets = {k: int(round(v * n)) for k, v in fractions.items()}
        gi = 0
        for name, want in targets.items():
            got = 0
            while gi < len(groups) and got < want:
                out[name].extend(groups[gi])
                got += len(groups[gi])
                gi += 1
        for g in groups[gi:]:
            out["train"].extend(g)
    return out


def splits_for(ds: Dataset, seed: int = 42, fractions: dict[str, float] | None = None) -> dict[str, list[Sample]]:
    """train/val/calib from Training (seeded, stratified) + test = Testing."""
    tr = ds.split("Training")
    if not tr:
        raise DataError(f"{ds.root}: no Training images")
    out = stratified_split(tr, fractions, seed)
    out["test"] = ds.split("Testing")
    return out


# ----------------------------------------------------------------------------- duplicates


def duplicate_groups(samples: Iterable[Sample]) -> list[list[Sample]]:
    by_hash: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_hash[s.sha256].append(s)
    return [sorted(g, key=lambda s: s.rel) for g in by_hash.values() if len(g) > 1]


def dedup_eval(ds: Dataset, eval_split: str = "Testing", train_split: str = "Training") -> list[Sample]:
    """Evaluation list with exact duplicates removed: drop every image whose content also
    appears in the training folder, and keep one image of each duplicate group within it."""
    train_hashes = {s.sha256 for s in ds.split(train_split)}
    seen: set[str] = set()
    out: list[Sample] = []
    for s in sorted(ds.split(eval_split), key=lambda s: s.rel):
        if s.sha256 in train_hashes or s.sha256 in seen:
            continue
        seen.add(s.sha256)
        out.append(s)
    return out


def write_list(path: str | Path, samples: Sequence[Sample]) -> None:
    text = "".join(f"{s.sha256}  {s.rel}\n" for s in samples)
    atomic_write_bytes(path, text.encode())


def read_list(path: str | Path, ds: Dataset) -> list[Sample]:
    """Read a list written by :func:`write_list` (sha256 + relative path) against a dataset."""
    by_rel = {s.rel: s for s in ds.samples}
    out: list[Sample] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.strip().split(None, 1)
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in by_rel:
            raise DataError(f"{path}:{n}: not in {ds.root}: {line.strip()!r}")
        out.append(by_rel[parts[1]])
    return out


def check(root: str | Path, verify_hashes: bool = True, decode: bool = True,
          progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None) -> dict[str, Any]:
    """Counts, unreadable files and duplicates for ``edgebrain data check``."""
    ds = scan(root, verify_hashes=verify_hashes)
    problems = list(ds.problems)
    bad: set[str] = set()
    if decode:
        from .imageio import load_rgb

        it: Iterable[Sample] = ds.samples
        if progress is not None:
            it = progress(ds.samples, len(ds.samples))
        for s in it:
            try:
                rgb = load_rgb(s.path)
            except ImageLoadError as exc:
                problems.append((str(s.path), exc.reason))
                bad.add(s.rel)
                continue
            if rgb.size and int(rgb.min()) == int(rgb.max()):
                problems.append((str(s.path), f"decodes to a constant image (every pixel {int(rgb.min())})"))
    counts: dict[str, dict[str, int]] = {}
    for sp in SPLIT_DIRS:
        c = Counter(s.class_name for s in ds.split(sp))
        if c:
            counts[sp] = {k: c.get(k, 0) for k in ds.class_names} | {"total": sum(c.values())}
    groups = duplicate_groups(ds.samples)
    cross = [g for g in groups if len({s.split for s in g}) > 1]
    cross_class = [g for g in groups if len({s.class_name for s in g}) > 1]
    within = {sp: sum(1 for g in groups if sum(s.split == sp for s in g) > 1) for sp in counts}
    dd = dedup_eval(ds) if ds.split("Testing") else []
    return {
        "root": str(ds.root),
        "classes": ds.class_names,
        "counts": counts,
        "images": len(ds.samples),
        "unique_images": len({s.sha256 for s in ds.samples}),
        "problems": [{"path": p, "problem": r} for p, r in problems],
        "duplicates": {
            "groups": len(groups),
            "files_in_groups": sum(len(g) for g in groups),
            "groups_across_splits": len(cross),
            "groups_across_classes": len(cross_class),
            "groups_within_split": within,
            "examples": [[s.rel for s in g] for g in groups[:5]],
        },
        "dedup_testing": {"images": len(dd), "removed": len(ds.split("Testing")) - len(dd)},
        "manifest_hash": ds.manifest_hash,
        "_dataset": ds,
        "_dedup": dd,
    }


# ----------------------------------------------------------------------------- arrays


def cache_dir() -> Path:
    d = Path(os.environ.get("EDGEBRAIN_CACHE", Path.home() / ".cache" / "edgebrain"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass
class Arrays:
    x: np.ndarray  # uint8 (N, H, W, 3)
    y: np.ndarray  # int64 (N,)
    samples: list[Sample]  # the ones that loaded, aligned with x/y
    failed: list[tuple[str, str]]  # (path, reason) of those that did not


def load_arrays(samples: Sequence[Sample], size: tuple[int, int], use_cache: bool = True,
                desc: str = "decoding", resize: str = "bilinear") -> Arrays:
    """Decode samples to uint8 RGB at ``size`` (resampled with ``resize``, the model card's method).
    Failures are returned, never hidden."""
    tag = f"{size}" if resize == "bilinear" else f"{size}:{resize}"
    key = sha256_text(f"{tag}|" + "|".join(f"{s.sha256}:{s.rel}" for s in samples))[:24]
    cpath = cache_dir() / f"arrays-{key}.npz"
    if use_cache and cpath.is_file():
        try:
            z = np.load(cpath, allow_pickle=False)
            ok = set(z["ok"].tolist())
            kept = [s for s in samples if s.rel in ok]
            failed = [tuple(x) for x in read_json(str(cpath) + ".failed.json")]
            return Arrays(z["x"], z["y"], kept, failed)  # type: ignore[arg-type]
        except Exception:
            pass  # rebuild a damaged cache
    from .progress import track

    xs: list[np.ndarray] = []
    kept: list[Sample] = []
    failed: list[tuple[str, str]] = []
    for s in track(samples, description=f"{desc} {len(samples)} images @ {size[0]}x{size[1]}"):
        try:
            xs.append(load_for_model(s.path, size, resize))
            kept.append(s)
        except ImageLoadError as exc:
            failed.append((str(s.path), exc.reason))
    x = np.stack(xs) if xs else np.zeros((0, size[0], size[1], 3), np.uint8)
    y = np.array([s.label for s in kept], np.int64)
    if use_cache:
        import io as _io
        import json

        buf = _io.BytesIO()
        np.savez(buf, x=x, y=y, ok=np.array([s.rel for s in kept]))
        atomic_write_bytes(cpath, buf.getvalue())
        atomic_write_bytes(str(cpath) + ".failed.json", json.dumps(failed).encode())
    return Arrays(x, y, kept, failed)


def class_counts(samples: Sequence[Sample], class_names: Sequence[str]) -> dict[str, int]:
    c = Counter(s.class_name for s in samples)
    return {k: c.get(k, 0) for k in class_names}


def subset(samples: Sequence[Sample], per_class: int, seed: int = 0) -> list[Sample]:
    """A fixed, stratified subset: ``per_class`` images of each class, seeded."""
    rng = np.random.default_rng(seed)
    by: dict[int, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: s.rel):
        by[s.label].append(s)
    out: list[Sample] = []
    for label in sorted(by):
        g = by[label]
        idx = rng.permutation(len(g))[:per_class]
        out.extend(g[i] for i in sorted(idx))
    return out
