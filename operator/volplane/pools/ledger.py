"""The pool provisioner's capacity ledger: allocations by volume, totals per pool. Pure.

Fed from the StorageAllocation records (the durable truth) and from the provisioner's
own reservations of writes in flight, so that two claims decided before either record
lands never take the same space.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- the ledger --------------------------------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    """One volume's share of a pool.

    ``reserved``: taken in memory, the durable record's write is in flight (or the
    record is being grown). ``base`` is what the record says meanwhile (None: no record
    yet), restored by ``cancel`` when the write fails.
    """

    pool: str
    size: int
    reserved: bool = False
    base: int | None = None


class Ledger:
    """Allocations by name (= PV name), with running totals per pool.

    Fed from the StorageAllocation records (``observe`` / ``release``) and by the
    provisioner's own reservations (``reserve`` / ``grow``, undone by ``cancel``). A
    reservation counts at once, so a second claim decided before the record lands
    cannot take the same space; a record observed while a larger reservation is in
    flight does not shrink it.
    """

    def __init__(self) -> None:
        self._items: dict[str, Allocation] = {}
        self._totals: dict[str, list[int]] = {}  # pool -> [bytes, count]

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str) -> Allocation | None:
        return self._items.get(name)

    def items(self) -> list[tuple[str, Allocation]]:
        return list(self._items.items())

    def pools(self) -> set[str]:
        return {p for p, (b, c) in self._totals.items() if c}

    def allocated(self, pool: str) -> int:
        return self._totals.get(pool, (0, 0))[0]

    def count(self, pool: str) -> int:
        return self._totals.get(pool, (0, 0))[1]

    def sizes(self, pool: str) -> list[int]:
        return [a.size for a in self._items.values() if a.pool == pool]

    def available(self, pool: str, capacity: int) -> int:
        return max(0, capacity - self.allocated(pool))

    def _put(self, name: str, alloc: Allocation | None) -> None:
        old = self._items.pop(name, None)
        if old is not None:
            t = self._totals[old.pool]
            t[0] -= old.size
            t[1] -= 1
            if not t[1]:
                del self._totals[old.pool]
        if alloc is not None:
            self._items[name] = alloc
            t = self._totals.setdefault(alloc.pool, [0, 0])
            t[0] += alloc.size
            t[1] += 1

    def observe(self, name: str, pool: str, size: int) -> None:
        """A durable record says `name` holds `size` bytes of `pool`."""
        cur = self._items.get(name)
        if cur is not None and cur.reserved and cur.pool == pool and cur.size > size:
            self._put(name, Allocation(pool, cur.size, True, size))  # grow in flight
            return
        self._put(name, Allocation(pool, size))

    def release(self, name: str) -> Allocation | None:
        """The record is gone: free its space."""
        cur = self._items.get(name)
        self._put(name, None)
        return cur

    def reserve(self, name: str, pool: str, size: int, capacity: int) -> bool:
        """Take `size` bytes of `pool` for `name` if they are free (idempotent)."""
        cur = self._items.get(name)
        if cur is not None:
            return cur.pool == pool and cur.size >= size
        if size <= 0 or self.allocated(pool) + size > capacity:
            return False
        self._put(name, Allocation(pool, size, True, None))
        return True

    def grow(self, name: str, size: int, capacity: int) -> bool:
        """Grow `name` to `size` bytes if its pool has room for the difference."""
        cur = self._items.get(name)
        if cur is None:
            return False
        if size <= cur.size:
            return True
        if self.allocated(cur.pool) - cur.size + size > capacity:
            return False
        base = cur.base if cur.reserved else cur.size
        self._put(name, Allocation(cur.pool, size, True, base))
        return True

    def cancel(self, name: str) -> None:
        """A reservation's write failed: go back to what the record says."""
        cur = self._items.get(name)
        if cur is None or not cur.reserved:
            return
        self._put(name, None if cur.base is None else Allocation(cur.pool, cur.base))
