"""Magnitude pruning with tensorflow-model-optimization (tfmot).

``prune_low_magnitude`` wraps each prunable layer that has at least ``min_params`` prunable
weights (tfmot's registry decides which weights: Conv/Dense kernels, SeparableConv pointwise
kernels; depthwise kernels are not pruned), the sparsity follows a polynomial schedule
(power 3) from 0 to the target over the first ``ramp`` fraction of the fine-tuning steps,
the model is fine-tuned on the train split with ``UpdatePruningStep``, and
``strip_pruning`` removes the wrappers. Nested models (a Keras application inside a
Functional model) are handled by cloning them recursively. Optional 2:4 structured
sparsity uses tfmot's ``sparsity_m_by_n``.

Optional sparsity-preserving weight clustering (tfmot's collaborative optimisation:
``cluster_weights(..., preserve_sparsity=True)`` on the pruned layers, k-means++ centroids,
fine-tuning, ``strip_clustering``) leaves each pruned layer with at most ``clusters`` distinct
weight values, zeros kept: int8 files then compress much further with gzip.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgebrain.errors import ModelError
from edgebrain.preprocess import PreprocessSpec

from .base import gzip_size


@dataclass
class PruneConfig:
    sparsity: float
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-4
    structured: bool = False  # 2:4 (two zeros in every four consecutive weights)
    min_params: int = 1024
    ramp: float = 0.7  # fraction of the steps over which sparsity rises to the target
    seed: int = 0
    clusters: int | None = None  # sparsity-preserving weight clustering after pruning
    cluster_epochs: int = 1


def _prunable_weights(layer: Any) -> list[Any]:
    from tensorflow_model_optimization.python.core.sparsity.keras.prune_registry import PruneRegistry

    try:
        if not PruneRegistry.supports(layer):
            return []
        names = PruneRegistry._weight_names(layer)
    except (KeyError, ValueError):
        return []
    return [getattr(layer, n) for n in names if getattr(layer, n, None) is not None]


def _walk(model: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(path, layer) for every layer, descending into nested models."""
    from edgebrain.tfenv import keras

    K = keras()
    out: list[tuple[str, Any]] = []
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if isinstance(layer, K.Model):
            out.extend(_walk(layer, path + "/"))
        else:
            out.append((path, layer))
    return out


def _m_by_n_ok(layer: Any, cfg: PruneConfig) -> bool:
    """2:4 applies to Conv2D/Dense kernels whose input-channel count is a multiple of 4."""
    from edgebrain.tfenv import keras

    L = keras().layers
    if type(layer) not in (L.Conv2D, L.Dense):
        return False
    k = layer.kernel
    return int(k.shape[-2]) % 4 == 0


def plan(model: Any, cfg: PruneConfig) -> dict[str, str]:
    """layer path -> 'prune' or the reason it is left dense."""
    out: dict[str, str] = {}
    for path, layer in _walk(model):
        ws = _prunable_weights(layer)
        n = int(sum(np.prod(w.shape) for w in ws))
        if not ws:
            continue
        if n < cfg.min_params:
            out[path] = f"dense: {n} prunable weights < {cfg.min_params}"
        elif cfg.structured and not _m_by_n_ok(layer, cfg):
            out[path] = "dense: 2:4 applies to Conv2D/Dense with input channels divisible by 4"
        else:
            out[path] = "prune"
    return out


def _clone(model: Any) -> Any:
    """An independent copy (nested models included) with the same weights."""
    from edgebrain.tfenv import keras

    K = keras()
    c = K.models.clone_model(model)
    c.set_weights(model.get_weights())
    return c


def wrap_for_pruning(model: Any, cfg: PruneConfig, schedule: Any) -> Any:
    import tensorflow_model_optimization as tfmot

    from edgebrain.tfenv import keras

    K = keras()
    decisions = plan(model, cfg)
    ids = {id(layer) for path, layer in _walk(model) if decisions.get(path) == "prune"}
    if not ids:
        raise ModelError("no layer is large enough to prune (see --prune-min-params)")
    kw: dict[str, Any] = {"pruning_schedule": schedule}
    if cfg.structured:
        # m_by_n decides which weights (2 of every 4 along the input channels); the schedule only sets
        # when the masks are updated.
        kw = {"sparsity_m_by_n": (2, 4), "pruning_schedule": tfmot.sparsity.keras.ConstantSparsity(
            0.5, begin_step=0, end_step=schedule.end_step, frequency=schedule.frequency)}

    def clone_fn(layer: Any) -> Any:
        if isinstance(layer, K.Model):
            if not getattr(layer, "_is_graph_network", False) and not isinstance(layer, K.Sequential):
                raise ModelError(f"nested subclassed model {layer.name!r} cannot be pruned (tfmot supports "
                                 "Sequential and Functional models only)")
            return K.models.clone_model(layer, clone_function=clone_fn)
        if id(layer) in ids:
            return tfmot.sparsity.keras.prune_low_magnitude(layer, **kw)
        return layer

    return K.models.clone_model(model, clone_function=clone_fn)


