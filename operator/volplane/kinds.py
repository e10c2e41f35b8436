"""The kinds volplane watches, how each is slimmed, and the derived indexes over them.

Controllers name what they read with these descriptors (``watches`` and ``indexes``
class attributes); the wiring (runtime.py) registers one Kopf ``@kopf.index`` lister
per kind, one per derived index, and one ``@kopf.on.event`` per kind (informers.py).
Nothing here performs I/O: a slimmer and an index function are pure functions of one
object, so they are unit-tested like any decision.

Objects are slimmed on the way in (Kopf keeps the slim value in its index, not the
body): managedFields and last-applied annotations dropped for every kind, and Pods and
Nodes reduced to the few fields the controllers read, because they are many.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .objects import key_of, md, spec, status

DROP_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)
MANAGED_ANNOTATION = "volumes.kubernetes.io/controller-managed-attach-detach"
NODE_ID_ANNOTATION = "csi.volume.kubernetes.io/nodeid"

Slimmer = Callable[[Mapping[str, Any]], dict[str, Any]]


def slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """Every kind but Pods and Nodes: the object minus managedFields and the
    last-applied annotation (nested spec/status are kept by reference)."""
    meta_in = body.get("metadata") or {}
    meta = {k: meta_in[k] for k in ("name", "namespace", "uid", "resourceVersion", "generation",
                                    "labels", "annotations", "finalizers", "deletionTimestamp",
                                    "creationTimestamp", "ownerReferences") if k in meta_in}
    ann = meta.get("annotations")
    if ann and any(a in ann for a in DROP_ANNOTATIONS):
        meta["annotations"] = {k: v for k, v in ann.items() if k not in DROP_ANNOTATIONS}
    out = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": meta}
    for k in ("spec", "status", "provisioner", "parameters", "reclaimPolicy", "mountOptions",
              "allowVolumeExpansion", "volumeBindingMode", "allowedTopologies"):
        if k in body:
            out[k] = body[k]
    return out


def any_container_running(st: Mapping[str, Any]) -> bool:
    """upstream notRunning(), negated, over init, app and ephemeral container statuses:
    a status with neither `terminated` nor `waiting` state counts as running."""
    for k in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for cs in st.get(k) or ():
            state = cs.get("state") or {}
            if not state.get("terminated") and not state.get("waiting"):
                return True
    return False


def slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Pod reduced to what the controllers read (a few hundred bytes)."""
    meta_in = body.get("metadata") or {}
    sp = body.get("spec") or {}
    st = body.get("status") or {}
    vols = []
    for v in sp.get("volumes") or ():
        if v.get("persistentVolumeClaim"):
            claim = {"claimName": v["persistentVolumeClaim"].get("claimName")}
            if v["persistentVolumeClaim"].get("readOnly"):
                claim["readOnly"] = True  # a flex driver's kubernetes.io/readwrite
            vols.append({"name": v.get("name"), "persistentVolumeClaim": claim})
        elif v.get("flexVolume"):
            vols.append({"name": v.get("name"), "flexVolume": v["flexVolume"]})
        elif v.get("ephemeral"):
            vols.append({"name": v.get("name"), "ephemeral": {}})
    meta = {k: meta_in[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                    "creationTimestamp", "deletionTimestamp") if k in meta_in}
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": meta,
        "spec": {"nodeName": sp.get("nodeName"), "volumes": vols},
        "status": {"phase": st.get("phase"), "containersRunning": any_container_running(st)},
    }


_NODE_ANNOTATIONS = (MANAGED_ANNOTATION, NODE_ID_ANNOTATION)


