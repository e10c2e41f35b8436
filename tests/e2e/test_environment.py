"""Acceptance tests of the e2e environment itself, with no volplane running.

They prove the cluster is the real thing volplane needs: upstream components at the
pinned version, schedulable nodes whose pods go Running, the upstream StatefulSet
controller, and *no* PersistentVolume binder (the job volplane takes over).
"""

from __future__ import annotations

import secrets

import pykube
import pytest

from .conftest import load_cluster_module
from .helpers import condition, create, delete_quietly, events_for, holds_for, wait_for

PAUSE_IMAGE = "registry.k8s.io/pause:3.10"


def pod_manifest(name: str, namespace: str, local: bool, volumes: list[dict] | None = None) -> dict:
    spec: dict = {
        "containers": [{"name": "main", "image": PAUSE_IMAGE}],
        "terminationGracePeriodSeconds": 0,
    }
    if local:
        spec["nodeSelector"] = {"type": "kwok"}
    if volumes:
        spec["volumes"] = volumes
        spec["containers"][0]["volumeMounts"] = [
            {"name": v["name"], "mountPath": f"/data/{v['name']}"} for v in volumes
        ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def test_server_version_is_pinned(api, cluster):
    if cluster.flavor == "external":
        pytest.skip("the pinned version is only guaranteed on clusters this project builds")
    pinned = load_cluster_module().kubernetes_version()
    resp = api.session.get(api.url + "/version", timeout=10)
    resp.raise_for_status()
    assert resp.json()["gitVersion"] == pinned


def test_kwok_nodes_ready_with_zones(api, cluster):
    if not cluster.local:
        pytest.skip("kwok nodes exist only on the local control plane")
    expected = load_cluster_module().node_names(4)

    def nodes_ready():
        nodes = {n.name: n.obj for n in pykube.Node.objects(api).filter(selector={"type": "kwok"})}
        # Ready, and the node lifecycle controller has lifted its not-ready taint.
        ready = [name for name in expected
                 if name in nodes
                 and (condition(nodes[name], "Ready") or {}).get("status") == "True"
                 and not nodes[name]["spec"].get("taints")]
        return nodes if len(ready) == len(expected) else None

    nodes = wait_for(nodes_ready, timeout=60, message="4 kwok nodes Ready")
    for i, name in enumerate(expected):
        labels = nodes[name]["metadata"]["labels"]
        assert labels["topology.kubernetes.io/zone"] == ("zone-a" if i % 2 == 0 else "zone-b")
        assert labels["kubernetes.io/hostname"] == name
        assert not nodes[name]["spec"].get("taints"), "kwok nodes must be schedulable"


def test_plain_pod_is_scheduled_and_runs(api, cluster, namespace):
    pod = create(api, pod_manifest("plain", namespace, cluster.local))

    def running():
        pod.reload()
        return pod.obj["status"].get("phase") == "Running" and pod.obj

    obj = wait_for(running, timeout=60, message="pod plain Running")
    assert (condition(obj, "PodScheduled") or {}).get("status") == "True"
    node_name = obj["spec"]["nodeName"]
    assert node_name
    if cluster.local:
        assert node_name.startswith("kwok-node-")
    scheduled = [e for e in events_for(api, namespace, "plain", kind="Pod")
                 if e.get("reason") == "Scheduled"]
    assert scheduled, "kube-scheduler records a Scheduled event"


def test_statefulset_creates_claims_from_templates(api, cluster, namespace):
    create(api, {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "db", "namespace": namespace},
        "spec": {
            "replicas": 2,
            "podManagementPolicy": "Parallel",
            "serviceName": "db",
            "selector": {"matchLabels": {"app": "db"}},
            "template": {
                "metadata": {"labels": {"app": "db"}},
                "spec": pod_manifest("unused", namespace, cluster.local)["spec"]
                | {"containers": [{"name": "main", "image": PAUSE_IMAGE,
                                   "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]},
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": "manual-e2e",
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            }],
        },
    })

    def claims():
        claims = pykube.PersistentVolumeClaim.objects(api, namespace=namespace)
        found = {c.name: c.obj for c in claims}
        return found if {"data-db-0", "data-db-1"} <= set(found) else None

    found = wait_for(claims, timeout=60, message="PVCs data-db-0 and data-db-1")
    for name in ("data-db-0", "data-db-1"):
        claim = found[name]
        assert claim["spec"]["storageClassName"] == "manual-e2e"
        assert claim["metadata"]["labels"]["app"] == "db"
        assert claim["status"].get("phase") == "Pending"
        assert not claim["spec"].get("volumeName")


@pytest.fixture
def matching_pair(api, namespace):
    """A PV and a PVC that match perfectly (1Gi, RWO, storageClassName ""), unbound."""
    pv_name = f"e2e-pv-{namespace}-{secrets.token_hex(2)}"
    pv = create(api, {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": pv_name, "labels": {"volplane.io/e2e": "true"}},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "volumeMode": "Filesystem",
            "hostPath": {"path": f"/tmp/volplane-e2e/{pv_name}"},
        },
    })
    pvc = create(api, {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "claim", "namespace": namespace},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "",
            "volumeMode": "Filesystem",
            "resources": {"requests": {"storage": "1Gi"}},
        },
    })
    yield pv, pvc
    delete_quietly(pv)


