"""Upstream parity (issue 14) against the real local control plane.

Each test names the upstream (v1.36.5) behaviour it checks; docs/parity.md says what
upstream does and what volplane does. volplane runs as a subprocess with the PV binder
only (`start` of test_pv_controller); kube-controller-manager's own binder is off.

Run on an own cluster instance, e.g.
    VOLPLANE_CLUSTER=parity .venv/bin/python -m pytest tests/e2e/test_parity.py -x -q
"""

from __future__ import annotations

import re
import subprocess

from .conftest import _volplane_executable
from .helpers import events_for, holds_for, kcreate, kdelete, kget, kpatch, phase, wait_for
from .test_pools import NODES, _nodes, claim_phase, crds, pool_env  # noqa: F401  (fixtures)
from .test_pv_controller import (  # noqa: F401  (pvs is a fixture)
    LABEL,
    REPO_ROOT,
    annotations,
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
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"


def pod_manifest(name: str, ns: str, claim: str, node_selector: dict) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "nodeSelector": dict(node_selector),
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "main", "image": PAUSE_IMAGE,
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
        },
    }


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


# ============================================================================ reclaim, events


def test_recycle_waits_for_the_running_pod_to_go(api, cluster, namespace, pvs, operator):  # noqa: F811
    """upstream recycleVolumeOperation: a Released volume whose (deleted) claim a pod
    still uses is not recycled: Normal VolumeFailedRecycle "Volume is used by pods: ns/p",
    PV stays Released, retried on later syncs (here: no recycler in pv-binder alone, so
    once the pod is gone the volume goes Failed "No recycler plugin found")."""
    start(operator, "--resync-period", "3")
    pvs.pv("recy", "1Gi", policy="Recycle")
    wait_volume_phase(api, pvs.name("recy"), "Available")
    pvs.pvc("data", "1Gi")
    wait_bound(api, namespace, "data")
    kcreate(api, pod_manifest("user", namespace, "data", cluster.nodes.selector))
    wait_for(lambda: phase(kget(api, "Pod", "user", namespace)) == "Running", timeout=90,
             message="pod user Running")
    # pvc-protection keeps a used claim; a user who forces it away leaves the pod running.
    kdelete(api, "PersistentVolumeClaim", "data", namespace)
    kpatch(api, "PersistentVolumeClaim", "data", {"metadata": {"finalizers": None}},
           namespace)
    wait_for(lambda: kget(api, "PersistentVolumeClaim", "data", namespace) is None,
             timeout=30, message="claim gone")
    name = pvs.name("recy")
    wait_volume_phase(api, name, "Released")
    text = f"Volume is used by pods: {namespace}/user"
    events = wait_for(lambda: [e for e in events_for(api, None, name, kind="PersistentVolume")
                               if e["reason"] == "VolumeFailedRecycle"
                               and e["message"] == text],
                      timeout=30, message="VolumeFailedRecycle event")
    assert events[0]["type"] == "Normal"
    holds_for(lambda: phase(kget(api, "PersistentVolume", name)) == "Released", 7,
              message="PV stays Released while the pod runs")
    # retried: the same event, counted (one Event object)
    again = wait_for(lambda: [e for e in events_for(api, None, name, kind="PersistentVolume")
                              if e["message"] == text and (e.get("count") or 1) >= 2],
                     timeout=30, message="the refusal repeated on a later sync")
    assert len(again) == 1

    kdelete(api, "Pod", "user", namespace)
    v = wait_volume_phase(api, name, "Failed", timeout=60)
    assert v["status"].get("message") == "No recycler plugin found for the volume!"


def test_wait_for_pod_scheduled_names_the_pod(api, namespace, pvs, operator):  # noqa: F811
    """upstream emitEventForUnboundDelayBindingClaim: a WaitForFirstConsumer claim used
    by a pod that is not scheduled gets WaitForPodScheduled "waiting for pod X to be
    scheduled"; before any pod, the plain WaitForFirstConsumer event."""
    start(operator)
    sc = pvs.storage_class("wffc", provisioner="kubernetes.io/no-provisioner",
                           volumeBindingMode="WaitForFirstConsumer")
    pvs.pvc("data", "1Gi", storage_class=sc)
    wait_for(lambda: claim_events(api, namespace, "data", "WaitForFirstConsumer"),
             timeout=30, message="WaitForFirstConsumer event")
    # a pod no node can take: it stays unscheduled
    kcreate(api, pod_manifest("stuck", namespace, "data", {"volplane-e2e/nowhere": "x"}))
    events = wait_for(lambda: claim_events(api, namespace, "data", "WaitForPodScheduled"),
                      timeout=30, message="WaitForPodScheduled event")
    assert events[0]["message"] == "waiting for pod stuck to be scheduled", events[0]
    assert events[0]["type"] == "Normal"
    assert_stays_pending(api, namespace, "data", seconds=2)


