"""Regression tests for what users of peer projects hit (issue 15, "known failures of peers").

Each test re-enacts one failure reported against an upstream controller or a CSI
provisioner/attacher (external-provisioner, local-static-provisioner, TopoLVM, the
in-tree attach/detach controller) and checks that volplane does not have it:

1. a burst of WaitForFirstConsumer claims for one node over-commits it on stale capacity;
2. CSIStorageCapacity missing for a node added while the driver runs (until a restart);
3. allocation records leaking after their node is deleted;
4. a claim stuck Terminating after an event the controller missed (it was down);
5. no re-schedule when the scheduler's selected node has no room;
6. VolumeAttachments left on a deleted node block the moved pod (Multi-Attach);
7. Released PVs whose node was deleted never cleaned up;
8. node.status.volumesAttached keeps volumes nobody attaches any more.

One of them found a bug, fixed with its test: the record of a provisioning cut short
(operator killed between the allocation record and the PV) whose selected node, the
pool's only one, was deleted meanwhile held its space and kept the claim pinned to the
gone node (test_allocation_of_a_provisioning_cut_short_on_a_deleted_node_is_freed).
Each test was seen failing with the behaviour it guards broken in the operator.

They run on the local control plane: the nodes are kwok nodes each test makes for
itself (kwok keeps them Ready, pods on them go Running, no kubelet reports
volumesInUse), so a test can add and delete nodes without touching the shared ones.
The nodes carry a NoSchedule taint that only these tests' pods tolerate. Everything a
test makes is named after its namespace and removed afterwards (`Peers.cleanup`).
"""

from __future__ import annotations

import json
import threading

import pytest

from volplane.attach.names import unique_volume_name, volume_attachment_name
from volplane.kinds import MANAGED_ANNOTATION

from .helpers import (
    CAPACITY_NAMESPACE,
    POOL_API,
    POOL_DRIVER,
    events_for,
    holds_for,
    kcreate,
    kdelete,
    kget,
    klist,
    kpatch,
    kpatch_response,
    phase,
    wait_for,
)

GI = 1024**3
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
SELECTED_NODE = "volume.kubernetes.io/selected-node"
HOSTNAME = "kubernetes.io/hostname"
TAINT_KEY = "volplane.io/e2e"
RETAINED = "volplane.io/retained"
# No metrics or health port: nothing here reads them, and a port picked free can be taken
# by another process before the operator binds it.
OPERATOR_ARGS = ("--metrics-port", "0", "--health-port", "0", "--bind-address", "127.0.0.1",
                 "--resync-period", "5", "--no-leader-elect")


@pytest.fixture(scope="module", autouse=True)
def _kwok_only(cluster):
    if not cluster.nodes.fake_kubelets:
        pytest.skip("the peer-failure tests add and delete nodes of their own: they need kwok "
                    "(the local control plane)")


# ----------------------------------------------------------------------------- the world


