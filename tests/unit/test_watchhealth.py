"""Watch-stream liveness from Kopf's own failure reports (watchhealth.py)."""

import inspect
import logging

import pytest
from kopf._cogs.clients import api as kopf_api
from kopf._cogs.clients import watching as kopf_watching

from volplane import kinds
from volplane.watchhealth import KOPF_WATCH_LOGGER, WatchHealth

URL = "https://127.0.0.1:36443/api/v1/persistentvolumes?watch=true&allowWatchBookmarks=true"


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def health(budget=30.0, quiet=20.0):
    clock = Clock()
    h = WatchHealth(budget=budget, quiet=quiet, clock=clock)
    h.watch([kinds.PVS, kinds.PODS])
    return h, clock


def fail(h, url=URL, n=1):
    h.record(f"Request attempt #{n}/7 failed; will retry: GET {url} -> "
             "ClientConnectorError('Cannot connect')")


def test_a_stream_failing_longer_than_the_budget_is_dead():
    h, clock = health(budget=30, quiet=20)
    for t in range(0, 45, 5):   # Kopf retries every few seconds
        clock.t = t
        fail(h)
        assert h.dead() == ([] if t <= 30 else ["persistentvolumes"])
    assert h.report()["pods"]["failing_s"] is None


def test_a_sign_of_life_or_silence_ends_the_failure():
    h, clock = health(budget=10, quiet=20)
    fail(h)
    clock.t = 15
    fail(h)
    assert h.dead() == ["persistentvolumes"]
    h.alive("persistentvolumes")                 # an event of the kind arrived
    assert h.dead() == []
    clock.t = 16
    fail(h)
    clock.t = 28
    h.record(f"Request attempt #3/7 succeeded: GET {URL}")
    assert h.dead() == []
    fail(h)
    clock.t = 60                                  # no failure for longer than `quiet`
    assert h.dead() == [] and h.report()["persistentvolumes"]["failing_s"] is None


def test_other_urls_and_messages_are_ignored():
    h, clock = health(budget=0)
    fail(h, url="https://x/apis/coordination.k8s.io/v1/leases")
    h.record("Watch-stream for persistentvolumes cluster-wide is inactive, reconnecting.")
    clock.t = 1
    assert h.dead() == []


def test_the_kopf_logger_is_heard():
    h, clock = health(budget=0)
    handler = h.attach()
    try:
        logging.getLogger(KOPF_WATCH_LOGGER).error(
            f"Request attempt #1/7 failed; escalating: GET {URL} -> TimeoutError()")
        clock.t = 1
        assert h.dead() == ["persistentvolumes"]
    finally:
        logging.getLogger(KOPF_WATCH_LOGGER).removeHandler(handler)


@pytest.mark.parametrize("fragment", [
    'f"Request attempt {idx} failed; will retry: {what} -> {e!r}"',
    'f"Request attempt {idx} failed; escalating: {what} -> {e!r}"',
    'f"Request attempt {idx} succeeded: {what}"',
    'what = f"{method.upper()} {url}"',
])
def test_the_pinned_kopf_reports_attempts_as_parsed_here(fragment):
    """Fails when the pinned Kopf changes the messages WatchHealth reads."""
    assert fragment in inspect.getsource(kopf_api.request)


def test_the_pinned_kopf_lists_and_watches_with_the_watching_logger():
    src = inspect.getsource(kopf_watching)
    assert kopf_watching.logger.name == KOPF_WATCH_LOGGER
    assert "api.stream(" in src and "logger=logger" in src
    assert "fetching.fetch_objs(\n                logger=logger" in src
