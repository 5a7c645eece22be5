"""Artifact integrity: the manifest's own digest, paths confined to the artifact folder, Ed25519
signatures (convert --sign, predict/bench --verify-with), the convert output lock, stale work
folders and --resume.

The tamper tests use an artifact written by the real ``write_manifest`` around placeholder model
bytes (no runtime is loaded: plumbing); the Predictor, CLI and convert tests use a tiny random
model really converted to TFLite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgebrain.artifact import INTEGRITY, MANIFEST, load_manifest, seal, write_manifest
from edgebrain.errors import IntegrityError
from edgebrain.preprocess import PreprocessSpec
from edgebrain.signing import SigningError, generate_keypair, load_private_key

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def make_artifact(folder: Path, signing_key: Any = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.tflite").write_bytes(b"TFL3 placeholder model bytes " * 20)
    write_manifest(folder, {
        "name": folder.name, "target": "tflite", "precision": "int8", "model_file": "model.tflite",
        "preprocess": PreprocessSpec.named("rescale", 32).to_dict(), "class_names": CLASSES,
        "input_shape": [32, 32, 3], "source": {"path": "model.keras", "sha256": "a" * 64, "format": "tf-keras"},
        "verification": {"passed": True},
    }, signing_key)
    return folder


def read(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


def write_raw(folder: Path, m: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps(m, indent=2))


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Path]:
    a, a_pub = generate_keypair(tmp_path / "keys" / "a")
    b, b_pub = generate_keypair(tmp_path / "keys" / "b")
    return {"a": a, "a.pub": a_pub, "b": b, "b.pub": b_pub}


def test_a_fresh_artifact_carries_and_passes_its_digest(tmp_path: Path) -> None:
    art = load_manifest(make_artifact(tmp_path / "a"))
    block = art.manifest[INTEGRITY]
    assert block["scheme"] == "sha256-canonical-json-v1" and len(block["manifest_sha256"]) == 64
    assert "signature" not in block
    # key order and indentation are not content: a re-serialised manifest still verifies
    m = read(art.path)
    (art.path / MANIFEST).write_text(json.dumps(dict(reversed(list(m.items())))))
    load_manifest(art.path)


TAMPERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "class_names swapped": lambda m: m.update(class_names=[CLASSES[1], CLASSES[0], *CLASSES[2:]]),
    "preprocess.mode": lambda m: m["preprocess"].update(mode="caffe"),
    "preprocess.std": lambda m: m["preprocess"].update(std=[1.0, 1.0, 1.0]),
    "input_shape": lambda m: m.update(input_shape=[64, 64, 3]),
    "precision": lambda m: m.update(precision="fp32"),
    "target": lambda m: m.update(target="onnx"),
    "verification": lambda m: m.update(verification={"passed": True, "top1_agreement": 1.0}),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_every_edited_manifest_field_is_refused(tmp_path: Path, tamper: str) -> None:
    folder = make_artifact(tmp_path / "a")
    m = read(folder)
    TAMPERS[tamper](m)
    write_raw(folder, m)
    with pytest.raises(IntegrityError, match="does not match its own digest"):
        load_manifest(folder)
    with pytest.raises(IntegrityError, match="does not match its own digest"):
        load_manifest(folder, verify=False)  # the digest is checked even without re-hashing the files


def test_a_flipped_model_byte_with_its_hash_recomputed_is_refused(tmp_path: Path) -> None:
    import hashlib

    folder = make_artifact(tmp_path / "a")
    data = bytearray((folder / "model.tflite").read_bytes())
    data[40] ^= 0xFF
    (folder / "model.tflite").write_bytes(bytes(data))
    m = read(folder)
    m["files"]["model.tflite"] = m["artifact_sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    write_raw(folder, m)
    with pytest.raises(IntegrityError, match="does not match its own digest"):
        load_manifest(folder)
    # ... and added or removed file entries are edits of the manifest too
    m = read(make_artifact(tmp_path / "b"))
    m["files"]["extra.bin"] = "0" * 64
    write_raw(tmp_path / "b", m)
    with pytest.raises(IntegrityError, match="does not match its own digest"):
        load_manifest(tmp_path / "b")


def _resealed(folder: Path, m: dict[str, Any]) -> None:
    """What someone who knows the format does: edit, then recompute the digest."""
    m[INTEGRITY] = seal(m)
    write_raw(folder, m)


@pytest.mark.parametrize("bad", ["../outside.tflite", "/etc/hostname", "sub/../../outside.tflite", "C:/x.tflite"])
def test_paths_outside_the_artifact_folder_are_refused_even_with_a_valid_digest(tmp_path: Path, bad: str) -> None:
    folder = make_artifact(tmp_path / "art")
    (tmp_path / "outside.tflite").write_bytes(b"a model from elsewhere")
    m = read(folder)
    m["model_file"] = bad
    m["files"][bad] = m["artifact_sha256"]
    _resealed(folder, m)
    with pytest.raises(IntegrityError, match="outside the artifact folder"):
        load_manifest(folder)


def test_a_link_to_a_file_outside_the_folder_is_refused(tmp_path: Path) -> None:
    folder = make_artifact(tmp_path / "art")
    outside = tmp_path / "outside.tflite"
    shutil.copy(folder / "model.tflite", outside)
    (folder / "model.tflite").unlink()
    os.symlink(outside, folder / "model.tflite")  # same bytes, same hash, but read from elsewhere
    with pytest.raises(IntegrityError, match="link to a file outside the artifact folder"):
        load_manifest(folder)


def test_a_manifest_from_before_digests_is_refused_clearly(tmp_path: Path) -> None:
    folder = make_artifact(tmp_path / "old")
    m = read(folder)
    del m[INTEGRITY]
    m["manifest_version"] = 1
    write_raw(folder, m)
    with pytest.raises(IntegrityError, match="no integrity digest .*convert the model again"):
        load_manifest(folder)


def test_a_missing_path_is_named_as_missing(tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match="no such file or folder") as exc:
        load_manifest(tmp_path / "missing" / "file")
    assert "no manifest.json" not in str(exc.value)


@pytest.mark.parametrize("content", [b"", b"\xff\xfe", b"[1, 2]", b'{"kind": "edgebrain-artifact"}', b"[" * 100000])
def test_malformed_manifests_are_clear_errors(tmp_path: Path, content: bytes) -> None:
    folder = make_artifact(tmp_path / "a")
    (folder / MANIFEST).write_bytes(content)
    with pytest.raises(IntegrityError, match=str(folder)):
        load_manifest(folder)


# ----------------------------------------------------------------------------- signatures


def test_signed_artifacts_verify_and_everything_else_is_refused(tmp_path: Path, keys: dict[str, Path]) -> None:
    signed = make_artifact(tmp_path / "signed", load_private_key(keys["a"]))
    sig = read(signed)[INTEGRITY]["signature"]
    assert sig["algorithm"] == "ed25519" and sig["key_id"]
    load_manifest(signed, public_key=keys["a.pub"])
    load_manifest(signed)  # a signature does not stop anyone from using the artifact without a key
    with pytest.raises(IntegrityError, match="signature does not verify .*signed with key"):
        load_manifest(signed, public_key=keys["b.pub"])
    unsigned = make_artifact(tmp_path / "unsigned")
    with pytest.raises(IntegrityError, match="not signed"):
        load_manifest(unsigned, public_key=keys["a.pub"])
    # edited and re-digested, the old signature kept: the signature no longer matches
    m = read(signed)
    m["class_names"] = list(reversed(CLASSES))
    block = m.pop(INTEGRITY)
    m[INTEGRITY] = {**seal(m), "signature": block["signature"]}
    write_raw(signed, m)
    load_manifest(signed)  # consistent digest: only the signature can tell
    with pytest.raises(IntegrityError, match="signature does not verify .*manifest was changed"):
        load_manifest(signed, public_key=keys["a.pub"])


def test_openssl_keys_and_bad_key_files(tmp_path: Path, keys: dict[str, Path]) -> None:
    from edgebrain.signing import load_public_key

    if shutil.which("openssl"):
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(tmp_path / "o.pem")], check=True)
        subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "o.pem"), "-pubout", "-out",
                        str(tmp_path / "o.pub")], check=True)
        art = make_artifact(tmp_path / "o", load_private_key(tmp_path / "o.pem"))
        load_manifest(art, public_key=tmp_path / "o.pub")
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(SigningError, match="junk.pem"):
        load_private_key(tmp_path / "junk.pem")
    with pytest.raises(SigningError, match="junk.pem"):
        load_public_key(tmp_path / "junk.pem")
    with pytest.raises(SigningError, match="exists"):
        generate_keypair(keys["a"])
    assert (keys["a"].stat().st_mode & 0o777) == 0o600


# ----------------------------------------------------------------------------- real artifacts


@pytest.fixture(scope="module")
def converted(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model converted to TFLite fp32 with ``edgebrain convert --sign``."""
    from edgebrain.cli import cli

    root = tmp_path_factory.mktemp("signed")
    key, pub = generate_keypair(root / "key")
    other, other_pub = generate_keypair(root / "other")
    out = root / "arts"
    res = CliRunner().invoke(cli, ["convert", str(tiny_model), "--to", "tflite", "--precision", "fp32",
                                   "--out", str(out), "--no-verify", "--sign", str(key)])
    assert res.exit_code == 0, res.output
    img = root / "scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), np.uint8)).save(img)
    return {"art": out / "tflite-fp32", "out": out, "key": key, "pub": pub, "other": other, "other_pub": other_pub,
            "img": img, "model": tiny_model}


