"""A count with its noun in the console's messages: ``1 shard``, ``2 shards``, never ``1 shards`` or
``shard(s)``. No torch here (stdlib only): ``data_prep`` and ``launch`` import it on login nodes.
"""

from __future__ import annotations


def plural(count: int, noun: str, nouns: str | None = None, *, grouped: bool = False) -> str:
    """``COUNT NOUN``, the noun in the plural unless the count is 1: ``plural(1, "shard")`` is ``1 shard``,
    ``plural(0, "shard")`` ``0 shards``. ``nouns``: the plural where adding ``s`` is wrong
    (``plural(n, "class", "classes")``); ``grouped``: the count with thousands separators (``12,000``)."""
    shown = f"{count:,}" if grouped else str(count)
    return f"{shown} {noun if count == 1 else (nouns or noun + 's')}"