def test_external_provisioning_event_repeats_on_each_sync(api, namespace, pvs, operator):  # noqa: F811
    """upstream provisionClaimOperationExternal posts ExternalProvisioning on every sync of
    a claim waiting for an external provisioner; deduplicated into one Event, counted."""
    start(operator, "--resync-period", "2")
    sc = pvs.storage_class("ext", provisioner="ext.e2e.volplane.io")
    pvs.pvc("data", "1Gi", storage_class=sc)
    c = wait_for(lambda: (o := kget(api, "PersistentVolumeClaim", "data", namespace))
                 and annotations(o).get("volume.kubernetes.io/storage-provisioner") and o,
                 timeout=30, message="storage-provisioner annotation")
    assert annotations(c)["volume.kubernetes.io/storage-provisioner"] == "ext.e2e.volplane.io"
    events = wait_for(lambda: [e for e in claim_events(api, namespace, "data",
                                                       "ExternalProvisioning")
                               if (e.get("count") or 1) >= 3],
                      timeout=30, message="ExternalProvisioning repeated 3 times")
    assert len(claim_events(api, namespace, "data", "ExternalProvisioning")) == 1
    assert "external provisioner 'ext.e2e.volplane.io'" in events[0]["message"]


def test_empty_claim_ref_is_not_unclaimed(api, namespace, pvs, operator):  # noqa: F811
    """upstream: a non-nil claimRef is a claim, even an empty one; such a PV is never
    matched to a claim (and is not reported as unused)."""
    start(operator)
    manifest = pv_manifest(pvs.name("empty-ref"), "5Gi", pvs.ns, ns=pvs.ns)
    manifest["spec"]["claimRef"] = {}
    kcreate(api, manifest)
    wait_volume_phase(api, pvs.name("empty-ref"), "Available")
    pvs.pvc("data", "1Gi")
    assert_stays_pending(api, namespace, "data", seconds=5)
    v = kget(api, "PersistentVolume", pvs.name("empty-ref"))
    assert v["spec"].get("claimRef") is not None, v["spec"]


# ============================================================================ why Pending


