"""Tests of data_pipeline.preprocess: decoding (LUTs, MONOCHROME1, bit depths), mask, crop, flip,
resize geometry, and bad input. References are written here in numpy, independently of the code."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import skimage.io
import skimage.measure
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from data_pipeline.errors import DataError
from data_pipeline.preprocess import (
    Geometry,
    PreprocessConfig,
    preprocess_file,
    preprocess_image,
    read_image,
)
from data_pipeline.synthetic import write_dicom


def minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return (a - a.min()) / (a.max() - a.min())


def breast_phantom(
    shape=(600, 480), *, side="L", centre_y=300, half_height=200, depth=300, tissue=0.4
) -> np.ndarray:
    """A uniform half-ellipse against the left or right edge on a black background: (H, W) float."""
    H, W = shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    d = xx if side == "L" else (W - 1) - xx
    inside = ((yy - centre_y) / half_height) ** 2 + (d / depth) ** 2 < 1.0
    return np.where(inside, tissue, 0.0)


def add_disc(image: np.ndarray, centre_yx, radius: float, value: float) -> np.ndarray:
    H, W = image.shape
    yy, xx = np.mgrid[0:H, 0:W]
    out = image.copy()
    out[(yy - centre_yx[0]) ** 2 + (xx - centre_yx[1]) ** 2 <= radius**2] = value
    return out


def bright_centroid(image: np.ndarray, level: float) -> np.ndarray:
    """Intensity-weighted centroid (y, x) of the excess above `level`."""
    excess = np.clip(image - level, 0, None)
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    return np.array([(excess * yy).sum(), (excess * xx).sum()]) / excess.sum()


# ---------------------------------------------------------------------------------------------
# Geometry.


@settings(max_examples=50, deadline=None)
@given(
    y0=st.integers(0, 500),
    x0=st.integers(0, 500),
    hc=st.integers(1, 3000),
    wc=st.integers(1, 3000),
    h=st.integers(1, 400),
    w=st.integers(1, 400),
    flipped=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_geometry_round_trip(y0, x0, hc, wc, h, w, flipped, seed):
    g = Geometry((y0 + hc + 3, x0 + wc + 5), (y0, x0, y0 + hc, x0 + wc), flipped, (h, w))
    pts = np.random.default_rng(seed).uniform(-50, 3500, size=(7, 3, 2))
    np.testing.assert_allclose(g.to_original(g.from_original(pts)), pts, rtol=1e-9, atol=1e-7)
    np.testing.assert_allclose(g.from_original(g.to_original(pts)), pts, rtol=1e-9, atol=1e-7)


def test_geometry_by_hand():
    g = Geometry((200, 300), (10, 20, 110, 220), False, (50, 100))
    # Output pixel 0 covers original rows 10-11 and columns 20-21: its centre is (10.5, 20.5).
    np.testing.assert_allclose(g.from_original([10.5, 20.5]), [0.0, 0.0])
    np.testing.assert_allclose(g.to_original([49.0, 99.0]), [108.5, 218.5])
    flipped = Geometry((200, 300), (10, 20, 110, 220), True, (50, 100))
    np.testing.assert_allclose(flipped.from_original([10.5, 20.5]), [0.0, 99.0])
    box = flipped.box_from_original(np.array([[10.5, 20.5], [30.5, 60.5]]))
    np.testing.assert_allclose(box, [0.0, 79.0, 10.0, 99.0])
    assert box.dtype == np.float32


@pytest.mark.parametrize("side", ["L", "R"])
@pytest.mark.parametrize(
    "shape,size",
    [((600, 480), (227, 227)), ((1500, 1200), (227, 227)), ((900, 700), (120, 96))],
)
def test_bright_dot_lands_where_geometry_says(tmp_path, side, shape, size):
    H, W = shape
    image = breast_phantom(
        shape, side=side, centre_y=H // 2, half_height=int(H * 0.4), depth=int(W * 0.65)
    )
    # A dot near the chest wall, off-centre, at a non-integer position.
    dot = np.array([H * 0.37 + 0.3, W * 0.2 + 0.6 if side == "L" else W * 0.8 - 0.4])
    image = add_disc(image, dot, radius=max(H, W) / 60, value=1.0)
    config = PreprocessConfig(size=size)
    for out, g in (
        preprocess_image(image.astype(np.float32), config),
        preprocess_file(
            write_dicom(tmp_path / "dot.dcm", np.round(image * 4095).astype(np.uint16)), config
        ),
    ):
        assert out.shape == size and out.dtype == np.float32
        assert g.flipped == (side == "R")
        expected = g.from_original(dot)
        found = bright_centroid(out, 0.6)
        assert np.abs(found - expected).max() < 1.0, (found, expected, g)
        # The chest wall is on the left after preprocessing (flip=True).
        assert out[:, : size[1] // 4].mean() > out[:, -size[1] // 4 :].mean()
        np.testing.assert_allclose(g.to_original(found), dot, atol=max(H, W) / size[0] * 1.5)


def test_no_flip_when_disabled():
    image = breast_phantom(side="R").astype(np.float32)
    out, g = preprocess_image(image, PreprocessConfig(flip=False))
    assert not g.flipped
    assert out[:, -50:].mean() > out[:, :50].mean()


def test_flip_mirrors_the_left_facing_result():
    # At most 512 pixels: the mask is computed at full resolution, so the crop is exact both ways.
    left = breast_phantom((500, 400), centre_y=240, half_height=180, depth=260)
    left = add_disc(left, (250, 60), 12, 0.9)
    right = left[:, ::-1].copy()
    out_l, g_l = preprocess_image(left.astype(np.float32))
    out_r, g_r = preprocess_image(right.astype(np.float32))
    assert not g_l.flipped and g_r.flipped
    np.testing.assert_allclose(out_r, out_l, atol=1e-5)


def test_marker_outside_breast_is_removed_and_crop_fits_breast():
    # Breast: rows 100..500, columns 0..300 (half-ellipse against the left edge).
    image = breast_phantom((600, 480), centre_y=300, half_height=200, depth=300, tissue=0.45)
    # Marker 1 inside the breast's bounding box but outside the breast (at y=120 the breast
    # reaches only x=130); marker 2 outside the box.
    image[110:135, 220:280] = 1.0
    image[540:580, 380:460] = 1.0
    out, g = preprocess_image(image.astype(np.float32))
    y0, x0, y1, x1 = g.crop
    assert abs(y0 - 100) <= 2 and abs(y1 - 501) <= 3 and x0 == 0 and abs(x1 - 301) <= 3, g.crop
    assert out.max() < 0.5  # no marker survives
    corners = g.from_original(np.array([[110, 220], [134, 279]]))
    (py0, px0), (py1, px1) = (
        np.floor(corners.min(0)).astype(int),
        np.ceil(corners.max(0)).astype(int),
    )
    assert out[max(py0, 0) : py1 + 1, max(px0, 0) : px1 + 1].max() < 0.02
    # The breast itself is kept: the middle of the output is tissue.
    np.testing.assert_allclose(out[100:130, 20:60], 0.45, atol=1e-4)


def test_dark_fat_at_the_chest_wall_is_not_cut_out():
    image = breast_phantom((600, 480), tissue=0.45)
    image[280:320, 0:25] = 0.01  # a dark region touching only the chest-wall edge
    out, g = preprocess_image(image.astype(np.float32))
    py, px = np.round(g.from_original(np.array([300.0, 10.0]))).astype(int)
    assert 0.005 < out[py, px] < 0.05  # kept as tissue (dark), not zeroed as background


# ---------------------------------------------------------------------------------------------
# Decoding.


def ramp(shape=(64, 48), lo=0, hi=4095, dtype=np.uint16) -> np.ndarray:
    return np.linspace(lo, hi, shape[0] * shape[1]).reshape(shape).round().astype(dtype)


def test_monochrome1_is_inverted(tmp_path):
    stored = ramp(hi=4000)
    stored[0, 0] = 10
    m2 = read_image(write_dicom(tmp_path / "m2.dcm", stored, bits_stored=12))
    m1 = read_image(
        write_dicom(tmp_path / "m1.dcm", stored, bits_stored=12, photometric="MONOCHROME1")
    )
    np.testing.assert_allclose(m2, minmax(stored), atol=1e-6)
    np.testing.assert_allclose(m1, 1.0 - minmax(stored), atol=1e-6)
    inverted = read_image(
        write_dicom(tmp_path / "m1b.dcm", 4095 - stored, bits_stored=12, photometric="MONOCHROME1")
    )
    np.testing.assert_allclose(inverted, m2, atol=1e-6)


def linear_window(y: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR), output range [0, 1]."""
    c, w = centre - 0.5, width - 1.0
    out = (y - c) / w + 0.5
    out[y <= c - w / 2] = 0.0
    out[y > c + w / 2] = 1.0
    return out


def test_rescale_and_window_match_numpy_reference(tmp_path):
    stored = ramp(hi=4095)
    path = write_dicom(
        tmp_path / "w.dcm",
        stored,
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=3000,
        WindowWidth=2001,
    )
    y = stored.astype(np.float64) * 2 - 100
    np.testing.assert_allclose(read_image(path), minmax(linear_window(y, 3000, 2001)), atol=1e-6)


def test_window_only_and_monochrome1(tmp_path):
    stored = ramp(hi=65535)
    path = write_dicom(
        tmp_path / "w1.dcm", stored, photometric="MONOCHROME1", WindowCenter=20000, WindowWidth=9000
    )
    ref = 1.0 - minmax(linear_window(stored.astype(np.float64), 20000, 9000))
    np.testing.assert_allclose(read_image(path), ref, atol=1e-6)


def test_voi_lut_sequence(tmp_path):
    from pydicom.dataset import Dataset

    stored = ramp(hi=1023)
    table = (np.sqrt(np.arange(1024) / 1023.0) * 65535).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [1024, 0, 16]
    item.add_new(0x00283006, "US", table.tolist())  # LUTData
    path = write_dicom(tmp_path / "lut.dcm", stored, bits_stored=10, VOILUTSequence=[item])
    np.testing.assert_allclose(read_image(path), minmax(table[stored]), atol=1e-6)


