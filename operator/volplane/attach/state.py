"""The Attach/Detach controller's decision layer: pure functions over cached objects.

Nothing here performs I/O or reads a clock; the controller passes `now` in.

Desired state of world (DSW)
----------------------------
Upstream's desired_state_of_world_populator + util.ProcessPodVolumes, for CSI:
a pod contributes when it is scheduled (``spec.nodeName``) on a node that exists
and carries the ``volumes.kubernetes.io/controller-managed-attach-detach``
annotation (the key's presence counts, as upstream), and is not terminated
(phase not Succeeded/Failed, and not "deleted with no container running":
upstream's IsPodTerminated, so a pod that is shutting down keeps its volumes
until its containers stop). Each ``persistentVolumeClaim`` (or generic
``ephemeral``, claim ``<pod>-<volume>`` owned by the pod) volume counts when the
claim is Bound to a PV whose claimRef carries the claim's uid, the PV has a
``spec.csi`` source, and the driver needs attaching (its CSIDriver object says
``attachRequired`` true or unset; no CSIDriver object at all means attach is
required). The DSW maps (PV name, node) to the volume and the pods needing it.

Actual state of world (ASW)
---------------------------
VolumeAttachments are the durable record of attachment: every attach the
controller asks for is one, and an attacher removes its finalizer only once
the volume is detached. So the ASW is derived from them, per (PV name, node):
ATTACHING (exists, not yet ``status.attached``), ATTACHED, DETACHING (being
deleted). ``node.status.volumesAttached`` is the controller's report derived
from the ASW (ATTACHED entries the controller has not started to detach);
its entries (and ``volumesInUse``) also let the ASW name a volume whose PV is
already gone, by hashing them to VolumeAttachment names.

Reconcile
---------
``reconcile`` returns detaches first, then attaches, like upstream's
reconciler: a volume moving to another node is detached from the old one
before it is attached to the new one. Detach rules (safe detach):

* the Node object is gone                      -> detach now ("node-deleted");
* the node has ``node.kubernetes.io/out-of-service`` -> detach now, forced;
* the node lists the volume in ``status.volumesInUse`` -> wait, unless the node
  is NotReady and the maximum wait for unmount has passed (forced "timeout");
* otherwise                                    -> detach.

A ReadWriteOnce/ReadWriteOncePod volume (no RWX/ROX mode; a PV without access
modes allows multi-attach, as upstream) is never attached to a second node:
the pods that want it elsewhere get upstream's ``Multi-Attach error`` once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from volplane.kinds import MANAGED_ANNOTATION, any_container_running

# -- names ---------------------------------------------------------------------------------
OUT_OF_SERVICE_TAINT = "node.kubernetes.io/out-of-service"
CSI_PLUGIN = "kubernetes.io/csi"
CSI_VOLUME_SEP = "^"
POOL_DRIVER = "pool.volplane.io"
FAILED_ATTACH = "FailedAttachVolume"
FAILED_DETACH = "FailedDetachVolume"
SUCCESSFUL_ATTACH = "SuccessfulAttachVolume"
MULTI_ATTACH_MODES_ALLOWED = ("ReadWriteMany", "ReadOnlyMany")

# Pool attacher
SLOT_ANNOTATION = "volplane.io/slot"
POOL_ANNOTATION = "volplane.io/pool"
ATTACHER_FINALIZER = "volplane.io/attacher"
DEFAULT_SLOTS_PER_NODE = 16


def volume_attachment_name(volume_handle: str, attacher: str, node_name: str) -> str:
    """The VolumeAttachment name upstream's CSI attacher uses (csi_attacher.go
    getAttachmentName(volName, csiDriverName, nodeName), called with the PV's
    ``spec.csi.volumeHandle``): ``csi-`` + hex sha256 of handle + driver + node.

    The kubelet and external-attachers look attachments up by this name."""
    digest = hashlib.sha256(f"{volume_handle}{attacher}{node_name}".encode()).hexdigest()
    return f"csi-{digest}"


def unique_volume_name(driver: str, handle: str) -> str:
    """The kubelet/controller UniqueVolumeName of a CSI volume:
    ``kubernetes.io/csi/<driver>^<volumeHandle>`` (what node.status lists)."""
    return f"{CSI_PLUGIN}/{driver}{CSI_VOLUME_SEP}{handle}"


def parse_unique_volume_name(name: str) -> tuple[str, str] | None:
    """(driver, handle) of a CSI unique volume name, None for other plugins."""
    prefix = CSI_PLUGIN + "/"
    if not name.startswith(prefix):
        return None
    driver, sep, handle = name[len(prefix):].partition(CSI_VOLUME_SEP)
    return (driver, handle) if sep and driver and handle else None


def plugin_name(driver: str) -> str:
    """upstream GetFullQualifiedPluginNameForVolume for CSI: ``kubernetes.io/csi:<driver>``."""
    return f"{CSI_PLUGIN}:{driver}"


# -- small accessors -----------------------------------------------------------------------
def _md(obj: Mapping | None) -> Mapping:
    return (obj or {}).get("metadata") or {}


def _spec(obj: Mapping | None) -> Mapping:
    return (obj or {}).get("spec") or {}


def _status(obj: Mapping | None) -> Mapping:
    return (obj or {}).get("status") or {}


# -- node predicates -----------------------------------------------------------------------
def node_managed(node: Mapping | None) -> bool:
    return node is not None and MANAGED_ANNOTATION in (_md(node).get("annotations") or {})


def node_ready(node: Mapping | None) -> bool:
    """upstream nodeutil.IsNodeReady: the Ready condition is True (no condition: not ready)."""
    for c in _status(node).get("conditions") or ():
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def node_out_of_service(node: Mapping | None) -> bool:
    return any(t.get("key") == OUT_OF_SERVICE_TAINT for t in _spec(node).get("taints") or ())


def volumes_in_use(node: Mapping | None) -> set[str]:
    return set(_status(node).get("volumesInUse") or ())


# -- pods ----------------------------------------------------------------------------------
def pod_terminated(pod: Mapping) -> bool:
    """upstream volumeutil.IsPodTerminated on a (slim or full) pod."""
    st = _status(pod)
    if st.get("phase") in ("Succeeded", "Failed"):
        return True
    if not _md(pod).get("deletionTimestamp"):
        return False
    running = st["containersRunning"] if "containersRunning" in st else any_container_running(st)
    return not running


@dataclass(frozen=True, order=True)
class PodRef:
    namespace: str
    name: str
    uid: str = field(default="", compare=False)
    created: str = field(default="", compare=False)

    @classmethod
    def of(cls, pod: Mapping) -> PodRef:
        md = _md(pod)
        return cls(md.get("namespace") or "", md.get("name") or "", md.get("uid") or "",
                   md.get("creationTimestamp") or "")

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def as_object(self) -> dict:
        """Enough of a Pod for an Event's involvedObject."""
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid}}


