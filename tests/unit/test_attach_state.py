"""Unit tests of the Attach/Detach decision layer (volplane.attach.state) and, with a
fake API, of the controller's and pool attacher's effects."""

from __future__ import annotations

import asyncio
import copy
import itertools

import pytest

from volplane import kinds as K
from volplane.attach import state as S

DRIVER = "pool.volplane.io"
T0 = "2024-01-01T00:00:00Z"


# -- builders ------------------------------------------------------------------------------
def node(name, *, managed=True, ready=True, in_use=(), taints=(), labels=None, attached=()):
    md = {"name": name, "uid": f"uid-{name}", "resourceVersion": "1",
          "labels": labels or {"kubernetes.io/hostname": name}}
    if managed:
        md["annotations"] = {S.MANAGED_ANNOTATION: "true"}
    return {"apiVersion": "v1", "kind": "Node", "metadata": md,
            "spec": {"taints": list(taints)},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                       "volumesInUse": list(in_use),
                       "volumesAttached": list(attached)}}


def pv(name, *, driver=DRIVER, handle=None, modes=("ReadWriteOnce",), claim=None):
    spec = {"accessModes": list(modes), "capacity": {"storage": "1Gi"},
            "csi": {"driver": driver, "volumeHandle": handle or f"pool-a/{name}"}}
    if claim:
        spec["claimRef"] = {"namespace": claim[0], "name": claim[1], "uid": claim[2]}
    return {"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name, "resourceVersion": "1"}, "spec": spec,
            "status": {"phase": "Bound"}}


def pvc(ns, name, volume, *, phase="Bound", uid=None, owner=None):
    md = {"name": name, "namespace": ns, "uid": uid or f"uid-{ns}-{name}",
          "resourceVersion": "1"}
    if owner:
        md["ownerReferences"] = [{"kind": "Pod", "name": "x", "uid": owner, "controller": True}]
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": md,
            "spec": {"volumeName": volume}, "status": {"phase": phase}}


def pod(ns, name, node_name, *claims, phase="Running", deleted=False, running=True,
        created=T0, ephemeral=()):
    vols = [{"name": f"v{i}", "persistentVolumeClaim": {"claimName": c}}
            for i, c in enumerate(claims)]
    vols += [{"name": e, "ephemeral": {"volumeClaimTemplate": {}}} for e in ephemeral]
    vols.append({"name": "cfg", "configMap": {"name": "c"}})
    md = {"name": name, "namespace": ns, "uid": f"uid-{name}", "resourceVersion": "1",
          "creationTimestamp": created}
    if deleted:
        md["deletionTimestamp"] = "2024-01-01T00:01:00Z"
    state = {"running": {}} if running else {"terminated": {"exitCode": 0}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": md,
            "spec": {"nodeName": node_name, "volumes": vols},
            "status": {"phase": phase, "containerStatuses": [{"name": "c", "state": state}]}}


def world(*objs):
    """Index objects like the cache does: PVCs and Pods "ns/name", the rest by name."""
    out = {"pods": {}, "pvcs": {}, "pvs": {}, "drivers": {}, "nodes": {}}
    plural = {"Pod": "pods", "PersistentVolumeClaim": "pvcs", "PersistentVolume": "pvs",
              "CSIDriver": "drivers", "Node": "nodes"}
    for o in objs:
        md = o["metadata"]
        key = f"{md['namespace']}/{md['name']}" if md.get("namespace") else md["name"]
        out[plural[o["kind"]]][key] = o
    return out


def csidriver(name, attach_required):
    spec = {} if attach_required is None else {"attachRequired": attach_required}
    return {"apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver",
            "metadata": {"name": name}, "spec": spec}


def dsw_of(w):
    return S.build_dsw(w["pods"].values(), pvcs=w["pvcs"], pvs=w["pvs"],
                       drivers=w["drivers"], nodes=w["nodes"])


def va(pv_name, node_name, *, handle=None, attached=True, deleting=False, driver=DRIVER,
       attach_error=None, detach_error=None, name=None):
    handle = handle or f"pool-a/{pv_name}"
    md = {"name": name or S.volume_attachment_name(handle, driver, node_name),
          "resourceVersion": "1"}
    if deleting:
        md["deletionTimestamp"] = "2024-01-01T00:02:00Z"
    st = {"attached": attached}
    if attach_error:
        st["attachError"] = {"message": attach_error}
    if detach_error:
        st["detachError"] = {"message": detach_error}
    return {"apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment", "metadata": md,
            "spec": {"attacher": driver, "nodeName": node_name,
                     "source": {"persistentVolumeName": pv_name}},
            "status": st}