def test_signed_16_bit(tmp_path):
    stored = ramp(lo=-2000, hi=1500, dtype=np.int16)
    path = write_dicom(tmp_path / "s.dcm", stored, RescaleSlope=1, RescaleIntercept=1024)
    np.testing.assert_allclose(read_image(path), minmax(stored), atol=1e-6)


def test_8_bit_dicom(tmp_path):
    stored = ramp(hi=200, dtype=np.uint8)
    np.testing.assert_allclose(read_image(write_dicom(tmp_path / "b.dcm", stored)), minmax(stored))


@pytest.mark.parametrize(
    "suffix,dtype,hi",
    [(".png", np.uint8, 255), (".png", np.uint16, 60000), (".tif", np.uint16, 4095)],
)
def test_png_and_tiff(tmp_path, suffix, dtype, hi):
    image = breast_phantom((300, 240))
    image = add_disc(image, (120, 60), 5, 1.0)
    stored = np.round(image * hi).astype(dtype)
    path = tmp_path / f"img{suffix}"
    skimage.io.imsave(path, stored, check_contrast=False)
    got = read_image(path)
    assert got.dtype == np.float32 and got.shape == stored.shape
    np.testing.assert_allclose(got, minmax(stored), atol=1e-6)
    out, g = preprocess_file(path)
    ref, g_ref = preprocess_image(got)
    assert g == g_ref
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_rgb_png_with_equal_channels(tmp_path):
    gray = breast_phantom((100, 80), centre_y=50, half_height=40, depth=50)
    gray = np.round(gray * 255).astype(np.uint8)
    skimage.io.imsave(tmp_path / "rgb.png", np.stack([gray] * 3, axis=-1), check_contrast=False)
    np.testing.assert_allclose(read_image(tmp_path / "rgb.png"), minmax(gray), atol=1e-6)


def test_preprocess_file_equals_read_then_preprocess(tmp_path):
    rng = np.random.default_rng(0)
    image = breast_phantom((1100, 900), centre_y=520, half_height=430, depth=600)
    image = np.clip(image + rng.normal(0, 0.03, image.shape) * (image > 0), 0, 1)
    image[40:80, 700:850] = 1.0
    path = write_dicom(
        tmp_path / "x.dcm", np.round(image * 16383).astype(np.uint16), bits_stored=14
    )
    out, g = preprocess_file(path)
    ref, g_ref = preprocess_image(read_image(path))
    assert g == g_ref
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert 0.0 <= out.min() and out.max() <= 1.0


# ---------------------------------------------------------------------------------------------
# Bad input.


def valid_dicom_bytes(tmp_path: Path) -> bytes:
    image = np.round(breast_phantom((40, 32), centre_y=20, half_height=15, depth=20) * 4095)
    return write_dicom(tmp_path / "ok.dcm", image.astype(np.uint16), bits_stored=12).read_bytes()


def test_truncated_dicom(tmp_path):
    data = valid_dicom_bytes(tmp_path)
    bad = tmp_path / "truncated.dcm"
    bad.write_bytes(data[: len(data) - 700])
    with pytest.raises(DataError, match="truncated.dcm.*(truncated|damaged)"):
        preprocess_file(bad)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # a UID cut short
def test_dicom_cut_before_its_pixel_data_says_truncated(tmp_path):
    data = valid_dicom_bytes(tmp_path)
    start = data.index(b"\xe0\x7f\x10\x00")  # the PixelData tag
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")  # after the group length
    bad = tmp_path / "cut.dcm"
    for n in (meta_end, meta_end + 30, start - 10, start, start + 4):
        bad.write_bytes(data[:n])
        with pytest.raises(DataError, match=r"cut\.dcm: .*truncated \(cut short\)"):
            read_image(bad)
    # a whole DICOM that is no image (a structured report) holds no pixel data
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR Storage
    ds.SOPInstanceUID, ds.Modality = pydicom.uid.generate_uid(), "SR"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    with pytest.raises(DataError, match=r"sr\.dcm: the DICOM file holds no pixel data"):
        read_image(tmp_path / "sr.dcm")


def test_not_a_dicom(tmp_path):
    bad = tmp_path / "junk.dcm"
    bad.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(DataError, match="junk.dcm"):
        read_image(bad)


@pytest.mark.filterwarnings("ignore:A value of .None. for .0028,0008.")  # pydicom: empty frames
def test_dicom_header_variants(tmp_path):
    stored = ramp(hi=4000)
    path = write_dicom(tmp_path / "a.dcm", stored, bits_stored=12)
    expected = minmax(stored)
    # without the 128-byte preamble and "DICM" (some exports): read all the same
    (tmp_path / "bare.dcm").write_bytes(path.read_bytes()[132:])
    np.testing.assert_allclose(read_image(tmp_path / "bare.dcm"), expected, atol=1e-6)

    def edited(name: str, **changes) -> Path:
        ds = pydicom.dcmread(path)
        for keyword, value in changes.items():
            if value is None:
                del ds[keyword]
            else:
                setattr(ds, keyword, value)
        ds.save_as(tmp_path / name)
        return tmp_path / name

    # NumberOfFrames 1 or empty: one image; 2 (with two frames' data): refused, not decoded
    for frames in (1, ""):
        out = read_image(edited(f"frames{frames}.dcm", NumberOfFrames=frames))
        np.testing.assert_allclose(out, expected, atol=1e-6)
    two = edited("two.dcm", NumberOfFrames=2, PixelData=stored.tobytes() * 2)
    with pytest.raises(DataError, match=r"two\.dcm: 2 frames; expected one image per file"):
        read_image(two)
    with pytest.raises(DataError, match=r"five\.dcm: 5 samples per pixel"):
        read_image(edited("five.dcm", SamplesPerPixel=5))
    with pytest.raises(DataError, match=r"nopi\.dcm: cannot decode the pixel data"):
        read_image(edited("nopi.dcm", PhotometricInterpretation=None))
    # no file meta at all: no transfer syntax to read the pixel data with
    ds = pydicom.dcmread(path)
    ds.preamble, ds.file_meta = None, pydicom.dataset.FileMetaDataset()
    ds.save_as(tmp_path / "raw.dcm", implicit_vr=True, little_endian=True)
    with pytest.raises(DataError, match=r"raw\.dcm: the DICOM file names no transfer syntax"):
        read_image(tmp_path / "raw.dcm")


def jpeg_lossless_dicom(path: Path, stored: np.ndarray, bits: int = 12) -> Path:
    """A DICOM whose pixel data is JPEG Lossless SV1, encoded by imagecodecs (libjpeg-turbo)."""
    import imagecodecs

    ds = pydicom.dcmread(write_dicom(path, stored, bits_stored=bits))
    frame = imagecodecs.jpeg8_encode(stored, lossless=True, predictor=1, bitspersample=bits)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.save_as(path)
    return path


def test_compressed_without_decoder_names_the_file_and_the_package(tmp_path, monkeypatch):
    stored = ramp(hi=4000)
    path = jpeg_lossless_dicom(tmp_path / "c.dcm", stored)

    class Missing:  # what pydicom answers in an environment without the plugin
        is_available = False

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: Missing())
    with pytest.raises(
        DataError,
        match=r"c\.dcm.*no decoder.*pip install pylibjpeg pylibjpeg-libjpeg \(dependencies",
    ):
        read_image(path)
    # A syntax pydicom has no decoder for at all: the general advice.
    monkeypatch.undo()
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: pydicom decodes none
    ds.save_as(tmp_path / "mpeg.dcm")
    with pytest.raises(DataError, match=r"mpeg\.dcm.*compressed.*no decoder.*gdcmconv"):
        read_image(tmp_path / "mpeg.dcm")


def compressed(path: Path, stored: np.ndarray, syntax, **options) -> Path:
    """`stored` written as DICOM, compressed with pydicom's own encoders (Dataset.compress)."""
    ds = pydicom.dcmread(write_dicom(path, stored, bits_stored=12))
    ds.compress(syntax, **options)
    ds.save_as(path)
    return path


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1])
def test_lossless_compressed_dicom_decodes_exactly(tmp_path, syntax):
    rng = np.random.default_rng(3)
    stored = rng.integers(0, 4096, (70, 54)).astype(np.uint16)  # noise: nothing to predict
    stored[0, 0], stored[-1, -1] = 0, 4095
    if syntax == JPEGLosslessSV1:
        path = jpeg_lossless_dicom(tmp_path / "c.dcm", stored)
    else:
        path = compressed(tmp_path / "c.dcm", stored, syntax)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == syntax and len(ds.PixelData) > 0
    np.testing.assert_array_equal(read_image(path), (stored / 4095.0).astype(np.float32))


def test_compressed_preprocesses_like_uncompressed(tmp_path):
    image = breast_phantom((400, 320), centre_y=200, half_height=150, depth=220)
    image = add_disc(image, (180, 60), 8, 0.9)
    stored = np.round(image * 4095).astype(np.uint16)
    plain = preprocess_file(write_dicom(tmp_path / "plain.dcm", stored, bits_stored=12))
    for syntax in (RLELossless, JPEG2000Lossless):
        out, g = preprocess_file(compressed(tmp_path / f"{syntax.name[:4]}.dcm", stored, syntax))
        assert g == plain[1]
        np.testing.assert_array_equal(out, plain[0])


def test_near_lossless_jpeg_ls_stays_within_its_error_bound(tmp_path):
    stored = ramp(hi=4095)
    path = compressed(tmp_path / "nl.dcm", stored, JPEGLSNearLossless, jls_error=3)
    decoded = np.round(read_image(path) * 4095).astype(int)  # min 0 and max 4095 survive
    error = np.abs(decoded - stored.astype(int))
    assert error.max() <= 3 and error.max() > 0  # lossy, and within the JPEG-LS bound NEAR=3