def test_why_pending_message_and_explain(api, kubeconfig, namespace, pvs, operator):  # noqa: F811
    """Issue 14's example: "of 6 gold PVs: 3 too small (largest 10Gi < 100Gi), 3 bound
    to other claims", PVs of other classes as one line, the same in `volplane explain`."""
    gold, silver = pvs.name("gold"), pvs.name("silver")
    for size in ("1Gi", "5Gi", "10Gi"):
        pvs.pv(f"small-{size.lower()}", size, storage_class=gold)
    for i in range(3):
        pvs.pv(f"taken-{i}", "200Gi", storage_class=gold,
               claim_ref={"namespace": namespace, "name": f"other-{i}", "uid": f"u-{i}"})
    for i in range(4):
        pvs.pv(f"silver-{i}", "500Gi", storage_class=silver)
    start(operator)
    wait_volume_phase(api, pvs.name("small-10gi"), "Available")
    pvs.pvc("data", "100Gi", storage_class=gold)
    want = re.escape(f"of 6 {gold} PVs: 3 too small (largest 10Gi < 100Gi), "
                     "3 bound to other claims; ") + r"(\d+) of other classes"
    try:
        events = wait_for(lambda: [e for e in claim_events(api, namespace, "data")
                                   if re.search(want, e["message"])],
                          timeout=30, message="the why-Pending event")
    except TimeoutError:
        seen = [e["message"] for e in claim_events(api, namespace, "data")]
        raise AssertionError(f"no event matches {want!r}: {seen}") from None
    others = int(re.search(want, events[0]["message"]).group(1))
    assert others >= 4, events[0]["message"]

    out = subprocess.run([_volplane_executable(), "explain", "pvc", f"{namespace}/data",
                          "--kubeconfig", kubeconfig],
                         capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert re.search(r"matching: no persistent volumes matched: " + want, out.stdout), out.stdout
    rows = re.findall(r"^\s+(\d+)\s+(\w+)$", out.stdout, re.M)
    names = [k for _, k in rows]
    assert names == ["storage_class", "too_small", "bound_elsewhere"], out.stdout


# ============================================================================ CSI migration

EBS_DRIVER = "ebs.csi.aws.com"
IN_TREE_EBS = "kubernetes.io/aws-ebs"
ANN_PROVISIONER = "volume.kubernetes.io/storage-provisioner"
ANN_BETA_PROVISIONER = "volume.beta.kubernetes.io/storage-provisioner"
ANN_MIGRATED_TO = "pv.kubernetes.io/migrated-to"
ANN_PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
IN_TREE_FINALIZER = "kubernetes.io/pv-controller"


def test_migrated_in_tree_class_is_handed_to_its_csi_driver(api, namespace, pvs, operator):  # noqa: F811
    """upstream provisionClaimOperationExternal: a class of a migrated in-tree provisioner
    is handed to the CSI driver (storage-provisioner = ebs.csi.aws.com, ExternalProvisioning
    naming it); with the real plugin manager the new claim carries no migrated-to (its
    storage-provisioner is not an in-tree name), a claim annotated in-tree by kcm does."""
    start(operator)
    sc = pvs.storage_class("ebs", provisioner=IN_TREE_EBS)
    pvs.pvc("fresh", "1Gi", storage_class=sc)
    c = wait_for(lambda: (o := kget(api, "PersistentVolumeClaim", "fresh", namespace))
                 and annotations(o).get(ANN_PROVISIONER) and o,
                 timeout=30, message="storage-provisioner annotation")
    assert annotations(c)[ANN_PROVISIONER] == EBS_DRIVER, annotations(c)
    assert annotations(c)[ANN_BETA_PROVISIONER] == EBS_DRIVER, annotations(c)
    assert ANN_MIGRATED_TO not in annotations(c), annotations(c)
    events = wait_for(lambda: claim_events(api, namespace, "fresh", "ExternalProvisioning"),
                      timeout=30, message="ExternalProvisioning event")
    assert f"external provisioner '{EBS_DRIVER}'" in events[0]["message"], events[0]
    assert not claim_events(api, namespace, "fresh", "ProvisioningFailed")

    # a claim from kcm's days, bound to its volume, annotated with the in-tree name: it
    # keeps that annotation and gets migrated-to (an unbound one is re-annotated with
    # the driver and loses migrated-to again, as setClaimProvisioner does)
    pvs.pv("legacy", "1Gi", storage_class=sc,  # reserved: "fresh" would take it otherwise
           claim_ref={"namespace": namespace, "name": "legacy"})
    manifest = pvc_manifest("legacy", namespace, "1Gi", sc, volume_name=pvs.name("legacy"))
    manifest["metadata"]["annotations"] = {ANN_PROVISIONER: IN_TREE_EBS}
    kcreate(api, manifest)
    wait_bound(api, namespace, "legacy")

    def annealed():
        o = kget(api, "PersistentVolumeClaim", "legacy", namespace)
        return (annotations(o).get(ANN_MIGRATED_TO) == EBS_DRIVER
                and annotations(o).get(ANN_PROVISIONER) == IN_TREE_EBS and o)

    wait_for(annealed, timeout=30, message="migrated-to on the bound legacy claim")
    holds_for(annealed, 3, message="the bound legacy claim keeps migrated-to")


def test_in_tree_pv_from_kcm_is_migrated_and_deletes_cleanly(api, namespace, pvs, operator):  # noqa: F811
    """upstream updateVolumeMigrationAnnotationsAndFinalizers: a PV kcm provisioned in-tree
    (provisioned-by kubernetes.io/aws-ebs, finalizer kubernetes.io/pv-controller) gets
    migrated-to = ebs.csi.aws.com and loses the in-tree finalizer; Released, it is left to
    the CSI driver (not Failed), and deleting it does not hang in Terminating."""
    sc = pvs.storage_class("ebs", provisioner=IN_TREE_EBS)
    manifest = pv_manifest(pvs.name("kcm"), "1Gi", sc, ns=namespace, policy="Delete")
    spec = manifest["spec"]
    del spec["hostPath"]
    spec["awsElasticBlockStore"] = {"volumeID": "vol-0123456789abcdef0", "fsType": "ext4"}
    manifest["metadata"]["annotations"] = {ANN_PROVISIONED_BY: IN_TREE_EBS}
    manifest["metadata"]["finalizers"] = [IN_TREE_FINALIZER]
    kcreate(api, manifest)
    name = pvs.name("kcm")
    start(operator)
    v = wait_for(lambda: (o := kget(api, "PersistentVolume", name))
                 and annotations(o).get(ANN_MIGRATED_TO) and o,
                 timeout=30, message="migrated-to on the PV")
    assert annotations(v)[ANN_MIGRATED_TO] == EBS_DRIVER
    v = wait_for(lambda: (o := kget(api, "PersistentVolume", name))
                 and IN_TREE_FINALIZER not in (o["metadata"].get("finalizers") or []) and o,
                 timeout=30, message="pv-controller finalizer removed")

    pvs.pvc("data", "1Gi", storage_class=sc, volume_name=name)
    wait_bound(api, namespace, "data")
    kdelete(api, "PersistentVolumeClaim", "data", namespace)
    wait_volume_phase(api, name, "Released", timeout=30)
    holds_for(lambda: phase(kget(api, "PersistentVolume", name)) == "Released", 5,
              message="Released, left to the CSI driver (not Failed)")
    kdelete(api, "PersistentVolume", name)
    wait_for(lambda: kget(api, "PersistentVolume", name) is None, timeout=30,
             message="the PV is gone, not stuck Terminating")
