"""Kubernetes Events, posted the way client-go's recorder does, deduplicated.

Controllers call `recorder.emit(obj, type, reason, message)`; posting is done
by a background task so a decision never waits for its event. As client-go's
EventCorrelator: the same (object, type, reason, message) again bumps the existing
Event's count and lastTimestamp instead of creating a new object (so an event upstream
posts on every sync, like ExternalProvisioning, reads "x3 over 30s" in kubectl
describe), and a spam filter per (component, object, type) lets a burst of `burst`
(25) through, then one per `quiet_period` (5 minutes) - client-go's
EventSourceObjectSpamFilter (burst 25, one token per 300 s).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from . import logs, metrics
from .kube import ApiError, Kube
from .objects import now_rfc3339

log = logs.get("events")


@dataclass
class _Seen:
    name: str
    namespace: str
    count: int
    posted_at: float


@dataclass
class _Bucket:
    tokens: float
    at: float


class EventRecorder:
    def __init__(self, kube: Kube, component: str, *, quiet_period: float = 300.0,
                 burst: int = 25, clock=time.monotonic, max_cache: int = 20000):
        self.kube = kube
        self.component = component
        self.quiet_period = quiet_period
        self.burst = burst
        self.clock = clock
        self.max_cache = max_cache
        self.seen: dict[tuple, _Seen] = {}
        self.spam: dict[tuple, _Bucket] = {}
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=10000)
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.create_task(self._run(), name="event-recorder")

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()

    def emit(self, obj: dict, type_: str, reason: str, message: str,
             component: str | None = None) -> bool:
        """Queue an Event about obj. Returns False when it was deduplicated."""
        md = obj.get("metadata", {})
        key = (md.get("uid"), type_, reason, message)
        now = self.clock()
        prev = self.seen.get(key)
        if not self._allowed((component or self.component, md.get("uid"), type_), now):
            return False
        if len(self.seen) > self.max_cache:
            self.seen.clear()
            self.spam.clear()
        try:
            self.queue.put_nowait((obj, type_, reason, message, key, now, component))
        except asyncio.QueueFull:
            return False
        # Reserve the slot now so bursts of the same event before posting collapse too.
        self.seen[key] = prev or _Seen("", md.get("namespace") or "default", 0, now)
        self.seen[key].posted_at = now
        return True

    def _allowed(self, spam_key: tuple, now: float) -> bool:
        """client-go's spam filter: a token bucket per (component, object, type)."""
        bucket = self.spam.get(spam_key)
        if bucket is None:
            bucket = self.spam[spam_key] = _Bucket(float(self.burst), now)
        else:
            refill = (now - bucket.at) / self.quiet_period if self.quiet_period > 0 else 1.0
            bucket.tokens = min(float(self.burst), bucket.tokens + refill)
            bucket.at = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    async def _run(self) -> None:
        while True:
            item = await self.queue.get()
            try:
                await self._post(*item)
            except asyncio.CancelledError:
                raise
            except ApiError as e:
                if _namespace_gone(e):  # its object went with it: nothing to tell
                    log.debug("event dropped, namespace gone", reason=item[2],
                              error=str(e))
                else:
                    log.warning("event post failed", reason=item[2], error=str(e))
            except Exception as e:  # an event is never worth crashing a controller for
                log.warning("event post failed", reason=item[2], error=str(e))

    async def _post(self, obj, type_, reason, message, key, now, component) -> None:
        component = component or self.component
        md = obj.get("metadata", {})
        ns = md.get("namespace") or "default"
        seen = self.seen.get(key)
        ts = now_rfc3339()
        if seen and seen.name:
            seen.count += 1
            try:
                await self.kube.merge_patch(
                    f"/api/v1/namespaces/{seen.namespace}/events/{seen.name}",
                    {"count": seen.count, "lastTimestamp": ts})
                return
            except ApiError as e:
                if not e.not_found:
                    raise
        name = f"{md.get('name')}.{time.time_ns():x}"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": ns},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", "v1"),
                "kind": obj.get("kind"),
                "name": md.get("name"),
                "namespace": md.get("namespace"),
                "uid": md.get("uid"),
                "resourceVersion": md.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message,
            "source": {"component": component},
            "reportingComponent": f"volplane.io/{component}",
            "reportingInstance": component,
            "firstTimestamp": ts,
            "lastTimestamp": ts,
            "count": 1,
        }
        await self.kube.create(f"/api/v1/namespaces/{ns}/events", body)
        self.seen[key] = _Seen(name, ns, 1, now)
        metrics.events_posted.labels(type_, reason).inc()


def _namespace_gone(e: ApiError) -> bool:
    """The Event's namespace was deleted (404 naming it) or is being deleted (403)."""
    body = e.body if isinstance(e.body, dict) else {}
    details = body.get("details") or {}
    if e.status == 404 and details.get("kind") == "namespaces":
        return True
    return e.status == 403 and "being terminated" in str(body.get("message") or "")