def test_jpeg_baseline_dicom_matches_pillows_decoding(tmp_path):
    import io

    import PIL.Image
    import skimage.filters

    image = breast_phantom((96, 80), centre_y=48, half_height=36, depth=50, tissue=0.6)
    image = skimage.filters.gaussian(image, 3)  # smooth: little ringing, min and max kept
    stored = np.round(image * 250 + 3).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(stored).save(buffer, "JPEG", quality=90)
    ds = pydicom.dcmread(write_dicom(tmp_path / "b.dcm", stored))
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(tmp_path / "b.dcm")
    reference = np.asarray(PIL.Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float64)
    got = read_image(tmp_path / "b.dcm")  # decoded by libjpeg (pylibjpeg), not Pillow
    assert np.abs(got - minmax(reference)).max() <= 2.0 / 255
    assert np.abs(got - minmax(stored)).max() < 0.1  # and close to the original


def edit_codestream(path: Path, find: bytes, at: int, value: bytes) -> None:
    """Overwrite bytes `at` past `find` inside the (compressed) pixel data of a DICOM file."""
    ds = pydicom.dcmread(path)
    data = bytearray(ds.PixelData)
    start = data.find(find)
    assert start >= 0
    data[start + at : start + at + len(value)] = value
    ds.PixelData = bytes(data)
    ds.save_as(path)


def test_codestream_size_is_checked_before_decoding(tmp_path):
    stored = ramp(hi=4095)  # 64 x 48
    # JPEG 2000 whose SIZ claims 20000 x 20000: refused by the pixel cap, nothing decoded.
    path = compressed(tmp_path / "j2k.dcm", stored, JPEG2000Lossless)
    edit_codestream(path, b"\xff\x4f\xff\x51", 8, (20000).to_bytes(4, "big") * 2)
    with pytest.raises(DataError, match=r"j2k\.dcm.*20000 x 20000 pixels.*100-megapixel cap"):
        read_image(path)
    # JPEG lossless whose frame header says 64 x 49 while the DICOM header says 64 x 48.
    path = jpeg_lossless_dicom(tmp_path / "jpg.dcm", stored)
    edit_codestream(path, b"\xff\xc3", 7, (49).to_bytes(2, "big"))
    with pytest.raises(DataError, match=r"jpg\.dcm.*compressed image is 64 x 49.*says 64 x 48"):
        read_image(path)


def jpeg_baseline_dicom(path: Path, stored: np.ndarray) -> Path:
    """A DICOM whose pixel data is 8-bit JPEG Baseline, encoded by Pillow."""
    import io

    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.fromarray(stored).save(buffer, "JPEG", quality=90)
    ds = pydicom.dcmread(write_dicom(path, stored))
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(path)
    return path


