"""The objects the pool driver writes, their names and where they live. Pure.

A claim ``C`` with uid ``U`` gets the StorageAllocation record ``pvc-U`` and the PV
``pvc-U`` (external-provisioner's naming): one name per claim makes every write of
provisioning repeatable after a crash. A pool volume's ``volumeHandle`` is
``<pool>/<pv name>``.
"""

from __future__ import annotations

from typing import Any

from volplane.kinds import ALLOCATIONS, POOLS
from volplane.objects import parse_rfc3339
from volplane.pv import constants as C
from volplane.quantity import format_quantity

PROVISIONER = "pool.volplane.io"
API_VERSION = ALLOCATIONS.api_version
MANAGED_BY = "app.kubernetes.io/managed-by"
FINALIZER = "volplane.io/allocation"
PV_PROTECTION = "kubernetes.io/pv-protection"
ANN_POOL = "volplane.io/pool"
ORPHAN_GRACE = 30.0  # minimum age (creationTimestamp) of an orphaned record before GC


SNAPSHOT_GROUP = "snapshot.storage.k8s.io"
PROVISIONING = "Provisioning"  # external-provisioner's reason for "left to a populator"


def data_source_verdict(claim: dict[str, Any]) -> tuple[str, str] | None:
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


def alloc_path(name: str = "") -> str:
    return ALLOCATIONS.path(name)


def pool_path(name: str, sub: str = "") -> str:
    return POOLS.path(name, sub=sub)


def capacity_path(namespace: str, name: str = "") -> str:
    base = f"/apis/storage.k8s.io/v1/namespaces/{namespace}/csistoragecapacities"
    return f"{base}/{name}" if name else base


def volume_name(claim: dict[str, Any]) -> str:
    """The PV (and allocation record) name for a claim, as external-provisioner names it."""
    return f"pvc-{claim['metadata']['uid']}"


def pool_of_volume(pv: dict[str, Any]) -> str | None:
    """The pool a PV of ours lives in: volumeHandle is "<pool>/<pv name>"."""
    handle = ((pv.get("spec") or {}).get("csi") or {}).get("volumeHandle") or ""
    pool, sep, _ = handle.partition("/")
    return pool if sep else None


def is_ours(pv: dict[str, Any]) -> bool:
    ann = (pv.get("metadata") or {}).get("annotations") or {}
    driver = ((pv.get("spec") or {}).get("csi") or {}).get("driver")
    return ann.get(C.ANN_PROVISIONED_BY) == PROVISIONER or driver == PROVISIONER


def build_allocation(claim: dict[str, Any], storage_class: str, pool: str, size: int,
                     node: str | None) -> dict[str, Any]:
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


def build_pv(claim: dict[str, Any], storage_class: dict[str, Any], pool: str, size: int,
             affinity: dict[str, Any],
             fs_type: str | None) -> dict[str, Any]:
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
    if cspec.get("volumeAttributesClassName"):
        # As external-provisioner: the PV carries the claim's attributes class, so the
        # PV controller's matching (which requires equal classes) binds it.
        spec["volumeAttributesClassName"] = cspec["volumeAttributesClassName"]
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


def orphan_due(record: dict[str, Any], now: float, grace: float = ORPHAN_GRACE) -> bool:
    """Whether an orphaned allocation record is old enough to collect: `now` (wall
    clock) is at least `grace` seconds past its creationTimestamp. A record without a
    readable timestamp is never collected on age (it is reported by `volplane check`)."""
    created = parse_rfc3339((record.get("metadata") or {}).get("creationTimestamp"))
    return created is not None and now - created >= grace