def test_matching_pv_and_pvc_stay_unbound_without_volplane(matching_pair):
    pv, pvc = matching_pair

    def still_unbound():
        pv.reload()
        pvc.reload()
        pv_phase = pv.obj.get("status", {}).get("phase")
        pvc_phase = pvc.obj.get("status", {}).get("phase")
        problems = []
        # The apiserver creates PVs in phase Pending; the PV controller would move
        # an unclaimed one to Available at once. Without it, Pending it stays.
        if pv_phase != "Pending":
            problems.append(f"PV phase {pv_phase}")
        if pv.obj["spec"].get("claimRef"):
            problems.append(f"PV claimRef {pv.obj['spec']['claimRef']}")
        if pvc_phase != "Pending":
            problems.append(f"PVC phase {pvc_phase}")
        if pvc.obj["spec"].get("volumeName"):
            problems.append(f"PVC volumeName {pvc.obj['spec']['volumeName']}")
        if "pv.kubernetes.io/bind-completed" in pvc.obj["metadata"].get("annotations", {}):
            problems.append("PVC bind-completed annotation")
        assert not problems, ("something bound them (is a PV binder running?): "
                              + "; ".join(problems))
        return True

    holds_for(still_unbound, duration=20, interval=1, message="PV/PVC unbound")


def test_scheduler_reports_unbound_immediate_claim(api, cluster, namespace, matching_pair):
    _, pvc = matching_pair
    create(api, pod_manifest("consumer", namespace, cluster.local, volumes=[
        {"name": "data", "persistentVolumeClaim": {"claimName": pvc.name}},
    ]))
    pod = pykube.Pod.objects(api, namespace=namespace).get_by_name("consumer")

    def unschedulable():
        pod.reload()
        if pod.obj["spec"].get("nodeName"):
            pytest.fail(f"pod scheduled to {pod.obj['spec']['nodeName']}: "
                        "its claim got bound (by a PV binder?)")
        cond = condition(pod.obj, "PodScheduled")
        return cond if cond and cond.get("status") == "False" else None

    cond = wait_for(unschedulable, timeout=60, message="PodScheduled=False on pod consumer")
    assert cond["reason"] == "Unschedulable"
    assert "unbound immediate PersistentVolumeClaims" in cond["message"]
    assert not pod.obj["spec"].get("nodeName")

    def still_pending():
        pod.reload()
        assert not pod.obj["spec"].get("nodeName"), (
            f"scheduled to {pod.obj['spec']['nodeName']}: the claim got bound (by a PV binder?)")
        return True

    # With a PV binder the claim binds within a second and the retry schedules the pod.
    holds_for(still_pending, duration=5, interval=0.5, message="pod consumer unscheduled")
    failed = wait_for(
        lambda: [e for e in events_for(api, namespace, "consumer", kind="Pod")
                 if e.get("reason") == "FailedScheduling"],
        timeout=30, message="FailedScheduling event",
    )
    assert "unbound immediate PersistentVolumeClaims" in failed[-1]["message"]
