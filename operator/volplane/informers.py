"""The watch layer: Kopf's handlers feed every cache the controllers read.

For every kind a controller watches (``kinds.Kind``) the wiring registers:

- one ``@kopf.index`` that is the kind's lister and its derived indexes at once: it
  files the slim object under ``namespace/name`` and its name under
  ``(index name, key)`` for every derived index of the kind (``kinds.IndexSpec``: PVs by
  claim, pods by node and by claim, attachments by node and by PV, unbound claims by
  class). Kopf keeps them and updates them on every event. One handler per kind, not
  one per index: a handler call is most of the cost per event (docs/benchmarks.md),
  in Kopf's own path (all its keyword arguments, its bookkeeping) and, less so, in the
  fast path (kopf_fastpath.py: inline in the watcher, only the arguments named);
- one ``@kopf.on.event`` that only enqueues: it hands ``(key, old, new)`` to the
  controllers' listeners, which put keys on their work queues. ``old`` is the slim
  object the previous event of the same object left in Kopf's per-object ``memo``
  (a reference to what the lister held, not a copy); ``new`` is what the lister holds
  now (Kopf runs the indexers of an event before its handlers).

Kopf runs no handler before every index has been populated by the initial listing,
so the first handler call proves every lister complete. The kind listed last may be
empty, so the proof comes from a kind that never is: one namespace, ``default``
(field-selected; it cannot be deleted). Its handler sets the "caches synced" barrier;
only then do the controllers' loops start (runtime.py).

Controllers read through ``Lister`` (a ``Mapping`` of key -> slim object) and
``IndexView``. A lister also takes the objects the controller's own writes returned
(``written``/``gone``), so the next decision sees its own writes before the watch
brings them; such an entry is dropped as soon as Kopf's index has caught up (by
resourceVersion). Kopf's indexes themselves are never written by volplane.

A deletion the watch brings leaves a tombstone in the lister for TOMBSTONE_SECONDS (the
resourceVersion of the deletion): a response that left the API server before the
deletion but is processed after it (a GET racing a DELETE, both in flight in one event
loop) is not put back, since no later event would ever remove it again. A newer
incarnation of the name (a higher resourceVersion) is taken and ends the tombstone; and
a DELETED event of an older incarnation never hides a newer one written through.

Without Kopf (unit tests), ``Informers.feed``/``delete`` play the watch: the same
slimmers and index functions fill in-memory indexes of the same shape, and the same
listeners run.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from . import logs, metrics
from .kinds import IndexSpec, Kind
from .objects import key_of, md, rv_int

log = logs.get("informers")

Listener = Callable[[str, dict | None, dict | None], None]
MEMO_KEY = "volplane.slim"  # where an object's last slim value sits in Kopf's memo
OVERLAY_TTL = 120.0         # a written object the watch never confirmed is dropped then
TOMBSTONE_SECONDS = 300.0   # far longer than any response can lag behind the watch

NAMESPACES = Kind("", "v1", "namespaces", "Namespace", field_selector="metadata.name=default")


def handler_id(name: str) -> str:
    """Kopf handler and index ids: prefixed, so that no index (handed to every handler
    as a keyword argument by Kopf) can shadow one of Kopf's own (``body``, ``memo``)."""
    return f"volplane.{name}"


# --- what Kopf's Index looks like, for tests and before binding -------------------------


class MemoryIndex(Mapping[Hashable, list]):
    """An in-memory stand-in with the shape of Kopf's ``Index``: key -> values of the
    objects filed under it. Used by ``Informers.feed`` (tests, no Kopf)."""

    def __init__(self) -> None:
        self._items: dict[Hashable, dict[str, Any]] = {}
        self._reverse: dict[str, set[Hashable]] = {}

    def __getitem__(self, key: Hashable) -> list:
        return list(self._items[key].values())

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def replace(self, uid: str, values: Mapping[Hashable, Any]) -> None:
        self.discard(uid)
        for k, v in values.items():
            self._items.setdefault(k, {})[uid] = v
        if values:
            self._reverse[uid] = set(values)

    def discard(self, uid: str) -> None:
        for k in self._reverse.pop(uid, ()):
            store = self._items.get(k)
            if store is not None:
                store.pop(uid, None)
                if not store:
                    del self._items[k]


# --- listers ---------------------------------------------------------------------------


@dataclass
class _Entry:
    obj: dict | None   # None: a tombstone (the API said the object is gone)
    rv: int
    at: float


