"""Is every watch stream alive? The answer behind /healthz.

Kopf re-opens a broken watch by itself and never gives up: a LIST or WATCH request is
retried with ``settings.networking.error_backoffs``, and when those are spent the
stream simply starts over. So with the API server unreachable (a partition, a
blackholed route) the streams are dead while the event loop still answers /healthz.

Kopf reports every failed attempt of those requests as an ERROR record on its watching
logger, naming the URL (``Request attempt #3/9 failed; will retry: GET <url> -> ...``).
``WatchHealth`` listens to that logger (a logging handler: nothing in Kopf is patched),
maps the URL to the watched kind, and keeps per kind since when its stream has been
failing. A stream counts as alive again on any sign of life: a watch event of the kind
(the informers report them), a ``succeeded`` record of a retried request, or no failure
for longer than Kopf's longest retry pause (Kopf logs failures only, so silence after a
retry means the request went through).

``dead()`` names the kinds failing for longer than the reconnect budget; the Kopf probe
registered in runtime.py then fails and /healthz answers 500, so the kubelet restarts the
pod, which lists everything afresh. ``tests/unit/test_watchhealth.py`` pins the Kopf
messages this relies on to the pinned Kopf's source.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from . import metrics
from .kinds import Kind

KOPF_WATCH_LOGGER = "kopf._cogs.clients.watching"
_ATTEMPT = re.compile(
    r"^Request attempt #\S+ (?P<outcome>failed|succeeded)[^:]*: (?P<method>[A-Z]+) (?P<url>\S+)")


@dataclass
class _Stream:
    failing_since: float | None = None
    last_failure: float | None = None
    last_error: str = ""


class WatchHealth:
    def __init__(self, budget: float, quiet: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`budget`: seconds a stream may fail before it counts as dead; `quiet`: seconds
        without a failure after which a failing stream counts as recovered (longer than
        Kopf's longest pause between two attempts)."""
        self.budget = budget
        self.quiet = quiet
        self.clock = clock
        self._paths: dict[str, str] = {}
        self.streams: dict[str, _Stream] = {}

    def watch(self, kinds: Iterable[Kind]) -> None:
        for kind in kinds:
            self._paths[kind.path()] = kind.plural
            self.streams.setdefault(kind.plural, _Stream())

    # -- signals --
    def failed(self, plural: str, error: str = "") -> None:
        s = self.streams.setdefault(plural, _Stream())
        now = self.clock()
        if s.failing_since is None or s.last_failure is None or now - s.last_failure > self.quiet:
            s.failing_since = now
        s.last_failure = now
        s.last_error = error[:300]
        metrics.watch_errors.labels(plural).inc()

    def alive(self, plural: str) -> None:
        s = self.streams.get(plural)
        if s is not None and s.failing_since is not None:
            s.failing_since = s.last_failure = None
            s.last_error = ""

    def record(self, message: str) -> None:
        """One message of Kopf's watching logger."""
        m = _ATTEMPT.match(message)
        if m is None:
            return
        plural = self._paths.get(urlsplit(m.group("url")).path)
        if plural is None:
            return
        if m.group("outcome") == "failed":
            self.failed(plural, message)
        else:
            self.alive(plural)

    # -- verdict --
    def _failing_for(self, s: _Stream, now: float) -> float | None:
        if s.failing_since is None or s.last_failure is None:
            return None
        if now - s.last_failure > self.quiet:
            s.failing_since = s.last_failure = None  # went quiet: the retry got through
            return None
        return now - s.failing_since

    def report(self) -> dict[str, dict]:
        now = self.clock()
        out = {}
        for plural, s in sorted(self.streams.items()):
            failing = self._failing_for(s, now)
            out[plural] = {"failing_s": None if failing is None else round(failing, 1),
                           "dead": failing is not None and failing > self.budget,
                           "error": s.last_error}
        return out

    def dead(self) -> list[str]:
        return [p for p, r in self.report().items() if r["dead"]]

    # -- wiring --
    def attach(self, logger_name: str = KOPF_WATCH_LOGGER) -> logging.Handler:
        """Listen to Kopf's watching logger. Its DEBUG records (``succeeded``) must be
        created to be seen, so that logger is set to DEBUG and stops propagating; the
        records Kopf's other loggers would print are passed on to the root handlers."""
        handler = _Handler(self)
        lg = logging.getLogger(logger_name)
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
        return handler


class _Handler(logging.Handler):
    def __init__(self, health: WatchHealth) -> None:
        super().__init__(logging.DEBUG)
        self.health = health

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.health.record(record.getMessage())
        except Exception:  # noqa: BLE001 - a probe must never break Kopf's logging
            self.handleError(record)
        # Pass on what Kopf's other loggers would print (logs.configure sets "kopf").
        if record.levelno >= logging.getLogger("kopf").getEffectiveLevel():
            for h in logging.getLogger().handlers:
                if record.levelno >= h.level:
                    h.handle(record)
