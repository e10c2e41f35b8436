"""The pool provisioner: volumes for StorageClasses with ``provisioner: pool.volplane.io``.

A plugin of the PV controller (it registers ``provisioners``, ``deleters`` and
``recyclers`` under "pool.volplane.io"), plus its own loops: pool status, the
CSIStorageCapacity objects the scheduler reads, expansion, and garbage collection of
allocation records whose claim went away before its PV was made.

Provisioning a claim ``C`` (uid ``U``) is two durable writes, both named after ``U``:

1. the StorageAllocation ``pvc-U`` (pool, size, claim). If it already exists, its pool
   is reused: choosing again could pick another pool and count the claim twice.
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
import calendar
import os
import time
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from .. import faults, logs, metrics
from ..cache import key_of
from ..context import Context
from ..kube import ApiError, pv_path, pvc_path
from ..node import backing
from ..pv import constants as C
from ..pv.index import access_modes, claim_class, claim_request, volume_capacity
from ..quantity import format_quantity, parse_quantity
from ..runtime import CLASSES, PVCS, PVS, Watch
from ..workqueue import WorkQueue, process
from .ledger import (
    API_VERSION,
    MANAGED_BY,
    PROVISIONER,
    Ledger,
    ParameterError,
    capacity_objects,
    choose_pool,
    node_affinity,
    parse_class_parameters,
    pool_capacity,
    pool_nodes,
    pool_status,
    status_differs,
    topology_nodes,
)

log = logs.get("pool-provisioner")
COMPONENT = PROVISIONER

NODES = Watch("", "v1", "nodes", "Node")
POOLS = Watch("volplane.io", "v1alpha1", "storagepools", "StoragePool")
ALLOCATIONS = Watch("volplane.io", "v1alpha1", "storageallocations", "StorageAllocation")

FINALIZER = "volplane.io/allocation"
PV_PROTECTION = "kubernetes.io/pv-protection"
ANN_POOL = "volplane.io/pool"
VOLUME_RESIZE_FAILED = "VolumeResizeFailed"
VOLUME_RESIZE_SUCCESSFUL = "VolumeResizeSuccessful"
ORPHAN_GRACE = 30.0      # minimum age (creationTimestamp) of an orphaned record before GC
GC_PERIOD = 15.0
CAPACITY_RELIST = 300.0  # re-list our CSIStorageCapacity objects (someone may delete them)
DEBOUNCE = 0.2

provision_seconds = Histogram(
    "volplane_pool_provision_duration_seconds",
    "Time to provision a pool volume (allocation record and PV), by result",
    ["result"], buckets=metrics.LATENCY_BUCKETS)
provision_failures = Counter(
    "volplane_pool_provision_failures_total",
    "Pool provisioning failures by reason (no-room, bad-parameter, pool-gone, error, ...)",
    ["reason"])


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def alloc_path(name: str = "") -> str:
    base = "/apis/volplane.io/v1alpha1/storageallocations"
    return f"{base}/{name}" if name else base


def pool_path(name: str, sub: str = "") -> str:
    return f"/apis/volplane.io/v1alpha1/storagepools/{name}" + (f"/{sub}" if sub else "")


def capacity_path(namespace: str, name: str = "") -> str:
    base = f"/apis/storage.k8s.io/v1/namespaces/{namespace}/csistoragecapacities"
    return f"{base}/{name}" if name else base


def volume_name(claim: dict) -> str:
    """The PV (and allocation record) name for a claim, as external-provisioner names it."""
    return f"pvc-{claim['metadata']['uid']}"


def pool_of_volume(pv: dict) -> str | None:
    """The pool a PV of ours lives in: volumeHandle is "<pool>/<pv name>"."""
    handle = ((pv.get("spec") or {}).get("csi") or {}).get("volumeHandle") or ""
    pool, sep, _ = handle.partition("/")
    return pool if sep else None


def is_ours(pv: dict) -> bool:
    ann = (pv.get("metadata") or {}).get("annotations") or {}
    driver = ((pv.get("spec") or {}).get("csi") or {}).get("driver")
    return ann.get(C.ANN_PROVISIONED_BY) == PROVISIONER or driver == PROVISIONER


SNAPSHOT_GROUP = "snapshot.storage.k8s.io"
PROVISIONING = "Provisioning"  # external-provisioner's reason for "left to a populator"


def data_source_verdict(claim: dict) -> tuple[str, str] | None:
    """What the pool provisioner does with a claim that names a data source, as
    external-provisioner decides it: None (no data source: provision an empty volume),
    ("unsupported", why) for a clone or a snapshot restore (pools have neither: a
    ProvisioningFailed event, never an empty volume in its place), or ("populator", why)
    for any other kind (a volume populator fills the volume: leave the claim alone).
    dataSourceRef is read first (the API server mirrors dataSource into it)."""
    spec = claim.get("spec") or {}
    ref = spec.get("dataSourceRef") or spec.get("dataSource")
    if not ref:
        return None
    kind = ref.get("kind") or ""
    group = ref.get("apiGroup") or ""
    name = ref.get("name") or ""
    if kind == "PersistentVolumeClaim" and group == "":
        return ("unsupported", f'cannot clone PersistentVolumeClaim "{name}": '
                f"{PROVISIONER} does not support cloning (the claim's dataSourceRef)")
    if kind == "VolumeSnapshot" and group == SNAPSHOT_GROUP:
        return ("unsupported", f'cannot restore VolumeSnapshot "{name}": '
                f"{PROVISIONER} does not support snapshots (the claim's dataSourceRef)")
    return ("populator", "Assuming an external populator will provision the volume")


def build_allocation(claim: dict, storage_class: str, pool: str, size: int,
                     node: str | None) -> dict:
    md = claim["metadata"]
    spec: dict[str, Any] = {
        "pool": pool,
        "sizeBytes": size,
        "claim": {"namespace": md["namespace"], "name": md["name"], "uid": md["uid"]},
        "storageClassName": storage_class,
    }
    if node:
        spec["node"] = node
    labels = {MANAGED_BY: "volplane"}
    if len(pool) <= 63:
        labels[ANN_POOL] = pool
    return {"apiVersion": API_VERSION, "kind": "StorageAllocation",
            "metadata": {"name": volume_name(claim), "labels": labels}, "spec": spec}


def build_pv(claim: dict, storage_class: dict, pool: str, size: int, affinity: dict,
             fs_type: str | None) -> dict:
    """The PV for a claim: CSI source of our driver, pre-bound to the claim."""
    md = claim["metadata"]
    cspec = claim.get("spec") or {}
    name = volume_name(claim)
    volume_mode = cspec.get("volumeMode") or C.FILESYSTEM
    csi: dict[str, Any] = {
        "driver": PROVISIONER,
        "volumeHandle": f"{pool}/{name}",
        "volumeAttributes": {"pool": pool, "storage.kubernetes.io/csiProvisionerIdentity":
                             PROVISIONER},
    }
    if fs_type and volume_mode == C.FILESYSTEM:
        csi["fsType"] = fs_type
    spec: dict[str, Any] = {
        "capacity": {"storage": format_quantity(size)},
        "accessModes": list(cspec.get("accessModes") or ["ReadWriteOnce"]),
        "volumeMode": volume_mode,
        "storageClassName": storage_class["metadata"]["name"],
        "persistentVolumeReclaimPolicy": storage_class.get("reclaimPolicy") or C.RECLAIM_DELETE,
        "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                     "namespace": md["namespace"], "name": md["name"], "uid": md["uid"]},
        "csi": csi,
        "nodeAffinity": affinity,
    }
    if storage_class.get("mountOptions"):
        spec["mountOptions"] = list(storage_class["mountOptions"])
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": name,
            "annotations": {C.ANN_PROVISIONED_BY: PROVISIONER, ANN_POOL: pool},
            "finalizers": [FINALIZER],
        },
        "spec": spec,
    }


def _node_slimmer():
    """The attach controllers' Node projection (it keeps labels and deletionTimestamp,
    all we read). The first store creator's projection wins, so use the same one."""
    try:
        from ..attach.state import slim_node
    except ImportError:  # pragma: no cover - attach controllers not installed
        return None
    return slim_node