class Lister(Mapping[str, dict]):
    """Slim objects of one kind by key: Kopf's index, plus the controller's own writes
    until the watch confirms them. Objects are shared, never modified in place."""

    def __init__(self, kind: Kind, clock: Callable[[], float] = time.monotonic) -> None:
        self.kind = kind
        self.clock = clock
        self._source: Mapping[Hashable, Iterable[dict]] = MemoryIndex()
        self._overlay: dict[str, _Entry] = {}
        self._swept = 0.0
        # key -> (resourceVersion of its watched deletion, when), oldest first
        self._deleted: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def bind(self, source: Mapping[Hashable, Iterable[dict]]) -> None:
        self._source = source

    # -- reads --
    def _indexed(self, key: str) -> dict | None:
        try:
            values = self._source[key]
        except KeyError:
            return None
        best = None
        for v in values:  # two objects of one name: a deletion and a re-creation in flight
            if best is None or rv_int(v) > rv_int(best):
                best = v
        return best

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        base = self._indexed(key)
        e = self._overlay.get(key)
        if e is None:
            return default if base is None else base
        if base is not None and (rv_int(base) > e.rv or (
                rv_int(base) == e.rv and e.obj is not None)):
            del self._overlay[key]  # the watch has caught up
            return base
        if e.obj is None:
            if base is None:
                del self._overlay[key]
            return default
        return e.obj

    def __getitem__(self, key: str) -> dict:
        obj = self.get(key)
        if obj is None:
            raise KeyError(key)
        return obj

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def _keys(self) -> list[str]:
        # The kind's Kopf index also holds its derived indexes, under (name, key) tuples.
        return [k for k in list(self._source) if type(k) is str]

    def __iter__(self) -> Iterator[str]:
        for key in self._keys():
            if key in self._overlay:
                if self.get(key) is None:
                    continue
            yield key
        for key in [k for k in self._overlay if k not in self._source]:
            if self.get(key) is not None:
                yield key

    def __len__(self) -> int:
        n = len(self._keys())
        for key, e in self._overlay.items():
            indexed = key in self._source
            if e.obj is None and indexed:
                n -= 1
            elif e.obj is not None and not indexed:
                n += 1
        return n

    def items(self) -> Iterator[tuple[str, dict]]:  # type: ignore[override]
        for key in self._keys():
            obj = self.get(key) if key in self._overlay else self._indexed(key)
            if obj is not None:
                yield key, obj
        for key in [k for k in self._overlay if k not in self._source]:
            obj = self.get(key)
            if obj is not None:
                yield key, obj

    def values(self) -> Iterator[dict]:  # type: ignore[override]
        for _, obj in self.items():
            yield obj

    def pending(self) -> list[dict]:
        """Objects this process wrote that the watch has not brought yet."""
        return [e.obj for e in self._overlay.values() if e.obj is not None]

    # -- the controller's own writes --
    def put(self, body: Mapping[str, Any] | None) -> dict | None:
        """An object as the API just returned it (our write's response, or a fresh
        read): visible at once, until the watch brings it or something newer."""
        if not body:
            return None
        obj = self.kind.slimmer(body)
        obj.setdefault("apiVersion", self.kind.api_version)
        obj["kind"] = obj.get("kind") or self.kind.kind
        key, rv = key_of(obj), rv_int(obj)
        tomb = self._deleted.get(key)
        if tomb is not None:
            if rv and rv <= tomb[0]:
                return obj  # older than its watched deletion: a response that lagged it
            del self._deleted[key]  # a newer incarnation
        self._overlay[key] = _Entry(obj, rv, self.clock())
        return obj

    def gone(self, key: str, rv: int | None = None) -> None:
        """The API says the object is gone (404, or it lost its last finalizer)."""
        current = self.get(key)
        at = rv if rv is not None else rv_int(current)
        self._overlay[key] = _Entry(None, at, self.clock())

    def deleted(self, key: str, rv: int) -> None:
        """The watch brought the deletion of `key` at `rv` (Kopf's index has dropped it):
        remember it for TOMBSTONE_SECONDS so that no older copy is put back."""
        if not rv:
            return
        now = self.clock()
        self._deleted[key] = (rv, now)
        self._deleted.move_to_end(key)
        while self._deleted:
            oldest = next(iter(self._deleted.values()))
            if now - oldest[1] <= TOMBSTONE_SECONDS:
                break
            self._deleted.popitem(last=False)

    def caught_up(self, key: str, rv: int) -> None:
        """A watch event at `rv` was indexed: drop what it supersedes. Entries the watch
        never confirms (an object outside a field selector) expire after OVERLAY_TTL."""
        e = self._overlay.get(key)
        if e is not None and (rv > e.rv or (rv == e.rv and e.obj is not None)):
            del self._overlay[key]
        if self._overlay:
            now = self.clock()
            if now - self._swept > OVERLAY_TTL / 4:
                self._swept = now
                for k in [k for k, x in self._overlay.items() if now - x.at > OVERLAY_TTL]:
                    del self._overlay[k]