def sparsity_report(model: Any, decisions: dict[str, str]) -> dict[str, Any]:
    per_layer: dict[str, Any] = {}
    zeros = total = 0
    for path, layer in _walk(model):
        if path not in decisions:
            continue
        ws = _prunable_weights(layer)
        z = int(sum(int(np.sum(np.asarray(w) == 0)) for w in ws))
        n = int(sum(int(np.prod(w.shape)) for w in ws))
        per_layer[path] = {"params": n, "sparsity": round(z / n, 4) if n else 0.0,
                           "pruned": decisions[path] == "prune"}
        if decisions[path] == "prune":
            zeros += z
            total += n
    all_w = [np.asarray(w) for w in model.weights]
    all_n = int(sum(w.size for w in all_w))
    all_z = int(sum(int(np.sum(w == 0)) for w in all_w))
    return {
        "achieved_overall": round(zeros / total, 4) if total else 0.0,
        "pruned_params": total,
        "all_weights_sparsity": round(all_z / all_n, 4) if all_n else 0.0,
        "all_params": all_n,
        "per_layer": per_layer,
    }


def cluster_model(model: Any, cfg: PruneConfig, decisions: dict[str, str], ds: Any, val_ds: Any
                  ) -> tuple[Any, dict[str, Any]]:
    """Sparsity-preserving clustering of the pruned layers (tfmot), fine-tuned, stripped."""
    import tensorflow_model_optimization as tfmot

    from edgebrain.progress import enabled
    from edgebrain.tfenv import keras

    K = keras()
    n = int(cfg.clusters or 0)
    if not 2 <= n <= 256:
        raise ModelError(f"--prune-cluster must be between 2 and 256 clusters, got {n}")
    if cfg.cluster_epochs < 1:
        raise ModelError("--cluster-epochs must be >= 1 (clustering needs fine-tuning steps)")
    CI = tfmot.clustering.keras.CentroidInitialization
    ids = {id(layer) for path, layer in _walk(model) if decisions.get(path) == "prune"}

    def clone_fn(layer: Any) -> Any:
        if isinstance(layer, K.Model):
            return K.models.clone_model(layer, clone_function=clone_fn)
        if id(layer) in ids:
            return tfmot.clustering.keras.cluster_weights(
                layer, number_of_clusters=n, cluster_centroids_init=CI.KMEANS_PLUS_PLUS, preserve_sparsity=True)
        return layer

    wrapped = K.models.clone_model(model, clone_function=clone_fn)
    wrapped.compile(optimizer=K.optimizers.Adam(cfg.lr), loss="categorical_crossentropy", metrics=["accuracy"])
    hist = wrapped.fit(ds, epochs=cfg.cluster_epochs, validation_data=val_ds,
                       verbose=(1 if sys.stderr.isatty() else 2) if enabled() else 0)
    stripped = tfmot.clustering.keras.strip_clustering(wrapped)
    distinct = {}
    for path, layer in _walk(stripped):
        if decisions.get(path) == "prune":
            distinct[path] = int(max(len(np.unique(np.asarray(w))) for w in _prunable_weights(layer)))
    return stripped, {"clusters": n, "centroid_init": "kmeans++", "preserve_sparsity": True,
                      "epochs": cfg.cluster_epochs, "max_distinct_values_per_layer": max(distinct.values(), default=0),
                      "distinct_values": distinct,
                      "history": {k: [round(float(v), 5) for v in vs] for k, vs in hist.history.items()}}


def _weights_gzip(model: Any) -> tuple[int, int]:
    """(size, gzip size) of the model's weights saved as HDF5."""
    fd, tmp = tempfile.mkstemp(suffix=".weights.h5")
    os.close(fd)
    try:
        model.save_weights(tmp)
        return os.path.getsize(tmp), gzip_size(Path(tmp))
    finally:
        os.unlink(tmp)


