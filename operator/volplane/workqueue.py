"""A work queue with client-go's guarantees, for asyncio.

- A key queued many times before a worker takes it is processed once.
- A key is never processed by two workers at once: a key re-added while it is
  being processed is parked and queued again when the worker calls done().
- add_after() delays a key (resync, conflicts); add_rate_limited() backs off
  exponentially per key until forget() is called.
- `depth` (optional) is told the number of unfinished keys (waiting or being
  processed) whenever it changes, on every add, get and done, as client-go's
  workqueue updates its metrics (a gauge set only at resync read 0 for a leader
  killed every few seconds: the chaos run).
The clock is injected so tests need no sleeps.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Hashable


class WorkQueue:
    def __init__(self, name: str, *, base_delay: float = 0.05, max_delay: float = 30.0,
                 clock=time.monotonic, resource: str | None = None,
                 depth: Callable[[int], object] | None = None):
        self.name = name
        self._depth = depth
        # The API resource (plural) its keys name, e.g. "persistentvolumeclaims": a 404
        # about that object means it was deleted, which ends its work (see `process`).
        self.resource = resource
        self.clock = clock
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._queue: asyncio.Queue = asyncio.Queue()
        self._dirty: set[Hashable] = set()
        self._processing: set[Hashable] = set()
        self._both = 0  # keys re-added while being processed (in both sets)
        self._failures: dict[Hashable, int] = {}
        self._delayed: list[tuple[float, int, Hashable]] = []
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._timer: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._dirty)

    def add(self, key: Hashable) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.put_nowait(key)
        else:
            self._both += 1
        self._report()

    async def get(self) -> Hashable:
        key = await self._queue.get()
        self._dirty.discard(key)
        self._processing.add(key)
        self._report()
        return key

    def _report(self) -> None:
        if self._depth is not None:
            self._depth(len(self._dirty) + len(self._processing) - self._both)

    def done(self, key: Hashable) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._both -= 1
            self._queue.put_nowait(key)
        self._report()

    def idle(self) -> bool:
        """Nothing queued and nothing being processed (delayed keys do not count)."""
        return not self._dirty and not self._processing

    async def wait_idle(self, timeout: float, poll: float = 0.01) -> bool:
        """Wait until idle() or `timeout` seconds; returns idle()."""
        deadline = self.clock() + timeout
        while not self.idle() and self.clock() < deadline:
            await asyncio.sleep(poll)
        return self.idle()

    def add_after(self, key: Hashable, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        heapq.heappush(self._delayed, (self.clock() + delay, next(self._seq), key))
        self._wakeup.set()
        if self._timer is None or self._timer.done():
            self._timer = asyncio.create_task(self._pump(), name=f"{self.name}-delays")

    def add_rate_limited(self, key: Hashable) -> float:
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        delay = min(self.base_delay * (2 ** n), self.max_delay)
        self.add_after(key, delay)
        return delay

    def forget(self, key: Hashable) -> None:
        self._failures.pop(key, None)

    def failures(self, key: Hashable) -> int:
        return self._failures.get(key, 0)

    def pop_due(self) -> list[Hashable]:
        """Move delayed keys whose time has come into the queue (also used by tests)."""
        now = self.clock()
        due = []
        while self._delayed and self._delayed[0][0] <= now:
            due.append(heapq.heappop(self._delayed)[2])
        for key in due:
            self.add(key)
        return due

    async def _pump(self) -> None:
        while self._delayed:
            self.pop_due()
            if not self._delayed:
                break
            wait = max(0.0, self._delayed[0][0] - self.clock())
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
            except TimeoutError:
                pass


def is_gone(error, key: Hashable, resource: str | None = None) -> bool:
    """Whether an API error says the object being synced (`key`, "ns/name" or "name")
    no longer exists: a 404 whose details name it (and its resource, when known).

    A 404 about any other object (a PV deleted while a claim binds to it, a resource
    type that is not installed) is not the end of the key's work."""
    if getattr(error, "status", None) != 404 or not isinstance(error.body, dict):
        return False
    details = error.body.get("details") or {}
    if not isinstance(key, str) or details.get("name") != key.rsplit("/", 1)[-1]:
        return False
    return resource is None or details.get("kind") in (None, resource)


async def process(queue: WorkQueue, sync, *, controller: str, log, on_conflict=None) -> None:
    """A worker: take a key, sync it, and requeue it the way client-go controllers do.

    `sync(key)` returns None when done, or seconds after which to look again. An API
    conflict (409) means we decided on stale data: `on_conflict(key)` may re-read the
    object, then the key is retried with backoff; other errors back off the same way.
    A 404 about the key's own object means it was deleted while we worked on it: that
    is the end of its work, not a failure (debug log, no retry; the watch removes it
    from the cache, and a re-created object of that name is a new key event).
    Nothing a single object does can kill the worker.
    """
    from .kube import ApiError  # late: kube imports the kubernetes package
    from .metrics import sync_total

    while True:
        key = await queue.get()
        try:
            retry = await sync(key)
            queue.forget(key)
            if retry:
                queue.add_after(key, retry)
        except ApiError as e:
            if is_gone(e, key, queue.resource):
                sync_total.labels(controller, queue.name, "gone").inc()
                log.debug("object deleted during sync; its work is done", key=key,
                          queue=queue.name)
                queue.forget(key)
                continue
            sync_total.labels(controller, queue.name, "conflict" if e.conflict else "error").inc()
            if e.conflict and on_conflict is not None:
                await on_conflict(key)
            elif not e.conflict:
                log.warning("sync failed", key=key, queue=queue.name, error=str(e))
            queue.add_rate_limited(key)
        except Exception as e:
            log.exception("sync crashed", key=key, queue=queue.name, error=str(e))
            queue.add_rate_limited(key)
        finally:
            queue.done(key)
