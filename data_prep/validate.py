"""Turn the bytes of one input file into RGB JPEG bytes, or a reason to reject it.

Passthrough keeps the original bytes of a plain 8-bit YCbCr baseline/progressive JPEG after a cheap
structural check (markers up to SOS, an EOI at the end, sane size, no EXIF rotation) without decoding.
Everything else (CMYK, grayscale, PNG, EXIF-rotated, ...) is decoded with PIL and re-encoded upright.
"""
from __future__ import annotations

import io
import math
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .jpeg_markers import EOI, EOI_BYTES, SOF_MARKERS, SOS, BrokenMarkerStructure, marker_segments

# SOF markers PIL/libjpeg-turbo/DALI decode: baseline, extended sequential, progressive (Huffman).
_PASS_SOF = {0xC0, 0xC1, 0xC2}


@dataclass(frozen=True)
class EncodeOptions:
    """How images are written: passthrough when `max_side` is None, else FFCV-style re-encode."""

    max_side: int | None = None
    quality: int = 90


@dataclass
class JpegHeader:
    """What the marker walk learned about a JPEG."""

    sof: int
    precision: int
    width: int
    height: int
    components: int
    orientation: int
    complete: bool  # an EOI marker follows the entropy-coded data


# Orientation value types read from the 4-byte inline field: type -> (struct code, size). PIL honours any
# numeric type (SHORT is the standard one, LONG is common in the wild); BYTE/ASCII/UNDEFINED come back as
# bytes or text, which ImageOps.exif_transpose ignores.
_ORIENT_INLINE = {3: ("H", 2), 4: ("I", 4), 6: ("B", 1), 8: ("H", 2), 9: ("I", 4)}
_ORIENT_IGNORED = {1, 2, 7}