@pytest.mark.parametrize(
    "syntax",
    [
        JPEGLSLossless,
        JPEGLSNearLossless,
        JPEGLosslessSV1,
        JPEGBaseline8Bit,
        JPEG2000Lossless,
        RLELossless,
    ],
)
@pytest.mark.parametrize("keep", [0.6, "all but the end marker"])
def test_truncated_codestream_is_refused_not_decoded(tmp_path, syntax, keep):
    """A codestream cut short decodes, in libjpeg and CharLS, to an image whose lower part is
    garbage; the missing end-of-image marker (FFD9) gives it away for every JPEG family syntax."""
    image = breast_phantom((200, 160), centre_y=100, half_height=80, depth=100)
    stored = np.round(add_disc(image, (80, 40), 6, 0.9) * 4000).astype(np.uint16)
    path = tmp_path / "c.dcm"
    if syntax == JPEGLosslessSV1:
        jpeg_lossless_dicom(path, stored)
    elif syntax == JPEGBaseline8Bit:
        jpeg_baseline_dicom(path, (stored // 16).astype(np.uint8))
    elif syntax == JPEGLSNearLossless:
        compressed(path, stored, syntax, jls_error=2)
    else:
        compressed(path, stored, syntax)
    assert read_image(path).shape == (200, 160)  # whole: decoded
    ds = pydicom.dcmread(path)
    (frame,) = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)
    if keep == 0.6:
        frame = frame[: int(len(frame) * 0.6)]
    elif syntax == RLELossless:
        frame = frame[:-2]
    else:  # the codestream without its last marker (and the padding after it)
        frame = frame[: frame.rindex(b"\xff\xd9")]
    ds.PixelData = encapsulate([frame])
    ds.save_as(path)
    with pytest.raises(DataError, match=r"c\.dcm: .*truncated"):
        read_image(path)


def test_a_failing_decoder_logs_no_traceback_under_absl(tmp_path):
    """pydicom logs each failing plugin's traceback (LOGGER.exception); a program's absl handler
    printed them around its own one line. Only that line remains, with the plugin's reason."""
    path = compressed(tmp_path / "c.dcm", ramp(hi=4000), RLELossless)
    ds = pydicom.dcmread(path)
    (frame,) = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])
    ds.save_as(path)
    script = (
        "import sys, logging as std; from absl import logging; logging.use_absl_handler()\n"
        "from data_pipeline.errors import DataError\n"
        "from data_pipeline.preprocess import read_image\n"
        "try:\n    read_image(sys.argv[1])\n"
        "except DataError as e:\n    logging.warning('Skipping %s', e)\n"
        "std.getLogger('pydicom').warning('pydicom logs after decoding')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "c.dcm" in line]
    assert len(lines) == 1 and "Skipping" in lines[0], result.stderr
    assert "cannot decode the pixel data" in lines[0] and "plugins: " in lines[0]
    assert "pydicom logs after decoding" in result.stderr  # quiet only while decoding


# ---------------------------------------------------------------------------------------------
# PGM/PPM and JPEG files.


def netpbm(magic: bytes, pixels: np.ndarray, maxval: int) -> bytes:
    """Netpbm bytes written by hand: header with a comment and odd whitespace, big-endian."""
    h, w = pixels.shape[:2]
    header = magic + b"\n# scanner: test\n" + f"{w}  {h}\n{maxval}".encode() + b"\n"
    dtype = ">u2" if maxval > 255 else np.uint8
    return header + pixels.astype(dtype).tobytes()


@pytest.mark.parametrize("maxval", [255, 256, 4095, 65535])
def test_pgm_8_and_16_bit(tmp_path, maxval):
    from data_pipeline.preprocess import _pnm_header, _read_pnm

    image = breast_phantom((120, 96), centre_y=60, half_height=45, depth=60)
    stored = np.round(add_disc(image, (50, 30), 4, 1.0) * maxval).astype(np.uint16)
    path = tmp_path / "mdb001.pgm"
    # bytes after the raster (some scanners pad files) are not pixels
    path.write_bytes(netpbm(b"P5", stored, maxval) + b"\x07" * 64)
    # two bytes a sample from maxval 256 on (Netpbm), read as native unsigned integers
    raw = _read_pnm(path, _pnm_header(path))
    assert raw.dtype == (np.uint16 if maxval > 255 else np.uint8)
    np.testing.assert_array_equal(raw, stored)
    np.testing.assert_allclose(read_image(path), minmax(stored), atol=1e-6)
    out, g = preprocess_file(path)
    ref, g_ref = preprocess_image(minmax(stored).astype(np.float32))
    assert g == g_ref
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_raster_files_with_several_images_or_samples_are_refused_from_the_header(tmp_path):
    import PIL.Image

    pages = tmp_path / "pages.tif"
    tifffile.imwrite(pages, np.zeros((3, 16, 12), np.uint16), photometric="minisblack")  # 3 pages
    apng = tmp_path / "frames.png"  # an animated PNG
    frames = [PIL.Image.fromarray(np.full((16, 12), 40 * i, np.uint8)) for i in range(3)]
    frames[0].save(apng, save_all=True, append_images=frames[1:])
    five = tmp_path / "five.tif"
    tifffile.imwrite(
        five, np.zeros((16, 12, 5), np.uint8), photometric="minisblack", planarconfig="contig"
    )
    for path, message in ((pages, "holds 3 images"), (apng, "holds 3 images"), (five, "5 samples")):
        with pytest.raises(DataError, match=f"{path.name}: .*{message}"):
            read_image(path)


def test_colour_and_narrow_rasters_decode_to_grey_by_hand(tmp_path):
    rng = np.random.default_rng(7)
    grey = rng.integers(0, 256, (20, 16)).astype(np.uint8)
    other = rng.integers(0, 256, (20, 16)).astype(np.uint8)
    weights = np.array([0.2125, 0.7154, 0.0721])  # ITU-R BT.709 luminance

    def decoded(pixels: np.ndarray, name: str) -> np.ndarray:
        skimage.io.imsave(tmp_path / name, pixels, check_contrast=False)
        return read_image(tmp_path / name)

    expected_grey = minmax(grey).astype(np.float32)
    # equal channels are the grey image itself, exactly (no luminance rounding); alpha ignored
    for name, pixels in (
        ("rgb.png", np.stack([grey] * 3, -1)),
        ("rgba.png", np.dstack([grey, grey, grey, other])),
    ):
        np.testing.assert_array_equal(decoded(pixels, name), expected_grey)
    # two equal channels and a third that differs: luminance of all three
    for name, pixels in (
        ("rg.png", np.stack([grey, grey, other], -1)),
        ("rb.png", np.stack([grey, other, grey], -1)),
    ):
        luminance = pixels.astype(np.float64) @ weights
        np.testing.assert_allclose(decoded(pixels, name), minmax(luminance), atol=1e-5)
    # colour with alpha: luminance of the colours, alpha ignored
    rgba = np.dstack([grey, other, grey, other[::-1]])
    luminance = rgba[..., :3].astype(np.float64) @ weights
    np.testing.assert_allclose(decoded(rgba, "rgba_colour.png"), minmax(luminance), atol=1e-5)
    # grey with alpha: the grey channel
    np.testing.assert_array_equal(decoded(np.dstack([grey, other]), "la.png"), expected_grey)
    # a TIFF that reads back as (H, W, 1): the grey image
    tifffile.imwrite(tmp_path / "one_sample.tif", grey[..., None], photometric="minisblack")
    assert skimage.io.imread(tmp_path / "one_sample.tif").shape == (20, 16, 1)
    np.testing.assert_array_equal(read_image(tmp_path / "one_sample.tif"), expected_grey)
    # a grey image 3 or 4 pixels wide is not a colour image
    for width in (3, 4):
        narrow = grey[:, :width]
        np.testing.assert_allclose(decoded(narrow, f"w{width}.png"), minmax(narrow), atol=1e-7)


@pytest.mark.parametrize("fy, fx", [(1, 1), (3, 2), (64, 5), (130, 1)])
def test_block_mean_matches_skimage_block_reduce(fy, fx):
    """The mask's downsampling, strip by strip, against block_reduce on the same box; from a
    lookup table (integer images) and from float images alike."""
    from data_pipeline.preprocess import _Decoded

    rng = np.random.default_rng(fy * 31 + fx)
    index = rng.integers(0, 4096, (1400, 90)).astype(np.uint16)
    lut = (rng.random(65536) ** 2).astype(np.float32)
    box = (7, 3, 7 + 10 * fy + fy // 2, 3 + 17 * fx)  # rows that fill no whole block are left out
    y0, x0, y1, x1 = box
    for decoded, values in (
        (_Decoded(index=index, lut=lut, image=None), lut[index]),
        (_Decoded(index=None, lut=None, image=lut[index]), lut[index]),
    ):
        got = decoded.block_mean(box, fy, fx)
        whole = values[y0 : y0 + 10 * fy, x0:x1].astype(np.float64)
        expected = skimage.measure.block_reduce(whole, (fy, fx), np.mean)
        assert got.dtype == np.float32 and got.shape == (10, 17)
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_fit_grows_or_shrinks_a_span_to_a_multiple_by_hand():
    from data_pipeline.preprocess import _fit

    assert _fit(3, 10, 4, 20) == (3, 11)  # 7 -> 8: grown at the high end
    assert _fit(5, 18, 4, 19) == (3, 19)  # 13 -> 16: 1 more at the top (the edge), 2 at the bottom
    assert _fit(2, 16, 4, 16) == (0, 16)  # 14 -> 16: all 2 at the bottom, down to 0 exactly
    assert _fit(1, 16, 6, 16) == (1, 13)  # 15 -> 18 does not fit in 16: shrunk to 12
    assert _fit(0, 15, 4, 15) == (0, 12)
    assert _fit(4, 12, 4, 30) == (4, 12)  # already a multiple


def _art(rows: list[str]) -> np.ndarray:
    return np.array([[ch != "." for ch in row] for row in rows])


@pytest.mark.parametrize("mirrored", [False, True, None])
def test_fill_holes_fills_enclosed_background_and_chest_wall_inlets_by_hand(mirrored):
    from data_pipeline.preprocess import _fill_holes

    # '#' breast, '.' background that stays, 'o' background filled. With the chest wall on the
    # left: (0, 3), (5, 2) and (2, 8) meet the top, bottom and far edges and stay; the inlet at
    # (2..3, 0) meets only the chest-wall edge; (1, 6) and (4, 4) lie one line in from the top and
    # bottom; (3, 7) touches (2, 8) only diagonally (4-connected regions), one column in from
    # the far edge.
    art = [
        "###.#####",
        "#o####o##",
        "o#######.",
        "o######o#",
        "####o####",
        "##.######",
    ]
    if mirrored:  # the same breast the other way round, chest wall on the right
        art = [row[::-1] for row in art]
    if mirrored is None:  # no chest-wall edge: the inlet at the left edge stays background
        art = [row[0].replace("o", ".") + row[1:] for row in art]
    mask = _art([row.replace("o", ".") for row in art])
    wall = None if mirrored is None else not mirrored
    np.testing.assert_array_equal(_fill_holes(mask, chest_wall_left=wall), _art(art))


def test_otsu_threshold_is_the_midpoint_of_the_class_means_by_hand():
    from data_pipeline.preprocess import _otsu

    two = np.array([0.1] * 50 + [0.9] * 50).reshape(10, 10)  # Otsu alone: the gap's low edge
    assert _otsu(two) == pytest.approx(0.5)
    one = np.zeros((10, 10))
    one[3, 7] = 1.0  # a single bright pixel above the threshold still moves it
    assert _otsu(one) == pytest.approx(0.5)
    assert _otsu(np.full((10, 10), 0.3)) == pytest.approx(0.3)  # one value: nothing to split
    uneven = np.array([0.2] * 70 + [0.6] * 20 + [0.8] * 10).reshape(10, 10)
    assert _otsu(uneven) == pytest.approx(0.5 * (0.2 + (0.6 * 20 + 0.8 * 10) / 30))


def test_threshold_looks_below_a_bright_plateau_by_hand():
    from data_pipeline.preprocess import _threshold

    def image(*runs):  # (value, count) runs of 100 pixels
        return np.concatenate([np.full(n, v, np.float32) for v, n in runs]).reshape(10, 10)

    # Otsu splits off 1.0 (20%, mean 1.0 >= 1 - 0.15): Otsu again below it, between 0 and 0.4
    assert _threshold(image((0, 50), (0.4, 30), (1, 20))) == pytest.approx(0.2)
    # a single bright pixel is a plateau too
    assert _threshold(image((0, 90), (0.02, 9), (1, 1))) == pytest.approx(0.01)
    # 25% above Otsu's threshold is not "under a quarter": the midpoint of 0 x 50, 0.4 x 25 and 1
    assert _threshold(image((0, 50), (0.4, 25), (1, 25))) == pytest.approx(0.5 * (10 / 75 + 1))
    # Otsu's midpoint (between 0.2 and 0.3) leaves the top 20% above it; their mean is 0.83, under
    # 0.85: kept; at 0.87 the plateau rule applies (Otsu of the rest: midpoint of 0 and 0.25)
    darker = ((0, 10), (0.2, 35), (0.3, 35))
    kept = 0.5 * (0.2 * 35 / 45 + (0.3 * 35 + 0.66 * 10 + 10) / 55)
    assert _threshold(image(*darker, (0.66, 10), (1, 10))) == pytest.approx(kept)
    assert _threshold(image(*darker, (0.74, 10), (1, 10))) == pytest.approx(0.125)
    # the bound is from the maximum down, whatever the minimum: all shifted by 0.1, still kept
    shifted = [(v + 0.1, n) for v, n in (*darker, (0.66, 10), (1, 10))]
    assert _threshold(image(*shifted)) == pytest.approx(kept + 0.1)
    # the bound is a fraction of the range: twice the values, twice the bound (1.74 >= 1.7)
    twice = ((0, 10), (0.4, 35), (0.6, 35), (1.48, 10), (2, 10))
    assert _threshold(image(*twice)) == pytest.approx(0.25)
    # a mean exactly at the bound counts (float64: 8 x 0.7 and 8 x 1.0 average to 1 - 0.15)
    exact = np.concatenate([np.full(n, v) for v, n in (*darker[:1], (0.2, 37), (0.3, 37))])
    exact = np.concatenate([exact, np.full(8, 0.7), np.full(8, 1.0)]).reshape(10, 10)
    assert _threshold(exact) == pytest.approx(0.125)
    # below the plateau one value: nothing to split there, Otsu's threshold stays
    assert _threshold(image((0, 80), (1, 20))) == pytest.approx(0.5)


def _strip_scene(name: str) -> tuple[np.ndarray, np.ndarray, set[int]]:
    """A 40 x 40 breast filling the image (a checkerboard of 0.3 and 0.5 in 8-pixel squares: the
    masked quartiles are 0.3 and 0.5, so `flat` is 0.05, and `bright` is over 0.6) with the given
    film edges along its top: (image, mask, the rows `_drop_border_strips` must take out)."""
    r, c = np.mgrid[0:40, 0:40]
    small = (0.3 + 0.2 * ((r // 8 + c // 8) % 2)).astype(np.float32)
    mask = np.ones((40, 40), bool)
    dropped: set[int] = set()
    if name == "strips":  # two flat bright rows, then tissue
        small[0:2] = 1.0
        dropped = {0, 1}
    elif name == "stepped":  # background, strip, black band, strip; the search goes 4 rows deep
        small[[0, 2]], mask[[0, 2]] = 0.0, False
        small[[1, 3, 4]] = 1.0
        dropped = {1, 3}
    elif name == "cover 90%":  # bright over 36 of 40 pixels is a film edge
        small[0, :36] = 1.0
        dropped = {0}
    elif name == "cover 87%":  # over 35 is not, and the tissue line ends the search
        small[0, :35] = 1.0
        small[1] = 1.0
    elif name == "grain":  # pixel-to-pixel grain of 0.06 > flat: averaged over 3 pixels, 0.02
        small[0] = np.where(np.arange(40) % 2, 0.94, 1.0)
        dropped = {0}
    elif name == "texture":  # bright but textured (0.8 and 1.0 in runs of 10): tissue, search ends
        small[0] = np.where(np.arange(40) // 10 % 2, 0.8, 1.0)
        small[1] = 1.0
    elif name == "half covered":  # a line half in the mask is not stepped over
        mask[0, 20:], small[0, 20:] = False, 0.0
        small[1] = 1.0
    elif name == "uniform":  # tissue of one value: `flat` is 0, and a strip's spread is 0 too
        small[:] = 0.4
        small[0] = 1.0
        dropped = {0}
    elif name == "under half":  # under half is (a label, a thin strip)
        mask[0, 19:], small[0, 19:] = False, 0.0
        small[1] = 1.0
        dropped = {1}
    else:
        raise ValueError(f"no scene {name!r}")
    return small, mask, dropped


@pytest.mark.parametrize("turns", range(4))
@pytest.mark.parametrize(
    "name",
    [
        "strips",
        "stepped",
        "cover 90%",
        "cover 87%",
        "grain",
        "texture",
        "uniform",
        "half covered",
        "under half",
    ],
)
def test_drop_border_strips_by_hand_on_every_side(name, turns):
    from data_pipeline.preprocess import _drop_border_strips

    small, mask, dropped = _strip_scene(name)
    expected = mask.copy()
    expected[sorted(dropped)] = False
    # the same scene along each side in turn (rot90 takes the top rows to the left, bottom, right)
    small, mask, expected = (np.rot90(a, turns).copy() for a in (small, mask, expected))
    np.testing.assert_array_equal(_drop_border_strips(mask, small), expected)


def test_drop_border_strips_looks_one_line_in_on_a_short_side():
    from data_pipeline.preprocess import _drop_border_strips

    # 8 rows: 10% of the side is no whole row, but the outermost row is still looked at
    small, mask, _ = _strip_scene("strips")  # bright rows 0 and 1
    small, mask = small[:8], mask[:8]
    expected = mask.copy()
    expected[0] = False
    np.testing.assert_array_equal(_drop_border_strips(mask, small), expected)


def test_pnm_header_by_hand(tmp_path):
    from data_pipeline.preprocess import _pnm_header, _raster_header

    def header(head: bytes, pixels: int = 1000):
        path = tmp_path / "h.pgm"
        path.write_bytes(head + bytes(pixels))
        return _pnm_header(path)

    # (rows, columns, samples, maxval, offset of the first pixel byte)
    assert header(b"P5 4 3 255 ") == (3, 4, 1, 255, 11)
    assert header(b"P6\n1\t1\r1\n") == (1, 1, 3, 1, 9)  # 1 x 1, maxval 1, any whitespace
    assert header(b"P5#scanner\n4 3 65535\n") == (3, 4, 1, 65535, 21)  # a comment at once
    assert header(b"P5 4 # width\n 3 255\n") == (3, 4, 1, 255, 20)
    assert header(b"P2 4 3 255 ") is None  # plain (ASCII) PGM: not this reader's
    for bad in (b"P5 0 3 255 ", b"P5 4 0 255 ", b"P5 4 3 0 ", b"P5 4 3 65536 "):
        with pytest.raises(ValueError, match="the PNM header gives"):
            header(bad)
    for bad in (b"P5 4 3 255X", b"P5 4x3 255 ", b"P5 4 3"):
        with pytest.raises(ValueError, match="needs width, height and maxval"):
            header(bad, pixels=0)
    # the header is read from the first 4 KB: a comment whose newline is byte 4096 runs past it
    long = b"P5 #" + b"c" * (4096 - 4) + b"\n4 3 255 "
    with pytest.raises(ValueError, match="runs past 4 KB"):
        header(long)
    path = tmp_path / "wide.pgm"
    path.write_bytes(b"P5 5 3 255 " + bytes(15))
    assert _raster_header(path) == (3, 5, 1, 1)


@pytest.mark.parametrize("maxval", [255, 65535])
def test_ppm_colour_becomes_luminance(tmp_path, maxval):
    import skimage.color

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, maxval + 1, (40, 36, 3))
    rgb[0, 0], rgb[-1, -1] = 0, maxval
    path = tmp_path / "c.ppm"
    path.write_bytes(netpbm(b"P6", rgb, maxval))
    reference = skimage.color.rgb2gray(rgb / maxval)  # skimage's luminance weights
    np.testing.assert_allclose(read_image(path), minmax(reference), atol=1e-5)
    if maxval > 255:  # all 16 bits count (Pillow would keep only the high byte)
        low = rgb % 256
        path.write_bytes(netpbm(b"P6", low, maxval))
        np.testing.assert_allclose(
            read_image(path), minmax(skimage.color.rgb2gray(low / maxval)), atol=1e-5
        )


def test_plain_ascii_pgm_and_jpeg(tmp_path):
    import PIL.Image

    stored = np.round(ramp(hi=200, dtype=np.uint8)).astype(np.uint8)
    rows = "\n".join(" ".join(str(v) for v in row) for row in stored)
    (tmp_path / "a.pgm").write_text(f"P2\n48 64\n255\n{rows}\n")
    np.testing.assert_allclose(read_image(tmp_path / "a.pgm"), minmax(stored), atol=1e-6)
    import skimage.filters

    image = skimage.filters.gaussian(breast_phantom((120, 96), centre_y=60, half_height=45), 3)
    grey = np.round(image * 240 + 5).astype(np.uint8)
    PIL.Image.fromarray(grey).save(tmp_path / "g.jpg", quality=95)
    PIL.Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb.jpeg", quality=95)
    for name in ("g.jpg", "rgb.jpeg"):
        got = read_image(tmp_path / name)
        assert got.shape == grey.shape and np.abs(got - minmax(grey)).max() < 0.08


def test_bad_pnm_files(tmp_path):
    stored = ramp(hi=255, dtype=np.uint8)
    data = netpbm(b"P5", stored, 255)
    (tmp_path / "cut.pgm").write_bytes(data[:-100])
    with pytest.raises(DataError, match=r"cut\.pgm.*truncated"):
        read_image(tmp_path / "cut.pgm")
    (tmp_path / "huge.pgm").write_bytes(b"P5 20000 20000 255\n" + bytes(1000))
    with pytest.raises(DataError, match=r"huge\.pgm.*20000 x 20000 pixels.*100-megapixel cap"):
        read_image(tmp_path / "huge.pgm")
    (tmp_path / "nohead.pgm").write_bytes(b"P5 48\n")
    with pytest.raises(DataError, match=r"nohead\.pgm"):
        read_image(tmp_path / "nohead.pgm")


def test_other_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="missing.dcm.*no such file"):
        read_image(tmp_path / "missing.dcm")
    blank = write_dicom(tmp_path / "blank.dcm", np.full((20, 20), 7, np.uint16))
    with pytest.raises(DataError, match="blank.dcm.*blank"):
        preprocess_file(blank)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt.*unknown image type"):
        read_image(tmp_path / "notes.txt")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(DataError, match="bad.png"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(DataError, match="in \\[0, 1\\]"):
        preprocess_image(np.full((10, 10), 3.0))


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((1, 50)), "2-D array"),  # 2-D but one row
        (np.zeros((4, 4, 4)), "2-D array"),
        (np.zeros((10, 10), np.uint8), "expected float"),
        (np.full((10, 10), np.nan), "finite and in"),
        (np.full((10, 10), np.inf), "finite and in"),
        (np.full((10, 10), -np.inf), "finite and in"),
        (np.full((10, 10), -0.0011), "finite and in"),
        (np.full((10, 10), 1.0011), "finite and in"),
    ],
)
def test_preprocess_image_refuses_what_it_cannot_take(image, message):
    with pytest.raises(DataError, match=message):
        preprocess_image(image)


def test_preprocess_image_takes_rounding_just_outside_zero_and_one():
    image = breast_phantom((120, 96), centre_y=60, half_height=45, depth=60)
    image[0, 0], image[-1, -1] = -1e-3, 1.0 + 1e-3  # within the tolerance, exactly at it
    out, _ = preprocess_image(image)
    assert out.dtype == np.float32 and np.isfinite(out).all()


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cut=st.integers(0, 2000),
    edits=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 255)), max_size=8),
)
def test_fuzz_dicom_reader(tmp_path, cut, edits):
    data = bytearray(valid_dicom_bytes(tmp_path))
    for pos, value in edits:
        if pos < len(data):
            data[pos] = value
    data = bytes(data[: max(0, len(data) - cut)])
    path = tmp_path / "fuzz.dcm"
    path.write_bytes(data)
    try:
        image = read_image(path)
    except DataError as e:
        assert "fuzz.dcm" in str(e)
        return
    assert image.ndim == 2 and image.dtype == np.float32
    assert np.all(np.isfinite(image)) and image.min() >= 0 and image.max() <= 1


