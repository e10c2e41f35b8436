"""The pool driver's garbage collector: allocation records nobody will use again.

Provisioning writes the StorageAllocation record before the PV. A crash between the
two, with the claim deleted before the restart, leaves a record with no PV and no claim
of its uid: an orphan holding pool space. This job deletes such records once they have
looked orphaned for ORPHAN_GRACE seconds and the API server confirms it (the listers
may lag). The DELETE carries the record's uid as a precondition.
"""

from __future__ import annotations

import asyncio
import time

from .. import logs
from ..kube import ApiError, pv_path, pvc_path
from ..node import backing
from .context import PoolContext
from .records import alloc_path

log = logs.get("pool-provisioner")
ORPHAN_GRACE = 30.0      # seconds an allocation record must look orphaned before GC
GC_PERIOD = 15.0


class GarbageCollector:
    name = "pool-provisioner"

    def __init__(self, pc: PoolContext, *, clock=time.monotonic):
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
        self.clock = clock
        self._orphans: dict[str, float] = {}  # allocation -> first time seen orphaned

    async def run(self) -> None:
        while True:
            await asyncio.sleep(GC_PERIOD)
            try:
                await self.collect_orphans()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("allocation GC failed", error=str(e))

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
        try:
            await self.kube.get(pv_path(name))
            return False
        except ApiError as e:
            if not e.not_found:
                raise
        ref = record["spec"]["claim"]
        try:
            live = await self.kube.get(pvc_path(ref["namespace"], ref["name"]))
        except ApiError as e:
            if not e.not_found:
                raise
            return True
        mine = live["metadata"].get("uid") == ref["uid"]
        return not (mine and (live.get("spec") or {}).get("volumeName") in (None, "", name))

    async def collect_orphans(self) -> list[str]:
        """Delete records with no PV whose claim is gone (seen so for ORPHAN_GRACE)."""
        now = self.clock()
        freed = []
        seen = set()
        for name, record in list(self.allocations.items()):
            if not self._orphaned(name, record):
                continue
            seen.add(name)
            first = self._orphans.setdefault(name, now)
            if now - first < ORPHAN_GRACE:
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
        for name in list(self._orphans):
            if name not in seen or name in freed:
                self._orphans.pop(name, None)
        return freed
