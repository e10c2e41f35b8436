"""What the pool driver's jobs share: the listers they read, the capacity ledger, and
the signals between them.

The jobs (provisioner, expander, publisher, garbage collector) run in one process
and one event loop; the ledger is consistent between two awaits, which is what lets
``choose_pool`` and the reservation that follows it never overbook a pool.
"""

from __future__ import annotations

import asyncio
import os

from prometheus_client.core import GaugeMetricFamily

from .. import logs, metrics
from ..context import Context
from ..kinds import ALLOCATIONS, CLASSES, NODES, POOLS, PVCS, PVS, UNBOUND_CLAIMS_BY_CLASS
from .ledger import Ledger
from .placement import pool_capacity

log = logs.get("pool-provisioner")


class PoolContext:
    def __init__(self, ctx: Context):
        self.kube = ctx.kube
        self.events = ctx.events
        inf = ctx.informers
        self.pvs = inf.lister(PVS)
        self.pvcs = inf.lister(PVCS)
        self.classes = inf.lister(CLASSES)
        self.pools = inf.lister(POOLS)
        self.allocations = inf.lister(ALLOCATIONS)
        self.nodes = inf.lister(NODES)
        self.unbound_by_class = inf.index(UNBOUND_CLAIMS_BY_CLASS)
        self.namespace = (os.environ.get("VOLPLANE_NAMESPACE") or os.environ.get("POD_NAMESPACE")
                          or "volplane-system")
        # The capacity ledger: the allocation records plus this process's reservations
        # of writes in flight. `_stale` names the records whose lister entry changed.
        self.ledger = Ledger()
        self._stale: set[str] = set()
        self.loaded = asyncio.Event()   # the ledger was checked against a fresh LIST
        self.dirty = asyncio.Event()    # pool status / capacity objects to refresh
        self.space_freed = False        # retry the Pending claims of pool classes
        self.provisioning: set[str] = set()  # records whose provision() is in flight
        inf.listen(ALLOCATIONS, self._on_allocation)
        metrics.register_collector("pool-provisioner", PoolCollector(self))

    def _on_allocation(self, name: str, old: dict | None, new: dict | None) -> None:
        self._stale.add(name)
        if new is None:
            self.space_freed = True
        self.dirty.set()

    def refresh_ledger(self) -> None:
        """Bring the ledger up to the allocation lister for the records that changed."""
        while self._stale:
            name = self._stale.pop()
            record = self.allocations.get(name)
            if record is None:
                self.ledger.release(name)
                continue
            self.observe(name, record)

    def observe(self, name: str, record: dict) -> None:
        """A record the API returned (or listed): the ledger counts it now."""
        spec = record.get("spec") or {}
        try:
            self.ledger.observe(name, spec["pool"], int(spec["sizeBytes"]))
        except (KeyError, TypeError, ValueError):
            log.warning("malformed StorageAllocation ignored", name=name)

    def released(self, name: str) -> None:
        """A record this process deleted: its space is free now."""
        self.allocations.gone(name)
        self.ledger.release(name)
        self.space_freed = True
        self.dirty.set()


class PoolCollector:
    """volplane_pool_* gauges computed at scrape time from the ledger."""

    def __init__(self, pc: PoolContext) -> None:
        self.pc = pc

    def collect(self):
        pc = self.pc
        fams = {
            "capacity": GaugeMetricFamily("volplane_pool_capacity_bytes",
                                          "StoragePool capacity", labels=["pool"]),
            "allocated": GaugeMetricFamily("volplane_pool_allocated_bytes",
                                           "Bytes allocated from the pool", labels=["pool"]),
            "available": GaugeMetricFamily("volplane_pool_available_bytes",
                                           "Free bytes in the pool", labels=["pool"]),
            "volumes": GaugeMetricFamily("volplane_pool_volumes",
                                         "Volumes allocated from the pool", labels=["pool"]),
        }
        for _ in range(5):  # scraped from another thread: retry a torn read
            try:
                pools = list(pc.pools.items())
                break
            except RuntimeError:
                continue
        else:
            pools = []
        for name, pool in pools:
            cap = pool_capacity(pool) or 0
            alloc = pc.ledger.allocated(name)
            fams["capacity"].add_metric([name], cap)
            fams["allocated"].add_metric([name], alloc)
            fams["available"].add_metric([name], max(0, cap - alloc))
            fams["volumes"].add_metric([name], pc.ledger.count(name))
        yield from fams.values()
