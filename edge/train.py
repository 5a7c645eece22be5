"""``edgebrain train``: the library API behind the command."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import data as D
from .errors import DataError
from .io import atomic_dir, atomic_write_json, environment_facts
from .metrics import classification_metrics
from .modelcard import ModelCard
from .preprocess import PreprocessSpec, default_for_variant

MODEL_FILE = "model.keras"


@dataclass
class TrainConfig:
    variant: str
    data_dir: str
    out: str
    input_size: int | None = None
    width: float = 1.0
    weights: str = "none"
    preprocess: str | None = None  # default: per variant (seed: rescale)
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # cosine | plateau | constant
    patience: int = 8
    class_weights: bool = False
    seed: int = 42
    val_fraction: float = 0.10
    calib_fraction: float = 0.05
    per_class: int | None = None  # train on a stratified subset (tests, quick runs)
    eval_per_class: int | None = None  # evaluate on a stratified subset of Testing
    brightness: tuple[float, float] = (0.8, 1.2)
    flip: bool = False
    rotate: float = 0.0  # fraction of a full turn, e.g. 0.05
    shift: float = 0.0
    zoom: float = 0.0
    dropout: float = 0.5
    overwrite: bool = False
    # preprocessing recorded in the spec (edgebrain.preprocess / edgebrain.normalize)
    resize: str = "bilinear"  # nearest | bilinear | bicubic | area
    normalize: str = "none"  # none | percentile[:LO,HI] | zscore[:K] | histeq | clahe[:CLIP]
    # intensity augmentation (edgebrain.perturb.Augment); each op with probability aug_prob
    aug_gamma: tuple[float, float] | None = None
    aug_contrast: tuple[float, float] | None = None
    aug_noise: float = 0.0
    aug_blur: float = 0.0
    aug_jpeg: tuple[float, float] | None = None
    aug_rescale: float = 0.0
    aug_prob: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)
    # MRI+CT fusion (edgebrain.fusion): method weighted | laplacian | wavelet, CT by name or CSV
    fuse: str | None = None
    fuse_mode: str = "rgb"  # rgb: R=MRI, G=CT, B=fused | fused: fused grey x3
    ct_dir: str | None = None
    ct_csv: str | None = None
    # sr-resnet50 (edgebrain.sr): input_size is the classifier's (HR) size, the model takes size/scale
    sr_scale: int = 2
    sr_model: str | None = None  # an SR model folder from `edgebrain train sr`; None: train one first
    sr_epochs: int = 10
    sr_width: float = 0.5
    sr_mix: str = "native+sr"  # what the classifier trains on: native+sr | sr | native
    sr_int8_check: bool = True  # measure the SR stage's int8 PSNR drop for the deployment policy


def _augmenter(cfg: TrainConfig) -> Any:
    from .tfenv import import_tf, keras

    tf = import_tf()
    L = keras().layers
    layers: list[Any] = []
    if cfg.flip:
        layers.append(L.RandomFlip("horizontal", seed=cfg.seed))
    if cfg.rotate:
        layers.append(L.RandomRotation(cfg.rotate, fill_mode="constant", seed=cfg.seed))
    if cfg.shift:
        layers.append(L.RandomTranslation(cfg.shift, cfg.shift, fill_mode="constant", seed=cfg.seed))
    if cfg.zoom:
        layers.append(L.RandomZoom(cfg.zoom, fill_mode="constant", seed=cfg.seed))
    geo = keras().Sequential(layers) if layers else None
    lo, hi = cfg.brightness
    intensity = _intensity_augment(cfg)

    def aug(x: Any) -> Any:
        x = tf.cast(x, tf.float32)
        if geo is not None:
            x = geo(x, training=True)
        if (lo, hi) != (1.0, 1.0):
            # The seed's brightness enhancement: I_b = I * alpha, alpha ~ U[0.8, 1.2]
            alpha = tf.random.uniform([tf.shape(x)[0], 1, 1, 1], lo, hi)
            x = tf.clip_by_value(x * alpha, 0.0, 255.0)
        if intensity is not None:
            x = intensity(x)
        return x

    return aug


def augment_of(cfg: TrainConfig) -> Any:
    """The intensity augmentation a config asks for (an ``edgebrain.perturb.Augment``)."""
    from .perturb import Augment

    return Augment(gamma=cfg.aug_gamma, contrast=cfg.aug_contrast, noise=cfg.aug_noise, blur=cfg.aug_blur,
                   jpeg=cfg.aug_jpeg, rescale=cfg.aug_rescale, prob=cfg.aug_prob)


def _intensity_augment(cfg: TrainConfig) -> Any:
    """gamma / contrast / noise / blur / JPEG / down-up-scaling, in NumPy (the functions the
    robustness suite measures with) inside the tf.data pipeline; None when none is asked for."""
    from .tfenv import import_tf

    tf = import_tf()
    spec = augment_of(cfg)
    if not spec.active:
        return None
    rng = np.random.default_rng(cfg.seed)

    def run(x: Any) -> Any:
        y = tf.numpy_function(lambda a: spec.batch(a, rng), [x], tf.float32)
        y.set_shape(x.shape)
        return y

    return run


def augmenter_from_card(training: dict[str, Any] | None) -> Any:
    """The training augmentation recorded in a model card (``training``), for fine-tuning the model
    the same way it was trained; None when the card records none."""
    if not training:
        return None
    keys = ("flip", "rotate", "shift", "zoom", "brightness", "seed", "aug_gamma", "aug_contrast", "aug_noise",
            "aug_blur", "aug_jpeg", "aug_rescale", "aug_prob")
    cfg = TrainConfig(variant=str(training.get("variant", "")), data_dir="", out="",
                      **{k: (tuple(training[k]) if isinstance(training[k], list) else training[k])
                         for k in keys if k in training})
    if not (cfg.flip or cfg.rotate or cfg.shift or cfg.zoom or tuple(cfg.brightness) != (1.0, 1.0)
            or augment_of(cfg).active):
        return None
    return _augmenter(cfg)


def make_dataset(x: np.ndarray, y: np.ndarray, spec: PreprocessSpec, batch: int, num_classes: int,
                 shuffle: bool, seed: int, augment: Any = None) -> Any:
    from .tfenv import import_tf

    tf = import_tf()
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch)

    def prep(xb: Any, yb: Any) -> Any:
        xb = tf.cast(xb, tf.float32)
        if augment is not None:
            xb = augment(xb)
        return spec.apply(xb), tf.one_hot(yb, num_classes)

    return ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def predict_probs(model: Any, x: np.ndarray, spec: PreprocessSpec, batch: int = 64) -> np.ndarray:
    out = []
    for i in range(0, len(x), batch):
        out.append(model(spec.apply(x[i : i + batch]), training=False).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _ct_pairing(ct: Any, data_root: Any) -> Any:
    from .fusion import CTPairing

    if ct is None or isinstance(ct, CTPairing):
        return ct
    return CTPairing(ct_dir=ct, mri_root=data_root)


def load_split(samples: Any, spec: PreprocessSpec, desc: str, ct: Any = None, data_root: Any = None) -> D.Arrays:
    """Decode samples for a model with this spec: plain MRI, or fused MRI+CT when the spec
    records a fusion (``ct``: a CT folder or an ``edgebrain.fusion.CTPairing``)."""
    from .fusion import FusionError, fusion_of, load_fused_arrays

    fs = fusion_of(spec)
    if fs is None:
        return D.load_arrays(samples, spec.size, desc=desc, resize=spec.resize)
    pairing = _ct_pairing(ct, data_root)
    if pairing is None:
        raise FusionError(f"the model expects fused MRI+CT input ({fs.method}): give the CT images (ct_dir / --ct-dir)")
    return load_fused_arrays(samples, pairing, fs, spec.size, desc=desc)


def evaluate_model(model: Any, ds: D.Dataset, spec: PreprocessSpec, eval_per_class: int | None = None,
                   seed: int = 0, ct: Any = None) -> dict[str, Any]:
    """Testing metrics on the full split and on the deduplicated list. A model whose spec
    records MRI+CT fusion needs ``ct`` (CT folder or CTPairing)."""
    test = ds.split("Testing")
    dd = {s.rel for s in D.dedup_eval(ds)}
    if eval_per_class:
        test = D.subset(test, eval_per_class, seed)
    arr = load_split(test, spec, "Testing", ct, ds.root)
    probs = predict_probs(model, arr.x, spec)
    full = classification_metrics(arr.y, probs, ds.class_names)
    mask = np.array([s.rel in dd for s in arr.samples], bool)
    dedup = classification_metrics(arr.y[mask], probs[mask], ds.class_names) if mask.any() else None
    return {
        "testing": full,
        "testing_dedup": dedup,
        "eval_subset_per_class": eval_per_class,
        "failed_files": [{"path": p, "problem": r} for p, r in arr.failed],
    }


def save_model(model: Any, path: str | Path) -> None:
    """Save a tf-keras model without its optimizer state. The native ``.keras`` format has no
    ``include_optimizer`` switch, so a compiled model is saved through an uncompiled functional
    wrapper of the same layers (same names, weights and topology)."""
    from .tfenv import keras

    p = Path(path)
    if p.suffix == ".keras":
        if getattr(model, "optimizer", None) is not None:
            model = keras().Model(model.inputs, model.outputs, name=model.name)
        model.save(p)
    else:
        model.save(p, include_optimizer=False)


def _check_options(cfg: TrainConfig) -> None:
    if cfg.fuse and cfg.variant == "sr-resnet50":
        raise DataError("--fuse and sr-resnet50 cannot be combined (the SR stage is trained on MRI only)")
    if not cfg.fuse and (cfg.ct_dir or cfg.ct_csv):
        raise DataError("--ct-dir / --ct-csv need --fuse METHOD")
    if cfg.variant == "sr-resnet50" and (cfg.preprocess or "rescale") != "rescale":
        raise DataError("sr-resnet50 needs --preprocess rescale (the SR stage works on pixels / 255)")
    if cfg.variant == "sr-resnet50" and (cfg.normalize != "none" or cfg.resize != "bilinear"):
        raise DataError("sr-resnet50 takes neither --normalize nor --resize (the SR stage works on raw pixels)")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a variant on the Training split; write model, card, history and Testing metrics.

    ``cfg.fuse``: train on fused MRI+CT inputs (recorded in ``preprocess.extra['fusion']``).
    ``sr-resnet50``: train (or load) the SR stage, train the classifier on native and
    SR-enhanced images, save the assembled LR -> SR -> classifier model plus each stage."""
    from .models.variants import VARIANTS, build_model, count_params
    from .tfenv import import_tf, keras, set_seed

    if cfg.variant not in VARIANTS:
        raise DataError(f"unknown variant {cfg.variant!r}; choose from {', '.join(VARIANTS)}")
    _check_options(cfg)
    tf = import_tf()
    K = keras()
    set_seed(cfg.seed)
    info = VARIANTS[cfg.variant]
    size = cfg.input_size or info.default_size
    pairing = None
    pre_extra: dict[str, Any] = {}
    if cfg.fuse:
        from .fusion import CTPairing, FusionSpec

        fspec = FusionSpec(method=cfg.fuse, mode=cfg.fuse_mode).validated()
        pairing = CTPairing(ct_dir=cfg.ct_dir, csv_path=cfg.ct_csv, mri_root=cfg.data_dir)
        pre_extra["fusion"] = fspec.to_dict()
    try:
        spec = PreprocessSpec.named(cfg.preprocess or default_for_variant(cfg.variant), size, extra=pre_extra,
                                    resize=cfg.resize, normalize=cfg.normalize)
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    is_sr = cfg.variant == "sr-resnet50"

    ds = D.scan(cfg.data_dir)
    splits = D.splits_for(ds, cfg.seed, {"val": cfg.val_fraction, "calib": cfg.calib_fraction})
    train_s, val_s = splits["train"], splits["val"]
    if cfg.per_class:
        train_s = D.subset(train_s, cfg.per_class, cfg.seed)
        val_s = D.subset(val_s, max(4, cfg.per_class // 4), cfg.seed)
    tr = load_split(train_s, spec, "train", pairing, ds.root)
    va = load_split(val_s, spec, "val", pairing, ds.root)
    if len(tr.x) == 0:
        raise DataError("no training images could be read")
    failed = tr.failed + va.failed
    for p, r in failed:
        print(f"warning: skipped {p}: {r}", file=sys.stderr)

    sr_stage = None
    sr_info: dict[str, Any] = {}
    x_tr, y_tr, x_va, y_va = tr.x, tr.y, va.x, va.y
    if is_sr:
        from . import sr as SR

        x_tr, y_tr, x_va, y_va, sr_stage, sr_info = SR.prepare_sr_resnet50(cfg, size, tr, va)
        model = build_model("resnet50", size, len(ds.class_names), cfg.width, cfg.weights, dropout=cfg.dropout)
    else:
        model = build_model(cfg.variant, size, len(ds.class_names), cfg.width, cfg.weights, dropout=cfg.dropout)
    steps = int(np.ceil(len(x_tr) / cfg.batch_size))
    if cfg.lr_schedule == "cosine":
        lr: Any = K.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=max(1, steps * cfg.epochs), alpha=0.01)
    else:
        lr = cfg.lr
    model.compile(optimizer=K.optimizers.Adam(lr), loss="categorical_crossentropy", metrics=["accuracy"])

    cw = None
    if cfg.class_weights:
        from sklearn.utils.class_weight import compute_class_weight

        w = compute_class_weight("balanced", classes=np.arange(len(ds.class_names)), y=y_tr)
        cw = {i: float(v) for i, v in enumerate(w)}
    callbacks: list[Any] = [
        K.callbacks.EarlyStopping(monitor="val_accuracy", patience=cfg.patience, restore_best_weights=True,
                                  mode="max"),
    ]
    if cfg.lr_schedule == "plateau":
        callbacks.append(K.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=3))
    aug = _augmenter(cfg)
    train_ds = make_dataset(x_tr, y_tr, spec, cfg.batch_size, len(ds.class_names), True, cfg.seed, aug)
    val_ds = make_dataset(x_va, y_va, spec, cfg.batch_size, len(ds.class_names), False, cfg.seed)
    t0 = time.time()
    hist = model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, class_weight=cw, callbacks=callbacks,
                     verbose=1 if sys.stdout.isatty() else 2)
    train_s_elapsed = time.time() - t0

    classifier = model
    card_spec = spec
    if is_sr:
        from . import sr as SR

        lr_size = size // cfg.sr_scale
        model = SR.assemble(sr_stage, classifier, lr_size)
        card_spec = PreprocessSpec.named("rescale", lr_size)
        metrics = evaluate_model(model, ds, card_spec, cfg.eval_per_class, cfg.seed)
        metrics["sr_pipeline"] = SR.evaluate_sr_resnet50(sr_stage, classifier, ds, spec, cfg, splits["calib"],
                                                         sr_info)
    else:
        metrics = evaluate_model(model, ds, spec, cfg.eval_per_class, cfg.seed, ct=pairing)
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    extra: dict[str, Any] = {"command": " ".join(sys.argv)}
    if pairing is not None:
        extra["fusion"] = {**pre_extra["fusion"], **pairing.describe(),
                           "honoured_by": ["edgebrain train (evaluate_model)", "edgebrain.train.load_split",
                                           "edgebrain.fusion.load_fused (Predictor inputs)",
                                           "edgebrain predict / bench (--ct-dir / --ct-csv)",
                                           "edgebrain convert (calibration, verification, pruning)"]}
    if is_sr:
        extra["sr"] = sr_info
        extra["pipeline"] = metrics["sr_pipeline"].pop("pipeline")
    card = ModelCard(
        variant=cfg.variant,
        class_names=ds.class_names,
        preprocess=card_spec,
        input_shape=[int(d) for d in model.input_shape[1:]],
        data={
            "root": str(Path(cfg.data_dir).resolve()),
            "manifest_hash": ds.manifest_hash,
            "split_seed": cfg.seed,
            "fractions": {"val": cfg.val_fraction, "calib": cfg.calib_fraction},
            "counts": {k: D.class_counts(v, ds.class_names) for k, v in
                       {"train": train_s, "val": val_s, "calib": splits["calib"], "test": splits["test"]}.items()},
            "per_class_subset": cfg.per_class,
            "skipped_files": [{"path": p, "problem": r} for p, r in failed],
        },
        training={**{k: v for k, v in asdict(cfg).items() if k not in ("out", "data_dir")},
                  "epochs_run": len(history.get("loss", [])), "seconds": round(train_s_elapsed, 1),
                  "params": count_params(model), "tf_version": tf.__version__},
        metrics={
            "testing_accuracy": metrics["testing"]["accuracy"],
            "testing_macro_f1": metrics["testing"]["macro_f1"],
            "testing_dedup_accuracy": (metrics["testing_dedup"] or {}).get("accuracy"),
            "testing_dedup_n": (metrics["testing_dedup"] or {}).get("n"),
            "val_accuracy_best": max(history.get("val_accuracy", [float("nan")])),
            **({"sr_pipeline_accuracy": metrics["sr_pipeline"]["summary"]} if is_sr else {}),
        },
        versions=environment_facts(),
        extra=extra,
    )
    with atomic_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
        save_model(model, tmp / MODEL_FILE)
        if is_sr:
            from . import sr as SR

            SR.save_stages(tmp, model)
        card.save(tmp)
        atomic_write_json(tmp / "history.json", history)
        atomic_write_json(tmp / "metrics.json", metrics)
    return {"out": cfg.out, "card": card.to_dict(), "metrics": metrics}