def _exif_orientation(seg: bytes) -> int | None:
    """Orientation tag (0x0112) from an APP1 Exif payload; None when absent or unreadable (PIL then reads the
    XMP packet's ``tiff:Orientation``), 1 for a tag PIL ignores.

    0 when the tag is there but not a plain inline integer (count 0, a value stored elsewhere, a rational or
    float...): anything but 1 sends the file to the full decode, where PIL's exif_transpose decides.
    """
    if not seg.startswith(b"Exif\x00\x00") or len(seg) < 14:
        return None
    tiff = seg[6:]
    order = tiff[:2]
    if order == b"II":
        e = "<"
    elif order == b"MM":
        e = ">"
    else:
        return None
    try:
        (ifd,) = struct.unpack(e + "I", tiff[4:8])
        (n,) = struct.unpack(e + "H", tiff[ifd : ifd + 2])
        for i in range(n):
            ent = tiff[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            tag, typ, cnt = struct.unpack(e + "HHI", ent[:8])
            if tag != 0x0112:
                continue
            if typ in _ORIENT_IGNORED:
                return 1
            fmt = _ORIENT_INLINE.get(typ)
            if fmt is None or cnt < 1 or cnt * fmt[1] > 4:
                return 0
            return struct.unpack(e + fmt[0], ent[8 : 8 + fmt[1]])[0]  # inline values are left-justified
    except struct.error:
        return None
    return None


XMP_ID = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # PIL's own pattern (Image.getexif)


def _xmp_orientation(seg: bytes) -> int | None:
    """``tiff:Orientation`` of an APP1 XMP packet, which PIL's exif_transpose applies where EXIF has no
    Orientation tag: a JPEG rotated by its XMP alone was kept sideways in passthrough (and turned upright
    with ``--max-side``)."""
    match = _XMP_ORIENTATION.search(seg)
    return int(match[2]) if match else None


def parse_jpeg_header(data: bytes) -> JpegHeader | str:
    """Walk JPEG markers up to SOS; a reject reason when the structure is broken before the scan.

    Stricter than the loaders' ``jpeg_size`` (segment lengths checked, walks on past the frame header to the
    scan for the EXIF orientation), but ``complete`` only looks for the EOI in the last 4 KiB: a JPEG
    without it there is decoded in full rather than rejected.
    """
    n = len(data)
    sof = None
    exif: int | None = None  # the first Exif segment's Orientation (PIL reads the first)
    xmp: int | None = None
    exif_seen = False
    try:
        for pos, marker, length in marker_segments(data):
            if length < 2:
                return "corrupt JPEG: bad segment length"
            if pos + 2 + length > n:
                return "truncated JPEG: file ends inside the header"
            seg = data[pos + 4 : pos + 2 + length]
            if marker in SOF_MARKERS:
                if len(seg) < 6:
                    return "corrupt JPEG: short frame header"
                precision, height, width, comps = struct.unpack(">BHHB", seg[:6])
                sof = (marker, precision, width, height, comps)
            elif marker == 0xE1 and seg.startswith(b"Exif\x00\x00") and not exif_seen:
                exif_seen, exif = True, _exif_orientation(seg)
            elif marker == 0xE1 and seg.startswith(XMP_ID) and xmp is None:
                xmp = _xmp_orientation(seg[len(XMP_ID):])
            elif marker == SOS:
                if sof is None:
                    return "corrupt JPEG: scan before frame header"
                tail_start = max(pos, n - 4096)
                complete = data.rfind(EOI_BYTES, tail_start) >= 0
                orientation = exif if exif is not None else xmp if xmp is not None else 1
                return JpegHeader(sof[0], sof[1], sof[2], sof[3], sof[4], orientation, complete)
            elif marker == EOI:
                return "corrupt JPEG: end-of-image before any scan"
    except BrokenMarkerStructure:
        return "corrupt JPEG: broken marker structure"
    return "truncated JPEG: file ends inside the header"


class UnknownScale(ValueError):
    """Pixel values with no known 8-bit scale (float outside 0..1 and 0..255, integers beyond 16 bits):
    any conversion would be a guess (black, clipped or stretched per image), so the image is rejected."""


def _gray_top(arr: np.ndarray, mode: str) -> float:
    """The value that becomes 255 for a 16-bit, 32-bit integer ("I") or float ("F") gray image."""
    if mode.startswith("I;16"):
        return 65535.0
    if not np.isfinite(arr).all():
        raise UnknownScale("float image with NaN or infinite pixel values: they have no known 8-bit scale")
    lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
    kind = "float" if mode == "F" else "32-bit integer"
    if lo >= 0 and mode == "F" and hi <= 1.0:
        return 1.0
    if lo >= 0 and hi <= 255:
        return 255.0
    if lo >= 0 and mode == "I" and hi <= 65535:
        return 65535.0  # 16-bit data in a 32-bit image (some PNG/TIFF readers)
    raise UnknownScale(f"{kind} pixel values {lo:.3g}..{hi:.3g} have no known 8-bit scale (expected "
                       f"{'0..1 or 0..255' if mode == 'F' else '0..255 or 0..65535'}); save it as an 8- or 16-bit image")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (16-bit and float scaled, alpha composited on white).

    A transparency key (PNG tRNS: palette alphas, or one gray/RGB colour in ``info["transparency"]``) counts
    as alpha too: those pixels become white, not their hidden colour.
    """
    mode = img.mode
    key = img.info.get("transparency")
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        arr8 = (arr * (255.0 / _gray_top(arr, mode))).round().clip(0, 255).astype(np.uint8)
        if isinstance(key, int) and mode != "F":
            # PIL's own I;16 -> RGBA clips to 255 and misses the key: compare the 16-bit values here
            arr8[arr == key] = 255
        return Image.fromarray(arr8, "L").convert("RGB")
    if key is not None and mode in ("P", "1", "L", "RGB"):
        img = img.convert("RGBA")  # PIL turns the key into alpha (a 16-bit RGB key is matched on the high bytes)
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def _scale_low_bit_gray_key(img: Image.Image) -> None:
    """A 2- or 4-bit gray PNG's tRNS key is in the file's bit depth, but PIL stretches the pixels to 0..255
    (and leaves the key alone, so nothing matches it): scale the key the same way. Call before ``load()``."""
    key = img.info.get("transparency")
    if img.format == "PNG" and img.mode == "L" and isinstance(key, int) and len(img.tile) == 1:
        factor = {"L;2": 0x55, "L;4": 0x11}.get(img.tile[0][3])
        if factor:
            img.info["transparency"] = key * factor


def _decode_and_encode(data: bytes, opts: EncodeOptions) -> bytes:
    """Full decode with PIL, EXIF-orient, RGB, optional downscale, JPEG encode."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG" and opts.max_side and max(img.size) > opts.max_side:
            # DCT-domain downscale by 1/2, 1/4 or 1/8 while staying at least the target size
            s = opts.max_side / max(img.size)
            img.draft("RGB", (math.ceil(img.size[0] * s), math.ceil(img.size[1] * s)))
        _scale_low_bit_gray_key(img)
        img.load()
    img = ImageOps.exif_transpose(img)
    img = _to_rgb(img)
    if opts.max_side and max(img.size) > opts.max_side:
        w, h = img.size
        s = opts.max_side / max(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=opts.quality, optimize=False)
    return buf.getvalue()


def process_image(data: bytes, opts: EncodeOptions) -> tuple[bytes | None, str | None]:
    """Return (jpeg_bytes, None) for a usable image or (None, reason) for a reject."""
    if not data:
        return None, "empty file"
    if opts.max_side is None and data[:3] == b"\xff\xd8\xff":
        hdr = parse_jpeg_header(data)
        if isinstance(hdr, str):
            return None, hdr
        if hdr.width == 0 or hdr.height == 0:
            return None, "corrupt JPEG: zero width or height"
        if Image.MAX_IMAGE_PIXELS and hdr.width * hdr.height > Image.MAX_IMAGE_PIXELS:
            return None, f"decompression bomb: {hdr.width}x{hdr.height} pixels exceeds PIL limit"
        if (hdr.complete and hdr.sof in _PASS_SOF and hdr.precision == 8 and hdr.components == 3
                and hdr.orientation == 1):
            return data, None
        # CMYK, grayscale, 12-bit, lossless, rotated, or no EOI near the end (truncated, or a
        # camera trailer after EOI): a full decode decides, and a truncated scan is rejected there.
    try:
        return _decode_and_encode(data, opts), None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, f"decompression bomb: {exc}"
    except UnidentifiedImageError:
        return None, "not an image (PIL cannot identify it)"
    except UnknownScale as exc:
        return None, str(exc)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        text = str(exc)
        if "truncated" in text:
            return None, f"truncated image: {text}"
        return None, f"corrupt image: {text}"
    except MemoryError:
        return None, "image too large to decode (MemoryError)"
