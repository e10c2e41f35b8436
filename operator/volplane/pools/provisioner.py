"""The pool provisioner: volumes for StorageClasses with ``provisioner: pool.volplane.io``.

The volume plugin of the PV controller for "pool.volplane.io" (``PoolVolumePlugin``:
provision, delete, recycle, expand; the wiring hands it to the PV controller), plus the
pool driver's own loops: the publisher (pool status, the CSIStorageCapacity objects the
scheduler reads), the garbage collector of allocation records whose claim went away
before its PV was made, and the last two steps of deleting a PV.

Provisioning a claim ``C`` (uid ``U``) is two durable writes, both named after ``U``:

1. the StorageAllocation ``pvc-U`` (pool, size, claim). If it already exists, its pool
   is reused: choosing again could pick another pool and count the claim twice. Unless
   that pool can no longer serve the claim (gone, attached to no existing node, or not
   to the node the scheduler selected now: ``placement.stale_record``): then, the API
   server confirming no PV was made from it, the record is deleted and the claim is
   placed afresh (for WaitForFirstConsumer, possibly by giving the node back).
   Otherwise the pool is chosen and the space reserved in the in-memory ledger with no
   ``await`` in between, so concurrent claims in this process never overbook a pool;
   the ledger is rebuilt from the records after a restart (the controller runs only
   once every cache is synced). AlreadyExists: read the record and use it.
2. the PV ``pvc-U``, pre-bound to ``C`` (claimRef with ``U``), with our finalizer.
   AlreadyExists is success. The PV controller then binds it.

A crash after 1 leaves a record and no PV: the next sync of the still-Pending claim
finds the record and creates the PV. If the claim was deleted meanwhile, the record is
an orphan (no PV, no claim with ``U``) and the GC loop deletes it once the record is
older than a grace period (by its own creationTimestamp, so restarts do not reset it).
A crash after 2 is a normal provisioned PV. So no duplicate PV (one name per claim) and
no leaked or double-counted allocation (one record per claim, freed with its PV).

Deleting (reclaim policy Delete) is three writes, each repeatable:

1. DELETE the PV: it stays, held by the ``volplane.io/allocation`` finalizer;
2. DELETE the StorageAllocation (404 is fine): the space is free;
3. remove our finalizer from the PV: it disappears.

A PV carrying a deletionTimestamp and our finalizer (after a crash between 1 and 3, or
deleted by a user once it is not bound any more) is finished by this controller from 2
on. The space is freed only after the PV's deletion is irreversible.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import Counter, Histogram

from .. import faults, logs, metrics
from ..context import Context
from ..kinds import ALLOCATIONS, CLASSES, NODES, POOLS, PVCS, PVS
from ..kube import ApiError, get_or_none, pv_path, pvc_path
from ..node import backing
from ..objects import key_of
from ..pv import constants as C
from ..pv.index import access_modes, claim_class, claim_request
from ..pv.plugins import PluginHost
from ..quantity import format_quantity
from ..workqueue import WorkQueue, process
from .context import PoolContext
from .expander import Expander
from .gc import GarbageCollector
from .parameters import ClassParams, ParameterError, parse_class_parameters
from .placement import (
    choose_pool,
    node_affinity,
    pool_capacity,
    pool_nodes,
    stale_record,
    topology_nodes,
)
from .publisher import Publisher
from .records import (
    API_VERSION,
    FINALIZER,
    PROVISIONER,
    PROVISIONING,
    PV_PROTECTION,
    alloc_path,
    build_allocation,
    build_pv,
    data_source_verdict,
    pool_of_volume,
    volume_name,
)

log = logs.get("pool-provisioner")
COMPONENT = PROVISIONER

provision_seconds = Histogram(
    "volplane_pool_provision_duration_seconds",
    "Time to provision a pool volume (allocation record and PV), by result",
    ["result"], buckets=metrics.LATENCY_BUCKETS)
provision_failures = Counter(
    "volplane_pool_provision_failures_total",
    "Pool provisioning failures by reason (no-room, bad-parameter, pool-gone, error, ...)",
    ["reason"])


class PoolVolumePlugin:
    """The PV controller's volume plugin for "pool.volplane.io" (pv/plugins.py)."""

    name = PROVISIONER

    def __init__(self, owner: PoolProvisioner):
        self.owner = owner

    def attach(self, host: PluginHost) -> None:
        self.owner.publisher.host = host

    async def provision(self, claim: dict, storage_class: str,
                        selected_node: str | None) -> None:
        await self.owner.provision(claim, storage_class, selected_node)

    async def delete(self, pv: dict) -> bool:
        return await self.owner.delete(pv)

    async def recycle(self, pv: dict) -> bool:
        return await self.owner.recycle(pv)

    async def expand(self, claim: dict, pv: dict) -> None:
        await self.owner.expander.expand(claim, pv)


