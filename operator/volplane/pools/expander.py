"""The pool driver's expander: a bound pool volume grows to its claim's new request.

Three writes, each skipped when already done, so an expansion interrupted by a crash is
finished by the next sync of the claim:

1. the StorageAllocation's ``sizeBytes`` (the pool must have room for the difference:
   reserved in the ledger first, with no await in between);
2. the PV's ``spec.capacity``;
3. the claim's ``status.capacity`` and ``allocatedResources``.

The PV controller decides that a claim needs it (``pv.decide.sync_expansion``: bound,
asking for more than it has, class allows expansion) and calls ``PoolVolumePlugin.
expand``, which lands here.
"""

from __future__ import annotations

from .. import faults, logs, metrics
from ..kube import pv_path, pvc_path
from ..node import backing
from ..objects import now_rfc3339
from ..pv import constants as C
from ..pv.index import claim_request, volume_capacity
from ..quantity import format_quantity, parse_quantity
from .context import PoolContext
from .placement import pool_capacity
from .records import PROVISIONER, alloc_path

log = logs.get("pool-provisioner")
COMPONENT = PROVISIONER
VOLUME_RESIZE_FAILED = "VolumeResizeFailed"
VOLUME_RESIZE_SUCCESSFUL = "VolumeResizeSuccessful"


class Expander:
    name = "pool-provisioner"

    def __init__(self, pc: PoolContext):
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

    async def expand(self, claim: dict, pv: dict) -> None:
        """Grow `pv` (a pool volume bound to `claim`) to the claim's request: the
        allocation record (if the pool has room), then the PV, then the claim's status.
        Each write is skipped when already done, so a crash between two is finished by
        the next sync."""
        self.pc.refresh_ledger()
        pv_name = pv["metadata"]["name"]
        want = claim_request(claim)
        record = self.allocations.get(pv_name)
        if record is None:
            self.events.emit(claim, C.WARNING, VOLUME_RESIZE_FAILED,
                                 f"no StorageAllocation {pv_name}: cannot expand",
                                 component=COMPONENT)
            return
        pool_name = record["spec"]["pool"]
        if int(record["spec"]["sizeBytes"]) < want:
            pool = self.pools.get(pool_name)
            capacity = pool_capacity(pool) if pool else None
            if capacity is None:
                self.events.emit(claim, C.WARNING, VOLUME_RESIZE_FAILED,
                                     f'StoragePool "{pool_name}" is gone or invalid: cannot '
                                     "expand", component=COMPONENT)
                return
            current = self.ledger.get(pv_name)
            have = current.size if current else int(record["spec"]["sizeBytes"])
            if not self.ledger.grow(pv_name, want, capacity):
                free = max(0, capacity - self.ledger.allocated(pool_name))
                self.events.emit(
                    claim, C.WARNING, VOLUME_RESIZE_FAILED,
                    f"cannot expand {pv_name} to {format_quantity(want)}: StoragePool "
                    f'"{pool_name}" has {format_quantity(free)} free, '
                    f"{format_quantity(want - have)} more needed", component=COMPONENT)
                return
            try:
                record = await self.kube.merge_patch(alloc_path(pv_name), {
                    "metadata": {"resourceVersion": record["metadata"]["resourceVersion"]},
                    "spec": {"sizeBytes": want}})
            except BaseException:
                self.ledger.cancel(pv_name)
                raise
            self.allocations.put(record)
            self.ledger.observe(pv_name, pool_name, int(record["spec"]["sizeBytes"]))
            metrics.api_writes.labels(self.name, "storageallocations", "patch").inc()
            faults.point("expand-1")
        size = format_quantity(int(record["spec"]["sizeBytes"]))
        node_side = backing.needs_node_expansion(self.pools.get(pool_name))
        if node_side and volume_capacity(pv) >= want and backing.node_resize_pending(
                claim, want, parse_quantity):
            return  # handed to the kubelet already (NodeExpandVolume finishes it)
        if volume_capacity(pv) < want:
            pv = await self.kube.merge_patch(pv_path(pv_name), {
                "metadata": {"resourceVersion": pv["metadata"]["resourceVersion"]},
                "spec": {"capacity": {"storage": size}}})
            self.pvs.put(pv)
            metrics.api_writes.labels(self.name, "persistentvolumes", "patch").inc()
            faults.point("expand-2")
        md = claim["metadata"]
        if node_side:  # the volume has bytes on a node: the kubelet finishes (node/backing.py)
            new = await self.kube.merge_patch(
                pvc_path(md["namespace"], md["name"], "status"),
                {"metadata": {"resourceVersion": md["resourceVersion"]},
                 "status": backing.node_resize_status(size, now_rfc3339())})
            self.pvcs.put(new)
            metrics.api_writes.labels(self.name, "persistentvolumeclaims", "patch-status").inc()
            self.events.emit(claim, C.NORMAL, backing.FS_RESIZE_REQUIRED,
                             "Require file system resize of volume on node",
                             component=COMPONENT)
            log.info("expansion handed to the node", kind="PersistentVolumeClaim",
                     namespace=md["namespace"], name=md["name"], volume=pv_name, size=size,
                     action="expand")
            return
        new = await self.kube.merge_patch(pvc_path(md["namespace"], md["name"], "status"), {
            "metadata": {"resourceVersion": md["resourceVersion"]},
            "status": {"capacity": {"storage": size}, "allocatedResources": {"storage": size},
                       "conditions": None}})
        self.pvcs.put(new)
        metrics.api_writes.labels(self.name, "persistentvolumeclaims", "patch-status").inc()
        self.events.emit(claim, C.NORMAL, VOLUME_RESIZE_SUCCESSFUL,
                             f"volume {pv_name} expanded to {size} in StoragePool "
                             f'"{pool_name}"', component=COMPONENT)
        log.info("expanded", kind="PersistentVolumeClaim", namespace=md["namespace"],
                 name=md["name"], volume=pv_name, size=size, action="expand")
