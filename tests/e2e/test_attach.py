"""Acceptance tests of the Attach/Detach controller and the pool attacher (issue 5).

Run on a cluster of their own when others share the machine:
    VOLPLANE_CLUSTER=attach .venv/bin/python -m pytest tests/e2e/test_attach.py -x -q

Most tests use static CSI PVs pre-bound to their claims (claimRef + volumeName, both
marked Bound here) and pods pinned with spec.nodeName, so that they exercise only the
two controllers under test. On the local control plane kwok plays the kubelets: pods
go Running, but no kubelet reports status.volumesInUse, so the tests that need it patch
node status themselves (the kwok variants). On kind the real kubelets report
volumesInUse, and the same tests check the controller against what they report; pool
volumes are not mounted there until the CSI node plugin is installed (pods wait in
ContainerCreating), which the attach/detach path does not need.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pykube
import pytest
import requests
import yaml

from volplane.attach.names import unique_volume_name, volume_attachment_name
from volplane.attach.reconcile import OUT_OF_SERVICE_TAINT, node_ready
from volplane.kinds import MANAGED_ANNOTATION
from volplane.pools.slots import ATTACHER_FINALIZER, SLOT_ANNOTATION

from .conftest import REPO_ROOT
from .helpers import (
    create,
    delete_quietly,
    events_for,
    get_or_none,
    holds_for,
    kind_class,
    node_plugin_registered,
    wait_for,
)

PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
POOL_DRIVER = "pool.volplane.io"
AD_ONLY = ("--controllers=attachdetach,pool-attacher",)


# ----------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def operator_args(*controllers: str, metrics_port: int = 0) -> list[str]:
    return [f"--controllers={','.join(controllers) or 'attachdetach,pool-attacher'}",
            f"--metrics-port={metrics_port}", "--health-port=0", "--bind-address=127.0.0.1",
            "--no-leader-elect"]


def cls(api, kind, version="v1"):
    return kind_class(api, version, kind)


def list_vas(api) -> dict[str, dict]:
    return {o.name: o.obj for o in cls(api, "VolumeAttachment", "storage.k8s.io/v1").objects(api)}


def node_obj(api, name) -> dict:
    return pykube.Node.objects(api).get_by_name(name).obj


def patch_status(api, path: str, patch: dict) -> None:
    r = api.session.patch(api.url + path + "/status", data=json.dumps(patch),
                          headers={"Content-Type": "application/merge-patch+json"}, timeout=30)
    r.raise_for_status()


def patch(api, path: str, patch_body: dict) -> None:
    r = api.session.patch(api.url + path, data=json.dumps(patch_body),
                          headers={"Content-Type": "application/merge-patch+json"}, timeout=30)
    r.raise_for_status()


def kwok_nodes(cluster) -> list[str]:
    """Four nodes to pin pods to: kwok's on the local control plane, kind's nodes on kind
    (workers first, then the control plane; zones alternate)."""
    return list(cluster.nodes.names)


def needs_fake_kubelets(cluster, why: str) -> None:
    if not cluster.nodes.fake_kubelets:
        pytest.skip(f"needs kwok (fake kubelets): {why}")


class World:
    """Cluster-scoped objects one test makes, and their cleanup."""

    def __init__(self, api, namespace: str, fake_kubelets: bool = True):
        self.api = api
        self.ns = namespace
        self.tag = namespace
        self.fake_kubelets = fake_kubelets
        self.pvs: list[str] = []
        self.pools: list[str] = []
        self.drivers: list[str] = []
        self.nodes: list[str] = []
        self.classes: list[str] = []

    # -- objects
    def pool(self, nodes: list[str] | None = None, slots: int = 16, selector=None) -> str:
        name = f"{self.tag}-pool{len(self.pools)}"
        spec_nodes = {"names": nodes} if nodes else {}
        if selector:
            spec_nodes["selector"] = selector
        spec = {"capacity": "1Ti", "nodes": spec_nodes, "slotsPerNode": slots}
        if not self.fake_kubelets:
            spec["backing"] = {"type": "File"}  # real kubelets mount through the node plugin
        create(self.api, {"apiVersion": "volplane.io/v1alpha1", "kind": "StoragePool",
                          "metadata": {"name": name}, "spec": spec})
        self.pools.append(name)
        return name

    def csidriver(self, attach_required: bool) -> str:
        name = f"{self.tag}-{'attach' if attach_required else 'noattach'}.csi.e2e.volplane.io"
        create(self.api, {"apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver",
                          "metadata": {"name": name},
                          "spec": {"attachRequired": attach_required, "podInfoOnMount": False}})
        self.drivers.append(name)
        return name

    def volume(self, i: int, *, driver: str = POOL_DRIVER, pool: str | None = None,
               modes=("ReadWriteOnce",), handle: str | None = None) -> tuple[str, str, str]:
        """A claim and a static CSI PV, bound to each other. Returns (claim, pv, handle).
        `handle`: that volume handle (another PV's: two PVs on one volume)."""
        claim, pv_name = f"c{i}", f"{self.tag}-pv{i}"
        handle = handle or (f"{pool}/{pv_name}" if pool else f"handle-{pv_name}")
        pvc = create(self.api, {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": self.ns},
            "spec": {"accessModes": list(modes), "storageClassName": "",
                     "volumeName": pv_name, "resources": {"requests": {"storage": "1Gi"}}}})
        create(self.api, {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "labels": {"volplane.io/e2e": self.tag}},
            "spec": {"accessModes": list(modes), "capacity": {"storage": "1Gi"},
                     "storageClassName": "", "persistentVolumeReclaimPolicy": "Retain",
                     "csi": {"driver": driver, "volumeHandle": handle},
                     "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                                  "namespace": self.ns, "name": claim,
                                  "uid": pvc.obj["metadata"]["uid"]}}})
        self.pvs.append(pv_name)
        patch_status(self.api, f"/api/v1/persistentvolumes/{pv_name}",
                     {"status": {"phase": "Bound"}})
        patch_status(self.api, f"/api/v1/namespaces/{self.ns}/persistentvolumeclaims/{claim}",
                     {"status": {"phase": "Bound", "accessModes": list(modes),
                                 "capacity": {"storage": "1Gi"}}})
        return claim, pv_name, handle

    def pod(self, name: str, node: str, *claims: str) -> pykube.Pod:
        vols = [{"name": f"v{i}", "persistentVolumeClaim": {"claimName": c}}
                for i, c in enumerate(claims)]
        return create(self.api, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 0,
                     "tolerations": [{"operator": "Exists"}],
                     "containers": [{"name": "main", "image": PAUSE_IMAGE,
                                     "volumeMounts": [{"name": v["name"],
                                                       "mountPath": f"/d/{v['name']}"}
                                                      for v in vols]}],
                     "volumes": vols}})

    def delete_pod(self, name: str) -> None:
        r = self.api.session.delete(
            f"{self.api.url}/api/v1/namespaces/{self.ns}/pods/{name}",
            data=json.dumps({"gracePeriodSeconds": 0}), timeout=30)
        if r.status_code not in (200, 202, 404):
            r.raise_for_status()

    def fake_node(self) -> str:
        """A Node that kwok keeps Ready with no kubelet behind it (local control plane)."""
        if not self.fake_kubelets:
            pytest.skip("needs kwok: a Node kept Ready with no kubelet, deleted or tainted "
                        "out-of-service by the test")
        name = f"{self.tag}-node{len(self.nodes)}"
        create(self.api, {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name,
                         "labels": {"type": "kwok-e2e", "kubernetes.io/hostname": name},
                         "annotations": {"kwok.x-k8s.io/node": "fake",
                                         MANAGED_ANNOTATION: "true"}},
            "spec": {"taints": [{"key": "volplane.io/e2e", "effect": "NoSchedule"}]}})
        self.nodes.append(name)
        wait_for(lambda: node_ready(node_obj(self.api, name)), timeout=30,
                 message=f"node {name} Ready")
        return name

    # -- questions
    def my_vas(self) -> dict[str, dict]:
        return {n: v for n, v in list_vas(self.api).items()
                if (v["spec"].get("source") or {}).get("persistentVolumeName") in self.pvs}

    def va_for(self, pv_name: str, node: str, handle: str, driver: str = POOL_DRIVER):
        name = volume_attachment_name(handle, driver, node)
        obj = get_or_none(self.api, "storage.k8s.io/v1", "VolumeAttachment", name)
        return obj.obj if obj else None

    def wait_attached(self, pv_name: str, node: str, handle: str, driver: str = POOL_DRIVER,
                      timeout: float = 30) -> dict:
        def attached():
            va = self.va_for(pv_name, node, handle, driver)
            return va if va and (va.get("status") or {}).get("attached") else None
        return wait_for(attached, timeout=timeout,
                        message=f"VolumeAttachment of {pv_name} on {node} attached")

    def wait_no_va(self, pv_name: str, node: str | None = None, timeout: float = 30) -> None:
        def gone():
            return not [v for v in self.my_vas().values()
                        if v["spec"]["source"]["persistentVolumeName"] == pv_name
                        and (node is None or v["spec"]["nodeName"] == node)]
        wait_for(gone, timeout=timeout, message=f"no VolumeAttachment of {pv_name}")

    def reported(self, node: str) -> dict[str, str]:
        st = node_obj(self.api, node).get("status") or {}
        return {e["name"]: e.get("devicePath", "") for e in st.get("volumesAttached") or ()}

    def in_use(self, node: str) -> set[str]:
        return set((node_obj(self.api, node).get("status") or {}).get("volumesInUse") or ())

    # -- cleanup (while the operator still runs, so attachers release their finalizers)
    def cleanup(self) -> None:
        api = self.api
        for p in pykube.Pod.objects(api, namespace=self.ns):
            self.delete_pod(p.name)
        try:
            wait_for(lambda: not self.my_vas(), timeout=30, message="attachments gone")
        except TimeoutError:
            pass
        for name, va in self.my_vas().items():  # operator dead: unblock the deletion
            if va["metadata"].get("finalizers"):
                patch(api, f"/apis/storage.k8s.io/v1/volumeattachments/{name}",
                      {"metadata": {"finalizers": None}})
            delete_quietly(cls(api, "VolumeAttachment", "storage.k8s.io/v1")(api, va))
        for name in self.pvs:
            obj = get_or_none(api, "v1", "PersistentVolume", name)
            if obj is not None:
                # delete first: pv-protection would re-add its finalizer to a live PV, and
                # with no PV binder running here the PV stays Bound, so it never lets go
                delete_quietly(obj)
                try:
                    patch(api, f"/api/v1/persistentvolumes/{name}",
                          {"metadata": {"finalizers": None}})
                except requests.HTTPError:
                    pass
        # allocation records of the pools' provisioned volumes (the StatefulSet test's):
        # with their PVs deleted above, left behind they would be orphans of a gone pool
        alloc_cls = cls(api, "StorageAllocation", "volplane.io/v1alpha1")
        for rec in alloc_cls.objects(api):
            if rec.obj.get("spec", {}).get("pool") in self.pools:
                delete_quietly(rec)
        for name in self.pools:
            obj = get_or_none(api, "volplane.io/v1alpha1", "StoragePool", name)
            if obj is not None:
                delete_quietly(obj)
        for name in self.drivers:
            obj = get_or_none(api, "storage.k8s.io/v1", "CSIDriver", name)
            if obj is not None:
                delete_quietly(obj)
        for name in self.nodes:
            obj = get_or_none(api, "v1", "Node", name)
            if obj is not None:
                delete_quietly(obj)
        for name in self.classes:
            obj = get_or_none(api, "storage.k8s.io/v1", "StorageClass", name)
            if obj is not None:
                delete_quietly(obj)


