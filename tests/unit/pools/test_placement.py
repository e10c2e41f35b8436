"""Which nodes a pool reaches and which pool a claim gets (volplane.pools.placement)."""

from __future__ import annotations

import pytest

from volplane.pools.ledger import Ledger
from volplane.pools.parameters import (
    ClassParams,
    parse_class_parameters,
)
from volplane.pools.placement import choose_pool, node_affinity, pool_capacity, pool_nodes

from .world import GI, NODES, RWO, ledger_with, pool, pools

# --- pool_nodes ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec_nodes, expected", [
    ({"names": ["n0", "n1"]}, ["n0", "n1"]),
    ({"names": ["n0", "gone"]}, ["n0"]),
    ({"selector": {"matchLabels": {"topology.kubernetes.io/zone": "zone-b"}}}, ["n1", "n3"]),
    ({"selector": {"matchExpressions": [{"key": "disk", "operator": "Exists"}]}}, ["n0", "n1"]),
    ({"names": ["n2"], "selector": {"matchLabels": {"disk": "ssd"}}}, ["n0", "n1", "n2"]),
    ({"names": ["n0"], "selector": {}}, ["n0"]),  # an empty selector adds nothing
    ({"selector": {"matchLabels": {"disk": "hdd"}}}, []),
    ({"names": []}, []),
])
def test_pool_nodes(spec_nodes, expected):
    p = {"metadata": {"name": "p"}, "spec": {"capacity": "1Gi", "nodes": spec_nodes}}
    assert pool_nodes(p, NODES) == expected


def test_pool_nodes_skips_nodes_being_deleted():
    nodes = dict(NODES)
    nodes["n1"] = {"metadata": {**NODES["n1"]["metadata"],
                                "deletionTimestamp": "2024-01-01T00:00:00Z"}}
    assert pool_nodes(pool("p", names=["n0", "n1"]), nodes) == ["n0"]


