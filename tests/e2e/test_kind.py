"""What only a cluster with real nodes can show (issue 11): pod networking between kind
nodes, and volplane installed the way users install it — the 2-replica Deployment from
manifests/ leading through its Lease, scraped through its Service, handing over when
the leader pod is deleted mid-run.

On the local control plane (kwok nodes, no kubelets) these tests skip.
"""

from __future__ import annotations

import json
import threading
import time

import pykube
import pytest

from .conftest import kubectl
from .helpers import create, kget, wait_for

BUSYBOX = "volplane/busybox:1.35"  # built and loaded by hack/kind/kind.py
NS = "volplane-system"


@pytest.fixture
def kind_cluster(cluster):
    if cluster.flavor != "kind":
        pytest.skip("needs kind (real kubelets and pod networking): make e2e-kind")
    return cluster


def _pod(name: str, ns: str, node: str, command: list[str], **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns,
                                                            "labels": {"app": name}},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 0,
                     "tolerations": [{"operator": "Exists"}],
                     "containers": [{"name": "main", "image": BUSYBOX, "command": command}],
                     **spec}}


def _phase(api, ns: str, name: str) -> str | None:
    pod = kget(api, "Pod", name, ns)
    return (pod or {}).get("status", {}).get("phase")


def test_pods_on_every_node_reach_each_other_and_the_api_server(api, kind_cluster, namespace,
                                                               kubeconfig):
    """The project's CNI setup (kindnetd's job): each node routes to the others' podCIDRs."""
    nodes = list(kind_cluster.nodes.names)
    assert len(nodes) == 4, nodes
    servers = {}
    for i, node in enumerate(nodes):
        name = f"web{i}"
        create(api, _pod(name, namespace, node, [
            "sh", "-c", f"mkdir -p /www && echo hello-from-{node} > /www/index.html && "
                        "exec httpd -f -p 8080 -h /www"]))
        servers[name] = node
    ips = {}
    for name in servers:
        pod = wait_for(lambda n=name: (p := kget(api, "Pod", n, namespace))
                       and p["status"].get("phase") == "Running" and p["status"].get("podIP")
                       and p, timeout=120, message=f"{name} Running")
        ips[name] = pod["status"]["podIP"]
    assert len(set(ips.values())) == len(ips), ips
    # from every node, to every other node's server, and to the API server's Service.
    # (busybox-static's wget and getaddrinfo crash in this image: nc speaks HTTP, the
    # Service is reached at its cluster IP from the pod's environment, and DNS is checked
    # with nslookup, busybox's own resolver)
    for i, node in enumerate(nodes):
        checks = " && ".join(
            f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 8080"
            f" | grep -q hello-from-{servers[n]}"
            for n, ip in ips.items() if servers[n] != node)
        checks += (" && nslookup kubernetes.default.svc.cluster.local | grep -q Address"
                   " && echo | nc -w 5 $KUBERNETES_SERVICE_HOST $KUBERNETES_SERVICE_PORT"
                   " && echo all-reached")
        create(api, _pod(f"client{i}", namespace, node, ["sh", "-c", checks],
                         restartPolicy="Never"))
    for i, node in enumerate(nodes):
        def done(n=f"client{i}"):
            return _phase(api, namespace, n) in ("Succeeded", "Failed") and _phase(
                api, namespace, n)
        phase = wait_for(done, timeout=120, message=f"client{i} on {node} finished")
        logs = kubectl(kubeconfig, "-n", namespace, "logs", f"client{i}")
        assert phase == "Succeeded", f"client{i} on {node}: {logs}"


def _lease_holder(kubeconfig) -> str | None:
    try:
        out = kubectl(kubeconfig, "get", "lease", "volplane", "-n", NS, "-o", "json")
    except RuntimeError:
        return None
    return json.loads(out)["spec"].get("holderIdentity")


def _operator_pods(api) -> list[dict]:
    return [p.obj for p in pykube.Pod.objects(api, namespace=NS).filter(
        selector={"app.kubernetes.io/name": "volplane"})]


def _ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in (pod.get("status") or {}).get("conditions") or ())