def _accuracy(model: Any, x: np.ndarray, y: np.ndarray, spec: PreprocessSpec) -> float | None:
    if not len(x):
        return None
    from edgebrain.train import predict_probs

    p = predict_probs(model, x, spec)
    return float(np.mean(p.argmax(1) == y))


def prune_model(model: Any, cfg: PruneConfig, spec: PreprocessSpec, num_classes: int,
                train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray]) -> tuple[Any, dict[str, Any]]:
    """Prune a tf-keras model to ``cfg.sparsity`` with fine-tuning -> (stripped model, report).

    ``train`` and ``val`` are uint8 images at the model's input size and integer labels; the
    model's own preprocessing spec is applied. The input model is not modified."""
    import tensorflow_model_optimization as tfmot

    from edgebrain.progress import enabled
    from edgebrain.tfenv import import_tf, keras, set_seed
    from edgebrain.train import make_dataset

    if not 0.0 < cfg.sparsity < 1.0:
        raise ModelError(f"--prune must be a sparsity in (0, 1), e.g. 0.5; got {cfg.sparsity}")
    if cfg.epochs < 1:
        raise ModelError("--prune-epochs must be >= 1 (pruning needs fine-tuning steps)")
    xt, yt = train
    if len(xt) == 0:
        raise ModelError("pruning needs training images (the model card's train split or --data)")
    tf = import_tf()
    K = keras()
    set_seed(cfg.seed)
    dense = _clone(model)
    decisions = plan(dense, cfg)
    steps = int(math.ceil(len(xt) / cfg.batch_size))
    total = steps * cfg.epochs
    freq = max(1, min(100, int(total * cfg.ramp) // 10))
    end_step = max(freq, (int(total * cfg.ramp) // freq) * freq)
    schedule = tfmot.sparsity.keras.PolynomialDecay(initial_sparsity=0.0, final_sparsity=float(cfg.sparsity),
                                                    begin_step=0, end_step=end_step, power=3, frequency=freq)
    wrapped = wrap_for_pruning(dense, cfg, schedule)
    wrapped.compile(optimizer=K.optimizers.Adam(cfg.lr), loss="categorical_crossentropy", metrics=["accuracy"])
    ds = make_dataset(xt, yt, spec, cfg.batch_size, num_classes, shuffle=True, seed=cfg.seed)
    xv, yv = val
    val_ds = make_dataset(xv, yv, spec, cfg.batch_size, num_classes, False, cfg.seed) if len(xv) else None
    hist = wrapped.fit(ds, epochs=cfg.epochs, validation_data=val_ds,
                       callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
                       verbose=(1 if sys.stderr.isatty() else 2) if enabled() else 0)
    stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
    clustering = None
    if cfg.clusters:
        stripped, clustering = cluster_model(stripped, cfg, decisions, ds, val_ds)
    rep = sparsity_report(stripped, decisions)
    if clustering is not None:
        rep["clustering"] = clustering
    if cfg.structured:
        from tensorflow_model_optimization.python.core.sparsity.keras.pruning_utils import is_pruned_m_by_n

        ok = {}
        for path, layer in _walk(stripped):
            if decisions.get(path) == "prune":
                ok[path] = bool(is_pruned_m_by_n(tf.constant(np.asarray(layer.kernel)), (2, 4), "C_OUT"))
        rep["m_by_n_2_4"] = {"all_layers_ok": all(ok.values()), "per_layer": ok}
    size_d, gz_d = _weights_gzip(model)
    size_p, gz_p = _weights_gzip(stripped)
    rep.update({
        "target_sparsity": float(cfg.sparsity),
        "structured": "2:4" if cfg.structured else None,
        "schedule": {"type": "PolynomialDecay", "initial_sparsity": 0.0, "final_sparsity": float(cfg.sparsity),
                     "begin_step": 0, "end_step": end_step, "power": 3, "frequency": freq} if not cfg.structured
        else {"type": "m_by_n", "m": 2, "n": 4},
        "fine_tuning": {**asdict(cfg), "steps": total, "train_n": int(len(xt)), "val_n": int(len(xv)),
                        "history": {k: [round(float(v), 5) for v in vs] for k, vs in hist.history.items()}},
        "weights_bytes": size_p,
        "gzip_bytes": gz_p,
        "dense_weights_bytes": size_d,
        "dense_gzip_bytes": gz_d,
        "dense_val_accuracy": _accuracy(model, xv, yv, spec),
        "pruned_val_accuracy": _accuracy(stripped, xv, yv, spec),
        "dense_layers": {k: v for k, v in decisions.items() if v != "prune"},
    })
    return stripped, rep
