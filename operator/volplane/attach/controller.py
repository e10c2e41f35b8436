"""Attach/Detach controller effect layer: indexes, the per-volume reconcile, the writes.

Gather, decide, act:
- gather: the cache (Pods, Nodes, PVs, PVCs, VolumeAttachments, CSIDrivers) and the
  indexes kept beside it by store listeners: which pods need which volume on which
  node (the desired state, kept per pod), and which attachments exist per volume and
  per node (the actual state is the VolumeAttachments themselves);
- decide: `state.reconcile`, pure, run for one volume at a time (every entry of that
  volume on every node, so "detach from the old node before attaching to the new one"
  and the multi-attach rule are decided in one place);
- act: here. Event-driven: a change to any input queues the volumes it touches; a
  work queue hands each volume to one worker at a time, so two attaches of one
  volume never race. A slow full resync is only a safety net.

Writes, each safe to repeat after a crash:
- attach: create the VolumeAttachment under upstream's name (AlreadyExists = done);
- detach: first report the volume as no longer attached in node.status.volumesAttached
  (upstream's order: the kubelet must not start a new mount of it), then delete the
  VolumeAttachment; the attacher's finalizer holds it until the volume is detached.
  A crash between the two leaves an attached VolumeAttachment, which the next sync
  reports again and detaches again;
- node.status.volumesAttached: recomputed from the VolumeAttachments, patched only when
  it differs, and coalesced per node (`reports.NodeReportSchedule`): a change is reported
  after a short debounce, changes arriving while a report is in flight share the next
  one, and while attachments on the node are still in progress its reports are at least
  NODE_STATUS_MIN_INTERVAL apart. Nothing of that is durable: the report is recomputed
  from the VolumeAttachments each time, and a restart reports every node once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from .. import faults, logs, metrics
from ..context import Context
from ..kinds import (
    ATTACHMENTS_BY_NODE,
    ATTACHMENTS_BY_PV,
    CSI_DRIVERS,
    NODES,
    PODS,
    PODS_BY_CLAIM,
    PODS_BY_NODE,
    PVCS,
    PVS,
    PVS_BY_CLAIM,
    PVS_BY_VOLUME,
    VOLUME_ATTACHMENTS,
    claim_ref_keys,
    pod_claim_keys,
    pv_volume_keys,
)
from ..kube import ApiError
from ..workqueue import WorkQueue, process
from . import actual as A
from . import desired as D
from . import names as N
from . import reconcile as RC
from . import reports as R
from .flexvolumes import FlexAttacher

log = logs.get("attachdetach")
COMPONENT = "attachdetach-controller"

VA_PATH = VOLUME_ATTACHMENTS.path()
NODE_STATUS_DEBOUNCE = R.NODE_STATUS_DEBOUNCE          # (the write floor uses them too)
NODE_STATUS_MIN_INTERVAL = R.NODE_STATUS_MIN_INTERVAL

forced_detaches = Counter(
    "attachdetach_controller_forced_detaches",
    "Number of times the A/D Controller performed a forced detach", ["reason"])
operation_seconds = Histogram(
    "storage_operation_duration_seconds",
    "Storage operation duration (attach: VolumeAttachment created -> attached; detach: "
    "deleted -> gone)",
    ["volume_plugin", "operation_name", "status", "migrated"], buckets=metrics.LATENCY_BUCKETS)
operation_errors = Counter(
    "attachdetach_controller_operation_errors_total",
    "Attach/detach operations the attacher reported failed", ["volume_plugin", "operation_name"])


def _node_view(node: dict | None) -> tuple:
    """The parts of a Node the reconcile reads (a change elsewhere re-syncs nothing)."""
    if node is None:
        return (None,)
    return (D.node_managed(node), RC.node_ready(node), RC.node_out_of_service(node),
            tuple(sorted(RC.volumes_in_use(node))))


def _pod_view(pod: dict | None) -> tuple | None:
    """The parts of a Pod its volumes' desired state depends on (status churn that
    changes none of them queues nothing)."""
    if pod is None:
        return None
    return ((pod.get("spec") or {}).get("nodeName"), pod_claim_keys(pod),
            D.pod_terminated(pod))


def _claim_view(claim: dict | None) -> tuple | None:
    if claim is None:
        return None
    return ((claim.get("metadata") or {}).get("uid"), (claim.get("spec") or {}).get(
        "volumeName"), (claim.get("status") or {}).get("phase"))


class AttachDetachController:
    name = "attachdetach"
    watches = (PODS, NODES, PVS, PVCS, VOLUME_ATTACHMENTS, CSI_DRIVERS)

    def __init__(self, ctx: Context, *, clock=time.monotonic):
        self.ctx = ctx
        self.clock = clock
        inf = ctx.informers
        self.pods = inf.lister(PODS)
        self.nodes = inf.lister(NODES)
        self.vas = inf.lister(VOLUME_ATTACHMENTS)
        self.drivers = inf.lister(CSI_DRIVERS)
        self.pvs = inf.lister(PVS)
        self.pvcs = inf.lister(PVCS)
        # The desired state is derived per volume when it is synced: the PV's claim,
        # the pods using that claim (an index), each pod's volumes (state.pod_volumes).
        # The actual state is the VolumeAttachments, found by PV and by node (indexes).
        self.pods_by_claim = inf.index(PODS_BY_CLAIM)
        self.pods_by_node = inf.index(PODS_BY_NODE)
        self.pvs_by_claim = inf.index(PVS_BY_CLAIM)
        # PVs that are one volume (same driver and handle): upstream's identity is the
        # unique volume name, so a sync of one PV covers all of them.
        self.pvs_by_volume = inf.index(PVS_BY_VOLUME)
        self.vas_by_pv = inf.index(ATTACHMENTS_BY_PV)
        self.vas_by_node = inf.index(ATTACHMENTS_BY_NODE)
        self.max_wait = ctx.options.unmount_max_wait  # --unmount-max-wait

        # reconcile memory
        self.detach_requested: dict[tuple[str, str], float] = {}
        self.detaching: set[tuple[str, str]] = set()  # detach started (not reported)
        self.multi_reported: set[tuple[str, str]] = set()
        self.attach_started: dict[str, float] = {}    # VA name -> clock
        self.detach_started: dict[str, float] = {}
        self.node_locks: dict[str, asyncio.Lock] = {}
        self.node_reports = R.NodeReportSchedule(NODE_STATUS_DEBOUNCE,
                                                 NODE_STATUS_MIN_INTERVAL)

        self.volumes = WorkQueue("attachdetach-volumes",
                                 depth=metrics.queue_depth.labels("attachdetach-volumes").set)
        self.flex = FlexAttacher(self)   # FlexVolume drivers (flexvolumes.py)
        self.node_queue = WorkQueue("attachdetach-nodes")
        self.running = False

        inf.listen(PODS, self._on_pod)
        inf.listen(PVCS, self._on_claim)
        inf.listen(PVS, self._on_volume)
        inf.listen(NODES, self._on_node)
        inf.listen(VOLUME_ATTACHMENTS, self._on_attachment)
        inf.listen(CSI_DRIVERS, self._on_driver)
        metrics.register_collector("attachdetach", _Collector(self))

    # -- gather: listeners (they only queue volumes and node reports) ---------------------
    def _claim_volumes(self, claim_key: str) -> set[str]:
        """The PVs a claim is (or is being) bound to."""
        out = set(self.pvs_by_claim.get(claim_key))
        vol = ((self.pvcs.get(claim_key) or {}).get("spec") or {}).get("volumeName")
        if vol:
            out.add(vol)
        return out

    def _queue_claims(self, claim_keys) -> None:
        for ck in claim_keys:
            for pv in self._claim_volumes(ck):
                self.volumes.add(pv)

    def _on_pod(self, key: str, old: dict | None, new: dict | None) -> None:
        if _pod_view(old) == _pod_view(new):
            return
        self.flex.pod_changed(key, new)
        for obj in (old, new):
            if obj is not None:
                self._queue_claims(pod_claim_keys(obj))

    def _on_claim(self, key: str, old: dict | None, new: dict | None) -> None:
        if key not in self.pods_by_claim or _claim_view(old) == _claim_view(new):
            return  # no pod uses it, or nothing the desired state reads changed
        self.flex.claim_changed(key)
        for obj in (old, new):
            vol = ((obj or {}).get("spec") or {}).get("volumeName")
            if vol:
                self.volumes.add(vol)
        for pv in self.pvs_by_claim.get(key):
            self.volumes.add(pv)

    def _on_volume(self, name: str, old: dict | None, new: dict | None) -> None:
        self.volumes.add(name)
        for obj in (old, new):
            driver = D.flex_driver((obj or {}).get("spec"))
            if driver:
                self.volumes.add(D.flex_unique_name(driver, name))
        for va in self.vas_by_pv.get(name):
            node = ((self.vas.get(va) or {}).get("spec") or {}).get("nodeName")
            if node:
                self._node_changed(node)

    def _on_node(self, name: str, old: dict | None, new: dict | None) -> None:
        before, after = _node_view(old), _node_view(new)
        if before[:1] != after[:1]:  # managed / existence changed: pods there count or not
            for pod_key in self.pods_by_node.get(name):
                pod = self.pods.get(pod_key)
                if pod is not None:
                    self._queue_claims(pod_claim_keys(pod))
                    self.flex.pod_changed(pod_key, pod)
        if before != after:
            for a in self.flex.actual_on_node(name):
                self.volumes.add(a.pv_name)
            for va in self.vas_by_node.get(name):
                pv = (((self.vas.get(va) or {}).get("spec") or {}).get("source") or {}).get(
                    "persistentVolumeName")
                if pv:
                    self.volumes.add(pv)
        if new is not None and (old is None or _report_inputs(old) != _report_inputs(new)):
            self._node_changed(name)  # (not on heartbeats: the report reads only these)

    def _on_driver(self, name: str, old: dict | None, new: dict | None) -> None:
        self._queue_claims(self.pods_by_claim.keys())

    def _on_attachment(self, name: str, old: dict | None, new: dict | None) -> None:
        def where(obj):
            spec = (obj or {}).get("spec") or {}
            return (spec.get("source") or {}).get("persistentVolumeName"), spec.get("nodeName")

        (opv, onode), (npv, nnode) = where(old), where(new)
        for pv in {opv, npv} - {None}:
            self.volumes.add(pv)
        for node in {onode, nnode} - {None}:
            self._node_changed(node)
        now = self.clock()
        was = bool(((old or {}).get("status") or {}).get("attached"))
        is_ = bool(((new or {}).get("status") or {}).get("attached"))
        plugin = N.plugin_name(((new or old or {}).get("spec") or {}).get("attacher") or "")
        for field, op_name in (("attachError", "volume_attach"),
                               ("detachError", "volume_detach")):
            msg = (((new or {}).get("status") or {}).get(field) or {}).get("message")
            if msg and msg != (((old or {}).get("status") or {}).get(field) or {}).get(
                    "message"):
                operation_errors.labels(plugin, op_name).inc()  # once per new error
        if new is not None and is_ and not was:
            started = self.attach_started.pop(name, None)
            if started is not None:
                operation_seconds.labels(plugin, "volume_attach", "success", "false").observe(
                    now - started)
            self._attach_succeeded(npv, nnode)
        if new is None:
            self.detaching.discard((self._vid(opv), onode))
            self.attach_started.pop(name, None)
            started = self.detach_started.pop(name, None)
            if started is not None:
                operation_seconds.labels(plugin, "volume_detach", "success", "false").observe(
                    now - started)
        elif old is not None and old["metadata"].get("uid") != new["metadata"].get("uid"):
            self.detaching.discard((self._vid(npv), nnode))  # a new attachment, same name
            self.detach_started.pop(name, None)

    def _node_changed(self, node: str) -> None:
        """Queue a node's status report when the schedule says (a burst of attachments
        on one node costs a few status writes, not one per attachment)."""
        delay = self.node_reports.changed(node, self.clock(), self._node_busy(node))
        if delay is None:
            return  # a report already queued or in flight covers this change
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop (yet): nothing to debounce against
            self.node_queue.add(node)
            return
        self.node_queue.add_after(node, delay)

    def _pod_volumes(self, pod: dict) -> tuple[str | None, list[D.VolumeRef]]:
        return D.pod_volumes(pod, pvcs=self.pvcs, pvs=self.pvs, drivers=self.drivers,
                             nodes=self.nodes, flex_drivers=self.flex.drivers())

    def _node_busy(self, node: str) -> bool:
        desired = []
        for pod_key in self.pods_by_node.get(node):
            pod = self.pods.get(pod_key)
            if pod is None:
                continue
            where, vols = self._pod_volumes(pod)
            if where == node:
                desired += [(v.unique_name, node) for v in vols]
        return R.node_attach_in_progress(self._actual_on_node(node), node, desired)

    def _attach_succeeded(self, pv: str | None, node: str | None) -> None:
        if not self.running or not pv:
            return
        d = self._desired_for(pv).get((self._vid(pv), node))
        if d is None:
            return
        msg = f'AttachVolume.Attach succeeded for volume "{pv}" '
        for p in d.pods:
            self.ctx.events.emit(p.as_object(), "Normal", N.SUCCESSFUL_ATTACH, msg,
                                 component=COMPONENT)

    # -- views for one volume -------------------------------------------------------------
    def _vid(self, pv: str | None) -> str:
        """The identity of a PV's volume: its unique volume name (CSI), else its name."""
        v = D.volume_ref(self.pvs.get(pv or "") or {}) if pv else None
        return v.unique_name if v is not None else (pv or "")

    def _group(self, pv: str) -> set[str]:
        """The PVs that are the same volume as `pv` (itself included)."""
        out = {pv}
        for key in pv_volume_keys(self.pvs.get(pv) or {}):
            out.update(self.pvs_by_volume.get(key))
        return out

    def _desired_for(self, pv: str) -> D.DSW:
        """The desired state of one volume (all PVs on its volume handle): the pods using
        their claims that need it attached, by (unique volume name, node)."""
        group = self._group(pv)
        entries = []
        for name in group:
            for claim_key in claim_ref_keys(self.pvs.get(name) or {}):
                for pod_key in self.pods_by_claim.get(claim_key):
                    pod = self.pods.get(pod_key)
                    if pod is None:
                        continue
                    node, vols = self._pod_volumes(pod)
                    entries += [(v, node, D.PodRef.of(pod)) for v in vols
                                if v.pv_name in group and node and not v.flex]
        return D.merge_desired(entries)

    def _actual_for(self, pv: str) -> A.ASW:
        names = {n for p in self._group(pv) for n in self.vas_by_pv.get(p)}
        return A.build_asw([va for n in sorted(names) if (va := self.vas.get(n))],
                           pvs=self.pvs, nodes=self.nodes)

    def _actual_on_node(self, node: str) -> list[A.Actual]:
        out = []
        for n in self.vas_by_node.get(node):
            va = self.vas.get(n)
            a = A.actual_of(va, pvs=self.pvs, nodes=self.nodes) if va else None
            if a is not None:
                out.append(a)
        return out + self.flex.actual_on_node(node)

    def _volumes_with_pods(self) -> set[str]:
        return {pv for ck in self.pods_by_claim.keys() for pv in self._claim_volumes(ck)}

    def desired_state(self) -> D.DSW:
        out: D.DSW = {}
        for pv in self._volumes_with_pods():
            out.update(self._desired_for(pv))
        for key in list(self.flex.pods_by_key):
            out.update(self.flex.desired_for(key))
        return out

    def actual_state(self) -> A.ASW:
        asw = A.build_asw(list(self.vas.values()), pvs=self.pvs, nodes=self.nodes)
        asw.update(self.flex.asw)
        return asw

    # -- loops ----------------------------------------------------------------------------
    async def run(self) -> None:
        # flex volumes wait for the first probe (flexvolumes.sync); CSI does not
        registry_task = asyncio.create_task(self.flex.run_registry(), name="flex-registry")
        for key, pod in list(self.pods.items()):
            self.flex.pod_changed(key, pod)
        self.flex.rebuild()   # before any node report: flex attachments are in them
        self.running = True
        with_pods = self._volumes_with_pods()
        for pv in with_pods | set(self.vas_by_pv.keys()):
            self.volumes.add(pv)
        for node in list(self.nodes):
            self.node_queue.add(node)
        log.info("attach/detach controller started", pods=len(self.pods),
                 volumes_with_pods=len(with_pods), attachments=len(self.vas),
                 max_wait_for_unmount=self.max_wait)
        n = max(1, self.ctx.options.workers)
        tasks = [asyncio.create_task(process(self.volumes, self._sync_volume,
                                             controller=self.name, log=log))
                 for _ in range(n)]
        tasks += [asyncio.create_task(process(self.node_queue, self._sync_node,
                                              controller=self.name, log=log))
                  for _ in range(max(2, n // 4))]
        tasks.append(asyncio.create_task(self._resync()))
        tasks += [registry_task, asyncio.create_task(self.flex.verify_loop())]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    async def _resync(self) -> None:
        """A safety net only: every change already queues what it touches."""
        period = max(60.0, self.ctx.options.resync_period * 4)
        while True:
            await asyncio.sleep(period)
            for pv in (self._volumes_with_pods() | set(self.vas_by_pv.keys())
                       | self.flex.all_keys()):
                self.volumes.add(pv)

    # -- act: one volume ------------------------------------------------------------------
    def plan(self, vid: str, dsw: D.DSW, asw: A.ASW, now: float) -> list[RC.Op]:
        """The reconciler's operations for one volume (CSI or flex), taking the detaches
        requested for it (they count once)."""
        requested = {k: t for k, t in self.detach_requested.items() if k[0] == vid}
        ops = RC.reconcile(dsw, asw, self.nodes, now, self.max_wait, requested)
        for k in requested:
            self.detach_requested.pop(k, None)
        return ops

    async def _sync_volume(self, pv: str) -> float | None:
        if D.is_flex_key(pv):
            return await self.flex.sync(pv)
        dsw = self._desired_for(pv)
        asw = self._actual_for(pv)
        vid = self._vid(pv)
        for key in [k for k in self.detaching if k[0] == vid and k not in asw]:
            self.detaching.discard(key)
        now = self.clock()
        ops = self.plan(vid, dsw, asw, now)
        retry: float | None = None
        multi_now: set[tuple[str, str]] = set()
        for op in ops:
            wait = await self._act(op, now, multi_now)
            if wait is not None:
                retry = wait if retry is None else min(retry, wait)
        for key in [k for k in self.multi_reported if k[0] == vid and k not in multi_now]:
            self.multi_reported.discard(key)
        metrics.sync_total.labels(self.name, "volumes", "ok").inc()
        return retry

    async def _act(self, op: RC.Op, now: float, multi_now: set[tuple[str, str]]
                   ) -> float | None:
        """Carry out one op of the reconcile; returns when to look again, if timed."""
        if op.kind is RC.OpKind.DETACH:
            if op.va_name not in self.detach_started:  # else: the watch lags our delete
                await self._detach(op)
        elif op.kind is RC.OpKind.WAIT_UNMOUNT:
            self.detach_requested[op.key] = op.since if op.since is not None else now
            if op.retry_at is not None:
                return max(0.05, op.retry_at - now + 0.05)
        elif op.kind is RC.OpKind.ATTACH:
            await self._attach(op)
        elif op.kind is RC.OpKind.MULTI_ATTACH:
            multi_now.add(op.key)
            if op.key not in self.multi_reported:
                self.multi_reported.add(op.key)
                self._post(op.events, N.FAILED_ATTACH)
                log.info("multi-attach error", volume=op.pv_name, node=op.node,
                         pods=[p.key for p, _ in op.events])
        elif op.kind is RC.OpKind.ATTACH_FAILED:
            self._post(op.events, N.FAILED_ATTACH)
        elif op.kind is RC.OpKind.DETACH_FAILED:
            pv_obj = self.pvs.get(op.pv_name)
            if pv_obj is not None:
                self.ctx.events.emit(pv_obj, "Warning", N.FAILED_DETACH, op.reason,
                                     component=COMPONENT)
        return None

    def _post(self, events: Iterable[tuple[D.PodRef, str]], reason: str,
              type_: str = "Warning") -> None:
        for pod, message in events:
            self.ctx.events.emit(pod.as_object(), type_, reason, message,
                                 component=COMPONENT)

    async def _attach(self, op: RC.Op) -> None:
        body = RC.volume_attachment_body(op.volume, op.node)
        name = body["metadata"]["name"]
        try:
            va = await self.ctx.kube.create(VA_PATH, body)
            metrics.api_writes.labels(self.name, "volumeattachments", "create").inc()
        except ApiError as e:
            if not e.already_exists:
                raise
            va = await self.ctx.kube.get(f"{VA_PATH}/{name}")
        self.attach_started.setdefault(name, self.clock())
        faults.point("attach-1")
        self.vas.put(va)
        log.info("attach", volume=op.pv_name, node=op.node, attachment=name,
                 attacher=op.volume.driver, action="attach")

    async def _detach(self, op: RC.Op) -> None:
        self.detaching.add(op.key)
        try:
            await self._sync_node(op.node, force=True)  # report it detached first
        except Exception:
            self.detaching.discard(op.key)
            raise
        faults.point("detach-1")
        # Marked before the DELETE leaves: the attachment's removal (watch or attacher),
        # which can come before this coroutine sees the response, clears the mark. Set
        # after the response, it outlived the attachment and hid the next one of the
        # same name from every later detach.
        started = op.va_name not in self.detach_started
        self.detach_started.setdefault(op.va_name, self.clock())
        try:
            gone = await self.ctx.kube.delete(f"{VA_PATH}/{op.va_name}")
            await faults.delay("detach-response")  # e2e: the response lags the watch
            metrics.api_writes.labels(self.name, "volumeattachments", "delete").inc()
        except ApiError as e:
            if started:
                self.detach_started.pop(op.va_name, None)
            if not e.not_found:
                self.detaching.discard(op.key)
                raise
            gone = None
        if isinstance(gone, dict) and (gone.get("metadata") or {}).get("deletionTimestamp"):
            self.vas.put(gone)  # held by the attacher's finalizer: now DETACHING
        faults.point("detach-2")
        if op.forced:
            forced_detaches.labels(op.forced).inc()
        log.info("detach", volume=op.pv_name, node=op.node, attachment=op.va_name,
                 reason=op.reason, forced=op.forced, action="detach")

    # -- act: node status -----------------------------------------------------------------
    async def _sync_node(self, name: str, force: bool = False) -> float | None:
        """Write the node's volumesAttached if it differs from the VolumeAttachments.
        `force`: now, whatever the schedule says (a detach reports before it deletes)."""
        lock = self.node_locks.setdefault(name, asyncio.Lock())
        async with lock:
            not_yet = self.node_reports.begin(name, self.clock(), force)
            if not_yet is not None:
                return not_yet  # an earlier delay, superseded: the node is due later
            wrote = False
            try:
                wrote = await self._write_node_report(name)
            finally:
                again = self.node_reports.finish(name, self.clock(), wrote,
                                                 self._node_busy(name))
                if again is not None:
                    self.node_queue.add_after(name, again)
            return None

    async def _write_node_report(self, name: str) -> bool:
        node = self.nodes.get(name)
        if node is None:
            self.node_locks.pop(name, None)
            self.node_reports.forget(name)
            return False
        want = R.node_volumes_attached(self._actual_on_node(name), name, self.detaching)
        have = sorted(({"name": e.get("name"), "devicePath": e.get("devicePath") or ""}
                       for e in (node.get("status") or {}).get("volumesAttached") or ()),
                      key=lambda e: e["name"] or "")
        if want == have:
            return False
        try:
            new = await self.ctx.kube.merge_patch(f"/api/v1/nodes/{name}/status",
                                                  {"status": {"volumesAttached": want}})
        except ApiError as e:
            if e.not_found:
                return False
            raise
        metrics.api_writes.labels(self.name, "nodes", "patch-status").inc()
        self.nodes.put(new)
        log.info("node volumesAttached", node=name, count=len(want), action="report")
        return True


def _report_inputs(node: dict) -> tuple:
    """What of a Node its volumesAttached report depends on (volumesInUse names the
    volumes of attachments whose PV is gone)."""
    st = node.get("status") or {}
    return (st.get("volumesAttached"), st.get("volumesInUse"))


class _Collector:
    """attachdetach_controller_total_volumes{plugin_name,state} (upstream's name and
    labels) and storage_count_attachable_volumes_in_use{node,volume_plugin}, computed
    at scrape time from the controller's state."""

    def __init__(self, ctl: AttachDetachController):
        self.ctl = ctl

    def collect(self):
        # Scrapes run in prometheus-client's thread while the event loop mutates the
        # indexes: a "changed size during iteration" just means "read again".
        for _ in range(5):
            try:
                return list(self._collect())
            except RuntimeError:
                continue
        return []

    def _collect(self):
        ctl = self.ctl
        total = GaugeMetricFamily("attachdetach_controller_total_volumes",
                                  "Number of volumes in A/D Controller",
                                  labels=["plugin_name", "state"])
        in_use = GaugeMetricFamily("storage_count_attachable_volumes_in_use",
                                   "Measure number of volumes in use",
                                   labels=["node", "volume_plugin"])
        desired: dict[str, int] = {}
        per_node = D.volumes_in_use(list(ctl.pods.values()), pvcs=ctl.pvcs, pvs=ctl.pvs,
                                    flex_drivers=ctl.flex.drivers())
        for d in ctl.desired_state().values():
            desired[d.volume.plugin] = desired.get(d.volume.plugin, 0) + 1
        actual: dict[str, int] = {}
        for a in ctl.actual_state().values():
            if a.state is A.AState.ATTACHED:
                p = a.attacher if D.is_flex_key(a.pv_name) else N.plugin_name(a.attacher)
                actual[p] = actual.get(p, 0) + 1
        for p, n in desired.items():
            total.add_metric([p, "desired_state_of_world"], n)
        for p, n in actual.items():
            total.add_metric([p, "actual_state_of_world"], n)
        for (node, p), n in per_node.items():
            in_use.add_metric([node, p], n)
        yield total
        yield in_use