# ---------------------------------------------------------------------------------------------
# Limits, outlines outside the image, and the command line.


def png_bytes(height: int, width: int, bit_depth: int = 8, rows: int = 1) -> bytes:
    """A grayscale PNG whose header says height x width, with only `rows` rows of pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    row = b"\x00" + bytes(width * bit_depth // 8)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(row * rows))
        + chunk(b"IEND", b"")
    )


def test_decoders_refuse_more_than_the_pixel_cap_before_decoding(tmp_path):

    # A 20000 x 20000 deflate TIFF of a few hundred KB: 400 megapixels once decoded.
    def tiles():
        for i in range(20 * 20):
            yield np.full((1024, 1024), i % 251, np.uint8)

    tif = tmp_path / "bomb.tif"
    tifffile.imwrite(
        tif, tiles(), shape=(20000, 20000), dtype=np.uint8, tile=(1024, 1024), compression="zlib"
    )
    assert tif.stat().st_size < 5_000_000
    with pytest.raises(DataError, match=r"bomb.tif.*20000 x 20000 pixels.*100-megapixel cap"):
        read_image(tif)
    # 110 megapixels: over the cap, under PIL's own decompression-bomb limit.
    png = tmp_path / "big.png"
    png.write_bytes(png_bytes(11000, 10000))
    with pytest.raises(DataError, match=r"big.png.*11000 x 10000 pixels.*100-megapixel cap"):
        preprocess_file(png)
    # A DICOM header claiming 20000 x 20000 pixels is refused before its pixel data is read.
    ds = pydicom.dcmread(write_dicom(tmp_path / "ok.dcm", ramp()))
    ds.Rows = ds.Columns = 20000
    ds.save_as(tmp_path / "huge.dcm")
    with pytest.raises(DataError, match=r"huge.dcm.*20000 x 20000 pixels.*100-megapixel cap"):
        read_image(tmp_path / "huge.dcm")


def test_images_too_small_to_be_a_mammogram_are_refused(tmp_path):
    tiny = np.array([[0.0, 1.0], [0.5, 0.25]], np.float32)
    with pytest.raises(DataError, match=r"image: the image is 2 x 2 pixels, too small.*32"):
        preprocess_image(tiny)
    skimage.io.imsave(tmp_path / "tiny.png", (tiny * 255).astype(np.uint8), check_contrast=False)
    with pytest.raises(DataError, match=r"tiny.png: the image is 2 x 2 pixels, too small"):
        preprocess_file(tmp_path / "tiny.png")
    narrow = np.round(breast_phantom((300, 31), centre_y=150, half_height=100, depth=20) * 4095)
    with pytest.raises(DataError, match=r"narrow.dcm: the image is 300 x 31 pixels"):
        preprocess_file(write_dicom(tmp_path / "narrow.dcm", narrow.astype(np.uint16)))
    ok = np.round(breast_phantom((32, 32), centre_y=16, half_height=12, depth=20) * 4095)
    out, _ = preprocess_file(write_dicom(tmp_path / "ok.dcm", ok.astype(np.uint16)))
    assert out.shape == (227, 227)


def test_mass_boxes_drop_outlines_mostly_outside_the_image(caplog):
    from data_pipeline.preprocess import mass_boxes, outline_inside_fraction, outlines_inside

    shape = (100, 80)  # the image spans y in [-0.5, 99.5], x in [-0.5, 79.5]
    inside = np.array([[10.0, 10.0], [29.0, 19.0]])
    half = np.array([[60.0, 10.0], [139.0, 29.0]])  # box y [59.5, 139.5]: 40 of 80 rows inside
    mostly_out = np.array([[70.0, 10.0], [149.0, 29.0]])  # 30 of 80 rows inside
    corner = np.array([[-300.0, -200.0], [-250.0, -100.0], [-260.0, -150.0]])
    assert outline_inside_fraction(inside, shape) == 1.0
    assert outline_inside_fraction(half, shape) == 0.5
    assert outline_inside_fraction(mostly_out, shape) == 0.375
    assert outline_inside_fraction(corner, shape) == 0.0
    assert outline_inside_fraction(np.array([[99.0, 79.0]]), shape) == 1.0  # one pixel
    top = np.array([[-20.0, 10.0], [19.0, 29.0]])  # box y [-20.5, 19.5]: 20 of 40 rows inside
    assert outline_inside_fraction(top, shape) == 0.5
    left = np.array([[10.0, -3.0], [19.0, 0.0]])  # box x [-3.5, 0.5]: 1 of 4 columns inside
    assert outline_inside_fraction(left, shape) == 0.25
    with pytest.raises(ValueError, match="at least one point"):
        outline_inside_fraction(np.zeros((0, 2)), shape)
    g = Geometry(shape, (0, 0, 100, 80), False, (50, 40))
    with caplog.at_level("WARNING"):
        boxes = mass_boxes(g, [inside, half, np.zeros((0, 2)), mostly_out, corner], where="x.dcm")
    np.testing.assert_allclose(boxes, [g.box_from_original(inside), g.box_from_original(half)])
    assert boxes.dtype == np.float32 and boxes.shape == (2, 4)
    # Where clipping would have put them: at the image's edge and corner, marking no lesion.
    np.testing.assert_allclose(g.box_from_original(corner), [0, 0, 0, 0])
    dropped = [r.getMessage() for r in caplog.records if "dropped mass outline" in r.getMessage()]
    assert len(dropped) == 2 and all(m.startswith("x.dcm: ") for m in dropped)
    assert "38%" in dropped[0] and "0%" in dropped[1]
    none = mass_boxes(g, [])
    assert none.shape == (0, 4) and none.dtype == np.float32
    kept = outlines_inside([inside, corner, half], shape, where="y.dcm")
    assert len(kept) == 2 and kept[0] is inside and kept[1] is half


def test_box_from_original_clips_to_the_image_by_hand():
    g = Geometry((100, 80), (0, 0, 100, 80), False, (50, 40))  # scale 1/2: y' = (y + 0.5)/2 - 0.5
    # an outline past the bottom-right corner: its far corner clipped to (h - 1, w - 1)
    np.testing.assert_allclose(
        g.box_from_original([[89.5, 69.5], [130, 100]]), [44.5, 34.5, 49, 39]
    )
    # wholly below, wholly right of the image: both corners clipped onto the edge
    np.testing.assert_allclose(g.box_from_original([[120, 10.5], [130, 20.5]]), [49, 5, 49, 10])
    np.testing.assert_allclose(g.box_from_original([[10.5, 90], [20.5, 99]]), [5, 39, 10, 39])
    # above and left: clipped to 0; one point: a box of no extent
    np.testing.assert_allclose(g.box_from_original([[-9, -9], [-1, -2]]), [0, 0, 0, 0])
    np.testing.assert_allclose(g.box_from_original([[20.5, 30.5]]), [10, 15, 10, 15])
    with pytest.raises(ValueError, match="at least one point"):
        g.box_from_original(np.zeros((0, 2)))


def _identity(values):
    return values


def test_from_values_of_float_images_by_hand(tmp_path):
    from data_pipeline.preprocess import _from_values

    where = tmp_path / "f.tif"
    values = np.array([[0.5, 2.5], [1.0, 4.5]])  # float64 in
    image = _from_values(values, _identity, False, where).image
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image, [[0.0, 0.5], [0.125, 1.0]])
    inverted = _from_values(values, _identity, True, where).image
    np.testing.assert_array_equal(inverted, [[1.0, 0.5], [0.875, 0.0]])
    # float32 rounding takes (hi - lo) * (1 / (hi - lo)) to 1.0000001 here: clipped to 1
    rounding = np.array([[-99.321266, 592.64856], [0.0, 0.0]], np.float32)
    assert _from_values(rounding, _identity, False, where).image.max() == 1.0
    bits = np.array([[True, False], [False, True]])  # a 1-bit image
    np.testing.assert_array_equal(_from_values(bits, _identity, False, where).image, bits)
    with pytest.raises(DataError, match="blank"):
        _from_values(np.full((3, 3), 0.25), _identity, False, where)
    for shape in [(1, 5), (5, 1), (3, 3, 3)]:  # one row or column, or not 2-D
        with pytest.raises(DataError, match=r"f\.tif.*one 2-D grayscale image"):
            _from_values(np.ones(shape), _identity, False, where)


def test_lut_from_normalises_over_the_values_present_and_clips_the_rest(tmp_path):
    from data_pipeline.preprocess import _all_values, _lut_from

    values = _all_values(np.dtype(np.uint8))
    np.testing.assert_array_equal(values, np.arange(256))
    signed = _all_values(np.dtype(np.int16))  # by bit pattern: 0 .. 32767, then -32768 .. -1
    assert signed.size == 65536 and signed[32767] == 32767 and signed[32768] == -32768
    lut = _lut_from(values, lambda v: 2.0 * v, 10, 20, tmp_path / "x.dcm")
    assert lut.dtype == np.float32 and lut.shape == (256,)
    np.testing.assert_allclose(lut[10:21], np.arange(11) / 10)
    assert lut[5] == 0.0 and lut[25] == 1.0 and lut[200] == 1.0  # outside [10, 20]: clipped
    for bad in (lambda v: np.append(v, 0.0), lambda v: np.where(v == 3, np.inf, v)):
        with pytest.raises(DataError, match=r"x\.dcm.*non-finite or misshaped"):
            _lut_from(values, bad, 10, 20, tmp_path / "x.dcm")


def test_points_and_config_checks():
    from data_pipeline.preprocess import _points

    for bad in (3.0, [1.0, 2.0, 3.0], np.zeros((4, 3))):
        with pytest.raises(ValueError, match="points must have shape"):
            _points(bad)
    assert _points([[1, 2]]).dtype == np.float64
    PreprocessConfig(size=(1, 1), mask_size=16)  # the smallest allowed
    for bad in ({"size": (0, 5)}, {"size": (5,)}, {"size": (2, 2, 2)}, {"mask_size": 15}):
        with pytest.raises(ValueError, match="size"):
            PreprocessConfig(**bad)


@pytest.mark.parametrize("side", [40, 134])
@pytest.mark.parametrize("thick", [False, True])
def test_detach_cuts_bridges_thinner_than_its_opening(side, thick):
    from data_pipeline.preprocess import _detach

    # k = max(1, round(0.015 * side)): 1 for 40 pixels, 2 for 134; the opening's square is
    # 2k + 1 wide. A breast at the left edge, a label at the right, a bridge between them of
    # 2k + 1 rows (as thick as the square: not cut) or 2k (cut).
    k = max(1, round(0.015 * side))
    mask = np.zeros((side, side), bool)
    mask[5:36, 0:21] = True  # the breast
    mask[15:26, 30:39] = True  # a label
    mask[19 : 19 + 2 * k + thick, 21:30] = True  # the bridge
    mask[36, 21] = True  # a pixel touching the breast's corner only diagonally
    got = _detach(mask)
    if thick:  # all one component (the corner pixel joins it diagonally)
        np.testing.assert_array_equal(got, mask)
    else:  # cut; the mask within k + 1 pixels of the breast and joined to it is put back:
        expected = mask.copy()  # a stump of k + 1 columns, and the corner pixel
        expected[:, 22 + k :] = False
        np.testing.assert_array_equal(got, expected)
    # a mask thinner than the square everywhere: its largest component as it is
    thin = np.zeros((side, side), bool)
    thin[10, 2:30] = thin[20, 5:9] = True
    line = np.zeros_like(thin)
    line[10, 2:30] = True
    np.testing.assert_array_equal(_detach(thin), line)


@pytest.mark.parametrize("mirrored", [False, True])
def test_chest_wall_side_by_the_outermost_columns_then_by_the_tissue(mirrored):
    from data_pipeline.preprocess import _chest_wall_left

    # 40 x 60, the breast in columns 10..40: full height at column 10, tapering to 5 rows at
    # column 40 (bands of 60 // 20 = 3 columns: covered 0.98 on the left, 0.15 on the right);
    # its tissue is brighter towards the nipple, so the intensity rule alone would say right.
    rows = np.arange(40)[:, None]
    half = np.interp(np.arange(60), [10, 40], [20, 2.5])
    mask = (np.abs(rows + 0.5 - 20) <= half) & (np.arange(60) >= 10) & (np.arange(60) <= 40)
    small = np.where(np.arange(60) >= 30, 5.0, 0.2) * mask
    # an ellipse: the bands are covered alike, and the brighter half decides
    ellipse = ((rows + 0.5 - 20) / 15) ** 2 + ((np.arange(60) + 0.5 - 30) / 20) ** 2 <= 1
    bright_right = np.where(np.arange(60) >= 30, 1.0, 0.5) * ellipse
    if mirrored:
        mask, small, ellipse, bright_right = (
            a[:, ::-1] for a in (mask, small, ellipse, bright_right)
        )
    assert _chest_wall_left(small, mask) is (not mirrored)
    assert _chest_wall_left(bright_right, ellipse) is mirrored


@pytest.mark.parametrize("mirrored", [False, True])
def test_chest_wall_bands_are_the_outermost_twentieth_of_the_width_by_hand(mirrored):
    from data_pipeline.preprocess import _chest_wall_left

    # 32 x 80: bands of 80 // 20 = 4 columns at the mask's first (10) and last (69) columns.
    # Rows covered per column: left band 32, 2, 2, 28 (64 of 128 pixels), right band 16, 2, 7,
    # 7 (32 of 128): they differ by exactly 0.25, which is enough. Moving either band by a
    # column, or narrowing both to 3, brings the difference under 0.25; the tissue's intensity,
    # brighter on the right, would then say right.
    heights = {10: 32, 11: 2, 12: 2, 13: 28, 14: 20, 64: 20, 65: 20, 66: 16, 67: 2, 68: 7, 69: 7}
    mask = np.zeros((32, 80), bool)
    for col in range(10, 70):
        n = heights.get(col, 20)
        mask[16 - n // 2 : 16 - n // 2 + n, col] = True
    small = np.where(np.arange(80) >= 40, 5.0, 0.2) * mask
    if mirrored:
        mask, small = mask[:, ::-1], small[:, ::-1]
    assert _chest_wall_left(small, mask) is (not mirrored)


@pytest.mark.parametrize(
    "column_weights, left",
    [
        # 5 columns: 0-1 the left half, 3-4 the right, the middle one (2) counted on the left:
        # 6 against 2 (without the middle column: 1 against 2; on both sides: 6 against 7)
        ([1, 0, 5, 0, 2], True),
        ([2, 0, 5, 0, 1], True),  # mirrored: 7 against 1, the middle column still on the left
        # 4 columns: 0-1 left, 2-3 right
        ([1, 0, 3, 2], False),  # 1 against 5 (column 2 taken to the left: 4 against 2)
        ([0, 3, 0, 2], True),  # 3 against 2 (column 1 taken to the right: 0 against 5)
        ([1, 1, 1, 1], True),  # a tie: left
    ],
)
def test_chest_wall_by_the_tissue_halves_by_hand(column_weights, left):
    from data_pipeline.preprocess import _chest_wall_left

    # the whole image is breast: the outermost bands are covered alike, the halves decide
    small = np.tile(np.asarray(column_weights, np.float32) / 5, (6, 1))
    mask = np.ones(small.shape, bool)
    assert _chest_wall_left(small, mask) is left


def test_breast_mask_of_an_image_without_contrast_says_blank():
    # a pattern that block means flatten (stripes at the block size) reaches the mask blank
    from data_pipeline.preprocess import _breast_mask

    with pytest.raises(DataError, match=r"x\.png: the image is blank"):
        _breast_mask(np.full((16, 16), 0.3, np.float32), "x.png")


def test_mask_image_is_sampled_at_the_stride_the_mask_size_gives(tmp_path):
    # a 1-pixel checkerboard, 160 x 160: mask_size 16 samples every 10th pixel of every 10th
    # row (ceil(160 / 16)), all of them the same square's colour: no contrast left to threshold
    r, c = np.mgrid[0:160, 0:160]
    skimage.io.imsave(tmp_path / "checker.png", ((r + c) % 2 * 255).astype(np.uint8))
    with pytest.raises(DataError, match=r"checker\.png: the image is blank \(no contrast\)"):
        preprocess_file(tmp_path / "checker.png", PreprocessConfig(mask_size=16))


def test_crop_of_a_breast_spanning_the_full_height_starts_at_row_zero():
    image = breast_phantom((200, 120), centre_y=100, half_height=130, depth=90)
    assert image[0].max() > 0.2 and image[-1].max() > 0.2  # tissue in the first and last rows
    _, geometry = preprocess_image(image, PreprocessConfig(mask_size=64))
    assert geometry.crop[0] == 0 and geometry.crop[2] == 200


def test_dicom_without_a_known_suffix_is_recognised_by_its_header(tmp_path):
    stored = ramp(hi=4000)
    dicom = write_dicom(tmp_path / "a.dcm", stored, bits_stored=12).read_bytes()
    for name in ("IM_0001", "scan.img"):  # no suffix, an unknown one: "DICM" at byte 128
        (tmp_path / name).write_bytes(dicom)
        np.testing.assert_allclose(read_image(tmp_path / name), minmax(stored), atol=1e-6)
    (tmp_path / "other.img").write_bytes(bytes(128) + b"DICX" + dicom[132:])
    (tmp_path / "short").write_bytes(dicom[:131])  # cut before the magic ends
    for name in ("other.img", "short"):
        with pytest.raises(DataError, match=f"{name}: unknown image type"):
            read_image(tmp_path / name)


def test_check_size_caps_pixels_and_frames_by_hand(tmp_path):
    from data_pipeline.preprocess import MAX_PIXELS, _check_pixels, _check_size

    path = tmp_path / "x.dcm"
    for check in (_check_pixels, lambda *a: _check_size(*a, 1, 1)):
        check(path, MAX_PIXELS // 4, 4)  # exactly the cap: allowed
        with pytest.raises(DataError, match="megapixel cap"):
            check(path, MAX_PIXELS // 4 + 1, 4)
    _check_size(path, 10, 10, 4, 1)
    with pytest.raises(DataError, match="5 samples per pixel"):
        _check_size(path, 10, 10, 5, 1)
    with pytest.raises(DataError, match="holds 2 images"):
        _check_size(path, 10, 10, 1, 2)


def test_describe_gives_the_exception_and_its_first_line():
    from data_pipeline.preprocess import _describe

    assert _describe(ValueError("  bad header\n  more detail")) == "ValueError: bad header"
    assert _describe(ValueError("size 4 x 4 X")) == "ValueError: size 4 x 4 X"
    assert _describe(OSError()) == "OSError"
    # pydicom's "... raised by all available plugins:" is followed by each plugin's reason
    many = RuntimeError("all available plugins:\n  rle: cut short\n  other: bad")
    assert _describe(many) == "RuntimeError: all available plugins: rle: cut short"


def test_codestream_shape_walks_jpeg_segments_by_hand():
    from data_pipeline.preprocess import _codestream_shape

    sof = b"\xff\xc0\x00\x0b\x08\x01\x23\x04\x56"  # SOF0: length, precision, 291 x 1110
    app = b"\xff\xe0\x00\x04ab"  # a 4-byte APP0 segment to skip
    assert _codestream_shape(b"\xff\xd8" + app + b"\xff" + sof + b"\x01\x00") == (291, 1110)
    # the start of frame's size fields end the data exactly: still read
    assert _codestream_shape(b"\xff\xd8" + app + sof) == (291, 1110)
    # no start of frame before the data ends: None, not an IndexError
    assert _codestream_shape(b"\xff\xd8" + app) is None
    assert _codestream_shape(b"\xff\xd8" + app + sof[:8]) is None
    # JPEG 2000: SIZ's Xsiz, Ysiz, XOsiz, YOsiz (big-endian 32 bit) after SOC, SIZ, Lsiz, Rsiz
    siz = b"\xff\x4f\xff\x51\x00\x29\x00\x00" + b"".join(
        v.to_bytes(4, "big") for v in (1300, 700, 100, 50)
    )
    assert _codestream_shape(b"jP  " + siz) == (650, 1200)
    assert _codestream_shape(b"\x00" * 40) is None
    # a segment longer than 255 bytes is skipped whole (its length is two bytes)
    long_app = b"\xff\xe1\x01\x04" + bytes(258)
    assert _codestream_shape(b"\xff\xd8" + long_app + sof) == (291, 1110)
    # JPEG 2000: the first SIZ within the first 4 KB; one found later (in the data) is not a header
    other = b"\xff\x4f\xff\x51" + bytes(4) + bytes(16)
    assert _codestream_shape(b"jP  " + siz + other) == (650, 1200)
    assert _codestream_shape(bytes(4089) + siz) == (650, 1200)  # SOC at 4089: ends at 4093
    assert _codestream_shape(bytes(4093) + siz) is None
    assert _codestream_shape(b"jP  " + siz[:23]) is None  # SIZ cut short
    # the sizes and lengths are unsigned: 16 bits for JPEG, 32 for JPEG 2000
    big_sof = b"\xff\xc0\x00\x0b\x08" + (40000).to_bytes(2, "big") + (50000).to_bytes(2, "big")
    assert _codestream_shape(b"\xff\xd8" + app + big_sof) == (40000, 50000)
    huge_app = b"\xff\xe1\x90\x00" + bytes(0x9000 - 2)  # 36864 bytes
    assert _codestream_shape(b"\xff\xd8" + huge_app + sof) == (291, 1110)
    huge_siz = siz[:8] + b"".join(v.to_bytes(4, "big") for v in (3_000_000_000, 700, 0, 50))
    assert _codestream_shape(huge_siz) == (650, 3_000_000_000)


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
def test_cli_errors_are_one_line_naming_the_file_or_flag(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    cases = [
        ([f"--input={tmp_path / 'missing.dcm'}"], "missing.dcm: no such file"),
        ([f"--input={tmp_path / 'notes.txt'}"], "notes.txt: unknown image type"),
        ([f"--input={tmp_path / 'missing.dcm'}", "--size=0"], "--size=0"),
    ]
    for args, expected in cases:
        proc = run_module("data_pipeline.preprocess", *args)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    image = np.round(breast_phantom((120, 96), centre_y=60, half_height=45, depth=60) * 4095)
    dcm = write_dicom(tmp_path / "ok.dcm", image.astype(np.uint16))
    out = tmp_path / "o.png"
    proc = run_module("data_pipeline.preprocess", f"--input={dcm}", f"--output={out}", "--size=64")
    assert proc.returncode == 0, proc.stderr
    # the 16-bit PNG holds preprocess_file's image, [0, 1] scaled to [0, 65535] and rounded
    expected, _ = preprocess_file(dcm, PreprocessConfig(size=(64, 64)))
    written = skimage.io.imread(out)
    assert written.dtype == np.uint16 and written.shape == (64, 64)
    np.testing.assert_array_equal(written, np.round(expected.astype(np.float64) * 65535))


# ---------------------------------------------------------------------------------------------
# Property-based tests of the readers: any bytes, any header value -> an image or a DataError.

fuzz = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def assert_image_or_data_error(path: Path) -> None:
    """read_image and preprocess_file either work or raise a DataError naming the file."""
    for read in (read_image, lambda p: preprocess_file(p, PreprocessConfig(size=(32, 32)))[0]):
        try:
            image = read(path)
        except DataError as e:
            assert path.name in str(e)
            continue
        assert image.ndim == 2 and image.dtype == np.float32
        assert np.all(np.isfinite(image)) and image.min() >= 0 and image.max() <= 1


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@fuzz
@given(
    suffix=st.sampled_from([".png", ".tif", ".tiff", ".pgm", ".ppm", ".jpg"]),
    prefix=st.sampled_from(
        [b"", b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*", b"II+\x00", b"P5\n", b"P6 3 2 65535\n"]
        + [b"P5 40 40 255\n", b"\xff\xd8\xff\xe0"]
    ),
    data=st.binary(max_size=300),
)
def test_fuzz_raster_reader_random_bytes(tmp_path, suffix, prefix, data):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(prefix + data)
    assert_image_or_data_error(path)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@fuzz
@given(
    shape=st.tuples(st.integers(1, 70), st.integers(1, 70)),
    extra=st.sampled_from([(), (1,), (2,), (3,), (4,), (5,)]),
    pages=st.integers(1, 2),
    dtype=st.sampled_from("uint8 uint16 int16 int32 uint32 float32 float64 bool complex64".split()),
    special=st.sampled_from([None, np.nan, np.inf, -np.inf, 0]),
    compression=st.sampled_from([None, "zlib"]),
    cut=st.integers(0, 400),
    seed=st.integers(0, 2**16),
)
def test_fuzz_tiff_header_values(
    tmp_path, shape, extra, pages, dtype, special, compression, cut, seed
):

    rng = np.random.default_rng(seed)
    full = (pages, *shape, *extra) if pages > 1 else (*shape, *extra)
    values = rng.uniform(-1000, 70000, full)
    if special is not None:
        values.flat[rng.integers(values.size)] = special
    with np.errstate(all="ignore"):
        array = values.astype(dtype)
    path = tmp_path / "fuzz.tif"
    try:
        tifffile.imwrite(path, array, compression=compression)
    except Exception:  # a combination tifffile will not write
        return
    data = path.read_bytes()
    if cut:
        path.write_bytes(data[: max(8, len(data) - cut)])
    assert_image_or_data_error(path)


@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz
@given(
    shape=st.tuples(st.integers(1, 70), st.integers(1, 70)),
    mode=st.sampled_from(["L", "I;16", "I", "F", "RGB", "RGBA", "LA", "P", "1"]),
    declared=st.one_of(st.none(), st.tuples(st.integers(0, 2**31), st.integers(0, 2**31))),
    cut=st.integers(0, 200),
    seed=st.integers(0, 2**16),
)
def test_fuzz_png_header_values(tmp_path, shape, mode, declared, cut, seed):
    import struct
    import zlib

    import PIL.Image

    rng = np.random.default_rng(seed)
    values = rng.integers(0, 256, (shape[1], shape[0], 4), dtype=np.uint8).tobytes()
    image = PIL.Image.frombytes("RGBA", shape, values).convert(mode if mode != "I;16" else "I")
    if mode == "I;16":
        image = image.convert("I;16")
    path = tmp_path / "fuzz.png"
    try:
        image.save(path)
    except Exception:  # a mode PNG cannot hold
        return
    data = bytearray(path.read_bytes())
    if declared is not None:  # another width and height in IHDR, with a valid CRC
        data[16:24] = struct.pack(">II", *declared)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data[: max(8, len(data) - cut)]))
    assert_image_or_data_error(path)


DICOM_INT_FIELDS = (
    "Rows Columns BitsAllocated BitsStored HighBit PixelRepresentation SamplesPerPixel "
    "NumberOfFrames PlanarConfiguration"
).split()
DICOM_TEXT_FIELDS = {
    "PhotometricInterpretation": "CS",
    "VOILUTFunction": "CS",
    "RescaleSlope": "DS",
    "RescaleIntercept": "DS",
    "WindowCenter": "DS",
    "WindowWidth": "DS",
}
DICOM_TEXT_VALUES = [
    "MONOCHROME1", "RGB", "PALETTE COLOR", "0", "-1", "1e300", "nan", "inf", "-5", "SIGMOID",
    "LINEAR_EXACT", "", "x", "2\\3",
]  # fmt: skip


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@fuzz
@given(
    fields=st.dictionaries(
        st.sampled_from(DICOM_INT_FIELDS),
        st.integers(0, 70000),
        max_size=4,
    ),
    texts=st.dictionaries(
        st.sampled_from(sorted(DICOM_TEXT_FIELDS)),
        st.sampled_from(DICOM_TEXT_VALUES),
        max_size=3,
    ),
)
def test_fuzz_dicom_header_values(tmp_path, fields, texts):
    image = np.round(breast_phantom((48, 40), centre_y=24, half_height=18, depth=26) * 4095)
    ds = pydicom.dcmread(write_dicom(tmp_path / "ok.dcm", image.astype(np.uint16)))
    for key, value in fields.items():
        setattr(ds, key, value)
    path = tmp_path / "fuzz.dcm"
    try:
        for key, value in texts.items():
            ds.add_new(key, DICOM_TEXT_FIELDS[key], value)
        ds.save_as(path)
    except Exception:  # a value pydicom will not write; the raw-byte fuzz covers damaged files
        return
    assert_image_or_data_error(path)


def test_clean_phantom_equals_an_independent_resize_of_its_crop():
    """On a breast phantom with an exactly zero background, masking must change nothing: the
    output is the anti-aliased resize of the raw crop. The mask is computed on every 2nd pixel
    (1000 > mask_size 512), so without its dilation the breast's edge pixels between two mask
    samples would be zeroed (about 640 output pixels change by up to 0.49)."""
    import skimage.transform

    H, W = 1000, 800
    y, x = np.mgrid[0:H, 0:W]
    cy, a, b = 500.0, 205.3, 402.7  # a half-ellipse on the left (chest-wall) edge
    inside = ((y - cy) / a) ** 2 + (x / b) ** 2 <= 1.0
    tissue = 0.45 + 0.4 * np.exp(-((y - cy) ** 2 + (x - 150) ** 2) / (2 * 120.0**2))
    phantom = np.where(inside, tissue, 0.0)
    out, geometry = preprocess_image(phantom.astype(np.float32))
    assert not geometry.flipped and geometry.size == (227, 227)
    # The crop is the breast's bounding box, known to within the mask's stride of 2 pixels.
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    box = np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1])
    y0, x0, y1, x1 = geometry.crop
    assert np.all(np.abs(np.array(geometry.crop) - box) < 2) and y0 <= box[0] and x0 <= box[1]
    assert y1 >= box[2] and x1 >= box[3]
    # Below 2 x 227 pixels per side there is no block averaging: one resize of the raw pixels.
    # Same pixels, same linear filter: only float32 against float64 rounding differs (~1e-7).
    reference = skimage.transform.resize(
        phantom[y0:y1, x0:x1],
        (227, 227),
        order=1,
        mode="edge",
        anti_aliasing=True,
        preserve_range=True,
    )
    np.testing.assert_allclose(out, reference, rtol=0, atol=1e-5)


def test_large_phantom_is_block_averaged_to_twice_the_output_then_resized():
    """Over 2 x 227 pixels a side, the crop is first averaged in fy x fx blocks, fy = its height
    // (2 x 227) (fx likewise), then resized: the same as block_reduce and one resize. A
    right-facing breast (x0 > 0), flipped."""
    import skimage.transform

    H, W = 2000, 1600
    y, x = np.mgrid[0:H, 0:W]
    inside = ((y - 1000.0) / 800.3) ** 2 + ((W - 1 - x) / 1000.7) ** 2 <= 1.0
    phantom = np.where(inside, 0.5 + 0.1 * np.sin(y / 97.0) * np.cos(x / 61.0), 0.0)
    out, geometry = preprocess_image(phantom.astype(np.float32))
    y0, x0, y1, x1 = geometry.crop
    assert geometry.flipped and x0 > 500 and geometry.original_shape == (2000, 1600)
    fy, fx = (y1 - y0) // 454, (x1 - x0) // 454
    assert (fy, fx) == (3, 2) and (y1 - y0) % fy == 0 and (x1 - x0) % fx == 0
    blocks = skimage.measure.block_reduce(phantom[y0:y1, x0:x1], (fy, fx), np.mean)
    reference = skimage.transform.resize(
        blocks, (227, 227), order=1, mode="edge", anti_aliasing=True, preserve_range=True
    )
    np.testing.assert_allclose(out, reference[:, ::-1], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Film-robust masking: its guards leave digital mammograms alone (film cases: test_synthetic_film).


def test_saturated_pectoral_muscle_is_not_taken_for_a_film_edge():
    """A window that clips the pectoral muscle to the maximum makes chest-wall columns bright and
    flat over 85% of their length; only lines bright over 90% are film edges, so the crop still
    starts at the chest wall and the muscle is kept."""
    image = breast_phantom((600, 480), centre_y=300, half_height=290, depth=300, tissue=0.45)
    image[20:530, :40] = 1.0  # 85% of each of the first 40 columns
    out, g = preprocess_image(image.astype(np.float32))
    assert g.crop[1] == 0 and not g.flipped
    py, px = np.round(g.from_original(np.array([300.0, 20.0]))).astype(int)
    assert out[py, px] > 0.99


def test_a_saturated_breast_is_not_taken_for_a_bright_plateau():
    """Otsu's upper class at the maximum is a film-edge plateau only when it is under a quarter of
    the image: a breast clipped to white by its window (40% of the image) keeps Otsu's threshold,
    and noise in the background never joins it."""
    rng = np.random.default_rng(0)
    image = rng.uniform(0.0, 0.05, (600, 480))
    breast = breast_phantom((600, 480), centre_y=300, half_height=200, depth=300) > 0
    image[breast] = 1.0
    _, g = preprocess_image(image.astype(np.float32))
    rows, cols = np.flatnonzero(breast.any(1)), np.flatnonzero(breast.any(0))
    expected = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
    assert np.abs(np.array(g.crop) - expected).max() <= 2, (g.crop, expected)
