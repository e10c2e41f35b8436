"""Builders shared by the attach/detach unit tests: objects as the API returns them."""

from __future__ import annotations

from volplane.attach.desired import build_dsw
from volplane.attach.names import unique_volume_name, volume_attachment_name
from volplane.kinds import MANAGED_ANNOTATION

DRIVER = "pool.volplane.io"
T0 = "2024-01-01T00:00:00Z"


# -- builders ------------------------------------------------------------------------------
def node(name, *, managed=True, ready=True, in_use=(), taints=(), labels=None, attached=()):
    md = {"name": name, "uid": f"uid-{name}", "resourceVersion": "1",
          "labels": labels or {"kubernetes.io/hostname": name}}
    if managed:
        md["annotations"] = {MANAGED_ANNOTATION: "true"}
    return {"apiVersion": "v1", "kind": "Node", "metadata": md,
            "spec": {"taints": list(taints)},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                       "volumesInUse": list(in_use),
                       "volumesAttached": list(attached)}}


def pv(name, *, driver=DRIVER, handle=None, modes=("ReadWriteOnce",), claim=None):
    spec = {"accessModes": list(modes), "capacity": {"storage": "1Gi"},
            "csi": {"driver": driver, "volumeHandle": handle or f"pool-a/{name}"}}
    if claim:
        spec["claimRef"] = {"namespace": claim[0], "name": claim[1], "uid": claim[2]}
    return {"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name, "resourceVersion": "1"}, "spec": spec,
            "status": {"phase": "Bound"}}


def pvc(ns, name, volume, *, phase="Bound", uid=None, owner=None):
    md = {"name": name, "namespace": ns, "uid": uid or f"uid-{ns}-{name}",
          "resourceVersion": "1"}
    if owner:
        md["ownerReferences"] = [{"kind": "Pod", "name": "x", "uid": owner, "controller": True}]
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": md,
            "spec": {"volumeName": volume}, "status": {"phase": phase}}


def pod(ns, name, node_name, *claims, phase="Running", deleted=False, running=True,
        created=T0, ephemeral=()):
    vols = [{"name": f"v{i}", "persistentVolumeClaim": {"claimName": c}}
            for i, c in enumerate(claims)]
    vols += [{"name": e, "ephemeral": {"volumeClaimTemplate": {}}} for e in ephemeral]
    vols.append({"name": "cfg", "configMap": {"name": "c"}})
    md = {"name": name, "namespace": ns, "uid": f"uid-{name}", "resourceVersion": "1",
          "creationTimestamp": created}
    if deleted:
        md["deletionTimestamp"] = "2024-01-01T00:01:00Z"
    state = {"running": {}} if running else {"terminated": {"exitCode": 0}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": md,
            "spec": {"nodeName": node_name, "volumes": vols},
            "status": {"phase": phase, "containerStatuses": [{"name": "c", "state": state}]}}


def world(*objs):
    """Index objects like the cache does: PVCs and Pods "ns/name", the rest by name."""
    out = {"pods": {}, "pvcs": {}, "pvs": {}, "drivers": {}, "nodes": {}}
    plural = {"Pod": "pods", "PersistentVolumeClaim": "pvcs", "PersistentVolume": "pvs",
              "CSIDriver": "drivers", "Node": "nodes"}
    for o in objs:
        md = o["metadata"]
        key = f"{md['namespace']}/{md['name']}" if md.get("namespace") else md["name"]
        out[plural[o["kind"]]][key] = o
    return out


def csidriver(name, attach_required):
    spec = {} if attach_required is None else {"attachRequired": attach_required}
    return {"apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver",
            "metadata": {"name": name}, "spec": spec}


def dsw_of(w):
    return build_dsw(w["pods"].values(), pvcs=w["pvcs"], pvs=w["pvs"],
                       drivers=w["drivers"], nodes=w["nodes"])


def va(pv_name, node_name, *, handle=None, attached=True, deleting=False, driver=DRIVER,
       attach_error=None, detach_error=None, name=None):
    handle = handle or f"pool-a/{pv_name}"
    md = {"name": name or volume_attachment_name(handle, driver, node_name),
          "resourceVersion": "1"}
    if deleting:
        md["deletionTimestamp"] = "2024-01-01T00:02:00Z"
    st = {"attached": attached}
    if attach_error:
        st["attachError"] = {"message": attach_error}
    if detach_error:
        st["detachError"] = {"message": detach_error}
    return {"apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment", "metadata": md,
            "spec": {"attacher": driver, "nodeName": node_name,
                     "source": {"persistentVolumeName": pv_name}},
            "status": st}


def uname(pv_name, driver=DRIVER):
    return unique_volume_name(driver, f"pool-a/{pv_name}")


def base_world(*extra):
    return world(node("n1"), node("n2"), pv("pv1", claim=("ns", "c1", "uid-ns-c1")),
                 pvc("ns", "c1", "pv1"), *extra)
