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