# -- volumes -------------------------------------------------------------------------------
@dataclass(frozen=True)
class VolumeRef:
    """A CSI PersistentVolume as the AD controller sees it."""
    pv_name: str
    driver: str
    handle: str
    multi_attach: bool = False

    @property
    def unique_name(self) -> str:
        return unique_volume_name(self.driver, self.handle)

    @property
    def plugin(self) -> str:
        return plugin_name(self.driver)

    def attachment_name(self, node: str) -> str:
        return volume_attachment_name(self.handle, self.driver, node)


def multi_attach_allowed(pv: Mapping) -> bool:
    """upstream util.IsMultiAttachAllowed for a PV: no access modes, or RWX/ROX among them."""
    modes = _spec(pv).get("accessModes") or ()
    return not modes or any(m in MULTI_ATTACH_MODES_ALLOWED for m in modes)


def volume_ref(pv: Mapping) -> VolumeRef | None:
    csi = _spec(pv).get("csi") or {}
    if not csi.get("driver") or not csi.get("volumeHandle"):
        return None
    return VolumeRef(_md(pv)["name"], csi["driver"], csi["volumeHandle"], multi_attach_allowed(pv))


def attach_required(driver: str, drivers: Mapping[str, Mapping]) -> bool:
    """CSIDriver ``spec.attachRequired``; no CSIDriver object (or unset) means required."""
    obj = drivers.get(driver)
    if obj is None:
        return True
    return _spec(obj).get("attachRequired", True) is not False


def pod_claim_name(pod: Mapping, vol: Mapping) -> tuple[str | None, bool]:
    """(claim name, ephemeral?) of a pod volume, or (None, False) for other volume types."""
    if vol.get("persistentVolumeClaim"):
        return vol["persistentVolumeClaim"].get("claimName"), False
    if "ephemeral" in vol:
        return f"{_md(pod).get('name')}-{vol.get('name')}", True
    return None, False


def _owned_by(obj: Mapping, uid: str) -> bool:
    return any(r.get("controller") and r.get("uid") == uid
               for r in _md(obj).get("ownerReferences") or ())


def pod_volumes(pod: Mapping, *, pvcs: Mapping[str, Mapping], pvs: Mapping[str, Mapping],
                drivers: Mapping[str, Mapping], nodes: Mapping[str, Mapping]
                ) -> tuple[str | None, list[VolumeRef]]:
    """(node, attachable CSI volumes) one pod needs attached; (None, []) when it needs none.

    upstream DetermineVolumeAction + ProcessPodVolumes + CreateVolumeSpec, for CSI PVs."""
    node = _spec(pod).get("nodeName")
    if not node or not node_managed(nodes.get(node)) or pod_terminated(pod):
        return None, []
    ns = _md(pod).get("namespace") or ""
    out: list[VolumeRef] = []
    seen: set[str] = set()
    for vol in _spec(pod).get("volumes") or ():
        claim_name, ephemeral = pod_claim_name(pod, vol)
        if not claim_name:
            continue
        pvc = pvcs.get(f"{ns}/{claim_name}")
        if pvc is None:
            continue
        if ephemeral and not _owned_by(pvc, _md(pod).get("uid") or ""):
            continue  # "PVC was not created for pod (pod is not owner)"
        if _status(pvc).get("phase") != "Bound":
            continue
        pv_name = _spec(pvc).get("volumeName")
        pv = pvs.get(pv_name) if pv_name else None
        if pv is None:
            continue
        ref = _spec(pv).get("claimRef") or {}
        if not ref or ref.get("uid") != _md(pvc).get("uid"):
            continue  # the PV is not (yet) bound to this claim
        v = volume_ref(pv)
        if v is None or not attach_required(v.driver, drivers):
            continue
        if v.pv_name not in seen:
            seen.add(v.pv_name)
            out.append(v)
    return (node, out) if out else (None, [])


@dataclass(frozen=True)
class Desired:
    """A volume that must be attached to a node, and the pods that need it there."""
    volume: VolumeRef
    node: str
    pods: tuple[PodRef, ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.volume.pv_name, self.node)


DSW = dict[tuple[str, str], Desired]


def build_dsw(pods: Iterable[Mapping], *, pvcs: Mapping[str, Mapping],
              pvs: Mapping[str, Mapping], drivers: Mapping[str, Mapping],
              nodes: Mapping[str, Mapping]) -> DSW:
    """The whole desired state of world (the controller keeps it incrementally per pod;
    this is the reference and what unit tests drive)."""
    acc: dict[tuple[str, str], tuple[VolumeRef, list[PodRef]]] = {}
    for pod in pods:
        node, vols = pod_volumes(pod, pvcs=pvcs, pvs=pvs, drivers=drivers, nodes=nodes)
        for v in vols:
            acc.setdefault((v.pv_name, node), (v, []))[1].append(PodRef.of(pod))
    return {k: Desired(v, k[1], tuple(sorted(ps))) for k, (v, ps) in acc.items()}


# -- actual state --------------------------------------------------------------------------
class AState(StrEnum):
    ATTACHING = "attaching"
    ATTACHED = "attached"
    DETACHING = "detaching"


@dataclass(frozen=True)
class Actual:
    """One VolumeAttachment, as the reconciler sees it."""
    pv_name: str
    node: str
    va_name: str
    attacher: str
    state: AState
    unique_name: str | None = None      # None: the PV is gone and no node entry names it
    multi_attach: bool = True           # unknown (PV gone) never blocks another node
    device_path: str = ""
    attach_error: str | None = None
    detach_error: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.pv_name, self.node)


ASW = dict[tuple[str, str], Actual]


def _names_by_attachment(node: str, node_obj: Mapping | None) -> dict[str, str]:
    """VolumeAttachment name -> unique volume name, for every CSI volume the node lists
    (volumesAttached and volumesInUse): how a VA whose PV is gone gets its name back."""
    st = _status(node_obj)
    names = [e.get("name") for e in st.get("volumesAttached") or ()]
    names += list(st.get("volumesInUse") or ())
    out = {}
    for n in names:
        parsed = parse_unique_volume_name(n or "")
        if parsed:
            out[volume_attachment_name(parsed[1], parsed[0], node)] = n
    return out


