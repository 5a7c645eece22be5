"""Shared fixtures. The real dataset is required: tests fail (not skip) when it is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("EDGEBRAIN_QUIET", "1")

ROOT = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("EDGEBRAIN_DATA")
    return Path(env) if env else (ROOT.parent / "shared" / "data" / "brain-tumor-mri-224")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = _data_dir()
    if not (d / "Training").is_dir() or not (d / "Testing").is_dir():
        pytest.fail(
            f"real dataset not found at {d}: the tests need ../shared/data/brain-tumor-mri-224 beside the "
            "checkout (or EDGEBRAIN_DATA=/path). It is never copied into the repository.",
            pytrace=False,
        )
    return d


@pytest.fixture(scope="session")
def dataset(data_dir: Path):  # type: ignore[no-untyped-def]
    from edgebrain import data as D

    return D.scan(data_dir)


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per-session decode cache (keeps ~/.cache clean, still shared across tests)."""
    d = Path(os.environ.get("EDGEBRAIN_TEST_CACHE", tmp_path_factory.mktemp("cache")))
    os.environ["EDGEBRAIN_CACHE"] = str(d)
    return d


@pytest.fixture(scope="session")
def trained_small(data_dir: Path, cache_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A really trained small model on real data (resnet50-lite, width 0.5, 64 px, a stratified
    subset). Returns the folder with model.keras + model_card.json. ~1-2 min on 2 cores."""
    from edgebrain.train import TrainConfig, train

    out = tmp_path_factory.mktemp("trained") / "lite64"
    cfg = TrainConfig(
        variant="resnet50-lite", data_dir=str(data_dir), out=str(out), input_size=64, width=0.5,
        epochs=12, batch_size=32, lr=2e-3, per_class=150, eval_per_class=50, seed=7, patience=12,
    )
    train(cfg)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random (untrained) model with a card: plumbing only."""
    from edgebrain.modelcard import ModelCard
    from edgebrain.models import build_model
    from edgebrain.preprocess import PreprocessSpec

    out = tmp_path_factory.mktemp("tiny")
    m = build_model("resnet50-lite", 32, width=0.25)
    m.save(out / "model.keras")
    ModelCard("resnet50-lite", ["glioma", "meningioma", "notumor", "pituitary"],
              PreprocessSpec.named("rescale", 32), [32, 32, 3]).save(out)
    return out / "model.keras"