def uname(pv_name, driver=DRIVER):
    return S.unique_volume_name(driver, f"pool-a/{pv_name}")


# -- names ---------------------------------------------------------------------------------
@pytest.mark.parametrize("handle,driver,node_name,want", [
    # sha256 of the concatenation, computed outside Python (printf '%s' ... | sha256sum)
    ("pool-a/pvc-1", "pool.volplane.io", "kwok-node-0",
     "csi-88b8e938e097142b887d41fc935607417f5939d108cc699234c4c87918382006"),
    ("vol-123", "ebs.csi.aws.com", "ip-10-0-0-1",
     "csi-7a3777897e100f1d265cd6a2f905d848d3d1f48b704ae0ab73eef21a2eb996be"),
])
def test_volume_attachment_name_is_upstreams(handle, driver, node_name, want):
    assert S.volume_attachment_name(handle, driver, node_name) == want


def test_unique_volume_name_round_trip():
    name = S.unique_volume_name("pool.volplane.io", "pool-a/pv-1")
    assert name == "kubernetes.io/csi/pool.volplane.io^pool-a/pv-1"
    assert S.parse_unique_volume_name(name) == ("pool.volplane.io", "pool-a/pv-1")
    assert S.parse_unique_volume_name("kubernetes.io/aws-ebs/vol-1") is None


# -- desired state -------------------------------------------------------------------------
def base_world(*extra):
    return world(node("n1"), node("n2"), pv("pv1", claim=("ns", "c1", "uid-ns-c1")),
                 pvc("ns", "c1", "pv1"), *extra)


@pytest.mark.parametrize("the_pod,extra,want", [
    pytest.param(pod("ns", "p", "n1", "c1"), (), {("pv1", "n1"): ["p"]}, id="running pod"),
    pytest.param(pod("ns", "p", None, "c1"), (), {}, id="not scheduled"),
    pytest.param(pod("ns", "p", "n1", "c1", phase="Succeeded"), (), {}, id="succeeded"),
    pytest.param(pod("ns", "p", "n1", "c1", phase="Failed"), (), {}, id="failed"),
    pytest.param(pod("ns", "p", "n1", "c1", deleted=True, running=True), (),
                 {("pv1", "n1"): ["p"]}, id="terminating, containers still running"),
    pytest.param(pod("ns", "p", "n1", "c1", deleted=True, running=False), (), {},
                 id="deleted, no container running"),
    pytest.param(pod("ns", "p", "n3", "c1"), (node("n3", managed=False),), {},
                 id="node without the controller-managed annotation"),
    pytest.param(pod("ns", "p", "gone", "c1"), (), {}, id="node does not exist"),
    pytest.param(pod("ns", "p", "n1", "nope"), (), {}, id="claim missing"),
    pytest.param(pod("other", "p", "n1", "c1"), (), {}, id="claim in another namespace"),
    pytest.param(pod("ns", "p", "n1", "c1"), (csidriver(DRIVER, False),), {},
                 id="CSIDriver attachRequired false"),
    pytest.param(pod("ns", "p", "n1", "c1"), (csidriver(DRIVER, True),),
                 {("pv1", "n1"): ["p"]}, id="CSIDriver attachRequired true"),
    pytest.param(pod("ns", "p", "n1", "c1"), (csidriver(DRIVER, None),),
                 {("pv1", "n1"): ["p"]}, id="CSIDriver attachRequired unset"),
    pytest.param(pod("ns", "p", "n1", "c1"), (csidriver("other.csi", False),),
                 {("pv1", "n1"): ["p"]}, id="another driver's CSIDriver does not count"),
])
def test_desired_state_of_one_pod(the_pod, extra, want):
    w = base_world(the_pod, *extra)
    got = {k: [p.name for p in d.pods] for k, d in dsw_of(w).items()}
    assert got == want


@pytest.mark.parametrize("claim,volume,want", [
    pytest.param(pvc("ns", "c1", "pv1", phase="Pending"), pv("pv1", claim=("ns", "c1", "uid-ns-c1")),
                 {}, id="claim not Bound"),
    pytest.param(pvc("ns", "c1", ""), pv("pv1", claim=("ns", "c1", "uid-ns-c1")), {},
                 id="claim without volumeName"),
    pytest.param(pvc("ns", "c1", "pv1"), pv("pv1", claim=("ns", "c1", "another-uid")), {},
                 id="PV bound to another claim uid"),
    pytest.param(pvc("ns", "c1", "pv1"), pv("pv1"), {}, id="PV without claimRef"),
    pytest.param(pvc("ns", "c1", "pv1"), None, {}, id="PV missing"),
])
def test_desired_state_needs_a_fully_bound_claim(claim, volume, want):
    objs = [node("n1"), claim, pod("ns", "p", "n1", "c1")]
    if volume:
        objs.append(volume)
    assert dsw_of(world(*objs)) == want


