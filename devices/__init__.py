"""Named device profiles for ``edgebrain bench --device``.

A profile (``profiles/<name>.json``) holds the runtime options a device is benchmarked with
(threads, CPU affinity, TFLite delegate, onnxruntime providers, OpenVINO device / hints /
inference precision) and the facts about it (CPU, ISA, cores, RAM, OS). Options are applied
as written; facts are compared with the fingerprint the device reports about itself, and a
mismatch is recorded as a warning, never hidden.

``--device`` accepts:

* a profile name (``host``, ``rpi4``, ...) or a path to a profile JSON file;
* ``ssh://user@host[:port]``: run there, with the generic ``ssh`` profile;
* ``PROFILE=ssh://user@host[:port]`` (e.g. ``rpi5=ssh://pi@10.0.0.7``): run there with that
  profile's options.

Only the ``host`` profile (``"local": true``) runs on this machine; any other profile needs an
address, from the ``PROFILE=ssh://...`` form or its ``"ssh"`` key.
Extra profile folders: ``$EDGEBRAIN_DEVICES`` (``os.pathsep``-separated), searched first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ssh import DeviceError, SSHAddress, SSHError, SSHTransport, parse_ssh_url

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"

_ARTIFACT_PRECISIONS = {"fp32", "fp16", "bf16", "int8", "dynamic", "int16x8"}
_TOP_KEYS = {"name", "description", "local", "facts", "runtime", "precision", "ssh", "notes"}
_RUNTIME_KEYS = {"threads", "cpus", "tflite", "onnx", "openvino"}
_TARGET_KEYS = {
    "tflite": {"delegate"},
    "onnx": {"providers"},
    "openvino": {"device", "performance_hint", "inference_precision"},
}
_FACT_KEYS = {"cpu", "arch", "cores", "isa", "int8_dot_product", "ram_mb", "os", "accelerator"}
_OV_PRECISIONS = {None, "f32", "bf16", "f16"}
_OV_HINTS = {None, "LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"}


@dataclass
class Profile:
    name: str
    description: str = ""
    local: bool = False
    facts: dict[str, Any] | None = None
    runtime: dict[str, Any] = field(default_factory=dict)
    precision: dict[str, Any] = field(default_factory=dict)
    ssh: str | None = None
    notes: str = ""
    source: str = ""  # the file it was read from

    @property
    def threads(self) -> int | None:
        t = self.runtime.get("threads")
        return int(t) if t else None

    @property
    def cpus(self) -> list[int] | None:
        c = self.runtime.get("cpus")
        return [int(v) for v in c] if c else None

    def target_options(self, target: str) -> dict[str, Any]:
        """Runner keyword options for one target, with unset (null) values left out."""
        opts = dict(self.runtime.get(target) or {})
        return {k: v for k, v in opts.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "local": self.local, "facts": self.facts,
            "runtime": self.runtime, "precision": self.precision, "ssh": self.ssh, "notes": self.notes,
            "source": self.source,
        }


@dataclass
class DeviceSpec:
    """One ``--device`` value: the profile and, for a remote device, where to reach it."""

    profile: Profile
    address: SSHAddress | None = None

    @property
    def is_local(self) -> bool:
        return self.address is None

    @property
    def label(self) -> str:
        return self.profile.name if self.address is None else f"{self.profile.name}@{self.address.host}"

    @property
    def transport(self) -> str:
        return "local" if self.address is None else self.address.url


def search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("EDGEBRAIN_DEVICES", "").split(os.pathsep) if p]
    return [*extra, PROFILE_DIR]


def list_profiles() -> list[str]:
    names: set[str] = set()
    for d in search_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.json"))
    return sorted(names)


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise DeviceError(f"{where}: {msg}")


def validate_profile(d: Any, where: str) -> None:
    """Reject unknown keys and wrong types, naming the file and the key."""
    _check(isinstance(d, dict), where, "a profile must be a JSON object")
    unknown = set(d) - _TOP_KEYS
    _check(not unknown, where, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    _check(isinstance(d.get("name"), str) and bool(d["name"]), where, "'name' must be a non-empty string")
    facts = d.get("facts")
    if facts is not None:
        _check(isinstance(facts, dict), where, "'facts' must be an object or null")
        unknown = set(facts) - _FACT_KEYS
        _check(not unknown, where, f"unknown fact(s) {sorted(unknown)}; allowed: {sorted(_FACT_KEYS)}")
        if facts.get("cores") is not None:
            _check(isinstance(facts["cores"], int) and facts["cores"] > 0, where, "facts.cores must be > 0")
    rt = d.get("runtime") or {}
    _check(isinstance(rt, dict), where, "'runtime' must be an object")
    unknown = set(rt) - _RUNTIME_KEYS
    _check(not unknown, where, f"unknown runtime option(s) {sorted(unknown)}; allowed: {sorted(_RUNTIME_KEYS)}")
    t = rt.get("threads")
    _check(t is None or (isinstance(t, int) and t > 0), where, "runtime.threads must be a positive integer or null")
    c = rt.get("cpus")
    _check(c is None or (isinstance(c, list) and all(isinstance(v, int) and v >= 0 for v in c) and c),
           where, "runtime.cpus must be a non-empty list of CPU numbers or null")
    for target, keys in _TARGET_KEYS.items():
        opts = rt.get(target) or {}
        _check(isinstance(opts, dict), where, f"runtime.{target} must be an object")
        unknown = set(opts) - keys
        _check(not unknown, where, f"unknown runtime.{target} option(s) {sorted(unknown)}; allowed: {sorted(keys)}")
    ov = rt.get("openvino") or {}
    _check(ov.get("inference_precision") in _OV_PRECISIONS, where,
           f"runtime.openvino.inference_precision must be one of {sorted(p for p in _OV_PRECISIONS if p)} or null")
    _check(ov.get("performance_hint") in _OV_HINTS, where,
           f"runtime.openvino.performance_hint must be one of {sorted(h for h in _OV_HINTS if h)} or null")
    prov = (rt.get("onnx") or {}).get("providers")
    _check(prov is None or (isinstance(prov, list) and all(isinstance(p, str) for p in prov)), where,
           "runtime.onnx.providers must be a list of provider names")
    prec = d.get("precision") or {}
    _check(isinstance(prec, dict) and set(prec) <= {"preferred"}, where,
           "'precision' must be an object with only 'preferred'")
    pref = prec.get("preferred")
    _check(pref is None or (isinstance(pref, list) and all(p in _ARTIFACT_PRECISIONS for p in pref)), where,
           f"precision.preferred must be a list of {sorted(_ARTIFACT_PRECISIONS)} or null")
    if d.get("ssh") is not None:
        parse_ssh_url(str(d["ssh"]))  # raises a clear error for a bad address


def profile_from_dict(d: dict[str, Any], source: str = "") -> Profile:
    validate_profile(d, source or d.get("name", "profile"))
    return Profile(
        name=d["name"], description=d.get("description", ""), local=bool(d.get("local", False)),
        facts=d.get("facts"), runtime=dict(d.get("runtime") or {}), precision=dict(d.get("precision") or {}),
        ssh=d.get("ssh"), notes=d.get("notes", ""), source=source,
    )


def _read_profile(path: Path) -> Profile:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DeviceError(f"{path}: cannot read the profile ({exc})") from exc
    except ValueError as exc:
        raise DeviceError(f"{path}: not valid JSON ({exc})") from exc
    return profile_from_dict(d, str(path))


def load_profile(name_or_path: str) -> Profile:
    """A profile by name (searched in $EDGEBRAIN_DEVICES, then the built-in folder) or by path."""
    p = Path(name_or_path)
    if p.suffix == ".json" or os.sep in name_or_path:
        if not p.is_file():
            raise DeviceError(f"device profile file not found: {p}")
        return _read_profile(p)
    for d in search_dirs():
        cand = d / f"{name_or_path}.json"
        if cand.is_file():
            return _read_profile(cand)
    raise DeviceError(f"unknown device profile {name_or_path!r}; known: {', '.join(list_profiles())} "
                      "(or give a profile .json path, ssh://user@host[:port], or PROFILE=ssh://user@host)")


def generic_ssh_profile() -> Profile:
    """Used for a bare ``ssh://`` device: no facts to compare, runtime defaults."""
    return Profile(name="ssh", description="A device reached over SSH (no named profile)", local=False,
                   facts=None, runtime={"threads": None, "cpus": None}, source="(built in)")