@pytest.fixture
def in_cluster_operator(api, kind_cluster, kubeconfig):
    """The Deployment from manifests/, scaled to its 2 replicas for the test (the session
    keeps it at 0 while other tests run their own operators)."""
    kubectl(kubeconfig, "-n", NS, "scale", "deployment", "volplane", "--replicas=2")
    pods = wait_for(lambda: (ps := [p for p in _operator_pods(api) if _ready(p)
                                    and not p["metadata"].get("deletionTimestamp")])
                    and len(ps) == 2 and ps, timeout=180, message="2 operator pods Ready")
    yield pods
    kubectl(kubeconfig, "-n", NS, "scale", "deployment", "volplane", "--replicas=0")
    wait_for(lambda: not _operator_pods(api), timeout=120, message="operator pods gone")
    kubectl(kubeconfig, "-n", NS, "delete", "lease", "volplane", "--ignore-not-found")


def _pv(name: str, cls: str) -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
            "spec": {"storageClassName": cls, "accessModes": ["ReadWriteOnce"],
                     "capacity": {"storage": "1Gi"}, "persistentVolumeReclaimPolicy": "Retain",
                     "hostPath": {"path": f"/tmp/{name}"}}}


def _claim(ns: str, name: str, cls: str) -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"storageClassName": cls, "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "1Gi"}}}}


@pytest.mark.timeout(600)
def test_installed_deployment_leads_serves_metrics_and_fails_over(api, kubeconfig, namespace,
                                                                 in_cluster_operator):
    names = {p["metadata"]["name"] for p in in_cluster_operator}
    # one pod holds the Lease (identity = its POD_NAME)
    leader = wait_for(lambda: (h := _lease_holder(kubeconfig)) in names and h, timeout=60,
                      message="an operator pod holds the Lease")
    # metrics through the Service (the API server's service proxy, as Prometheus would
    # reach the endpoints)
    text = kubectl(kubeconfig, "get", "--raw",
                   f"/api/v1/namespaces/{NS}/services/http:volplane-metrics:metrics/proxy/metrics")
    assert "volplane_" in text and "# TYPE" in text, text[:500]
    # work arrives continuously; the leader pod is deleted while it binds
    cls = f"failover-{namespace}"
    n = 120
    for i in range(n):
        create(api, _pv(f"{namespace}-pv{i:03d}", cls))
    created = []

    def make_claims():
        for i in range(n):
            create(api, _claim(namespace, f"c{i:03d}", cls))
            created.append(i)
            time.sleep(0.05)

    writer = threading.Thread(target=make_claims, daemon=True)
    writer.start()

    def bound() -> int:
        return sum(1 for c in pykube.PersistentVolumeClaim.objects(api, namespace=namespace)
                   if c.obj.get("status", {}).get("phase") == "Bound")

    wait_for(lambda: bound() >= 10, timeout=60, message="the leader binds")
    deleted_at = time.monotonic()
    kubectl(kubeconfig, "-n", NS, "delete", "pod", leader, "--wait=false")
    writer.join(timeout=120)
    assert len(created) == n
    other = wait_for(lambda: (h := _lease_holder(kubeconfig)) in names - {leader} and h,
                     timeout=60, message="the other replica takes the Lease")
    took = time.monotonic() - deleted_at
    wait_for(lambda: bound() == n, timeout=180, message=f"all {n} claims bound by {other}")
    pvs = [pv.obj for pv in pykube.PersistentVolume.objects(api)
           if pv.name.startswith(f"{namespace}-pv")]
    refs = [pv["spec"]["claimRef"]["name"] for pv in pvs if pv["spec"].get("claimRef")]
    assert len(refs) == len(set(refs)) == n, "a PV bound twice, or a claim left out"
    for c in pykube.PersistentVolumeClaim.objects(api, namespace=namespace):
        pv = next(p for p in pvs if p["metadata"]["name"] == c.obj["spec"]["volumeName"])
        assert pv["spec"]["claimRef"]["uid"] == c.obj["metadata"]["uid"]
    print(f"\nleader {leader} deleted; {other} led {took:.1f} s later")
