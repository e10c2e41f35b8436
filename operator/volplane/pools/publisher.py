"""The pool driver's publisher: what the cluster sees of the pools.

After any change of allocations, pools, nodes or pool classes (debounced), and once a
minute anyway:

- each StoragePool's status (capacity, allocated, available, nodes, conditions), written
  only when it differs (``capacity.pool_status``);
- one CSIStorageCapacity per (pool, class using it) for kube-scheduler, created,
  patched or deleted to match ``capacity.capacity_objects``;
- when space was freed or a pool or node changed, the PV controller is asked to look at
  the Pending claims of pool classes again (its ``retry_claims``).

It also makes sure the CSIDriver object of ``pool.volplane.io`` exists with
``storageCapacity: true``, so the scheduler reads the capacity objects.
"""

from __future__ import annotations

import asyncio
import time

from .. import logs, metrics
from ..kube import ApiError
from ..objects import now_rfc3339
from ..pv.plugins import PluginHost
from .capacity import capacity_objects, pool_status, status_differs
from .context import PoolContext
from .records import MANAGED_BY, PROVISIONER, capacity_path, pool_path

log = logs.get("pool-provisioner")
CAPACITY_RELIST = 300.0  # re-list our CSIStorageCapacity objects (someone may delete them)
DEBOUNCE = 0.2


class Publisher:
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
        self.namespace = pc.namespace
        self.host: PluginHost | None = None
        self.published: dict[str, dict] | None = None  # CSIStorageCapacity name -> object

    async def run(self) -> None:
        """Debounced: after any allocation/pool/node/class change, refresh what we publish."""
        last_relist = self.clock()
        while True:
            try:
                await asyncio.wait_for(self.pc.dirty.wait(), timeout=60)
            except TimeoutError:
                pass  # periodic refresh
            await asyncio.sleep(DEBOUNCE)
            self.pc.dirty.clear()
            self.pc.refresh_ledger()
            if self.pc.space_freed:
                self.pc.space_freed = False
                self._requeue_pending_claims()
            try:
                if self.published is None or self.clock() - last_relist > CAPACITY_RELIST:
                    await self._list_published()
                    last_relist = self.clock()
                await self._write_statuses()
                await self._write_capacities()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("publishing pool status/capacity failed", error=str(e))
                self.published = None
                await asyncio.sleep(1.0)
                self.pc.dirty.set()

    def _requeue_pending_claims(self) -> None:
        if self.host is not None:
            self.host.retry_claims(PROVISIONER)

    async def _write_statuses(self) -> None:
        for name, pool in list(self.pools.items()):
            desired = pool_status(pool, self.ledger.sizes(name), self.nodes,
                                  now=now_rfc3339())
            if not status_differs(pool.get("status"), desired):
                continue
            try:
                new = await self.kube.merge_patch(pool_path(name, "status"),
                                                      {"status": desired})
            except ApiError as e:
                if e.not_found:
                    continue
                raise
            metrics.api_writes.labels(self.name, "storagepools", "patch-status").inc()
            if new:
                self.pools.put(new)

    async def _list_published(self) -> None:
        await self._ensure_namespace()
        body = await self.kube.get(capacity_path(self.namespace), query={
            "labelSelector": f"{MANAGED_BY}=volplane,volplane.io/driver={PROVISIONER}"})
        self.published = {o["metadata"]["name"]: o for o in (body or {}).get("items") or []}

    async def _ensure_namespace(self) -> None:
        try:
            await self.kube.create("/api/v1/namespaces", {
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}})
        except ApiError as e:
            if not (e.already_exists or e.conflict or e.status == 403):
                raise

    async def _write_capacities(self) -> None:
        assert self.published is not None
        desired = capacity_objects(self.pools, self.classes, self.ledger, self.nodes,
                                   self.namespace)
        kube = self.kube
        for name, want in desired.items():
            have = self.published.get(name)
            if have is not None and (have.get("storageClassName") != want["storageClassName"]
                                     or have.get("nodeTopology") != want["nodeTopology"]):
                await self._delete_capacity(name)  # immutable fields: replace the object
                have = None
            if have is None:
                try:
                    self.published[name] = await kube.create(capacity_path(self.namespace), want)
                    metrics.api_writes.labels(self.name, "csistoragecapacities", "create").inc()
                except ApiError as e:
                    if not e.already_exists:
                        raise
                    self.published = None  # out of sync: re-list next round
                    self.pc.dirty.set()
                    return
            elif (have.get("capacity") != want["capacity"]
                  or have.get("maximumVolumeSize") != want["maximumVolumeSize"]):
                try:
                    self.published[name] = await kube.merge_patch(
                        capacity_path(self.namespace, name),
                        {"capacity": want["capacity"],
                         "maximumVolumeSize": want["maximumVolumeSize"]})
                    metrics.api_writes.labels(self.name, "csistoragecapacities", "patch").inc()
                except ApiError as e:
                    if not e.not_found:
                        raise
                    self.published.pop(name, None)
                    self.pc.dirty.set()
        for name in [n for n in self.published if n not in desired]:
            await self._delete_capacity(name)

    async def _delete_capacity(self, name: str) -> None:
        try:
            await self.kube.delete(capacity_path(self.namespace, name))
            metrics.api_writes.labels(self.name, "csistoragecapacities", "delete").inc()
        except ApiError as e:
            if not e.not_found:
                raise
        if self.published is not None:
            self.published.pop(name, None)

    async def ensure_driver(self) -> None:
        """Make sure the CSIDriver object exists, so the scheduler reads our capacity."""
        path = f"/apis/storage.k8s.io/v1/csidrivers/{PROVISIONER}"
        body = {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "CSIDriver",
            "metadata": {"name": PROVISIONER, "labels": {MANAGED_BY: "volplane"}},
            "spec": {"attachRequired": True, "storageCapacity": True, "podInfoOnMount": False,
                     "volumeLifecycleModes": ["Persistent"], "fsGroupPolicy": "File"},
        }
        delay = 1.0
        while True:
            try:
                try:
                    have = await self.kube.get(path)
                except ApiError as e:
                    if not e.not_found:
                        raise
                    await self.kube.create("/apis/storage.k8s.io/v1/csidrivers", body)
                    log.info("CSIDriver created", name=PROVISIONER)
                    return
                spec = have.get("spec") or {}
                if not spec.get("storageCapacity"):
                    await self.kube.merge_patch(path, {"spec": {"storageCapacity": True}})
                if spec.get("attachRequired") is False:
                    log.warning("CSIDriver has attachRequired: false (immutable); delete it "
                                "and restart volplane to fix", name=PROVISIONER)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("cannot ensure CSIDriver", name=PROVISIONER, error=str(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