def predict_cli(*args: Any) -> Any:
    from edgebrain.cli import cli

    return CliRunner().invoke(cli, ["predict", *map(str, args)])


@pytest.mark.slow
def test_predict_refuses_swapped_classes_and_checks_signatures(converted: dict[str, Path], tmp_path: Path) -> None:
    from edgebrain.predict import Predictor

    art = converted["art"]
    ok = predict_cli(art, converted["img"], "--verify-with", converted["pub"])
    assert ok.exit_code == 0, ok.output
    res = predict_cli(art, converted["img"], "--verify-with", converted["other_pub"])
    assert res.exit_code == 2 and "signature does not verify" in res.output
    swapped = tmp_path / "swapped"
    shutil.copytree(art, swapped)
    m = read(swapped)
    m["class_names"] = [m["class_names"][1], m["class_names"][0], *m["class_names"][2:]]
    write_raw(swapped, m)
    with pytest.raises(IntegrityError, match="does not match its own digest"):
        Predictor(swapped)
    res = predict_cli(swapped, converted["img"])
    assert res.exit_code == 2 and "does not match its own digest" in res.output
    res = predict_cli(tmp_path / "missing" / "file", converted["img"])
    assert res.exit_code == 2 and "no such file or folder" in res.output


@pytest.mark.slow
def test_bench_verify_with_refuses_unsigned_and_foreign_artifacts(converted: dict[str, Path], data_dir: Path,
                                                                   tmp_path: Path) -> None:
    from edgebrain.bench import BenchError, bench

    unsigned = tmp_path / "unsigned"
    shutil.copytree(converted["art"], unsigned)
    m = read(unsigned)
    del m[INTEGRITY]["signature"]
    _resealed(unsigned, m)
    with pytest.raises(IntegrityError, match="not signed"):
        bench([converted["art"], unsigned], data_dir, out=tmp_path / "b1", per_class=1, no_reference=True,
              verify_with=converted["pub"])
    with pytest.raises(IntegrityError, match="signature does not verify"):
        bench([converted["art"]], data_dir, out=tmp_path / "b2", per_class=1, no_reference=True,
              verify_with=converted["other_pub"])
    raw = tmp_path / "raw.tflite"  # the same model file, without its manifest
    shutil.copy(converted["art"] / "model.tflite", raw)
    with pytest.raises(BenchError, match="only signed artifact folders"):
        bench([raw], data_dir, out=tmp_path / "b3", per_class=1, no_reference=True, preprocess="rescale",
              classes=CLASSES, verify_with=converted["pub"])


LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    from filelock import FileLock
    with FileLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_a_second_convert_into_a_locked_folder_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    from edgebrain.convert import LOCK_FILE, convert
    from edgebrain.converters.base import ConversionError

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out / LOCK_FILE)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConversionError, match="another edgebrain convert is writing into"):
            convert(tiny_model, "tflite", "fp32", out, no_verify=True)
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "tflite-fp32").exists()


@pytest.mark.slow
def test_resume_keeps_verified_artifacts_and_stale_work_is_removed(converted: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    from edgebrain.convert import convert
    from edgebrain.converters.base import ConversionError

    out = tmp_path / "out"
    shutil.copytree(converted["out"], out)
    # what a killed run leaves behind
    (out / ".convert-work-dead1").mkdir()
    (out / ".convert-work-dead1" / "big.bin").write_bytes(b"\0" * 1000)
    (out / ".tflite-fp16.partial-x1").mkdir()
    kept_manifest = (out / "tflite-fp32" / MANIFEST).read_bytes()
    with pytest.raises(ConversionError, match="already exists .*--resume"):
        convert(converted["model"], "tflite", "fp32,fp16", out, no_verify=True)
    arts = convert(converted["model"], "tflite", "fp32,fp16", out, no_verify=True, resume=True,
                   sign=converted["key"])
    assert sorted(a.precision for a in arts) == ["fp16", "fp32"]
    assert (out / "tflite-fp32" / MANIFEST).read_bytes() == kept_manifest  # kept, not rebuilt
    load_manifest(out / "tflite-fp16", public_key=converted["pub"])
    assert not list(out.glob(".convert-work-*")) and not list(out.glob(".*.partial-*"))
    summary = json.loads((out / "convert_summary.json").read_text())
    assert {r["precision"]: r["status"] for r in summary["artifacts"]} == {"fp32": "kept", "fp16": "ok"}
    # an artifact that no longer verifies is not kept
    with open(out / "tflite-fp32" / "model.tflite", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ConversionError, match="cannot be kept"):
        convert(converted["model"], "tflite", "fp32", out, no_verify=True, resume=True)


def test_fuzz_finding_a_file_hash_that_is_not_a_string(tmp_path: Path) -> None:
    """Found by tests/edge/test_fuzz.py: ``files: {"calibration.txt": null}`` (digest recomputed) was a
    TypeError inside the hash check."""
    folder = make_artifact(tmp_path / "a")
    m = read(folder)
    m["files"]["model.tflite"] = None
    _resealed(folder, m)
    with pytest.raises(IntegrityError, match="files must map each file name to its sha256"):
        load_manifest(folder)
