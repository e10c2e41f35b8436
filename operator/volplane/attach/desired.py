"""The Attach/Detach controller's desired state of world: pure functions over cached
objects.

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
required). The DSW maps (unique volume name, node) to the volume and the pods
needing it: upstream's identity, ``kubernetes.io/csi/<driver>^<volumeHandle>``, so two PVs
on one volume handle are one volume (one attachment per node, RWO across both).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from volplane.kinds import MANAGED_ANNOTATION, any_container_running
from volplane.objects import md as _md
from volplane.objects import spec as _spec
from volplane.objects import status as _status

from .names import plugin_name, unique_volume_name, volume_attachment_name

MULTI_ATTACH_MODES_ALLOWED = ("ReadWriteMany", "ReadOnlyMany")


def node_managed(node: Mapping[str, Any] | None) -> bool:
    return node is not None and MANAGED_ANNOTATION in (_md(node).get("annotations") or {})


# -- pods ----------------------------------------------------------------------------------
def pod_terminated(pod: Mapping[str, Any]) -> bool:
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
    def of(cls, pod: Mapping[str, Any]) -> PodRef:
        md = _md(pod)
        return cls(md.get("namespace") or "", md.get("name") or "", md.get("uid") or "",
                   md.get("creationTimestamp") or "")

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def as_object(self) -> dict[str, Any]:
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


def multi_attach_allowed(pv: Mapping[str, Any]) -> bool:
    """upstream util.IsMultiAttachAllowed for a PV: no access modes, or RWX/ROX among them."""
    modes = _spec(pv).get("accessModes") or ()
    return not modes or any(m in MULTI_ATTACH_MODES_ALLOWED for m in modes)


def volume_ref(pv: Mapping[str, Any]) -> VolumeRef | None:
    csi = _spec(pv).get("csi") or {}
    if not csi.get("driver") or not csi.get("volumeHandle"):
        return None
    return VolumeRef(_md(pv)["name"], csi["driver"], csi["volumeHandle"], multi_attach_allowed(pv))


def attach_required(driver: str, drivers: Mapping[str, Mapping[str, Any]]) -> bool:
    """CSIDriver ``spec.attachRequired``; no CSIDriver object (or unset) means required."""
    obj = drivers.get(driver)
    if obj is None:
        return True
    return _spec(obj).get("attachRequired", True) is not False


def pod_claim_name(pod: Mapping[str, Any], vol: Mapping[str, Any]) -> tuple[str | None, bool]:
    """(claim name, ephemeral?) of a pod volume, or (None, False) for other volume types."""
    if vol.get("persistentVolumeClaim"):
        return vol["persistentVolumeClaim"].get("claimName"), False
    if "ephemeral" in vol:
        return f"{_md(pod).get('name')}-{vol.get('name')}", True
    return None, False


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(r.get("controller") and r.get("uid") == uid
               for r in _md(obj).get("ownerReferences") or ())


def pod_csi_volumes(pod: Mapping[str, Any], *, pvcs: Mapping[str, Mapping[str, Any]],
                    pvs: Mapping[str, Mapping[str, Any]]) -> list[VolumeRef]:
    """The CSI PVs of a pod's claims (upstream CreateVolumeSpec: the claim Bound, its PV
    bound back to it by UID, an ephemeral claim owned by the pod), one per pod volume."""
    ns = _md(pod).get("namespace") or ""
    out: list[VolumeRef] = []
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
        if v is not None:
            out.append(v)
    return out


def pod_volumes(pod: Mapping[str, Any], *, pvcs: Mapping[str, Mapping[str, Any]],
                pvs: Mapping[str, Mapping[str, Any]],
                drivers: Mapping[str, Mapping[str, Any]], nodes: Mapping[str, Mapping[str, Any]]
                ) -> tuple[str | None, list[VolumeRef]]:
    """(node, attachable CSI volumes) one pod needs attached; (None, []) when it needs none.

    upstream DetermineVolumeAction + ProcessPodVolumes + CreateVolumeSpec, for CSI PVs."""
    node = _spec(pod).get("nodeName")
    if not node or not node_managed(nodes.get(node)) or pod_terminated(pod):
        return None, []
    out: list[VolumeRef] = []
    seen: set[str] = set()
    for v in pod_csi_volumes(pod, pvcs=pvcs, pvs=pvs):
        if attach_required(v.driver, drivers) and v.pv_name not in seen:
            seen.add(v.pv_name)
            out.append(v)
    return (node, out) if out else (None, [])


def volumes_in_use(pods: Iterable[Mapping[str, Any]], *,
                   pvcs: Mapping[str, Mapping[str, Any]],
                   pvs: Mapping[str, Mapping[str, Any]]) -> dict[tuple[str, str], int]:
    """upstream attachdetach metrics getVolumeInUseCount, for CSI volumes: (node,
    plugin) -> count over every pod with a nodeName and each of its volumes, whether
    or not the Node exists, is managed, the pod is terminated or the driver attaches."""
    out: dict[tuple[str, str], int] = {}
    for pod in pods:
        node = _spec(pod).get("nodeName")
        if not node:
            continue
        for v in pod_csi_volumes(pod, pvcs=pvcs, pvs=pvs):
            out[(node, v.plugin)] = out.get((node, v.plugin), 0) + 1
    return out


@dataclass(frozen=True)
class Desired:
    """A volume that must be attached to a node, and the pods that need it there."""
    volume: VolumeRef
    node: str
    pods: tuple[PodRef, ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.volume.unique_name, self.node)


DSW = dict[tuple[str, str], Desired]


def merge_desired(entries: Iterable[tuple[VolumeRef, str, PodRef]]) -> DSW:
    """(volume, node, pod) triples -> the DSW by (unique volume name, node). PVs on one
    volume handle merge: their pods together, the PV of the smallest name stands for
    the volume (the name its attachment's source carries), RWO if any of them is."""
    acc: dict[tuple[str, str], tuple[VolumeRef, set[PodRef]]] = {}
    for v, node, pod in entries:
        key = (v.unique_name, node)
        prev = acc.get(key)
        if prev is None:
            acc[key] = (v, {pod})
            continue
        rep = min(prev[0], v, key=lambda r: r.pv_name)
        rep = VolumeRef(rep.pv_name, rep.driver, rep.handle,
                        prev[0].multi_attach and v.multi_attach)
        prev[1].add(pod)
        acc[key] = (rep, prev[1])
    return {k: Desired(v, k[1], tuple(sorted(ps))) for k, (v, ps) in acc.items()}


def build_dsw(pods: Iterable[Mapping[str, Any]], *, pvcs: Mapping[str, Mapping[str, Any]],
              pvs: Mapping[str, Mapping[str, Any]], drivers: Mapping[str, Mapping[str, Any]],
              nodes: Mapping[str, Mapping[str, Any]]) -> DSW:
    """The whole desired state of world (the controller keeps it incrementally per pod;
    this is the reference and what unit tests drive)."""
    entries = []
    for pod in pods:
        node, vols = pod_volumes(pod, pvcs=pvcs, pvs=pvs, drivers=drivers, nodes=nodes)
        entries += [(v, node or "", PodRef.of(pod)) for v in vols]
    return merge_desired(entries)