@pytest.mark.parametrize("capacity, expected", [
    ("20Gi", 20 * GI), (1000, 1000), ("1.5Gi", GI * 3 // 2), ("0", None), ("-1Gi", None),
    ("lots", None), (None, None),
])
def test_pool_capacity(capacity, expected):
    p = pool("p", capacity=capacity)
    if capacity is None:
        del p["spec"]["capacity"]
    assert pool_capacity(p) == expected


# --- choose_pool -----------------------------------------------------------------------------


CASES = [
    # (name, pools, ledger, size, modes, params, kwargs, expected pool, reason fragment)
    ("best fit picks the fullest pool that fits",
     pools(pool("a"), pool("b"), pool("c")), ledger_with(a=5, b=15, c=19), 2 * GI, RWO,
     {}, {}, "b", "chosen (BestFit)"),
    ("spread picks the emptiest pool",
     pools(pool("a"), pool("b"), pool("c")), ledger_with(a=5, b=15, c=19), 2 * GI, RWO,
     {"placement": "Spread"}, {}, "a", "chosen (Spread)"),
    ("exact fit is a fit",
     pools(pool("a")), ledger_with(a=18), 2 * GI, RWO, {}, {}, "a", ""),
    ("full pool",
     pools(pool("fast-a")), ledger_with(**{"fast-a": 19}), 2 * GI, RWO, {}, {}, None,
     'pool "fast-a" full: 19Gi of 20Gi allocated, 1Gi free < 2Gi requested'),
    ("access mode not served",
     pools(pool("a")), Ledger(), GI, ["ReadWriteMany"], {}, {}, None,
     'pool "a" does not serve ReadWriteMany (serves ReadWriteOnce, ReadWriteOncePod)'),
    ("shared pool serves RWX when it says so",
     pools(pool("a"), pool("shared", names=["n0", "n1"], modes=["ReadWriteOnce", "ReadWriteMany"])),
     Ledger(), GI, ["ReadWriteMany"], {}, {}, "shared", ""),
    ("node not attached (WaitForFirstConsumer)",
     pools(pool("a", names=["n0"])), Ledger(), GI, RWO, {}, {"node": "n1"}, None,
     'pool "a" is not attached to node "n1"'),
    ("the pool attached to the selected node wins",
     pools(pool("a", names=["n0"]), pool("b", names=["n1"])), ledger_with(a=19), GI, RWO,
     {}, {"node": "n1"}, "b", ""),
    ("allowedTopologies excludes the pool",
     pools(pool("a", names=["n0"])), Ledger(), GI, RWO, {},
     {"allowed_topologies": [{"matchLabelExpressions": [
         {"key": "topology.kubernetes.io/zone", "values": ["zone-b"]}]}]},
     None, "allowedTopologies"),
    ("allowedTopologies keeps the pool in zone",
     pools(pool("a", names=["n0"]), pool("b", names=["n1"])), Ledger(), GI, RWO, {},
     {"allowed_topologies": [{"matchLabelExpressions": [
         {"key": "topology.kubernetes.io/zone", "values": ["zone-b"]}]}]},
     "b", ""),
    ("no node exists",
     pools(pool("a", names=["ghost"])), Ledger(), GI, RWO, {}, {}, None,
     'pool "a" is attached to no existing node'),
    ("class parameters select nothing",
     pools(pool("a", params={"media": "hdd"})), Ledger(), GI, RWO, {"media": "ssd"}, {}, None,
     "no StoragePool matches the class parameters (media=ssd)"),
    ("media selects",
     pools(pool("a", params={"media": "hdd"}), pool("b", params={"media": "ssd"})), Ledger(),
     GI, RWO, {"media": "ssd"}, {}, "b", ""),
    ("pool names select",
     pools(pool("a"), pool("b")), Ledger(), GI, RWO, {"pool": "b"}, {}, "b", ""),
    ("pool selector selects",
     pools(pool("a", labels={"tier": "gold"}), pool("b")), ledger_with(a=10), GI, RWO,
     {"poolSelector": "tier=gold"}, {}, "a", ""),
    ("deleting pool is skipped",
     pools(pool("a", deletionTimestamp="2024-01-01T00:00:00Z")), Ledger(), GI, RWO, {}, {},
     None, 'pool "a" is being deleted'),
    ("invalid capacity is skipped",
     pools(pool("a", capacity="0")), Ledger(), GI, RWO, {}, {}, None, "invalid capacity"),
]


@pytest.mark.parametrize("name, ps, led, size, modes, params, kwargs, expected, fragment",
                         CASES, ids=[c[0] for c in CASES])
def test_choose_pool(name, ps, led, size, modes, params, kwargs, expected, fragment):
    choice = choose_pool(size, modes, parse_class_parameters(params), ps, led, nodes=NODES,
                         **kwargs)
    assert choice.pool == expected, choice.reason
    assert fragment in choice.reason
    if expected is not None:
        cap = pool_capacity(ps[expected])
        assert led.allocated(expected) + size <= cap
        assert choice.nodes


def test_choose_pool_reason_names_every_pool():
    ps = pools(pool("a", names=["n0"]), pool("b", names=["n1"]))
    choice = choose_pool(3 * GI, RWO, ClassParams(), ps, ledger_with(a=19, b=18), nodes=NODES)
    assert choice.pool is None
    assert 'pool "a" full: 19Gi of 20Gi allocated, 1Gi free < 3Gi requested' in choice.reason
    assert 'pool "b" full: 18Gi of 20Gi allocated, 2Gi free < 3Gi requested' in choice.reason
    assert dict(choice.rejected).keys() == {"a", "b"}


def test_choose_pool_nodes_are_the_usable_pool_nodes():
    ps = pools(pool("a", names=["n0", "n1", "n2"]))
    topo = [{"matchLabelExpressions": [{"key": "topology.kubernetes.io/zone",
                                        "values": ["zone-a"]}]}]
    choice = choose_pool(GI, RWO, ClassParams(), ps, Ledger(), nodes=NODES,
                         allowed_topologies=topo)
    assert choice.nodes == ("n0", "n2")
    assert node_affinity(choice.nodes, NODES) == {"required": {"nodeSelectorTerms": [{
        "matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In",
                              "values": ["n0", "n2"]}]}]}}


def test_spread_ties_prefer_fewer_volumes():
    led = Ledger()
    led.observe("x1", "a", 2 * GI)
    led.observe("x2", "a", 2 * GI)
    led.observe("y1", "b", 4 * GI)
    choice = choose_pool(GI, RWO, parse_class_parameters({"placement": "Spread"}),
                         pools(pool("a"), pool("b")), led, nodes=NODES)
    assert choice.pool == "b"
