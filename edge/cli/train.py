"""``edgebrain train VARIANT --data DIR --out DIR`` (and ``edgebrain train sr --scale 2 ...``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..errors import EdgebrainError


@click.command(name="train")
@click.argument("variant")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True,
              help="Dataset folder (Training/ and Testing/ with one folder per class).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder for the model.")
@click.option("--size", "input_size", type=int, default=None, help="Input size in pixels (default: the variant's).")
@click.option("--width", type=float, default=1.0, show_default=True, help="Channel width multiplier.")
@click.option("--weights", default="none", show_default=True, help="imagenet | none | PATH to weights.")
@click.option("--preprocess", default=None,
              help="rescale | xception | caffe | imagenet | meanstd:M,M,M/S,S,S (default: per variant).")
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["cosine", "plateau", "constant"]), default="cosine",
              show_default=True)
@click.option("--patience", type=int, default=8, show_default=True, help="Early-stopping patience (epochs).")
@click.option("--class-weights", is_flag=True, help="Balanced class weights.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--per-class", type=int, default=None, help="Train on a stratified subset (N per class).")
@click.option("--eval-per-class", type=int, default=None, help="Evaluate on a stratified Testing subset.")
@click.option("--flip", is_flag=True, help="Random horizontal flips.")
@click.option("--rotate", type=float, default=0.0, help="Random rotation, fraction of a turn (e.g. 0.05).")
@click.option("--shift", type=float, default=0.0, help="Random shift, fraction of the size.")
@click.option("--zoom", type=float, default=0.0, help="Random zoom, fraction.")
@click.option("--no-brightness", is_flag=True, help="Disable the seed's brightness x[0.8, 1.2] augmentation.")
@click.option("--resize", type=click.Choice(["nearest", "bilinear", "bicubic", "area"]), default="bilinear",
              show_default=True, help="How images are resampled to the input size (recorded; used by every stage).")
@click.option("--normalize", default="none", show_default=True,
              help="Per-image intensity normalisation: none | percentile[:LO,HI] | zscore[:K] | histeq | "
                   "clahe[:CLIP] (recorded; used by every stage).")
@click.option("--aug-gamma", default=None, help="Random gamma LOW,HIGH (e.g. 0.7,1.5).")
@click.option("--aug-contrast", default=None, help="Random contrast factor LOW,HIGH (e.g. 0.7,1.3).")
@click.option("--aug-noise", type=float, default=0.0, help="Gaussian noise, max sigma in pixels (e.g. 8).")
@click.option("--aug-blur", type=float, default=0.0, help="Gaussian blur, max sigma in pixels (e.g. 1).")
@click.option("--aug-jpeg", default=None, help="JPEG re-encoding, quality LOW,HIGH (e.g. 30,95).")
@click.option("--aug-rescale", type=float, default=0.0, help="Down-scale to a factor in [F, 1] and back (e.g. 0.5).")
@click.option("--aug-prob", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="Probability of each --aug-* option per image.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--fuse", type=click.Choice(["weighted", "laplacian", "wavelet"]), default=None,
              help="Train on fused MRI+CT inputs (needs --ct-dir or --ct-csv).")
@click.option("--fuse-mode", type=click.Choice(["rgb", "fused"]), default="rgb", show_default=True,
              help="rgb: R=MRI, G=CT, B=fused; fused: the fused grey image in all channels.")
@click.option("--ct-dir", type=click.Path(path_type=Path), default=None,
              help="CT images mirroring the MRI layout (paired by relative path / file stem).")
@click.option("--ct-csv", type=click.Path(path_type=Path), default=None,
              help="CSV with 'mri' and 'ct' columns pairing the files explicitly.")
@click.option("--scale", "sr_scale", type=click.IntRange(2, 4), default=2, show_default=True,
              help="SR upscaling factor (train sr, sr-resnet50).")
@click.option("--sr-model", type=click.Path(path_type=Path), default=None,
              help="sr-resnet50: a trained SR folder (from 'edgebrain train sr'); default: train one first.")
@click.option("--sr-epochs", type=int, default=10, show_default=True, help="Epochs for the SR net.")
@click.option("--sr-width", type=float, default=0.5, show_default=True, help="SR net width (1.0 = 64/32 channels).")
@click.option("--sr-mix", type=click.Choice(["native+sr", "sr", "native"]), default="native+sr",
              show_default=True, help="sr-resnet50: images the classifier trains on.")
def command(variant: str, data_dir: Path, out: Path, no_brightness: bool, **kw: object) -> None:
    """Train VARIANT (resnet50, resnet50-lite, resnet50-ft, xception, xception-lite, xception-ft,
    sr-resnet50) with Adam and categorical cross-entropy, early stopping and an LR schedule.

    Writes model.keras (tf-keras), model_card.json, history.json and metrics.json (Testing and
    deduplicated Testing: accuracy, per-class precision/recall/F1, macro-F1, confusion matrix).

    \b
    VARIANT "sr" trains only the super-resolution net (self-supervised, train split):
      edgebrain train sr --scale 2 --size 96 --epochs 10 --data DATA --out runs/sr-x2
    --size is the high-resolution size; PSNR/SSIM vs bicubic on Testing go to metrics.json.

    \b
    MRI+CT fusion (recorded in the model card; see docs/sr-fusion.md):
      edgebrain train resnet50-lite --fuse wavelet --ct-dir CT --data DATA --out runs/fused
    """
    try:
        if variant == "sr":
            from ..sr import train_sr

            o: dict[str, Any] = dict(kw)
            res = train_sr(data_dir, out, scale=o["sr_scale"], hr_size=o["input_size"] or 96, epochs=o["epochs"],
                           seed=o["seed"], width=o["sr_width"], batch_size=o["batch_size"], lr=o["lr"],
                           per_class=o["per_class"], eval_per_class=o["eval_per_class"], overwrite=o["overwrite"])
            click.echo(json.dumps({"out": str(out), **res["card"]["metrics"]}, indent=2))
            return
        from ..train import TrainConfig, train

        for k in ("ct_dir", "ct_csv", "sr_model"):
            if kw.get(k) is not None:
                kw[k] = str(kw[k])
        _parse_aug_ranges(kw)
        cfg = TrainConfig(variant=variant, data_dir=str(data_dir), out=str(out),
                          brightness=(1.0, 1.0) if no_brightness else (0.8, 1.2), **kw)  # type: ignore[arg-type]
        res = train(cfg)
    except EdgebrainError as exc:
        raise click.ClickException(str(exc)) from exc
    m = res["card"]["metrics"]
    click.echo(json.dumps({"out": str(out), **m}, indent=2))


def _parse_aug_ranges(kw: dict[str, Any]) -> None:
    from ..perturb import parse_range

    for k in ("aug_gamma", "aug_contrast", "aug_jpeg"):
        try:
            kw[k] = parse_range(kw.get(k), "--" + k.replace("_", "-"))
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc
