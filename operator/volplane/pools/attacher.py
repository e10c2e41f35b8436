"""The external-attacher of volplane's own CSI driver, `pool.volplane.io`.

For each VolumeAttachment with ``spec.attacher: pool.volplane.io``:

attach (no deletionTimestamp)
    1. check: the PV exists and is a pool volume (handle ``<pool>/<pv>``), the pool
       exists, and the node is one the pool reaches; otherwise ``status.attachError``
       says which of these failed;
    2. write the device slot and our finalizer, in one metadata patch guarded by the
       attachment's resourceVersion: annotations ``volplane.io/pool`` and
       ``volplane.io/slot``, finalizer ``volplane.io/attacher``;
    3. write ``status.attached: true`` and ``attachmentMetadata.devicePath``
       (``/dev/volplane/<pool>/slot-<n>``) through the status subresource; for a pool
       with ``spec.backing``, also ``backingType`` and ``backingFile``, which the kubelet
       hands the node plugin as the publish context (volplane/node/backing.py).
detach (deletionTimestamp set, our finalizer present)
    1. ``status.attached: false`` (the device is gone);
    2. remove the finalizer: the attachment disappears and its slot with it.

The slot ledger is the VolumeAttachments themselves (``slots.slots_in_use``): a slot is
held from write 2 until the attachment is gone. Crash safety:
- a crash after attach write 2 leaves the slot recorded: the restart finds it on the
  attachment and reuses it, so no slot leaks and none is handed out twice;
- a crash before write 2 recorded nothing: the restart allocates afresh;
- a crash during detach leaves the finalizer: the restart finishes the detach;
- write 2 carries the resourceVersion the decision was made on. A slot is chosen from
  the ledger plus the in-memory reservations of writes in flight, and reserved, with no
  await in between (one event loop: nothing else runs meanwhile); the reservation is
  dropped only once the cache knows the outcome (the written attachment is stored
  write-through; after an error whose outcome is unknown, e.g. a timeout, the
  attachment is re-read first). So two attachments never get one slot, and writes to
  one node still run in parallel.

A node out of slots leaves ``status.attachError`` saying so ("node X has no free device
slot (16/16 in use on pool P)") and an event; the first slot freed on that node and
pool (an attachment gone) queues the waiting attachments again.
"""

from __future__ import annotations

import asyncio

from prometheus_client.core import GaugeMetricFamily

from .. import faults, logs, metrics
from ..context import Context
from ..kinds import (
    ATTACHMENTS_BY_NODE,
    ATTACHMENTS_BY_PV,
    NODES,
    POOLS,
    PVS,
    VOLUME_ATTACHMENTS,
)
from ..kube import ApiError
from ..node import backing
from ..objects import now_rfc3339, rv_int
from ..workqueue import WorkQueue, process
from . import slots as S
from .placement import pool_nodes

log = logs.get("pool-attacher")
COMPONENT = "pool-attacher"
VA_PATH = VOLUME_ATTACHMENTS.path()

def pool_reaches(pool: dict, node_name: str, nodes) -> bool:
    """Whether `pool` is attached to the (existing, not deleting) node `node_name`."""
    node = nodes.get(node_name)
    return node is not None and bool(pool_nodes(pool, {node_name: node}))