@pytest.fixture(scope="session")
def crds(api):
    """The CRDs of the repository, applied once (the pool attacher reads StoragePools)."""
    crd_cls = kind_class(api, "apiextensions.k8s.io/v1", "CustomResourceDefinition")
    for path in sorted(Path(REPO_ROOT / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            existing = get_or_none(api, "apiextensions.k8s.io/v1", "CustomResourceDefinition",
                                   doc["metadata"]["name"])
            if existing is None:
                crd_cls(api, doc).create()
            else:
                existing.obj["spec"] = doc["spec"]
                existing.update()

            def established(name=doc["metadata"]["name"]):
                obj = get_or_none(api, "apiextensions.k8s.io/v1", "CustomResourceDefinition",
                                  name)
                conds = (obj.obj.get("status") or {}).get("conditions") or [] if obj else []
                return any(c["type"] == "Established" and c["status"] == "True" for c in conds)
            wait_for(established, timeout=30, message=f"CRD {doc['metadata']['name']}")


@pytest.fixture
def world(api, namespace, operator, crds, cluster):
    w = World(api, namespace, fake_kubelets=cluster.nodes.fake_kubelets)
    yield w
    w.cleanup()


def start(operator, *args, env=None):
    operator.start(*(args or operator_args()), env=env)
    operator.wait_ready(timeout=90)
    return operator


# ----------------------------------------------------------------------------- tests
def test_statefulset_on_a_pool_class_gets_upstream_named_attachments(api, world, operator,
                                                                     cluster):
    """Needs the PV binder and the pool provisioner (dynamic provisioning)."""
    start(operator, *operator_args("pv-binder", "pool-provisioner", "attachdetach",
                                   "pool-attacher"))
    nodes = kwok_nodes(cluster)
    world.pool(nodes=nodes)
    sc = f"{world.tag}-pool"
    create(api, {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                 "metadata": {"name": sc}, "provisioner": POOL_DRIVER,
                 "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate"})
    world.classes.append(sc)
    create(api, {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "web", "namespace": world.ns},
        "spec": {
            "replicas": 3, "serviceName": "web",
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                         "spec": {"nodeSelector": dict(cluster.nodes.selector),
                                  "terminationGracePeriodSeconds": 0,
                                  "containers": [{"name": "main", "image": PAUSE_IMAGE,
                                                  "volumeMounts": [{"name": "data",
                                                                    "mountPath": "/data"}]}]}},
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": sc,
                         "resources": {"requests": {"storage": "1Gi"}}}}]}})

    # kwok runs pods at once; real kubelets mount first (the node plugin, once installed)
    def pods_scheduled():
        pods = [p.obj for p in pykube.Pod.objects(api, namespace=world.ns)]
        ok = [p for p in pods if p["spec"].get("nodeName")
              and (cluster.nodes.fake_kubelets or p["status"].get("phase") == "Running"
                   or not node_plugin_registered(api, p["spec"]["nodeName"]))]
        return ok if len(ok) == 3 else None
    pods = wait_for(pods_scheduled, timeout=180, message="3 StatefulSet pods scheduled")
    if cluster.nodes.fake_kubelets:
        pods = wait_for(lambda: [p for p in pods_scheduled() or []
                                 if p["status"].get("phase") == "Running"] or None,
                        timeout=120, message="3 StatefulSet pods Running")
    for p in pods:
        node = p["spec"]["nodeName"]
        claim = pykube.PersistentVolumeClaim.objects(api, namespace=world.ns).get_by_name(
            f"data-{p['metadata']['name']}").obj
        pv = pykube.PersistentVolume.objects(api).get_by_name(claim["spec"]["volumeName"]).obj
        world.pvs.append(pv["metadata"]["name"])
        csi = pv["spec"]["csi"]
        va = world.wait_attached(pv["metadata"]["name"], node, csi["volumeHandle"])
        assert va["metadata"]["name"] == volume_attachment_name(
            csi["volumeHandle"], POOL_DRIVER, node)
        assert va["spec"] == {"attacher": POOL_DRIVER, "nodeName": node,
                              "source": {"persistentVolumeName": pv["metadata"]["name"]}}
        path = va["status"]["attachmentMetadata"]["devicePath"]
        assert path.startswith(f"/dev/volplane/{csi['volumeHandle'].split('/')[0]}/slot-")
        unique = unique_volume_name(POOL_DRIVER, csi["volumeHandle"])
        # devicePath "" in the node's report, as upstream for CSI volumes
        wait_for(lambda n=node, u=unique: world.reported(n).get(u) == "",
                 timeout=15, message=f"{node} status.volumesAttached lists {unique}")
        assert any(e["reason"] == "SuccessfulAttachVolume"
                   for e in events_for(api, world.ns, p["metadata"]["name"], "Pod"))
        if not cluster.nodes.fake_kubelets and not node_plugin_registered(api, node):
            # a real kubelet verified the attachment and now asks for the node plugin
            wait_for(lambda pod=p["metadata"]["name"]: any(
                e["reason"] == "FailedMount" and
                f"driver name {POOL_DRIVER} not found in the list of registered CSI drivers"
                in e["message"] for e in events_for(api, world.ns, pod, "Pod")),
                timeout=150, message=f"{p['metadata']['name']}: FailedMount naming the driver")
    # claims/PVs go with the namespace; the PV binder and provisioner reclaim them.