def test_non_csi_pv_is_not_attached_by_us():
    vol = pv("pv1", claim=("ns", "c1", "uid-ns-c1"))
    del vol["spec"]["csi"]
    vol["spec"]["hostPath"] = {"path": "/x"}
    w = world(node("n1"), vol, pvc("ns", "c1", "pv1"), pod("ns", "p", "n1", "c1"))
    assert dsw_of(w) == {}


def test_generic_ephemeral_volume_needs_the_pod_as_owner():
    p = pod("ns", "p", "n1", ephemeral=("scratch",))
    owned = pvc("ns", "p-scratch", "pv9", owner="uid-p")
    w = world(node("n1"), p, owned, pv("pv9", claim=("ns", "p-scratch", "uid-ns-p-scratch")))
    assert list(dsw_of(w)) == [("pv9", "n1")]
    stranger = pvc("ns", "p-scratch", "pv9", owner="someone-else")
    w = world(node("n1"), p, stranger, pv("pv9", claim=("ns", "p-scratch", "uid-ns-p-scratch")))
    assert dsw_of(w) == {}


def test_pods_sharing_a_volume_on_one_node_are_one_entry():
    w = base_world(pod("ns", "a", "n1", "c1"), pod("ns", "b", "n1", "c1"),
                   pod("ns", "c", "n2", "c1"))
    d = dsw_of(w)
    assert sorted(d) == [("pv1", "n1"), ("pv1", "n2")]
    assert [p.name for p in d[("pv1", "n1")].pods] == ["a", "b"]
    assert d[("pv1", "n1")].volume.unique_name == uname("pv1")


def test_slim_pod_keeps_what_the_decisions_read():
    p = pod("ns", "p", "n1", "c1", deleted=True, running=False, ephemeral=("e",))
    p["spec"]["containers"] = [{"name": "c", "image": "x" * 1000}]
    p["metadata"]["managedFields"] = [{"big": "x" * 1000}]
    slim = K.slim_pod(p)
    assert len(str(slim)) < 600
    assert S.pod_terminated(slim) and S.pod_terminated(p)
    assert [v["name"] for v in slim["spec"]["volumes"]] == ["v0", "e"]
    w = base_world(K.slim_pod(pod("ns", "p", "n1", "c1")))
    assert list(dsw_of(w)) == [("pv1", "n1")]


def test_slim_node_keeps_labels_taints_ready_and_volume_lists():
    n = node("n1", ready=False, in_use=["x"], taints=[{"key": S.OUT_OF_SERVICE_TAINT}])
    n["status"]["images"] = [{"names": ["x" * 500]}]
    n["metadata"]["annotations"]["flannel/huge"] = "y" * 500
    s = K.slim_node(n)
    assert S.node_managed(s) and not S.node_ready(s) and S.node_out_of_service(s)
    assert S.volumes_in_use(s) == {"x"}
    assert "images" not in s["status"] and "flannel/huge" not in s["metadata"]["annotations"]
    assert s["metadata"]["labels"] == n["metadata"]["labels"]


# -- actual state --------------------------------------------------------------------------
def test_actual_state_from_volume_attachments():
    w = world(node("n1"), pv("pv1"))
    asw = S.build_asw([va("pv1", "n1"), va("pv2", "n1", attached=False),
                       va("pv3", "n1", deleting=True)], pvs=w["pvs"], nodes=w["nodes"])
    assert {k: a.state for k, a in asw.items()} == {
        ("pv1", "n1"): S.AState.ATTACHED, ("pv2", "n1"): S.AState.ATTACHING,
        ("pv3", "n1"): S.AState.DETACHING}
    assert asw[("pv1", "n1")].unique_name == uname("pv1")
    assert asw[("pv2", "n1")].unique_name is None  # PV gone, node names nothing


def test_actual_state_names_a_volume_whose_pv_is_gone_from_the_node_lists():
    n = node("n1", in_use=[uname("pv2")])
    asw = S.build_asw([va("pv2", "n1")], pvs={}, nodes={"n1": n})
    assert asw[("pv2", "n1")].unique_name == uname("pv2")


