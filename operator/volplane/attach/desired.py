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

FlexVolume (docs/flexvolume.md): a PV with ``spec.flexVolume`` or an inline pod
``flexVolume`` volume counts when its driver is installed and its ``init`` said
``attach: true`` (the caller passes ``flex_drivers``: driver name -> attachable, from
the volume-plugin registry). Its key is its unique volume name
``<driver>/<PV or pod volume name>`` (upstream's: getvolumename's answer is ignored),
which contains a '/' and so never collides with a PV name; the controller's work queue
holds PV names (CSI: a sync covers every PV on the volume handle) and flex keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
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
    """A CSI PersistentVolume, or a FlexVolume (PV or inline), as the AD controller sees it.

    For flex (``flex`` true): ``pv_name`` is the key (the unique volume name), ``driver``
    the flex driver, ``handle`` the PV or pod volume name (what upstream names the
    volume in events and passes to ``detach``), ``pv``/``volume`` and ``read_only`` what
    the driver's options are built from (upstream's volume.Spec)."""
    pv_name: str
    driver: str
    handle: str
    multi_attach: bool = False
    flex: bool = False
    pv: Mapping[str, Any] | None = field(default=None, compare=False, hash=False, repr=False)
    volume: Mapping[str, Any] | None = field(default=None, compare=False, hash=False,
                                             repr=False)
    read_only: bool = False

    @property
    def unique_name(self) -> str:
        if self.flex:
            return flex_unique_name(self.driver, self.handle)
        return unique_volume_name(self.driver, self.handle)

    @property
    def plugin(self) -> str:
        return self.driver if self.flex else plugin_name(self.driver)

    @property
    def display_name(self) -> str:
        """upstream volume.Spec.Name(): what events call the volume."""
        return self.handle if self.flex else self.pv_name

    def attachment_name(self, node: str) -> str:
        if self.flex:
            return ""  # no API object records a flex attachment
        return volume_attachment_name(self.handle, self.driver, node)


def flex_unique_name(driver: str, volume_name: str) -> str:
    """upstream GetUniqueVolumeName for a flex volume: ``<driver>/<volume name>``."""
    return f"{driver}/{volume_name}"


def is_flex_key(key: str) -> bool:
    """A flex volume's key (its unique name) has a '/'; a PV name never does."""
    return "/" in key


def flex_volume_ref(*, driver: str, name: str, pv: Mapping[str, Any] | None = None,
                    volume: Mapping[str, Any] | None = None, read_only: bool = False
                    ) -> VolumeRef:
    multi = True if pv is None else multi_attach_allowed(pv)  # inline: allowed (upstream)
    return VolumeRef(flex_unique_name(driver, name), driver, name, multi, flex=True, pv=pv,
                     volume=volume, read_only=read_only)


def flex_driver(source_holder: Mapping[str, Any] | None) -> str | None:
    """The driver of a ``flexVolume`` source (of a PV spec or a pod volume). Only
    ``<vendor>/<driver>`` names count: no plugin directory ``<vendor>~<driver>`` can
    give another name, and the unique name must split back into plugin and volume."""
    src = (source_holder or {}).get("flexVolume")
    driver = src.get("driver") if isinstance(src, Mapping) else None
    if not isinstance(driver, str) or driver.count("/") != 1 or "" in driver.split("/"):
        return None
    return driver


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


def _bound_pv(pod: Mapping[str, Any], vol: Mapping[str, Any],
              pvcs: Mapping[str, Mapping[str, Any]], pvs: Mapping[str, Mapping[str, Any]]
              ) -> Mapping[str, Any] | None:
    """The PV a pod's claim volume is bound to (None: not a claim, or not bound yet)."""
    claim_name, ephemeral = pod_claim_name(pod, vol)
    if not claim_name:
        return None
    pvc = pvcs.get(f"{_md(pod).get('namespace') or ''}/{claim_name}")
    if pvc is None:
        return None
    if ephemeral and not _owned_by(pvc, _md(pod).get("uid") or ""):
        return None  # "PVC was not created for pod (pod is not owner)"
    if _status(pvc).get("phase") != "Bound":
        return None
    pv_name = _spec(pvc).get("volumeName")
    pv = pvs.get(pv_name) if pv_name else None
    if pv is None:
        return None
    ref = _spec(pv).get("claimRef") or {}
    if not ref or ref.get("uid") != _md(pvc).get("uid"):
        return None  # the PV is not (yet) bound to this claim
    return pv


def _attachable(vol: Mapping[str, Any], pv: Mapping[str, Any] | None,
                drivers: Mapping[str, Mapping[str, Any]], flex_drivers: Mapping[str, bool]
                ) -> VolumeRef | None:
    """upstream FindAttachablePluginBySpec + GetUniqueVolumeNameFromSpec, by source."""
    if pv is not None:
        fd = flex_driver(_spec(pv))
        if fd is not None:
            if not flex_drivers.get(fd):
                return None  # not installed, or its init said attach: false
            ro = bool((vol.get("persistentVolumeClaim") or {}).get("readOnly"))
            return flex_volume_ref(driver=fd, name=str(_md(pv).get("name") or ""), pv=pv,
                                   read_only=ro)
        v = volume_ref(pv)
        return v if v is not None and attach_required(v.driver, drivers) else None
    fd = flex_driver(vol)
    if fd is not None and flex_drivers.get(fd) and vol.get("name"):
        return flex_volume_ref(driver=fd, name=str(vol["name"]), volume=vol,
                               read_only=bool((vol.get("flexVolume") or {}).get("readOnly")))
    return None