def actual_of(va: Mapping, *, pvs: Mapping[str, Mapping],
              nodes: Mapping[str, Mapping]) -> Actual | None:
    """The ASW entry of one VolumeAttachment (None: not a PV attachment)."""
    spec = _spec(va)
    pv_name = (spec.get("source") or {}).get("persistentVolumeName")
    node = spec.get("nodeName")
    if not pv_name or not node:
        return None
    md = _md(va)
    st = _status(va)
    if md.get("deletionTimestamp"):
        state = AState.DETACHING
    elif st.get("attached"):
        state = AState.ATTACHED
    else:
        state = AState.ATTACHING
    pv = pvs.get(pv_name)
    v = volume_ref(pv) if pv is not None else None
    if v is not None:
        unique, multi = v.unique_name, v.multi_attach
    else:
        unique, multi = _names_by_attachment(node, nodes.get(node)).get(md.get("name")), True
    meta = st.get("attachmentMetadata") or {}
    return Actual(
        pv_name=pv_name, node=node, va_name=md.get("name", ""),
        attacher=spec.get("attacher") or "", state=state, unique_name=unique,
        multi_attach=multi, device_path=meta.get("devicePath") or "",
        attach_error=(st.get("attachError") or {}).get("message"),
        detach_error=(st.get("detachError") or {}).get("message"))


def build_asw(vas: Iterable[Mapping], *, pvs: Mapping[str, Mapping],
              nodes: Mapping[str, Mapping]) -> ASW:
    """The actual state of world from VolumeAttachments. Should two attachments exist for
    one (PV, node) (another tool made one under another name), the upstream-named one
    counts; the reconciler never creates a second."""
    out: ASW = {}
    for va in vas:
        a = actual_of(va, pvs=pvs, nodes=nodes)
        if a is None:
            continue
        prev = out.get(a.key)
        if prev is not None:
            pv = pvs.get(a.pv_name)
            v = volume_ref(pv) if pv else None
            if v is None or prev.va_name == v.attachment_name(a.node):
                continue
        out[a.key] = a
    return out


def node_volumes_attached(asw: Iterable[Actual], node: str,
                          detaching: Iterable[tuple[str, str]] = ()) -> list[dict]:
    """What ``node.status.volumesAttached`` must say: every ATTACHED attachment on the node
    whose detach has not started, sorted by name (so equal lists compare equal)."""
    skip = set(detaching)
    entries = {}
    for a in asw:
        if (a.node == node and a.state is AState.ATTACHED and a.unique_name
                and a.key not in skip):
            entries[a.unique_name] = {"name": a.unique_name, "devicePath": a.device_path}
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


# -- reconcile -----------------------------------------------------------------------------
class OpKind(StrEnum):
    DETACH = "detach"                  # delete the VolumeAttachment (after the node report)
    WAIT_UNMOUNT = "wait-unmount"      # not desired, but the node still uses it
    ATTACH = "attach"                  # create the VolumeAttachment
    WAIT = "wait"                      # desired; an attach/detach is under way
    MULTI_ATTACH = "multi-attach"      # desired, but attached to another node (RWO/RWOP)
    ATTACH_FAILED = "attach-failed"    # the attacher reports status.attachError
    DETACH_FAILED = "detach-failed"    # the attacher reports status.detachError


@dataclass(frozen=True)
class Op:
    kind: OpKind
    pv_name: str
    node: str
    volume: VolumeRef | None = None
    va_name: str | None = None
    reason: str = ""                    # detach: normal/node-deleted/out-of-service/timeout
    forced: str | None = None           # forced-detach reason (metric), None if safe
    since: float | None = None          # WAIT_UNMOUNT: when the detach was first wanted
    retry_at: float | None = None       # when a timed wait must be looked at again
    events: tuple[tuple[PodRef, str], ...] = ()   # (pod, message) to post as Warning events

    @property
    def key(self) -> tuple[str, str]:
        return (self.pv_name, self.node)