def test_node_volumes_attached_reports_attached_not_detaching():
    w = world(node("n1"), pv("pv1"), pv("pv2"), pv("pv3"))
    a1 = va("pv1", "n1")
    a1["status"]["attachmentMetadata"] = {"devicePath": "/dev/volplane/pool-a/slot-0"}
    asw = S.build_asw([a1, va("pv2", "n1", attached=False), va("pv3", "n1"),
                       va("pv1", "n2")], pvs=w["pvs"], nodes=w["nodes"])
    got = S.node_volumes_attached(asw.values(), "n1", detaching=[("pv3", "n1")])
    assert got == [{"name": uname("pv1"), "devicePath": "/dev/volplane/pool-a/slot-0"}]


# -- reconcile -----------------------------------------------------------------------------
# -- node status reports: coalesced per node ------------------------------------------------
def test_node_in_progress_counts_attaching_without_error_on_that_node():
    asw = S.build_asw([va("pv1", "n1", attached=False), va("pv2", "n2"),
                       va("pv3", "n3", attached=False, attach_error="no slot")],
                      pvs={}, nodes={})
    assert S.node_attach_in_progress(asw.values(), "n1")
    assert not S.node_attach_in_progress(asw.values(), "n2")   # attached
    assert not S.node_attach_in_progress(asw.values(), "n3")   # stuck: no outcome coming
    assert not S.node_attach_in_progress(asw.values(), "n4")
    # a volume wanted on the node with no attachment yet: more to report soon
    assert S.node_attach_in_progress(asw.values(), "n2", [("pv9", "n2")])
    assert not S.node_attach_in_progress(asw.values(), "n2", [("pv2", "n2"), ("pv9", "n1")])


def test_node_report_debounces_and_one_report_covers_a_burst():
    sch = S.NodeReportSchedule(debounce=0.1, min_interval=1.0)
    assert sch.changed("n1", 0.0, busy=True) == pytest.approx(0.1)
    assert sch.changed("n1", 0.05, busy=True) is None       # the queued report covers it
    assert sch.begin("n1", 0.1) is None                      # go
    assert sch.finish("n1", 0.15, wrote=True, busy=False) is None  # nothing new: done


def test_node_report_changes_during_a_write_get_one_follow_up_after_the_interval():
    sch = S.NodeReportSchedule(debounce=0.1, min_interval=1.0)
    sch.changed("n1", 0.0, busy=True)
    assert sch.begin("n1", 0.1) is None
    for t in (0.11, 0.12, 0.13):
        assert sch.changed("n1", t, busy=True) is None        # in flight: accumulate
    # written at 0.1; more attachments under way: the next report not before 1.1
    assert sch.finish("n1", 0.2, wrote=True, busy=True) == pytest.approx(0.9)
    assert sch.changed("n1", 0.5, busy=True) is None          # covered by that one
    assert sch.begin("n1", 1.1) is None


def test_node_report_goes_out_after_the_debounce_once_the_node_is_quiet():
    sch = S.NodeReportSchedule(debounce=0.1, min_interval=1.0)
    sch.changed("n1", 0.0, busy=True)
    sch.begin("n1", 0.1)
    sch.finish("n1", 0.12, wrote=True, busy=True)
    assert sch.changed("n1", 0.3, busy=True) == pytest.approx(0.8)   # at 1.1
    # the last attachment on the node finished: report it now, not at 1.1
    assert sch.changed("n1", 0.5, busy=False) == pytest.approx(0.0)
    assert sch.begin("n1", 0.5) is None
    sch.finish("n1", 0.55, wrote=True, busy=False)
    assert sch.begin("n1", 1.1) is None   # the superseded 1.1 entry: harmless, no change


def test_node_report_interval_applies_only_after_a_write():
    sch = S.NodeReportSchedule(debounce=0.1, min_interval=1.0)
    sch.changed("n1", 0.0, busy=True)
    sch.begin("n1", 0.1)
    # nothing to write (the report already said so): no interval to keep
    assert sch.finish("n1", 0.12, wrote=False, busy=True) is None
    assert sch.changed("n1", 0.2, busy=True) == pytest.approx(0.1)


def test_node_report_forced_write_and_early_superseded_entries():
    sch = S.NodeReportSchedule(debounce=0.1, min_interval=1.0)
    assert sch.changed("n1", 0.0, busy=True) == pytest.approx(0.1)   # entry at 0.1
    assert sch.begin("n1", 0.05, force=True) is None                 # a detach: now
    sch.changed("n1", 0.06, busy=True)
    assert sch.finish("n1", 0.07, wrote=True, busy=True) == pytest.approx(0.98)  # at 1.05
    assert sch.begin("n1", 0.1) == pytest.approx(0.95)   # the 0.1 entry: not due, skip
    assert sch.begin("n1", 0.5, force=True) is None      # a detach never waits
    sch.finish("n1", 0.51, wrote=True, busy=False)
    sch.forget("n1")
    assert sch.begin("n1", 0.6) is None


