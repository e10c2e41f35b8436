"""Unit tests of the pool provisioner's decision layer (volplane.pools.ledger)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volplane.pools.ledger import (
    BEST_FIT,
    SPREAD,
    ClassParams,
    Ledger,
    ParameterError,
    capacity_object_name,
    capacity_objects,
    choose_pool,
    node_affinity,
    parse_class_parameters,
    parse_selector,
    pool_capacity,
    pool_nodes,
    pool_status,
    status_differs,
)

GI = 1024**3


def node(name: str, zone: str = "zone-a", **labels) -> dict:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                                  "topology.kubernetes.io/zone": zone,
                                                  **labels}}}


NODES = {n["metadata"]["name"]: n for n in (
    node("n0", "zone-a", disk="ssd"), node("n1", "zone-b", disk="ssd"),
    node("n2", "zone-a"), node("n3", "zone-b"))}


def pool(name: str, capacity="20Gi", names=("n0",), selector=None, modes=None,
         labels=None, params=None, **extra) -> dict:
    nodes: dict = {}
    if names:
        nodes["names"] = list(names)
    if selector is not None:
        nodes["selector"] = selector
    spec: dict = {"capacity": capacity, "nodes": nodes}
    if modes is not None:
        spec["accessModes"] = list(modes)
    if params is not None:
        spec["parameters"] = params
    md: dict = {"name": name, "labels": labels or {}, **extra}
    return {"apiVersion": "volplane.io/v1alpha1", "kind": "StoragePool", "metadata": md,
            "spec": spec}


def pools(*ps: dict) -> dict:
    return {p["metadata"]["name"]: p for p in ps}


RWO = ["ReadWriteOnce"]


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
    nodes["n1"] = {"metadata": {**NODES["n1"]["metadata"], "deletionTimestamp": "2024-01-01T00:00:00Z"}}
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


# --- parse_class_parameters ------------------------------------------------------------------


@pytest.mark.parametrize("params, expected", [
    (None, ClassParams()),
    ({}, ClassParams()),
    ({"pool": "a, b,a"}, ClassParams(pools=("a", "b"))),
    ({"media": "ssd", "tier": "gold"}, ClassParams(match=(("media", "ssd"), ("tier", "gold")))),
    ({"match.region": "eu"}, ClassParams(match=(("region", "eu"),))),
    ({"placement": "Spread"}, ClassParams(placement=SPREAD)),
    ({"placement": "BestFit"}, ClassParams(placement=BEST_FIT)),
    ({"csi.storage.k8s.io/fstype": "xfs"}, ClassParams(fs_type="xfs")),
])
def test_parse_class_parameters(params, expected):
    assert parse_class_parameters(params) == expected


def test_parse_pool_selector():
    p = parse_class_parameters({"poolSelector": "tier=gold, env!=dev, fast, !slow, "
                                                "zone in (a, b), rack notin (r1)"})
    assert p.pool_selector == {
        "matchLabels": {"tier": "gold"},
        "matchExpressions": [
            {"key": "env", "operator": "NotIn", "values": ["dev"]},
            {"key": "fast", "operator": "Exists"},
            {"key": "slow", "operator": "DoesNotExist"},
            {"key": "zone", "operator": "In", "values": ["a", "b"]},
            {"key": "rack", "operator": "NotIn", "values": ["r1"]},
        ],
    }
    assert p.selects(pool("x", labels={"tier": "gold", "fast": "", "zone": "a"}))
    assert not p.selects(pool("x", labels={"tier": "gold", "fast": "", "zone": "c"}))
    assert not p.selects(pool("x", labels={"tier": "gold", "fast": "", "zone": "a", "slow": "1"}))


@pytest.mark.parametrize("params, field", [
    ({"poool": "a"}, "poool"),
    ({"fstype": "ext4"}, "fstype"),
    ({"csi.storage.k8s.io/provisioner-secret-name": "s"},
     "csi.storage.k8s.io/provisioner-secret-name"),
    ({"placement": "Random"}, "placement"),
    ({"placement": "bestfit"}, "placement"),
    ({"pool": "Not_A_Name"}, "pool"),
    ({"pool": "a,,b"}, "pool"),
    ({"poolSelector": ""}, "poolSelector"),
    ({"poolSelector": "a=b,"}, "poolSelector"),
    ({"poolSelector": "in valid"}, "poolSelector"),
    ({"poolSelector": "k=v v"}, "poolSelector"),
    ({"poolSelector": "zone in ()"}, "poolSelector"),
    ({"media": ""}, "media"),
    ({"match.": "x"}, "match."),
    ({"csi.storage.k8s.io/fstype": "ntfs"}, "csi.storage.k8s.io/fstype"),
    ({"media": "ssd", "match.media": "hdd"}, "media"),
])
def test_parse_class_parameters_rejects(params, field):
    with pytest.raises(ParameterError) as err:
        parse_class_parameters(params)
    assert err.value.field == field
    assert f'"{field}"' in str(err.value)


def test_unknown_parameter_message_lists_the_accepted_ones():
    with pytest.raises(ParameterError, match="unknown parameter.*poolSelector.*placement"):
        parse_class_parameters({"mediaa": "ssd"})


def test_parse_selector_double_equals():
    assert parse_selector("a==b") == {"matchLabels": {"a": "b"}}


# --- choose_pool -----------------------------------------------------------------------------


def ledger_with(**allocated_gi: int) -> Ledger:
    led = Ledger()
    for i, (p, gi) in enumerate(allocated_gi.items()):
        if gi:
            led.observe(f"pvc-{i}", p, gi * GI)
    return led


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


# --- the ledger ------------------------------------------------------------------------------


def test_ledger_reserve_observe_cancel():
    led = Ledger()
    assert led.reserve("v1", "a", 10, capacity=15)
    assert not led.reserve("v2", "a", 10, capacity=15)  # no room
    assert led.reserve("v1", "a", 10, capacity=15)  # idempotent
    assert led.allocated("a") == 10 and led.count("a") == 1
    led.cancel("v1")
    assert led.allocated("a") == 0 and len(led) == 0
    assert led.reserve("v1", "a", 10, capacity=15)
    led.observe("v1", "a", 10)  # the record landed
    led.cancel("v1")  # no effect on a committed allocation
    assert led.allocated("a") == 10
    assert led.release("v1").size == 10
    assert led.allocated("a") == 0 and led.pools() == set()


def test_ledger_grow_in_flight_is_not_shrunk_by_a_stale_record():
    led = Ledger()
    led.observe("v", "a", 10)
    assert not led.grow("v", 30, capacity=25)
    assert led.grow("v", 20, capacity=25)
    assert led.allocated("a") == 20
    led.observe("v", "a", 10)  # e.g. a watch event from before the grow landed
    assert led.allocated("a") == 20
    led.cancel("v")  # the grow's write failed
    assert led.allocated("a") == 10
    assert led.grow("v", 20, capacity=25)
    led.observe("v", "a", 20)
    led.cancel("v")
    assert led.allocated("a") == 20


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "grow"]),
                          st.integers(1, 8), st.integers(0, 30)), max_size=80),
       st.sampled_from([BEST_FIT, SPREAD]))
def test_random_allocate_free_never_exceeds_capacity(ops, placement):
    caps = {"a": 10 * GI, "b": 16 * GI, "c": 7 * GI}
    ps = pools(*(pool(n, capacity=c, names=["n0"]) for n, c in caps.items()))
    params = ClassParams(placement=placement)
    led = Ledger()
    live: list[str] = []
    for i, (op, gi, pick) in enumerate(ops):
        if op == "alloc":
            choice = choose_pool(gi * GI, RWO, params, ps, led, nodes=NODES)
            fits = [n for n, c in caps.items() if led.allocated(n) + gi * GI <= c]
            assert (choice.pool is None) == (not fits)
            if choice.pool:
                assert led.reserve(f"v{i}", choice.pool, gi * GI, caps[choice.pool])
                if pick % 3:  # most records land; some writes fail and are cancelled
                    led.observe(f"v{i}", choice.pool, gi * GI)
                    live.append(f"v{i}")
                else:
                    led.cancel(f"v{i}")
        elif op == "free" and live:
            led.release(live.pop(pick % len(live)))
        elif op == "grow" and live:
            name = live[pick % len(live)]
            a = led.get(name)
            if led.grow(name, a.size + gi * GI, caps[a.pool]):
                led.observe(name, a.pool, a.size + gi * GI)
        for n, c in caps.items():
            assert led.allocated(n) <= c
            assert led.allocated(n) == sum(led.sizes(n))
            assert led.count(n) == len(led.sizes(n))


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


def test_pool_status_from_records_and_no_nodes():
    records = [{"spec": {"pool": "a", "sizeBytes": GI}}, {"spec": {"pool": "b", "sizeBytes": GI}}]
    st1 = pool_status(pool("a", names=["ghost"]), records, NODES)
    assert st1["volumeCount"] == 1 and st1["allocatedBytes"] == GI
    ready = next(c for c in st1["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "NoNodes"


def test_pool_status_overcommitted_after_shrink():
    st1 = pool_status(pool("a", capacity="1Gi"), [2 * GI], NODES)
    assert st1["availableBytes"] == 0
    degraded = next(c for c in st1["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "OverCommitted"


# --- capacity objects ------------------------------------------------------------------------------


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
    from volplane.pools.ledger import NODE_TOPOLOGY_KEY

    assert NODE_TOPOLOGY_KEY == TOPOLOGY_KEY