def test_deleting_a_pod_detaches_and_frees_its_slot(api, world, operator, cluster):
    start(operator)
    node = kwok_nodes(cluster)[0]
    pool = world.pool(nodes=[node], slots=1)
    claim, pv, handle = world.volume(0, pool=pool)
    world.pod("p0", node, claim)
    va = world.wait_attached(pv, node, handle)
    assert va["metadata"]["annotations"][SLOT_ANNOTATION] == "0"
    assert ATTACHER_FINALIZER in va["metadata"]["finalizers"]
    assert va["status"]["attachmentMetadata"]["devicePath"] == f"/dev/volplane/{pool}/slot-0"
    unique = unique_volume_name(POOL_DRIVER, handle)
    wait_for(lambda: unique in world.reported(node), timeout=15, message="reported attached")

    world.delete_pod("p0")
    world.wait_no_va(pv, timeout=30 if world.fake_kubelets else 90)
    wait_for(lambda: unique not in world.reported(node), timeout=15, message="report cleared")
    # the only slot is free again: a second volume gets it
    claim1, pv1, handle1 = world.volume(1, pool=pool)
    world.pod("p1", node, claim1)
    va1 = world.wait_attached(pv1, node, handle1)
    assert va1["metadata"]["annotations"][SLOT_ANNOTATION] == "0"


