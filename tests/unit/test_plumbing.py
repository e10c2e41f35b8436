"""Unit tests of the plumbing every controller shares: work queue, rate limit, CLI parsing."""

import asyncio

import pytest

from volplane.kube import TokenBucket
from volplane.runtime import parse_controllers
from volplane.workqueue import WorkQueue


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def run(coro):
    return asyncio.run(coro)


def test_queue_dedups_and_never_hands_a_key_to_two_workers():
    async def body():
        q = WorkQueue("t")
        q.add("a")
        q.add("a")
        q.add("b")
        assert len(q) == 2
        k1 = await q.get()
        assert k1 == "a"
        q.add("a")  # re-added while processing: parked, not handed out
        k2 = await q.get()
        assert k2 == "b"
        assert q._queue.empty()
        q.done("a")  # now it comes back once
        assert await q.get() == "a"
        q.done("a")
        q.done("b")
        assert q._queue.empty()
    run(body())


def test_queue_delays_and_backoff_use_the_injected_clock():
    async def body():
        clock = Clock()
        q = WorkQueue("t", base_delay=1.0, max_delay=4.0, clock=clock)
        assert q.add_rate_limited("x") == 1.0
        assert q.add_rate_limited("x") == 2.0
        assert q.add_rate_limited("x") == 4.0
        assert q.add_rate_limited("x") == 4.0
        assert q.pop_due() == []
        clock.t = 1.0
        assert q.pop_due() == ["x"]
        q.forget("x")
        assert q.failures("x") == 0
        if q._timer:
            q._timer.cancel()
    run(body())


def test_token_bucket_allows_burst_then_paces_at_qps():
    clock = Clock()
    b = TokenBucket(qps=10, burst=2, clock=clock)
    assert b.delay() == 0
    assert b.delay() == 0
    assert b.delay() == pytest.approx(0.1)
    clock.t = 1.0
    assert b.delay() == 0


@pytest.mark.parametrize("spec,want", [
    ("*", ["pv-binder"]),
    ("*,-pv-binder", []),
    ("pv-binder", ["pv-binder"]),
    ("", []),
])
def test_parse_controllers(spec, want):
    assert parse_controllers(spec, known={"pv-binder": "x"}) == want


def test_parse_controllers_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown controller 'nope'"):
        parse_controllers("*,nope", known={"pv-binder": "x"})


def test_queue_idle_means_nothing_queued_and_nothing_in_flight():
    async def body():
        q = WorkQueue("t")
        assert q.idle()
        q.add("a")
        assert not q.idle()
        k = await q.get()
        assert not q.idle()          # in flight
        q.done(k)
        assert q.idle()
        assert await q.wait_idle(timeout=0.1)
    run(body())


# -- a deleted object is the end of its work ------------------------------------------------
def _not_found(name, kind):
    from volplane.kube import ApiError
    return ApiError(404, "Not Found", {
        "kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404,
        "message": f'{kind} "{name}" not found', "details": {"name": name, "kind": kind}})


def test_is_gone_only_for_the_synced_object():
    from volplane.kube import ApiError
    from volplane.workqueue import is_gone
    claims = "persistentvolumeclaims"
    assert is_gone(_not_found("c1", claims), "ns/c1", claims)
    assert is_gone(_not_found("pv-1", "persistentvolumes"), "pv-1", "persistentvolumes")
    assert is_gone(_not_found("c1", claims), "ns/c1", None)
    # another object of the sync (the PV a claim binds to), or another kind of that name
    assert not is_gone(_not_found("pv-1", "persistentvolumes"), "ns/c1", claims)
    assert not is_gone(_not_found("c1", "persistentvolumes"), "ns/c1", claims)
    # a resource type that is not served (no details), other errors
    assert not is_gone(ApiError(404, "Not Found", {"details": {}}), "ns/c1", claims)
    assert not is_gone(ApiError(404, "Not Found", "404 page not found"), "ns/c1", claims)
    assert not is_gone(ApiError(409, "Conflict", {"details": {"name": "c1"}}), "ns/c1", claims)


class RecordingLog:
    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda event, **kw: self.lines.append((level, event, kw))


def _run_one(sync, key, queue):
    """Runs one worker until `key` was synced once, returns nothing."""
    from volplane.workqueue import process

    async def body():
        log = RecordingLog()
        queue.add(key)
        task = asyncio.create_task(process(queue, sync, controller="t", log=log))
        while queue._processing or len(queue):
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        task.cancel()
        if queue._timer:
            queue._timer.cancel()
        return log
    return run(body())


def test_a_claim_deleted_mid_sync_ends_its_work_without_a_warning():
    async def sync(key):
        raise _not_found("c1", "persistentvolumeclaims")

    async def go():
        q = WorkQueue("claims", resource="persistentvolumeclaims")
        return q
    q = run(go())
    log = _run_one(sync, "ns/c1", q)
    assert [line[0] for line in log.lines] == ["debug"], log.lines
    assert q.failures("ns/c1") == 0 and not q._delayed  # done: not retried


def test_a_404_about_another_object_is_still_a_failure_and_retried():
    async def sync(key):
        raise _not_found("pv-9", "persistentvolumes")

    async def go():
        return WorkQueue("claims", resource="persistentvolumeclaims")
    q = run(go())
    log = _run_one(sync, "ns/c1", q)
    assert [(line[0], line[1]) for line in log.lines] == [("warning", "sync failed")]
    assert q.failures("ns/c1") == 1 and q._delayed


def test_queue_reports_its_unfinished_keys_on_every_add_take_and_done():
    """The depth gauge follows the queue as it changes (waiting or being processed),
    not only at resync."""
    async def main():
        seen: list[int] = []
        q = WorkQueue("t", depth=seen.append)
        q.add("a")
        q.add("b")
        q.add("a")  # already waiting: unchanged
        assert seen[-1] == 2
        key = await q.get()
        assert seen[-1] == 2  # one waiting, one being processed
        q.add(key)  # re-added while processing: still one key, not two
        assert seen[-1] == 2
        q.done(key)  # back in the queue
        assert seen[-1] == 2
        for _ in range(2):
            q.done(await q.get())
        assert seen[-1] == 0
    asyncio.run(main())
