"""Pixel-level MRI + CT fusion for co-registered image pairs (TensorFlow-free).

* pairing: a CT folder that mirrors the MRI layout (same relative path and stem, any image
  suffix; or a unique stem anywhere under it), or a CSV with ``mri,ct`` columns. Every
  unpaired MRI file is named in the error.
* fusion of the two grey images: ``weighted`` average, ``laplacian`` pyramid (max-abs detail,
  weighted base) and ``wavelet`` (PyWavelets ``wavedec2``: max-abs detail, weighted
  approximation).
* model input: ``mode="rgb"`` gives R = MRI, G = CT, B = fused; ``mode="fused"`` the fused
  grey image in all three channels.
* :func:`load_fused` - one pair from disk to the uint8 RGB array a model (or
  ``edgebrain.predict.Predictor``) takes; :func:`load_fused_arrays` - a dataset's worth.
* :func:`synthetic_ct` - a CT-like rendering of an MRI slice (bone-window style remap, a
  bright skull ring, blur, noise). It exists to exercise the pipeline; it is not CT.

A model trained with fusion records :class:`FusionSpec` in ``preprocess.extra["fusion"]``;
:func:`fusion_of` reads it back from a spec, card or manifest.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from .errors import DataError, ImageLoadError
from .imageio import IMAGE_SUFFIXES, load_rgb, resize_rgb

PathLike = Union[str, Path]
METHODS = ("weighted", "laplacian", "wavelet")
MODES = ("rgb", "fused")
MAX_LISTED = 10


class FusionError(DataError):
    """Missing or unpaired CT input, or a bad fusion setting."""


# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class FusionSpec:
    method: str = "wavelet"
    mode: str = "rgb"  # rgb: R=MRI, G=CT, B=fused | fused: fused grey x3
    weight: float = 0.5  # MRI weight in the average / base band / approximation band
    levels: int = 3  # pyramid / wavelet levels
    wavelet: str = "haar"

    def validated(self) -> FusionSpec:
        if self.method not in METHODS:
            raise FusionError(f"unknown fusion method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.mode not in MODES:
            raise FusionError(f"unknown fusion mode {self.mode!r}; choose from {', '.join(MODES)}")
        if not 0.0 <= self.weight <= 1.0:
            raise FusionError(f"fusion weight must be in [0, 1], got {self.weight}")
        if self.levels < 1:
            raise FusionError(f"fusion levels must be >= 1, got {self.levels}")
        if self.method == "wavelet":
            if self.wavelet not in _pywt().wavelist(kind="discrete"):
                raise FusionError(f"unknown discrete wavelet {self.wavelet!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "channels": "R=MRI,G=CT,B=fused" if self.mode == "rgb" else "fused x3"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FusionSpec:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known}).validated()


def _pywt() -> Any:
    try:
        import pywt
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise FusionError("wavelet fusion needs PyWavelets: pip install 'edgebrain[fusion]'") from exc
    return pywt


def fusion_of(obj: Any) -> FusionSpec | None:
    """The fusion a model expects, from a PreprocessSpec, ModelCard, Artifact, manifest or
    card dict (None when it takes plain MRI)."""
    pre: Any = obj
    if hasattr(obj, "manifest"):  # Artifact
        pre = obj.manifest.get("preprocess") or {}
    elif hasattr(obj, "preprocess") and not isinstance(obj, dict):  # ModelCard
        pre = obj.preprocess
    elif isinstance(obj, dict) and "preprocess" in obj:
        pre = obj["preprocess"]
    extra = pre.get("extra") if isinstance(pre, dict) else getattr(pre, "extra", None)
    f = (extra or {}).get("fusion")
    return FusionSpec.from_dict(f) if f else None


def require_plain_input(obj: Any, what: str = "this model") -> None:
    """For commands that only feed plain MRI: refuse a model that expects MRI+CT fusion."""
    f = fusion_of(obj)
    if f is not None:
        raise FusionError(
            f"{what} was trained on fused MRI+CT input ({f.method}, mode {f.mode}); plain MRI images would "
            "give meaningless predictions. Give the CT images (edgebrain predict / bench: --ct-dir DIR or "
            "--ct-csv CSV), or build inputs with edgebrain.fusion.load_fused(mri, ct, spec).")


def require_fused_input(obj: Any, what: str = "this model") -> FusionSpec:
    """For commands given CT images: refuse a model that takes plain MRI; return its fusion."""
    f = fusion_of(obj)
    if f is None:
        raise FusionError(
            f"{what} takes plain MRI images (its preprocessing records no MRI+CT fusion); CT images "
            "(--ct-dir / --ct-csv) are only for models trained with --fuse. Drop the CT option.")
    return f


# ----------------------------------------------------------------------------- fusion maths


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) or grey (H, W) -> float32 luma in [0, 1] (ITU-R BT.601)."""
    a = np.asarray(rgb)
    if a.ndim == 2:
        g = a.astype(np.float32)
    elif a.ndim == 3 and a.shape[-1] in (1, 3, 4):
        a = a[..., :3].astype(np.float32)
        g = a[..., 0] if a.shape[-1] == 1 else a @ np.array([0.299, 0.587, 0.114], np.float32)
    else:
        raise ValueError(f"expected an image (H, W) or (H, W, C); got shape {a.shape}")
    return g / 255.0 if np.asarray(rgb).dtype == np.uint8 or g.max() > 1.0 else g


