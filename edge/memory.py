"""Memory: what is available, whether a step that can be estimated fits, and the peak a step reached.

* :func:`available_bytes`: what the system (and, when lower, the cgroup the process runs in) can
  still give;
* :func:`require`: raise :class:`InsufficientMemory`, naming the step and the figures, before a
  step whose need can be estimated is started, instead of being killed by the kernel halfway;
* :func:`step_budget`: how many bytes a step that streams its data may hold at once (for example
  the activations onnxruntime's calibrators keep per chunk of calibration images);
* :class:`PeakRSS`: the peak resident set size of this process over a section of work. On Linux the
  kernel's high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` at the start of
  each section, so each section gets its own figure; elsewhere the process-wide ``ru_maxrss`` is
  reported and said to be so.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from pathlib import Path
from typing import Any

from .errors import EdgebrainError

log = logging.getLogger(__name__)

MB = 2**20
GB = 2**30
# default bytes a streaming step may hold at once, and its share of the available memory
DEFAULT_STEP_BUDGET = 1 * GB
STEP_SHARE = 0.25
BUDGET_ENV = "EDGEBRAIN_STEP_MEMORY_MB"


class InsufficientMemory(EdgebrainError):
    """A step was estimated to need more memory than is available; nothing was started."""


def _cgroup_free() -> int | None:
    """Bytes left under a cgroup v2 memory limit, or None without one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def available_bytes() -> int:
    """Memory the process can still get: the system's available memory, or the cgroup's when lower."""
    import psutil

    avail = int(psutil.virtual_memory().available)
    cg = _cgroup_free()
    return min(avail, cg) if cg is not None else avail


def require(step: str, need: int, hint: str = "", available: int | None = None) -> None:
    """Raise :class:`InsufficientMemory` when ``need`` bytes are more than are available."""
    avail = available_bytes() if available is None else available
    if need > avail:
        raise InsufficientMemory(
            f"{step} needs about {need / GB:.2f} GB but only {avail / GB:.2f} GB of memory is available; "
            f"not started (it would be killed by the system part-way)" + (f". {hint}" if hint else ""))
    log.debug("%s: needs about %.2f GB, %.2f GB available", step, need / GB, avail / GB)


def step_budget(available: int | None = None) -> int:
    """Bytes a streaming step may hold at once: ``EDGEBRAIN_STEP_MEMORY_MB`` when set, else
    the smaller of 1 GB and a quarter of the available memory (at least 64 MB)."""
    env = os.environ.get(BUDGET_ENV)
    if env:
        try:
            return max(1, int(float(env) * MB))
        except ValueError:
            raise EdgebrainError(f"{BUDGET_ENV}={env!r} is not a number of megabytes") from None
    avail = available_bytes() if available is None else available
    return max(64 * MB, min(DEFAULT_STEP_BUDGET, int(avail * STEP_SHARE)))


def _vm_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def process_peak_bytes() -> int:
    """Peak RSS of this process since it started (``ru_maxrss``; kB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


class PeakRSS:
    """Peak resident set size of this process over the sections it measures.

    ``with tracker.section() as s: ...`` then ``s.peak`` (bytes). The run's overall peak
    (:attr:`overall`) folds in every section's peak and what happened between sections, so
    resetting the kernel's mark for a section never loses the run's figure."""

    def __init__(self) -> None:
        self._overall = 0
        self.per_section = _vm_hwm() is not None and _reset_hwm()
        self._fold()

    def _fold(self) -> int:
        now = _vm_hwm() if self.per_section else process_peak_bytes()
        now = now or 0
        self._overall = max(self._overall, now)
        return now

    @property
    def overall(self) -> int:
        self._fold()
        return self._overall

    def section(self) -> _Section:
        return _Section(self)

    def method(self) -> str:
        if self.per_section:
            return "VmHWM of the convert process, reset at the start of each step (/proc/self/clear_refs)"
        return "ru_maxrss of the convert process since it started (per-step figures are not available here)"


class _Section:
    def __init__(self, tracker: PeakRSS) -> None:
        self.tracker = tracker
        self.peak = 0

    def start(self) -> _Section:
        self.tracker._fold()
        if self.tracker.per_section:
            _reset_hwm()
        return self

    def stop(self) -> int:
        self.peak = self.tracker._fold()
        return self.peak

    def __enter__(self) -> _Section:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def to_dict(self) -> dict[str, Any]:
        return {"peak_rss_mb": round(self.peak / MB, 1), "measured": self.tracker.method()}
