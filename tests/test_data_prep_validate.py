"""data_prep.validate: passthrough keeps bytes, conversions keep the picture, bad input -> reasons."""
import io

import numpy as np
from PIL import Image

from data_prep.validate import EncodeOptions, parse_jpeg_header, process_image
from tests.fixtures_images import awkward_files, exif_rotated_jpeg, gray_photo, jpeg_bytes, photos, tiff_bytes

PASS = EncodeOptions()


def decoded(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG" and im.mode == "RGB"
    return np.asarray(im, dtype=np.float64)


def test_passthrough_keeps_original_bytes():
    img = photos(1, (120, 90))[0]
    for kw in ({}, {"progressive": True}, {"quality": 60, "subsampling": 0}):
        data = jpeg_bytes(img, **kw)
        assert process_image(data, PASS) == (data, None)
    hdr = parse_jpeg_header(jpeg_bytes(img))
    assert (hdr.width, hdr.height, hdr.components, hdr.orientation, hdr.complete) == (120, 90, 3, 1, True)


def test_conversions_preserve_content():
    files = awkward_files()
    a, b, c, _, _ = photos(5, (64, 48), 1)
    gray_ref = np.asarray(b.convert("L"), dtype=np.float64)
    for name in ("deep16.png", "gray.jpg"):
        out, reason = process_image(files[name][0], PASS)
        assert reason is None
        assert abs(decoded(out)[..., 0].mean() - gray_ref.mean()) < 2.0, name
    out, _ = process_image(files["cmyk.jpg"][0], PASS)
    assert np.abs(decoded(out) - np.asarray(a, dtype=np.float64)).mean() < 12
    out, _ = process_image(files["png_named.JPEG"][0], PASS)
    assert np.abs(decoded(out) - np.asarray(b, dtype=np.float64)).mean() < 6


def test_exif_rotation_applied():
    img = photos(1, (64, 48), 2)[0]
    data = exif_rotated_jpeg(img, 6)
    assert parse_jpeg_header(data).orientation == 6
    out, reason = process_image(data, PASS)
    assert reason is None and out != data
    arr = decoded(out)
    assert arr.shape == (64, 48, 3)
    upright = np.asarray(img.transpose(Image.Transpose.ROTATE_270), dtype=np.float64)
    assert np.abs(arr - upright).mean() < 6


def test_rejects_have_reasons():
    for name, (data, outcome) in awkward_files().items():
        out, reason = process_image(data, PASS)
        if outcome == "ok":
            assert reason is None and out, name
        else:
            assert out is None and outcome in reason, (name, reason)
    _, reason = process_image(awkward_files()["bomb.png"][0], EncodeOptions(max_side=64))
    assert "decompression bomb" in reason


def test_reencode_bounds_longer_side():
    data = jpeg_bytes(photos(1, (300, 200))[0])
    out, _ = process_image(data, EncodeOptions(max_side=150, quality=80))
    assert decoded(out).shape == (100, 150, 3)
    small = jpeg_bytes(photos(1, (100, 50))[0])
    out, _ = process_image(small, EncodeOptions(max_side=150))
    assert decoded(out).shape == (50, 100, 3)


def test_truncated_scan_rejected_and_trailer_tolerated():
    data = jpeg_bytes(photos(1, (400, 300), 4)[0], quality=95)
    out, reason = process_image(data[: int(len(data) * 0.7)], PASS)
    assert out is None and "truncated" in reason
    trailer = data + b"SEFT" + bytes(range(256)) * 40  # vendor data after EOI, beyond the tail window
    out, reason = process_image(trailer, PASS)
    assert reason is None and np.abs(decoded(out) - decoded(data)).mean() < 3


def test_float_and_deep_integer_tiffs_keep_their_brightness_or_are_rejected():
    """A float TIFF of 0..1 values came out black (clipped to 0..255, then truncated to 0 and 1), and a
    32-bit integer one came out clipped white. Known scales are converted, unknown ones rejected."""
    ref = gray_photo()
    for what, arr in (("float 0..1", (ref / 255).astype(np.float32)), ("float 0..255", ref.astype(np.float32)),
                      ("16-bit", (ref * 257).astype(np.uint16)), ("16-bit in 32", (ref * 257).astype(np.int32))):
        data = tiff_bytes(arr)
        assert Image.open(io.BytesIO(data)).mode in ("F", "I;16", "I"), what
        out, reason = process_image(data, PASS)
        assert reason is None, (what, reason)
        assert np.abs(decoded(out)[..., 0] - ref).mean() < 2.0, what
    for what, arr, fragment in (
            ("float -1..1", (ref / 127.5 - 1).astype(np.float32), "float pixel values -0.9"),
            ("32-bit", (ref * 2**23).astype(np.int32), "32-bit integer pixel values 0..1.7e+09"),
            ("NaN", np.where(ref > 128, np.nan, ref / 255).astype(np.float32), "NaN")):
        out, reason = process_image(tiff_bytes(arr), PASS)
        assert out is None and fragment in reason and "no known 8-bit scale" in reason, (what, reason)


def test_verify_refuses_a_negative_decode_count_and_no_workers(tmp_path, capsys):
    from data_prep.cli import main as prep_main

    assert prep_main(["verify", str(tmp_path), "--decode", "-1"]) == 2
    assert "--decode -1: must be at least 0" in capsys.readouterr().err
    assert prep_main(["verify", str(tmp_path), "--workers", "0"]) == 2
    assert "--workers 0: must be at least 1" in capsys.readouterr().err
