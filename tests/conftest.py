"""Shared fixtures, lanes and the trained-model cache.

The real dataset is required: tests fail (not skip) when it is missing.

Lanes (Makefile): ``make test-fast`` runs ``-m "not train and not slow and not long and not zoo"`` (no
training at all: a test that trains without being marked fails there, see
``_no_training_in_the_fast_lane``); ``make test`` (CI) runs everything but ``long`` and ``zoo``;
``make test-all`` runs everything.
A test is marked ``train`` automatically when it uses a fixture listed in ``TRAINING_FIXTURES``.

Trained fixtures are built once and reused across runs and xdist workers: ``cached_build`` keys a
folder under the pytest cache by the recipe, the code that trains and the data's manifest, and a file
lock makes one worker build while the others wait.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("EDGEBRAIN_QUIET", "1")

ROOT = Path(__file__).resolve().parents[1]

# Fixtures that train (or fine-tune) a model: every test that uses one, directly or through another
# fixture, is marked ``train``. Tests that train in their own body carry @pytest.mark.train.
TRAINING_FIXTURES = {
    "trained_small", "plain_cnn", "fused_model", "fused", "sr_x2", "sr_resnet50", "srr", "trained_resnet50",
}
# What a trained fixture depends on: a change to any of these retrains it.
TRAINING_CODE = ["edge/train.py", "edge/models", "edge/preprocess.py", "edge/data.py", "edge/imageio.py",
                 "edge/tfenv.py", "edge/modelcard.py", "edge/sr.py", "edge/fusion.py", "edge/io.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.train)


@pytest.fixture(scope="session", autouse=True)
def _no_training_in_the_fast_lane() -> Any:
    """In the fast lane (EDGEBRAIN_LANE=fast) any model.fit fails the test: it trains but is not
    marked ``train`` (nor uses a fixture in TRAINING_FIXTURES)."""
    if os.environ.get("EDGEBRAIN_LANE") != "fast":
        yield
        return
    mp = pytest.MonkeyPatch()

    def refuse(*a: Any, **k: Any) -> None:
        raise AssertionError("this test trains a model but is not marked 'train' (tests/conftest.py)")

    try:
        import tf_keras

        mp.setattr(tf_keras.Model, "fit", refuse)
    except ImportError:  # the TensorFlow-free install
        pass
    yield
    mp.undo()


def _tree_hash(paths: list[str]) -> str:
    h = hashlib.sha256()
    for rel in paths:
        p = ROOT / rel
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _data_hash(d: Path) -> str:
    m = d / "MANIFEST.sha256"
    src = m.read_bytes() if m.is_file() else "\n".join(sorted(str(p.relative_to(d)) for p in d.rglob("*"))).encode()
    return hashlib.sha256(src).hexdigest()


def cached_build(config: pytest.Config, name: str, recipe: dict[str, Any], build: Callable[[Path], None],
                 data: Path | None = None) -> Path:
    """The folder ``build(folder)`` fills, built once per (recipe, training code, data) and kept in
    the pytest cache (``pytest --cache-clear`` or ``make clean`` drops it)."""
    from filelock import FileLock

    key = hashlib.sha256(json.dumps({"recipe": recipe, "code": _tree_hash(TRAINING_CODE),
                                     "data": _data_hash(data) if data else None}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    root = Path(config.cache.mkdir("edgebrain-trained")) / f"{name}-{key}"
    with FileLock(str(root) + ".lock"):
        if (root / ".complete").is_file():
            return root
        tmp = root.with_name(root.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        (tmp / ".complete").write_text(json.dumps(recipe, default=str))
        os.replace(tmp, root)
    return root


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
def cache_env(pytestconfig: pytest.Config) -> Path:
    """The decode cache, shared by xdist workers and kept across runs (keyed by the decoding code)."""
    d = Path(os.environ.get("EDGEBRAIN_TEST_CACHE") or pytestconfig.cache.mkdir(
        "edgebrain-decoded-" + _tree_hash(["edge/imageio.py", "edge/data.py", "edge/preprocess.py"])[:12]))
    os.environ["EDGEBRAIN_CACHE"] = str(d)
    return d


@pytest.fixture(scope="session")
def trained_small(data_dir: Path, cache_env: Path, pytestconfig: pytest.Config) -> Path:
    """A really trained small model on real data (resnet50-lite, width 0.5, 64 px, a stratified
    subset). Returns the folder with model.keras + model_card.json. ~1-2 min on 2 cores, once."""
    from edgebrain.train import TrainConfig, train

    recipe = dict(variant="resnet50-lite", input_size=64, width=0.5, epochs=12, batch_size=32, lr=2e-3,
                  per_class=150, eval_per_class=50, seed=7, patience=12)

    def build(out: Path) -> None:
        train(TrainConfig(data_dir=str(data_dir), out=str(out / "lite64"), overwrite=True, **recipe))

    return cached_build(pytestconfig, "lite64", recipe, build, data_dir) / "lite64"


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