def attach_failed_message(pv_name: str, error: str) -> str:
    """upstream: GenerateError("AttachVolume.Attach failed", err) simple message."""
    return f'AttachVolume.Attach failed for volume "{pv_name}" : {error}'


def detach_failed_message(pv_name: str, error: str) -> str:
    return f'DetachVolume.Detach failed for volume "{pv_name}" : {error}'


def multi_attach_message(pv_name: str, pod: PodRef, others: Iterable[PodRef]) -> str:
    """upstream reconciler.reportMultiAttachError: name only pods of the pod's namespace."""
    others = list(others)
    if not others:
        return (f'Multi-Attach error for volume "{pv_name}" Volume is already exclusively '
                "attached to one node and can't be attached to another")
    local = [p.name for p in others if p.namespace == pod.namespace]
    foreign = len(others) - len(local)
    if local:
        msg = f"Volume is already used by pod(s) {', '.join(local)}"
        if foreign:
            msg = f"{msg} and {foreign} pod(s) in different namespaces"
    else:
        msg = f"Volume is already used by {foreign} pod(s) in different namespaces"
    return f'Multi-Attach error for volume "{pv_name}" {msg}'


def _detach_decision(a: Actual, nodes: Mapping[str, Mapping], now: float, max_wait: float,
                     detach_requested: Mapping[tuple[str, str], float]) -> Op:
    node = nodes.get(a.node)
    base = dict(pv_name=a.pv_name, node=a.node, va_name=a.va_name)
    if node is None:
        return Op(OpKind.DETACH, reason="node-deleted", forced="node-deleted", **base)
    since = detach_requested.get(a.key, now)
    expired = now - since > max_wait
    healthy = node_ready(node)
    if node_out_of_service(node):
        return Op(OpKind.DETACH, reason="out-of-service", forced="out-of-service", **base)
    mounted = a.unique_name is not None and a.unique_name in volumes_in_use(node)
    if mounted and not (expired and not healthy):
        retry = None if healthy else since + max_wait
        return Op(OpKind.WAIT_UNMOUNT, reason="in-use", since=since, retry_at=retry, **base)
    if mounted:
        return Op(OpKind.DETACH, reason="timeout", forced="timeout", **base)
    return Op(OpKind.DETACH, reason="normal", **base)


def _attach_order(d: Desired) -> tuple:
    """Who gets an exclusive volume first: the node whose oldest pod is oldest."""
    return (min((p.created or "~" for p in d.pods), default="~"), d.node)


def reconcile(dsw: Mapping[tuple[str, str], Desired], asw: Mapping[tuple[str, str], Actual],
              nodes: Mapping[str, Mapping], now: float, max_wait: float,
              detach_requested: Mapping[tuple[str, str], float] | None = None) -> list[Op]:
    """Drive the actual state toward the desired one: detach ops first, then attach ops.

    `detach_requested` remembers since when each not-desired attachment has been
    waiting for unmount (the caller keeps the `since` of the WAIT_UNMOUNT ops it gets
    back, and forgets the rest); `now` and it are on the same clock. `dsw` and `asw`
    may cover only some volumes, but then all entries of those volumes."""
    detach_requested = detach_requested or {}
    ops: list[Op] = []
    detaching_now: set[tuple[str, str]] = set()

    # 1. detaches
    for key in sorted(asw):
        a = asw[key]
        if key in dsw:
            continue
        if a.state is AState.DETACHING:
            if a.detach_error:
                ops.append(Op(OpKind.DETACH_FAILED, a.pv_name, a.node, va_name=a.va_name,
                              reason=detach_failed_message(a.pv_name, a.detach_error)))
            continue
        op = _detach_decision(a, nodes, now, max_wait, detach_requested)
        if op.kind is OpKind.DETACH:
            detaching_now.add(key)
        ops.append(op)

    # 2. attaches
    on_nodes: dict[str, set[str]] = {}   # pv -> nodes it is (being) attached to
    for key, a in asw.items():
        if key not in detaching_now:
            on_nodes.setdefault(a.pv_name, set()).add(a.node)
    for d in sorted(dsw.values(), key=_attach_order):
        a = asw.get(d.key)
        base = dict(pv_name=d.volume.pv_name, node=d.node, volume=d.volume)
        if a is not None:
            if a.state is AState.ATTACHING and a.attach_error:
                msg = attach_failed_message(d.volume.pv_name, a.attach_error)
                ops.append(Op(OpKind.ATTACH_FAILED, va_name=a.va_name, reason=a.attach_error,
                              events=tuple((p, msg) for p in d.pods), **base))
            elif a.state is not AState.ATTACHED:
                ops.append(Op(OpKind.WAIT, va_name=a.va_name, reason=a.state.value, **base))
            continue
        if not d.volume.multi_attach:
            others = on_nodes.get(d.volume.pv_name, set()) - {d.node}
            # the same volume being detached (this pass or earlier) elsewhere: just wait
            elsewhere = [asw.get((d.volume.pv_name, n)) for n in others]
            blocking = [x for x in elsewhere if x is None or x.state is not AState.DETACHING]
            if blocking:
                users = sorted({p for n in others
                                if (there := dsw.get((d.volume.pv_name, n))) is not None
                                for p in there.pods})
                ev = tuple((p, multi_attach_message(d.volume.pv_name, p, users))
                           for p in d.pods)
                ops.append(Op(OpKind.MULTI_ATTACH, reason="multi-attach", events=ev,
                              **base))
                continue
            if others or any(k[0] == d.volume.pv_name for k in detaching_now):
                ops.append(Op(OpKind.WAIT, reason="detaching-elsewhere", **base))
                continue
        ops.append(Op(OpKind.ATTACH, va_name=d.volume.attachment_name(d.node), **base))
        on_nodes.setdefault(d.volume.pv_name, set()).add(d.node)
    return ops


