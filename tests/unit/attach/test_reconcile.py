"""The reconciler: detaches, then attaches (volplane.attach.reconcile)."""

from __future__ import annotations

import pytest

from volplane.attach import actual as A
from volplane.attach import desired as D
from volplane.attach import names as N
from volplane.attach import reconcile as RC

from .world import (
    DRIVER,
    base_world,
    dsw_of,
    node,
    pod,
    pv,
    pvc,
    uname,
    va,
    world,
)


def plan(w, vas, *, now=1000.0, max_wait=360.0, requested=None):
    asw = A.build_asw(vas, pvs=w["pvs"], nodes=w["nodes"])
    return RC.reconcile(dsw_of(w), asw, w["nodes"], now, max_wait, requested or {})


def kinds(ops):
    return [(o.kind.value, o.pv_name, o.node) for o in ops]


def test_attach_when_desired_and_not_attached():
    w = base_world(pod("ns", "p", "n1", "c1"))
    ops = plan(w, [])
    assert kinds(ops) == [("attach", "pv1", "n1")]
    assert ops[0].va_name == N.volume_attachment_name("pool-a/pv1", DRIVER, "n1")
    body = RC.volume_attachment_body(ops[0].volume, "n1")
    assert body["spec"] == {"attacher": DRIVER, "nodeName": "n1",
                            "source": {"persistentVolumeName": "pv1"}}
    assert body["metadata"]["name"] == ops[0].va_name


@pytest.mark.parametrize("state_kw,want", [
    ({}, []),                                    # attached: nothing to do
    ({"attached": False}, [("wait", "pv1", "n1")]),
    ({"deleting": True}, [("wait", "pv1", "n1")]),   # re-attach after the detach ends
    ({"attached": False, "attach_error": "boom"}, [("attach-failed", "pv1", "n1")]),
])
def test_desired_and_present(state_kw, want):
    w = base_world(pod("ns", "p", "n1", "c1"))
    ops = plan(w, [va("pv1", "n1", **state_kw)])
    assert kinds(ops) == want
    if want and want[0][0] == "attach-failed":
        assert ops[0].events[0][1] == 'AttachVolume.Attach failed for volume "pv1" : boom'


def test_moving_a_rwo_volume_detaches_before_attaching():
    w = base_world(pod("ns", "p", "n2", "c1"))
    ops = plan(w, [va("pv1", "n1")])
    assert kinds(ops) == [("detach", "pv1", "n1"), ("wait", "pv1", "n2")]
    # once the old attachment is being deleted: still wait, no multi-attach error
    ops = plan(w, [va("pv1", "n1", deleting=True)])
    assert kinds(ops) == [("wait", "pv1", "n2")]
    # gone: attach
    assert kinds(plan(w, [])) == [("attach", "pv1", "n2")]


def test_rwx_volume_attaches_to_several_nodes():
    w = world(node("n1"), node("n2"), pv("pv1", modes=("ReadWriteMany",),
                                         claim=("ns", "c1", "uid-ns-c1")),
              pvc("ns", "c1", "pv1"), pod("ns", "a", "n1", "c1"), pod("ns", "b", "n2", "c1"))
    assert kinds(plan(w, [va("pv1", "n1")])) == [("attach", "pv1", "n2")]


def test_pv_without_access_modes_allows_multi_attach():
    w = world(node("n1"), node("n2"), pv("pv1", modes=(), claim=("ns", "c1", "uid-ns-c1")),
              pvc("ns", "c1", "pv1"), pod("ns", "a", "n1", "c1"), pod("ns", "b", "n2", "c1"))
    assert sorted(kinds(plan(w, []))) == [("attach", "pv1", "n1"), ("attach", "pv1", "n2")]


@pytest.mark.parametrize("modes", [("ReadWriteOnce",), ("ReadWriteOncePod",),
                                   ("ReadWriteOnce", "ReadWriteOncePod")])
def test_multi_attach_error_names_pods_in_the_same_namespace_only(modes):
    w = world(node("n1"), node("n2"), pv("pv1", modes=modes, claim=("ns", "c1", "uid-ns-c1")),
              pvc("ns", "c1", "pv1"),
              pod("ns", "a", "n1", "c1"), pod("ns", "b", "n1", "c1"),
              pod("ns", "late", "n2", "c1", created="2024-01-02T00:00:00Z"))
    ops = plan(w, [va("pv1", "n1")])
    assert kinds(ops) == [("multi-attach", "pv1", "n2")]
    (target, message), = ops[0].events
    assert target.name == "late"
    assert message == 'Waiting for detach for volume "pv1" Volume is already used by pod(s) a, b'


def test_multi_attach_message_variants():
    me = D.PodRef("ns", "me")
    assert RC.multi_attach_message("v", me, [D.PodRef("ns", "a"), D.PodRef("x", "b"),
                                            D.PodRef("y", "c")]) == (
        'Waiting for detach for volume "v" Volume is already used by pod(s) a and 2 pod(s) '
        "in different namespaces")
    assert RC.multi_attach_message("v", me, [D.PodRef("x", "b")]) == (
        'Waiting for detach for volume "v" Volume is already used by 1 pod(s) in different '
        "namespaces")
    assert RC.multi_attach_message("v", me, []) == (
        'Waiting for detach for volume "v" Volume is already exclusively attached to one '
        "node, waiting on detach before it can be attached to another node")