class VAWatch:
    """Records VolumeAttachment watch events (type, name, node) in a thread."""

    def __init__(self, api):
        self.api = api
        self.events: list[tuple[str, str, str]] = []
        self.stop = threading.Event()
        rv = api.session.get(api.url + "/apis/storage.k8s.io/v1/volumeattachments",
                             timeout=30).json()["metadata"]["resourceVersion"]
        self.thread = threading.Thread(target=self._run, args=(rv,), daemon=True)
        self.thread.start()

    def _run(self, rv):
        while not self.stop.is_set():
            try:
                with self.api.session.get(
                        self.api.url + "/apis/storage.k8s.io/v1/volumeattachments",
                        params={"watch": "true", "resourceVersion": rv,
                                "timeoutSeconds": "5"}, stream=True, timeout=30) as r:
                    for line in r.iter_lines():
                        if not line:
                            continue
                        ev = json.loads(line)
                        obj = ev["object"]
                        rv = obj["metadata"].get("resourceVersion", rv)
                        if ev["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            self.events.append((ev["type"], obj["metadata"]["name"],
                                                obj["spec"]["nodeName"]))
            except (requests.RequestException, ValueError, KeyError):
                time.sleep(0.2)

    def close(self):
        self.stop.set()


def test_moving_a_rwo_volume_detaches_from_the_old_node_first(api, world, operator, cluster):
    start(operator)
    n0, n1 = kwok_nodes(cluster)[:2]
    pool = world.pool(nodes=[n0, n1])
    claim, pv, handle = world.volume(0, pool=pool)
    unique = unique_volume_name(POOL_DRIVER, handle)
    world.pod("old", n0, claim)
    old_va = world.wait_attached(pv, n0, handle)["metadata"]["name"]
    new_va = volume_attachment_name(handle, POOL_DRIVER, n1)
    if not world.fake_kubelets:
        # n0's real kubelet lists the volume in use; the move must wait until it stops
        wait_for(lambda: unique in world.in_use(n0), timeout=60,
                 message=f"{n0}'s kubelet reports {unique} in volumesInUse")
        samples = DetachSampler(world, pv, handle, unique, n0, n1)
        world.delete_pod("old")
        world.pod("new", n1, claim)
        world.wait_attached(pv, n1, handle, timeout=90)
        samples.close()
        samples.assert_safe()
        return
    # kwok: no kubelet; the test plays n0's, which still has it mounted
    patch_status(api, f"/api/v1/nodes/{n0}", {"status": {"volumesInUse": [unique]}})
    watch = VAWatch(api)
    try:
        world.delete_pod("old")
        world.pod("new", n1, claim)
        holds_for(lambda: world.va_for(pv, n1, handle) is None and
                  world.va_for(pv, n0, handle) is not None, duration=4,
                  message="no attachment on the new node while the old one is mounted")
        patch_status(api, f"/api/v1/nodes/{n0}", {"status": {"volumesInUse": None}})
        world.wait_attached(pv, n1, handle, timeout=30)
        assert world.va_for(pv, n0, handle) is None
        wait_for(lambda: any(t == "DELETED" and n == old_va for t, n, _ in watch.events),
                 timeout=10, message="old attachment DELETED event")
        order = [(t, n) for t, n, _ in watch.events if n in (old_va, new_va)]
        deleted_at = order.index(("DELETED", old_va))
        added_at = order.index(("ADDED", new_va))
        assert deleted_at < added_at, order
    finally:
        watch.close()
        patch_status(api, f"/api/v1/nodes/{n0}", {"status": {"volumesInUse": None}})


