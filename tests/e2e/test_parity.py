"""Upstream parity (issue 14) against the real local control plane.

Each test names the upstream (v1.36.5) behaviour it checks; docs/parity.md says what
upstream does and what volplane does. volplane runs as a subprocess with the PV binder
only (`start` of test_pv_controller); kube-controller-manager's own binder is off.

Run on an own cluster instance, e.g.
    VOLPLANE_CLUSTER=parity .venv/bin/python -m pytest tests/e2e/test_parity.py -x -q
"""

from __future__ import annotations

from .helpers import kcreate, kdelete, kget, wait_for
from .test_pools import NODES, _nodes, claim_phase, crds, pool_env  # noqa: F401  (fixtures)
from .test_pv_controller import (  # noqa: F401  (pvs is a fixture)
    LABEL,
    assert_stays_pending,
    assert_symmetric,
    assert_unclaimed,
    claim_events,
    pv_manifest,
    pvc_manifest,
    pvs,
    start,
    wait_bound,
    wait_volume_phase,
)

DRIVER = "e2e.parity.volplane.io"


def csi_pv(pvs, suffix: str, size: str, *, vac: str | None = None, **kw) -> dict:  # noqa: F811
    """A PV of a CSI driver nobody runs (volumeAttributesClassName needs a CSI source)."""
    manifest = pv_manifest(pvs.name(suffix), size, pvs.ns, ns=pvs.ns, **kw)
    spec = manifest["spec"]
    del spec["hostPath"]
    spec["csi"] = {"driver": DRIVER, "volumeHandle": pvs.name(suffix)}
    if vac:
        spec["volumeAttributesClassName"] = vac
    return kcreate(pvs.api, manifest)


def attributes_class(api, pvs, suffix: str) -> str:  # noqa: F811
    name = pvs.name(suffix)
    kcreate(api, {"apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttributesClass",
                  "metadata": {"name": name, "labels": {LABEL: pvs.ns}},
                  "driverName": DRIVER, "parameters": {"iops": suffix}})
    return name


def test_attributes_class_mismatch_refused_and_match_bound(api, namespace, pvs, operator):  # noqa: F811
    fast, slow = attributes_class(api, pvs, "fast"), attributes_class(api, pvs, "slow")
    try:
        start(operator)
        csi_pv(pvs, "plain", "2Gi")  # the smallest fit if attributes classes were ignored
        csi_pv(pvs, "fast", "5Gi", vac=fast)
        csi_pv(pvs, "slow", "3Gi", vac=slow)
        for suffix in ("plain", "fast", "slow"):
            wait_volume_phase(api, pvs.name(suffix), "Available")

        # matched class bound, with currentVolumeAttributesClassName
        claim = pvc_with_vac(pvs, "wants-fast", "1Gi", fast)
        c, v = wait_bound(api, namespace, claim)
        assert v["metadata"]["name"] == pvs.name("fast")
        assert_symmetric(c, v)
        assert c["status"].get("currentVolumeAttributesClassName") == fast, c["status"]

        # a claim without attributes class takes the PV without one
        pvs.pvc("wants-none", "1Gi")
        c, v = wait_bound(api, namespace, "wants-none")
        assert v["metadata"]["name"] == pvs.name("plain")
        assert "currentVolumeAttributesClassName" not in c["status"], c["status"]

        # pre-bound (volumeName) to a PV of another class: VolumeMismatch, Pending, PV free
        pvc_with_vac(pvs, "mismatch", "1Gi", fast, volume_name=pvs.name("slow"))
        text = (f'Cannot bind to requested volume "{pvs.name("slow")}": '
                "volumeAttributesClassName does not match")
        event = wait_for(lambda: [e for e in claim_events(api, namespace, "mismatch",
                                                          "VolumeMismatch")
                                  if e["message"] == text],
                         timeout=30, message="VolumeMismatch event")
        assert event[0]["type"] == "Warning"
        assert_stays_pending(api, namespace, "mismatch", seconds=4,
                             volume_name=pvs.name("slow"))
        assert_unclaimed(api, pvs.name("slow"))
    finally:
        for name in (fast, slow):
            kdelete(api, "VolumeAttributesClass", name)


def pvc_with_vac(pvs, name: str, size: str, vac: str, volume_name: str | None = None) -> str:  # noqa: F811
    manifest = pvc_manifest(name, pvs.ns, size, pvs.ns, volume_name=volume_name)
    manifest["spec"]["volumeAttributesClassName"] = vac
    kcreate(pvs.api, manifest)
    return name


def test_provisioning_passes_the_attributes_class_through(api, pool_env):  # noqa: F811
    """external-provisioner copies the claim's volumeAttributesClassName to the PV; the
    pool provisioner does the same, and the bind records it on the claim's status."""
    name = pool_env.name("gold")
    kcreate(api, {"apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttributesClass",
                  "metadata": {"name": name}, "driverName": "pool.volplane.io",
                  "parameters": {"tier": "gold"}})
    try:
        pool_env.pool("vac", "10Gi", names=[NODES[0]])
        cls = pool_env.storage_class("vac")
        pool_env.start_ready()
        ns = pool_env.ns
        kcreate(api, {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                      "metadata": {"name": "gold", "namespace": ns},
                      "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": cls,
                               "volumeAttributesClassName": name,
                               "resources": {"requests": {"storage": "1Gi"}}}})
        wait_for(lambda: claim_phase(api, ns, "gold") == "Bound", timeout=60, message="Bound")
        claim = kget(api, "PersistentVolumeClaim", "gold", ns)
        pv = kget(api, "PersistentVolume", claim["spec"]["volumeName"])
        assert pv["spec"].get("volumeAttributesClassName") == name, pv["spec"]
        assert claim["status"].get("currentVolumeAttributesClassName") == name, claim["status"]
    finally:
        kdelete(api, "VolumeAttributesClass", name)