def test_two_nodes_want_an_unattached_rwo_volume_the_oldest_pod_wins():
    w = base_world(pod("ns", "new", "n1", "c1", created="2024-01-02T00:00:00Z"),
                   pod("ns", "old", "n2", "c1", created="2024-01-01T00:00:00Z"))
    ops = plan(w, [])
    assert kinds(ops) == [("attach", "pv1", "n2"), ("multi-attach", "pv1", "n1")]
    assert ops[1].events[0][1].endswith("Volume is already used by pod(s) old")


def test_attached_but_unwanted_elsewhere_gives_the_simple_multi_attach_message():
    # the pod on n1 is gone but n1 still has the volume mounted: no pod to name
    w = world(node("n1", in_use=[uname("pv1")]), node("n2"),
              pv("pv1", claim=("ns", "c1", "uid-ns-c1")), pvc("ns", "c1", "pv1"),
              pod("ns", "b", "n2", "c1"))
    ops = plan(w, [va("pv1", "n1")])
    assert kinds(ops) == [("wait-unmount", "pv1", "n1"), ("multi-attach", "pv1", "n2")]
    assert "already exclusively attached to one node" in ops[1].events[0][1]


# safe detach: (node kwargs, node exists?, seconds waited, expected op, forced reason)
SAFE_DETACH = [
    pytest.param({}, True, 0, "detach", None, id="not in use: detach"),
    pytest.param({"in_use": [uname("pv1")]}, True, 0, "wait-unmount", None,
                 id="in use: wait"),
    pytest.param({"in_use": [uname("pv1")]}, True, 10_000, "wait-unmount", None,
                 id="in use on a Ready node: wait forever"),
    pytest.param({"in_use": [uname("pv1")], "ready": False}, True, 100, "wait-unmount", None,
                 id="in use, NotReady, max wait not passed: wait"),
    pytest.param({"in_use": [uname("pv1")], "ready": False}, True, 361, "detach", "timeout",
                 id="in use, NotReady, max wait passed: forced"),
    pytest.param({"in_use": [uname("pv1")],
                  "taints": [{"key": RC.OUT_OF_SERVICE_TAINT, "effect": "NoExecute"}]},
                 True, 0, "detach", "out-of-service", id="out-of-service taint: at once"),
    pytest.param({"in_use": [uname("other")]}, True, 0, "detach", None,
                 id="another volume in use: detach"),
    pytest.param({}, False, 0, "detach", "node-deleted", id="Node deleted: at once"),
]


@pytest.mark.parametrize("node_kw,exists,waited,want,forced", SAFE_DETACH)
def test_safe_detach(node_kw, exists, waited, want, forced):
    objs = [pv("pv1"), node("n2")]
    if exists:
        objs.append(node("n1", **node_kw))
    w = world(*objs)
    now = 10_000.0
    ops = plan(w, [va("pv1", "n1")], now=now, requested={(uname("pv1"), "n1"): now - waited})
    assert [(o.kind.value, o.forced) for o in ops] == [(want, forced)]
    if want == "wait-unmount":
        assert ops[0].since == now - waited
        if node_kw.get("ready") is False:
            assert ops[0].retry_at == now - waited + 360.0
        else:
            assert ops[0].retry_at is None


def test_wait_unmount_starts_its_clock_on_first_sight():
    w = world(node("n1", in_use=[uname("pv1")], ready=False), pv("pv1"))
    (op,) = plan(w, [va("pv1", "n1")], now=50.0)
    assert op.since == 50.0 and op.retry_at == 410.0


def test_detach_failure_is_surfaced():
    w = world(node("n1"), pv("pv1"))
    ops = plan(w, [va("pv1", "n1", deleting=True, detach_error="stuck")])
    assert kinds(ops) == [("detach-failed", "pv1", "n1")]
    assert ops[0].reason == 'DetachVolume.Detach failed for volume "pv1" : stuck'


def test_detaches_come_before_attaches():
    w = world(node("n1"), node("n2"),
              pv("pv1", claim=("ns", "c1", "uid-ns-c1")), pvc("ns", "c1", "pv1"),
              pv("pv2", claim=("ns", "c2", "uid-ns-c2")), pvc("ns", "c2", "pv2"),
              pod("ns", "p", "n1", "c2"))
    ops = plan(w, [va("pv1", "n1"), va("pv1", "n2")])
    assert kinds(ops) == [("detach", "pv1", "n1"), ("detach", "pv1", "n2"),
                          ("attach", "pv2", "n1")]


