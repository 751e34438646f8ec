"""The JPEG marker walk: the one reading of a JPEG's segment structure.

data_prep's passthrough check (``validate.parse_jpeg_header``) and the loaders' whole-JPEG check
(``pipeline.data.dali_source.jpeg_size``) both walk the markers after SOI with it; each keeps its own rules
for what a segment may hold. Free of heavy imports: DALI's source workers import it.
"""
from __future__ import annotations

from collections.abc import Iterator

# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic); C4, C8, CC are not frames.
SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
SOS = 0xDA  # start of scan: the entropy-coded data follows
EOI = 0xD9  # end of image
EOI_BYTES = b"\xff\xd9"


class BrokenMarkerStructure(ValueError):
    """Where a marker should begin there is no 0xFF byte."""


def marker_segments(data: bytes, pos: int = 2) -> Iterator[tuple[int, int, int]]:
    """(position, marker, declared length) of each segment with a length field, from `pos` (after SOI).

    Skips fill bytes and the markers without a length (TEM, RSTn); goes on at ``position + 2 + length``
    whatever the length says (checking it is the caller's rule); stops where fewer than 4 bytes are left;
    raises BrokenMarkerStructure where a marker should begin but no 0xFF is.
    """
    n = len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise BrokenMarkerStructure(pos)
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        yield pos, marker, length
        pos += 2 + length
