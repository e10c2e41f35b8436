"""The node agent's watch layer without a cluster: what Kopf's events do to its caches
and wake-ups (Informers.feed plays the watch), and what the embedded Kopf operator is
allowed to do. The agent's rounds against a real API server: tests/e2e/test_node_agent.py.
"""

from __future__ import annotations

import kubernetes

from volplane.informers import handler_id
from volplane.kinds import ALLOCATIONS, POOLS
from volplane.node import watch
from volplane.node.agent import Agent

NODE = "node-1"
ROOT = "/var/lib/volplane"


def agent() -> Agent:
    return Agent(kube=None, node_name=NODE, system=None, root=ROOT)


def pool(name, *, nodes=(NODE,), backing=True, slots=None, rv=1):
    spec = {"capacity": "10Gi", "nodes": {"names": list(nodes)}}
    if backing:
        spec["backing"] = {"type": "File", "path": f"{ROOT}/pools/{name}"}
    if slots is not None:
        spec["slotsPerNode"] = slots
    return {"apiVersion": "volplane.io/v1alpha1", "kind": "StoragePool",
            "metadata": {"name": name, "uid": f"u-{name}", "resourceVersion": str(rv)},
            "spec": spec}


def allocation(name, pool_name, size=1 << 30):
    return {"apiVersion": "volplane.io/v1alpha1", "kind": "StorageAllocation",
            "metadata": {"name": name, "uid": f"u-{name}", "resourceVersion": "1"},
            "spec": {"pool": pool_name, "sizeBytes": size}}


def pv(name, handle):
    return {"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name, "uid": f"u-{name}", "resourceVersion": "1",
                         "managedFields": [{"manager": "x"}]},
            "spec": {"capacity": {"storage": "1Gi"},
                     "csi": {"driver": "pool.volplane.io", "volumeHandle": handle}}}


def node(name=NODE, labels=None, rv=1):
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": f"u-{name}", "resourceVersion": str(rv),
                         "labels": labels or {}},
            "status": {"images": [{"names": ["big"]}]}}


def test_pools_and_allocations_wake_the_agent_pvs_and_its_node_do_not():
    a = agent()
    inf = a.informers
    inf.feed(pool("p1"), POOLS)
    assert a._wake.is_set()
    a._wake.clear()
    inf.feed(allocation("v1", "p1"), ALLOCATIONS)
    assert a._wake.is_set()
    a._wake.clear()
    inf.feed(pv("pv-1", "p1/v1"), watch.PVS)
    inf.feed(node(), watch.node_kind(NODE))
    assert not a._wake.is_set()
    inf.delete(POOLS, "p1")
    assert a._wake.is_set()


def test_its_nodes_first_event_is_the_synced_barrier_and_the_node_decides_reach():
    a = agent()
    inf = a.informers
    inf.feed(pool("p1", slots=4), POOLS)
    inf.feed(pool("elsewhere", nodes=("node-2",)), POOLS)
    assert not a.synced.is_set()
    assert a.max_volumes() == 0  # no node yet: no pool reaches it
    inf.feed(node(), watch.node_kind(NODE))
    assert a.synced.is_set()
    assert a.node["metadata"]["name"] == NODE
    assert "images" not in a.node["status"]  # slimmed (kinds.slim_node)
    assert a.max_volumes() == 4
    inf.feed(pool("p2"), POOLS)  # slotsPerNode unset: the default
    assert a.max_volumes() == 4 + 16
    inf.delete(watch.node_kind(NODE), NODE)
    assert a.node is None and a.max_volumes() == 0


def test_the_csi_threads_view_of_pools_follows_events():
    a = agent()
    inf = a.informers
    assert a.backing_of("p1") is None
    inf.feed(pool("p1"), POOLS)
    assert a.backing_of("p1").path == f"{ROOT}/pools/p1"
    inf.feed(pool("p1", backing=False, rv=2), POOLS)
    assert a.backing_of("p1") is None
    inf.delete(POOLS, "p1")
    assert a.backing_of("p1") is None and "p1" not in a._pool_view


def test_listers_hold_slim_pvs_and_the_agents_own_status_writes():
    a = agent()
    inf = a.informers
    inf.feed(pv("pv-1", "p1/v1"), watch.PVS)
    assert list(a.pvs.values()) == [{"metadata": {"name": "pv-1", "resourceVersion": "1",
                                                  "uid": "u-pv-1"},
                                     "spec": {"csi": {"driver": "pool.volplane.io",
                                                      "volumeHandle": "p1/v1"}}}]
    inf.feed(pool("p1"), POOLS)
    written = {**pool("p1", rv=5), "status": {"backing": {"capacityBytes": 7}}}
    a.pools.put(written)  # what _report does with the patch's response
    assert a.pools["p1"]["status"]["backing"]["capacityBytes"] == 7
    inf.feed({**written, "metadata": {**written["metadata"], "resourceVersion": "6"}}, POOLS)
    assert a.pools["p1"]["metadata"]["resourceVersion"] == "6"  # the watch caught up


def test_the_embedded_kopf_writes_nothing_and_watches_only_its_node():
    a = agent()
    reg = watch.registry(a.informers, kube=None)
    plurals = ("storagepools", "storageallocations", "persistentvolumes", "nodes")
    assert {h.id for h in reg._indexing.get_all_handlers()} == {handler_id(p) for p in plurals}
    assert {h.id for h in reg._watching.get_all_handlers()} == {
        handler_id(f"{p}.events") for p in plurals}
    # nothing that would make Kopf write to the objects (annotations, finalizers)
    assert not reg._changing.get_all_handlers()
    assert not reg._spawning.get_all_handlers()
    assert not reg._webhooks.get_all_handlers()

    opts = watch.operator_settings(list(a.informers.kinds.values()), streaming=True)
    assert opts.watching.field_selectors[("", "v1", "nodes")] == f"metadata.name={NODE}"
    assert opts.scanning.disabled and opts.peering.standalone
    assert not opts.posting.enabled
    assert opts.persistence.diffbase_storage.build(body={"spec": {}}) is None
    # Kopf would SIGKILL its thread (the whole node plugin) when its operator ends
    # without the stop flag.
    assert opts.process.ultimate_exiting_timeout is None


def test_kopf_logs_in_as_the_agents_client():
    cfg = kubernetes.client.Configuration()
    cfg.host = "https://10.0.0.1:6443"
    cfg.ssl_ca_cert = "/run/ca.crt"
    cfg.api_key = {"BearerToken": "tok"}
    cfg.api_key_prefix = {"BearerToken": "Bearer"}
    info = watch.connection(cfg)
    assert (info.server, info.ca_path, info.scheme, info.token) == (
        "https://10.0.0.1:6443", "/run/ca.crt", "Bearer", "tok")
    assert info.insecure is False and info.certificate_path is None

    certs = kubernetes.client.Configuration()
    certs.host = "https://h"
    certs.cert_file, certs.key_file = "/tmp/c", "/tmp/k"
    info = watch.connection(certs)
    assert (info.token, info.scheme, info.certificate_path, info.private_key_path) == (
        None, None, "/tmp/c", "/tmp/k")
