"""Build small but real image datasets for tests: folders, tars, nested ImageNet-style archives.

Pictures are crops of scikit-learn's sample photos (china.jpg, flower.jpg), so the JPEGs are real
camera images, plus a catalogue of awkward real-world files (CMYK, PNG named .JPEG, 16-bit, EXIF
rotated, truncated, bombs, ...). Other test modules may import these helpers.
"""
from __future__ import annotations

import io
import struct
import tarfile
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image


@lru_cache(maxsize=1)
def _sources() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)


def photos(n: int, size: tuple[int, int] = (80, 60), seed: int = 0) -> list[Image.Image]:
    """`n` distinct RGB photos of `size` (w, h): random crops of the sklearn sample images, resized."""
    rng = np.random.default_rng(seed)
    out = []
    srcs = _sources()
    for i in range(n):
        src = srcs[i % len(srcs)]
        h, w = src.shape[:2]
        cw = int(rng.integers(w // 4, w // 2))
        ch = max(8, int(cw * size[1] / size[0]))
        x = int(rng.integers(0, w - cw))
        y = int(rng.integers(0, h - ch))
        crop = Image.fromarray(src[y : y + ch, x : x + cw])
        out.append(crop.resize(size, Image.Resampling.BILINEAR))
    return out


def jpeg_bytes(img: Image.Image, quality: int = 85, **kw) -> bytes:
    """Encode a PIL image as JPEG bytes."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    """Encode a PIL image as PNG bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def tiff_bytes(arr: np.ndarray) -> bytes:
    """A gray TIFF holding `arr` as is: float32 (PIL mode F), uint16 (I;16) or int32 (I)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF")
    return buf.getvalue()


def gray_photo(name: str = "flower.jpg", size: tuple[int, int] = (96, 64)) -> np.ndarray:
    """One of scikit-learn's sample photos as 8-bit gray values (float64), resized to `size` (w, h)."""
    from sklearn.datasets import load_sample_image

    img = Image.fromarray(load_sample_image(name)).convert("L").resize(size, Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float64)


def write_imagefolder(root: Path, classes: list[str], per_class: int, size=(80, 60), seed: int = 0,
                      ext: str = "jpg") -> dict[str, bytes]:
    """Write ``root/<class>/<class>_<i>.<ext>`` JPEGs; return {relative path: bytes}."""
    imgs = photos(len(classes) * per_class, size, seed)
    files = {}
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            data = jpeg_bytes(imgs[ci * per_class + i], quality=80 + (i % 3) * 5, progressive=bool(i % 2))
            rel = f"{c}/{c}_{i}.{ext}"
            (root / rel).write_bytes(data)
            files[rel] = data
    return files


def jpeg_of_size(img: Image.Image, size: int) -> bytes:
    """`img` as a JPEG of exactly `size` bytes (a comment segment fills the gap): an in-place edit
    that keeps the file size."""
    for quality in range(95, 5, -5):
        data = jpeg_bytes(img, quality=quality)
        gap = size - len(data)
        if 4 <= gap <= 65537:  # FF FE, a 2-byte length (at most 65535), then the padding
            return data[:2] + b"\xff\xfe" + struct.pack(">H", gap - 2) + bytes(gap - 4) + data[2:]
    raise ValueError(f"cannot encode the image in {size} bytes")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A tiny, valid-header 1-bit PNG claiming width*height pixels (PIL's decompression-bomb case)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(64)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the SOF dimensions of a real JPEG (a header-level decompression bomb)."""
    pos = 2
    while pos < len(data):
        marker = data[pos + 1]
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in (0xC0, 0xC1, 0xC2):
            return data[: pos + 5] + struct.pack(">HH", height, width) + data[pos + 9 :]
        pos += 2 + length
    raise ValueError("no SOF marker")


def exif_rotated_jpeg(img: Image.Image, orientation: int = 6) -> bytes:
    """JPEG whose EXIF Orientation tag asks viewers to rotate it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(img, exif=exif.tobytes())


def awkward_files(seed: int = 1) -> dict[str, tuple[bytes, str]]:
    """Real-world oddities: {file name: (bytes, expected outcome 'ok' or a reject-reason fragment)}."""
    a, b, c, d, e = photos(5, (64, 48), seed)
    gray16 = Image.fromarray((np.asarray(b.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    gray = np.asarray(d.convert("L"), dtype=np.float32)
    good = jpeg_bytes(c)
    rgba = e.convert("RGBA")
    return {
        "cmyk.jpg": (jpeg_bytes(a.convert("CMYK")), "ok"),
        "png_named.JPEG": (png_bytes(b), "ok"),
        "gray.jpg": (jpeg_bytes(b.convert("L")), "ok"),
        "rotated.jpg": (exif_rotated_jpeg(c, 6), "ok"),
        "deep16.png": (png_bytes(gray16), "ok"),
        "alpha.png": (png_bytes(rgba), "ok"),
        "float01.tif": (tiff_bytes(gray / 255), "ok"),
        "float_signed.tif": (tiff_bytes(gray / 127.5 - 1), "no known 8-bit scale"),
        "café_日本 odd 'name'.jpg": (jpeg_bytes(d), "ok"),
        "truncated.jpg": (good[: len(good) // 2], "truncated"),
        "zero.jpg": (b"", "empty"),
        "notes.txt": (b"this is not an image\n", "not an image"),
        "bomb.png": (png_bomb(), "decompression bomb"),
        "bomb.jpg": (jpeg_with_size(good, 60000, 60000), "decompression bomb"),
    }


def tar_tree(root: Path, tar_path: Path, prefix: str = "") -> Path:
    """Tar every file under `root` (sorted) with member names ``prefix + relative path``."""
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tf:
        for p in sorted(root.rglob("*")):
            tf.add(p, arcname=prefix + p.relative_to(root).as_posix(), recursive=False)
    return tar_path


def add_tar_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append raw bytes under any member name (including unsafe ones, for traversal tests)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            add_tar_member(tf, name, data)
    return buf.getvalue()


def meta_mat_bytes(leaves: list[tuple[int, str, str]], parents: list[tuple[int, str, str, list[int]]]) -> bytes:
    """A devkit-style ``meta.mat``: struct array ``synsets`` (ILSVRC2012_ID, WNID, words, ...)."""
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(i, w, words, f"gloss of {words}", 0, np.zeros((0,), dtype=np.uint8), 0, 1300)
            for i, w, words in leaves]
    rows += [(i, w, words, "a parent synset", len(ch), np.array(ch, dtype=np.uint16), 1, 0)
             for i, w, words, ch in parents]
    arr = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for k, row in enumerate(rows):
        arr[k, 0] = row
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": arr})
    return buf.getvalue()


WORDS = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
         "n01484850": "great white shark, white shark, man-eater", "n02102040": "English springer"}


def build_imagenet(root: Path, per_class: int = 6, n_val: int = 12, extracted: bool = False,
                   seed: int = 3) -> dict:
    """Miniature ILSVRC2012 in `root`: archives (default) or extracted folders, devkit, Kaggle CSV.

    Returns {"wnids", "train": {name: (bytes, wnid)}, "val": {name: (bytes, wnid)}}. The devkit's
    ILSVRC2012_IDs are deliberately not in sorted-wnid order, as in the real devkit.
    """
    wnids = sorted(WORDS)
    imgs = photos(len(wnids) * per_class + n_val, (72, 54), seed)
    train = {}
    for ci, w in enumerate(wnids):
        for i in range(per_class):
            train[f"{w}/{w}_{i}.JPEG"] = (jpeg_bytes(imgs[ci * per_class + i], quality=88), w)
    val = {}
    for i in range(n_val):
        w = wnids[(i * 3 + 1) % len(wnids)]
        val[f"ILSVRC2012_val_{i + 1:08d}.JPEG"] = (jpeg_bytes(imgs[len(wnids) * per_class + i], quality=88), w)
    ids = {w: k + 1 for k, w in enumerate(reversed(wnids))}  # ID order != sorted wnid order
    root.mkdir(parents=True, exist_ok=True)
    if extracted:
        for rel, (data, _) in {**{f"train/{k}": v for k, v in train.items()},
                               **{f"val/{k}": v for k, v in val.items()}}.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
    else:
        inner = [(f"{w}.tar", _tar_bytes([(k.split("/")[1], d) for k, (d, ww) in train.items() if ww == w]))
                 for w in wnids]
        (root / "ILSVRC2012_img_train.tar").write_bytes(_tar_bytes(inner))
        (root / "ILSVRC2012_img_val.tar").write_bytes(_tar_bytes([(k, d) for k, (d, _) in val.items()]))
    meta = meta_mat_bytes([(ids[w], w, WORDS[w]) for w in wnids],
                          [(1001, "n00001740", "entity", [ids[w] for w in wnids])])
    truth = "".join(f"{ids[w]}\n" for _, (_, w) in sorted(val.items()))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        add_tar_member(tf, "ILSVRC2012_devkit_t12/data/meta.mat", meta)
        add_tar_member(tf, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth.encode())
        add_tar_member(tf, "ILSVRC2012_devkit_t12/COPYING", b"devkit license text\n")
    (root / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(buf.getvalue())
    rows = ["ImageId,PredictionString"] + [f"{Path(k).stem},{w} 10 12 60 50 {w} 1 2 30 40"
                                           for k, (_, w) in sorted(val.items())]
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return {"wnids": wnids, "train": train, "val": val}
