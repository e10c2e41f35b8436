"""Pool status and the CSIStorageCapacity objects to publish (volplane.pools.capacity)."""

from __future__ import annotations

from volplane.pools.capacity import (
    capacity_object_name,
    capacity_objects,
    pool_status,
    status_differs,
)

from .world import GI, NODES, ledger_with, pool, pools

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