def pod_csi_volumes(pod: Mapping[str, Any], *, pvcs: Mapping[str, Mapping[str, Any]],
                    pvs: Mapping[str, Mapping[str, Any]]) -> list[VolumeRef]:
    """The CSI PVs of a pod's claims (upstream CreateVolumeSpec: the claim Bound, its PV
    bound back to it by UID, an ephemeral claim owned by the pod), one per pod volume."""
    out: list[VolumeRef] = []
    for vol in _spec(pod).get("volumes") or ():
        pv = _bound_pv(pod, vol, pvcs, pvs)
        v = volume_ref(pv) if pv is not None else None
        if v is not None:
            out.append(v)
    return out


def pod_volumes(pod: Mapping[str, Any], *, pvcs: Mapping[str, Mapping[str, Any]],
                pvs: Mapping[str, Mapping[str, Any]],
                drivers: Mapping[str, Mapping[str, Any]], nodes: Mapping[str, Mapping[str, Any]],
                flex_drivers: Mapping[str, bool] | None = None
                ) -> tuple[str | None, list[VolumeRef]]:
    """(node, attachable volumes) one pod needs attached; (None, []) when it needs none.

    upstream DetermineVolumeAction + ProcessPodVolumes + CreateVolumeSpec: CSI PVs, and
    FlexVolume PVs and inline volumes whose driver is in `flex_drivers` as attachable."""
    node = _spec(pod).get("nodeName")
    if not node or not node_managed(nodes.get(node)) or pod_terminated(pod):
        return None, []
    out: list[VolumeRef] = []
    seen: set[str] = set()
    for vol in _spec(pod).get("volumes") or ():
        pv = _bound_pv(pod, vol, pvcs, pvs)
        v = _attachable(vol, pv, drivers, flex_drivers or {})
        if v is not None and v.pv_name not in seen:
            seen.add(v.pv_name)
            out.append(v)
    return (node, out) if out else (None, [])


def pod_flex_keys(pod: Mapping[str, Any], *, pvcs: Mapping[str, Mapping[str, Any]],
                  pvs: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """The keys (unique names) of every flex volume a pod names, attachable or not,
    wherever it runs: what to requeue when the pod changes."""
    out = set()
    for vol in _spec(pod).get("volumes") or ():
        fd = flex_driver(vol)
        if fd is not None and vol.get("name"):
            out.add(flex_unique_name(fd, str(vol["name"])))
            continue
        pv = _bound_pv(pod, vol, pvcs, pvs)
        fd = flex_driver(_spec(pv)) if pv is not None else None
        if fd is not None and pv is not None:
            out.add(flex_unique_name(fd, str(_md(pv).get("name") or "")))
    return out


def volumes_in_use(pods: Iterable[Mapping[str, Any]], *,
                   pvcs: Mapping[str, Mapping[str, Any]],
                   pvs: Mapping[str, Mapping[str, Any]],
                   flex_drivers: Mapping[str, bool] | None = None
                   ) -> dict[tuple[str, str], int]:
    """upstream attachdetach metrics getVolumeInUseCount: (node, plugin) -> count over
    every pod with a nodeName and each of its volumes, whether or not the Node exists,
    is managed, the pod is terminated or the driver attaches. CSI volumes, and flex
    volumes (PV or inline) whose driver is loaded (`flex_drivers`; plugin: the driver)."""
    loaded = flex_drivers or {}
    out: dict[tuple[str, str], int] = {}
    for pod in pods:
        node = _spec(pod).get("nodeName")
        if not node:
            continue
        for vol in _spec(pod).get("volumes") or ():
            plugin = _in_use_plugin(_bound_pv(pod, vol, pvcs, pvs), vol, loaded)
            if plugin is not None:
                out[(node, plugin)] = out.get((node, plugin), 0) + 1
    return out


def _in_use_plugin(pv: Mapping[str, Any] | None, vol: Mapping[str, Any],
                   flex_drivers: Mapping[str, bool]) -> str | None:
    fd = flex_driver(_spec(pv) if pv is not None else vol)
    if fd is not None:
        return fd if fd in flex_drivers else None
    v = volume_ref(pv) if pv is not None else None
    return v.plugin if v is not None else None


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
        rep = replace(rep, multi_attach=prev[0].multi_attach and v.multi_attach)
        prev[1].add(pod)
        acc[key] = (rep, prev[1])
    return {k: Desired(v, k[1], tuple(sorted(ps))) for k, (v, ps) in acc.items()}


def build_dsw(pods: Iterable[Mapping[str, Any]], *, pvcs: Mapping[str, Mapping[str, Any]],
              pvs: Mapping[str, Mapping[str, Any]], drivers: Mapping[str, Mapping[str, Any]],
              nodes: Mapping[str, Mapping[str, Any]],
              flex_drivers: Mapping[str, bool] | None = None) -> DSW:
    """The whole desired state of world (the controller keeps it incrementally per pod;
    this is the reference and what unit tests drive)."""
    entries = []
    for pod in pods:
        node, vols = pod_volumes(pod, pvcs=pvcs, pvs=pvs, drivers=drivers, nodes=nodes,
                                 flex_drivers=flex_drivers)
        entries += [(v, node or "", PodRef.of(pod)) for v in vols]
    return merge_desired(entries)