def slim_node(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Node reduced to what the attach/detach controller, the pool attacher and the
    pool provisioner read: labels (pool selectors, topology), the attach/detach
    annotation, taints, the Ready condition and the volume lists of its status."""
    meta_in = body.get("metadata") or {}
    sp = body.get("spec") or {}
    st = body.get("status") or {}
    meta = {k: meta_in[k] for k in ("name", "uid", "resourceVersion", "labels",
                                    "creationTimestamp", "deletionTimestamp") if k in meta_in}
    ann = meta_in.get("annotations") or {}
    kept = {k: v for k, v in ann.items() if k in _NODE_ANNOTATIONS or k.startswith("volplane.io/")}
    if kept:
        meta["annotations"] = kept
    out_spec = {k: sp[k] for k in ("taints", "unschedulable") if k in sp}
    conds = [{"type": c.get("type"), "status": c.get("status")}
             for c in st.get("conditions") or () if c.get("type") == "Ready"]
    out_st: dict[str, Any] = {"conditions": conds}
    for k in ("volumesInUse", "volumesAttached"):
        if k in st:
            out_st[k] = st[k]
    return {"apiVersion": "v1", "kind": "Node", "metadata": meta, "spec": out_spec,
            "status": out_st}


@dataclass(frozen=True)
class Kind:
    """One watched resource: where it lives in the API and how it is stored.

    ``field_selector`` is applied server-side (Kopf's ``settings.watching.
    field_selectors``) to the LIST and every WATCH of the kind.
    """

    group: str
    version: str
    plural: str
    kind: str
    slimmer: Slimmer = field(default=slim, compare=False)
    field_selector: str | None = None

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, name: str = "", namespace: str | None = None, sub: str = "") -> str:
        base = (f"/api/{self.version}" if not self.group
                else f"/apis/{self.group}/{self.version}")
        if namespace:
            base += f"/namespaces/{namespace}"
        out = f"{base}/{self.plural}"
        if name:
            out += f"/{name}"
        return out + (f"/{sub}" if sub else "")


PVS = Kind("", "v1", "persistentvolumes", "PersistentVolume")
PVCS = Kind("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")
CLASSES = Kind("storage.k8s.io", "v1", "storageclasses", "StorageClass")
# Pods that finished (Succeeded/Failed) hold no volume for anyone: the attach/detach
# controller treats them as gone (upstream IsPodTerminated), so the API server does not
# send them at all. A pod that finishes leaves the selection: the watch reports it as
# DELETED, which is exactly what the controller does with it.
PODS = Kind("", "v1", "pods", "Pod", slim_pod,
            field_selector="status.phase!=Succeeded,status.phase!=Failed")
NODES = Kind("", "v1", "nodes", "Node", slim_node)
VOLUME_ATTACHMENTS = Kind("storage.k8s.io", "v1", "volumeattachments", "VolumeAttachment")
CSI_DRIVERS = Kind("storage.k8s.io", "v1", "csidrivers", "CSIDriver")
POOLS = Kind("volplane.io", "v1alpha1", "storagepools", "StoragePool")
ALLOCATIONS = Kind("volplane.io", "v1alpha1", "storageallocations", "StorageAllocation")


# --- derived indexes ---------------------------------------------------------------------

IndexKeys = Callable[[Mapping[str, Any]], Iterable[Hashable]]


@dataclass(frozen=True)
class IndexSpec:
    """A derived index over one kind: every object is filed under ``keys(obj)`` with
    ``value(obj)`` (its own key by default). Kopf keeps it (``@kopf.index``), so a
    lookup is a dict access and no controller keeps a reverse map by hand."""

    name: str
    kind: Kind
    keys: IndexKeys = field(compare=False)
    value: Callable[[Mapping[str, Any]], Any] = field(default=key_of, compare=False)


def claim_ref_keys(pv: Mapping[str, Any]) -> tuple[str, ...]:
    """``namespace/name`` of the claim a PV's claimRef names (none when unclaimed)."""
    ref = spec(pv).get("claimRef") or {}
    if not ref.get("name"):
        return ()
    return (f"{ref.get('namespace') or ''}/{ref['name']}",)


def pod_claim_keys(pod: Mapping[str, Any]) -> tuple[str, ...]:
    """``namespace/claim`` of every claim a pod uses: persistentVolumeClaim volumes and
    generic ephemeral volumes (whose claim is ``<pod>-<volume>``)."""
    ns = md(pod).get("namespace") or ""
    out = []
    for v in spec(pod).get("volumes") or ():
        pvc = v.get("persistentVolumeClaim")
        if pvc and pvc.get("claimName"):
            out.append(f"{ns}/{pvc['claimName']}")
        elif "ephemeral" in v:
            out.append(f"{ns}/{md(pod).get('name')}-{v.get('name')}")
    return tuple(out)


def pv_volume_keys(pv: Mapping[str, Any]) -> tuple[str, ...]:
    """``<driver>^<volumeHandle>`` of a CSI PV (the part of upstream's unique volume name
    that tells volumes apart): the PVs that are one volume share it."""
    csi = spec(pv).get("csi") or {}
    if not csi.get("driver") or not csi.get("volumeHandle"):
        return ()
    return (f"{csi['driver']}^{csi['volumeHandle']}",)


def pod_node_keys(pod: Mapping[str, Any]) -> tuple[str, ...]:
    node = spec(pod).get("nodeName")
    return (node,) if node else ()


def attachment_pv_keys(va: Mapping[str, Any]) -> tuple[str, ...]:
    pv = (spec(va).get("source") or {}).get("persistentVolumeName")
    return (pv,) if pv else ()


def attachment_node_keys(va: Mapping[str, Any]) -> tuple[str, ...]:
    node = spec(va).get("nodeName")
    return (node,) if node else ()


def unbound_claim_class_keys(claim: Mapping[str, Any]) -> tuple[str, ...]:
    """The class of a claim that is not Bound (the beta annotation first, as upstream)."""
    if status(claim).get("phase") == "Bound":
        return ()
    ann = md(claim).get("annotations") or {}
    cls = ann.get("volume.beta.kubernetes.io/storage-class")
    if cls is None:
        cls = spec(claim).get("storageClassName") or ""
    return (cls,)


PVS_BY_CLAIM = IndexSpec("pvs-by-claim", PVS, claim_ref_keys)
PVS_BY_VOLUME = IndexSpec("pvs-by-volume", PVS, pv_volume_keys)
UNBOUND_CLAIMS_BY_CLASS = IndexSpec("unbound-claims-by-class", PVCS, unbound_claim_class_keys)
PODS_BY_CLAIM = IndexSpec("pods-by-claim", PODS, pod_claim_keys)
PODS_BY_NODE = IndexSpec("pods-by-node", PODS, pod_node_keys)
ATTACHMENTS_BY_PV = IndexSpec("attachments-by-pv", VOLUME_ATTACHMENTS, attachment_pv_keys)
ATTACHMENTS_BY_NODE = IndexSpec("attachments-by-node", VOLUME_ATTACHMENTS, attachment_node_keys)
