"""The int8 fallback decision rule (edgebrain.convert._int8_choose) on measured figures.

The builds are stubs that only record their settings: what is under test is which build the
rule keeps for given validation measurements (top-1 agreement, mean KL divergence), the
plumbing around real targets is covered by tests/edge/test_convert_cli.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edgebrain import convert as C
from edgebrain.converters.base import BuildContext, Built


class _Stub:
    name = "stub"
    int8_candidates: list[dict[str, Any]] = []

    def __init__(self, fallbacks: list[dict[str, Any]]) -> None:
        self.fallbacks = fallbacks

    def int8_fallbacks_for(self, ctx: Any) -> list[dict[str, Any]]:
        return self.fallbacks

    def int8_candidates_for(self, ctx: Any) -> list[dict[str, Any]]:
        return []

    def build(self, ctx: BuildContext, precision: str, out: Path) -> Built:
        tag = ",".join(f"{k}={v}" for k, v in sorted(ctx.options.items())) or "default"
        (out / "model.txt").write_text(tag)
        return Built(model_file="model.txt", ops={"int8_ops": 1})


def _choose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, measured: dict[str, tuple[float, float]],
            fallbacks: list[dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
    def fake_verify(art: Any, target: Any, vs: Any, min_agreement: float, threads: Any) -> tuple[dict, list]:
        agree, kl = measured[(Path(art.path) / "model.txt").read_text()]
        return {"top1_agreement": agree, "mean_kl": kl}, []

    monkeypatch.setattr(C, "_verify", fake_verify)
    monkeypatch.setattr(C, "_draft", lambda build, built, *a: SimpleNamespace(path=build))
    target = _Stub(fallbacks)
    ctx = BuildContext(source=SimpleNamespace(), workdir=tmp_path, options={})  # type: ignore[arg-type]
    first = tmp_path / "first"
    first.mkdir()
    built = target.build(ctx, "int8", first)
    vs = SimpleNamespace(x=np.zeros((571, 1)), split="val")
    job = SimpleNamespace(target=target, precision="int8", dirname="stub-int8")
    chosen, _folder, settings = C._int8_choose(job, ctx, built, first, tmp_path, vs, 0.995, True, None,
                                              SimpleNamespace())  # type: ignore[arg-type]
    return chosen, settings


def test_a_fallback_that_agrees_more_but_moved_the_probabilities_further_is_not_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the OpenVINO Xception case: per-tensor 3 flips / KL 0.00126, per-channel 1 flip / KL 0.00163
    measured = {"default": (0.994746, 0.00126), "pc=True": (0.998249, 0.00163)}
    chosen, settings = _choose(tmp_path, monkeypatch, measured, [{"pc": True}])
    assert settings == {}
    fb = chosen.quantization["fallback"]
    assert fb["chosen"] == "default"
    assert "mean KL divergence from the source is higher" in fb["attempts"][1]["not_kept"]


def test_a_fallback_that_agrees_more_and_is_closer_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    measured = {"default": (0.994746, 0.00200), "pc=True": (0.998249, 0.00150)}
    chosen, settings = _choose(tmp_path, monkeypatch, measured, [{"pc": True}])
    assert settings == {"pc": True}
    assert chosen.quantization["fallback"]["chosen"] == "pc=True"
    assert "not_kept" not in chosen.quantization["fallback"]["attempts"][1]


def test_a_lower_kl_alone_does_not_keep_a_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    measured = {"default": (0.994746, 0.00200), "pc=True": (0.994746, 0.00100),
                "fh=True": (0.998249, 0.00190)}
    chosen, settings = _choose(tmp_path, monkeypatch, measured, [{"pc": True}, {"fh": True}])
    assert settings == {"fh": True}  # the second alternative, on top of the default settings
    assert [a["settings"] for a in chosen.quantization["fallback"]["attempts"]] == ["default", "pc=True", "fh=True"]