class IndexView:
    """A derived index (kinds.IndexSpec): key -> values of the objects filed under it.

    Kopf's index follows the watch; objects this process wrote and the watch has not
    brought yet (its lister's ``pending``) are filed too, so an attachment created a
    moment ago is found by its node. Values are object keys: resolve them through the
    lister, which also knows what was deleted a moment ago."""

    def __init__(self, spec: IndexSpec, lister: Lister) -> None:
        self.spec = spec
        self.lister = lister
        self._source: Mapping[Hashable, Iterable[Any]] = MemoryIndex()

    def bind(self, source: Mapping[Hashable, Iterable[Any]]) -> None:
        self._source = source

    def get(self, key: Hashable) -> list:
        try:
            out = list(self._source[(self.spec.name, key)])
        except KeyError:
            out = []
        for obj in self.lister.pending():
            if key in self.spec.keys(obj):
                v = self.spec.value(obj)
                if v not in out:
                    out.append(v)
        return out

    def keys(self) -> list[Hashable]:
        name = self.spec.name
        return [k[1] for k in list(self._source) if type(k) is tuple and k[0] == name]

    def __contains__(self, key: object) -> bool:
        return (self.spec.name, key) in self._source


# --- the registry of kinds, indexes and listeners ---------------------------------------


class Informers:
    """Every lister, derived index and listener of one process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.kinds: dict[str, Kind] = {}
        self.listers: dict[str, Lister] = {}
        self.specs: dict[str, IndexSpec] = {}
        self.views: dict[str, IndexView] = {}
        self.listeners: dict[str, list[Listener]] = {}
        self._memory: dict[str, MemoryIndex] = {}   # feed(): lister and spec sources
        self._memos: dict[tuple[str, str], dict] = {}
        self._events: dict[tuple[str, str | None], Any] = {}

    # -- declarations (controllers, at construction) --
    def lister(self, kind: Kind) -> Lister:
        if kind.plural not in self.listers:
            self.kinds[kind.plural] = kind
            self.listers[kind.plural] = Lister(kind, self.clock)
            self.listeners.setdefault(kind.plural, [])
        return self.listers[kind.plural]

    def index(self, spec: IndexSpec) -> IndexView:
        lister = self.lister(spec.kind)
        if spec.name not in self.views:
            self.specs[spec.name] = spec
            self.views[spec.name] = IndexView(spec, lister)
        return self.views[spec.name]

    def listen(self, kind: Kind, fn: Listener) -> None:
        self.lister(kind)
        self.listeners[kind.plural].append(fn)

    def specs_of(self, kind: Kind) -> list[IndexSpec]:
        return [s for s in self.specs.values() if s.kind.plural == kind.plural]

    # -- Kopf --
    def register(self, registry: Any) -> None:
        """The Kopf handlers of every kind: its index (lister and derived indexes) and
        the event handler that runs the listeners."""
        for kind in self.kinds.values():
            _register_kind(registry, self, kind, self.specs_of(kind))

    def bind(self, indices: Mapping[str, Any]) -> None:
        """Point every lister and view at its kind's Kopf index (Kopf hands them to
        every handler as keyword arguments, empty until populated)."""
        for plural, lister in self.listers.items():
            lister.bind(indices[handler_id(plural)])
        for view in self.views.values():
            view.bind(indices[handler_id(view.spec.kind.plural)])

    def on_event(self, kind: Kind, type_: str | None, body: Mapping[str, Any],
                 memo: Any) -> None:
        """One watch event, after Kopf has indexed it: run the listeners. Reads only
        the object's name, namespace, uid and resourceVersion (``held_event``)."""
        key = key_of(body)
        lister = self.listers[kind.plural]
        old = memo.get(MEMO_KEY)
        if type_ == "DELETED":
            new = None
            memo.pop(MEMO_KEY, None)
            lister.deleted(key, rv_int(body))
        else:
            uid = md(body).get("uid")
            new = None
            try:
                for v in lister._source[key]:
                    if md(v).get("uid") == uid:
                        new = v
                        break
            except KeyError:
                pass
            memo[MEMO_KEY] = new
        lister.caught_up(key, rv_int(body))
        counter = self._events.get((kind.plural, type_))
        if counter is None:
            counter = self._events[(kind.plural, type_)] = metrics.watch_events.labels(
                kind.plural, type_ or "LISTED")
        counter.inc()
        for fn in self.listeners[kind.plural]:
            fn(key, old, new)

    # -- without Kopf: play the watch (unit tests) --
    def _source(self, kind: Kind) -> MemoryIndex:
        src = self._memory.get(kind.plural)
        if src is None:
            src = self._memory[kind.plural] = MemoryIndex()
            self.listers[kind.plural].bind(src)
            for view in self.views.values():
                if view.spec.kind.plural == kind.plural:
                    view.bind(src)
        return src

    def feed(self, body: Mapping[str, Any], kind: Kind | None = None) -> None:
        """An ADDED/MODIFIED event of `body` (its kind from its ``kind`` field)."""
        kind = kind or next(k for k in self.kinds.values() if k.kind == body.get("kind"))
        uid = md(body).get("uid") or key_of(body)
        body = {**body, "metadata": {**md(body), "uid": uid}}
        self._source(kind).replace(uid, index_object(body, kind, self.specs_of(kind)))
        memo = self._memos.setdefault((kind.plural, uid), {})
        self.on_event(kind, "MODIFIED", body, memo)

    def delete(self, kind: Kind, key: str, rv: int | None = None) -> None:
        """A DELETED event of the object `key` (at resourceVersion `rv`: the deletion's,
        which the watch reports; by default the object's last)."""
        obj = self.listers[kind.plural]._indexed(key)
        if obj is None:
            return
        if rv is not None:
            obj = {**obj, "metadata": {**md(obj), "resourceVersion": str(rv)}}
        uid = md(obj).get("uid") or key
        self._source(kind).discard(uid)
        memo = self._memos.pop((kind.plural, uid), {})
        self.on_event(kind, "DELETED", obj, memo)


