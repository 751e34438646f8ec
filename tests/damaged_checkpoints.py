"""A checkpoint with one byte of its weights flipped, as a bad disk or copy leaves it: the same size, and
torch loads it without a word (it reads no CRC)."""
from __future__ import annotations

import io
import struct
import zipfile


def flip_a_weight_byte(data: bytes) -> tuple[bytes, str]:
    """``data`` (a torch zip checkpoint) with a byte in the middle of its largest record flipped; and that
    record's name."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    damaged = bytearray(data)
    damaged[start + info.file_size // 2] ^= 0x10
    return bytes(damaged), info.filename
