"""Progress in logs: steps that run for minutes print plain lines when stderr is not a terminal."""

from __future__ import annotations

import itertools

import pytest

from edgebrain import progress


def test_track_prints_plain_lines_in_a_log(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEBRAIN_QUIET", raising=False)
    assert list(progress.track(range(5), "short step")) == list(range(5))
    assert capsys.readouterr().err == ""  # a step shorter than the interval says nothing
    clock = itertools.count(0.0, 20.0)  # each reading 20 s later than the last
    monkeypatch.setattr("time.monotonic", lambda: next(clock))
    assert list(progress.track(range(4), "long step")) == list(range(4))
    err = capsys.readouterr().err.splitlines()
    assert err and all(line.startswith("long step: ") and "/4 done" in line for line in err)


def test_heartbeat_first_unit_at_once_and_quiet(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEBRAIN_QUIET", raising=False)
    beat = progress.Heartbeat("accuracy control", every=3600)
    beat.tick()
    beat.tick()
    assert capsys.readouterr().err.count("accuracy control: ") == 1
    monkeypatch.setenv("EDGEBRAIN_QUIET", "1")
    progress.Heartbeat("quiet").tick()
    assert capsys.readouterr().err == ""


def test_deadline() -> None:
    d = progress.Deadline(None)
    assert not d.expired() and d.remaining() == float("inf")
    d.check("anything")
    d = progress.Deadline(1e-9)
    assert d.expired()
    with pytest.raises(progress.BudgetExpired, match="time budget of 1e-09 s spent .* before the next step"):
        d.check("the next step")
    with pytest.raises(ValueError):
        progress.Deadline(0)
