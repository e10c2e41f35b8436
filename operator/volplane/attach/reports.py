"""What each node's ``status.volumesAttached`` must say, and when to write it. Pure:
the caller passes the clock.

The report is the ATTACHED attachments of the node whose detach has not started.
``NodeReportSchedule`` coalesces the writes per node (docs/benchmarks.md, W3).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .actual import Actual, AState


def node_volumes_attached(asw: Iterable[Actual], node: str,
                          detaching: Iterable[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    """What ``node.status.volumesAttached`` must say: every ATTACHED attachment on the node
    whose detach has not started, sorted by name (so equal lists compare equal).

    ``devicePath`` is "" as upstream reports it for CSI volumes (csiAttacher.Attach
    returns no device path; the node plugin gets the attacher's attachmentMetadata as
    its publish context, not from here). A FlexVolume attachment (no VolumeAttachment:
    ``va_name`` empty) reports the driver's ``device``, as upstream's flex attacher."""
    skip = set(detaching)
    entries = {}
    for a in asw:
        if (a.node == node and a.state is AState.ATTACHED and a.unique_name
                and a.key not in skip):
            device = "" if a.va_name else a.device_path
            entries[a.unique_name] = {"name": a.unique_name, "devicePath": device}
    return [entries[k] for k in sorted(entries)]


def node_attach_in_progress(asw: Iterable[Actual], node: str,
                            desired: Iterable[tuple[str, str]] = ()) -> bool:
    """Whether an attachment on `node` is still on its way, so that its outcome will
    change the node's report again soon: one is ATTACHING (no attach error), or a
    volume desired there (`desired`: its (PV, node) keys) has no attachment yet."""
    present = set()
    for a in asw:
        if a.node != node:
            continue
        present.add(a.key)
        if a.state is AState.ATTACHING and not a.attach_error:
            return True
    return any(k[1] == node and k not in present for k in desired)


NODE_STATUS_DEBOUNCE = 0.1      # seconds from a change to its node's report
NODE_STATUS_MIN_INTERVAL = 1.0  # between two reports of a node while it attaches more


@dataclass
class _NodeReport:
    dirty_since: float | None = None    # first change not yet covered by a report
    due: float | None = None            # when the node's report is queued for
    in_flight: bool = False
    started: float = 0.0                # when the report in flight began
    last_write: float | None = None     # when the last report that wrote began


class NodeReportSchedule:
    """When to write each node's ``status.volumesAttached``: one write per node covers
    every change that arrived before it, and a burst of attachments on a node costs a
    few writes, not one per attachment (upstream's reconciler gets the same effect by
    writing node statuses one after the other once per loop).

    Per node: a change is reported `debounce` seconds after it arrives (so the changes
    of one moment share a write); while a report is in flight, changes accumulate and
    one report follows it; and while attachments on the node are still in progress
    (``busy``: their outcomes will need another write right after), reports of that node
    start at least `min_interval` apart. Once nothing is in progress on the node the
    last report goes out after the debounce only, so the tail of a burst is not held back.

    Pure bookkeeping: the caller passes the clock and queues the node after the delays
    returned here. Nothing in it is durable: the report itself is recomputed from the
    VolumeAttachments each time, and after a restart every node is reported once."""

    def __init__(self, debounce: float, min_interval: float):
        self.debounce = debounce
        self.min_interval = min_interval
        self.nodes: dict[str, _NodeReport] = {}

    def _target(self, r: _NodeReport, now: float, busy: bool) -> float:
        t = max(now, (r.dirty_since if r.dirty_since is not None else now) + self.debounce)
        if busy and r.last_write is not None:
            t = max(t, r.last_write + self.min_interval)
        return t

    def changed(self, node: str, now: float, busy: bool) -> float | None:
        """Something the node's report depends on changed. Returns the delay after which
        to queue the node, or None when a report already queued (or in flight) covers it."""
        r = self.nodes.setdefault(node, _NodeReport())
        if r.dirty_since is None:
            r.dirty_since = now
        if r.in_flight:
            return None  # finish() schedules the follow-up
        target = self._target(r, now, busy)
        if r.due is not None and r.due <= target:
            return None
        r.due = target  # first one, or sooner than queued (the node went quiet)
        return target - now

    def begin(self, node: str, now: float, force: bool = False) -> float | None:
        """A report is about to be computed and written. Returns None to go ahead (the
        report covers every change so far), or the seconds until it is due when a
        queued report came early (an earlier, superseded delay): the caller skips it,
        the node is queued for the later time already. `force` (the detach path, which
        must report before it deletes) goes ahead regardless."""
        r = self.nodes.setdefault(node, _NodeReport())
        if not force and r.due is not None and r.due > now + 1e-3:
            return r.due - now
        r.in_flight, r.started = True, now
        r.dirty_since = r.due = None
        return None

    def finish(self, node: str, now: float, wrote: bool, busy: bool) -> float | None:
        """The report is done (written or not needed, or failed: wrote=False). Returns
        the delay after which to queue the node again when changes arrived meanwhile."""
        r = self.nodes.get(node)
        if r is None:
            return None
        r.in_flight = False
        if wrote:
            r.last_write = r.started
        if r.dirty_since is None:
            return None
        r.due = self._target(r, now, busy)
        return r.due - now

    def forget(self, node: str) -> None:
        self.nodes.pop(node, None)
