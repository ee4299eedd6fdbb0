"""The serving caches' shared parts: content keys and a least-recently-used map bounded by bytes.

Two caches use them (model_repository/README.md, "Caches"):
- the encoder cache, in each image step (vision encoder, face parser, seg projection, attribute
  head): a request's outputs of that step, keyed by IMAGE_KEY, which preprocessing computes from
  the request's image bytes and the options that change their pixels;
- the prefix cache, in the llm step's in-flight scheduler: the KV rows of a prompt's prefix (the
  text before and the rows of the images), keyed by the IMAGE_KEY and the prefix's token ids, so two
  different images never share rows even though their placeholder ids are the same.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any


def content_key(*parts: bytes | str) -> str:
    """sha256 over the parts, each length-prefixed (so ("ab", "c") and ("a", "bc") differ), as hex."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else bytes(part)
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class BytesLRU:
    """A map that keeps at most `max_bytes` of values, evicting the least recently used first.

    `max_bytes` 0 turns it off (nothing is kept, every lookup misses). A value larger than the bound
    is not kept. Counts its hits and misses. Not thread-safe: each owner uses it from one thread.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"a cache bound must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str):
        """The value (now the most recently used), or None; counted as a hit or a miss."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: str, value, nbytes: int) -> bool:
        """Keep `value` (of `nbytes`), evicting as needed; False when it cannot be kept."""
        if nbytes > self.max_bytes:
            return False
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        while self._items and self.bytes + nbytes > self.max_bytes:
            _, (_, size) = self._items.popitem(last=False)
            self.bytes -= size
            self.evictions += 1
        self._items[key] = (value, nbytes)
        self.bytes += nbytes
        return True

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