def parse_device(value: str) -> DeviceSpec:
    """Parse one ``--device`` value (see the module docstring)."""
    value = value.strip()
    if not value:
        raise DeviceError("empty --device value")
    if value.startswith("ssh://"):
        return DeviceSpec(generic_ssh_profile(), parse_ssh_url(value))
    if "=ssh://" in value:
        name, _, url = value.partition("=")
        return DeviceSpec(load_profile(name), parse_ssh_url(url))
    prof = load_profile(value)
    if prof.local:
        return DeviceSpec(prof, None)
    if prof.ssh:
        return DeviceSpec(prof, parse_ssh_url(prof.ssh))
    raise DeviceError(
        f"profile {prof.name!r} describes {prof.description or 'another machine'}; it does not run here. "
        f"Give its address: --device {prof.name}=ssh://user@host[:port] (or set \"ssh\" in a copy of the "
        "profile under $EDGEBRAIN_DEVICES). Use --device host to benchmark this machine."
    )


def compare_facts(profile: Profile, fingerprint: dict[str, Any]) -> list[str]:
    """Warnings where the device's own fingerprint contradicts the profile's facts."""
    facts = profile.facts or {}
    out: list[str] = []
    if facts.get("arch") and fingerprint.get("arch") and facts["arch"] != fingerprint["arch"]:
        out.append(f"profile {profile.name!r} says arch {facts['arch']}, the device reports {fingerprint['arch']}")
    if facts.get("cores") and fingerprint.get("cores") and int(facts["cores"]) != int(fingerprint["cores"]):
        out.append(f"profile {profile.name!r} says {facts['cores']} cores, the device reports {fingerprint['cores']}")
    want_isa = set(facts.get("isa") or [])
    have_isa = set(fingerprint.get("isa") or [])
    missing = sorted(want_isa - have_isa)
    if want_isa and missing:
        out.append(f"profile {profile.name!r} expects ISA {missing}, which the device does not report")
    return out


__all__ = [
    "DeviceError", "DeviceSpec", "Profile", "SSHAddress", "SSHError", "SSHTransport", "compare_facts", "generic_ssh_profile",
    "list_profiles", "load_profile", "parse_device", "parse_ssh_url", "profile_from_dict",
]
