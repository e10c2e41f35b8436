"""The reflector's list/watch bookkeeping, against a scripted API (no network).

The real API server is exercised by the e2e suite (every e2e test runs on
reflector-fed caches); these pin the corner cases that are hard to provoke
there: continue-token expiry, deletions missed while not watching, 410 Gone.
"""

from __future__ import annotations

import asyncio

import pytest

from volplane.cache import Store
from volplane.kube import ApiError
from volplane.reflector import Gone, Reflector, Reflectors, api_path


def pv(name, rv):
    return {"metadata": {"name": name, "resourceVersion": str(rv)}, "spec": {}}


class ScriptedKube:
    """Serves LIST pages from `pages` and watch streams from `streams`, in order."""

    def __init__(self, pages, streams=()):
        self.pages = list(pages)
        self.streams = list(streams)
        self.queries: list[dict] = []

    async def get(self, path, query=None):
        self.queries.append(dict(query or {}))
        page = self.pages.pop(0)
        if isinstance(page, Exception):
            raise page
        return page

    async def stream(self, path, query, read_timeout):
        self.queries.append(dict(query))
        if not self.streams:
            await asyncio.Event().wait()  # a watch with nothing to say
        for event in self.streams.pop(0):
            if isinstance(event, Exception):
                raise event
            yield event


def page(items, rv, cont=None):
    return {"items": items, "metadata": {"resourceVersion": str(rv), "continue": cont}}


def reflector(kube, store=None, **kw):
    store = Store("PersistentVolume") if store is None else store
    return Reflector(kube, store, group="", version="v1",
                     plural="persistentvolumes", kind="PersistentVolume", **kw)


def test_api_paths():
    assert api_path("", "v1", "pods") == "/api/v1/pods"
    assert api_path("storage.k8s.io", "v1", "csidrivers") == "/apis/storage.k8s.io/v1/csidrivers"


def test_list_follows_continue_tokens_and_sets_kind():
    kube = ScriptedKube([page([pv("a", 5), pv("b", 6)], 10, cont="t1"), page([pv("c", 7)], 10)])
    r = reflector(kube, page_size=2)
    rv = asyncio.run(r.list())
    assert rv == "10"
    assert sorted(r.store) == ["a", "b", "c"]
    assert r.store["c"]["kind"] == "PersistentVolume" and r.store["c"]["apiVersion"] == "v1"
    assert kube.queries == [{"limit": 2, "continue": None}, {"limit": 2, "continue": "t1"}]


def test_expired_continue_token_restarts_the_list():
    gone = ApiError(410, "Gone", {"reason": "Expired"})
    kube = ScriptedKube([page([pv("a", 5)], 10, cont="t1"), gone,
                         page([pv("a", 5), pv("b", 11)], 12)])
    r = reflector(kube)
    assert asyncio.run(r.list()) == "12"
    assert sorted(r.store) == ["a", "b"]
    assert kube.queries[-1]["continue"] is None


def test_relist_drops_what_was_deleted_but_keeps_newer_writes():
    store = Store("PersistentVolume")
    store.upsert(pv("gone", 3))
    store.upsert(pv("written-after-snapshot", 25))  # a write-through newer than the LIST
    kube = ScriptedKube([page([pv("kept", 4)], 20)])
    r = reflector(kube, store)
    asyncio.run(r.list())
    assert sorted(store) == ["kept", "written-after-snapshot"]


def test_watch_applies_events_and_returns_last_rv():
    store = Store("PersistentVolume")
    store.upsert(pv("a", 5))
    events = [{"type": "ADDED", "object": pv("b", 11)},
              {"type": "MODIFIED", "object": pv("a", 12)},
              {"type": "DELETED", "object": pv("b", 13)},
              {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "20"}}}]
    kube = ScriptedKube([], [events])
    r = reflector(kube, store)
    assert asyncio.run(r.watch("10")) == "20"
    assert sorted(store) == ["a"] and store["a"]["metadata"]["resourceVersion"] == "12"
    assert kube.queries[0]["resourceVersion"] == "10"
    assert kube.queries[0]["allowWatchBookmarks"] == "true"


def test_watch_error_410_is_gone_other_errors_are_api_errors():
    r = reflector(ScriptedKube([], [[{"type": "ERROR", "object": {"code": 410}}]]))
    with pytest.raises(Gone):
        asyncio.run(r.watch("1"))
    r = reflector(ScriptedKube([], [[{"type": "ERROR", "object": {"code": 500,
                                                                   "reason": "x"}}]]))
    with pytest.raises(ApiError):
        asyncio.run(r.watch("1"))


def test_run_lists_again_after_gone_and_reports_synced():
    kube = ScriptedKube(
        [page([pv("a", 5)], 10), page([pv("b", 15)], 16)],
        [[{"type": "ERROR", "object": {"code": 410}}]])
    store = Store("PersistentVolume")
    r = reflector(kube, store)
    group = Reflectors()
    group.add(r)

    async def scenario():
        task = asyncio.create_task(r.run())
        await asyncio.wait_for(group.wait_synced(), 1)
        for _ in range(100):  # until the second LIST has been applied
            if "b" in store:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert group.synced.is_set()
    assert sorted(store) == ["b"]  # "a" was deleted while the watch was gone
    assert group.status()["persistentvolumes"]["resourceVersion"] == "16"
