"""One fake API server for the controller-level unit tests.

Enough of ``volplane.kube.Kube``'s surface (get, create, merge_patch, delete, request)
with the API server's rules that the controllers rely on: resourceVersions that grow
on every write, the resourceVersion precondition of a patch (409 Conflict), uid
preconditions of a delete, status subresources, finalizers holding a deleted object
(deletionTimestamp) until the last one is removed, 404 and AlreadyExists. Objects are
kept by API path, so any kind works.

``sync(informers)`` plays the watch: every object whose resourceVersion changed since
the last sync is fed to the informers, every object gone is deleted there. ``crash_after``
makes the n-th write from now raise ``Crash`` after it landed, as a process killed right
after a write would leave things (faults.py does the same with a real process in e2e).
``fail`` injects errors (e.g. a 409 on a path) for re-read paths.

Real API servers are used in e2e; this is for the logic between two writes.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections.abc import Iterable
from typing import Any

from volplane import kinds as K
from volplane.informers import Informers
from volplane.kube import ApiError

KINDS = (K.PVS, K.PVCS, K.CLASSES, K.PODS, K.NODES, K.VOLUME_ATTACHMENTS, K.CSI_DRIVERS,
         K.POOLS, K.ALLOCATIONS)


class Crash(Exception):
    """The process 'died' right after a write (see FakeApi.crash_after)."""


def _err(status: int, reason: str, message: str = "") -> ApiError:
    return ApiError(status, reason, {"reason": reason, "message": message or reason})


def _merge(dst: dict, patch: dict) -> None:
    """JSON merge patch (RFC 7386): None deletes, dicts merge, the rest replaces."""
    for k, v in patch.items():
        if v is None:
            dst.pop(k, None)
        elif isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def _kind_of(collection: str) -> K.Kind | None:
    for kind in KINDS:
        base = kind.path()
        if collection == base:
            return kind
        prefix, _, plural = base.rpartition("/")
        if collection.startswith(prefix + "/namespaces/") and collection.endswith("/" + plural):
            return kind
    return None


class FakeApi:
    def __init__(self) -> None:
        self.objects: dict[str, dict] = {}       # object path -> object
        self.rv = itertools.count(100)
        self.uids = itertools.count(1)
        self.calls: list[tuple[str, str]] = []   # (verb, path) of every request
        # informers -> (object path -> rv they saw): each process has its own watch
        self._synced: dict[int, dict[str, str]] = {}
        self._crash_in: int | None = None
        self._failures: list[tuple[str, str, int]] = []
        self.delay = 0.0                         # seconds every write takes (interleaving)

    # -- seeding and inspection --
    def add(self, obj: dict) -> dict:
        """Put an object in place as if it had been created long ago."""
        kind = next(k for k in KINDS if k.kind == obj.get("kind"))
        md = obj.setdefault("metadata", {})
        path = kind.path(md["name"], md.get("namespace"))
        md.setdefault("uid", f"uid-{md['name']}")
        md["resourceVersion"] = str(next(self.rv))
        self.objects[path] = copy.deepcopy(obj)
        return copy.deepcopy(obj)

    def obj(self, kind: K.Kind, name: str, namespace: str | None = None) -> dict | None:
        return self.objects.get(kind.path(name, namespace))

    def of_kind(self, kind: K.Kind) -> list[dict]:
        return [o for p, o in self.objects.items() if _kind_of(p.rsplit("/", 1)[0]) is kind]

    def writes(self, verb: str | None = None, contains: str = "") -> list[tuple[str, str]]:
        return [(v, p) for v, p in self.calls if v != "get" and (verb is None or v == verb)
                and contains in p]

    # -- faults --
    def crash_after(self, n: int) -> None:
        """The n-th write from now lands, then raises Crash."""
        self._crash_in = n

    def fail(self, verb: str, contains: str, status: int) -> None:
        """The next `verb` request whose path contains `contains` fails with `status`."""
        self._failures.append((verb, contains, status))

    def _check_fail(self, verb: str, path: str) -> None:
        for i, (v, c, status) in enumerate(self._failures):
            if v == verb and c in path:
                del self._failures[i]
                raise _err(status, {409: "Conflict", 500: "InternalError"}.get(status, "Error"))

    async def _wrote(self) -> None:
        if self._crash_in is not None:
            self._crash_in -= 1
            if self._crash_in == 0:
                self._crash_in = None
                raise Crash()

    # -- the Kube surface --
    @staticmethod
    def _split(path: str) -> tuple[str, bool]:
        if path.endswith("/status"):
            return path[: -len("/status")], True
        return path, False

    def _bump(self, obj: dict) -> dict:
        obj["metadata"]["resourceVersion"] = str(next(self.rv))
        return copy.deepcopy(obj)

    async def get(self, path: str, **_: Any) -> Any:
        self.calls.append(("get", path))
        path, _sub = self._split(path)
        if path in self.objects:
            return copy.deepcopy(self.objects[path])
        if _kind_of(path) is not None:  # a collection: LIST
            items = [copy.deepcopy(o) for p, o in self.objects.items()
                     if p.rsplit("/", 1)[0] == path]
            return {"items": items, "metadata": {"resourceVersion": str(next(self.rv))}}
        if path == "/version":
            return {"major": "1", "minor": "36"}
        raise _err(404, "NotFound", f"{path} not found")

    async def create(self, path: str, body: dict) -> dict:
        self.calls.append(("create", path))
        self._check_fail("create", path)
        if self.delay:
            await asyncio.sleep(self.delay)
        name = body["metadata"]["name"]
        key = f"{path}/{name}"
        if key in self.objects:
            raise _err(409, "AlreadyExists", f"{name} already exists")
        obj = copy.deepcopy(body)
        obj["metadata"]["uid"] = f"uid-{name}-{next(self.uids)}"
        obj["metadata"].setdefault("creationTimestamp", "2024-01-01T00:00:00Z")
        self.objects[key] = obj
        out = self._bump(obj)
        await self._wrote()
        return out

    async def merge_patch(self, path: str, patch: dict) -> dict:
        self.calls.append(("patch", path))
        self._check_fail("patch", path)
        if self.delay:
            await asyncio.sleep(self.delay)
        path, sub = self._split(path)
        obj = self.objects.get(path)
        if obj is None:
            raise _err(404, "NotFound", f"{path} not found")
        patch = copy.deepcopy(patch)
        want_rv = (patch.get("metadata") or {}).pop("resourceVersion", None)
        if want_rv and want_rv != obj["metadata"]["resourceVersion"]:
            raise _err(409, "Conflict", "the object has been modified")
        if sub:
            _merge(obj.setdefault("status", {}), patch.get("status") or {})
        else:
            patch.pop("status", None)
            _merge(obj, patch)
        if obj["metadata"].get("deletionTimestamp") and not obj["metadata"].get("finalizers"):
            del self.objects[path]
        out = self._bump(obj)
        await self._wrote()
        return out

    async def delete(self, path: str, body: dict | None = None) -> Any:
        self.calls.append(("delete", path))
        self._check_fail("delete", path)
        obj = self.objects.get(path)
        if obj is None:
            raise _err(404, "NotFound", f"{path} not found")
        uid = ((body or {}).get("preconditions") or {}).get("uid")
        if uid and uid != obj["metadata"].get("uid"):
            raise _err(409, "Conflict", "uid precondition failed")
        if obj["metadata"].get("finalizers"):
            obj["metadata"].setdefault("deletionTimestamp", "2024-01-01T00:05:00Z")
            out = self._bump(obj)
        else:
            del self.objects[path]
            out = {"kind": "Status", "status": "Success"}
        await self._wrote()
        return out

    async def request(self, method: str, path: str, body: Any = None, **_: Any) -> Any:
        if method == "DELETE":
            return await self.delete(path, body)
        if method == "GET":
            return await self.get(path)
        raise NotImplementedError(method)

    # -- the watch --
    def sync(self, informers: Informers, kinds: Iterable[K.Kind] | None = None) -> int:
        """Feed the informers what changed since the last sync; returns how many events."""
        watched = {k.plural for k in informers.kinds.values()}
        only = {k.plural for k in kinds} if kinds is not None else watched
        seen = self._synced.setdefault(id(informers), {})
        n = 0
        for path, obj in list(self.objects.items()):
            kind = _kind_of(path.rsplit("/", 1)[0])
            if kind is None or kind.plural not in only & watched:
                continue
            rv = obj["metadata"]["resourceVersion"]
            if seen.get(path) != rv:
                seen[path] = rv
                informers.feed(copy.deepcopy(obj), kind)
                n += 1
        for path in [p for p in seen if p not in self.objects]:
            kind = _kind_of(path.rsplit("/", 1)[0])
            del seen[path]
            if kind is not None and kind.plural in only & watched:
                parts = path.split("/")
                ns = parts[parts.index("namespaces") + 1] if "namespaces" in parts else None
                informers.delete(kind, f"{ns}/{parts[-1]}" if ns else parts[-1])
                n += 1
        return n


class FakeEvents:
    """The event recorder's surface: what was posted, by object name."""

    def __init__(self) -> None:
        self.posted: list[tuple[str, str, str]] = []

    def emit(self, obj: dict, type_: str, reason: str, message: str,
             component: str | None = None) -> bool:
        self.posted.append(((obj.get("metadata") or {}).get("name"), reason, message))
        return True

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def context(api: FakeApi, **options: Any):
    """A controller Context over the fake API, with fresh informers."""
    from volplane.context import Context, Options
    return Context(kube=api, informers=Informers(), events=FakeEvents(),  # type: ignore[arg-type]
                   options=Options(**options))


async def settle(api: FakeApi, ctx: Any, loops: list, rounds: int = 40) -> None:
    """Run controllers' queues by hand until nothing is left to do: sync the watch, then
    hand every queued key to its sync function, again and again. `loops` holds
    (WorkQueue, sync) pairs; delayed keys (debounces) come due by sleeping."""
    for _ in range(rounds):
        api.sync(ctx.informers)
        busy = False
        delayed = [q._delayed[0][0] - q.clock() for q, _ in loops if q._delayed]
        if delayed:
            await asyncio.sleep(min(2.0, max(0.0, min(delayed))) + 0.02)
            for queue, _ in loops:
                queue.pop_due()
        for queue, sync in loops:
            while len(queue):
                busy = True
                key = await queue.get()
                try:
                    await sync(key)
                finally:
                    queue.done(key)
        if not busy and not api.sync(ctx.informers):
            return
    raise AssertionError("did not settle")