class Peers:
    """One test's nodes, pools, classes, claims and pods, and their cleanup."""

    def __init__(self, api, namespace: str, operator):
        self.api = api
        self.ns = namespace
        self.operator = operator
        self.nodes: list[str] = []
        self.pools: list[str] = []
        self.classes: list[str] = []

    def name(self, suffix: str) -> str:
        return f"{self.ns}-{suffix}"

    # -- the operator
    def start(self):
        """Starts (or starts again) the operator and waits for its caches."""
        if self.operator.running:
            raise RuntimeError("operator already running")
        if self.operator.starts:
            self.operator.restart(*OPERATOR_ARGS, env={})
        else:
            self.operator.start(*OPERATOR_ARGS)
        return self.operator.wait_ready(timeout=90)

    def stop(self) -> None:
        """SIGKILL: the operator misses everything until the next start()."""
        self.operator.kill()

    # -- objects
    def node(self, suffix: str, labels: dict | None = None) -> str:
        """A Node kwok keeps Ready (pods on it go Running), tainted for these tests only."""
        name = self.name(suffix)
        kcreate(self.api, {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name,
                         "labels": {"type": "kwok-e2e", HOSTNAME: name, **(labels or {})},
                         "annotations": {"kwok.x-k8s.io/node": "fake",
                                         MANAGED_ANNOTATION: "true"}},
            "spec": {"taints": [{"key": TAINT_KEY, "effect": "NoSchedule"}]}})
        self.nodes.append(name)

        def ready():
            node = kget(self.api, "Node", name) or {}
            return any(c["type"] == "Ready" and c["status"] == "True"
                       for c in (node.get("status") or {}).get("conditions") or ())
        wait_for(ready, timeout=30, message=f"node {name} Ready")
        return name

    def delete_node(self, name: str) -> None:
        kdelete(self.api, "Node", name)
        wait_for(lambda: kget(self.api, "Node", name) is None, timeout=30,
                 message=f"node {name} gone")

    def pool(self, suffix: str, capacity: str, *, names=None, selector=None, labels=None,
             **spec) -> str:
        name = self.name(suffix)
        nodes: dict = {}
        if names:
            nodes["names"] = list(names)
        if selector:
            nodes["selector"] = selector
        kcreate(self.api, {"apiVersion": POOL_API, "kind": "StoragePool",
                           "metadata": {"name": name, "labels": labels or {}},
                           "spec": {"capacity": capacity, "nodes": nodes, **spec}})
        self.pools.append(name)
        return name

    def storage_class(self, suffix: str, *, binding: str = "Immediate",
                      reclaim: str = "Delete", parameters: dict | None = None) -> str:
        name = self.name(suffix)
        kcreate(self.api, {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                           "metadata": {"name": name}, "provisioner": POOL_DRIVER,
                           "parameters": parameters or {}, "volumeBindingMode": binding,
                           "reclaimPolicy": reclaim})
        self.classes.append(name)
        return name

    def claim(self, name: str, size: str, storage_class: str, annotations=None) -> dict:
        return kcreate(self.api, {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": self.ns,
                         "annotations": annotations or {}},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": storage_class,
                     "resources": {"requests": {"storage": size}}}})

    def pod(self, name: str, claim: str, *, node: str | None = None,
            on: list[str] | None = None, prefer: str | None = None) -> dict:
        """A pod using `claim`: bound to `node` (no scheduler), or placed by the scheduler
        on one of the nodes `on` (preferring `prefer`)."""
        spec: dict = {
            "terminationGracePeriodSeconds": 0,
            "tolerations": [{"key": TAINT_KEY, "operator": "Exists"}],
            "containers": [{"name": "main", "image": PAUSE_IMAGE,
                            "volumeMounts": [{"name": "d", "mountPath": "/d"}]}],
            "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": claim}}]}
        if node:
            spec["nodeName"] = node
        affinity: dict = {}
        if on:
            affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": HOSTNAME, "operator": "In", "values": on}]}]}
        if prefer:
            affinity["preferredDuringSchedulingIgnoredDuringExecution"] = [{
                "weight": 100, "preference": {"matchExpressions": [
                    {"key": HOSTNAME, "operator": "In", "values": [prefer]}]}}]
        if affinity:
            spec["affinity"] = {"nodeAffinity": affinity}
        return kcreate(self.api, {"apiVersion": "v1", "kind": "Pod",
                                  "metadata": {"name": name, "namespace": self.ns},
                                  "spec": spec})

    def delete_pod(self, name: str) -> None:
        r = self.api.session.delete(f"{self.api.url}/api/v1/namespaces/{self.ns}/pods/{name}",
                                    data=json.dumps({"gracePeriodSeconds": 0}), timeout=30)
        if r.status_code not in (200, 202, 404):
            r.raise_for_status()

    # -- questions
    def claim_obj(self, name: str) -> dict | None:
        return kget(self.api, "PersistentVolumeClaim", name, self.ns)

    def phase(self, claim: str) -> str | None:
        return phase(self.claim_obj(claim))

    def volume_of(self, claim: str) -> str:
        return self.claim_obj(claim)["spec"]["volumeName"]

    def bound(self, *claims: str, timeout: float = 60) -> list[str]:
        """Waits until the claims are Bound; returns their PV names."""
        wait_for(lambda: all(self.phase(c) == "Bound" for c in claims), timeout=timeout,
                 message=f"claims {', '.join(claims)} Bound")
        return [self.volume_of(c) for c in claims]

    def pod_obj(self, name: str) -> dict | None:
        return kget(self.api, "Pod", name, self.ns)

    def records(self, pool: str) -> dict[str, dict]:
        return {r["metadata"]["name"]: r for r in klist(self.api, "StorageAllocation")
                if r["spec"]["pool"] == pool}

    def pvs(self, pool: str) -> dict[str, dict]:
        return {pv["metadata"]["name"]: pv for pv in klist(self.api, "PersistentVolume")
                if ((pv["spec"].get("csi") or {}).get("volumeHandle") or "").startswith(
                    pool + "/")}

    def pool_status(self, pool: str) -> dict:
        return (kget(self.api, "StoragePool", pool) or {}).get("status") or {}

    def capacities(self, storage_class: str) -> list[dict]:
        return [c for c in klist(self.api, "CSIStorageCapacity", CAPACITY_NAMESPACE)
                if c.get("storageClassName") == storage_class]

    def attachments(self, pv: str) -> dict[str, dict]:
        """VolumeAttachments of a PV, by node."""
        return {va["spec"]["nodeName"]: va for va in klist(self.api, "VolumeAttachment")
                if (va["spec"].get("source") or {}).get("persistentVolumeName") == pv}

    def reported(self, node: str) -> list[str]:
        st = (kget(self.api, "Node", node) or {}).get("status") or {}
        return sorted(e["name"] for e in st.get("volumesAttached") or ())

    def events(self, kind: str, name: str, reason: str) -> list[dict]:
        namespace = self.ns if kind in ("PersistentVolumeClaim", "Pod") else None
        return [e for e in events_for(self.api, namespace, name, kind=kind)
                if e["reason"] == reason]

    # -- cleanup
    def cleanup(self) -> None:
        api = self.api
        for p in klist(api, "Pod", self.ns):
            self.delete_pod(p["metadata"]["name"])
        for c in klist(api, "PersistentVolumeClaim", self.ns):
            kdelete(api, "PersistentVolumeClaim", c["metadata"]["name"], self.ns)
        if self.operator.running:  # let it detach and reclaim what it can
            try:
                wait_for(lambda: not any(self.pvs(p) for p in self.pools), timeout=20,
                         message="pool PVs reclaimed")
            except TimeoutError:
                pass
        self.operator.teardown()
        mine = {n for p in self.pools for n in self.pvs(p)}
        for va in klist(api, "VolumeAttachment"):
            if (va["spec"].get("source") or {}).get("persistentVolumeName") in mine:
                kdelete(api, "VolumeAttachment", va["metadata"]["name"])
                kpatch_response(api, "VolumeAttachment", va["metadata"]["name"],
                                {"metadata": {"finalizers": None}})
        for name in mine:
            kdelete(api, "PersistentVolume", name)
            kpatch_response(api, "PersistentVolume", name, {"metadata": {"finalizers": None}})
        for pool in self.pools:
            for rec in self.records(pool):
                kdelete(api, "StorageAllocation", rec)
            kdelete(api, "StoragePool", pool)
        for cap in klist(api, "CSIStorageCapacity", CAPACITY_NAMESPACE):
            if (cap["metadata"].get("annotations") or {}).get("volplane.io/pool") in self.pools:
                kdelete(api, "CSIStorageCapacity", cap["metadata"]["name"], CAPACITY_NAMESPACE)
        for cls in self.classes:
            kdelete(api, "StorageClass", cls)
        for node in self.nodes:
            kdelete(api, "Node", node)