def test_controller_coalesces_node_reports_while_attachments_arrive():
    """Attachments on one node completing one by one, 50 ms apart: a handful of node
    status writes (not one each), the last one complete and not held back."""
    from volplane.attach.controller import AttachDetachController
    from volplane.workqueue import process

    async def body():
        kube = FakeKube()
        ctx = make_ctx(kube)
        adc = AttachDetachController(ctx)
        adc.node_reports = S.NodeReportSchedule(debounce=0.01, min_interval=0.3)
        inf = ctx.informers
        inf.feed(node("n1"))
        kube.objs["node:n1"] = copy.deepcopy(node("n1"))
        n = 12
        for i in range(n):
            inf.feed(pv(f"pv{i}"))
            inf.feed(va(f"pv{i}", "n1", attached=False))
        worker = asyncio.create_task(process(adc.node_queue, adc._sync_node,
                                             controller="test", log=None))
        try:
            await asyncio.sleep(0.05)
            t0 = asyncio.get_running_loop().time()
            for i in range(n):
                obj = va(f"pv{i}", "n1")
                obj["metadata"]["resourceVersion"] = "2"
                obj["status"]["attachmentMetadata"] = {"devicePath": f"/dev/x{i}"}
                inf.feed(obj)
                await asyncio.sleep(0.05)
            done_at = asyncio.get_running_loop().time()
            for _ in range(100):
                got = kube.objs["node:n1"]["status"].get("volumesAttached") or []
                if len(got) == n:
                    break
                await asyncio.sleep(0.01)
            reported_at = asyncio.get_running_loop().time()
        finally:
            worker.cancel()
        writes = [x for x in kube.calls if x == ("patch", "/api/v1/nodes/n1/status")]
        assert {e["name"] for e in got} == {uname(f"pv{i}") for i in range(n)}
        assert {e["devicePath"] for e in got} == {f"/dev/x{i}" for i in range(n)}
        # 0.6 s of arrivals at one write per 0.3 s at most while busy, plus the last
        assert 2 <= len(writes) <= 5, writes
        assert len(writes) < n
        assert reported_at - done_at < 0.2   # the quiet node's last report: debounce only
        assert done_at - t0 > 0.5

    asyncio.run(body())


def plan(w, vas, *, now=1000.0, max_wait=360.0, requested=None):
    asw = S.build_asw(vas, pvs=w["pvs"], nodes=w["nodes"])
    return S.reconcile(dsw_of(w), asw, w["nodes"], now, max_wait, requested or {})


def kinds(ops):
    return [(o.kind.value, o.pv_name, o.node) for o in ops]


def test_attach_when_desired_and_not_attached():
    w = base_world(pod("ns", "p", "n1", "c1"))
    ops = plan(w, [])
    assert kinds(ops) == [("attach", "pv1", "n1")]
    assert ops[0].va_name == S.volume_attachment_name("pool-a/pv1", DRIVER, "n1")
    body = S.volume_attachment_body(ops[0].volume, "n1")
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
    assert message == 'Multi-Attach error for volume "pv1" Volume is already used by pod(s) a, b'


def test_multi_attach_message_variants():
    me = S.PodRef("ns", "me")
    assert S.multi_attach_message("v", me, [S.PodRef("ns", "a"), S.PodRef("x", "b"),
                                            S.PodRef("y", "c")]) == (
        'Multi-Attach error for volume "v" Volume is already used by pod(s) a and 2 pod(s) '
        "in different namespaces")
    assert S.multi_attach_message("v", me, [S.PodRef("x", "b")]) == (
        'Multi-Attach error for volume "v" Volume is already used by 1 pod(s) in different '
        "namespaces")
    assert S.multi_attach_message("v", me, []) == (
        'Multi-Attach error for volume "v" Volume is already exclusively attached to one '
        "node and can't be attached to another")


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
                  "taints": [{"key": S.OUT_OF_SERVICE_TAINT, "effect": "NoExecute"}]},
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
    ops = plan(w, [va("pv1", "n1")], now=now, requested={("pv1", "n1"): now - waited})
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
            if op.kind is S.OpKind.ATTACH:
                vas[op.va_name] = va(op.pv_name, op.node)
            elif op.kind is S.OpKind.DETACH:
                del vas[op.va_name]
    final = plan(w, list(vas.values()))
    assert {o.kind for o in final} <= {S.OpKind.MULTI_ATTACH, S.OpKind.WAIT_UNMOUNT}
    attached = sorted((v["spec"]["source"]["persistentVolumeName"], v["spec"]["nodeName"])
                      for v in vas.values())
    # pv2 (RWO) is wanted on n1 and n2: exactly one of them has it
    assert [a for a in attached if a[0] == "pv2"] in ([("pv2", "n1")], [("pv2", "n2")])
    assert ("pv3", "n3") in attached            # still mounted there
    assert ("pv4", "n2") in attached and ("pv4", "n1") not in attached