class DetachSampler:
    """Samples, every 0.2 s in a thread, what a real kubelet reports (volumesInUse of the
    old node) and the attachments of one volume on the old and the new node, so a test
    can check the controller's order against the kubelet: no detach starts while the
    old node lists the volume in use, and the new node gets no attachment before the
    old one is gone."""

    def __init__(self, world, pv: str, handle: str, unique: str, old: str, new: str | None):
        self.world, self.pv, self.handle, self.unique = world, pv, handle, unique
        self.old, self.new = old, new
        self.samples: list[tuple[float, bool, str, bool]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                in_use = self.unique in self.world.in_use(self.old)
                va = self.world.va_for(self.pv, self.old, self.handle)
                old = ("gone" if va is None else
                       "detaching" if va["metadata"].get("deletionTimestamp") else "attached")
                new = bool(self.new and self.world.va_for(self.pv, self.new, self.handle))
                self.samples.append((time.monotonic(), in_use, old, new))
            except requests.RequestException:
                pass
            time.sleep(0.2)

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)

    def assert_safe(self):
        assert self.samples, "no samples"
        for t, in_use, old, new in self.samples:
            assert not (in_use and old != "attached"), (
                f"detach from {self.old} started while its kubelet listed the volume in use "
                f"(t={t:.1f}): {self.samples}")
            assert not (new and old != "gone"), (
                f"attached on {self.new} before the old attachment was gone: {self.samples}")
        assert any(in_use for _, in_use, _, _ in self.samples) or self.samples[0][2] != "gone", \
            "sampling started too late to see the old node's state"


def test_two_pods_on_two_nodes_with_one_rwo_claim(api, world, operator, cluster):
    start(operator)
    n0, n1 = kwok_nodes(cluster)[:2]
    pool = world.pool(nodes=[n0, n1])
    claim, pv, handle = world.volume(0, pool=pool)
    world.pod("first", n0, claim)
    world.wait_attached(pv, n0, handle)
    world.pod("second", n1, claim)

    def multi_attach_event():
        evs = [e for e in events_for(api, world.ns, "second", "Pod")
               if e["reason"] == "FailedAttachVolume"]
        return evs or None
    evs = wait_for(multi_attach_event, timeout=20, message="Multi-Attach event on second")
    assert evs[0]["message"] == (
        f'Waiting for detach for volume "{pv}" Volume is already used by pod(s) first')
    assert evs[0]["source"]["component"] == "attachdetach-controller"
    holds_for(lambda: len(world.my_vas()) == 1, duration=3, message="one attachment only")
    assert world.va_for(pv, n1, handle) is None
    # reported once (deduplicated), not once per sync
    time.sleep(2)
    evs = [e for e in events_for(api, world.ns, "second", "Pod")
           if e["reason"] == "FailedAttachVolume"]
    assert len(evs) == 1 and evs[0].get("count", 1) == 1


def test_two_pvs_on_one_volume_handle_are_one_volume(api, world, operator, cluster):
    """Upstream's identity is the unique volume name kubernetes.io/csi/<driver>^<handle>:
    two PVs on one handle used by pods on two nodes get one attachment and the
    multi-attach event; a pod of the other PV on the same node shares the attachment, and
    the first pod going does not detach it."""
    start(operator)
    n0, n1 = kwok_nodes(cluster)[:2]
    pool = world.pool(nodes=[n0, n1])
    c0, pv0, handle = world.volume(0, pool=pool)
    c1, pv1, _ = world.volume(1, pool=pool, handle=handle)
    world.pod("first", n0, c0)
    world.wait_attached(pv0, n0, handle)
    world.pod("second", n1, c1)

    def multi_attach_event():
        return [e for e in events_for(api, world.ns, "second", "Pod")
                if e["reason"] == "FailedAttachVolume"] or None
    evs = wait_for(multi_attach_event, timeout=20, message="FailedAttachVolume on second")
    assert evs[0]["message"] == (
        f'Waiting for detach for volume "{pv1}" Volume is already used by pod(s) first')
    holds_for(lambda: len(world.my_vas()) == 1, duration=3, message="one attachment only")
    assert world.va_for(pv1, n1, handle) is None

    world.delete_pod("second")
    world.pod("third", n0, c1)  # the other PV, the same node: the same attachment
    world.delete_pod("first")
    holds_for(lambda: len(world.my_vas()) == 1
              and (world.va_for(pv0, n0, handle) or {}).get("status", {}).get("attached")
              and not world.va_for(pv0, n0, handle)["metadata"].get("deletionTimestamp"),
              duration=5, message="pod third still has its attachment")


def test_volume_in_use_stays_attached_until_unmounted(api, world, operator, cluster):
    start(operator)
    node = kwok_nodes(cluster)[2]
    pool = world.pool(nodes=[node])
    claim, pv, handle = world.volume(0, pool=pool)
    unique = unique_volume_name(POOL_DRIVER, handle)
    world.pod("p", node, claim)
    world.wait_attached(pv, node, handle)
    if not world.fake_kubelets:
        # the real kubelet reports the volume in use, in the format the controller reads
        wait_for(lambda: unique in world.in_use(node), timeout=60,
                 message=f"{node}'s kubelet reports {unique} in volumesInUse")
        samples = DetachSampler(world, pv, handle, unique, node, None)
        world.delete_pod("p")
        world.wait_no_va(pv, timeout=90)
        samples.close()
        samples.assert_safe()
        return
    patch_status(api, f"/api/v1/nodes/{node}", {"status": {"volumesInUse": [unique]}})
    try:
        world.delete_pod("p")
        wait_for(lambda: pykube.Pod.objects(api, namespace=world.ns).get_or_none(name="p")
                 is None, timeout=30, message="pod gone")
        holds_for(lambda: world.va_for(pv, node, handle) is not None, duration=5,
                  message="attachment kept while the node lists the volume in use")
        patch_status(api, f"/api/v1/nodes/{node}", {"status": {"volumesInUse": None}})
        world.wait_no_va(pv, timeout=15)
    finally:
        patch_status(api, f"/api/v1/nodes/{node}", {"status": {"volumesInUse": None}})


