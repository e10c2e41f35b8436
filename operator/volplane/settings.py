"""Every Kopf setting volplane uses, in one place, each with what it buys.

Kopf is the watch layer (informers.py): per watched kind it lists, watches, and runs
volplane's indexers and event handlers, inline in its watcher (kopf_fastpath.py) or,
with VOLPLANE_KOPF_FASTPATH=0, in one worker task per object. Its costs per object are
what these settings and that patch keep down; docs/benchmarks.md measures them.

What Kopf writes: nothing. volplane registers no on.create/update/delete, daemon or
timer handler, so Kopf never puts its progress or diff-base annotations or its
finalizer on a PV, PVC, Pod or Node; the storages are still volplane-owned keys so
that a stray handler could never collide with another Kopf operator's.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from . import logs
from .kinds import Kind

log = logs.get("settings")

# Kopf's retry pauses for a failed LIST/WATCH (or any) request. Their sum is how long
# Kopf tries one request before the stream starts over; the longest one bounds the
# silence between two failure reports (watchhealth.py).
ERROR_BACKOFFS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
CONNECT_TIMEOUT = 10.0
RECONNECT_BACKOFF = 1.0


class NoDiffBase(kopf.DiffBaseStorage):
    """Stores nothing and builds nothing.

    Kopf computes a diff-base ("essence") of every body on every event before it looks
    for change-detecting handlers (on.create/update/resume): a deep copy of the body
    minus some fields, plus a read of the last-handled-configuration annotation.
    volplane has no such handler, so both are pure cost; this returns None for both
    and Kopf's diff of None and None is empty.
    """

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:  # noqa: ARG002
        return None

    def fetch(self, *, body: Any) -> Any:  # noqa: ARG002
        return None

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:  # noqa: ARG002
        return None


def configure(settings: kopf.OperatorSettings, kinds: list[Kind], *,
              initial_streaming: bool = True, server_timeout: int = 300) -> None:
    # posting: off. Kopf's poster takes one reporting component for the whole operator
    # and creates a new Event for every call; volplane's events (events.py) carry the
    # upstream component of each controller and are deduplicated and counted the way
    # client-go's EventCorrelator does.
    settings.posting.enabled = False
    settings.posting.level = logging.WARNING

    # persistence: no change-detecting handlers, so no diff-base to keep (see NoDiffBase);
    # the keys stay volplane's own.
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="volplane.io")
    settings.persistence.finalizer = "volplane.io/kopf-finalizer"

    # watching:
    # - initial_streaming: the initial state comes as a stream of single objects
    #   (WatchList, sendInitialEvents) instead of a LIST response: no page of 500
    #   bodies is ever decoded at once, and the watch starts where the listing ended.
    #   Needs Kubernetes >= 1.34 (the wiring turns it off against older servers);
    # - chunk_size: otherwise the LIST is paginated (500 objects a page, like
    #   client-go does), so the largest response held at once is one page, not
    #   every PV of the cluster;
    # - server_timeout: the API server ends each watch after this many seconds and Kopf
    #   continues from the last resourceVersion it saw (bookmarks included: no re-list);
    # - inactivity_timeout: no event and no bookmark (sent every minute) for this long
    #   means a stuck connection: Kopf re-opens it;
    # - field_selectors: kinds whose objects volplane never needs are filtered by the
    #   API server (Pods that finished: kinds.PODS), so they cost no memory here.
    settings.watching.initial_streaming = initial_streaming
    settings.watching.chunk_size = 500
    settings.watching.server_timeout = server_timeout
    settings.watching.client_timeout = server_timeout + 30
    settings.watching.connect_timeout = CONNECT_TIMEOUT
    settings.watching.reconnect_backoff = RECONNECT_BACKOFF
    settings.watching.inactivity_timeout = 70.0
    for kind in kinds:
        if kind.field_selector:
            settings.watching.field_selectors[(kind.group, kind.version, kind.plural)] = (
                kind.field_selector)

    # queueing (Kopf's own event path only: the fast path, kopf_fastpath.py, runs no
    # per-object worker): Kopf runs one worker task per object that has events to process; it
    # ends idle_timeout seconds after the object's last event. Kopf's default is 5 s;
    # volplane's handlers only index and enqueue, so a worker has nothing to wait for:
    # ending it after 1 s frees its task, queue and the last full body it holds much
    # sooner (at start-up, one per object). No worker limit: a limit below the number
    # of objects can deadlock the initial indexing (every worker waits for all).
    settings.queueing.worker_limit = None
    settings.queueing.idle_timeout = 1.0
    settings.queueing.exit_timeout = 2.0

    # scanning: off. The watched kinds are fixed when volplane starts (the controllers
    # say which); Kopf need not watch every CustomResourceDefinition and Namespace of
    # the cluster to discover new ones. (A CRD installed later needs a restart.)
    settings.scanning.disabled = True

    # networking: the retry pauses above; no request waits longer than a minute.
    settings.networking.error_backoffs = ERROR_BACKOFFS
    settings.networking.connect_timeout = CONNECT_TIMEOUT
    settings.networking.request_timeout = 60

    # peering: off. High availability is a coordination.k8s.io Lease (leader.py);
    # Kopf's peering is not leader election.
    settings.peering.standalone = True
    settings.peering.mandatory = False


async def initial_streaming(kube: Any, mode: str = "auto") -> bool:
    """Stream the initial state (WatchList) when the server has it (>= 1.34)."""
    if mode != "auto":
        return mode == "stream"
    try:
        v = await kube.get("/version")
        major, minor = int(v.get("major") or 0), int(str(v.get("minor") or 0).rstrip("+"))
    except Exception as e:  # noqa: BLE001 - any doubt: the paginated LIST always works
        log.warning("cannot read the server version; listing", error=str(e))
        return False
    return (major, minor) >= (1, 34)


def reconnect_quiet() -> float:
    """Seconds without a failure report after which a failing stream has recovered:
    longer than Kopf's longest pause between two attempts plus one connect timeout."""
    return max(ERROR_BACKOFFS) + CONNECT_TIMEOUT + RECONNECT_BACKOFF + 5.0
