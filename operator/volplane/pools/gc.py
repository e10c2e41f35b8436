"""The pool driver's garbage collector: allocation records nobody will use again.

Provisioning writes the StorageAllocation record before the PV. A crash between the
two, with the claim deleted before the restart, leaves a record with no PV and no claim
of its uid: an orphan holding pool space. This job deletes such records once the record
is ORPHAN_GRACE seconds old (its own creationTimestamp, so an operator restarting more
often than the grace still frees it; issue 15) and the API server confirms it (the
listers may lag). Records whose provision() runs in this process right now are
skipped. The DELETE carries the record's uid as a precondition. It runs once at start,
then every GC_PERIOD.
"""

from __future__ import annotations

import asyncio
import time

from .. import logs
from ..kube import ApiError, get_or_none, pv_path, pvc_path
from ..node import backing
from .context import PoolContext
from .records import ORPHAN_GRACE, alloc_path, orphan_due

log = logs.get("pool-provisioner")
GC_PERIOD = 15.0
__all__ = ["GC_PERIOD", "ORPHAN_GRACE", "GarbageCollector", "orphan_due"]


class GarbageCollector:
    name = "pool-provisioner"

    def __init__(self, pc: PoolContext, *, wall=time.time):
        self.pc = pc
        self.kube = pc.kube
        self.events = pc.events
        self.pvs = pc.pvs
        self.pvcs = pc.pvcs
        self.classes = pc.classes
        self.pools = pc.pools
        self.allocations = pc.allocations
        self.nodes = pc.nodes
        self.ledger = pc.ledger
        self.wall = wall  # record ages (creationTimestamp): the wall clock

    async def run(self) -> None:
        """Once at start (an operator restarted more often than GC_PERIOD still collects),
        then every GC_PERIOD."""
        while True:
            try:
                await self.collect_orphans()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("allocation GC failed", error=str(e))
            await asyncio.sleep(GC_PERIOD)

    def _orphaned(self, name: str, record: dict) -> bool:
        if name in self.pvs:
            return False
        if backing.RETAINED_ANNOTATION in (record["metadata"].get("annotations") or {}):
            return False  # a retained volume: freed only by deleting its record
        ref = (record.get("spec") or {}).get("claim") or {}
        claim = self.pvcs.get(f"{ref.get('namespace')}/{ref.get('name')}")
        if claim is None or claim["metadata"].get("uid") != ref.get("uid"):
            return True
        bound_to = (claim.get("spec") or {}).get("volumeName")
        return bool(bound_to) and bound_to != name

    async def _confirmed(self, name: str, record: dict) -> bool:
        """The listers may lag: ask the API server that the PV is gone and the claim is
        gone, re-created, or bound to another volume."""
        if await get_or_none(self.kube, pv_path(name)) is not None:
            return False
        ref = record["spec"]["claim"]
        live = await get_or_none(self.kube, pvc_path(ref["namespace"], ref["name"]))
        if live is None:
            return True
        mine = live["metadata"].get("uid") == ref["uid"]
        return not (mine and (live.get("spec") or {}).get("volumeName") in (None, "", name))

    async def collect_orphans(self) -> list[str]:
        """Delete records with no PV whose claim is gone, once ORPHAN_GRACE old.

        The grace is measured from the record's own creationTimestamp, not from when
        this process first saw it orphaned: an in-memory timer restarts with the
        process, so an operator restarting more often than the grace never freed
        anything (issue 15). What the grace protects is a provisioning in flight (the
        PV is written right after the record): a record that old has none, except one
        whose provision() runs here right now (skipped)."""
        now = self.wall()
        freed = []
        for name, record in list(self.allocations.items()):
            if name in self.pc.provisioning or not self._orphaned(name, record):
                continue
            if not orphan_due(record, now, ORPHAN_GRACE):
                continue
            if not await self._confirmed(name, record):
                continue
            ref = record["spec"]["claim"]
            try:
                await self.kube.request("DELETE", alloc_path(name), {
                    "kind": "DeleteOptions", "apiVersion": "v1",
                    "preconditions": {"uid": record["metadata"].get("uid")}})
            except ApiError as e:
                if not (e.not_found or e.conflict):
                    raise
            self.pc.released(name)
            freed.append(name)
            log.info("orphaned allocation freed", name=name, pool=record["spec"].get("pool"),
                     claim=f"{ref['namespace']}/{ref['name']}", action="gc")
        return freed