def test_out_of_service_taint_detaches_at_once(api, world, operator, cluster):
    start(operator)
    node = world.fake_node()
    pool = world.pool(nodes=[node])
    claim, pv, handle = world.volume(0, pool=pool)
    unique = unique_volume_name(POOL_DRIVER, handle)
    world.pod("p", node, claim)
    world.wait_attached(pv, node, handle)
    patch_status(api, f"/api/v1/nodes/{node}", {"status": {"volumesInUse": [unique]}})
    world.delete_pod("p")
    wait_for(lambda: pykube.Pod.objects(api, namespace=world.ns).get_or_none(name="p") is None,
             timeout=30, message="pod gone")
    holds_for(lambda: world.va_for(pv, node, handle) is not None, duration=2,
              message="attachment kept while in use")
    t0 = time.monotonic()
    patch(api, f"/api/v1/nodes/{node}", {"spec": {"taints": [
        {"key": "volplane.io/e2e", "effect": "NoSchedule"},
        {"key": OUT_OF_SERVICE_TAINT, "value": "shutdown", "effect": "NoExecute"}]}})
    world.wait_no_va(pv, timeout=15)
    assert time.monotonic() - t0 < 10


def test_not_ready_node_is_force_detached_after_the_max_wait(api, world, operator, cluster):
    """A node no kubelet (nor kwok) keeps Ready: NotReady + in use + max wait passed."""
    port = free_port()
    start(operator, *operator_args(metrics_port=port), env={"VOLPLANE_UNMOUNT_MAX_WAIT": "6"})
    node = f"{world.tag}-dead"
    create(api, {"apiVersion": "v1", "kind": "Node",
                 "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node},
                              "annotations": {MANAGED_ANNOTATION: "true"}},
                 "spec": {"taints": [{"key": "volplane.io/e2e", "effect": "NoSchedule"}]}})
    world.nodes.append(node)
    patch_status(api, f"/api/v1/nodes/{node}", {"status": {"conditions": [
        {"type": "Ready", "status": "False", "reason": "KubeletNotReady", "message": "e2e",
         "lastHeartbeatTime": "2024-01-01T00:00:00Z",
         "lastTransitionTime": "2024-01-01T00:00:00Z"}]}})
    pool = world.pool(nodes=[node])
    claim, pv, handle = world.volume(0, pool=pool)
    unique = unique_volume_name(POOL_DRIVER, handle)
    world.pod("p", node, claim)  # no kubelet: stays Pending, but it is scheduled
    world.wait_attached(pv, node, handle)
    patch_status(api, f"/api/v1/nodes/{node}", {"status": {"volumesInUse": [unique]}})
    before = sum(v for k, v in metric_values(
        port, "attachdetach_controller_forced_detaches_total").items()
        if 'reason="timeout"' in k)
    world.delete_pod("p")  # grace 0 on a node with no kubelet: gone at once
    t0 = time.monotonic()
    holds_for(lambda: world.va_for(pv, node, handle) is not None, duration=3,
              message="attachment kept before the max wait for unmount")
    world.wait_no_va(pv, timeout=20)
    assert time.monotonic() - t0 >= 5
    after = sum(v for k, v in metric_values(
        port, "attachdetach_controller_forced_detaches_total").items()
        if 'reason="timeout"' in k)
    assert after == before + 1


def test_deleting_a_node_cleans_up_its_attachments_within_seconds(api, world, operator,
                                                                 cluster):
    start(operator)
    node = world.fake_node()
    pool = world.pool(nodes=[node])
    claim, pv, handle = world.volume(0, pool=pool)
    unique = unique_volume_name(POOL_DRIVER, handle)
    world.pod("p", node, claim)
    world.wait_attached(pv, node, handle)
    # even a volume the node reported in use: the node is gone
    patch_status(api, f"/api/v1/nodes/{node}", {"status": {"volumesInUse": [unique]}})
    t0 = time.monotonic()
    delete_quietly(pykube.Node.objects(api).get_by_name(node))
    world.wait_no_va(pv, timeout=15)
    assert time.monotonic() - t0 < 10