def volume_attachment_body(volume: VolumeRef, node: str) -> dict:
    """The VolumeAttachment upstream's csiAttacher.Attach creates."""
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "VolumeAttachment",
        "metadata": {"name": volume.attachment_name(node)},
        "spec": {
            "attacher": volume.driver,
            "nodeName": node,
            "source": {"persistentVolumeName": volume.pv_name},
        },
    }


# -- pool attacher: the device-slot ledger -------------------------------------------------
def pool_of_handle(handle: str | None) -> str | None:
    """The pool of a pool volume: its volumeHandle is ``<pool>/<pv name>``."""
    if not handle or "/" not in handle:
        return None
    pool = handle.split("/", 1)[0]
    return pool or None


def device_path(pool: str, slot: int) -> str:
    return f"/dev/volplane/{pool}/slot-{slot}"


def slot_of(va: Mapping) -> tuple[str, int] | None:
    """(pool, slot) recorded on a VolumeAttachment, None when it holds no slot."""
    ann = _md(va).get("annotations") or {}
    pool, raw = ann.get(POOL_ANNOTATION), ann.get(SLOT_ANNOTATION)
    if not pool or raw is None:
        return None
    try:
        return pool, int(raw)
    except (TypeError, ValueError):
        return None


def slots_in_use(vas: Iterable[Mapping], node: str, pool: str,
                 attacher: str = POOL_DRIVER) -> dict[int, str]:
    """slot -> VolumeAttachment name, for the slots held on (node, pool).

    The ledger is the VolumeAttachments themselves: a slot is held from the write that
    records it on the attachment until the attachment is gone (its finalizer is removed
    only after the slot is released), so a restart rebuilds it exactly."""
    out: dict[int, str] = {}
    for va in vas:
        spec = _spec(va)
        if spec.get("attacher") != attacher or spec.get("nodeName") != node:
            continue
        s = slot_of(va)
        if s is None or s[0] != pool:
            continue
        name = _md(va).get("name", "")
        # Two holders of one slot cannot arise from the attacher (allocation is serialized
        # per node and pool, and write-through); should one appear, the name order decides.
        if s[1] not in out or name < out[s[1]]:
            out[s[1]] = name
    return out


def free_slot(used: Iterable[int], slots: int) -> int | None:
    """The lowest slot in [0, slots) that is not used, None when all are."""
    taken = set(used)
    for i in range(max(0, slots)):
        if i not in taken:
            return i
    return None


def slots_per_node(pool: Mapping | None) -> int:
    try:
        return int(_spec(pool).get("slotsPerNode") or DEFAULT_SLOTS_PER_NODE)
    except (TypeError, ValueError):
        return DEFAULT_SLOTS_PER_NODE


def no_slot_message(node: str, used: int, slots: int, pool: str) -> str:
    return f"node {node} has no free device slot ({used}/{slots} in use on pool {pool})"
