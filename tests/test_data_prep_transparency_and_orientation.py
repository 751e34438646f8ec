"""data_prep: a PNG's transparent colour key (tRNS) comes out white, and an EXIF Orientation stored as LONG (or
any other numeric type, either byte order) is applied in passthrough as in --max-side, as PIL applies it.

Inputs are real photos (scikit-learn's samples) run through ``python -m data_prep imagefolder``."""
from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from data_prep.cli import main
from data_prep.format import load_manifest
from data_prep.validate import EncodeOptions, parse_jpeg_header, process_image
from tests.fixtures_images import gray_photo, jpeg_bytes, photos
from tests.test_data_prep_imagefolder import samples_of

KEY_RGB = (10, 20, 30)
BLOCK = (slice(16, 32), slice(16, 32))  # the transparent square: whole 16x16 JPEG MCUs, off the edges


def prepare(root: Path, out: Path, *extra: str) -> dict[str, np.ndarray]:
    """Run imagefolder on `root` (one image per class); {class: decoded stored RGB pixels}."""
    assert main(["imagefolder", str(root), str(out), "--split", "train", "--workers", "1", "--no-progress",
                 *extra]) == 0
    m = load_manifest(out)
    assert m["splits"]["train"]["rejected"] == 0
    got = {}
    for s in samples_of(out, "train"):
        im = Image.open(io.BytesIO(s["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB"
        got[m["classes"][int(s["cls"])]] = np.asarray(im, dtype=np.float64)
    return got


def as_jpeg(want: np.ndarray) -> np.ndarray:
    """The expected picture after data_prep's JPEG encode (quality 90), decoded."""
    return np.asarray(Image.open(io.BytesIO(jpeg_bytes(Image.fromarray(want), quality=90))), dtype=np.float64)


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).mkdir(parents=True)
        (root / name / f"{name}.img").write_bytes(data)


# ---- PNG colour keys ------------------------------------------------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def raw_png(rows: list[bytes], width: int, depth: int, color_type: int, trns: bytes) -> bytes:
    """A PNG PIL cannot write (4-bit gray, 16-bit RGB) with a tRNS chunk, from already packed rows."""
    ihdr = struct.pack(">IIBBBBB", width, len(rows), depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\x00" + r for r in rows))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"tRNS", trns) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def keyed_inputs() -> dict[str, tuple[bytes, np.ndarray]]:
    """{name: (PNG bytes, the picture expected: the photo with the keyed square white)}; every PNG has a tRNS
    colour key hiding a square of the photo behind a colour no other pixel has."""
    rgb = np.asarray(photos(1, (64, 48), 3)[0]).copy()
    rgb[np.all(rgb == KEY_RGB, axis=-1)] = (11, 20, 30)
    rgb[BLOCK] = KEY_RGB
    rgb_white = rgb.copy()
    rgb_white[BLOCK] = 255
    gray = gray_photo("china.jpg", (64, 48)).astype(np.uint8)
    gray[gray == 7] = 8
    gray[BLOCK] = 7
    gray_white = gray.copy()
    gray_white[BLOCK] = 255
    g16 = gray_photo("flower.jpg", (64, 48)).astype(np.uint16) * 256 + 100  # 16-bit values, not multiples of 257
    g16[g16 == 1234] = 1235
    g16[BLOCK] = 1234
    g16_white = np.round(g16 * (255 / 65535)).astype(np.uint8)
    g16_white[BLOCK] = 255
    pal = photos(1, (64, 48), 4)[0].quantize(colors=255)  # indices 0..254: 255 is the transparent one
    pal_img = pal.copy()
    pal_img.paste(255, (16, 16, 32, 32))  # BLOCK
    pal_img.putpalette(pal.getpalette()[: 255 * 3] + list(KEY_RGB))
    pal_white = np.asarray(pal_img.convert("RGB")).copy()
    pal_white[BLOCK] = 255
    g4 = (gray_photo("flower.jpg", (64, 48)) / 17).round().astype(np.uint8)  # 4-bit gray, key 3 (PIL shows 51)
    g4[g4 == 3] = 4
    g4[BLOCK] = 3
    g4_white = g4 * 17
    g4_white[BLOCK] = 255
    g4_rows = [bytes((row[0::2] << 4) | row[1::2]) for row in g4]
    rgb16 = (rgb.astype(np.uint16) * 257).astype(">u2")
    rgb16_rows = [row.tobytes() for row in rgb16]
    return {
        "rgb_key": (png(Image.fromarray(rgb), transparency=KEY_RGB), rgb_white),
        "gray_key": (png(Image.fromarray(gray), transparency=7), np.stack([gray_white] * 3, -1)),
        "gray16_key": (png(Image.fromarray(g16), transparency=1234), np.stack([g16_white] * 3, -1)),
        "palette_key": (png(pal_img, transparency=255), pal_white),
        "gray4_key": (raw_png(g4_rows, 64, 4, 0, struct.pack(">H", 3)), np.stack([g4_white] * 3, -1)),
        "rgb48_key": (raw_png(rgb16_rows, 64, 16, 2, struct.pack(">3H", *(v * 257 for v in KEY_RGB))), rgb_white),
    }


def test_keyed_png_inputs_are_what_the_test_means():
    modes = {name: Image.open(io.BytesIO(data)) for name, (data, _) in keyed_inputs().items()}
    assert {n: im.mode for n, im in modes.items()} == {"rgb_key": "RGB", "gray_key": "L", "gray16_key": "I;16",
                                                       "palette_key": "P", "gray4_key": "L", "rgb48_key": "RGB"}
    assert all("transparency" in im.info for im in modes.values())


@pytest.mark.parametrize("extra", [(), ("--max-side", "1000")], ids=["passthrough", "max-side"])
def test_colour_key_transparency_is_composited_on_white(tmp_path, extra):
    inputs = keyed_inputs()
    write_tree(tmp_path / "src", {name: data for name, (data, _) in inputs.items()})
    got = prepare(tmp_path / "src", tmp_path / "out", *extra)
    assert sorted(got) == sorted(inputs)
    for name, (_, want) in inputs.items():
        arr = got[name]
        assert arr.shape == (48, 64, 3), name
        inner = arr[18:30, 18:30]  # the keyed square, away from the JPEG blur at its edges
        assert inner.min() > 235 and inner.mean() > 250, (name, inner.mean())
        assert np.abs(arr - as_jpeg(want)).mean() < 1, name  # everything else: the picture PIL decodes


def test_colour_key_unit_process_image_matches_compositing():
    """The same through process_image alone, and the keyed pixels are white, not the hidden colour."""
    for name, (data, want) in keyed_inputs().items():
        out, reason = process_image(data, EncodeOptions())
        assert reason is None, name
        arr = np.asarray(Image.open(io.BytesIO(out)), dtype=np.float64)
        assert arr[18:30, 18:30].mean() > 250 and np.abs(arr - as_jpeg(want)).mean() < 1, name


# ---- EXIF Orientation tag types -------------------------------------------------------------------------

SHORT, LONG, SBYTE, SSHORT, SLONG, BYTE, UNDEFINED = 3, 4, 6, 8, 9, 1, 7


def exif_jpeg(img: Image.Image, order: bytes, typ: int, count: int = 1, value: int = 6) -> bytes:
    """`img` as a JPEG whose APP1 Exif IFD0 holds one Orientation entry of type `typ` in byte order `order`."""
    e = "<" if order == b"II" else ">"
    if typ in (SHORT, SSHORT):
        field = struct.pack(e + "HH", value, 0)
    elif typ in (LONG, SLONG):
        field = struct.pack(e + "I", value)
    else:
        field = bytes([value, 0, 0, 0])
    ifd = struct.pack(e + "H", 1) + struct.pack(e + "HHI", 0x0112, typ, count) + field + struct.pack(e + "I", 0)
    app1 = b"Exif\x00\x00" + order + struct.pack(e + "HI", 42, 8) + ifd
    data = jpeg_bytes(img, quality=90)
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


@pytest.mark.parametrize("order", [b"II", b"MM"], ids=["little-endian", "big-endian"])
def test_long_orientation_is_read_in_both_byte_orders(order):
    img = photos(1, (64, 48), 5)[0]
    for typ in (SHORT, LONG, SSHORT, SLONG, SBYTE):
        assert parse_jpeg_header(exif_jpeg(img, order, typ)).orientation == 6, typ
    assert parse_jpeg_header(exif_jpeg(img, order, LONG, value=1)).orientation == 1


@pytest.mark.parametrize("order", [b"II", b"MM"], ids=["little-endian", "big-endian"])
def test_long_orientation_stored_upright_in_passthrough_and_max_side(tmp_path, order):
    img = photos(1, (64, 48), 5)[0]
    upright = np.asarray(img.transpose(Image.Transpose.ROTATE_270), dtype=np.float64)
    write_tree(tmp_path / "src", {"long6": exif_jpeg(img, order, LONG), "short6": exif_jpeg(img, order, SHORT)})
    passthrough = prepare(tmp_path / "src", tmp_path / "out")
    resized = prepare(tmp_path / "src", tmp_path / "out2", "--max-side", "1000")
    for got in (passthrough, resized):
        for name in ("long6", "short6"):
            assert got[name].shape == (64, 48, 3), name  # rotated: width and height swapped
            assert np.abs(got[name] - upright).mean() < 6, name
    assert np.abs(passthrough["long6"] - resized["long6"]).mean() < 1


def test_passthrough_rotates_exactly_when_pil_does():
    """Whatever the tag's type or count, a file kept as is must be one PIL's exif_transpose leaves alone."""
    img = photos(1, (64, 48), 6)[0]
    for order in (b"II", b"MM"):
        for typ in (SHORT, LONG, SBYTE, SSHORT, SLONG, BYTE, UNDEFINED):
            for count in (0, 1, 2):
                data = exif_jpeg(img, order, typ, count)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # PIL: "tag 274 had too many entries" for count 2
                    pil_size = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size
                    out, reason = process_image(data, EncodeOptions())
                assert reason is None
                assert Image.open(io.BytesIO(out)).size == pil_size, (order, typ, count)


def xmp_jpeg(img: Image.Image, xmp: bytes, exif_order: bytes | None = None, exif_value: int = 1) -> bytes:
    """`img` as a JPEG with an APP1 XMP packet (and, with `exif_order`, an Exif Orientation before it)."""
    data = jpeg_bytes(img, quality=90)
    app1 = b"http://ns.adobe.com/xap/1.0/\x00" + xmp
    segments = b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1
    if exif_order is not None:
        exif = exif_jpeg(img, exif_order, SHORT, value=exif_value)
        length = struct.unpack(">H", exif[4:6])[0]
        segments = exif[2:4 + length] + segments
    return data[:2] + segments + data[2:]


def test_an_xmp_orientation_rotates_where_exif_has_none_as_pil_does():
    """PIL applies XMP's ``tiff:Orientation`` where EXIF has no Orientation tag: such a JPEG was kept sideways in
    passthrough and turned upright with ``--max-side``. An EXIF tag, 1 included, wins over XMP (as in PIL)."""
    img = photos(1, (64, 48), 7)[0]
    attr = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    elem = b"<x:xmpmeta><rdf:Description><tiff:Orientation>8</tiff:Orientation></rdf:Description></x:xmpmeta>"
    cases = [xmp_jpeg(img, attr), xmp_jpeg(img, elem), xmp_jpeg(img, attr, b"II", 1), xmp_jpeg(img, attr, b"MM", 3),
             xmp_jpeg(img, b"<x:xmpmeta/>")]
    for data in cases:
        pil_size = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size
        out, reason = process_image(data, EncodeOptions())
        assert reason is None
        assert Image.open(io.BytesIO(out)).size == pil_size
    assert [parse_jpeg_header(d).orientation for d in cases] == [6, 8, 1, 3, 1]
    assert [Image.open(io.BytesIO(process_image(d, EncodeOptions())[0])).size for d in cases[:2]] == [(48, 64)] * 2
