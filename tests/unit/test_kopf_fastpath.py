"""The second Kopf patch: the fast path indexes and handles exactly as Kopf's own path.

Each scenario runs the same watch streams through Kopf's own watcher (per-object workers,
process_resource_event) and through the fast path, and compares what the handlers saw
and what Kopf's indexes hold. The streams are played by replacing Kopf's
``watching.infinite_watch`` (the network), nothing else.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import kopf
import pytest
from kopf._cogs.aiokits import aiotoggles
from kopf._cogs.clients import watching
from kopf._cogs.structs import references
from kopf._core.actions import lifecycles
from kopf._core.engines import indexing, posting
from kopf._core.reactor import inventory, processing, queueing

from volplane import kopf_fastpath


def test_the_pinned_kopf_is_the_one_patched():
    """Fails when the pinned Kopf changes (version or the source of anything the fast
    path reproduces): then re-read that source, and re-pin or drop the patch."""
    assert kopf_fastpath.kopf_version() == kopf_fastpath.PATCHED_VERSION
    assert kopf_fastpath.original_source_digest() == kopf_fastpath.PINNED_DIGEST
    try:
        assert kopf_fastpath.apply()
        assert queueing.watcher is kopf_fastpath.watcher
    finally:
        kopf_fastpath.revert()
    assert queueing.watcher is kopf_fastpath._ORIGINAL_WATCHER


THINGS = references.Resource("", "v1", "things", kind="Thing", namespaced=True,
                             verbs=["list", "watch"])
OTHERS = references.Resource("", "v1", "others", kind="Other", namespaced=True,
                             verbs=["list", "watch"])


def obj(name: str, rv: int, *, uid: str | None = None, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Thing",
            "metadata": {"name": name, "namespace": "ns", "uid": uid or f"u-{name}",
                         "resourceVersion": str(rv), "labels": dict(labels)}}


def ev(type_: str | None, body: dict) -> dict:
    return {"type": type_, "object": body}


class Recorder:
    """The handlers of one operator: an indexer per kind, an event handler per kind.

    The indexer of THINGS files `name -> color` and follows the label `mode`:
    ``none`` returns None (Kopf keeps the old entries), ``boom`` raises (errors ignored:
    Kopf keeps them), ``perm`` raises PermanentError (Kopf discards them)."""

    def __init__(self) -> None:
        self.registry = kopf.OperatorRegistry()
        self.seen: list[tuple[str, str | None, str, Any]] = []
        self.early: list[str] = []  # handler calls before every kind was listed
        self.listed_all = False
        self.memos: dict[str, Any] = {}
        reg = self.registry

        @kopf.index("", "v1", "things", registry=reg, id="things")
        async def things(body: Any, name: str, labels: Any, **_: Any) -> Any:
            mode = labels.get("mode")
            if mode == "none":
                return None
            if mode == "boom":
                raise ValueError("boom")
            if mode == "perm":
                raise kopf.PermanentError("no")
            return {name: labels.get("color")}

        @kopf.index("", "v1", "others", registry=reg, id="others")
        async def others(name: str, **_: Any) -> Any:
            return name

        @kopf.on.event("", "v1", "things", registry=reg, id="things.events")
        async def on_thing(type: str | None, event: Any, memo: Any, **kwargs: Any) -> None:  # noqa: A002
            name = event["object"]["metadata"]["name"]
            idx = kwargs["things"]  # an index, as Kopf hands it (a catch-all that wants all)
            memo.setdefault("n", 0)
            memo["n"] += 1
            self.memos[name] = memo
            if not self.listed_all:
                self.early.append(name)
            self.seen.append(("things", type, name,
                              sorted((k, sorted(map(str, v))) for k, v in idx.items())))
            if name == "crash":
                raise RuntimeError("an event handler's error is logged, the stream goes on")

        @kopf.on.event("", "v1", "others", registry=reg, id="others.events")
        async def on_other(type: str | None, name: str, **_: Any) -> None:  # noqa: A002
            if not self.listed_all:
                self.early.append(name)
            self.seen.append(("others", type, name, None))


async def run(streams: dict[str, list], fast: bool, rec: Recorder, expected_calls: int,
              gate: asyncio.Event | None = None) -> indexing.OperatorIndexers:
    """Play `streams` (per plural: events, then LISTED where "LISTED" stands) through
    Kopf's watcher or the fast path. `gate`: the stream of OTHERS stops before its
    LISTED until it is set (a kind listed late)."""
    settings = kopf.OperatorSettings()
    settings.queueing.idle_timeout = 0.05
    settings.queueing.exit_timeout = 1.0
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage()
    indexers = indexing.OperatorIndexers()
    indexers.ensure(rec.registry._indexing.get_all_handlers())
    posting.settings_var.set(settings)
    operator_indexed = aiotoggles.ToggleSet(all)
    resources = {"things": THINGS, "others": OTHERS}
    toggles = {p: await operator_indexed.make_toggle(name=p) for p in resources}

    async def stream(*, resource: Any, **_: Any):
        for item in streams[resource.plural]:
            if item == "LISTED":
                if gate is not None and resource.plural == "others":
                    await gate.wait()
                    rec.listed_all = True
                yield watching.Bookmark.LISTED
            else:
                yield item
            await asyncio.sleep(0)
        await asyncio.Event().wait()

    saved = queueing.watching.infinite_watch
    queueing.watching.infinite_watch = stream
    processor = functools.partial(
        processing.process_resource_event, lifecycle=lifecycles.all_at_once,
        registry=rec.registry, settings=settings, indexers=indexers,
        memories=inventory.ResourceMemories(), memobase=kopf.Memo(), operator_paused=None,
        event_queue=asyncio.Queue())
    watcher = kopf_fastpath.watcher if fast else kopf_fastpath._ORIGINAL_WATCHER
    tasks = [asyncio.create_task(watcher(
        namespace=None, settings=settings, resource=res,
        processor=functools.partial(processor, resource=res),
        operator_indexed=operator_indexed, resource_indexed=toggles[p]))
        for p, res in resources.items()]
    try:
        for _ in range(400):
            await asyncio.sleep(0.01)
            if gate is not None and not gate.is_set() and len(rec.seen) == 0:
                if all(not t.done() for t in tasks) and _ > 20:
                    gate.set()  # nothing ran while OTHERS was unlisted: now list it
            if len(rec.seen) >= expected_calls:
                break
        await asyncio.sleep(0.1)  # nothing more may come
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        queueing.watching.infinite_watch = saved
    return indexers


def snapshot(indexers: indexing.OperatorIndexers) -> dict:
    return {i: sorted((str(k), sorted(map(str, v))) for k, v in indexers.indices[i].items())
            for i in indexers.indices}


def per_object(seen: list) -> dict:
    out: dict[str, list] = {}
    for plural, type_, name, _ in seen:
        out.setdefault(f"{plural}/{name}", []).append(type_)
    return out


def own_entries(seen: list) -> dict:
    out: dict[str, list] = {}
    for plural, type_, name, idx in seen:
        if plural == "things":
            out.setdefault(name, []).append((type_, [e for e in idx if e[0] == name]))
    return out


def both(streams: dict[str, list], expected: int, gated: bool = False) -> tuple:
    out = []
    for fast in (False, True):
        rec = Recorder()
        gate = asyncio.Event() if gated else None

        async def go(rec: Recorder = rec, gate: asyncio.Event | None = gate,
                     fast: bool = fast) -> Any:
            return await run(streams, fast, rec, expected, gate)

        indexers = asyncio.run(go())
        out.append((rec, snapshot(indexers)))
    return out[0], out[1]


STREAMS = {
    "things": [
        ev(None, obj("a", 1, color="red")),
        ev(None, obj("b", 2, color="blue")),
        ev(None, obj("c", 3, color="green")),
        "LISTED",
        ev("MODIFIED", obj("a", 10, color="pink")),
        ev("MODIFIED", obj("b", 11, mode="none")),      # None: b keeps "blue"
        ev("MODIFIED", obj("c", 12, mode="perm")),      # PermanentError: c is discarded
        ev("ADDED", obj("d", 13, color="black")),
        ev("MODIFIED", obj("d", 14, mode="boom")),      # ignored error: d keeps "black"
        ev("ADDED", obj("crash", 15, color="x")),       # its event handler raises
        ev("DELETED", obj("a", 16, color="pink")),      # gone from the index
        ev("ADDED", obj("e", 17, color="white")),       # the stream went on
    ],
    "others": [ev(None, {**obj("o1", 4), "kind": "Other"}), "LISTED",
               ev("ADDED", {**obj("o2", 18), "kind": "Other"})],
}


def test_the_fast_path_indexes_and_handles_as_kopf_does(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.ERROR)
    (kopf_rec, kopf_idx), (fast_rec, fast_idx) = both(STREAMS, expected=13)
    assert fast_idx == kopf_idx
    assert fast_idx["things"] == [
        ("b", ["blue"]), ("crash", ["x"]), ("d", ["black"]), ("e", ["white"])]
    assert fast_idx["others"] == [("None", ["o1", "o2"])]
    assert per_object(fast_rec.seen) == per_object(kopf_rec.seen)
    assert len(fast_rec.seen) == 13
    # each object's events, in order, with the per-object memo kept between them
    assert per_object(fast_rec.seen)["things/a"] == [None, "MODIFIED", "DELETED"]
    assert fast_rec.memos["a"]["n"] == 3 and kopf_rec.memos["a"]["n"] == 3
    # every event handler call sees the object's own index entry as Kopf's did (the
    # order across objects is Kopf's workers' concurrency, not a semantic)
    assert own_entries(fast_rec.seen) == own_entries(kopf_rec.seen)
    assert own_entries(fast_rec.seen)["a"] == [
        (None, [("a", ["red"])]), ("MODIFIED", [("a", ["pink"])]), ("DELETED", [])]
    # errors logged with Kopf's words, in both paths
    messages = [r.getMessage() for r in caplog.records]
    for words in ("'things' failed with an exception and will ignore it: boom",
                  "'things' failed permanently: no",
                  "'things.events' failed with an exception and will ignore it"):
        assert sum(words in m for m in messages) == 2, (words, messages)


def test_no_event_handler_runs_before_every_kind_is_listed():
    streams = {
        "things": [ev(None, obj("a", 1, color="red")), "LISTED",
                   ev("MODIFIED", obj("a", 5, color="blue")),   # before OTHERS is listed
                   ev("ADDED", obj("b", 6, color="green"))],
        "others": [ev(None, {**obj("o1", 2), "kind": "Other"}), "LISTED"],
    }
    (kopf_rec, kopf_idx), (fast_rec, fast_idx) = both(streams, expected=4, gated=True)
    for rec in (kopf_rec, fast_rec):
        assert rec.early == []                     # held until the barrier opened
        assert len(rec.seen) == 4
    assert fast_idx == kopf_idx
    assert per_object(fast_rec.seen) == per_object(kopf_rec.seen)
    # Kopf indexes an object's later events only after its held first one was handled:
    # the first call for "a" saw "red" in both paths, not the "blue" already streamed.
    first_a = [s[3] for s in fast_rec.seen if s[2] == "a"][0]
    assert first_a == [s[3] for s in kopf_rec.seen if s[2] == "a"][0]
    assert ("a", ["red"]) in first_a


def test_resources_with_other_handlers_keep_kopfs_path():
    reg = kopf.OperatorRegistry()

    @kopf.index("", "v1", "things", registry=reg)
    async def idx(**_: Any) -> None:
        return None

    @kopf.on.update("", "v1", "others", registry=reg)
    async def upd(**_: Any) -> None:
        return None

    @kopf.on.event("", "v1", "widgets", registry=reg, labels={"x": "y"})
    async def filtered(**_: Any) -> None:
        return None

    @kopf.on.event("", "v1", "gadgets", registry=reg)
    def sync_handler(**_: Any) -> None:
        return None

    widgets = references.Resource("", "v1", "widgets", namespaced=True)
    gadgets = references.Resource("", "v1", "gadgets", namespaced=True)
    assert kopf_fastpath.plan_for(reg, THINGS) is not None
    assert kopf_fastpath.plan_for(reg, OTHERS) is None    # a change-detecting handler
    assert kopf_fastpath.plan_for(reg, widgets) is None   # a filter
    assert kopf_fastpath.plan_for(reg, gadgets) is None   # a sync handler (Kopf: a thread)


def test_volplanes_own_handlers_take_the_fast_path():
    from volplane import kinds as K
    from volplane.informers import Informers

    inf = Informers()
    inf.index(K.PVS_BY_CLAIM)
    inf.listen(K.PODS, lambda *_: None)
    reg = kopf.OperatorRegistry()
    inf.register(reg)
    pvs = references.Resource("", "v1", "persistentvolumes", namespaced=False)
    pods = references.Resource("", "v1", "pods", namespaced=True)
    for res in (pvs, pods):
        plan = kopf_fastpath.plan_for(reg, res)
        assert plan is not None and len(plan[0]) == 1 and len(plan[1]) == 1


def test_volplanes_event_handlers_read_only_what_a_held_event_keeps():
    """The fast path keeps only informers.held_event of an event held until the barrier
    opens: Informers.on_event must do exactly the same with it as with the whole body."""
    from volplane import kinds as K
    from volplane.informers import MEMO_KEY, Informers, held_event, index_object

    def world() -> tuple[Informers, list]:
        inf = Informers(clock=lambda: 100.0)
        inf.index(K.PVS_BY_CLAIM)
        calls: list = []
        inf.listen(K.PVS, lambda key, old, new: calls.append((key, old, new)))
        return inf, calls

    pv = {"apiVersion": "v1", "kind": "PersistentVolume",
          "metadata": {"name": "pv-1", "uid": "u-1", "resourceVersion": "7",
                       "managedFields": [{"manager": "x"}], "labels": {"a": "b"}},
          "spec": {"capacity": {"storage": "1Gi"},
                   "claimRef": {"namespace": "ns", "name": "c", "uid": "cu"}},
          "status": {"phase": "Bound"}}
    results = []
    for trim in (False, True):
        inf, calls = world()
        memo: dict = {}
        inf.listers["persistentvolumes"].put({**pv, "metadata": {**pv["metadata"],
                                                                 "resourceVersion": "6"}})
        src = inf._source(K.PVS)
        for type_, rv in ((None, "7"), ("MODIFIED", "8"), ("DELETED", "9")):
            body = {**pv, "metadata": {**pv["metadata"], "resourceVersion": rv}}
            if type_ == "DELETED":
                src.discard("u-1")
            else:
                src.replace("u-1", index_object(body, K.PVS, inf.specs_of(K.PVS)))
            raw = {"type": type_, "object": body}
            seen = held_event(raw) if trim else raw
            inf.on_event(K.PVS, seen["type"], seen["object"], memo)
        lister = inf.listers["persistentvolumes"]
        results.append((calls, dict(lister._deleted), dict(lister._overlay), MEMO_KEY in memo))
    assert results[0] == results[1]
    calls = results[0][0]
    assert [c[0] for c in calls] == ["pv-1"] * 3 and calls[-1][2] is None
    assert results[0][1] == {"pv-1": (9, 100.0)}   # the deletion's tombstone, at its rv


def test_the_fast_path_keeps_a_held_event_trimmed_when_its_handlers_say_so():
    from volplane import kinds as K
    from volplane.informers import Informers, held_event

    inf = Informers()
    inf.listen(K.PVS, lambda *_: None)
    reg = kopf.OperatorRegistry()
    inf.register(reg)
    pvs = references.Resource("", "v1", "persistentvolumes", namespaced=False)
    plan = kopf_fastpath.plan_for(reg, pvs)
    assert plan is not None
    indexers = indexing.OperatorIndexers()
    indexers.ensure(reg._indexing.get_all_handlers())
    settings = kopf.OperatorSettings()
    fw = kopf_fastpath.FastWatcher(
        registry=reg, settings=settings, indexers=indexers, memobase=kopf.Memo(),
        event_queue=None, resource=pvs, indexing_handlers=plan[0],
        watching_handlers=plan[1])
    raw = {"type": None, "object": {"metadata": {"name": "a", "uid": "u", "resourceVersion": "1",
                                                 "managedFields": [{}]}, "spec": {}}}
    assert fw._trimmed(raw) == held_event(raw)
    assert "managedFields" not in fw._trimmed(raw)["object"]["metadata"]
    fin = {"type": None, "object": {"metadata": {
        "name": "a", "uid": "u", "finalizers": [settings.persistence.finalizer]}}}
    assert fw._trimmed(fin) is fin        # Kopf's finalizer: kept whole (housekeeping)
