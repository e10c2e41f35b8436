"""The controllers' listers: in-memory copies of the objects Kopf watches.

Kopf feeds the stores (see runtime.py); the effect layer writes the objects it
gets back from the API straight in ("write-through"), so the next decision
sees its own writes without waiting for the watch. A store never goes back in
time: an update older than what it holds (by resourceVersion) is ignored.

Deletions seen by the watch leave a short-lived tombstone (the resourceVersion of the
deletion): a response that left the API server before the deletion but is processed
after it (a GET racing a DELETE, both in flight in one event loop) would otherwise put
the deleted object back for good, since no later event removes it again. And a DELETED
event of an older incarnation never removes a newer one (same name, written through).

Objects are slimmed on the way in (managedFields and last-applied annotations
dropped): they are kept for every PV/PVC in the cluster, so bytes matter.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

DROP_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)
TOMBSTONE_SECONDS = 300.0  # far longer than any response can lag behind the watch


def slim(body: Mapping[str, Any]) -> dict:
    md = body.get("metadata") or {}
    meta = {k: md[k] for k in ("name", "namespace", "uid", "resourceVersion", "generation",
                                 "labels", "annotations", "finalizers", "deletionTimestamp",
                                 "creationTimestamp", "ownerReferences") if k in md}
    ann = meta.get("annotations")
    if ann and any(a in ann for a in DROP_ANNOTATIONS):
        meta["annotations"] = {k: v for k, v in ann.items() if k not in DROP_ANNOTATIONS}
    out = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": meta}
    for k in ("spec", "status", "provisioner", "parameters", "reclaimPolicy", "mountOptions",
              "allowVolumeExpansion", "volumeBindingMode", "allowedTopologies"):
        if k in body:
            out[k] = body[k]
    return out


def rv_int(obj: Mapping | None) -> int:
    try:
        return int((obj or {}).get("metadata", {}).get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


def key_of(obj: Mapping) -> str:
    md = obj.get("metadata", {})
    ns = md.get("namespace")
    return f"{ns}/{md['name']}" if ns else md["name"]


Listener = Callable[[str, dict | None, dict | None], None]
Slimmer = Callable[[Mapping], dict]


class Store(Mapping[str, dict]):
    """key -> slim object, with change listeners called as (key, old, new)."""

    def __init__(self, kind: str, slimmer: Slimmer | None = None, clock=time.monotonic):
        self.kind = kind
        self.slimmer = slimmer  # a projection for kinds with many objects (Pods, Nodes)
        self._items: dict[str, dict] = {}
        self._listeners: list[Listener] = []
        self._clock = clock
        self._gone: OrderedDict[str, tuple[int, float]] = OrderedDict()  # key -> (rv, when)

    def __getitem__(self, key: str) -> dict:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def listen(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def upsert(self, body: Mapping, *, slimmed: bool = False) -> bool:
        obj = dict(body) if slimmed else (self.slimmer or slim)(body)
        key = key_of(obj)
        old = self._items.get(key)
        if old is not None and rv_int(obj) and rv_int(obj) <= rv_int(old):
            return False  # stale or already seen: the watch is behind our own write
        gone = self._gone.get(key)
        if gone is not None:
            if rv_int(obj) and rv_int(obj) <= gone[0]:
                return False  # older than its deletion: a response that lagged the watch
            del self._gone[key]  # a newer incarnation
        self._items[key] = obj
        for fn in self._listeners:
            fn(key, old, obj)
        return True

    def assume(self, obj: dict) -> dict | None:
        """Store a locally modified copy now, before the write that makes it true lands.

        Like the scheduler's assume cache: other workers immediately see, e.g., a
        PV as taken. The copy keeps the old resourceVersion, so the real object
        (newer) replaces it; `restore` puts the original back if the write fails.
        """
        key = key_of(obj)
        old = self._items.get(key)
        self._items[key] = obj
        for fn in self._listeners:
            fn(key, old, obj)
        return old

    def restore(self, key: str, original: dict | None, assumed: dict) -> None:
        if self._items.get(key) is assumed:
            if original is None:
                self.remove(key)
            else:
                self._items[key] = original
                for fn in self._listeners:
                    fn(key, assumed, original)

    def remove(self, key: str) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            for fn in self._listeners:
                fn(key, old, None)

    def deleted(self, obj: Mapping) -> None:
        """A watch DELETED event: remove the object unless what is stored is newer (a
        newer incarnation of the name, written through), and remember the deletion's
        resourceVersion for a while so that no older copy is upserted again."""
        key = key_of(obj)
        rv = rv_int(obj)
        cur = self._items.get(key)
        if cur is not None and rv and rv_int(cur) > rv:
            return
        if rv:
            now = self._clock()
            self._gone[key] = (rv, now)
            self._gone.move_to_end(key)
            while self._gone and now - next(iter(self._gone.values()))[1] > TOMBSTONE_SECONDS:
                self._gone.popitem(last=False)
        self.remove(key)


class Cache:
    """Every store the controllers read, plus the 'synced' barrier."""

    def __init__(self) -> None:
        self.pvs = Store("PersistentVolume")
        self.pvcs = Store("PersistentVolumeClaim")
        self.classes = Store("StorageClass")
        self.stores: dict[str, Store] = {
            "persistentvolumes": self.pvs,
            "persistentvolumeclaims": self.pvcs,
            "storageclasses": self.classes,
        }

    def add_store(self, plural: str, kind: str, slimmer: Slimmer | None = None) -> Store:
        """The store for `plural`; the first caller's `slimmer` (projection) wins."""
        store = self.stores.setdefault(plural, Store(kind, slimmer))
        return store