@pytest.fixture
def peers(api, namespace, operator):
    world = Peers(api, namespace, operator)
    yield world
    world.cleanup()


def _ledger(peers: Peers, pool: str) -> tuple[int, int, int]:
    """(Σ allocation records, Σ sizes of the pool's PVs, the pool's status.allocatedBytes)."""
    recs = sum(r["spec"]["sizeBytes"] for r in peers.records(pool).values())
    pvs = 0
    for pv in peers.pvs(pool).values():
        size = pv["spec"]["capacity"]["storage"]
        pvs += int(size[:-2]) * GI if size.endswith("Gi") else int(size)
    return recs, pvs, peers.pool_status(pool).get("allocatedBytes", -1)


# ----------------------------------------------------------------------------- 1


def test_burst_of_wffc_claims_for_one_node_never_overcommits_its_pool(api, peers):
    """external-provisioner/TopoLVM: pods created at once are all scheduled onto a node
    whose published capacity is stale (the scheduler does not count the volumes it has
    just asked for), and a provisioner that trusts that capacity over-commits the node.

    Twelve 1Gi claims and their pods, pinned to one node whose only pool holds 5Gi, all
    created at once. The capacity the scheduler reads is made certainly stale (the
    operator is down while they are created, so it still says 5Gi for every pod): the
    scheduler selects the node for all twelve. The operator, started, provisions exactly
    five; the pool's ledger never goes over 5Gi (sampled throughout); the other seven
    are given back to the scheduler with a "pool full" event and stay Pending."""
    node = peers.node("burst")
    pool = peers.pool("burst", "5Gi", names=[node])
    cls = peers.storage_class("burst", binding="WaitForFirstConsumer",
                              parameters={"pool": pool})
    peers.start()
    wait_for(lambda: [c for c in peers.capacities(cls) if c["capacity"] == "5Gi"],
             timeout=30, message="CSIStorageCapacity of the pool published (5Gi)")
    peers.stop()

    names = [f"b{i:02d}" for i in range(12)]

    def make(name):
        peers.claim(name, "1Gi", cls)
        peers.pod(name, name, on=[node])

    threads = [threading.Thread(target=make, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    def selected(name):
        claim = peers.claim_obj(name) or {}
        return (claim.get("metadata", {}).get("annotations") or {}).get(SELECTED_NODE) == node

    wait_for(lambda: all(selected(n) for n in names), timeout=30,
             message=f"the scheduler selects {node} for all 12 claims on the stale 5Gi")

    peers.start()
    peaks = {"records": 0, "status": 0}

    def settled():
        recs, pvs, status = _ledger(peers, pool)
        peaks["records"] = max(peaks["records"], recs)
        peaks["status"] = max(peaks["status"], status)
        bound = [n for n in names if peers.phase(n) == "Bound"]
        return len(bound) == 5 and recs == pvs == status == 5 * GI and bound

    try:
        bound = wait_for(settled, timeout=90, interval=0.5,
                         message="5 claims Bound, the pool exactly full")
    finally:
        assert max(peaks.values()) <= 5 * GI, f"the 5Gi pool was over-committed: {peaks}"
    pending = [n for n in names if n not in bound]

    def given_back(name):
        return [e for e in peers.events("PersistentVolumeClaim", name, "ProvisioningFailed")
                if f'pool "{pool}" full' in e["message"]
                and f"removed annotation {SELECTED_NODE}" in e["message"]]

    wait_for(lambda: all(given_back(n) for n in pending), timeout=30, interval=1.0,
             message="every claim left over says the pool is full and gave the node back")
    holds_for(lambda: [n for n in names if peers.phase(n) == "Bound"] == bound
              and _ledger(peers, pool) == (5 * GI, 5 * GI, 5 * GI), 3,
              message="five Bound, the ledger exactly 5Gi")
    for n in pending:
        assert peers.phase(n) == "Pending"
        assert phase(peers.pod_obj(n)) == "Pending"
    # sampled every 0.5 s from the start on: never more than the pool holds
    assert peaks == {"records": 5 * GI, "status": 5 * GI}, peaks
    for n in bound:
        assert peers.pod_obj(n)["spec"]["nodeName"] == node


# ----------------------------------------------------------------------------- 2


def test_capacity_is_published_for_a_node_added_while_running(api, peers):
    """external-provisioner (distributed provisioning) published no CSIStorageCapacity
    for a node that joined after it started, until it was restarted: pods needing that
    node's storage stayed unschedulable.

    A pool selecting nodes by label; a node with that label is created while the
    operator runs: the capacity object of the pool comes to cover it, and a pod that can
    only run there gets its volume and runs, all without a restart."""
    label = {f"{peers.ns}.e2e.volplane.io/pool": "yes"}
    first = peers.node("first", labels=label)
    pool = peers.pool("grow", "8Gi", selector={"matchLabels": label})
    cls = peers.storage_class("grow", binding="WaitForFirstConsumer",
                              parameters={"pool": pool})
    op = peers.start()
    pid = op.pid

    def covered():
        return {v for c in peers.capacities(cls) if c["capacity"] == "8Gi"
                for e in c["nodeTopology"].get("matchExpressions") or ()
                if e["key"] == HOSTNAME for v in e["values"]}

    wait_for(lambda: covered() == {first}, timeout=30,
             message=f"capacity published for {first}")
    # Let the publisher's start-up rounds (each write brings an event, which brings a
    # round) die down: from here only the new node itself can make it publish again
    # before its periodic round, a minute away.
    holds_for(lambda: covered() == {first} and peers.pool_status(pool).get("nodes") == [first],
              3, message="publisher quiet")
    late = peers.node("late", labels=label)
    wait_for(lambda: covered() == {first, late}, timeout=30,
             message=f"capacity published for the new node {late}")
    assert peers.pool_status(pool).get("nodes") == sorted([first, late])

    peers.claim("data", "2Gi", cls)
    peers.pod("user", "data", on=[late])
    wait_for(lambda: phase(peers.pod_obj("user")) == "Running", timeout=60,
             message="pod on the new node Running")
    (pv,) = peers.bound("data")
    assert peers.claim_obj("data")["metadata"]["annotations"][SELECTED_NODE] == late
    assert kget(api, "StorageAllocation", pv)["spec"]["node"] == late
    assert op.running and op.pid == pid and op.starts == 1, "the operator was restarted"


# ----------------------------------------------------------------------------- 3


def test_allocations_of_a_deleted_nodes_pool_follow_the_reclaim_policy(api, peers):
    """TopoLVM and local-static-provisioner: deleting a node left its volumes' records
    (LogicalVolumes, PVs) behind for good, holding capacity nobody could free.

    Three bound volumes on a pool whose only node is then deleted: an Immediate one and
    a WaitForFirstConsumer one (its record names the deleted node) with reclaim policy
    Delete, one with Retain. Their claims deleted: the Delete volumes' PVs and records
    go, the pool's ledger counts only the Retain volume, whose PV stays Released with
    its record (Retain keeps the storage until an administrator acts; deleting the PV
    marks the record retained, and deleting the record frees its space)."""
    node = peers.node("doomed")
    pool = peers.pool("doomed", "10Gi", names=[node])
    params = {"pool": pool}
    delete = peers.storage_class("del", parameters=params)
    retain = peers.storage_class("ret", reclaim="Retain", parameters=params)
    wffc = peers.storage_class("wffc", binding="WaitForFirstConsumer", parameters=params)
    peers.start()
    peers.claim("d", "1Gi", delete)
    peers.claim("r", "2Gi", retain)
    peers.claim("w", "3Gi", wffc, annotations={SELECTED_NODE: node})
    pv_d, pv_r, pv_w = peers.bound("d", "r", "w")
    for pv in (pv_d, pv_r, pv_w):
        assert kget(api, "PersistentVolume", pv)["spec"]["csi"]["volumeHandle"].startswith(
            pool + "/")
    assert kget(api, "StorageAllocation", pv_w)["spec"]["node"] == node
    wait_for(lambda: _ledger(peers, pool) == (6 * GI, 6 * GI, 6 * GI), timeout=15,
             message="ledger 6Gi")

    peers.delete_node(node)
    wait_for(lambda: peers.pool_status(pool).get("nodes") == [], timeout=15,
             message="the pool has no node left")
    for claim in ("d", "r", "w"):
        kdelete(api, "PersistentVolumeClaim", claim, peers.ns)

    wait_for(lambda: kget(api, "PersistentVolume", pv_d) is None
             and kget(api, "PersistentVolume", pv_w) is None, timeout=60,
             message="the Delete volumes' PVs gone")
    assert kget(api, "StorageAllocation", pv_d) is None
    assert kget(api, "StorageAllocation", pv_w) is None
    wait_for(lambda: phase(kget(api, "PersistentVolume", pv_r)) == "Released", timeout=30,
             message="the Retain volume Released")
    wait_for(lambda: _ledger(peers, pool) == (2 * GI, 2 * GI, 2 * GI), timeout=15,
             message="the ledger counts only the Retain volume")
    assert list(peers.records(pool)) == [pv_r]

    kdelete(api, "PersistentVolume", pv_r)  # the administrator lets the PV go
    wait_for(lambda: kget(api, "PersistentVolume", pv_r) is None, timeout=30,
             message="the Retain PV gone once deleted")
    record = kget(api, "StorageAllocation", pv_r)
    assert record["metadata"]["annotations"][RETAINED] == "true"
    assert peers.pool_status(pool).get("allocatedBytes") == 2 * GI
    kdelete(api, "StorageAllocation", pv_r)  # ... and then its storage
    wait_for(lambda: peers.pool_status(pool).get("allocatedBytes") == 0, timeout=15,
             message="the pool empty")


def test_allocation_of_a_provisioning_cut_short_on_a_deleted_node_is_freed(api, peers):
    """The same leak, one step earlier: the operator dies between the allocation record
    and the PV of a WaitForFirstConsumer claim (VOLPLANE_CRASH_AT=provision-1), and the
    selected node, the pool's only one, is deleted before it comes back. The record
    names a pool that can no longer place the volume anywhere: the restarted operator
    frees it (no PV was made from it) and gives the node back to the scheduler, as it
    does when a node has no room, instead of keeping the capacity and the claim pinned
    to a node that is gone."""
    node = peers.node("doomed")
    pool = peers.pool("doomed", "4Gi", names=[node])
    wffc = peers.storage_class("wffc", binding="WaitForFirstConsumer",
                               parameters={"pool": pool})
    peers.operator.start(*OPERATOR_ARGS, env={"VOLPLANE_CRASH_AT": "provision-1"})
    claim = peers.claim("w", "3Gi", wffc, annotations={SELECTED_NODE: node})
    wait_for(lambda: not peers.operator.running, timeout=60,
             message="operator exits at provision-1")
    assert peers.operator.returncode == 86
    name = f"pvc-{claim['metadata']['uid']}"
    assert kget(api, "StorageAllocation", name)["spec"]["node"] == node
    assert kget(api, "PersistentVolume", name) is None

    peers.delete_node(node)
    peers.start()

    def given_back():
        c = peers.claim_obj("w")
        return SELECTED_NODE not in (c["metadata"].get("annotations") or {})

    wait_for(given_back, timeout=30, message="the deleted node given back to the scheduler")
    wait_for(lambda: kget(api, "StorageAllocation", name) is None, timeout=15,
             message="the record of the unfinished provisioning freed")
    wait_for(lambda: _ledger(peers, pool) == (0, 0, 0), timeout=15, message="pool empty")
    assert peers.phase("w") == "Pending"
    assert kget(api, "PersistentVolume", name) is None
    events = peers.events("PersistentVolumeClaim", "w", "ProvisioningFailed")
    assert any(f"removed annotation {SELECTED_NODE}" in e["message"] for e in events), events


# ----------------------------------------------------------------------------- 4


def test_claim_deleted_while_the_operator_is_down_is_not_stuck(api, peers):
    """Controllers whose own finalizer on a claim was only released on a delete event
    left claims Terminating for good when they missed that event (down, or a watch
    gap).

    The operator is killed while a pod uses an attached volume; the claim is deleted
    (Terminating: kubernetes.io/pvc-protection while the pod runs), then the pod. The
    claim disappears although volplane is down (volplane holds no finalizer on claims:
    the protection is kube-controller-manager's), and the restarted operator finishes
    the rest from what it lists: the attachment is detached, the PV deleted, its
    allocation freed and the node's report emptied."""
    node = peers.node("n")
    pool = peers.pool("p", "4Gi", names=[node])
    cls = peers.storage_class("p", parameters={"pool": pool})
    peers.start()
    peers.claim("c", "1Gi", cls)
    (pv,) = peers.bound("c")
    peers.pod("user", "c", node=node)
    wait_for(lambda: (peers.attachments(pv).get(node) or {}).get("status", {}).get(
        "attached"), timeout=30, message="volume attached")
    handle = kget(api, "PersistentVolume", pv)["spec"]["csi"]["volumeHandle"]
    unique = unique_volume_name(POOL_DRIVER, handle)
    wait_for(lambda: peers.reported(node) == [unique], timeout=15, message="node reports it")

    peers.stop()
    kdelete(api, "PersistentVolumeClaim", "c", peers.ns)
    claim = peers.claim_obj("c")
    assert claim["metadata"].get("deletionTimestamp")
    assert claim["metadata"]["finalizers"] == ["kubernetes.io/pvc-protection"]
    holds_for(lambda: peers.claim_obj("c") is not None, 1,
              message="the claim is protected while its pod runs")
    peers.delete_pod("user")
    wait_for(lambda: peers.claim_obj("c") is None, timeout=30,
             message="the claim gone with the operator down")
    assert phase(kget(api, "PersistentVolume", pv)) == "Bound"  # nobody released it yet

    peers.start()
    wait_for(lambda: kget(api, "PersistentVolume", pv) is None, timeout=60,
             message="the PV reclaimed after the restart")
    assert kget(api, "StorageAllocation", pv) is None
    assert peers.attachments(pv) == {}
    wait_for(lambda: peers.reported(node) == [], timeout=15, message="node report emptied")
    wait_for(lambda: _ledger(peers, pool) == (0, 0, 0), timeout=15, message="pool empty")


# ----------------------------------------------------------------------------- 5


def test_wffc_claim_is_rescheduled_when_the_selected_node_has_no_room(api, peers):
    """A provisioner that fails on the selected node without giving it back (upstream:
    removing volume.kubernetes.io/selected-node on a final "no capacity" error) leaves
    the claim and its pod Pending on that node for good.

    Stale capacity makes the scheduler pick a node without room: the operator is down
    while the preferred node's pool shrinks from 10Gi to 1Gi, so its CSIStorageCapacity
    still says 10Gi, and a 2Gi claim's pod (preferring that node, allowed on two) gets
    it selected. Started, the operator finds no room there, says so and removes the
    annotation; the scheduler picks again and the claim binds on the node that fits."""
    group = {f"{peers.ns}.e2e.volplane.io/group": "yes"}
    small = peers.node("small")
    roomy = peers.node("roomy")
    p_small = peers.pool("small", "10Gi", names=[small], labels=group)
    p_roomy = peers.pool("roomy", "10Gi", names=[roomy], labels=group)
    selector = ",".join(f"{k}={v}" for k, v in group.items())
    cls = peers.storage_class("wffc", binding="WaitForFirstConsumer",
                              parameters={"poolSelector": selector})
    peers.start()

    def published(pool, size):
        return [c for c in peers.capacities(cls) if c["capacity"] == size
                and (c["metadata"].get("annotations") or {}).get("volplane.io/pool") == pool]

    wait_for(lambda: published(p_small, "10Gi") and published(p_roomy, "10Gi"), timeout=30,
             message="capacity of both pools published")
    peers.stop()
    kpatch(api, "StoragePool", p_small, {"spec": {"capacity": "1Gi"}})
    assert published(p_small, "10Gi"), "the capacity object should be stale now"
    peers.claim("data", "2Gi", cls)
    peers.pod("user", "data", on=[small, roomy], prefer=small)
    wait_for(lambda: (peers.claim_obj("data")["metadata"].get("annotations") or {}).get(
        SELECTED_NODE) == small, timeout=30,
        message=f"the scheduler selects {small} on stale capacity")

    peers.start()
    pod = wait_for(lambda: (p := peers.pod_obj("user")) and phase(p) == "Running" and p,
                   timeout=90, message="pod Running after the re-schedule")
    assert pod["spec"]["nodeName"] == roomy
    (pv,) = peers.bound("data")
    claim = peers.claim_obj("data")
    assert claim["metadata"]["annotations"][SELECTED_NODE] == roomy
    assert kget(api, "PersistentVolume", pv)["spec"]["csi"]["volumeHandle"].startswith(
        p_roomy + "/")
    given_back = [e for e in peers.events("PersistentVolumeClaim", "data",
                                          "ProvisioningFailed")
                  if f'pool "{p_small}" full' in e["message"]
                  and f"removed annotation {SELECTED_NODE}" in e["message"]]
    assert given_back, peers.events("PersistentVolumeClaim", "data", "ProvisioningFailed")
    assert peers.records(p_small) == {}
    assert list(peers.records(p_roomy)) == [pv]


# ----------------------------------------------------------------------------- 6


def test_attachments_on_a_deleted_node_never_block_the_moved_pod(api, peers):
    """Attachments left on a deleted node kept ReadWriteOnce volumes "attached" there:
    the pod re-created on another node got Multi-Attach errors until someone deleted
    the VolumeAttachment by hand. Upstream's attach/detach controller detaches from a
    node once its Node object is gone.

    Two pods with RWO volumes on two nodes. One node is deleted while the operator
    runs, the other while it is down (a missed event); each pod is re-created on a third
    node (the old pod objects are left behind, as pod GC leaves them for a while). Both
    volumes end attached to the new node, the old attachments gone."""
    old_1, old_2, new = peers.node("old1"), peers.node("old2"), peers.node("new")
    pool = peers.pool("p", "4Gi", names=[old_1, old_2, new])
    cls = peers.storage_class("p", parameters={"pool": pool})
    peers.start()
    peers.claim("c1", "1Gi", cls)
    peers.claim("c2", "1Gi", cls)
    pv_1, pv_2 = peers.bound("c1", "c2")
    peers.pod("a", "c1", node=old_1)
    peers.pod("b", "c2", node=old_2)

    def attached(pv, node):
        va = peers.attachments(pv).get(node)
        return va if va and (va.get("status") or {}).get("attached") else None

    for pv, node in ((pv_1, old_1), (pv_2, old_2)):
        wait_for(lambda pv=pv, node=node: attached(pv, node), timeout=30,
                 message=f"{pv} attached to {node}")
        # the old node's kubelet had it mounted (the node is gone: that no longer counts)
        handle = kget(api, "PersistentVolume", pv)["spec"]["csi"]["volumeHandle"]
        kpatch(api, "Node", node, {"status": {"volumesInUse": [
            unique_volume_name(POOL_DRIVER, handle)]}}, sub="status")

    def moved(pv, pod):
        def done():
            nodes = peers.attachments(pv)
            return list(nodes) == [new] and attached(pv, new)
        wait_for(done, timeout=30, message=f"{pv} attached to {new} only (pod {pod})")
        handle = kget(api, "PersistentVolume", pv)["spec"]["csi"]["volumeHandle"]
        va = attached(pv, new)
        assert va["metadata"]["name"] == volume_attachment_name(handle, POOL_DRIVER, new)
        wait_for(lambda: unique_volume_name(POOL_DRIVER, handle) in peers.reported(new),
                 timeout=15, message=f"{new} reports {pv} attached")

    # the node is deleted while the operator runs
    peers.delete_node(old_1)
    peers.pod("a2", "c1", node=new)
    moved(pv_1, "a2")

    # ... and while it is down
    peers.stop()
    peers.delete_node(old_2)
    peers.pod("b2", "c2", node=new)
    peers.start()
    moved(pv_2, "b2")
    for pod in ("a2", "b2"):
        assert phase(peers.pod_obj(pod)) == "Running"


# ----------------------------------------------------------------------------- 7


def test_released_volumes_of_a_deleted_node_are_deleted(api, peers):
    """local-static-provisioner (and node-local CSI drivers deleting volumes from the
    node): a Released PV with reclaim policy Delete whose node was deleted stayed
    Released forever, its deleter gone with the node.

    What upstream expects (and the issue asks for): the reclaim policy runs, or, when
    the storage cannot be reached, a VolumeFailedDelete event says why and the PV
    stays. A pool volume is freed by the operator, not on its node: the ledger entry is
    the operator's, and a backing file left on a node that was deleted is removed by
    that node's agent if the node ever comes back (no record names it any more). So
    here the PVs are deleted and their allocations freed, for a ledger-only pool and
    for a pool with file backing alike; the pool itself is still there. (A volume whose
    *pool* was deleted is the case that cannot be freed: test_pools covers its event.)

    The claims are deleted while the operator is down, then the node: the restarted
    operator finds the PVs Bound to claims that are gone on a pool with no node left."""
    node = peers.node("gone")
    plain = peers.pool("plain", "4Gi", names=[node])
    filed = peers.pool("file", "4Gi", names=[node], backing={"type": "File"})
    cls_plain = peers.storage_class("plain", parameters={"pool": plain})
    cls_file = peers.storage_class("file", parameters={"pool": filed})
    peers.start()
    peers.claim("a", "1Gi", cls_plain)
    peers.claim("b", "2Gi", cls_file)
    pv_a, pv_b = peers.bound("a", "b")

    peers.stop()
    for claim in ("a", "b"):
        kdelete(api, "PersistentVolumeClaim", claim, peers.ns)
    wait_for(lambda: not klist(api, "PersistentVolumeClaim", peers.ns), timeout=30,
             message="claims gone")
    peers.delete_node(node)

    peers.start()
    wait_for(lambda: kget(api, "PersistentVolume", pv_a) is None
             and kget(api, "PersistentVolume", pv_b) is None, timeout=60,
             message="both Released PVs deleted")
    assert kget(api, "StorageAllocation", pv_a) is None
    assert kget(api, "StorageAllocation", pv_b) is None
    for pool in (plain, filed):
        wait_for(lambda pool=pool: _ledger(peers, pool) == (0, 0, 0), timeout=15,
                 message=f"{pool} empty")
        assert kget(api, "StoragePool", pool) is not None
    for pv in (pv_a, pv_b):
        assert not peers.events("PersistentVolume", pv, "VolumeFailedDelete")


# ----------------------------------------------------------------------------- 8


def test_node_report_drops_volumes_nobody_attaches(api, peers):
    """node.status.volumesAttached kept entries for volumes no attachment backs any
    more (a detach finished behind the controller's back, a crash between the two
    writes of a detach, a stale report written by someone else): the kubelet then
    believes them attached.

    A node with one real attachment. (a) While the operator runs, entries for a volume
    that exists nowhere and for another driver's volume are added to the report: they
    are removed, the real one stays. (b) With the operator down, the pod is deleted and
    its VolumeAttachment removed by hand, and a stale entry added: after the restart
    the report is empty."""
    node = peers.node("n")
    pool = peers.pool("p", "4Gi", names=[node])
    cls = peers.storage_class("p", parameters={"pool": pool})
    peers.start()
    peers.claim("c", "1Gi", cls)
    (pv,) = peers.bound("c")
    peers.pod("user", "c", node=node)
    handle = kget(api, "PersistentVolume", pv)["spec"]["csi"]["volumeHandle"]
    real = unique_volume_name(POOL_DRIVER, handle)
    wait_for(lambda: peers.reported(node) == [real], timeout=30, message="node reports it")

    ghost = unique_volume_name(POOL_DRIVER, f"{pool}/pvc-no-such-volume")
    foreign = unique_volume_name("other.csi.example.com", "vol-1")
    kpatch(api, "Node", node, {"status": {"volumesAttached": [
        {"name": real, "devicePath": ""}, {"name": ghost, "devicePath": ""},
        {"name": foreign, "devicePath": "/dev/xvdf"}]}}, sub="status")
    wait_for(lambda: peers.reported(node) == [real], timeout=15,
             message="stale entries removed, the real one kept")

    peers.stop()
    peers.delete_pod("user")
    wait_for(lambda: peers.pod_obj("user") is None, timeout=30, message="pod gone")
    (va,) = peers.attachments(pv).values()
    kdelete(api, "VolumeAttachment", va["metadata"]["name"])
    kpatch_response(api, "VolumeAttachment", va["metadata"]["name"],
                    {"metadata": {"finalizers": None}})
    wait_for(lambda: peers.attachments(pv) == {}, timeout=15, message="attachment gone")
    kpatch(api, "Node", node, {"status": {"volumesAttached": [
        {"name": real, "devicePath": ""}, {"name": ghost, "devicePath": ""}]}}, sub="status")
    assert peers.reported(node) == sorted([real, ghost])

    peers.start()
    wait_for(lambda: peers.reported(node) == [], timeout=30,
             message="the report emptied after the restart")
    holds_for(lambda: peers.attachments(pv) == {}, 2, message="nothing re-attached")