class PoolProvisioner:
    """The "pool-provisioner" controller: provisions and frees pool volumes (as the PV
    controller's plugin) and runs the pool driver's loops."""

    name = "pool-provisioner"
    watches = (PVS, PVCS, CLASSES, NODES, POOLS, ALLOCATIONS)

    def __init__(self, ctx: Context, *, clock=time.monotonic, wall=time.time):
        pc = self.pc = PoolContext(ctx)
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
        self.expander = Expander(pc)
        self.publisher = Publisher(pc, clock=clock)
        self.gc = GarbageCollector(pc, wall=wall)
        self.finishing = WorkQueue("pool-deletions",   # PVs being deleted: free + unfinalize
                                   resource="persistentvolumes")
        self.plugins = (PoolVolumePlugin(self),)       # given to the PV controller
        inf = ctx.informers
        inf.listen(POOLS, self._on_pool)
        inf.listen(NODES, self._on_node)
        inf.listen(CLASSES, self._on_class)
        inf.listen(PVS, self._on_volume)

    # -- gather: listeners (synchronous, cheap: they only mark and queue) -------------------
    def _on_pool(self, name: str, old: dict | None, new: dict | None) -> None:
        if new is None or old is None or (new.get("spec") != old.get("spec")):
            self.pc.space_freed = True
        self.pc.dirty.set()

    def _on_node(self, name: str, old: dict | None, new: dict | None) -> None:
        # Heartbeats change node status all the time; only membership and labels matter.
        def shape(o: dict) -> tuple:
            md = o.get("metadata") or {}
            return md.get("labels"), bool(md.get("deletionTimestamp"))

        if old is None or new is None or shape(old) != shape(new):
            self.pc.space_freed = True
            self.pc.dirty.set()

    def _on_class(self, name: str, old: dict | None, new: dict | None) -> None:
        if (new or old or {}).get("provisioner") == PROVISIONER:
            self.pc.dirty.set()

    def _on_volume(self, name: str, old: dict | None, new: dict | None) -> None:
        if new is not None and self._needs_finishing(new):
            self.finishing.add(name)

    @staticmethod
    def _needs_finishing(pv: dict) -> bool:
        md = pv.get("metadata") or {}
        fins = md.get("finalizers") or ()
        return bool(md.get("deletionTimestamp")) and FINALIZER in fins and PV_PROTECTION not in fins

    # -- loops -------------------------------------------------------------------------------
    async def run(self) -> None:
        await self._load_allocations()
        tasks = [
            asyncio.create_task(self.publisher.ensure_driver(), name="pool-csidriver"),
            asyncio.create_task(self.publisher.run(), name="pool-publisher"),
            asyncio.create_task(self.gc.run(), name="pool-gc"),
            *(asyncio.create_task(process(self.finishing, self._finish_key,
                                          controller=self.name, log=log)) for _ in range(2)),
        ]
        for name, pv in list(self.pvs.items()):
            if self._needs_finishing(pv):
                self.finishing.add(name)
        self.pc.dirty.set()
        log.info("pool provisioner running", pools=len(self.pools),
                 allocations=len(self.ledger), namespace=self.pc.namespace)
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    async def _load_allocations(self) -> None:
        """LIST every StorageAllocation into the ledger before the first decision.

        The watch already filled the store before any controller started; this fresh
        LIST makes the ledger's completeness independent of the watch layer (a resource
        the watch could not serve, e.g. for lack of RBAC, would otherwise look like an
        empty ledger and let pools be overbooked). Until it succeeds, nothing is
        provisioned or freed.
        """
        delay = 0.5
        while True:
            try:
                body = await self.kube.get(alloc_path())
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("cannot list StorageAllocations; provisioning waits", error=str(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self.pc.refresh_ledger()
        for item in (body or {}).get("items") or []:
            item.setdefault("apiVersion", API_VERSION)
            item.setdefault("kind", "StorageAllocation")
            name = item["metadata"]["name"]
            if name not in self.allocations:
                self.allocations.put(item)
            self.pc.observe(name, item)
        self.pc.loaded.set()
        self.publisher._requeue_pending_claims()

    # -- provision -------------------------------------------------------------------------------
    async def provision(self, claim: dict, storage_class: str,
                        selected_node: str | None) -> None:
        """Make (or finish making) the PV for a Pending claim of a pool class."""
        name = volume_name(claim)
        self.pc.provisioning.add(name)  # the GC leaves its record alone meanwhile
        try:
            await self._provision(claim, storage_class, selected_node, name)
        finally:
            self.pc.provisioning.discard(name)

    async def _provision(self, claim: dict, storage_class: str, selected_node: str | None,
                         name: str) -> None:
        t0 = time.monotonic()
        md = claim["metadata"]
        if name in self.pvs:
            return  # already made; the PV controller binds it
        if not self.pc.loaded.is_set():
            return  # the claim is requeued once the ledger is loaded
        self.pc.refresh_ledger()
        class_name = storage_class or claim_class(claim)
        sc = self.classes.get(class_name)
        if sc is None:
            return  # the PV controller reports the missing class
        if self._has_data_source(claim, t0):
            return
        checked = self._check_request(claim, class_name, sc, t0)
        if checked is None:
            return
        size, params = checked
        # The scheduler's choice counts for WaitForFirstConsumer classes only.
        wffc = sc.get("volumeBindingMode") == C.WAIT_FOR_FIRST_CONSUMER
        node = selected_node if wffc else None
        nodes = self.nodes

        record = await self._usable_record(claim, class_name, sc, params, size, node, t0)
        if record is None:
            return
        pool_name = record["spec"]["pool"]
        pool = self.pools.get(pool_name)
        if pool is None:  # (deleted while the record was written: freed at the next try)
            return self._failed(claim, "pool-gone", f'StoragePool "{pool_name}" of allocation '
                                f'"{name}" does not exist', t0)
        usable = topology_nodes(pool_nodes(pool, nodes), nodes, sc.get("allowedTopologies"))
        if not usable:
            return self._failed(claim, "no-nodes", f'StoragePool "{pool_name}" is attached to '
                                "no existing node (in the class's allowedTopologies)", t0)
        size = int(record["spec"]["sizeBytes"])
        pv = build_pv(claim, sc, pool_name, size, node_affinity(usable, nodes), params.fs_type)
        try:
            created = await self.kube.create("/api/v1/persistentvolumes", pv)
        except ApiError as e:
            if not e.already_exists:
                provision_failures.labels("error").inc()
                metrics.volume_operation_errors.labels(PROVISIONER, "provision").inc()
                raise
            created = await self.kube.get(pv_path(name))
        metrics.api_writes.labels(self.name, "persistentvolumes", "create").inc()
        self.pvs.put(created)
        faults.point("provision-2")
        elapsed = time.monotonic() - t0
        provision_seconds.labels("success").observe(elapsed)
        metrics.volume_operation_seconds.labels(PROVISIONER, "provision", "success").observe(
            elapsed)
        self.events.emit(claim, C.NORMAL, C.PROVISIONING_SUCCEEDED,
                             f'Successfully provisioned volume {name} ({format_quantity(size)}) '
                             f'in StoragePool "{pool_name}"', component=COMPONENT)
        log.info("provisioned", kind="PersistentVolumeClaim", namespace=md["namespace"],
                 name=md["name"], volume=name, pool=pool_name, action="provision",
                 duration_ms=round(elapsed * 1000, 1))

    def _has_data_source(self, claim: dict, t0: float) -> bool:
        """A claim with a data source is never given an empty volume: clones and snapshot
        restores are refused (reported), other kinds are left to their volume populator
        (the populator's own claim is provisioned; the PV is then rebound to this one)."""
        verdict = data_source_verdict(claim)
        if verdict is None:
            return False
        action, why = verdict
        if action == "unsupported":
            self._failed(claim, "data-source", why, t0)
        else:
            self.events.emit(claim, C.NORMAL, PROVISIONING, why, component=COMPONENT)
        return True

    def _check_request(self, claim: dict, class_name: str, sc: dict, t0: float
                       ) -> tuple[int, ClassParams] | None:
        """The claim's size and its class's parameters, or None (failure reported)."""
        try:
            size = claim_request(claim)
        except ValueError as e:
            self._failed(claim, "bad-request", f"invalid storage request: {e}", t0)
            return None
        if size <= 0:
            self._failed(claim, "bad-request", "the claim requests no storage", t0)
            return None
        try:
            return size, parse_class_parameters(sc.get("parameters"))
        except ParameterError as e:
            self._failed(claim, "bad-parameter", f'StorageClass "{class_name}": {e}', t0)
            return None

    async def _record(self, claim: dict, class_name: str, sc: dict, params: ClassParams,
                      size: int,
                      node: str | None, t0: float) -> dict | None:
        """Write 1: choose a pool, reserve its space, create the allocation record (or
        take the one an earlier attempt created). None: no pool has room (reported)."""
        name = volume_name(claim)
        choice = choose_pool(size, sorted(access_modes(claim)), params, self.pools,
                             self.ledger, node=node,
                             allowed_topologies=sc.get("allowedTopologies"), nodes=self.nodes)
        if choice.pool is None:
            await self._no_room(claim, node, choice.reason, t0)
            return None
        capacity = pool_capacity(self.pools[choice.pool]) or 0
        if not self.ledger.reserve(name, choice.pool, size, capacity):
            # Cannot happen (no await since choose_pool); never overbook if it does.
            log.error("reservation refused after choice", claim=key_of(claim),
                      pool=choice.pool)
            return None
        body = build_allocation(claim, class_name, choice.pool, size, node)
        try:
            record = await self.kube.create(alloc_path(), body)
        except ApiError as e:
            self.ledger.cancel(name)
            if not e.already_exists:
                provision_failures.labels("error").inc()
                raise
            record = await self.kube.get(alloc_path(name))
        except BaseException:
            self.ledger.cancel(name)
            raise
        self.allocations.put(record)
        self.ledger.observe(name, record["spec"]["pool"], int(record["spec"]["sizeBytes"]))
        metrics.api_writes.labels(self.name, "storageallocations", "create").inc()
        faults.point("provision-1")
        return record

    async def _usable_record(self, claim: dict, class_name: str, sc: dict,
                             params: ClassParams, size: int, node: str | None,
                             t0: float) -> dict | None:
        """The claim's allocation record: the one an earlier attempt made, if its pool can
        still serve the claim, else a new one (write 1). None: nothing to do now (no
        room, reported; or a PV of the record's name exists, which the PV controller
        binds)."""
        name = volume_name(claim)
        record = self.allocations.get(name)
        if record is not None:
            stale = stale_record(record, self.pools, self.nodes,
                                 allowed_topologies=sc.get("allowedTopologies"), node=node)
            if stale is None:
                return record
            if not await self._free_stale_record(claim, name, record, stale):
                return None
        return await self._record(claim, class_name, sc, params, size, node, t0)

    async def _free_stale_record(self, claim: dict, name: str, record: dict,
                                 why: str) -> bool:
        """Free the record of an earlier attempt whose pool can no longer serve the claim
        (placement.stale_record), once the API server confirms no PV was made from it.
        True: freed (or already gone); the claim is placed afresh."""
        if await get_or_none(self.kube, pv_path(name)) is not None:
            return False
        try:
            await self.kube.request("DELETE", alloc_path(name), {
                "kind": "DeleteOptions", "apiVersion": "v1",
                "preconditions": {"uid": record["metadata"].get("uid")}})
            metrics.api_writes.labels(self.name, "storageallocations", "delete").inc()
        except ApiError as e:
            if not (e.not_found or e.conflict):
                raise
        self.pc.released(name)
        log.info("stale allocation freed", kind="PersistentVolumeClaim",
                 namespace=claim["metadata"]["namespace"], name=claim["metadata"]["name"],
                 allocation=name, pool=record["spec"].get("pool"), reason=why,
                 action="free")
        return True

    def _failed(self, claim: dict, reason: str, message: str, t0: float) -> None:
        provision_failures.labels(reason).inc()
        provision_seconds.labels("failure").observe(time.monotonic() - t0)
        metrics.volume_operation_errors.labels(PROVISIONER, "provision").inc()
        posted = self.events.emit(claim, C.WARNING, C.PROVISIONING_FAILED, message,
                                      component=COMPONENT)
        (log.info if posted else log.debug)(
            "provisioning failed", kind="PersistentVolumeClaim",
            namespace=claim["metadata"]["namespace"], name=claim["metadata"]["name"],
            reason=reason, error=message)

    async def _no_room(self, claim: dict, node: str | None, reason: str, t0: float) -> None:
        """No pool fits. WaitForFirstConsumer: give the node back to the scheduler."""
        if node is None:
            return self._failed(claim, "no-room", reason, t0)
        md = claim["metadata"]
        try:
            new = await self.kube.merge_patch(pvc_path(md["namespace"], md["name"]), {
                "metadata": {"resourceVersion": md["resourceVersion"],
                             "annotations": {C.ANN_SELECTED_NODE: None}}})
            self.pvcs.put(new)
            metrics.api_writes.labels(self.name, "persistentvolumeclaims", "patch").inc()
        except ApiError as e:
            if e.not_found:
                return None
            raise
        self._failed(claim, "no-room", f"{reason}; removed annotation {C.ANN_SELECTED_NODE} "
                                       "so that the scheduler picks another node", t0)

    # -- delete / recycle ----------------------------------------------------------------------
    async def delete(self, pv: dict) -> bool:
        """PV controller deleter for a Released PV with reclaim policy Delete."""
        md = pv["metadata"]
        name = md["name"]
        if not self.pc.loaded.is_set():
            return False  # retried on the PV controller's next sync
        self.pc.refresh_ledger()
        if not md.get("deletionTimestamp"):
            record = self.allocations.get(name)
            pool = (record or {}).get("spec", {}).get("pool") or pool_of_volume(pv)
            if pool and pool not in self.pools:
                self.events.emit(
                    pv, C.WARNING, C.VOLUME_FAILED_DELETE,
                    f'StoragePool "{pool}" no longer exists: volume {name} cannot be freed and '
                    "stays until an operator acts (recreate the pool, or remove the "
                    f"{FINALIZER} finalizer and delete the volume)", component=COMPONENT)
                return False
            try:
                await self.kube.request("DELETE", pv_path(name), {
                    "kind": "DeleteOptions", "apiVersion": "v1",
                    "preconditions": {"uid": md.get("uid")}})
            except ApiError as e:
                if e.not_found:
                    return True
                if e.conflict:  # uid precondition: a different PV of that name
                    return True
                raise
            metrics.api_writes.labels(self.name, "persistentvolumes", "delete").inc()
            faults.point("delete-1")
            log.info("volume deleting", kind="PersistentVolume", name=name, action="delete")
        await self._free_and_unfinalize(name)
        return True

    async def recycle(self, pv: dict) -> bool:
        """Recycle: scrub (a pool volume has no data outside the ledger) and make Available.

        As upstream after its recycler pod: unbind (keep a pre-bound claim's name) and set
        phase Available. The allocation stays: the volume still exists.
        """
        md = pv["metadata"]
        if backing.has_backing(self.pools.get(pool_of_volume(pv) or "")):
            # As upstream for a volume no recycler can scrub: Failed, with the reason.
            if (pv.get("status") or {}).get("phase") != C.VOLUME_FAILED:
                pv = await self.kube.merge_patch(pv_path(md["name"], "status"), {
                    "metadata": {"resourceVersion": md["resourceVersion"]},
                    "status": {"phase": C.VOLUME_FAILED,
                               "message": backing.RECYCLE_REFUSED}})
                self.pvs.put(pv)
            self.events.emit(pv, C.WARNING, C.VOLUME_FAILED_RECYCLE,
                             backing.RECYCLE_REFUSED, component=COMPONENT)
            return False
        ref = (pv.get("spec") or {}).get("claimRef")
        if ref and ref.get("uid"):
            if (md.get("annotations") or {}).get(C.ANN_BOUND_BY_CONTROLLER):
                patch = {"metadata": {"resourceVersion": md["resourceVersion"],
                                      "annotations": {C.ANN_BOUND_BY_CONTROLLER: None}},
                         "spec": {"claimRef": None}}
            else:
                patch = {"metadata": {"resourceVersion": md["resourceVersion"]},
                         "spec": {"claimRef": {"uid": None, "resourceVersion": None}}}
            pv = await self.kube.merge_patch(pv_path(md["name"]), patch)
            self.pvs.put(pv)
            faults.point("recycle-1")
        if (pv.get("status") or {}).get("phase") != C.VOLUME_AVAILABLE:
            pv = await self.kube.merge_patch(pv_path(md["name"], "status"), {
                "metadata": {"resourceVersion": pv["metadata"]["resourceVersion"]},
                "status": {"phase": C.VOLUME_AVAILABLE, "message": None}})
            self.pvs.put(pv)
        self.events.emit(pv, C.NORMAL, C.VOLUME_RECYCLED,
                             f"Volume {md['name']} recycled (scrubbed in its pool)",
                             component=COMPONENT)
        return True

    async def _finish_key(self, name: str) -> None:
        pv = self.pvs.get(name)
        if pv is None or not self._needs_finishing(pv):
            return
        keep = (pv.get("spec") or {}).get("persistentVolumeReclaimPolicy") == C.RECLAIM_RETAIN
        if keep:
            await self._retain(name)  # its bytes stay: a re-created PV finds them
        await self._free_and_unfinalize(name, keep=keep)

    async def _retain(self, name: str) -> None:
        """A deleted PV with reclaim policy Retain: mark its allocation retained, so that
        neither step 2 below nor the orphan GC frees it. Its space stays counted and its
        bytes stay on the nodes until an administrator deletes the StorageAllocation."""
        record = self.allocations.get(name)
        if record is None or backing.RETAINED_ANNOTATION in (
                record["metadata"].get("annotations") or {}):
            return
        try:
            new = await self.kube.merge_patch(alloc_path(name), {"metadata": {
                "annotations": {backing.RETAINED_ANNOTATION: "true"}}})
        except ApiError as e:
            if e.not_found:
                return
            raise
        self.allocations.put(new)
        metrics.api_writes.labels(self.name, "storageallocations", "patch").inc()
        log.info("allocation retained", kind="PersistentVolume", name=name, action="retain")

    async def _free_and_unfinalize(self, name: str, keep: bool = False) -> None:
        """Delete steps 2 and 3, for a PV whose deletion has begun. `keep`: a Retain
        volume's record (and so its bytes) outlives the PV."""
        if not keep:
            try:
                await self.kube.delete(alloc_path(name))
                metrics.api_writes.labels(self.name, "storageallocations", "delete").inc()
            except ApiError as e:
                if not e.not_found:
                    raise
            self.pc.released(name)
        faults.point("delete-2")
        for _ in range(5):
            try:
                pv = await self.kube.get(pv_path(name))
            except ApiError as e:
                if e.not_found:
                    self.pvs.gone(name)
                    return
                raise
            fins = pv["metadata"].get("finalizers") or []
            if FINALIZER not in fins:
                return
            try:
                new = await self.kube.merge_patch(pv_path(name), {"metadata": {
                    "resourceVersion": pv["metadata"]["resourceVersion"],
                    "finalizers": [f for f in fins if f != FINALIZER]}})
            except ApiError as e:
                if e.conflict:
                    continue
                if e.not_found:
                    return
                raise
            metrics.api_writes.labels(self.name, "persistentvolumes", "patch").inc()
            if new:
                self.pvs.put(new)
            faults.point("delete-3")
            log.info("volume freed", kind="PersistentVolume", name=name, action="free")
            return
        raise ApiError(409, "Conflict", {"message": f"finalizer of {name}: too many conflicts"})
