"""An allocation record whose pool can no longer serve its claim (placement.stale_record),
and what the provisioner does with it: free it (no PV made from it) and place the claim
afresh. The e2e case: test_peer_failures.py, a provisioning cut short on a deleted node."""

from __future__ import annotations

import asyncio

import pytest

from volplane import kinds as K
from volplane.pools.placement import stale_record
from volplane.pools.provisioner import PoolProvisioner
from volplane.pools.records import build_allocation

from ..fakeapi import FakeApi, context
from .world import GI, NODES, pool, pools

ZONE_B = [{"matchLabelExpressions": [{"key": "topology.kubernetes.io/zone",
                                      "values": ["zone-b"]}]}]


def record(pool_name: str, node: str | None = None) -> dict:
    return {"metadata": {"name": "pvc-u1"},
            "spec": {"pool": pool_name, "sizeBytes": GI, "node": node,
                     "claim": {"namespace": "ns", "name": "c", "uid": "u1"}}}


@pytest.mark.parametrize("ps, rec, kwargs, fragment", [
    (pools(pool("p", names=["n0"])), record("p"), {}, None),
    (pools(pool("p", names=["n0"])), record("p", "n0"), {"node": "n0"}, None),
    (pools(pool("p", names=["n0", "n1"])), record("p", "n0"), {"node": "n1"}, None),
    (pools(pool("q")), record("p"), {}, 'StoragePool "p" does not exist'),
    (pools(pool("p", names=["ghost"])), record("p", "ghost"), {"node": "ghost"},
     'StoragePool "p" is attached to no existing node'),
    (pools(pool("p", names=["ghost"])), record("p"), {}, "attached to no existing node"),
    (pools(pool("p", names=["n0"])), record("p", "n0"), {"node": "n1"},
     'does not reach the selected node "n1"'),
    (pools(pool("p", names=["n0"])), record("p"), {"allowed_topologies": ZONE_B},
     "in the class's allowedTopologies"),
    (pools(pool("p", names=["n0", "n1"])), record("p"), {"allowed_topologies": ZONE_B}, None),
], ids=["fits", "fits-selected", "fits-other-node", "pool-gone", "node-gone",
        "immediate-node-gone", "not-the-selected-node", "outside-topologies", "in-topologies"])
def test_stale_record(ps, rec, kwargs, fragment):
    why = stale_record(rec, ps, NODES, **kwargs)
    if fragment is None:
        assert why is None
    else:
        assert why is not None and fragment in why


# --- the provisioner ---------------------------------------------------------------------

SELECTED = "volume.kubernetes.io/selected-node"
BOTH = {"a": ["n0"], "b": ["n1"]}  # pool a's only node, n0, is gone


def world(api: FakeApi, *, binding: str, pools_on: dict[str, list[str]], selected: str | None,
          record_pool: str, record_node: str | None) -> dict:
    """Nodes n1..n3 (n0 was deleted), the pools, one class over them, a claim, and the
    record an earlier (killed) attempt made for it. Returns the claim."""
    for n in ("n1", "n2", "n3"):
        api.add({"apiVersion": "v1", "kind": "Node", **NODES[n]})
    for name, nodes in pools_on.items():
        api.add(pool(name, names=nodes))
    api.add({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
             "metadata": {"name": "sc"}, "provisioner": "pool.volplane.io",
             "volumeBindingMode": binding, "parameters": {}})
    md: dict = {"name": "c", "namespace": "ns", "uid": "u1"}
    if selected:
        md["annotations"] = {SELECTED: selected}
    claim = api.add({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": md,
                     "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "sc",
                              "resources": {"requests": {"storage": "1Gi"}}}})
    rec = build_allocation(claim, "sc", record_pool, GI, record_node)
    api.add(rec)
    return claim


def provision(api: FakeApi, selected: str | None):
    async def run():
        ctx = context(api)
        p = PoolProvisioner(ctx)
        api.sync(ctx.informers)
        p.pc.loaded.set()
        await p.provision(api.obj(K.PVCS, "c", "ns"), "sc", selected)
        return ctx
    return asyncio.run(run())


def test_record_for_a_deleted_selected_node_is_freed_and_the_node_given_back():
    """The operator died between record and PV; the selected node n0 (pool a's only
    node) was deleted meanwhile: the record goes and the node is given back."""
    api = FakeApi()
    world(api, binding="WaitForFirstConsumer", pools_on=BOTH, selected="n0",
          record_pool="a", record_node="n0")
    ctx = provision(api, "n0")
    assert api.obj(K.ALLOCATIONS, "pvc-u1") is None
    assert api.obj(K.PVS, "pvc-u1") is None
    annotations = api.obj(K.PVCS, "c", "ns")["metadata"].get("annotations") or {}
    assert SELECTED not in annotations
    (_, reason, message), = ctx.events.posted
    assert reason == "ProvisioningFailed" and f"removed annotation {SELECTED}" in message


def test_record_of_a_gone_pool_is_freed_and_the_claim_placed_in_another():
    api = FakeApi()
    world(api, binding="Immediate", pools_on={"b": ["n1"]}, selected=None,
          record_pool="a", record_node=None)
    provision(api, None)
    rec = api.obj(K.ALLOCATIONS, "pvc-u1")
    assert rec is not None and rec["spec"]["pool"] == "b"
    assert api.obj(K.PVS, "pvc-u1")["spec"]["csi"]["volumeHandle"] == "b/pvc-u1"
    assert [v for v, _ in api.writes(contains="storageallocations")] == ["delete", "create"]


def test_record_is_kept_when_a_pv_was_made_from_it_after_all():
    """The API server has the PV (the lister does not yet): the record is not touched."""
    api = FakeApi()
    world(api, binding="WaitForFirstConsumer", pools_on=BOTH, selected="n0",
          record_pool="a", record_node="n0")
    api.add({"apiVersion": "v1", "kind": "PersistentVolume",
             "metadata": {"name": "pvc-u1"}, "spec": {}})

    async def run():
        ctx = context(api)
        p = PoolProvisioner(ctx)
        api.sync(ctx.informers, kinds=[K.PVCS, K.CLASSES, K.NODES, K.POOLS, K.ALLOCATIONS])
        p.pc.loaded.set()
        await p.provision(api.obj(K.PVCS, "c", "ns"), "sc", "n0")
    asyncio.run(run())
    assert api.obj(K.ALLOCATIONS, "pvc-u1") is not None
    assert api.writes() == []
    assert SELECTED in api.obj(K.PVCS, "c", "ns")["metadata"]["annotations"]


def test_a_record_whose_pool_still_serves_the_claim_is_used():
    api = FakeApi()
    world(api, binding="WaitForFirstConsumer", pools_on=BOTH, selected="n1",
          record_pool="b", record_node="n1")
    provision(api, "n1")
    assert api.obj(K.PVS, "pvc-u1")["spec"]["csi"]["volumeHandle"] == "b/pvc-u1"
    assert [v for v, _ in api.writes(contains="storageallocations")] == []