def index_object(body: Mapping[str, Any], kind: Kind, specs: list[IndexSpec]) -> dict:
    """What one object files in its kind's index: its slim self under its key, and its
    key (or ``spec.value``) under ``(spec.name, k)`` for every key of every derived index.
    Always a dict (maybe without derived keys): Kopf keeps an object's old keys when an
    index function returns None."""
    out: dict[Hashable, Any] = {key_of(body): kind.slimmer(body)}
    for spec in specs:
        keys = spec.keys(body)
        if keys:
            value = spec.value(body)
            for k in keys:
                out[(spec.name, k)] = value
    return out


HELD_METADATA = ("name", "namespace", "uid", "resourceVersion")


def held_event(raw_event: Mapping[str, Any]) -> dict:
    """What ``Informers.on_event`` reads of a watch event: its type and the object's
    name, namespace, uid and resourceVersion (everything else comes from the lister).
    The fast path keeps only this of an event held until the barrier opens
    (kopf_fastpath.reads_when_held), so the initial listing's bodies are not all held."""
    obj = raw_event["object"]
    meta = obj.get("metadata") or {}
    return {"type": raw_event["type"],
            "object": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
                       "metadata": {k: meta[k] for k in HELD_METADATA if k in meta}}}


def _register_kind(registry: Any, informers: Informers, kind: Kind,
                   specs: list[IndexSpec]) -> None:
    import kopf

    from .kopf_fastpath import reads_when_held

    @kopf.index(kind.group, kind.version, kind.plural, registry=registry,
                id=handler_id(kind.plural))
    async def index(body: Any, **_: Any) -> dict:
        # One shallow copy into a plain dict: the slimmer and the index functions then
        # read plain dicts, not Kopf's body views (every view access resolves a path).
        return index_object(dict(body), kind, specs)

    @kopf.on.event(kind.group, kind.version, kind.plural, registry=registry,
                   id=handler_id(f"{kind.plural}.events"))
    @reads_when_held(held_event)
    async def events(type: str | None, event: Any, memo: Any, **_: Any) -> None:  # noqa: A002
        # The raw event's object (a plain dict), not Kopf's ``body`` view: every key read
        # through a view resolves a path.
        informers.on_event(kind, type, event["object"], memo)