# -- slot ledger ---------------------------------------------------------------------------
def slot_va(name, node_name, pool, slot, attacher=DRIVER):
    v = {"metadata": {"name": name, "annotations": {}},
         "spec": {"attacher": attacher, "nodeName": node_name,
                  "source": {"persistentVolumeName": name}}}
    if slot is not None:
        v["metadata"]["annotations"] = {S.POOL_ANNOTATION: pool, S.SLOT_ANNOTATION: str(slot)}
    return v


def test_slot_ledger_counts_per_node_and_pool():
    vas = [slot_va("a", "n1", "p", 0), slot_va("b", "n1", "p", 2), slot_va("c", "n2", "p", 1),
           slot_va("d", "n1", "q", 1), slot_va("e", "n1", "p", None),
           slot_va("f", "n1", "p", 1, attacher="other.csi")]
    used = S.slots_in_use(vas, "n1", "p")
    assert used == {0: "a", 2: "b"}
    assert S.free_slot(used, 16) == 1
    assert S.free_slot({0: "a", 1: "b"}, 2) is None
    assert S.free_slot([], 0) is None


def test_slot_ledger_duplicate_holder_is_decided_by_name():
    vas = [slot_va("zz", "n1", "p", 3), slot_va("aa", "n1", "p", 3)]
    assert S.slots_in_use(vas, "n1", "p") == {3: "aa"}


def test_allocating_one_at_a_time_never_double_allocates():
    vas, slots = [], 5
    for i in range(7):
        used = S.slots_in_use(vas, "n1", "p")
        got = S.free_slot(used, slots)
        if i < slots:
            assert got is not None and got not in used
            vas.append(slot_va(f"v{i}", "n1", "p", got))
        else:
            assert got is None
    held = [S.slot_of(v)[1] for v in vas]
    assert sorted(held) == list(range(slots))
    vas.pop(2)  # one attachment gone: its slot is the next one handed out
    assert S.free_slot(S.slots_in_use(vas, "n1", "p"), slots) == 2


def test_pool_helpers():
    assert S.pool_of_handle("pool-a/pvc-1") == "pool-a"
    assert S.pool_of_handle("nohandle") is None
    assert S.device_path("pool-a", 3) == "/dev/volplane/pool-a/slot-3"
    assert S.slots_per_node({"spec": {"slotsPerNode": 4}}) == 4
    assert S.slots_per_node({"spec": {}}) == 16
    assert S.no_slot_message("n1", 16, 16, "p") == (
        "node n1 has no free device slot (16/16 in use on pool p)")


