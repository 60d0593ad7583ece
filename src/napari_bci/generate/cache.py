"""A byte-budgeted, thread-safe LRU cache of generated tiles.

Keys are ``(image_id, model_key, level, tile_size, ty, tx)``; values are read-only ``uint8``
arrays. Memory stays under ``max_bytes`` however long a user pans: inserting evicts the least
recently used tiles first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable

import numpy as np

DEFAULT_CACHE_BYTES = 512 * 2**20


class TileCache:
    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = int(max_bytes)
        self._data: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            arr = self._data.get(key)
            if arr is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return arr

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def put(self, key: Hashable, arr: np.ndarray) -> None:
        arr = np.asarray(arr)
        if arr.nbytes > self.max_bytes:
            return
        arr = arr.copy() if arr.base is not None else arr
        arr.setflags(write=False)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._data[key] = arr
            self.nbytes += arr.nbytes
            while self.nbytes > self.max_bytes and self._data:
                _, ev = self._data.popitem(last=False)
                self.nbytes -= ev.nbytes
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._data)

    def stats(self) -> dict:
        with self._lock:
            return {"tiles": len(self._data), "bytes": self.nbytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


_default: TileCache | None = None


def default_cache() -> TileCache:
    """The process-wide cache shared by the viewer, the CLI and the benchmarks."""
    global _default
    if _default is None:
        _default = TileCache()
    return _default
