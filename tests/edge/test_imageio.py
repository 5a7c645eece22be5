"""edgebrain.imageio on real scans re-encoded as JPEG/PNG/BMP/TIFF/DICOM, RGBA, palette and 16-bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgebrain.errors import ImageLoadError
from edgebrain.imageio import as_rgb_array, load_for_model, load_resized, load_rgb, resize_rgb


def minmax_u8(a: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    a = a.astype(np.float64)
    lo = float(a.min()) if lo is None else lo
    hi = float(a.max()) if hi is None else hi
    return np.clip(np.rint((a - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def scans(data_dir: Path) -> dict[str, Path]:
    """One greyscale-mode and one RGB-mode JPEG from Testing (the dataset has both)."""
    out: dict[str, Path] = {}
    for f in sorted((data_dir / "Testing" / "glioma").iterdir()):
        with Image.open(f) as im:
            out.setdefault(im.mode, f)
        if {"L", "RGB"} <= set(out):
            return out
    raise AssertionError("expected both L and RGB JPEGs in Testing/glioma")


@pytest.fixture(scope="module")
def gray(scans: dict[str, Path]) -> np.ndarray:
    with Image.open(scans["L"]) as im:
        return np.asarray(im.convert("L"))


def write_dicom(path: Path, pixels: np.ndarray, **attrs: object) -> Path:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------- formats


def test_jpeg_greyscale_and_rgb(scans: dict[str, Path]) -> None:
    for mode, f in scans.items():
        rgb = load_rgb(f)
        assert rgb.dtype == np.uint8 and rgb.shape == (224, 224, 3), mode
        with Image.open(f) as im:
            assert np.array_equal(rgb, np.asarray(im.convert("RGB")))
    g = load_rgb(scans["L"])
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("BMP", ".bmp"), ("TIFF", ".tif")])
def test_lossless_formats_roundtrip(tmp_path: Path, gray: np.ndarray, fmt: str, suffix: str) -> None:
    rgb = np.stack([gray, np.roll(gray, 3, axis=1), 255 - gray], axis=-1)  # three distinct channels
    for arr, name in ((gray, "grey"), (rgb, "rgb")):
        p = tmp_path / f"{name}{suffix}"
        Image.fromarray(arr).save(p, format=fmt)
        got = load_rgb(p)
        want = np.stack([arr] * 3, axis=-1) if arr.ndim == 2 else arr
        assert np.array_equal(got, want), (fmt, name)


def test_rgba_la_and_palette(tmp_path: Path, gray: np.ndarray) -> None:
    rgb = np.stack([gray] * 3, axis=-1)
    alpha = np.full(gray.shape, 128, np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(load_rgb(tmp_path / "rgba.png"), rgb)  # alpha dropped, colour kept
    Image.fromarray(gray).convert("LA").save(tmp_path / "la.png")
    assert np.array_equal(load_rgb(tmp_path / "la.png"), rgb)
    pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=64)
    pal.save(tmp_path / "pal.png")
    with Image.open(tmp_path / "pal.png") as im:
        assert im.mode == "P"
        want = np.asarray(im.convert("RGB"))
    got = load_rgb(tmp_path / "pal.png")
    assert np.array_equal(got, want)
    assert len(np.unique(got.reshape(-1, 3), axis=0)) <= 64


def test_16bit_png_is_scaled_to_8bit(tmp_path: Path, gray: np.ndarray) -> None:
    g16 = (gray.astype(np.uint16) * 64 + 300).astype(np.uint16)  # 14-bit-like data with an offset
    p = tmp_path / "scan16.png"
    Image.fromarray(g16).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    got = load_rgb(p)
    assert got.dtype == np.uint8 and got.shape == (*gray.shape, 3)
    assert np.array_equal(got[..., 0], minmax_u8(g16))
    # the min-max scaling of a linear re-encoding gives the original contrast back (within 1 level)
    assert np.abs(got[..., 0].astype(int) - minmax_u8(gray).astype(int)).max() <= 1


def test_16bit_dicom_window_rescale_and_photometric(tmp_path: Path, gray: np.ndarray) -> None:
    raw = (gray.astype(np.uint16) * 16 + 1000).astype(np.uint16)  # 12-bit scanner values
    # RescaleIntercept -1000 maps stored values to 0..4080; the window covers exactly that range.
    p = write_dicom(tmp_path / "scan.dcm", raw, RescaleSlope=1, RescaleIntercept=-1000,
                    WindowCenter=2040, WindowWidth=4080)
    got = load_rgb(p)
    assert got.shape == (*gray.shape, 3)
    assert np.abs(got[..., 0].astype(int) - gray.astype(int)).max() <= 1
    # a narrower window saturates: everything above the window is white
    p2 = write_dicom(tmp_path / "narrow.dcm", raw, RescaleSlope=1, RescaleIntercept=-1000,
                     WindowCenter=1020, WindowWidth=2040)
    narrow = load_rgb(p2)[..., 0]
    assert np.all(narrow[gray >= 128] == 255)
    assert np.abs(narrow[gray < 127].astype(int) - 2 * gray[gray < 127].astype(int)).max() <= 2
    # multi-valued window: the first pair is used
    p3 = write_dicom(tmp_path / "multi.dcm", raw, RescaleSlope=1, RescaleIntercept=-1000,
                     WindowCenter=[2040, 100], WindowWidth=[4080, 50])
    assert np.array_equal(load_rgb(p3), got)
    # MONOCHROME1: bright is low
    p4 = write_dicom(tmp_path / "mono1.dcm", raw, RescaleSlope=1, RescaleIntercept=-1000,
                     WindowCenter=2040, WindowWidth=4080, PhotometricInterpretation="MONOCHROME1")
    assert np.array_equal(load_rgb(p4), 255 - got)
    # no window: min-max of the rescaled values
    p5 = write_dicom(tmp_path / "nowin.dcm", raw)
    assert np.array_equal(load_rgb(p5)[..., 0], minmax_u8(raw))
    # signed data
    p6 = write_dicom(tmp_path / "signed.dcm", (gray.astype(np.int16) * 8 - 1000).astype(np.int16))
    assert np.abs(load_rgb(p6)[..., 0].astype(int) - minmax_u8(gray).astype(int)).max() <= 1


def test_dicom_without_extension_is_found_by_magic(tmp_path: Path, gray: np.ndarray) -> None:
    p = write_dicom(tmp_path / "IM0001", gray.astype(np.uint16))
    assert np.array_equal(load_rgb(p)[..., 0], minmax_u8(gray))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kind", ["empty", "truncated_jpeg", "text_as_jpg", "text_as_dcm", "missing", "folder",
                                  "truncated_png"])
def test_bad_files_raise_imageloaderror_naming_the_file(tmp_path: Path, scans: dict[str, Path],
                                                        gray: np.ndarray, kind: str) -> None:
    p = tmp_path / {"empty": "e.jpg", "truncated_jpeg": "t.jpg", "text_as_jpg": "x.jpg", "text_as_dcm": "x.dcm",
                    "missing": "nope.png", "folder": "dir.png", "truncated_png": "t.png"}[kind]
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "truncated_jpeg":
        p.write_bytes(scans["RGB"].read_bytes()[:2500])
    elif kind in ("text_as_jpg", "text_as_dcm"):
        p.write_text("patient notes, not an image\n")
    elif kind == "folder":
        p.mkdir()
    elif kind == "truncated_png":
        Image.fromarray(gray).save(tmp_path / "full.png")
        p.write_bytes((tmp_path / "full.png").read_bytes()[:3000])
    with pytest.raises(ImageLoadError) as ei:
        load_rgb(p)
    assert ei.value.path == str(p) and str(p) in str(ei.value)
    with pytest.raises(ImageLoadError):
        load_for_model(p, (64, 64))


# ----------------------------------------------------------------------------- resizing and arrays


def test_load_resized_matches_the_training_pipeline(tmp_path: Path, scans: dict[str, Path],
                                                    gray: np.ndarray) -> None:
    """The fast path (resize in Pillow before NumPy) is pixel-identical to load_rgb + resize_rgb,
    which training used; odd sizes and palette files go through the general path."""
    Image.fromarray(gray).resize((301, 157)).save(tmp_path / "odd.png")
    Image.fromarray(np.stack([gray] * 3, -1)).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "pal.png")
    Image.fromarray(gray).save(tmp_path / "g.bmp")
    for f in [*scans.values(), tmp_path / "odd.png", tmp_path / "pal.png", tmp_path / "g.bmp"]:
        for size in [(64, 64), (128, 96), (224, 224)]:
            for method in ("bilinear", "bicubic", "area"):
                got, orig = load_resized(f, size, method)
                want = resize_rgb(load_rgb(f), size, method)
                assert got.shape == (*size, 3) and np.array_equal(got, want), (f.name, size, method)
        assert orig == load_rgb(f).shape[:2]


def test_as_rgb_array_dtypes_and_shapes(gray: np.ndarray) -> None:
    assert np.array_equal(as_rgb_array(gray), np.stack([gray] * 3, -1))
    assert np.array_equal(as_rgb_array(gray[..., None]), np.stack([gray] * 3, -1))
    rgba = np.dstack([gray, gray, gray, np.zeros_like(gray)])
    assert np.array_equal(as_rgb_array(rgba), rgba[..., :3])
    assert np.array_equal(as_rgb_array(gray / 255.0), np.stack([gray] * 3, -1))  # float [0, 1]
    assert np.array_equal(as_rgb_array(gray.astype(np.float32)), np.stack([gray] * 3, -1))  # float 0..255
    assert np.array_equal(as_rgb_array(gray.astype(np.int32)), np.stack([gray] * 3, -1))
    hu = gray.astype(np.int16) * 4 - 500  # negative values (CT-like) are min-max scaled, never wrapped
    assert np.array_equal(as_rgb_array(hu)[..., 0], minmax_u8(hu))
    u16 = gray.astype(np.uint16) * 200
    assert np.array_equal(as_rgb_array(u16)[..., 0], minmax_u8(u16))
    assert np.array_equal(as_rgb_array(Image.fromarray(gray)), np.stack([gray] * 3, -1))
    assert as_rgb_array(gray > 128).max() == 255
    for bad in (np.zeros((4, 4, 2)), np.zeros((2, 4, 4, 3)), np.zeros(5), np.array([["a"]])):
        with pytest.raises(ValueError):
            as_rgb_array(bad)


def test_decompression_bombs_are_refused_by_name(tmp_path: Path, gray: np.ndarray,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "huge.png"
    Image.fromarray(gray).save(p)
    for limit in (gray.size // 3, gray.size // 1.5):  # Pillow's error (> 2x limit) and its warning
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(limit))
        for load in (load_rgb, lambda q: load_resized(q, (64, 64))):
            with pytest.raises(ImageLoadError, match="too large"):
                load(p)