def fuse_weighted(mri: np.ndarray, ct: np.ndarray, weight: float = 0.5) -> np.ndarray:
    return (weight * mri + (1.0 - weight) * ct).astype(np.float32)


def _down(x: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, 1.0, mode="reflect")[::2, ::2]


def _up(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    y = np.repeat(np.repeat(x, 2, axis=0), 2, axis=1)[: shape[0], : shape[1]]
    return gaussian_filter(y, 1.0, mode="reflect")


def laplacian_pyramid(x: np.ndarray, levels: int) -> list[np.ndarray]:
    """[L0, ..., L_{n-1}, G_n]: band-pass levels then the low-pass residual (exactly invertible)."""
    pyr: list[np.ndarray] = []
    g = x.astype(np.float32)
    for _ in range(levels):
        if min(g.shape) < 2:
            break
        d = _down(g)
        pyr.append(g - _up(d, g.shape))
        g = d
    pyr.append(g)
    return pyr


def reconstruct_laplacian(pyr: Sequence[np.ndarray]) -> np.ndarray:
    g = pyr[-1]
    for lap in reversed(pyr[:-1]):
        g = lap + _up(g, lap.shape)
    return g


def _max_abs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(np.abs(a) >= np.abs(b), a, b)


def fuse_laplacian(mri: np.ndarray, ct: np.ndarray, levels: int = 3, weight: float = 0.5) -> np.ndarray:
    pa, pb = laplacian_pyramid(mri, levels), laplacian_pyramid(ct, levels)
    fused = [_max_abs(a, b) for a, b in zip(pa[:-1], pb[:-1])]
    fused.append(weight * pa[-1] + (1.0 - weight) * pb[-1])
    return reconstruct_laplacian(fused).astype(np.float32)


def fuse_wavelet(mri: np.ndarray, ct: np.ndarray, levels: int = 3, wavelet: str = "haar",
                 weight: float = 0.5) -> np.ndarray:
    pywt = _pywt()
    lv = max(1, min(levels, pywt.dwt_max_level(min(mri.shape), wavelet)))
    ca = pywt.wavedec2(mri, wavelet, level=lv)
    cb = pywt.wavedec2(ct, wavelet, level=lv)
    out: list[Any] = [weight * ca[0] + (1.0 - weight) * cb[0]]
    for da, db in zip(ca[1:], cb[1:]):
        out.append(tuple(_max_abs(x, y) for x, y in zip(da, db)))
    rec = pywt.waverec2(out, wavelet)
    return rec[: mri.shape[0], : mri.shape[1]].astype(np.float32)


def fuse_gray(mri: np.ndarray, ct: np.ndarray, spec: FusionSpec) -> np.ndarray:
    """Two float grey images in [0, 1] (same shape) -> fused float grey in [0, 1]."""
    if mri.shape != ct.shape:
        raise FusionError(f"MRI {mri.shape} and CT {ct.shape} differ in shape")
    if spec.method == "weighted":
        f = fuse_weighted(mri, ct, spec.weight)
    elif spec.method == "laplacian":
        f = fuse_laplacian(mri, ct, spec.levels, spec.weight)
    elif spec.method == "wavelet":
        f = fuse_wavelet(mri, ct, spec.levels, spec.wavelet, spec.weight)
    else:
        raise FusionError(f"unknown fusion method {spec.method!r}")
    return np.clip(f, 0.0, 1.0)


def fuse(mri: np.ndarray, ct: np.ndarray, spec: FusionSpec | None = None) -> np.ndarray:
    """Co-registered MRI and CT images (uint8 RGB or grey; CT resampled to the MRI grid when
    the sizes differ) -> the uint8 RGB model input."""
    spec = (spec or FusionSpec()).validated()
    m = np.asarray(mri)
    c = np.asarray(ct)
    if c.shape[:2] != m.shape[:2]:
        c3 = c if c.ndim == 3 else np.stack([c] * 3, -1)
        c = resize_rgb(c3.astype(np.uint8), (m.shape[0], m.shape[1]), "bilinear")
    gm, gc = to_gray(m), to_gray(c)
    f = fuse_gray(gm, gc, spec)
    chans = [gm, gc, f] if spec.mode == "rgb" else [f, f, f]
    return np.clip(np.rint(np.stack(chans, -1) * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- pairing


def _rel_stem(p: Path, root: Path) -> str:
    return p.relative_to(root).with_suffix("").as_posix()


class CTPairing:
    """Finds the CT image for each MRI image: by name under ``ct_dir`` or from a CSV.

    By name: ``<ct_dir>/<same relative path>`` with any image suffix (``Training/glioma/x.png``
    for ``Training/glioma/x.jpg``), else a file with the same stem anywhere under ``ct_dir``
    if exactly one exists. CSV: a header with ``mri`` and ``ct`` columns; ``mri`` paths are
    relative to the MRI dataset root (or absolute), ``ct`` paths relative to ``ct_dir`` when
    given, else to the CSV's folder (or absolute)."""

    def __init__(self, ct_dir: PathLike | None = None, csv_path: PathLike | None = None,
                 mri_root: PathLike | None = None) -> None:
        if ct_dir is None and csv_path is None:
            raise FusionError("fusion needs CT images: give a CT folder (--ct-dir) or a pairs CSV (--ct-csv)")
        self.ct_dir = Path(ct_dir) if ct_dir is not None else None
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self.mri_root = Path(mri_root) if mri_root is not None else None
        self._by_rel: dict[str, Path] = {}
        self._by_stem: dict[str, list[Path]] = defaultdict(list)
        self._csv: dict[str, Path] = {}
        if self.ct_dir is not None and not self.ct_dir.is_dir():
            raise FusionError(f"CT folder not found: {self.ct_dir}")
        if self.csv_path is not None:
            self._read_csv()
        elif self.ct_dir is not None:
            self._index_dir()

    def _index_dir(self) -> None:
        assert self.ct_dir is not None
        for p in sorted(self.ct_dir.rglob("*")):
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES:
                rel = _rel_stem(p, self.ct_dir)
                if rel in self._by_rel:
                    raise FusionError(f"{self.ct_dir}: two CT files for {rel!r}: {self._by_rel[rel].name}, {p.name}")
                self._by_rel[rel] = p
                self._by_stem[p.stem].append(p)
        if not self._by_rel:
            raise FusionError(f"{self.ct_dir}: no CT images ({', '.join(sorted(IMAGE_SUFFIXES))})")

    def _read_csv(self) -> None:
        assert self.csv_path is not None
        if not self.csv_path.is_file():
            raise FusionError(f"pairs CSV not found: {self.csv_path}")
        base_ct = self.ct_dir or self.csv_path.parent
        with open(self.csv_path, newline="", encoding="utf-8") as fh:
            rd = csv.DictReader(fh)
            cols = [c.strip().lower() for c in (rd.fieldnames or [])]
            if "mri" not in cols or "ct" not in cols:
                raise FusionError(f"{self.csv_path}: needs a header with 'mri' and 'ct' columns, got {rd.fieldnames}")
            for n, row in enumerate(rd, start=2):
                row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
                if not row.get("mri") or not row.get("ct"):
                    raise FusionError(f"{self.csv_path}:{n}: empty 'mri' or 'ct' value")
                key = self._mri_key(Path(row["mri"]))
                if key in self._csv:
                    raise FusionError(f"{self.csv_path}:{n}: {row['mri']!r} is listed twice")
                ct = Path(row["ct"])
                self._csv[key] = ct if ct.is_absolute() else base_ct / ct

    def _mri_key(self, p: Path) -> str:
        p = Path(p)
        if self.mri_root is not None:
            for a, b in ((p, self.mri_root), (p.absolute(), self.mri_root.absolute()),
                         (p.resolve(), self.mri_root.resolve())):
                try:
                    return a.relative_to(b).as_posix()
                except ValueError:
                    pass
        return p.as_posix()

    def find(self, mri: PathLike) -> Path | None:
        """The CT file paired with an MRI file, or None."""
        p = Path(mri)
        if self._csv:
            return self._csv.get(self._mri_key(p))
        if self.mri_root is not None:
            # as given first (a linked MRI file keeps its place in the layout), then resolved
            for a, b in ((p.absolute(), self.mri_root.absolute()), (p.resolve(), self.mri_root.resolve())):
                try:
                    rel = _rel_stem(a, b)
                except ValueError:
                    continue
                if rel in self._by_rel:
                    return self._by_rel[rel]
        cands = self._by_stem.get(p.stem, [])
        return cands[0] if len(cands) == 1 else None

    def partner(self, mri: PathLike) -> tuple[Path | None, str | None]:
        """(CT file, None) for an MRI file, or (None, why there is none): the per-file form of
        :meth:`pair` for commands that report an unpaired file and go on with the others."""
        c = self.find(mri)
        src = f"pairs CSV {self.csv_path}" if self._csv else f"CT folder {self.ct_dir}"
        if c is None:
            if not self._csv and len(self._by_stem.get(Path(mri).stem, [])) > 1:
                return None, f"no CT partner in {src}: several CT files share the stem {Path(mri).stem!r} (ambiguous)"
            return None, f"no CT partner in {src}"
        if not c.is_file():
            return None, f"its CT partner {c} (from the {src}) does not exist"
        return c, None

    def pair(self, mri_files: Sequence[PathLike]) -> list[Path]:
        """CT paths aligned with ``mri_files``; raises naming every unpaired (or missing) file."""
        out: list[Path] = []
        unpaired: list[str] = []
        missing: list[str] = []
        for f in mri_files:
            c = self.find(f)
            if c is None:
                unpaired.append(str(f))
            elif not c.is_file():
                missing.append(f"{f} -> {c}")
            else:
                out.append(c)
        if unpaired or missing:
            src = f"pairs CSV {self.csv_path}" if self._csv else f"CT folder {self.ct_dir}"
            msg = []
            if unpaired:
                ambiguous = [u for u in unpaired if len(self._by_stem.get(Path(u).stem, [])) > 1]
                msg.append(f"{len(unpaired)} MRI file(s) have no CT partner in {src}: "
                           + ", ".join(unpaired[:MAX_LISTED]) + (" ..." if len(unpaired) > MAX_LISTED else ""))
                if ambiguous:
                    msg.append(f"{len(ambiguous)} of them match several CT files by stem (ambiguous)")
            if missing:
                msg.append(f"{len(missing)} CT file(s) named but missing: " + ", ".join(missing[:MAX_LISTED]))
            raise FusionError("; ".join(msg))
        return out

    def describe(self) -> dict[str, Any]:
        return {"ct_dir": str(self.ct_dir.resolve()) if self.ct_dir else None,
                "csv": str(self.csv_path.resolve()) if self.csv_path else None,
                "pairing": "csv" if self.csv_path else "name"}


# ----------------------------------------------------------------------------- loading


def _spec_and_size(spec: Any, size: tuple[int, int] | int | None) -> tuple[FusionSpec, tuple[int, int] | None]:
    if isinstance(spec, FusionSpec):
        f = spec.validated()
    elif spec is None:
        f = FusionSpec()
    elif isinstance(spec, dict) and "method" in spec:
        f = FusionSpec.from_dict(spec)
    else:
        got = fusion_of(spec)
        if got is None:
            raise FusionError("the given spec/model records no fusion (preprocess.extra['fusion'] is empty)")
        f = got
        if size is None and hasattr(spec, "size"):
            size = spec.size
        elif size is None and hasattr(spec, "preprocess"):
            size = getattr(spec.preprocess, "size", None)
    if isinstance(size, int):
        size = (size, size)
    return f, size


def load_fused(mri: PathLike | np.ndarray, ct: PathLike | np.ndarray, spec: Any = None,
               size: tuple[int, int] | int | None = None) -> np.ndarray:
    """An MRI/CT pair (paths or arrays) -> uint8 RGB model input, fused at the MRI's
    resolution then resized to ``size`` (or the spec's size).

    ``spec``: a FusionSpec, its dict, or anything carrying ``preprocess.extra['fusion']``
    (PreprocessSpec, ModelCard, Artifact, manifest dict). Use with the Predictor::

        x = load_fused("mri.jpg", "ct.png", artifact)      # artifact = load_manifest(...)
        Predictor(artifact).predict(x)
    """
    f, sz = _spec_and_size(spec, size)
    m = load_rgb(mri) if isinstance(mri, (str, Path)) else np.asarray(mri)
    try:
        c = load_rgb(ct) if isinstance(ct, (str, Path)) else np.asarray(ct)
    except ImageLoadError as exc:
        raise ImageLoadError(exc.path, f"CT partner of {mri}: {exc.reason}") from exc
    out = fuse(m, c, f)
    return resize_rgb(out, sz) if sz is not None else out


def load_fused_arrays(samples: Sequence[Any], pairing: CTPairing, spec: FusionSpec, size: tuple[int, int],
                      use_cache: bool = True, desc: str = "fusing") -> Any:
    """Like :func:`edgebrain.data.load_arrays` for fused inputs: unpaired files raise
    (naming them), unreadable ones are returned in ``failed``. Cached by MRI and CT content."""
    from .data import Arrays, cache_dir
    from .io import atomic_write_bytes, read_json, sha256_file, sha256_text
    from .progress import track

    cts = pairing.pair([s.path for s in samples])
    key = sha256_text(f"fused|{size}|{json.dumps(spec.to_dict(), sort_keys=True)}|" + "|".join(
        f"{s.sha256}:{s.rel}:{sha256_file(c) if c.is_file() else 'missing'}" for s, c in zip(samples, cts)))[:24]
    cpath = cache_dir() / f"fused-{key}.npz"
    if use_cache and cpath.is_file():
        try:
            z = np.load(cpath, allow_pickle=False)
            ok = set(z["ok"].tolist())
            failed = [tuple(x) for x in read_json(str(cpath) + ".failed.json")]
            return Arrays(z["x"], z["y"], [s for s in samples if s.rel in ok], failed)  # type: ignore[arg-type]
        except Exception:
            pass
    xs: list[np.ndarray] = []
    kept: list[Any] = []
    failed: list[tuple[str, str]] = []
    for s, c in track(list(zip(samples, cts)), description=f"{desc} {len(samples)} MRI+CT pairs"):
        try:
            xs.append(load_fused(s.path, c, spec, size))
            kept.append(s)
        except ImageLoadError as exc:
            failed.append((exc.path, exc.reason))
    x = np.stack(xs) if xs else np.zeros((0, size[0], size[1], 3), np.uint8)
    y = np.array([s.label for s in kept], np.int64)
    if use_cache:
        import io as _io

        buf = _io.BytesIO()
        np.savez(buf, x=x, y=y, ok=np.array([s.rel for s in kept]))
        atomic_write_bytes(cpath, buf.getvalue())
        atomic_write_bytes(str(cpath) + ".failed.json", json.dumps(failed).encode())
    return Arrays(x, y, kept, failed)


# ----------------------------------------------------------------------------- synthetic CT


def synthetic_ct(mri: np.ndarray, seed: int = 0) -> np.ndarray:
    """A CT-like rendering of an MRI slice, for exercising fusion without real CT.

    Brain tissue squeezed into a narrow grey band (soft tissue in a bone window), air black,
    a bright ring where the skull is (the head outline, eroded), Gaussian blur and a little
    seeded noise. Not a simulation of CT physics; never use it to claim CT performance."""
    from scipy import ndimage as ndi

    g = to_gray(mri)
    h, w = g.shape
    mask = ndi.binary_fill_holes(ndi.binary_opening(g > 0.08, iterations=1))
    thick = max(2, int(round(0.03 * min(h, w))))
    ring = mask & ~ndi.binary_erosion(mask, iterations=thick)
    ct = np.where(mask, 0.22 + 0.18 * g, 0.0)
    ct = np.where(ring, 0.95, ct)
    ct = ndi.gaussian_filter(ct, sigma=max(0.5, 0.005 * min(h, w)))
    rng = np.random.default_rng(seed)
    ct = ct + rng.normal(0.0, 0.01, size=ct.shape) * mask
    u8 = np.clip(np.rint(ct * 255.0), 0, 255).astype(np.uint8)
    return np.stack([u8] * 3, -1)


def make_synthetic_ct_dir(samples: Sequence[Any], data_root: PathLike, out: PathLike, seed: int = 0,
                          overwrite: bool = False) -> dict[str, Any]:
    """Write ``synthetic_ct`` renderings of ``samples`` (from ``edgebrain.data``) as PNGs
    mirroring the MRI layout under ``out`` (atomic), plus ``SYNTHETIC.txt`` saying what they are."""
    from PIL import Image

    from .io import atomic_dir, atomic_write_text
    from .progress import track

    root = Path(data_root)
    failed: list[tuple[str, str]] = []
    n = 0
    with atomic_dir(out, overwrite=overwrite) as tmp:
        atomic_write_text(tmp / "SYNTHETIC.txt",
                          "CT-like renderings of MRI slices made by edgebrain.fusion.synthetic_ct "
                          f"(seed {seed}). Not CT scans: for pipeline tests only.\n")
        for s in track(samples, description=f"synthetic CT for {len(samples)} images"):
            try:
                rel = Path(s.path).relative_to(root)
            except ValueError:
                rel = Path(s.path.name)
            try:
                img = synthetic_ct(load_rgb(s.path), seed=(int(s.sha256[:8], 16) ^ seed) if s.sha256 else seed)
            except ImageLoadError as exc:
                failed.append((exc.path, exc.reason))
                continue
            dst = tmp / rel.with_suffix(".png")
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(dst)
            n += 1
    return {"out": str(out), "written": n, "failed": failed}