def test_reconcile_is_idempotent_once_converged():
    """Property: applying the ops and reconciling again yields no more attach/detach."""
    w = world(node("n1"), node("n2"), node("n3", in_use=[uname("pv3")]),
              *[pv(f"pv{i}", claim=("ns", f"c{i}", f"uid-ns-c{i}")) for i in range(1, 5)],
              *[pvc("ns", f"c{i}", f"pv{i}") for i in range(1, 5)],
              pod("ns", "a", "n1", "c1", "c2"), pod("ns", "b", "n2", "c2"),
              pod("ns", "c", "n2", "c4"))
    vas = {v["metadata"]["name"]: v for v in [va("pv3", "n3"), va("pv4", "n1")]}
    for _ in range(5):
        for op in plan(w, list(vas.values())):
            if op.kind is RC.OpKind.ATTACH:
                vas[op.va_name] = va(op.pv_name, op.node)
            elif op.kind is RC.OpKind.DETACH:
                del vas[op.va_name]
    final = plan(w, list(vas.values()))
    assert {o.kind for o in final} <= {RC.OpKind.MULTI_ATTACH, RC.OpKind.WAIT_UNMOUNT}
    attached = sorted((v["spec"]["source"]["persistentVolumeName"], v["spec"]["nodeName"])
                      for v in vas.values())
    # pv2 (RWO) is wanted on n1 and n2: exactly one of them has it
    assert [a for a in attached if a[0] == "pv2"] in ([("pv2", "n1")], [("pv2", "n2")])
    assert ("pv3", "n3") in attached            # still mounted there
    assert ("pv4", "n2") in attached and ("pv4", "n1") not in attached


# RWO volume wanted on n2 while n1 (whose pod still wants it too) has a VolumeAttachment
# in this state: only confirmed (or just decided) and uncertain attachments hold it.
@pytest.mark.parametrize(
    ("elsewhere", "expect"),
    [
        pytest.param(dict(attached=True), ("multi-attach", "multi-attach"),
                     id="attached elsewhere: the multi-attach report"),
        pytest.param(dict(attached=False), ("wait", "attaching-elsewhere"),
                     id="uncertain attach elsewhere (in flight, no error) blocks quietly"),
        pytest.param(dict(attached=False, attach_error="rpc error: code = Internal"),
                     ("attach", ""), id="a finally failed attach elsewhere does not block"),
        pytest.param(dict(attached=True, deleting=True), ("wait", "detaching-elsewhere"),
                     id="being detached elsewhere: wait for it"),
    ],
)
def test_rwo_volume_is_held_only_by_confirmed_or_uncertain_attachments(elsewhere, expect):
    w = base_world(pod("ns", "first", "n1", "c1", created="2024-01-01T00:00:00Z"),
                   pod("ns", "second", "n2", "c1", created="2024-01-02T00:00:00Z"))
    ops = [o for o in plan(w, [va("pv1", "n1", **elsewhere)]) if o.node == "n2"]
    assert [(o.kind.value, o.reason) for o in ops] == [expect]
    if expect[0] == "multi-attach":
        assert ops[0].events[0][1] == (
            'Waiting for detach for volume "pv1" Volume is already used by pod(s) first')


# -- identity: upstream's unique volume name, not the PV -----------------------------------
SHARED = "pool-a/shared"


def shared_world(*pods):
    """Two RWO PVs on one volume handle, each bound to its own claim."""
    return world(node("n1"), node("n2"),
                 pv("pv-a", handle=SHARED, claim=("ns", "ca", "uid-ns-ca")),
                 pv("pv-b", handle=SHARED, claim=("ns", "cb", "uid-ns-cb")),
                 pvc("ns", "ca", "pv-a"), pvc("ns", "cb", "pv-b"), *pods)


def test_two_pvs_on_one_handle_are_one_desired_volume_per_node():
    w = shared_world(pod("ns", "a", "n1", "ca"), pod("ns", "b", "n1", "cb"))
    d = dsw_of(w)
    assert list(d) == [(N.unique_volume_name(DRIVER, SHARED), "n1")]
    (entry,) = d.values()
    assert [p.name for p in entry.pods] == ["a", "b"]
    assert entry.volume.pv_name == "pv-a"  # the smallest PV name stands for the volume


def test_two_pvs_on_one_handle_on_two_nodes_get_one_attachment_and_the_multi_attach_report():
    w = shared_world(pod("ns", "a", "n1", "ca", created="2024-01-01T00:00:00Z"),
                     pod("ns", "b", "n2", "cb", created="2024-01-02T00:00:00Z"))
    ops = plan(w, [])
    assert [(o.kind.value, o.node) for o in ops] == [("attach", "n1"), ("multi-attach", "n2")]
    # named after the PV the waiting pod uses (upstream: its volume spec's name)
    assert ops[1].events[0][1] == (
        'Waiting for detach for volume "pv-b" Volume is already used by pod(s) a')


def test_a_pod_going_never_detaches_the_attachment_another_pv_on_the_handle_needs():
    # pod a (pv-a) is gone from n1; pod b still uses the volume there through pv-b
    w = shared_world(pod("ns", "b", "n1", "cb"))
    ops = plan(w, [va("pv-a", "n1", handle=SHARED)])
    assert ops == []
