"""Pool status and the CSIStorageCapacity objects to publish (volplane.pools.capacity)."""

from __future__ import annotations

from volplane.pools.capacity import (
    capacity_object_name,
    capacity_objects,
    pool_status,
    status_differs,
)

from .world import GI, NODES, ledger_with, node, pool, pools

# --- status ------------------------------------------------------------------------------------


def test_pool_status():
    p = pool("a", names=["n0", "ghost"], generation=3)
    st1 = pool_status(p, [2 * GI, GI], NODES, now="2024-01-01T00:00:00Z")
    assert st1["capacity"] == "20Gi" and st1["allocated"] == "3Gi" and st1["available"] == "17Gi"
    assert st1["capacityBytes"] == 20 * GI and st1["allocatedBytes"] == 3 * GI
    assert st1["availableBytes"] == 17 * GI
    assert st1["volumeCount"] == 2 and st1["nodes"] == ["n0"] and st1["nodeCount"] == 1
    assert st1["observedGeneration"] == 3
    conds = {c["type"]: c for c in st1["conditions"]}
    assert conds["Ready"]["status"] == "True"
    assert conds["Degraded"]["status"] == "True"
    assert conds["Degraded"]["reason"] == "NodesMissing" and "ghost" in conds["Degraded"]["message"]
    # unchanged input -> identical status (lastTransitionTime kept): nothing to write
    p["status"] = st1
    st2 = pool_status(p, [2 * GI, GI], NODES, now="2024-02-02T00:00:00Z")
    assert st2 == st1 and not status_differs(p["status"], st2)
    st3 = pool_status(p, [2 * GI], NODES, now="2024-02-02T00:00:00Z")
    assert status_differs(p["status"], st3)


def test_pool_status_without_nodes():
    st1 = pool_status(pool("a", names=["ghost"]), [GI], NODES, now="2024-01-01T00:00:00Z")
    assert st1["volumeCount"] == 1 and st1["allocatedBytes"] == GI
    ready = next(c for c in st1["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "NoNodes"


def test_pool_status_overcommitted_after_shrink():
    st1 = pool_status(pool("a", capacity="1Gi"), [2 * GI], NODES, now="2024-01-01T00:00:00Z")
    assert st1["availableBytes"] == 0
    degraded = next(c for c in st1["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "OverCommitted"


# --- capacity objects ------------------------------------------------------------------


def test_capacity_objects():
    classes = {
        "fast": {"provisioner": "pool.volplane.io", "parameters": {"media": "ssd"}},
        "any": {"provisioner": "pool.volplane.io"},
        "broken": {"provisioner": "pool.volplane.io", "parameters": {"nope": "x"}},
        "other": {"provisioner": "example.com/csi"},
    }
    ps = pools(pool("a", names=["n0", "n2"], params={"media": "ssd"}),
               pool("b", names=["n1"], capacity="10Gi"), pool("c", names=["ghost"]))
    led = ledger_with(a=5, b=10)
    objs = capacity_objects(ps, classes, led, NODES, "volplane-system")
    by = {(o["metadata"]["annotations"]["volplane.io/pool"], o["storageClassName"]): o
          for o in objs.values()}
    assert set(by) == {("a", "fast"), ("a", "any"), ("b", "any")}
    a = by[("a", "fast")]
    assert a["capacity"] == "15Gi" and a["maximumVolumeSize"] == "15Gi"
    assert a["metadata"]["namespace"] == "volplane-system"
    assert a["metadata"]["name"] == capacity_object_name("a", "fast")
    assert a["nodeTopology"]["matchExpressions"][0]["values"] == ["n0", "n2"]
    assert by[("b", "any")]["capacity"] == "0"
    assert capacity_object_name("a-b", "c") != capacity_object_name("a", "b-c")


def test_capacity_objects_per_node_segment_where_the_node_plugin_registered():
    """Nodes labelled with the node plugin's topology segment get external-provisioner's
    layout: exactly one object per (class, segment), selecting that label alone, with the
    free space of every pool of the class reaching the node (max volume: the largest)."""
    key = "topology.pool.volplane.io/node"
    nodes = {
        "n0": node("n0", **{key: "n0"}),
        "n1": node("n1", "zone-b", **{key: "n1"}),
        "n2": node("n2"),                     # no node plugin registered (yet)
    }
    classes = {"any": {"provisioner": "pool.volplane.io"},
               "b-only": {"provisioner": "pool.volplane.io", "parameters": {"pool": "b"}},
               "zone-b": {"provisioner": "pool.volplane.io", "allowedTopologies": [
                   {"matchLabelExpressions": [{"key": "topology.kubernetes.io/zone",
                                               "values": ["zone-b"]}]}]}}
    ps = pools(pool("a", capacity="20Gi", names=["n0", "n1", "n2"]),
               pool("b", capacity="10Gi", names=["n1"]))
    objs = capacity_objects(ps, classes, ledger_with(a=5, b=4), nodes, "volplane-system")
    seg = {(o["storageClassName"], o["nodeTopology"]["matchLabels"][key]): o
           for o in objs.values() if "matchLabels" in o["nodeTopology"]}
    assert set(seg) == {("any", "n0"), ("any", "n1"), ("b-only", "n1"), ("zone-b", "n1")}
    for o in seg.values():
        assert o["nodeTopology"] == {"matchLabels": {key: o["nodeTopology"]["matchLabels"][key]}}
    assert seg[("any", "n0")]["capacity"] == "15Gi"
    assert seg[("any", "n0")]["maximumVolumeSize"] == "15Gi"
    assert seg[("any", "n1")]["capacity"] == "21Gi"          # a (15Gi) + b (6Gi)
    assert seg[("any", "n1")]["maximumVolumeSize"] == "15Gi"  # one volume, one pool
    assert seg[("any", "n1")]["metadata"]["annotations"]["volplane.io/pools"] == "a,b"
    assert seg[("b-only", "n1")]["capacity"] == "6Gi"
    assert seg[("zone-b", "n1")]["capacity"] == "21Gi"
    names = [o["metadata"]["name"] for o in objs.values()]
    assert len(names) == len(set(names))
    # the unlabelled node keeps the per-pool object, by hostname, for its pool only
    legacy = [o for o in objs.values() if "matchExpressions" in o["nodeTopology"]]
    assert [(o["storageClassName"], o["metadata"]["annotations"]["volplane.io/pool"],
             o["nodeTopology"]["matchExpressions"][0]["values"]) for o in legacy] == \
        [("any", "a", ["n2"])]


def test_node_topology_key_is_the_node_plugins():
    from volplane.node.service import TOPOLOGY_KEY
    from volplane.pools.placement import NODE_TOPOLOGY_KEY

    assert NODE_TOPOLOGY_KEY == TOPOLOGY_KEY