class PoolCollector:
    """volplane_pool_* gauges computed at scrape time from the ledger."""

    def __init__(self) -> None:
        self.controller: PoolProvisioner | None = None

    def collect(self):
        c = self.controller
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
        if c is not None:
            for name, pool in list(c.pools.items()):
                cap = pool_capacity(pool) or 0
                alloc = c.ledger.allocated(name)
                fams["capacity"].add_metric([name], cap)
                fams["allocated"].add_metric([name], alloc)
                fams["available"].add_metric([name], max(0, cap - alloc))
                fams["volumes"].add_metric([name], c.ledger.count(name))
        yield from fams.values()


_collector = PoolCollector()


class PoolProvisioner:
    name = "pool-provisioner"
    watches = (PVS, PVCS, CLASSES, NODES, POOLS, ALLOCATIONS)

    def __init__(self, ctx: Context, *, clock=time.monotonic, wall=None):
        self.ctx = ctx
        self.cache = ctx.cache
        self.clock = clock
        self.wall = wall or (lambda: time.time())  # record ages (creationTimestamp)
        self.pools = self.cache.add_store(POOLS.plural, POOLS.kind)
        self.allocations = self.cache.add_store(ALLOCATIONS.plural, ALLOCATIONS.kind)
        self.nodes = self.cache.add_store(NODES.plural, NODES.kind, _node_slimmer())
        self.ledger = Ledger()
        self.namespace = (os.environ.get("VOLPLANE_NAMESPACE") or os.environ.get("POD_NAMESPACE")
                          or "volplane-system")
        self.finishing = WorkQueue("pool-deletions",   # PVs being deleted: free + unfinalize
                                   resource="persistentvolumes")
        self.expanding = WorkQueue("pool-expansions",  # bound claims asking for more space
                                   resource="persistentvolumeclaims")
        self._dirty = asyncio.Event()       # pool status / capacity objects to refresh
        self._requeue_pending = False       # space was freed: retry Pending pool claims
        self._published: dict[str, dict] | None = None  # CSIStorageCapacity name -> object
        self._provisioning: set[str] = set()  # records whose provision() is in flight
        self._loaded = asyncio.Event()      # the ledger was checked against a fresh LIST
        self.allocations.listen(self._on_allocation)
        self.pools.listen(self._on_pool)
        self.nodes.listen(self._on_node)
        self.cache.classes.listen(self._on_class)
        self.cache.pvs.listen(self._on_volume)
        self.cache.pvcs.listen(self._on_claim)
        pvc = ctx.pv_controller
        if pvc is None:
            log.warning("no PV controller: pool provisioning is off (enable pv-binder)")
        else:
            pvc.provisioners[PROVISIONER] = self.provision
            pvc.deleters[PROVISIONER] = self.delete
            pvc.recyclers[PROVISIONER] = self.recycle
        _collector.controller = self
        metrics.register_collector("pool-provisioner", _collector)

    # -- gather: listeners (synchronous, cheap) ---------------------------------------------
    def _on_allocation(self, name: str, old: dict | None, new: dict | None) -> None:
        if new is None:
            self.ledger.release(name)
            self._requeue_pending = True
        else:
            spec = new.get("spec") or {}
            try:
                self.ledger.observe(name, spec["pool"], int(spec["sizeBytes"]))
            except (KeyError, TypeError, ValueError):
                log.warning("malformed StorageAllocation ignored", name=name)
                return
        self._dirty.set()

    def _on_pool(self, name: str, old: dict | None, new: dict | None) -> None:
        if new is None or old is None or (new.get("spec") != old.get("spec")):
            self._requeue_pending = True
        self._dirty.set()

    def _on_node(self, name: str, old: dict | None, new: dict | None) -> None:
        # Heartbeats change node status all the time; only membership and labels matter.
        def shape(o: dict) -> tuple:
            md = o.get("metadata") or {}
            return md.get("labels"), bool(md.get("deletionTimestamp"))

        if old is None or new is None or shape(old) != shape(new):
            self._requeue_pending = True
            self._dirty.set()

    def _on_class(self, name: str, old: dict | None, new: dict | None) -> None:
        if (new or old or {}).get("provisioner") == PROVISIONER:
            self._dirty.set()

    def _on_volume(self, name: str, old: dict | None, new: dict | None) -> None:
        if new is not None and self._needs_finishing(new):
            self.finishing.add(name)

    def _on_claim(self, key: str, old: dict | None, new: dict | None) -> None:
        if new is not None and self._wants_expansion(new):
            self.expanding.add(key)

    @staticmethod
    def _needs_finishing(pv: dict) -> bool:
        md = pv.get("metadata") or {}
        fins = md.get("finalizers") or ()
        return bool(md.get("deletionTimestamp")) and FINALIZER in fins and PV_PROTECTION not in fins

    def _wants_expansion(self, claim: dict) -> bool:
        if (claim.get("status") or {}).get("phase") != C.CLAIM_BOUND:
            return False
        pv = self.cache.pvs.get((claim.get("spec") or {}).get("volumeName") or "")
        if pv is None or not is_ours(pv):
            return False
        try:
            return claim_request(claim) > volume_capacity(pv) or claim_request(claim) > \
                parse_quantity(((claim.get("status") or {}).get("capacity") or {}).get(
                    "storage") or "0")
        except ValueError:
            return False

    # -- loops -------------------------------------------------------------------------------
    async def run(self) -> None:
        await self._load_allocations()
        tasks = [
            asyncio.create_task(self._ensure_driver(), name="pool-csidriver"),
            asyncio.create_task(self._publisher(), name="pool-publisher"),
            asyncio.create_task(self._gc(), name="pool-gc"),
            asyncio.create_task(process(self.finishing, self._finish_key, controller=self.name, log=log)),
            asyncio.create_task(process(self.finishing, self._finish_key, controller=self.name, log=log)),
            asyncio.create_task(process(self.expanding, self._expand_key, controller=self.name, log=log)),
        ]
        for name, pv in list(self.cache.pvs.items()):
            if self._needs_finishing(pv):
                self.finishing.add(name)
        for key, claim in list(self.cache.pvcs.items()):
            if self._wants_expansion(claim):
                self.expanding.add(key)
        self._dirty.set()
        log.info("pool provisioner running", pools=len(self.pools),
                 allocations=len(self.ledger), namespace=self.namespace)
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
                body = await self.ctx.kube.get(alloc_path())
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("cannot list StorageAllocations; provisioning waits", error=str(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        for item in (body or {}).get("items") or []:
            item.setdefault("apiVersion", API_VERSION)
            item.setdefault("kind", "StorageAllocation")
            self.allocations.upsert(item)
        self._loaded.set()
        self._requeue_pending_claims()

    # -- provision -------------------------------------------------------------------------------
    async def provision(self, claim: dict, decision: Any) -> None:
        """PV controller plugin: make (or finish making) the PV for a Pending claim."""
        name = volume_name(claim)
        self._provisioning.add(name)  # the GC leaves its record alone meanwhile
        try:
            await self._provision(claim, decision, name)
        finally:
            self._provisioning.discard(name)

    async def _provision(self, claim: dict, decision: Any, name: str) -> None:
        t0 = time.monotonic()
        md = claim["metadata"]
        if name in self.cache.pvs:
            return  # already made; the PV controller binds it
        if not self._loaded.is_set():
            return  # the claim is requeued once the ledger is loaded
        class_name = getattr(decision, "storage_class", None) or claim_class(claim)
        sc = self.cache.classes.get(class_name)
        if sc is None:
            return  # the PV controller reports the missing class
        verdict = data_source_verdict(claim)
        if verdict is not None:
            action, why = verdict
            if action == "unsupported":
                return self._failed(claim, "data-source", why, t0)
            self.ctx.events.emit(claim, C.NORMAL, PROVISIONING, why, component=COMPONENT)
            return  # the populator's own claim is provisioned; the PV is rebound to this one
        try:
            size = claim_request(claim)
        except ValueError as e:
            return self._failed(claim, "bad-request", f"invalid storage request: {e}", t0)
        if size <= 0:
            return self._failed(claim, "bad-request", "the claim requests no storage", t0)
        try:
            params = parse_class_parameters(sc.get("parameters"))
        except ParameterError as e:
            return self._failed(claim, "bad-parameter",
                                f'StorageClass "{class_name}": {e}', t0)
        node = None
        if sc.get("volumeBindingMode") == C.WAIT_FOR_FIRST_CONSUMER:
            node = (md.get("annotations") or {}).get(C.ANN_SELECTED_NODE) or None
        nodes = self.nodes

        record = self.allocations.get(name)
        if record is not None:
            pool_name = record["spec"]["pool"]
        else:
            choice = choose_pool(size, sorted(access_modes(claim)), params, self.pools,
                                 self.ledger, node=node,
                                 allowed_topologies=sc.get("allowedTopologies"), nodes=nodes)
            if choice.pool is None:
                return await self._no_room(claim, node, choice.reason, t0)
            capacity = pool_capacity(self.pools[choice.pool]) or 0
            if not self.ledger.reserve(name, choice.pool, size, capacity):
                # Cannot happen (no await since choose_pool); never overbook if it does.
                log.error("reservation refused after choice", claim=key_of(claim),
                          pool=choice.pool)
                return
            body = build_allocation(claim, class_name, choice.pool, size, node)
            try:
                record = await self.ctx.kube.create(alloc_path(), body)
            except ApiError as e:
                self.ledger.cancel(name)
                if not e.already_exists:
                    provision_failures.labels("error").inc()
                    raise
                record = await self.ctx.kube.get(alloc_path(name))
            except BaseException:
                self.ledger.cancel(name)
                raise
            self.allocations.upsert(record)
            self.ledger.observe(name, record["spec"]["pool"], int(record["spec"]["sizeBytes"]))
            metrics.api_writes.labels(self.name, "storageallocations", "create").inc()
            faults.point("provision-1")
            pool_name = record["spec"]["pool"]

        pool = self.pools.get(pool_name)
        if pool is None:
            return self._failed(claim, "pool-gone", f'StoragePool "{pool_name}" of allocation '
                                f'"{name}" does not exist', t0)
        usable = topology_nodes(pool_nodes(pool, nodes), nodes, sc.get("allowedTopologies"))
        if not usable:
            return self._failed(claim, "no-nodes", f'StoragePool "{pool_name}" is attached to '
                                "no existing node (in the class's allowedTopologies)", t0)
        size = int(record["spec"]["sizeBytes"])
        pv = build_pv(claim, sc, pool_name, size, node_affinity(usable, nodes), params.fs_type)
        try:
            created = await self.ctx.kube.create("/api/v1/persistentvolumes", pv)
        except ApiError as e:
            if not e.already_exists:
                provision_failures.labels("error").inc()
                metrics.volume_operation_errors.labels(PROVISIONER, "provision").inc()
                raise
            created = await self.ctx.kube.get(pv_path(name))
        metrics.api_writes.labels(self.name, "persistentvolumes", "create").inc()
        self.cache.pvs.upsert(created)
        faults.point("provision-2")
        elapsed = time.monotonic() - t0
        provision_seconds.labels("success").observe(elapsed)
        metrics.volume_operation_seconds.labels(PROVISIONER, "provision", "success").observe(
            elapsed)
        self.ctx.events.emit(claim, C.NORMAL, C.PROVISIONING_SUCCEEDED,
                             f'Successfully provisioned volume {name} ({format_quantity(size)}) '
                             f'in StoragePool "{pool_name}"', component=COMPONENT)
        log.info("provisioned", kind="PersistentVolumeClaim", namespace=md["namespace"],
                 name=md["name"], volume=name, pool=pool_name, action="provision",
                 duration_ms=round(elapsed * 1000, 1))

    def _failed(self, claim: dict, reason: str, message: str, t0: float) -> None:
        provision_failures.labels(reason).inc()
        provision_seconds.labels("failure").observe(time.monotonic() - t0)
        metrics.volume_operation_errors.labels(PROVISIONER, "provision").inc()
        posted = self.ctx.events.emit(claim, C.WARNING, C.PROVISIONING_FAILED, message,
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
            new = await self.ctx.kube.merge_patch(pvc_path(md["namespace"], md["name"]), {
                "metadata": {"resourceVersion": md["resourceVersion"],
                             "annotations": {C.ANN_SELECTED_NODE: None}}})
            self.cache.pvcs.upsert(new)
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
        if not self._loaded.is_set():
            return False  # retried on the PV controller's next sync
        if not md.get("deletionTimestamp"):
            record = self.allocations.get(name)
            pool = (record or {}).get("spec", {}).get("pool") or pool_of_volume(pv)
            if pool and pool not in self.pools:
                self.ctx.events.emit(
                    pv, C.WARNING, C.VOLUME_FAILED_DELETE,
                    f'StoragePool "{pool}" no longer exists: volume {name} cannot be freed and '
                    "stays until an operator acts (recreate the pool, or remove the "
                    f"{FINALIZER} finalizer and delete the volume)", component=COMPONENT)
                return False
            try:
                await self.ctx.kube.request("DELETE", pv_path(name), {
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
                pv = await self.ctx.kube.merge_patch(pv_path(md["name"], "status"), {
                    "metadata": {"resourceVersion": md["resourceVersion"]},
                    "status": {"phase": C.VOLUME_FAILED,
                               "message": backing.RECYCLE_REFUSED}})
                self.cache.pvs.upsert(pv)
            self.ctx.events.emit(pv, C.WARNING, C.VOLUME_FAILED_RECYCLE,
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
            pv = await self.ctx.kube.merge_patch(pv_path(md["name"]), patch)
            self.cache.pvs.upsert(pv)
            faults.point("recycle-1")
        if (pv.get("status") or {}).get("phase") != C.VOLUME_AVAILABLE:
            pv = await self.ctx.kube.merge_patch(pv_path(md["name"], "status"), {
                "metadata": {"resourceVersion": pv["metadata"]["resourceVersion"]},
                "status": {"phase": C.VOLUME_AVAILABLE, "message": None}})
            self.cache.pvs.upsert(pv)
        self.ctx.events.emit(pv, C.NORMAL, C.VOLUME_RECYCLED,
                             f"Volume {md['name']} recycled (scrubbed in its pool)",
                             component=COMPONENT)
        return True

    async def _finish_key(self, name: str) -> None:
        pv = self.cache.pvs.get(name)
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
            new = await self.ctx.kube.merge_patch(alloc_path(name), {"metadata": {
                "annotations": {backing.RETAINED_ANNOTATION: "true"}}})
        except ApiError as e:
            if e.not_found:
                return
            raise
        self.allocations.upsert(new)
        metrics.api_writes.labels(self.name, "storageallocations", "patch").inc()
        log.info("allocation retained", kind="PersistentVolume", name=name, action="retain")

    async def _free_and_unfinalize(self, name: str, keep: bool = False) -> None:
        """Delete steps 2 and 3, for a PV whose deletion has begun. `keep`: a Retain
        volume's record (and so its bytes) outlives the PV."""
        if not keep:
            try:
                await self.ctx.kube.delete(alloc_path(name))
                metrics.api_writes.labels(self.name, "storageallocations", "delete").inc()
            except ApiError as e:
                if not e.not_found:
                    raise
            self.allocations.remove(name)
        faults.point("delete-2")
        for _ in range(5):
            try:
                pv = await self.ctx.kube.get(pv_path(name))
            except ApiError as e:
                if e.not_found:
                    self.cache.pvs.remove(name)
                    return
                raise
            fins = pv["metadata"].get("finalizers") or []
            if FINALIZER not in fins:
                return
            try:
                new = await self.ctx.kube.merge_patch(pv_path(name), {"metadata": {
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
                self.cache.pvs.upsert(new)
            faults.point("delete-3")
            log.info("volume freed", kind="PersistentVolume", name=name, action="free")
            return
        raise ApiError(409, "Conflict", {"message": f"finalizer of {name}: too many conflicts"})

    # -- expansion -------------------------------------------------------------------------------
    async def _expand_key(self, key: str) -> None:
        claim = self.cache.pvcs.get(key)
        if claim is None or not self._wants_expansion(claim):
            return
        pv_name = claim["spec"]["volumeName"]
        pv = self.cache.pvs[pv_name]
        want = claim_request(claim)
        sc = self.cache.classes.get(claim_class(claim))
        if sc is None or not sc.get("allowVolumeExpansion"):
            return  # the API server's admission refuses such requests anyway
        record = self.allocations.get(pv_name)
        if record is None:
            self.ctx.events.emit(claim, C.WARNING, VOLUME_RESIZE_FAILED,
                                 f"no StorageAllocation {pv_name}: cannot expand",
                                 component=COMPONENT)
            return
        pool_name = record["spec"]["pool"]
        if int(record["spec"]["sizeBytes"]) < want:
            pool = self.pools.get(pool_name)
            capacity = pool_capacity(pool) if pool else None
            if capacity is None:
                self.ctx.events.emit(claim, C.WARNING, VOLUME_RESIZE_FAILED,
                                     f'StoragePool "{pool_name}" is gone or invalid: cannot '
                                     "expand", component=COMPONENT)
                return
            current = self.ledger.get(pv_name)
            have = current.size if current else int(record["spec"]["sizeBytes"])
            if not self.ledger.grow(pv_name, want, capacity):
                free = max(0, capacity - self.ledger.allocated(pool_name))
                self.ctx.events.emit(
                    claim, C.WARNING, VOLUME_RESIZE_FAILED,
                    f"cannot expand {pv_name} to {format_quantity(want)}: StoragePool "
                    f'"{pool_name}" has {format_quantity(free)} free, '
                    f"{format_quantity(want - have)} more needed", component=COMPONENT)
                return
            try:
                record = await self.ctx.kube.merge_patch(alloc_path(pv_name), {
                    "metadata": {"resourceVersion": record["metadata"]["resourceVersion"]},
                    "spec": {"sizeBytes": want}})
            except BaseException:
                self.ledger.cancel(pv_name)
                raise
            self.allocations.upsert(record)
            self.ledger.observe(pv_name, pool_name, int(record["spec"]["sizeBytes"]))
            metrics.api_writes.labels(self.name, "storageallocations", "patch").inc()
            faults.point("expand-1")
        size = format_quantity(int(record["spec"]["sizeBytes"]))
        node_side = backing.needs_node_expansion(self.pools.get(pool_name))
        if node_side and volume_capacity(pv) >= want and backing.node_resize_pending(
                claim, want, parse_quantity):
            return  # handed to the kubelet already (NodeExpandVolume finishes it)
        if volume_capacity(pv) < want:
            pv = await self.ctx.kube.merge_patch(pv_path(pv_name), {
                "metadata": {"resourceVersion": pv["metadata"]["resourceVersion"]},
                "spec": {"capacity": {"storage": size}}})
            self.cache.pvs.upsert(pv)
            metrics.api_writes.labels(self.name, "persistentvolumes", "patch").inc()
            faults.point("expand-2")
        md = claim["metadata"]
        if node_side:  # the volume has bytes on a node: the kubelet finishes (node/backing.py)
            new = await self.ctx.kube.merge_patch(
                pvc_path(md["namespace"], md["name"], "status"),
                {"metadata": {"resourceVersion": md["resourceVersion"]},
                 "status": backing.node_resize_status(size, _now())})
            self.cache.pvcs.upsert(new)
            metrics.api_writes.labels(self.name, "persistentvolumeclaims", "patch-status").inc()
            self.ctx.events.emit(claim, C.NORMAL, backing.FS_RESIZE_REQUIRED,
                                 "Require file system resize of volume on node",
                                 component=COMPONENT)
            log.info("expansion handed to the node", kind="PersistentVolumeClaim",
                     namespace=md["namespace"], name=md["name"], volume=pv_name, size=size,
                     action="expand")
            return
        new = await self.ctx.kube.merge_patch(pvc_path(md["namespace"], md["name"], "status"), {
            "metadata": {"resourceVersion": md["resourceVersion"]},
            "status": {"capacity": {"storage": size}, "allocatedResources": {"storage": size},
                       "conditions": None}})
        self.cache.pvcs.upsert(new)
        metrics.api_writes.labels(self.name, "persistentvolumeclaims", "patch-status").inc()
        self.ctx.events.emit(claim, C.NORMAL, VOLUME_RESIZE_SUCCESSFUL,
                             f"volume {pv_name} expanded to {size} in StoragePool "
                             f'"{pool_name}"', component=COMPONENT)
        log.info("expanded", kind="PersistentVolumeClaim", namespace=md["namespace"],
                 name=md["name"], volume=pv_name, size=size, action="expand")

    # -- pool status and capacity for the scheduler -------------------------------------------------
    async def _publisher(self) -> None:
        """Debounced: after any allocation/pool/node/class change, refresh what we publish."""
        last_relist = self.clock()
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), timeout=60)
            except TimeoutError:
                pass  # periodic refresh
            await asyncio.sleep(DEBOUNCE)
            self._dirty.clear()
            if self._requeue_pending:
                self._requeue_pending = False
                self._requeue_pending_claims()
            try:
                if self._published is None or self.clock() - last_relist > CAPACITY_RELIST:
                    await self._list_published()
                    last_relist = self.clock()
                await self._write_statuses()
                await self._write_capacities()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("publishing pool status/capacity failed", error=str(e))
                self._published = None
                await asyncio.sleep(1.0)
                self._dirty.set()

    def _requeue_pending_claims(self) -> None:
        pvc = self.ctx.pv_controller
        if pvc is None:
            return
        for key, claim in list(self.cache.pvcs.items()):
            if (claim.get("status") or {}).get("phase") == C.CLAIM_BOUND:
                continue
            if (claim.get("spec") or {}).get("volumeName"):
                continue
            sc = self.cache.classes.get(claim_class(claim))
            if sc is not None and sc.get("provisioner") == PROVISIONER:
                pvc.claims.add(key)

    async def _write_statuses(self) -> None:
        for name, pool in list(self.pools.items()):
            desired = pool_status(pool, self.ledger.sizes(name), self.nodes)
            if not status_differs(pool.get("status"), desired):
                continue
            try:
                new = await self.ctx.kube.merge_patch(pool_path(name, "status"),
                                                      {"status": desired})
            except ApiError as e:
                if e.not_found:
                    continue
                raise
            metrics.api_writes.labels(self.name, "storagepools", "patch-status").inc()
            if new:
                self.pools.upsert(new)

    async def _list_published(self) -> None:
        await self._ensure_namespace()
        body = await self.ctx.kube.get(capacity_path(self.namespace), query={
            "labelSelector": f"{MANAGED_BY}=volplane,volplane.io/driver={PROVISIONER}"})
        self._published = {o["metadata"]["name"]: o for o in (body or {}).get("items") or []}

    async def _ensure_namespace(self) -> None:
        try:
            await self.ctx.kube.create("/api/v1/namespaces", {
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}})
        except ApiError as e:
            if not (e.already_exists or e.conflict or e.status == 403):
                raise

    async def _write_capacities(self) -> None:
        assert self._published is not None
        desired = capacity_objects(self.pools, self.cache.classes, self.ledger, self.nodes,
                                   self.namespace)
        kube = self.ctx.kube
        for name, want in desired.items():
            have = self._published.get(name)
            if have is not None and (have.get("storageClassName") != want["storageClassName"]
                                     or have.get("nodeTopology") != want["nodeTopology"]):
                await self._delete_capacity(name)  # immutable fields: replace the object
                have = None
            if have is None:
                try:
                    self._published[name] = await kube.create(capacity_path(self.namespace), want)
                    metrics.api_writes.labels(self.name, "csistoragecapacities", "create").inc()
                except ApiError as e:
                    if not e.already_exists:
                        raise
                    self._published = None  # out of sync: re-list next round
                    self._dirty.set()
                    return
            elif (have.get("capacity") != want["capacity"]
                  or have.get("maximumVolumeSize") != want["maximumVolumeSize"]):
                try:
                    self._published[name] = await kube.merge_patch(
                        capacity_path(self.namespace, name),
                        {"capacity": want["capacity"],
                         "maximumVolumeSize": want["maximumVolumeSize"]})
                    metrics.api_writes.labels(self.name, "csistoragecapacities", "patch").inc()
                except ApiError as e:
                    if not e.not_found:
                        raise
                    self._published.pop(name, None)
                    self._dirty.set()
        for name in [n for n in self._published if n not in desired]:
            await self._delete_capacity(name)

    async def _delete_capacity(self, name: str) -> None:
        try:
            await self.ctx.kube.delete(capacity_path(self.namespace, name))
            metrics.api_writes.labels(self.name, "csistoragecapacities", "delete").inc()
        except ApiError as e:
            if not e.not_found:
                raise
        if self._published is not None:
            self._published.pop(name, None)

    async def _ensure_driver(self) -> None:
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
                    have = await self.ctx.kube.get(path)
                except ApiError as e:
                    if not e.not_found:
                        raise
                    await self.ctx.kube.create("/apis/storage.k8s.io/v1/csidrivers", body)
                    log.info("CSIDriver created", name=PROVISIONER)
                    return
                spec = have.get("spec") or {}
                if not spec.get("storageCapacity"):
                    await self.ctx.kube.merge_patch(path, {"spec": {"storageCapacity": True}})
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

    # -- garbage collection of orphaned allocation records ----------------------------------------
    async def _gc(self) -> None:
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
        if name in self.cache.pvs:
            return False
        if backing.RETAINED_ANNOTATION in (record["metadata"].get("annotations") or {}):
            return False  # a retained volume: freed only by deleting its record
        ref = (record.get("spec") or {}).get("claim") or {}
        claim = self.cache.pvcs.get(f"{ref.get('namespace')}/{ref.get('name')}")
        if claim is None or claim["metadata"].get("uid") != ref.get("uid"):
            return True
        bound_to = (claim.get("spec") or {}).get("volumeName")
        return bool(bound_to) and bound_to != name

    async def collect_orphans(self) -> list[str]:
        """Delete records with no PV whose claim is gone, once ORPHAN_GRACE old.

        The grace is measured from the record's own creationTimestamp, not from when
        this process first saw it orphaned: an in-memory timer restarts with the
        process, so an operator restarting more often than the grace never freed
        anything (issue 15). What the grace protects is a provisioning in flight (the
        PV is written right after the record): a record that old has none, except one
        whose provision() runs here right now (skipped). The cache may lag, so the
        PV's and the claim's absence is confirmed with the API server before deleting."""
        now = self.wall()
        freed = []
        for name, record in list(self.allocations.items()):
            if name in self._provisioning or not self._orphaned(name, record):
                continue
            if not orphan_due(record, now, ORPHAN_GRACE):
                continue
            try:  # the cache may lag: confirm with the API server
                await self.ctx.kube.get(pv_path(name))
                continue
            except ApiError as e:
                if not e.not_found:
                    raise
            ref = record["spec"]["claim"]
            try:
                live = await self.ctx.kube.get(pvc_path(ref["namespace"], ref["name"]))
                if live["metadata"].get("uid") == ref["uid"] and (
                        (live.get("spec") or {}).get("volumeName") in (None, "", name)):
                    continue
            except ApiError as e:
                if not e.not_found:
                    raise
            try:
                await self.ctx.kube.request("DELETE", alloc_path(name), {
                    "kind": "DeleteOptions", "apiVersion": "v1",
                    "preconditions": {"uid": record["metadata"].get("uid")}})
            except ApiError as e:
                if not (e.not_found or e.conflict):
                    raise
            self.allocations.remove(name)
            freed.append(name)
            log.info("orphaned allocation freed", name=name, pool=record["spec"].get("pool"),
                     claim=f"{ref['namespace']}/{ref['name']}", action="gc")
        return freed


def orphan_due(record: dict, now: float, grace: float = ORPHAN_GRACE) -> bool:
    """Whether an orphaned allocation record is old enough to collect: `now` (wall
    clock) is at least `grace` seconds past its creationTimestamp. A record without a
    readable timestamp is never collected on age (it is reported by `volplane check`)."""
    created = _timestamp((record.get("metadata") or {}).get("creationTimestamp"))
    return created is not None and now - created >= grace


def _timestamp(s: str | None) -> float | None:
    if not s:
        return None
    try:
        return calendar.timegm(time.strptime(s, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return None
