"""``edgebrain gate``: fail a CI run when a converted artifact is less accurate than the model
that was validated.

The gate reads the ``results.json`` written by ``edgebrain bench`` and, for every
artifact x device in it, checks against the FP32 reference of the same run:

* ``integrity``        the artifact folder named in the result still hashes to the manifest,
                       is the artifact that was measured, and was converted from the reference;
* ``accuracy``         overall accuracy drop (percentage points) <= ``max_drop``;
* ``class_recall``     every class's recall drop <= ``max_class_drop`` (a missed glioma matters
                       more than an average); a class where one image is worth more than that is
                       decided by an exact one-sided McNemar test (``class_rule="exact"``);
* ``agreement``        top-1 agreement with the reference >= ``min_agreement``;
* ``min_accuracy``     optional absolute floor (``--min-accuracy``): also catches a reference that
                       is itself broken, which relative checks cannot;
* ``non_inferiority``  optional: the lower 95 % bound of the artifact's bootstrap accuracy CI is
                       within ``ni_margin`` of the reference accuracy (``ci``), or McNemar's test
                       does not find the artifact significantly worse (``mcnemar``);

Artifacts that ``edgebrain convert`` rejected or could not build (``convert_summary.json`` beside
the artifacts, or ``convert_summary``) are subjects with a failed ``conversion`` check.

And, with a stored baseline (``--baseline``), against the numbers recorded for the same
artifact x device when it was approved:

* ``baseline_accuracy`` accuracy and class-recall drops vs the baseline (same thresholds);
* ``latency``           p50 latency / baseline p50 <= ``max_latency_ratio``.

It fails closed: a missing or non-finite metric, an empty or unreadable results file, a missing
reference, an artifact folder that cannot be found or whose hash does not match, or a baseline that
belongs to another model, data list or device never passes. Exit codes: 0 pass, 1 regression,
2 usage error or missing/untrustworthy data (2 wins over 1: results that cannot be trusted say
nothing either way).

TensorFlow-free.
"""

from __future__ import annotations

import functools
import math
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .artifact import MANIFEST, load_manifest, read_manifest_unchecked
from .errors import EdgebrainError, IntegrityError
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, sha256_file

RESULTS_KIND = "edgebrain-bench-results"
SUPPORTED_SCHEMA_VERSIONS = (1,)
BASELINE_KIND = "edgebrain-gate-baseline"
BASELINE_VERSION = 1

PASS, FAIL, ERROR, SKIP = "pass", "fail", "error", "skip"
CHECKS = ("integrity", "accuracy", "class_recall", "agreement", "min_accuracy", "non_inferiority",
          "baseline_accuracy", "latency")
NI_METHODS = ("off", "ci", "mcnemar")
CLASS_RULES = ("exact", "threshold")
# What identifies "the same device" in a baseline: not the hostname (CI runners change names).
DEVICE_ESSENTIALS = ("arch", "cpu", "cores")


class GateError(EdgebrainError):
    """A usage error (bad threshold, missing baseline file): the CLI exits 2."""


@dataclass(frozen=True)
class Thresholds:
    """Pass criteria. Drops are in percentage points (0.5 = half a point of accuracy)."""

    max_drop: float = 0.5
    max_class_drop: float = 1.0
    min_agreement: float = 0.99
    max_latency_ratio: float = 1.5
    non_inferiority: str = "off"  # off | ci | mcnemar
    ni_margin: float = 2.0  # pp, for non_inferiority="ci"
    alpha: float = 0.05  # for non_inferiority="mcnemar"
    min_accuracy: float | None = None  # absolute floor (fraction), off by default
    class_rule: str = "exact"  # exact | threshold: per-class rule where one image > max_class_drop

    def validate(self) -> None:
        for name in ("max_drop", "max_class_drop", "ni_margin"):
            v = getattr(self, name)
            if not _finite(v) or v < 0 or v > 100:
                raise GateError(f"{name.replace('_', '-')} must be between 0 and 100 percentage points (got {v})")
        if not _finite(self.min_agreement) or not 0.0 <= self.min_agreement <= 1.0:
            raise GateError(f"min-agreement must be a fraction between 0 and 1 (got {self.min_agreement})")
        if not _finite(self.max_latency_ratio) or self.max_latency_ratio < 1.0:
            raise GateError(f"max-latency-ratio must be >= 1 (got {self.max_latency_ratio})")
        if self.non_inferiority not in NI_METHODS:
            raise GateError(f"non-inferiority must be one of {', '.join(NI_METHODS)} (got {self.non_inferiority!r})")
        if not _finite(self.alpha) or not 0.0 < self.alpha < 1.0:
            raise GateError(f"alpha must be between 0 and 1 (got {self.alpha})")
        if self.class_rule not in CLASS_RULES:
            raise GateError(f"class-rule must be one of {', '.join(CLASS_RULES)} (got {self.class_rule!r})")
        if self.min_accuracy is not None and (not _finite(self.min_accuracy) or not 0.0 <= self.min_accuracy <= 1.0):
            raise GateError(f"min-accuracy must be a fraction between 0 and 1 (got {self.min_accuracy})")

    def describe(self) -> list[tuple[str, str]]:
        ni = {
            "off": "off",
            "ci": f"lower 95% CI bound >= reference accuracy - {self.ni_margin:g} pp",
            "mcnemar": f"McNemar: not significantly worse at alpha={self.alpha:g}",
        }[self.non_inferiority]
        return [
            ("max accuracy drop", f"{self.max_drop:g} pp"),
            ("max per-class recall drop", f"{self.max_class_drop:g} pp"),
            ("small classes (an image worth more than that limit)", "exact McNemar test on the paired predictions, "
             f"fail at p < {self.alpha:g}" if self.class_rule == "exact" else "the pp limit (--class-rule threshold)"),
            ("min top-1 agreement", f"{self.min_agreement:g}"),
            ("min accuracy (absolute)", "off" if self.min_accuracy is None else f"{self.min_accuracy:g}"),
            ("non-inferiority", ni),
            ("max latency ratio (vs baseline)", f"{self.max_latency_ratio:g}"),
        ]


@dataclass
class Check:
    name: str
    status: str  # pass | fail | error | skip
    message: str
    value: float | None = None
    limit: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Subject:
    """One artifact x device from the results file and its checks."""

    name: str
    device: str
    artifact: str
    target: str | None
    precision: str | None
    checks: list[Check] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.name}@{self.device}"

    @property
    def status(self) -> str:
        return _worst(c.status for c in self.checks)

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)


@dataclass
class GateReport:
    results_path: str
    thresholds: Thresholds
    subjects: list[Subject] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # results-level: empty file, no reference, baseline...
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    baseline_path: str | None = None
    artifact_check: bool = True
    baseline_written: str | None = None

    @property
    def status(self) -> str:
        if self.errors:
            return ERROR
        if not self.subjects:
            return ERROR
        return _worst(s.status for s in self.subjects)

    @property
    def passed(self) -> bool:
        return self.status == PASS

    @property
    def exit_code(self) -> int:
        return {PASS: 0, FAIL: 1}.get(self.status, 2)

    @property
    def verdict(self) -> str:
        return {PASS: "PASS", FAIL: "FAIL (regression)", ERROR: "ERROR (missing or untrustworthy data)"}[self.status]

    def failures(self) -> list[tuple[Subject | None, Check]]:
        out: list[tuple[Subject | None, Check]] = [(None, Check("results", ERROR, e)) for e in self.errors]
        for s in self.subjects:
            out.extend((s, c) for c in s.checks if c.status in (FAIL, ERROR))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "edgebrain-gate-report",
            "verdict": self.status,
            "exit_code": self.exit_code,
            "results": self.results_path,
            "baseline": self.baseline_path,
            "artifact_check": self.artifact_check,
            "thresholds": asdict(self.thresholds),
            "errors": list(self.errors),
            "notes": list(self.notes),
            "data": self.data,
            "reference": self.reference,
            "subjects": [
                {"name": s.name, "device": s.device, "artifact": s.artifact, "target": s.target,
                 "precision": s.precision, "status": s.status, "metrics": s.metrics,
                 "checks": [asdict(c) for c in s.checks]}
                for s in self.subjects
            ],
            "baseline_written": self.baseline_written,
        }