def test_foreign_attachable_driver_gets_attachments_and_non_attachable_none(api, world,
                                                                           operator, cluster):
    start(operator)
    node = kwok_nodes(cluster)[1]
    attachable = world.csidriver(True)
    plain = world.csidriver(False)
    claim_a, pv_a, handle_a = world.volume(0, driver=attachable)
    claim_b, pv_b, handle_b = world.volume(1, driver=plain)
    world.pod("a", node, claim_a)
    world.pod("b", node, claim_b)
    name = volume_attachment_name(handle_a, attachable, node)
    va = wait_for(lambda: world.va_for(pv_a, node, handle_a, attachable), timeout=20,
                  message="VolumeAttachment for the foreign driver")
    assert va["metadata"]["name"] == name
    assert va["spec"] == {"attacher": attachable, "nodeName": node,
                          "source": {"persistentVolumeName": pv_a}}
    assert not (va.get("status") or {}).get("attached")
    unique = unique_volume_name(attachable, handle_a)
    assert unique not in world.reported(node)
    # the pool attacher leaves it alone; "its attacher" (this test) reports an error first
    patch_status(api, f"/apis/storage.k8s.io/v1/volumeattachments/{name}",
                 {"status": {"attached": False,
                             "attachError": {"time": "2024-01-01T00:00:00Z",
                                             "message": "rpc error: disk busy"}}})

    def attach_failed_event():
        return [e for e in events_for(api, world.ns, "a", "Pod")
                if e["reason"] == "FailedAttachVolume"] or None
    evs = wait_for(attach_failed_event, timeout=15, message="FailedAttachVolume on pod a")
    assert evs[0]["message"] == (
        f'AttachVolume.Attach failed for volume "{pv_a}" : rpc error: disk busy')
    patch_status(api, f"/apis/storage.k8s.io/v1/volumeattachments/{name}",
                 {"status": {"attached": True, "attachError": None,
                             "attachmentMetadata": {"devicePath": "/dev/foreign"}}})
    wait_for(lambda: world.reported(node).get(unique) == "", timeout=15,
             message="node reports the foreign volume attached (devicePath \"\" as upstream)")
    holds_for(lambda: not [v for v in world.my_vas().values()
                           if v["spec"]["attacher"] == plain], duration=3,
              message="no attachment for an attachRequired: false driver")
    world.delete_pod("a")
    world.wait_no_va(pv_a, timeout=15)  # no finalizer: the delete is the detach
    wait_for(lambda: unique not in world.reported(node), timeout=15, message="report cleared")


def test_slot_exhaustion_gives_a_clear_error_and_recovers(api, world, operator, cluster):
    start(operator)
    node = kwok_nodes(cluster)[3]
    pool = world.pool(nodes=[node], slots=2)
    vols = [world.volume(i, pool=pool) for i in range(3)]
    for i, (claim, _, _) in enumerate(vols[:2]):
        world.pod(f"p{i}", node, claim)
    for _, pv, handle in vols[:2]:
        world.wait_attached(pv, node, handle)
    world.pod("p2", node, vols[2][0])
    message = f"node {node} has no free device slot (2/2 in use on pool {pool})"

    def failing():
        va = world.va_for(vols[2][1], node, vols[2][2])
        err = ((va or {}).get("status") or {}).get("attachError") or {}
        return err.get("message") == message
    wait_for(failing, timeout=20, message="attachError for the third volume")
    wait_for(lambda: any(e["reason"] == "FailedAttachVolume" and message in e["message"]
                         for e in events_for(api, world.ns, "p2", "Pod")),
             timeout=15, message="FailedAttachVolume event on p2")
    world.delete_pod("p0")
    va = world.wait_attached(vols[2][1], node, vols[2][2],
                             timeout=20 if world.fake_kubelets else 90)
    assert va["metadata"]["annotations"][SLOT_ANNOTATION] in ("0", "1")
    slots = sorted(v["metadata"]["annotations"][SLOT_ANNOTATION]
                   for v in world.my_vas().values())
    assert slots == ["0", "1"]


def test_reattaching_right_after_a_detach_never_waits_on_a_stale_attachment(api, world,
                                                                            operator,
                                                                            cluster):
    """A pod deleted and another started with the same claim on the same node reuse the
    attachment's name. The attach/detach controller's DELETE response can be processed
    after the pool attacher has detached the attachment and the watch has reported it
    gone (CPU load makes that rare; VOLPLANE_DELAY_AT makes it certain). That stale
    response must not put the attachment back in the cache: it used to, as "detaching",
    for good, and the new pod waited forever (the flaky crash test, issue 15)."""
    start(operator, env={"VOLPLANE_DELAY_AT": "detach-response=1.0"})
    node = kwok_nodes(cluster)[0]
    pool = world.pool(nodes=[node])
    claim, pv, handle = world.volume(0, pool=pool)
    for i in range(3):
        world.pod(f"p{i}", node, claim)
        world.wait_attached(pv, node, handle, timeout=30)
        world.delete_pod(f"p{i}")
        world.wait_no_va(pv, timeout=30)
    world.pod("last", node, claim)
    world.wait_attached(pv, node, handle, timeout=30)


# ----------------------------------------------------------------------------- crash safety
class OperatorDied(Exception):
    pass


def assert_converged(api, world, pool: str, running: dict[str, tuple[str, str, str]],
                     timeout: float = 90, operator=None) -> None:
    """running: pod -> (node, pv, handle). Every running pod's volume attached on its node
    under the upstream name, nothing else attached, slots unique, node reports exact.
    `operator`: fail at once if it exits meanwhile. A timeout says which attachment is
    missing, extra or unattached, and how the operator's log ends."""
    want = {volume_attachment_name(h, POOL_DRIVER, n): (pv, n) for n, pv, h in running.values()}

    def converged():
        if operator is not None and not operator.running:
            raise OperatorDied(f"operator exited ({operator.returncode}) before "
                               f"converging; {operator.log_path}:\n{operator.tail()}")
        vas = world.my_vas()
        if set(vas) != set(want):
            return None
        if not all((v.get("status") or {}).get("attached") for v in vas.values()):
            return None
        return vas

    try:
        vas = wait_for(converged, timeout=timeout, interval=0.5,
                       message=f"{len(want)} attachments exactly, all attached")
    except TimeoutError as e:
        vas = world.my_vas()
        state = {n: ("missing" if n not in vas else {
            "attached": (vas[n].get("status") or {}).get("attached"),
            "slot": (vas[n]["metadata"].get("annotations") or {}).get(SLOT_ANNOTATION),
            "deleting": bool(vas[n]["metadata"].get("deletionTimestamp")),
            "attachError": ((vas[n].get("status") or {}).get("attachError") or {}).get(
                "message")}) for n in want}
        state.update({n: "extra" for n in set(vas) - set(want)})
        tail = f"\n{operator.log_path}:\n{operator.tail(15)}" if operator is not None else ""
        raise TimeoutError(f"{e}; attachments (name -> state): {state}{tail}") from None
    seen = {}
    for name, v in vas.items():
        slot = (v["spec"]["nodeName"], v["metadata"]["annotations"][SLOT_ANNOTATION])
        assert slot not in seen, f"slot {slot} held by {seen[slot]} and {name}"
        seen[slot] = name
        assert v["status"]["attachmentMetadata"]["devicePath"] == (
            f"/dev/volplane/{pool}/slot-{slot[1]}")
    for node in {n for n, _, _ in running.values()}:
        expected = {unique_volume_name(POOL_DRIVER, h) for n, _, h in running.values()
                    if n == node}
        wait_for(lambda n=node, e=expected: set(world.reported(n)) >= e and not [
            u for u in world.reported(n) if u.endswith(tuple(world.pvs)) and u not in e],
                 timeout=20, message=f"{node} reports exactly its attachments")