class PoolAttacher:
    name = "pool-attacher"
    watches = (VOLUME_ATTACHMENTS, PVS, NODES, POOLS)

    def __init__(self, ctx: Context):
        self.ctx = ctx
        inf = ctx.informers
        self.vas = inf.lister(VOLUME_ATTACHMENTS)
        self.nodes = inf.lister(NODES)
        self.pools = inf.lister(POOLS)
        self.pvs = inf.lister(PVS)
        self.vas_by_node = inf.index(ATTACHMENTS_BY_NODE)
        self.vas_by_pv = inf.index(ATTACHMENTS_BY_PV)
        self.queue = WorkQueue("pool-attacher", resource="volumeattachments",
                               depth=metrics.queue_depth.labels("pool-attacher").set)
        # (node, pool) -> slot -> attachment: slots being written right now
        self.reserved: dict[tuple[str, str], dict[int, str]] = {}
        inf.listen(VOLUME_ATTACHMENTS, self._on_attachment)
        inf.listen(PVS, self._on_volume)
        inf.listen(NODES, self._on_node)
        inf.listen(POOLS, self._on_pool)
        metrics.register_collector("pool-attacher", _SlotCollector(self))

    # -- gather: listeners (they only queue attachments) -------------------------------------
    @staticmethod
    def _ours(va: dict | None) -> bool:
        return bool(va) and (va.get("spec") or {}).get("attacher") == S.POOL_DRIVER

    def _on_attachment(self, name: str, old: dict | None, new: dict | None) -> None:
        if self._ours(new):
            self.queue.add(name)
        # A slot freed (attachment gone, or its slot dropped): wake the ones waiting there.
        if self._ours(old) and S.slot_of(old) and (new is None or not S.slot_of(new)):
            self._wake_node(old["spec"].get("nodeName"))

    def _wake_node(self, node: str | None) -> None:
        for n in self.vas_by_node.get(node or ""):
            va = self.vas.get(n)
            if self._ours(va) and not (va.get("status") or {}).get("attached"):
                self.queue.add(n)

    def _on_volume(self, name: str, old: dict | None, new: dict | None) -> None:
        for n in self.vas_by_pv.get(name):
            if self._ours(self.vas.get(n)):
                self.queue.add(n)

    def _on_node(self, name: str, old: dict | None, new: dict | None) -> None:
        if (old or {}).get("metadata", {}).get("labels") != (new or {}).get(
                "metadata", {}).get("labels") or (old is None) != (new is None):
            self._wake_node(name)

    def _on_pool(self, name: str, old: dict | None, new: dict | None) -> None:
        if (old or {}).get("spec") == (new or {}).get("spec"):
            return
        for n, va in list(self.vas.items()):
            if self._ours(va) and not (va.get("status") or {}).get("attached"):
                self.queue.add(n)

    # -- loops ------------------------------------------------------------------------------
    async def run(self) -> None:
        for name, va in list(self.vas.items()):
            if self._ours(va):
                self.queue.add(name)
        n = max(1, self.ctx.options.workers // 2)
        tasks = [asyncio.create_task(process(self.queue, self.sync, controller=self.name,
                                             log=log, on_conflict=self._reread))
                 for _ in range(n)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    async def _reread(self, name: str) -> dict | None:
        try:
            va = await self.ctx.kube.get(f"{VA_PATH}/{name}")
        except ApiError as e:
            if e.not_found:
                self.vas.gone(name)
                return None
            raise
        return self.vas.put(va)

    # -- decide + act -----------------------------------------------------------------------
    async def sync(self, name: str) -> None:
        va = self.vas.get(name)
        if not self._ours(va):
            return
        if va["metadata"].get("deletionTimestamp"):
            await self._detach(va)
            return
        st = va.get("status") or {}
        slot = S.slot_of(va)
        if st.get("attached") and slot and S.ATTACHER_FINALIZER in (
                va["metadata"].get("finalizers") or ()):
            return  # attached: a pool or node change later does not undo it
        spec = va["spec"]
        node = spec.get("nodeName") or ""
        if slot is not None:  # recorded: any reservation of ours has done its job
            self._release(node, slot[0], slot[1])
        pv_name = (spec.get("source") or {}).get("persistentVolumeName") or ""
        pool_name, problem = self._check(pv_name, node)
        if problem:
            await self._fail(va, problem, "AttachFailed")
            return
        pool = self.pools[pool_name]
        if slot is None or slot[0] != pool_name or self._holder(node, slot) != name:
            # Read the ledger and reserve in memory with no await in between, so that
            # concurrent allocations on one node never pick the same slot; the
            # reservation stands until the write is known to have landed or failed.
            key = (node, pool_name)
            used = S.slots_in_use(self._ours_on(node), node, pool_name)
            reserved = self.reserved.get(key, {})
            mine = [s for s, holder in reserved.items() if holder == name]
            taken = set(used) | set(reserved)
            total = S.slots_per_node(pool)
            # a reservation of ours left by a write whose fate is unknown: write it again
            free = mine[0] if mine else S.free_slot(taken, total)
            if free is None:
                await self._fail(va, S.no_slot_message(node, len(taken), total, pool_name),
                                 "NoFreeDeviceSlot")
                return
            self.reserved.setdefault(key, {})[free] = name
            va = await self._record_slot(va, pool_name, free, node)
            if va is None:
                return
            slot = (pool_name, free)
        await self._mark_attached(va, slot)

    def _ours_on(self, node: str) -> list[dict]:
        return [va for n in self.vas_by_node.get(node) if self._ours(va := self.vas.get(n))]

    def _holder(self, node: str, slot: tuple[str, int]) -> str | None:
        return S.slots_in_use(self._ours_on(node), node, slot[0]).get(slot[1])

    def _release(self, node: str, pool: str, slot: int) -> None:
        reserved = self.reserved.get((node, pool))
        if reserved is not None:
            reserved.pop(slot, None)
            if not reserved:
                del self.reserved[(node, pool)]

    def _check(self, pv_name: str, node: str) -> tuple[str, str | None]:
        pv = self.pvs.get(pv_name)
        if pv is None:
            return "", f"PersistentVolume {pv_name} not found"
        csi = (pv.get("spec") or {}).get("csi") or {}
        pool_name = S.pool_of_handle(csi.get("volumeHandle"))
        if csi.get("driver") != S.POOL_DRIVER or not pool_name:
            return "", (f"PersistentVolume {pv_name} is not a {S.POOL_DRIVER} volume "
                        f"(volumeHandle <pool>/<name>)")
        pool = self.pools.get(pool_name)
        if pool is None:
            return pool_name, f"StoragePool {pool_name} of volume {pv_name} not found"
        if node not in self.nodes:
            return pool_name, f"node {node} not found"
        if not pool_reaches(pool, node, self.nodes):
            return pool_name, (f"node {node} is not attached to StoragePool {pool_name} "
                               f"(volume {pv_name} can only attach to the pool's nodes)")
        return pool_name, None

    async def _fail(self, va: dict, message: str, reason: str) -> None:
        st = va.get("status") or {}
        if (st.get("attachError") or {}).get("message") != message or st.get("attached"):
            new = await self.ctx.kube.merge_patch(
                f"{VA_PATH}/{va['metadata']['name']}/status",
                {"metadata": {"resourceVersion": va["metadata"]["resourceVersion"]},
                 "status": {"attached": False,
                            "attachError": {"time": now_rfc3339(), "message": message}}})
            metrics.api_writes.labels(self.name, "volumeattachments", "patch-status").inc()
            self.vas.put(new)
            log.info("attach failed", attachment=va["metadata"]["name"], error=message)
        self.ctx.events.emit(va, "Warning", reason, message, component=COMPONENT)

    async def _record_slot(self, va: dict, pool: str, slot: int, node: str) -> dict | None:
        """Write 2: slot + finalizer, one patch, guarded by resourceVersion. Releases the
        in-memory reservation of `slot` once the cache knows whether the write landed."""
        md = va["metadata"]
        finalizers = list(md.get("finalizers") or ())
        if S.ATTACHER_FINALIZER not in finalizers:
            finalizers.append(S.ATTACHER_FINALIZER)
        patch = {"metadata": {"resourceVersion": md["resourceVersion"],
                              "finalizers": finalizers,
                              "annotations": {S.POOL_ANNOTATION: pool,
                                              S.SLOT_ANNOTATION: str(slot)}}}
        try:
            new = await self.ctx.kube.merge_patch(f"{VA_PATH}/{md['name']}", patch)
        except ApiError as e:
            if e.not_found:
                self.vas.gone(md["name"])
                self._release(node, pool, slot)
                return None
            if e.conflict:  # not written
                self._release(node, pool, slot)
                await self._reread(md["name"])
                raise
            await self._reread(md["name"])  # may have landed: learn it, then release
            self._release(node, pool, slot)
            raise
        except Exception:
            await self._reread(md["name"])  # may have landed: learn it, then release
            self._release(node, pool, slot)
            raise
        metrics.api_writes.labels(self.name, "volumeattachments", "patch").inc()
        stored = self.vas.put(new)
        self._release(node, pool, slot)
        faults.point("pool-attach-1")
        return stored

    async def _mark_attached(self, va: dict, slot: tuple[str, int]) -> None:
        """Write 3: status.attached with the device path."""
        md = va["metadata"]
        path = S.device_path(slot[0], slot[1])
        st = va.get("status") or {}
        if st.get("attached") and (st.get("attachmentMetadata") or {}).get("devicePath") == path:
            return
        # What the node plugin needs to find the volume's bytes (the publish context).
        pv = self.pvs.get((va["spec"].get("source") or {}).get("persistentVolumeName") or "")
        handle = (((pv or {}).get("spec") or {}).get("csi") or {}).get("volumeHandle") or ""
        where = backing.publish_context(self.pools.get(slot[0]), handle)
        new = await self.ctx.kube.merge_patch(f"{VA_PATH}/{md['name']}/status", {
            "metadata": {"resourceVersion": md["resourceVersion"]},
            "status": {"attached": True, "attachError": None,
                       "attachmentMetadata": {"devicePath": path, "pool": slot[0],
                                              "slot": str(slot[1]), **where}}})
        metrics.api_writes.labels(self.name, "volumeattachments", "patch-status").inc()
        self.vas.put(new)
        faults.point("pool-attach-2")
        log.info("attached", attachment=md["name"], node=va["spec"].get("nodeName"),
                 volume=(va["spec"].get("source") or {}).get("persistentVolumeName"),
                 device=path, action="attach")

    async def _detach(self, va: dict) -> None:
        md = va["metadata"]
        finalizers = list(md.get("finalizers") or ())
        if S.ATTACHER_FINALIZER not in finalizers:
            return
        if (va.get("status") or {}).get("attached"):
            try:
                va = await self.ctx.kube.merge_patch(f"{VA_PATH}/{md['name']}/status", {
                    "metadata": {"resourceVersion": md["resourceVersion"]},
                    "status": {"attached": False, "attachmentMetadata": None,
                               "detachError": None}})
            except ApiError as e:
                if not e.not_found:
                    raise
                self.vas.gone(md["name"])  # gone already: a stale copy, drop it
                return
            metrics.api_writes.labels(self.name, "volumeattachments", "patch-status").inc()
            va = self.vas.put(va) or va
            faults.point("pool-detach-1")
            md = va["metadata"]
        rest = [f for f in md.get("finalizers") or () if f != S.ATTACHER_FINALIZER]
        try:
            new = await self.ctx.kube.merge_patch(f"{VA_PATH}/{md['name']}", {
                "metadata": {"resourceVersion": md["resourceVersion"], "finalizers": rest}})
        except ApiError as e:
            if not e.not_found:
                raise
            self.vas.gone(md["name"])
            return
        metrics.api_writes.labels(self.name, "volumeattachments", "patch").inc()
        faults.point("pool-detach-2")
        # Without finalizers the object is gone: drop it now (its slot is free, and the
        # attachments waiting for one are woken) rather than when the watch says so.
        if isinstance(new, dict) and not (new.get("metadata") or {}).get("finalizers"):
            self.vas.gone(md["name"], rv_int(new))
            self._wake_node(va["spec"].get("nodeName"))  # its slot is free now
        elif isinstance(new, dict):
            self.vas.put(new)
        log.info("detached", attachment=md["name"], node=va["spec"].get("nodeName"),
                 slot=(md.get("annotations") or {}).get(S.SLOT_ANNOTATION), action="detach")


class _SlotCollector:
    """volplane_node_device_slots{node,pool,state=used|total}, computed at scrape time."""

    def __init__(self, ctl: PoolAttacher):
        self.ctl = ctl

    def collect(self):
        for _ in range(5):  # scraped from another thread: retry a torn read
            try:
                return list(self._collect())
            except RuntimeError:
                continue
        return []

    def _collect(self):
        g = GaugeMetricFamily("volplane_node_device_slots",
                              "Device slots of pool.volplane.io attachments per node and pool",
                              labels=["node", "pool", "state"])
        used: dict[tuple[str, str], int] = {}
        for va in list(self.ctl.vas.values()):
            if not self.ctl._ours(va):
                continue
            s = S.slot_of(va)
            if s:
                k = (va["spec"].get("nodeName") or "", s[0])
                used[k] = used.get(k, 0) + 1
        for (node, pool), n in sorted(used.items()):
            g.add_metric([node, pool, "used"], n)
            g.add_metric([node, pool, "total"],
                         S.slots_per_node(self.ctl.pools.get(pool)))
        yield g