# -- effect layer with a fake API ----------------------------------------------------------
class FakeKube:
    """Just enough of volplane.kube.Kube for the attach controllers: VolumeAttachments
    (with finalizers and resourceVersions) and Node status."""

    def __init__(self):
        self.objs: dict[str, dict] = {}
        self.rv = itertools.count(100)
        self.calls: list[tuple[str, str]] = []

    def _err(self, status, reason):
        from volplane.kube import ApiError
        return ApiError(status, reason, {"reason": reason, "message": reason})

    def _bump(self, obj):
        obj["metadata"]["resourceVersion"] = str(next(self.rv))
        return copy.deepcopy(obj)

    async def create(self, path, body):
        self.calls.append(("create", path))
        name = body["metadata"]["name"]
        if name in self.objs:
            raise self._err(409, "AlreadyExists")
        obj = copy.deepcopy(body)
        obj["metadata"]["uid"] = f"uid-{name}"
        obj["status"] = {"attached": False}
        self.objs[name] = obj
        return self._bump(obj)

    async def get(self, path, **_):
        name = path.rstrip("/").split("/")[-1]
        if name not in self.objs:
            raise self._err(404, "NotFound")
        return copy.deepcopy(self.objs[name])

    async def delete(self, path, body=None):
        self.calls.append(("delete", path))
        name = path.split("/")[-1]
        obj = self.objs.get(name)
        if obj is None:
            raise self._err(404, "NotFound")
        if obj["metadata"].get("finalizers"):
            obj["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
            return self._bump(obj)
        del self.objs[name]
        return {"kind": "Status", "status": "Success"}

    async def merge_patch(self, path, patch):
        self.calls.append(("patch", path))
        await asyncio.sleep(0.001 * (len(self.calls) % 3))  # let concurrent writes interleave
        parts = path.split("/")
        if parts[1] == "api":  # /api/v1/nodes/<n>/status
            name = parts[4]
            obj = self.objs.setdefault(f"node:{name}", {"metadata": {"name": name},
                                                        "status": {}})
            obj["status"].update(patch["status"])
            return self._bump(obj)
        sub = parts[-1] == "status"
        name = parts[-2] if sub else parts[-1]
        obj = self.objs.get(name)
        if obj is None:
            raise self._err(404, "NotFound")
        want_rv = (patch.get("metadata") or {}).get("resourceVersion")
        if want_rv and want_rv != obj["metadata"]["resourceVersion"]:
            raise self._err(409, "Conflict")
        if sub:
            for k, v in patch["status"].items():
                if v is None:
                    obj["status"].pop(k, None)
                else:
                    obj["status"][k] = v
        else:
            md = patch.get("metadata") or {}
            if "finalizers" in md:
                obj["metadata"]["finalizers"] = md["finalizers"]
            if "annotations" in md:
                obj["metadata"].setdefault("annotations", {}).update(md["annotations"])
        if obj["metadata"].get("deletionTimestamp") and not obj["metadata"].get("finalizers"):
            del self.objs[name]
        return self._bump(obj)


class FakeEvents:
    def __init__(self):
        self.posted = []

    def emit(self, obj, type_, reason, message, component=None):
        self.posted.append((obj["metadata"].get("name"), reason, message))
        return True


def make_ctx(kube):
    from volplane.context import Context
    from volplane.informers import Informers
    return Context(kube=kube, informers=Informers(), events=FakeEvents())


async def settle(kube, ctx, controllers, rounds=30):
    """Run the controllers' queues by hand; mirror the fake API into the cache like a
    watch would (so deletions by finalizer removal are seen)."""
    inf = ctx.informers
    vas = inf.listers["volumeattachments"]
    for _ in range(rounds):
        for name in list(vas):
            if name not in kube.objs:
                inf.delete(K.VOLUME_ATTACHMENTS, name)
        for name, obj in list(kube.objs.items()):
            if not name.startswith("node:"):
                seen = vas._indexed(name)
                if seen is None or seen["metadata"]["resourceVersion"] != \
                        obj["metadata"]["resourceVersion"]:
                    inf.feed(copy.deepcopy(obj), K.VOLUME_ATTACHMENTS)
        busy = False
        delayed = [q._delayed[0][0] - q.clock() for q, _ in controllers if q._delayed]
        if delayed:  # debounced keys (node status) come due
            await asyncio.sleep(min(2.0, max(0.0, min(delayed))) + 0.02)
            for queue, _ in controllers:
                queue.pop_due()
        for queue, sync in controllers:
            while len(queue):
                busy = True
                key = await queue.get()
                try:
                    await sync(key)
                finally:
                    queue.done(key)
        if not busy:
            return
    raise AssertionError("did not settle")


def pool_obj(name, names, slots=16):
    return {"apiVersion": "volplane.io/v1alpha1", "kind": "StoragePool",
            "metadata": {"name": name, "resourceVersion": "1"},
            "spec": {"capacity": "10Gi", "nodes": {"names": list(names)},
                     "slotsPerNode": slots}}


def test_controller_and_pool_attacher_attach_report_and_detach():
    from volplane.attach.controller import AttachDetachController
    from volplane.attach.pool_attacher import PoolAttacher

    async def body():
        kube = FakeKube()
        ctx = make_ctx(kube)
        adc = AttachDetachController(ctx)
        pa = PoolAttacher(ctx)
        inf = ctx.informers
        inf.feed(pool_obj("pool-a", ["n1"], slots=2))
        for n in (node("n1"), node("n2")):
            inf.feed(n)
            kube.objs[f"node:{n['metadata']['name']}"] = copy.deepcopy(n)
        for i in range(3):
            inf.feed(pv(f"pv{i}", claim=("ns", f"c{i}", f"uid-ns-c{i}")))
            inf.feed(pvc("ns", f"c{i}", f"pv{i}"))
            inf.feed(pod("ns", f"p{i}", "n1", f"c{i}"))
        inf.feed(pod("ns", "elsewhere", "n2", "c0"))
        loops = [(adc.volumes, adc._sync_volume), (pa.queue, pa.sync),
                 (adc.node_queue, adc._sync_node)]
        adc.running = True
        await settle(kube, ctx, loops)

        vas = {n: o for n, o in kube.objs.items() if not n.startswith("node:")}
        assert len(vas) == 3  # one per volume; pv0 not attached to n2 too
        attached = sorted(o["metadata"]["annotations"][S.SLOT_ANNOTATION]
                          for o in vas.values() if o["status"].get("attached"))
        assert attached == ["0", "1"]  # slots per node: 2
        waiting = [o for o in vas.values() if not o["status"].get("attached")]
        assert len(waiting) == 1
        assert waiting[0]["status"]["attachError"]["message"] == S.no_slot_message(
            "n1", 2, 2, "pool-a")
        reported = kube.objs["node:n1"]["status"]["volumesAttached"]
        assert len(reported) == 2
        assert all(e["devicePath"].startswith("/dev/volplane/pool-a/slot-") for e in reported)
        events = ctx.events.posted
        assert any(r == "FailedAttachVolume" and "no free device slot" in m
                   for _, r, m in events)
        assert any(p == "elsewhere" and m.startswith('Multi-Attach error for volume "pv0"')
                   for p, _, m in events)

        # delete an attached pod: its volume detaches, its slot goes to the waiting one
        holder = next(o for o in vas.values() if o["status"].get("attached"))
        pv_freed = holder["spec"]["source"]["persistentVolumeName"]
        inf.delete(K.PODS, f"ns/p{pv_freed[2:]}")
        inf.delete(K.PODS, "ns/elsewhere")
        await settle(kube, ctx, loops)
        vas = {n: o for n, o in kube.objs.items() if not n.startswith("node:")}
        assert holder["metadata"]["name"] not in vas
        assert all(o["status"].get("attached") for o in vas.values())
        assert sorted(o["metadata"]["annotations"][S.SLOT_ANNOTATION]
                      for o in vas.values()) == ["0", "1"]
        names = {e["name"] for e in kube.objs["node:n1"]["status"]["volumesAttached"]}
        assert uname(pv_freed) not in names and len(names) == 2

    asyncio.run(body())


def test_pool_attacher_rejects_a_node_outside_the_pool():
    from volplane.attach.pool_attacher import PoolAttacher

    async def body():
        kube = FakeKube()
        ctx = make_ctx(kube)
        pa = PoolAttacher(ctx)
        inf = ctx.informers
        inf.feed(pool_obj("pool-a", ["n1"]))
        inf.feed(node("n2"))
        inf.feed(pv("pv1"))
        created = await kube.create("/x", {"metadata": {"name": "va1"},
                                           "spec": {"attacher": DRIVER, "nodeName": "n2",
                                                    "source": {"persistentVolumeName": "pv1"}}})
        inf.feed(created, K.VOLUME_ATTACHMENTS)
        await settle(kube, ctx, [(pa.queue, pa.sync)])
        st = kube.objs["va1"]["status"]
        assert st["attached"] is False
        assert st["attachError"]["message"].startswith(
            "node n2 is not attached to StoragePool pool-a")
        assert "finalizers" not in kube.objs["va1"]["metadata"]

    asyncio.run(body())


def test_pool_attacher_concurrent_allocations_on_one_node_never_share_a_slot():
    from volplane.attach.pool_attacher import PoolAttacher

    async def body():
        kube = FakeKube()
        ctx = make_ctx(kube)
        pa = PoolAttacher(ctx)
        inf = ctx.informers
        inf.feed(pool_obj("pool-a", ["n1"], slots=8))
        inf.feed(node("n1"))
        names = []
        for i in range(10):
            inf.feed(pv(f"pv{i}"))
            created = await kube.create("/x", {
                "metadata": {"name": f"va{i}"},
                "spec": {"attacher": DRIVER, "nodeName": "n1",
                         "source": {"persistentVolumeName": f"pv{i}"}}})
            inf.feed(created, K.VOLUME_ATTACHMENTS)
            names.append(f"va{i}")
        await asyncio.gather(*(pa.sync(n) for n in names))   # all at once
        await settle(kube, ctx, [(pa.queue, pa.sync)])
        vas = [kube.objs[n] for n in names]
        slots = [v["metadata"]["annotations"][S.SLOT_ANNOTATION]
                 for v in vas if v["status"].get("attached")]
        assert sorted(slots, key=int) == [str(i) for i in range(8)]
        failed = [v for v in vas if not v["status"].get("attached")]
        assert len(failed) == 2
        assert all("no free device slot (8/8 in use" in v["status"]["attachError"]["message"]
                   for v in failed)
        assert pa.reserved == {}

    asyncio.run(body())