def metric_values(port: int, name: str) -> dict[tuple, float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line[len(name) + 1:].rpartition("} ")
            out[tuple(sorted(labels.split(",")))] = float(value)
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_9_during_a_burst_of_pod_starts_and_deletes(api, world, operator, cluster):
    port = free_port()
    args = operator_args(metrics_port=port)
    start(operator, *args)
    nodes = kwok_nodes(cluster)
    pool = world.pool(nodes=nodes, slots=40)
    n_pods = 100
    with ThreadPoolExecutor(16) as ex:
        vols = list(ex.map(lambda i: world.volume(i, pool=pool), range(n_pods)))
    placement = {f"p{i}": (nodes[i % len(nodes)], vols[i][1], vols[i][2]) for i in range(n_pods)}

    def start_pod(i):
        world.pod(f"p{i}", nodes[i % len(nodes)], vols[i][0])

    with ThreadPoolExecutor(16) as ex:
        futures = [ex.submit(start_pod, i) for i in range(n_pods)]
        wait_for(lambda: len(world.my_vas()) >= 20, timeout=60, interval=0.05,
                 message="the burst under way")
        operator.kill(signal.SIGKILL)
        for f in futures:
            f.result()
    start(operator, *args)
    # let it catch up a little, then delete every other pod, with a second kill -9 in
    # the middle of the detaches
    wait_for(lambda: sum(1 for v in world.my_vas().values()
                         if (v.get("status") or {}).get("attached")) >= 60,
             timeout=60, message="most volumes attached again")
    gone = [f"p{i}" for i in range(0, n_pods, 2)]
    with ThreadPoolExecutor(16) as ex:
        futures = [ex.submit(world.delete_pod, p) for p in gone]
        wait_for(lambda: len(world.my_vas()) <= n_pods - 10, timeout=60, interval=0.05,
                 message="the detaches under way")
        operator.kill(signal.SIGKILL)
        for f in futures:
            f.result()
    start(operator, *args)
    running = {p: v for p, v in placement.items() if p not in gone}
    assert_converged(api, world, pool, running, timeout=120, operator=operator)
    # desired and actual states agree
    def agree():
        vals = metric_values(port, "attachdetach_controller_total_volumes")
        desired = sum(v for k, v in vals.items() if 'state="desired_state_of_world"' in k
                      and f'plugin_name="kubernetes.io/csi:{POOL_DRIVER}"' in k)
        actual = sum(v for k, v in vals.items() if 'state="actual_state_of_world"' in k
                     and f'plugin_name="kubernetes.io/csi:{POOL_DRIVER}"' in k)
        return desired == actual == len(running)
    wait_for(agree, timeout=30, message="desired == actual == running pods in the metrics")


CRASH_POINTS = ["attach-1", "pool-attach-1", "pool-attach-2",
                "detach-1", "detach-2", "pool-detach-1", "pool-detach-2"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_between_writes_converges(api, world, operator, cluster, point):
    nodes = kwok_nodes(cluster)[:2]
    pool = world.pool(nodes=nodes, slots=4)
    vols = [world.volume(i, pool=pool) for i in range(4)]
    placement = {f"p{i}": (nodes[i % 2], vols[i][1], vols[i][2]) for i in range(4)}
    crash_env = {"VOLPLANE_CRASH_AT": point}
    attach_phase = "attach" in point and "detach" not in point
    start(operator, env=crash_env if attach_phase else None)
    for i in range(4):
        world.pod(f"p{i}", nodes[i % 2], vols[i][0])
    if attach_phase:
        wait_for(lambda: not operator.running, timeout=30, message=f"crash at {point}")
        assert operator.returncode == 86
        start(operator)
    assert_converged(api, world, pool, placement, operator=operator)
    if not attach_phase:
        operator.stop()
        start(operator, env=crash_env)
    for p in ("p0", "p1"):
        world.delete_pod(p)
    if not attach_phase:
        wait_for(lambda: not operator.running, timeout=30, message=f"crash at {point}")
        assert operator.returncode == 86
        start(operator)
    running = {p: v for p, v in placement.items() if p not in ("p0", "p1")}
    assert_converged(api, world, pool, running, operator=operator)
    # freed slots are reusable: two more pods fit in the 4 slots per node
    for i in (0, 1):
        world.pod(f"q{i}", nodes[i % 2], vols[i][0])
    running.update({f"q{i}": placement[f"p{i}"] for i in (0, 1)})
    assert_converged(api, world, pool, running, operator=operator)