# ----------------------------------------------------------------------------- helpers


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _worst(statuses: Any) -> str:
    order = {PASS: 0, SKIP: 0, FAIL: 1, ERROR: 2}
    worst = PASS
    for s in statuses:
        if order[s] > order[worst]:
            worst = s
    return worst


class MissingMetric(EdgebrainError):
    pass


def _get(rec: Any, path: str, what: str) -> Any:
    cur = rec
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur or cur[part] is None:
            raise MissingMetric(f"{what}: missing {path!r}")
        cur = cur[part]
    return cur


def _num(rec: Any, path: str, what: str, lo: float | None = None, hi: float | None = None) -> float:
    v = _get(rec, path, what)
    if not _finite(v):
        raise MissingMetric(f"{what}: {path!r} is not a finite number ({v!r})")
    v = float(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise MissingMetric(f"{what}: {path!r} = {v} is outside [{lo}, {hi}]")
    return v


def _pp(x: float) -> float:
    return round(100.0 * x, 6)


def signed(x: float) -> str:
    """A change in pp with its sign, never "-0.00"."""
    return f"{round(x, 2) + 0.0:+.2f}"


def _device_label(rec: dict[str, Any]) -> str:
    """The device a record ran on: bench's label (e.g. "host", "pi@ward-3"), else its profile."""
    dev = rec.get("device")
    if isinstance(dev, dict):
        for k in ("label", "profile"):
            if dev.get(k):
                return str(dev[k])
    return "unknown-device"


def device_essentials(rec: dict[str, Any]) -> dict[str, Any]:
    dev = rec.get("device") if isinstance(rec.get("device"), dict) else {}
    fp = dev.get("fingerprint") if isinstance(dev.get("fingerprint"), dict) else {}
    return {"profile": dev.get("profile"), **{k: fp.get(k) for k in DEVICE_ESSENTIALS}}


ESSENTIAL_KEYS = ("profile", *DEVICE_ESSENTIALS)


def source_sha256(results: dict[str, Any]) -> str | None:
    """The FP32 source model's sha256, as the reference record states it."""
    ref = results.get("reference")
    if not isinstance(ref, dict):
        return None
    for path in ("artifact_sha256", "source.sha256", "sha256"):
        try:
            v = _get(ref, path, "reference")
        except MissingMetric:
            continue
        if isinstance(v, str) and v:
            return v
    return None


def _recalls(rec: dict[str, Any], classes: list[str], what: str) -> dict[str, float]:
    return {c: _num(rec, f"per_class.{c}.recall", what, 0.0, 1.0) for c in classes}


def _supports(rec: dict[str, Any], classes: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in classes:
        s = ((rec.get("per_class") or {}).get(c) or {}).get("support")
        if _finite(s):
            out[c] = int(s)
    return out


# ----------------------------------------------------------------------------- loading


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and sanity-check a bench results file; raise MissingMetric on anything unusable."""
    p = Path(path)
    if not p.is_file():
        raise MissingMetric(f"{p}: results file not found")
    if p.stat().st_size == 0:
        raise MissingMetric(f"{p}: results file is empty")
    try:
        res = read_json(p)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MissingMetric(f"{p}: not valid JSON ({exc})") from exc
    except OSError as exc:
        raise MissingMetric(f"{p}: cannot read it ({exc})") from exc
    if not isinstance(res, dict):
        raise MissingMetric(f"{p}: expected a JSON object from edgebrain bench")
    if res.get("kind") != RESULTS_KIND:
        raise MissingMetric(f"{p}: kind is {res.get('kind')!r}, expected {RESULTS_KIND!r} (a bench results.json)")
    if res.get("schema_version") not in SUPPORTED_SCHEMA_VERSIONS:
        raise MissingMetric(f"{p}: unsupported schema_version {res.get('schema_version')!r} "
                            f"(this gate reads {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))})")
    return res


def _find_artifact_dir(rec_path: str, results_dir: Path, artifact_root: Path | None) -> Path | None:
    p = Path(rec_path)
    cands: list[Path] = []
    if artifact_root is not None:
        cands += [artifact_root / p, artifact_root / p.name] if not p.is_absolute() else [artifact_root / p.name]
    cands += [p] if p.is_absolute() else [Path.cwd() / p, results_dir / p]
    for c in cands:
        folder = c if c.is_dir() else c.parent
        if (folder / MANIFEST).is_file():
            return folder
    return None


# ----------------------------------------------------------------------------- the checks


def _integrity(rec: dict[str, Any], what: str, results_dir: Path, artifact_root: Path | None,
               artifact_check: bool, src_sha: str | None) -> Check:
    if not artifact_check:
        return Check("integrity", SKIP, "artifact hash not checked (--no-artifact-check): gating on the numbers alone")
    rec_path = rec.get("artifact")
    if not isinstance(rec_path, str) or not rec_path:
        return Check("integrity", ERROR, f"{what}: the result names no artifact folder")
    folder = _find_artifact_dir(rec_path, results_dir, artifact_root)
    if folder is None:
        return Check("integrity", ERROR,
                     f"{what}: artifact folder {rec_path} not found (looked beside the working directory"
                     f"{', under ' + str(artifact_root) if artifact_root else ''} and the results file), so its "
                     "hash cannot be checked; pass --artifact-root DIR, or --no-artifact-check to gate on the "
                     "numbers alone")
    try:
        m = read_manifest_unchecked(folder)
        if isinstance(m, dict) and (m.get("verification") or {}).get("passed") is False:
            return Check("integrity", FAIL, f"{what}: {folder} failed verification at conversion time "
                                            f"({m.get('verification')})")
        art = load_manifest(folder)
    except (IntegrityError, ValueError, OSError) as exc:
        return Check("integrity", ERROR, f"{what}: {exc}")
    problems = []
    want = rec.get("artifact_sha256")
    got = art.manifest.get("artifact_sha256")
    if not want:
        problems.append("the result records no artifact_sha256")
    elif want != got:
        problems.append(f"the result was measured on sha256 {str(want)[:12]}… but {folder} now holds "
                        f"{str(got)[:12]}… (a different artifact)")
    for key in ("target", "precision"):
        if rec.get(key) is not None and rec.get(key) != art.manifest.get(key):
            problems.append(f"result {key} {rec.get(key)!r} != manifest {key} {art.manifest.get(key)!r}")
    art_src = (art.manifest.get("source") or {}).get("sha256")
    if src_sha and art_src and art_src != src_sha:
        problems.append(f"converted from source sha256 {art_src[:12]}…, but the reference is {src_sha[:12]}… "
                        "(compared against another model)")
    if problems:
        return Check("integrity", ERROR, f"{what}: " + "; ".join(problems), details={"folder": str(folder)})
    return Check("integrity", PASS, f"{folder}: files match the manifest (sha256 {str(got)[:12]}…)",
                 details={"folder": str(folder), "artifact_sha256": got})


def _guard(name: str, fn: Any, *args: Any) -> Check:
    try:
        return fn(*args)  # type: ignore[no-any-return]
    except MissingMetric as exc:
        return Check(name, ERROR, str(exc))


def _same_images(rec: dict[str, Any], ref: dict[str, Any], n: int | None, what: str) -> None:
    """Artifact and reference must have been scored on the same number of images as the run says."""
    counts = {"data.n": n, what: rec.get("n"), "reference": ref.get("n")}
    known = {k: v for k, v in counts.items() if v is not None}
    if len({int(v) if _finite(v) else str(v) for v in known.values()}) > 1:
        raise MissingMetric(f"{what}: evaluated on different numbers of images ("
                            + ", ".join(f"{k} n={v}" for k, v in known.items()) + "): not a paired comparison")


def _check_unreadable(data: dict[str, Any], max_unreadable: int) -> Check:
    """Fail closed on missing evaluation data: every image bench could not score (``data.failed``)
    counts, and more than ``max_unreadable`` of them fails the gate (exit 1)."""
    failed = data.get("failed")
    if not isinstance(failed, list):
        return Check("unreadable", ERROR, "the results do not list the images that could not be scored "
                                          "(data.failed): cannot tell whether the evaluation set is complete")
    k = len(failed)
    n = data.get("n") if _finite(data.get("n")) else 0
    files = [str(f.get("file") if isinstance(f, dict) else f) for f in failed[:3]]
    msg = (f"{k} of {int(n) + k} evaluation image(s) could not be scored"
           + (f" ({100 * k / (n + k):.1f} %), e.g. {', '.join(files)}" if k else "")
           + f"; allowed: {max_unreadable} (--max-unreadable)")
    return Check("unreadable", FAIL if k > max_unreadable else PASS, msg, float(k), float(max_unreadable),
                 {"failed": failed[:50]})


def consistency_problems(rec: dict[str, Any], classes: list[str], n: Any, what: str,
                         raise_first: bool = False) -> list[str]:
    """Where a record's accuracy, per-class recall/support and confusion matrix contradict each other.

    Rules: the matrix is K x K non-negative integers (K classes, rows = true class), its total is
    the record's ``n`` and the run's ``data.n``, each row sums to that class's support, each
    recall equals its row's diagonal share to within half an image (rounding), and accuracy equals
    the support-weighted mean of the recalls (1e-6)."""
    probs: list[str] = []
    cm = rec.get("confusion_matrix")
    k = len(classes)
    ok_cm = (isinstance(cm, list) and len(cm) == k and k > 0 and all(
        isinstance(row, list) and len(row) == k
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row) for row in cm))
    if not ok_cm:
        probs.append(f"{what}: confusion_matrix is missing or not a {k}x{k} matrix of counts")
    else:
        total = sum(map(sum, cm))
        for label, want in (("n", rec.get("n")), ("data.n", n)):
            if _finite(want) and int(want) != total:
                probs.append(f"{what}: the confusion matrix counts {total} images but {label} is {want}")
    per = rec.get("per_class") if isinstance(rec.get("per_class"), dict) else {}
    wsum, sup_total = 0.0, 0
    for i, c in enumerate(classes):
        pc = per.get(c) if isinstance(per.get(c), dict) else {}
        r, sup = pc.get("recall"), pc.get("support")
        if not _finite(r) or not _finite(sup) or sup < 0:
            probs.append(f"{what}: per_class.{c} lacks a finite recall and support")
            continue
        wsum += float(r) * float(sup)
        sup_total += int(sup)
        if ok_cm:
            row = sum(cm[i])
            if row != int(sup):
                probs.append(f"{what}: {c}: the confusion matrix row holds {row} images, support says {sup}")
            elif row and abs(float(r) * row - cm[i][i]) > 0.5:
                probs.append(f"{what}: {c}: recall {float(r):.4f} but the confusion matrix says "
                             f"{cm[i][i]}/{row} = {cm[i][i] / row:.4f}")
    acc = rec.get("accuracy")
    if sup_total and _finite(acc) and abs(float(acc) - wsum / sup_total) > 1e-6:
        probs.append(f"{what}: accuracy {float(acc):.6f} contradicts its per-class recalls (support-weighted "
                     f"mean {wsum / sup_total:.6f})")
    if probs and raise_first:
        raise MissingMetric(probs[0] + (f" (+{len(probs) - 1} more)" if len(probs) > 1 else ""))
    return probs


def _check_consistency(rec: dict[str, Any], classes: list[str], n: Any, what: str) -> Check:
    if not classes:
        return Check("consistency", ERROR, "cannot check: no class names")
    probs = consistency_problems(rec, classes, n, what)
    if probs:
        return Check("consistency", ERROR, "the record contradicts itself, not trusted: " + "; ".join(probs[:4])
                     + (f" (+{len(probs) - 4} more)" if len(probs) > 4 else ""), details={"problems": probs})
    return Check("consistency", PASS, "accuracy, per-class recall and the confusion matrix agree")


def _check_accuracy(rec: dict[str, Any], ref: dict[str, Any], n: int | None, what: str, th: Thresholds) -> Check:
    _same_images(rec, ref, n, what)
    acc = _num(rec, "accuracy", what, 0.0, 1.0)
    racc = _num(ref, "accuracy", "reference", 0.0, 1.0)
    drop = _pp(racc - acc)
    ok = drop <= th.max_drop
    msg = (f"accuracy {100 * acc:.2f}% vs reference {100 * racc:.2f}%: {signed(-drop)} pp "
           f"(drop {'within' if ok else 'exceeds'} {th.max_drop:g} pp)")
    return Check("accuracy", PASS if ok else FAIL, msg, drop, th.max_drop,
                 {"accuracy": acc, "reference_accuracy": racc})


def _check_class_recall(rec: dict[str, Any], ref: dict[str, Any], classes: list[str], what: str,
                        th: Thresholds) -> Check:
    r = _recalls(rec, classes, what)
    rr = _recalls(ref, classes, "reference")
    drops = {c: _pp(rr[c] - r[c]) for c in classes}
    bad = {c: d for c, d in drops.items() if d > th.max_class_drop}
    worst = max(drops, key=lambda c: drops[c])
    if bad:
        msg = "recall dropped: " + "; ".join(
            f"{c} {100 * rr[c]:.2f}% -> {100 * r[c]:.2f}% ({signed(-d)} pp)" for c, d in bad.items()
        ) + f" (drop limit {th.max_class_drop:g} pp per class)"
    else:
        msg = (f"every class within {th.max_class_drop:g} pp of the reference recall "
               f"(worst: {worst} {signed(-drops[worst])} pp)")
    return Check("class_recall", FAIL if bad else PASS, msg, drops[worst], th.max_class_drop,
                 {"drops_pp": drops, "recall": r, "reference_recall": rr})


def _class_discordant(rec: dict[str, Any], classes: list[str], sup: dict[str, int], rr: dict[str, float],
                      r: dict[str, float], what: str) -> dict[str, tuple[int, int, str]]:
    """Per class: (lost, gained, source). Lost = images of the class the reference got right and the
    artifact wrong, gained = the opposite. From the paired predictions (bench's ``flips``) when every
    flip is listed; otherwise from the net change in correct images, taken as all losses and no
    gains: the least favourable split, which gives the smallest p-value for that change."""
    flips, n_flips = rec.get("flips"), rec.get("n_flips")
    out: dict[str, tuple[int, int, str]] = {}
    complete = (isinstance(flips, list) and _finite(n_flips) and len(flips) == int(n_flips)
                and all(isinstance(f, dict) and {"true_label", "ref_label", "label"} <= f.keys() for f in flips))
    for c in classes:
        net = round((rr[c] - r[c]) * sup[c])
        if complete:
            lost = sum(1 for f in flips if f["true_label"] == c and f["ref_label"] == c and f["label"] != c)
            gained = sum(1 for f in flips if f["true_label"] == c and f["label"] == c and f["ref_label"] != c)
            if lost - gained != net:
                raise MissingMetric(f"{what}: the flips of class {c} ({lost} lost, {gained} gained) disagree with "
                                    f"its recall ({100 * rr[c]:.2f}% -> {100 * r[c]:.2f}% of n={sup[c]})")
            out[c] = (lost, gained, "paired predictions (flips)")
        else:
            out[c] = (max(net, 0), max(-net, 0), "net change in correct images (flips not all listed: counted "
                                                 "as losses only, the least favourable case)")
    return out


def _mcnemar_greater(lost: int, gained: int) -> float:
    """One-sided exact McNemar p-value: P(at least ``lost`` of the discordant pairs go against the
    artifact when either direction is equally likely)."""
    if lost <= gained:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(lost, lost + gained, 0.5, alternative="greater").pvalue)


def _check_class_recall_rules(rec: dict[str, Any], ref: dict[str, Any], classes: list[str], what: str,
                              th: Thresholds) -> Check:
    """Per-class recall. Where one image of a class is worth more than ``max_class_drop`` (a class of
    50 images: 2 pp per image against a 1 pp limit) the pp limit fails any single changed
    prediction; with ``class_rule="exact"`` those classes are decided by an exact one-sided McNemar
    test on the class's paired predictions at ``alpha`` instead. Each class's rule is in
    ``details["rules"]`` and named in the message."""
    sup = _supports(ref, classes) or _supports(rec, classes)
    small = [c for c in classes if th.class_rule == "exact" and sup.get(c, 0) > 0
             and 100.0 / sup[c] > th.max_class_drop]
    if not small:
        return _check_class_recall(rec, ref, classes, what, th)
    r, rr = _recalls(rec, classes, what), _recalls(ref, classes, "reference")
    pairs = _class_discordant(rec, small, sup, rr, r, what)
    drops = {c: _pp(rr[c] - r[c]) for c in classes}
    rules: dict[str, dict[str, Any]] = {}
    bad: list[str] = []
    for c in classes:
        shift = f"{c} {100 * rr[c]:.2f}% -> {100 * r[c]:.2f}% ({signed(-drops[c])} pp)"
        if c not in small:
            rules[c] = {"rule": "threshold", "limit_pp": th.max_class_drop}
            if drops[c] > th.max_class_drop:
                bad.append(f"{shift} > {th.max_class_drop:g} pp")
            continue
        lost, gained, source = pairs[c]
        pv = _mcnemar_greater(lost, gained)
        rules[c] = {"rule": "exact McNemar (one-sided)", "n": sup[c], "one_image_pp": round(100.0 / sup[c], 4),
                    "lost": lost, "gained": gained, "p_value": pv, "alpha": th.alpha, "pairs": source}
        if pv < th.alpha:
            bad.append(f"{shift}: {lost} lost / {gained} gained, exact McNemar p={pv:.3g} < {th.alpha:g}")
    exact = ", ".join(f"{c} (n={sup[c]}, one image {100.0 / sup[c]:.2f} pp: {rules[c]['lost']} lost / "
                      f"{rules[c]['gained']} gained, p={rules[c]['p_value']:.3g})" for c in small)
    rule_msg = (f"exact McNemar at alpha={th.alpha:g} where one image is worth more than the "
                f"{th.max_class_drop:g} pp limit: {exact}")
    worst = max(drops, key=lambda c: drops[c])
    if bad:
        msg = "recall dropped: " + "; ".join(bad) + f" (rules: {rule_msg}; the {th.max_class_drop:g} pp limit elsewhere)"
    else:
        msg = (f"every class passes (worst: {worst} {signed(-drops[worst])} pp); {rule_msg}; the other classes "
               f"within {th.max_class_drop:g} pp")
    return Check("class_recall", FAIL if bad else PASS, msg, drops[worst], th.max_class_drop,
                 {"drops_pp": drops, "recall": r, "reference_recall": rr, "rules": rules})


def _check_agreement(rec: dict[str, Any], n: int | None, what: str, th: Thresholds) -> Check:
    a = _num(rec, "agreement", what, 0.0, 1.0)
    ok = a >= th.min_agreement
    changed = f" ({round((1 - a) * n)} of {n} images changed class)" if n else ""
    msg = f"top-1 agreement with the reference {a:.4f} ({'>=' if ok else '<'} {th.min_agreement:g}){changed}"
    return Check("agreement", PASS if ok else FAIL, msg, a, th.min_agreement)


def _check_min_accuracy(rec: dict[str, Any], what: str, th: Thresholds) -> Check:
    if th.min_accuracy is None:
        return Check("min_accuracy", SKIP, "no absolute accuracy floor (--min-accuracy F)")
    acc = _num(rec, "accuracy", what, 0.0, 1.0)
    ok = acc >= th.min_accuracy
    return Check("min_accuracy", PASS if ok else FAIL,
                 f"accuracy {100 * acc:.2f}% {'>=' if ok else '<'} floor {100 * th.min_accuracy:.2f}%",
                 acc, th.min_accuracy)


def _check_non_inferiority(rec: dict[str, Any], ref: dict[str, Any], n: int | None, what: str,
                           th: Thresholds) -> Check:
    if th.non_inferiority == "off":
        return Check("non_inferiority", SKIP, "non-inferiority test off (--non-inferiority ci|mcnemar)")
    racc = _num(ref, "accuracy", "reference", 0.0, 1.0)
    if th.non_inferiority == "ci":
        ci = _get(rec, "accuracy_ci95", what)
        if not (isinstance(ci, list) and len(ci) == 2 and all(_finite(v) for v in ci) and ci[0] <= ci[1]):
            raise MissingMetric(f"{what}: 'accuracy_ci95' is not a [lo, hi] pair ({ci!r})")
        lo = float(ci[0])
        bound = racc - th.ni_margin / 100.0
        ok = lo >= bound - 1e-12
        msg = (f"lower 95% CI bound {100 * lo:.2f}% {'>=' if ok else '<'} reference {100 * racc:.2f}% - "
               f"{th.ni_margin:g} pp = {100 * bound:.2f}%"
               + ("" if ok else " (non-inferiority not shown: too few test images or a real loss)"))
        return Check("non_inferiority", PASS if ok else FAIL, msg, lo, bound, {"method": "ci", "ci95": ci})
    # McNemar: b = reference right & artifact wrong (losses), c = reference wrong & artifact right (gains)
    b = _num(rec, "mcnemar.b", what, 0.0)
    c = _num(rec, "mcnemar.c", what, 0.0)
    p = _num(rec, "mcnemar.p_value", what, 0.0, 1.0)
    acc = _num(rec, "accuracy", what, 0.0, 1.0)
    if n:
        # The counts must agree with the accuracies (same images): (b - c) / n == ref_acc - acc.
        if abs((b - c) - (racc - acc) * n) > 1.01:
            raise MissingMetric(f"{what}: mcnemar counts b={b:g}, c={c:g} disagree with the accuracies "
                                f"({100 * racc:.2f}% vs {100 * acc:.2f}% on n={n})")
    worse = b > c and p < th.alpha
    msg = (f"McNemar {int(b)} lost / {int(c)} gained vs reference, p={p:.3g}: "
           + (f"significantly worse at alpha={th.alpha:g}" if worse else f"not significantly worse at alpha={th.alpha:g}"))
    return Check("non_inferiority", FAIL if worse else PASS, msg, p, th.alpha,
                 {"method": "mcnemar", "b": b, "c": c})


def _check_baseline(rec: dict[str, Any], base: dict[str, Any] | None, classes: list[str], what: str,
                    th: Thresholds, baseline_path: str | None) -> list[Check]:
    if baseline_path is None:
        return [Check("baseline_accuracy", SKIP, "no baseline given (--baseline FILE)"),
                Check("latency", SKIP, "no baseline given (--baseline FILE); latency is only compared on the same device")]
    if base is None:
        msg = (f"{what} is not in the baseline {baseline_path}: nothing approved to compare with "
               "(record it with --update-baseline after review)")
        return [Check("baseline_accuracy", ERROR, msg), Check("latency", ERROR, msg)]

    def acc_check() -> Check:
        acc = _num(rec, "accuracy", what, 0.0, 1.0)
        bacc = _num(base, "accuracy", f"baseline {what}", 0.0, 1.0)
        drop = _pp(bacc - acc)
        r = _recalls(rec, classes, what)
        br = {c: _num(base, f"recall.{c}", f"baseline {what}", 0.0, 1.0) for c in classes}
        cdrops = {c: _pp(br[c] - r[c]) for c in classes}
        bad = {c: d for c, d in cdrops.items() if d > th.max_class_drop}
        ok = drop <= th.max_drop and not bad
        parts = [f"accuracy {100 * acc:.2f}% vs baseline {100 * bacc:.2f}%: {signed(-drop)} pp "
                 f"(drop limit {th.max_drop:g} pp)"]
        if bad:
            parts.append("class recall vs baseline: " + "; ".join(f"{c} {signed(-d)} pp" for c, d in bad.items())
                         + f" (drop limit {th.max_class_drop:g} pp)")
        return Check("baseline_accuracy", PASS if ok else FAIL, "; ".join(parts), drop, th.max_drop,
                     {"baseline_accuracy": bacc, "class_drops_pp": cdrops})

    def lat_check() -> Check:
        p50 = _num(rec, "latency_ms.p50", what, 0.0)
        bp50 = _num(base, "latency_ms.p50", f"baseline {what}", 0.0)
        if bp50 <= 0:
            raise MissingMetric(f"baseline {what}: latency p50 is 0")
        ratio = p50 / bp50
        ok = ratio <= th.max_latency_ratio
        msg = (f"p50 latency {p50:.3g} ms vs baseline {bp50:.3g} ms: x{ratio:.2f} "
               f"({'<=' if ok else '>'} x{th.max_latency_ratio:g})")
        return Check("latency", PASS if ok else FAIL, msg, ratio, th.max_latency_ratio,
                     {"p50_ms": p50, "baseline_p50_ms": bp50})

    return [_guard("baseline_accuracy", acc_check), _guard("latency", lat_check)]


# ----------------------------------------------------------------------------- baselines


def _baseline_entry(s: Subject, rec: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    what = s.key
    return {
        "name": s.name, "device": s.device, "target": s.target, "precision": s.precision,
        "artifact_sha256": rec.get("artifact_sha256"),
        "device_fingerprint": device_essentials(rec),
        "accuracy": _num(rec, "accuracy", what, 0.0, 1.0),
        "accuracy_ci95": rec.get("accuracy_ci95"),
        "macro_f1": rec.get("macro_f1"),
        "recall": _recalls(rec, classes, what),
        "agreement": _num(rec, "agreement", what, 0.0, 1.0),
        "latency_ms": {"p50": _num(rec, "latency_ms.p50", what, 0.0),
                       **{k: (rec.get("latency_ms") or {}).get(k) for k in ("p90", "p99", "mean", "n")}},
        "throughput_ips": rec.get("throughput_ips"),
        "size_bytes": rec.get("size_bytes"),
    }


def build_baseline(results: dict[str, Any], report: GateReport, results_path: str | Path) -> dict[str, Any]:
    """A reviewable baseline: what it belongs to (source, data list, devices) and per-artifact metrics."""
    src = source_sha256(results)
    data = results.get("data") or {}
    if not src:
        raise MissingMetric("the reference records no source sha256: cannot say which model a baseline belongs to")
    if not data.get("list_hash"):
        raise MissingMetric("the results record no data.list_hash: cannot say which images a baseline belongs to")
    classes = list(data.get("class_names") or [])
    recs = {s.key: r for s, r in zip(report.subjects, results.get("results") or [])}
    keys = [s.key for s in report.subjects if s.key in recs]
    dups = sorted({k for k in keys if keys.count(k) > 1})
    if dups:
        raise MissingMetric(f"artifact x device appears more than once in the results: {', '.join(dups)}")
    ref = results["reference"]
    return {
        "kind": BASELINE_KIND,
        "baseline_version": BASELINE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "edgebrain": __version__,
        "command": " ".join(["edgebrain", "gate", *sys.argv[1:]]) if sys.argv else None,
        "from_results": {"path": str(results_path), "sha256": sha256_file(results_path)},
        "source": {"sha256": src, "path": ref.get("artifact")},
        "data": {k: data.get(k) for k in ("root", "split", "n", "list_hash", "class_names")},
        "reference": {"accuracy": _num(ref, "accuracy", "reference", 0.0, 1.0),
                      "recall": _recalls(ref, classes, "reference"),
                      "device": device_essentials(ref)},
        "thresholds_at_approval": asdict(report.thresholds),
        "artifacts": [_baseline_entry(s, recs[s.key], classes) for s in report.subjects if s.key in recs],
    }


def write_baseline(path: str | Path, baseline: dict[str, Any]) -> None:
    atomic_write_json(path, baseline)


def load_baseline(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise GateError(f"{p}: baseline file not found (write one with --update-baseline after review)")
    try:
        b = read_json(p)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GateError(f"{p}: baseline is not valid JSON ({exc})") from exc
    if not isinstance(b, dict) or b.get("kind") != BASELINE_KIND:
        raise GateError(f"{p}: not an edgebrain gate baseline (kind {b.get('kind') if isinstance(b, dict) else None!r})")
    if b.get("baseline_version") != BASELINE_VERSION:
        raise GateError(f"{p}: unsupported baseline_version {b.get('baseline_version')!r}")
    if not isinstance(b.get("artifacts"), list):
        raise GateError(f"{p}: baseline lists no artifacts")
    return b


def baseline_mismatches(baseline: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """Why this baseline does not belong to these results (empty when it does)."""
    out: list[str] = []
    bsrc = (baseline.get("source") or {}).get("sha256")
    src = source_sha256(results)
    if bsrc != src:
        out.append(f"source model sha256: baseline {str(bsrc)[:12]}…, results {str(src)[:12]}…")
    bdata = baseline.get("data") or {}
    data = results.get("data") or {}
    for k in ("list_hash", "split", "n", "class_names"):
        if bdata.get(k) != data.get(k):
            bv, rv = bdata.get(k), data.get(k)
            if k == "list_hash":
                bv, rv = f"{str(bv)[:12]}…", f"{str(rv)[:12]}…"
            out.append(f"data {k}: baseline {bv}, results {rv}")
    bdev = {(a.get("device") or "?"): a.get("device_fingerprint") or {} for a in baseline.get("artifacts") or []}
    for rec in results.get("results") or []:
        if not isinstance(rec, dict):
            continue
        prof = _device_label(rec)
        if prof not in bdev:
            continue
        ess = device_essentials(rec)
        diff = [f"{k} {bdev[prof].get(k)!r} vs {ess.get(k)!r}" for k in ESSENTIAL_KEYS
                if bdev[prof].get(k) != ess.get(k)]
        msg = f"device {prof!r}: " + ", ".join(diff)
        if diff and msg not in out:
            out.append(msg)
    return out


# ----------------------------------------------------------------------------- the gate


def gate(results_json: str | Path, baseline: str | Path | None = None, max_drop: float = 0.5,
         max_class_drop: float = 1.0, min_agreement: float = 0.99, max_latency_ratio: float = 1.5,
         non_inferiority: str = "off", ni_margin: float = 2.0, alpha: float = 0.05,
         min_accuracy: float | None = None, artifact_check: bool = True, artifact_root: str | Path | None = None,
         update_baseline: bool = False, max_unreadable: int = 0, class_rule: str = "exact",
         convert_summary: str | Path | list[str | Path] | None = None) -> GateReport:
    """Check every artifact x device in a bench ``results.json``; see the module docstring.

    With ``update_baseline`` the comparison with the old baseline is skipped and, only when every
    other check passes, the baseline file is (re)written atomically. Raises :class:`GateError` on
    usage errors; everything about the data itself ends up in the report (never raised).
    """
    th = Thresholds(max_drop, max_class_drop, min_agreement, max_latency_ratio, non_inferiority, ni_margin, alpha,
                    min_accuracy, class_rule)
    th.validate()
    if not isinstance(max_unreadable, int) or max_unreadable < 0:
        raise GateError(f"--max-unreadable must be a whole number >= 0, got {max_unreadable!r}")
    if update_baseline and baseline is None:
        raise GateError("--update-baseline needs --baseline FILE (where to write it)")
    rpath = Path(results_json)
    if rpath.is_dir():  # a bench --out folder
        rpath = rpath / "results.json"
    report = GateReport(str(rpath), th, baseline_path=str(baseline) if baseline else None,
                        artifact_check=artifact_check)
    try:
        results = load_results(rpath)
    except MissingMetric as exc:
        report.errors.append(str(exc))
        return report

    data = results.get("data") if isinstance(results.get("data"), dict) else {}
    report.data = {k: data.get(k) for k in ("root", "split", "n", "list_hash", "dedup_n", "class_names")}
    classes = data.get("class_names")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        report.errors.append(f"{rpath}: data.class_names is missing or empty")
        classes = []
    n = data.get("n")
    if not _finite(n) or n <= 0:
        report.errors.append(f"{rpath}: data.n is missing or zero (no images were evaluated)")
        n = None
    ref = results.get("reference")
    if not isinstance(ref, dict) or not ref:
        report.errors.append(f"{rpath}: no reference record (the FP32 source the artifacts are compared with)")
        ref = {}
    else:
        report.reference = {"name": ref.get("name"), "device": _device_label(ref), "accuracy": ref.get("accuracy"),
                            "source_sha256": source_sha256(results)}
        try:
            _num(ref, "accuracy", "reference", 0.0, 1.0)
            if classes:
                _recalls(ref, classes, "reference")
            consistency_problems(ref, classes, n, "reference", raise_first=True)
        except MissingMetric as exc:
            report.errors.append(str(exc))
    recs = results.get("results")
    if not isinstance(recs, list) or not recs:
        report.errors.append(f"{rpath}: lists no artifact results: nothing to gate (an empty run never passes)")
        recs = []
    for w in results.get("warnings") or []:
        report.notes.append(f"bench warning: {w}")
    failed = data.get("failed")
    if isinstance(failed, list) and failed:
        report.notes.append(f"{len(failed)} image(s) could not be read and were left out of every model's score, "
                            f"e.g. {failed[0].get('file') if isinstance(failed[0], dict) else failed[0]}")

    base: dict[str, Any] | None = None
    if baseline is not None and not update_baseline:
        try:
            base = load_baseline(baseline)
        except GateError as exc:
            report.errors.append(str(exc))
        else:
            mism = baseline_mismatches(base, results)
            if mism:
                report.errors.append(f"baseline {baseline} belongs to another model/data/device, refusing to compare: "
                                     + "; ".join(mism))
                base = None
    base_by_key = {f"{a.get('name')}@{a.get('device')}": a for a in (base or {}).get("artifacts") or []}

    src_sha = source_sha256(results)
    root = Path(artifact_root) if artifact_root else None
    for i, rec in enumerate(recs):
        if not isinstance(rec, dict):
            s = Subject(f"results[{i}]", "unknown-device", "", None, None)
            s.checks.append(Check("record", ERROR, f"results[{i}] is not an object"))
            report.subjects.append(s)
            continue
        name = str(rec.get("name") or Path(str(rec.get("artifact") or f"results[{i}]")).name)
        s = Subject(name, _device_label(rec), str(rec.get("artifact") or ""), rec.get("target"), rec.get("precision"))
        what = s.key
        s.metrics = {k: rec.get(k) for k in ("accuracy", "accuracy_ci95", "macro_f1", "agreement")}
        s.metrics["latency_p50_ms"] = (rec.get("latency_ms") or {}).get("p50") if isinstance(rec.get("latency_ms"), dict) else None
        s.checks.append(_integrity(rec, what, rpath.parent, root, artifact_check, src_sha))
        s.checks += [_check_unreadable(data, max_unreadable), _check_consistency(rec, classes, n, what)]
        if not ref or not classes:
            msg = "cannot compare: " + ("no reference record" if not ref else "no class names")
            s.checks += [Check(c, ERROR, msg) for c in ("accuracy", "class_recall", "agreement", "min_accuracy",
                                                        "non_inferiority")]
        else:
            s.checks.append(_guard("accuracy", _check_accuracy, rec, ref, int(n) if n else None, what, th))
            s.checks.append(_guard("class_recall", _check_class_recall_rules, rec, ref, classes, what, th))
            s.checks.append(_guard("agreement", _check_agreement, rec, int(n) if n else None, what, th))
            s.checks.append(_guard("min_accuracy", _check_min_accuracy, rec, what, th))
            s.checks.append(_guard("non_inferiority", _check_non_inferiority, rec, ref,
                                   int(n) if n else None, what, th))
        if update_baseline:
            s.checks += [Check("baseline_accuracy", SKIP, "baseline being (re)written"),
                         Check("latency", SKIP, "baseline being (re)written")]
        else:
            bpath = None if baseline is None else str(baseline)
            if bpath is not None and base is None:
                msg = "baseline unusable (see the results-level error)"
                s.checks += [Check("baseline_accuracy", ERROR, msg), Check("latency", ERROR, msg)]
            else:
                s.checks += _check_baseline(rec, base_by_key.get(what), classes, what, th, bpath)
        report.subjects.append(s)

    # Artifacts bench could not run (missing runtime, crash, timeout) have no numbers: never a pass.
    run_errors = results.get("errors")
    for e in run_errors if isinstance(run_errors, list) else []:
        e = e if isinstance(e, dict) else {"error": str(e)}
        name = str(e.get("name") or Path(str(e.get("artifact") or "?")).name)
        s = Subject(name, str(e.get("device") or "unknown-device"), str(e.get("artifact") or ""), None, None)
        s.checks.append(Check("bench", ERROR, f"bench could not run {name} on {s.device}: {e.get('error', '?')}"))
        report.subjects.append(s)
    _conversion_failures(report, results, recs, rpath, root, convert_summary)
    for s, rec in zip(report.subjects, recs):
        dev = rec.get("device") if isinstance(rec, dict) else None
        for w in (dev.get("warnings") or []) if isinstance(dev, dict) else []:
            report.notes.append(f"{s.key}: device warning: {w}")
    _resolution_notes(report, recs, ref, classes, th)
    if update_baseline:
        if report.status == PASS:
            try:
                b = build_baseline(results, report, rpath)
            except MissingMetric as exc:
                report.errors.append(f"baseline not written: {exc}")
            else:
                write_baseline(baseline, b)  # type: ignore[arg-type]
                report.baseline_written = str(baseline)
        else:
            report.notes.append(f"baseline NOT written to {baseline}: the gate did not pass")
    return report


_gate_checks = gate


@functools.wraps(_gate_checks)
def gate(results_json: str | Path, *args: Any, **kwargs: Any) -> GateReport:
    # Fail closed on results whose shape no check anticipated (a number where a list belongs ...):
    # an error naming the file (exit 2), never a traceback. Usage errors (GateError) still raise.
    try:
        return _gate_checks(results_json, *args, **kwargs)
    except (TypeError, AttributeError, KeyError, IndexError, ValueError, RecursionError) as exc:
        if isinstance(exc, EdgebrainError):
            raise
        rpath = Path(results_json)
        rpath = rpath / "results.json" if rpath.is_dir() else rpath
        fields = Thresholds.__dataclass_fields__
        th = Thresholds(**{k: v for k, v in kwargs.items() if k in fields})
        report = GateReport(str(rpath), th, baseline_path=str(kwargs["baseline"]) if kwargs.get("baseline") else None)
        report.errors.append(f"{rpath}: malformed results, not trusted ({type(exc).__name__}: {str(exc)[:200]})")
        return report


def _summary_paths(recs: list[Any], results_dir: Path, artifact_root: Path | None,
                   explicit: str | Path | list[str | Path] | None) -> list[tuple[Path, bool]]:
    """Conversion summaries to read: the ones given, then ``convert_summary.json`` beside each
    benchmarked artifact folder (``edgebrain convert`` writes it into its ``--out``)."""
    given = [] if explicit is None else [explicit] if isinstance(explicit, (str, Path)) else list(explicit)
    out: list[tuple[Path, bool]] = [(Path(p), True) for p in given]
    seen = {p.resolve() for p, _ in out}
    for rec in recs:
        if not isinstance(rec, dict) or not rec.get("artifact"):
            continue
        d = _find_artifact_dir(str(rec["artifact"]), results_dir, artifact_root)
        cand = d.parent / "convert_summary.json" if d is not None else None
        if cand is not None and cand.is_file() and cand.resolve() not in seen:
            seen.add(cand.resolve())
            out.append((cand, False))
    return out


def _conversion_failures(report: GateReport, results: dict[str, Any], recs: list[Any], rpath: Path,
                         artifact_root: Path | None, explicit: str | Path | list[str | Path] | None) -> None:
    """Artifacts that ``edgebrain convert`` rejected (verification) or could not build never reach
    bench, so they are missing from ``results.json``; here each becomes a subject with a failed
    ``conversion`` check, so no summary (Markdown, JUnit, JSON) reads as a pass without them. A
    summary given explicitly must exist and belong to the same source model (an error otherwise);
    one found beside the artifacts that belongs to another model is ignored with a note."""
    src = source_sha256(results)
    for path, given in _summary_paths(recs, rpath.parent, artifact_root, explicit):
        try:
            s = read_json(path)
        except Exception as exc:
            if given:
                report.errors.append(f"convert summary {path} cannot be read: {exc}")
            continue
        if not isinstance(s, dict) or s.get("kind") != "edgebrain-convert-summary":
            if given:
                report.errors.append(f"{path} is not an edgebrain convert summary")
            continue
        ssha = (s.get("source") or {}).get("sha256") if isinstance(s.get("source"), dict) else None
        if src and ssha and ssha != src:
            msg = f"convert summary {path} was converted from another model (source sha256 {str(ssha)[:12]})"
            (report.errors if given else report.notes).append(msg + ("" if given else "; ignored"))
            continue
        for r in s.get("rejected") or []:
            name = Path(str(r.get("path") or f"{r.get('target')}-{r.get('precision')}")).name.removesuffix(".rejected")
            sub = Subject(name, "conversion", str(r.get("path") or ""), r.get("target"), r.get("precision"))
            sub.checks.append(Check("conversion", FAIL, f"rejected at conversion by verification: "
                                    f"{r.get('reason', '?')} (see {path})", details={"summary": str(path)}))
            report.subjects.append(sub)
        for f in s.get("failed") or []:
            sub = Subject(f"{f.get('target')}-{f.get('precision')}", "conversion", "", f.get("target"),
                          f.get("precision"))
            sub.checks.append(Check("conversion", FAIL, f"could not be converted: {f.get('error', '?')} (see {path})",
                                    details={"summary": str(path)}))
            report.subjects.append(sub)


def _resolution_notes(report: GateReport, recs: list[Any], ref: dict[str, Any], classes: list[str],
                      th: Thresholds) -> None:
    """Say when one image is worth more than a threshold (small test sets)."""
    sup = _supports(ref, classes) if ref else {}
    if not sup:
        for r in recs:
            if isinstance(r, dict):
                sup = _supports(r, classes)
                if sup:
                    break
    coarse = {c: 100.0 / s for c, s in sup.items() if s > 0 and 100.0 / s > th.max_class_drop}
    if coarse:
        report.notes.append(
            "one image is worth more than the class-recall threshold here: "
            + ", ".join(f"{c} {v:.2f} pp (n={sup[c]})" for c, v in coarse.items())
            + ("; their recall is decided by an exact McNemar test on the paired predictions instead "
               f"(fails at p < {th.alpha:g}; --class-rule threshold keeps the pp limit)" if th.class_rule == "exact"
               else "; a single changed prediction in these classes fails the gate (--class-rule threshold)"))
    n = report.data.get("n")
    if _finite(n) and n > 0 and 100.0 / n > th.max_drop:
        report.notes.append(f"one image is {100.0 / n:.2f} pp of accuracy (n={n}) > max drop {th.max_drop:g} pp")


# ----------------------------------------------------------------------------- reports


def _fmt(v: Any, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return f"{v * scale:{spec}}{suffix}" if _finite(v) else "—"


def _md_escape(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


STATUS_MD = {PASS: "✅ pass", FAIL: "❌ fail", ERROR: "⛔ error", SKIP: "➖ skip"}


def worst_class(s: Subject) -> str:
    """"-2.50 (glioma)": the class whose recall changed most for the worse, vs the reference."""
    cr = s.check("class_recall")
    drops = cr.details.get("drops_pp") if cr else None
    if not drops:
        return ""
    wc = max(drops, key=lambda c: drops[c])
    return f"{signed(-drops[wc])} ({wc})"


def markdown_summary(report: GateReport) -> str:
    """A Markdown summary (GitHub step summary / GitLab job artefact friendly)."""
    icon = {PASS: "✅", FAIL: "❌", ERROR: "⛔"}[report.status]
    L = [f"## {icon} edgebrain gate: {report.verdict}", ""]
    d = report.data
    ref = report.reference
    L.append(f"Results: `{report.results_path}`" + (f" · baseline: `{report.baseline_path}`" if report.baseline_path else ""))
    if d:
        L.append(f"Data: {d.get('split') or '?'} of `{d.get('root') or '?'}`, n={d.get('n')}, "
                 f"list hash `{str(d.get('list_hash'))[:12]}`")
    if ref:
        L.append(f"Reference: {_md_escape(ref.get('name') or 'FP32 source')} on {ref.get('device')}, accuracy "
                 f"{_fmt(ref.get('accuracy'), '.2f', 100, '%')}, source sha256 `{str(ref.get('source_sha256'))[:12]}`")
    L += ["", "### Thresholds", "", "| criterion | limit |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in report.thresholds.describe()]
    L.append(f"| artifact hash check | {'on' if report.artifact_check else 'OFF (--no-artifact-check)'} |")
    if report.subjects:
        L += ["", "### Artifacts", "",
              "| artifact | device | accuracy | Δ accuracy vs ref (pp) | worst class recall Δ (pp) | agreement | p50 ms | "
              + " | ".join(CHECKS) + " | verdict |",
              "|---|---|---:|---:|---:|---:|---:|" + "---|" * len(CHECKS) + "---|"]
        for s in report.subjects:
            acc = s.check("accuracy")
            worst = worst_class(s)
            cells = [STATUS_MD[c.status].split()[0] if c else "—" for c in map(s.check, CHECKS)]
            L.append(
                f"| {_md_escape(s.name)} | {_md_escape(s.device)} | {_fmt(s.metrics.get('accuracy'), '.2f', 100, '%')} | "
                f"{signed(-acc.value) if acc and acc.value is not None else '—'} | {worst or '—'} | "
                f"{_fmt(s.metrics.get('agreement'), '.4f')} | {_fmt(s.metrics.get('latency_p50_ms'), '.3g')} | "
                + " | ".join(cells) + f" | {STATUS_MD[s.status]} |")
    fails = report.failures()
    if fails:
        L += ["", "### Why it did not pass", ""]
        for s, c in fails:
            who = f"**{_md_escape(s.key)}** `{c.name}`" if s else "**results**"
            L.append(f"- {STATUS_MD[c.status]} {who}: {_md_escape(c.message)}")
    if report.notes:
        L += ["", "### Notes", ""] + [f"- {_md_escape(n)}" for n in report.notes]
    if report.baseline_written:
        L += ["", f"Baseline written to `{report.baseline_written}` (review and commit it)."]
    L += ["", f"Exit code {report.exit_code} (0 pass, 1 regression, 2 usage error or missing/untrustworthy data).", ""]
    return "\n".join(L)


def junit_xml(report: GateReport) -> bytes:
    """JUnit XML: one testcase per artifact x device x check; results-level errors in their own suite."""
    root = ET.Element("testsuites", name="edgebrain gate")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}

    def suite(name: str, cases: list[tuple[str, Check]]) -> None:
        el = ET.SubElement(root, "testsuite", name=name)
        props = ET.SubElement(el, "properties")
        for k, v in report.thresholds.describe():
            ET.SubElement(props, "property", name=k, value=v)
        ET.SubElement(props, "property", name="results", value=report.results_path)
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        for classname, c in cases:
            tc = ET.SubElement(el, "testcase", classname=classname, name=c.name, time="0")
            counts["tests"] += 1
            if c.status == FAIL:
                f = ET.SubElement(tc, "failure", message=c.message, type="regression")
                f.text = c.message
                counts["failures"] += 1
            elif c.status == ERROR:
                e = ET.SubElement(tc, "error", message=c.message, type="missing-or-untrusted-data")
                e.text = c.message
                counts["errors"] += 1
            elif c.status == SKIP:
                ET.SubElement(tc, "skipped", message=c.message)
                counts["skipped"] += 1
            else:
                out = ET.SubElement(tc, "system-out")
                out.text = c.message
        for k, v in counts.items():
            el.set(k, str(v))
            totals[k] += v

    if report.errors or not report.subjects:
        errs = report.errors or ["no artifact results to gate"]
        suite("edgebrain gate: results", [("edgebrain.gate.results", Check(f"results[{i}]", ERROR, e))
                                          for i, e in enumerate(errs)])
    for s in report.subjects:
        suite(f"{s.name} @ {s.device}", [(f"edgebrain.gate.{s.key}", c) for c in s.checks])
    for k, v in totals.items():
        root.set(k, str(v))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_junit(path: str | Path, report: GateReport) -> None:
    atomic_write_bytes(path, junit_xml(report))


def write_summary(path: str | Path, report: GateReport) -> None:
    atomic_write_text(path, markdown_summary(report))


# ----------------------------------------------------------------------------- robustness rule


def check_robustness(report: GateReport, max_worst_drop: float | None = None,
                     max_extra_drop: float | None = None) -> GateReport:
    """Add a ``robustness`` check to every subject from ``bench --robustness`` (results.json
    ``robustness``): the artifact's worst accuracy drop under the perturbation suite must stay
    within ``max_worst_drop`` pp, and (``max_extra_drop``) its drop may exceed the reference's under
    the same perturbation by at most that many pp (int8 often degrades more than FP32). Fails
    closed: asked for but not measured, or an artifact missing from the suite, is an error."""
    if max_worst_drop is None and max_extra_drop is None:
        return report
    for name, v in (("max-robustness-drop", max_worst_drop), ("max-robustness-extra-drop", max_extra_drop)):
        if v is not None and (not _finite(v) or not 0 <= v <= 100):
            raise GateError(f"{name} must be between 0 and 100 percentage points (got {v})")
    try:
        rob = load_results(report.results_path).get("robustness")
    except MissingMetric as exc:
        rob = {"error": str(exc)}
    by_name = {r.get("name"): r for r in (rob or {}).get("results") or [] if isinstance(r, dict)}
    for s in report.subjects:
        s.checks.append(_robustness_check(s, rob, by_name.get(s.name), max_worst_drop, max_extra_drop))
    return report


def _robustness_check(s: Subject, rob: dict[str, Any] | None, rec: dict[str, Any] | None,
                      max_worst: float | None, max_extra: float | None) -> Check:
    if not isinstance(rob, dict) or not rob or rob.get("error"):
        why = (rob or {}).get("error") if isinstance(rob, dict) else None
        return Check("robustness", ERROR, "no robustness results (run edgebrain bench --robustness)"
                     + (f": {why}" if why else ""))
    if rec is None:
        return Check("robustness", ERROR, f"{s.name} is not in the robustness results")
    try:
        worst = _num(rec, "worst_drop_pp", s.key)
        extra = _num(rec, "max_extra_drop_pp", s.key) if max_extra is not None else None
    except MissingMetric as exc:
        return Check("robustness", ERROR, str(exc))
    bad = []
    if max_worst is not None and worst > max_worst:
        bad.append(f"worst drop {worst:.2f} pp ({rec.get('worst_condition')}) > {max_worst:g} pp")
    if extra is not None and max_extra is not None and extra > max_extra:
        bad.append(f"drops {extra:.2f} pp more than the reference under some perturbation (> {max_extra:g} pp; "
                   f"worse under: {', '.join(rec.get('degrades_more_than_reference') or []) or '-'})")
    msg = "; ".join(bad) or (f"worst drop {worst:.2f} pp ({rec.get('worst_condition')})"
                             + (f", at most {extra:.2f} pp more than the reference" if extra is not None else ""))
    return Check("robustness", FAIL if bad else PASS, msg, value=worst, limit=max_worst,
                 details={"worst_by_perturbation": rec.get("worst_by_perturbation"), "max_extra_drop_pp": extra})
