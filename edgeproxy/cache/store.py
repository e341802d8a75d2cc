"""Byte-bounded LRU memory store for cached responses, keyed by primary cache key.

Each primary key holds its variants (one `CachedResponse` per Vary secondary key). Recency is
tracked per primary key: a lookup touches every variant of a URI, and a URI's variants tend to be
equally hot. The store enforces its byte budget on every `put`, so `bytes_used <= max_bytes` holds
after any operation. Sizes are recorded at insertion, so accounting stays exact even if a caller
later mutates an entry. Pure data structure: no locks, no clock, no I/O.
"""

from __future__ import annotations

from collections import OrderedDict

from edgeproxy.cache.policy import CachedResponse

__all__ = ["MemoryStore"]


class MemoryStore:
    """LRU over primary keys, bounded by the summed `CachedResponse.size` of all variants.

    `get` and `put` are O(1) in the number of keys (plus the few variants of the key touched);
    eviction cost is amortised over the puts that caused it. `purge_prefix` scans every key, O(n):
    it serves operator purges, not the request path.
    """

    def __init__(self, max_bytes: int, max_object_bytes: int) -> None:
        if max_bytes < 0 or max_object_bytes < 0:
            raise ValueError("max_bytes and max_object_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.max_object_bytes = max_object_bytes
        # key -> [(entry, size at insertion)], oldest variant first; dict order = LRU first.
        self._data: OrderedDict[bytes, list[tuple[CachedResponse, int]]] = OrderedDict()
        self._bytes = 0
        self._count = 0
        self.evictions = 0  # variants dropped to make room
        self.purged = 0  # variants removed by purge / purge_prefix

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def lru_keys(self) -> list[bytes]:
        """Primary keys, least recently used first (does not touch recency)."""
        return list(self._data)

    def peek(self, key: bytes) -> list[CachedResponse]:
        """Like `get` without touching recency (admin views, tests)."""
        return [e for e, _ in self._data.get(key, ())]

    def get(self, key: bytes) -> list[CachedResponse]:
        """The variants stored under `key`, oldest first; marks `key` most recently used."""
        variants = self._data.get(key)
        if variants is None:
            return []
        self._data.move_to_end(key)
        return [e for e, _ in variants]

    def put(self, key: bytes, entry: CachedResponse) -> bool:
        """Store `entry` as a variant of `key`, replacing the variant with the same Vary key.

        Returns False (store unchanged) when the entry alone exceeds `max_object_bytes` or
        `max_bytes`. Otherwise evicts least recently used keys, then, if `key` is the only one
        left, its own oldest variants, until the budget holds.
        """
        size = entry.size
        if size > self.max_object_bytes or size > self.max_bytes:
            return False
        variants = self._data.get(key)
        if variants is None:
            variants = []
            self._data[key] = variants
        else:
            for i, (old, old_size) in enumerate(variants):
                if old.vary == entry.vary:
                    del variants[i]
                    self._bytes -= old_size
                    self._count -= 1
                    break
            self._data.move_to_end(key)
        variants.append((entry, size))
        self._bytes += size
        self._count += 1
        while self._bytes > self.max_bytes:
            lru_key = next(iter(self._data))
            if lru_key == key:
                # Only this key is left; the new entry fits alone, so older variants go first.
                _, old_size = variants.pop(0)
                self._bytes -= old_size
                self._count -= 1
                self.evictions += 1
            else:
                self.evictions += self._remove(lru_key)
        return True

    def _remove(self, key: bytes) -> int:
        variants = self._data.pop(key, None)
        if variants is None:
            return 0
        self._bytes -= sum(s for _, s in variants)
        self._count -= len(variants)
        return len(variants)

    def delete(self, key: bytes) -> int:
        """Drop every variant of `key` (cache invalidation); returns how many were removed."""
        return self._remove(key)

    def purge(self, key: bytes) -> int:
        """Operator purge of `key`: like `delete`, but counted in `purged`."""
        n = self._remove(key)
        self.purged += n
        return n

    def purge_prefix(self, prefix: bytes) -> int:
        """Purge every key starting with `prefix`, e.g. b"https://example.com/img/". O(n)."""
        n = 0
        for key in [k for k in self._data if k.startswith(prefix)]:
            n += self._remove(key)
        self.purged += n
        return n
