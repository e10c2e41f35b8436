"""FlexVolume in the attach/detach decisions (pure): desired state, actual state rebuilt
from node status, the node report, the multi-attach guard."""

from __future__ import annotations

from volplane.attach import actual as A
from volplane.attach import desired as D
from volplane.attach import reconcile as RC
from volplane.attach import reports as R
from volplane.kinds import slim_pod

from ..flex_helpers import DRIVER, flex_pv, inline_flex
from .world import node, pod, pv, pvc, uname, world

FLEX = {DRIVER: True}


def bound_flex_pv(name="fpv", claim="c1", **kw):
    obj = flex_pv(name, **kw)
    obj["metadata"]["resourceVersion"] = "1"
    obj["spec"]["claimRef"] = {"namespace": "ns", "name": claim, "uid": f"uid-ns-{claim}"}
    return obj


def pod_with(ns, name, node_name, *vols, created="2024-01-01T00:00:00Z"):
    p = pod(ns, name, node_name, created=created)
    p["spec"]["volumes"] = list(vols)
    return p


def claim_vol(claim, read_only=False):
    src = {"claimName": claim}
    if read_only:
        src["readOnly"] = True
    return {"name": "v", "persistentVolumeClaim": src}


def flex_world(*objs):
    return world(node("n1"), node("n2"), bound_flex_pv(), pvc("ns", "c1", "fpv"), *objs)


def dsw(w, flex=FLEX):
    return D.build_dsw(w["pods"].values(), pvcs=w["pvcs"], pvs=w["pvs"],
                       drivers=w["drivers"], nodes=w["nodes"], flex_drivers=flex)


def test_a_flex_pv_is_desired_under_its_unique_name_when_its_driver_attaches():
    w = flex_world(pod_with("ns", "p", "n1", claim_vol("c1", read_only=True)))
    got = dsw(w)
    key = ("volplane-demo/disk/fpv", "n1")
    assert list(got) == [key]
    v = got[key].volume
    assert v.flex and v.driver == DRIVER and v.handle == "fpv"
    assert v.unique_name == "volplane-demo/disk/fpv"
    assert v.display_name == "fpv"
    assert v.read_only is True            # the pod claim's readOnly, as upstream
    assert v.multi_attach is False        # RWO PV
    assert v.pv is not None and v.pv["metadata"]["name"] == "fpv"


def test_flex_drivers_not_loaded_or_without_attach_are_never_desired():
    w = flex_world(pod_with("ns", "p", "n1", claim_vol("c1")))
    assert dsw(w, flex={}) == {}                     # not installed (or init failed)
    assert dsw(w, flex={DRIVER: False}) == {}        # init said attach: false
    assert dsw(w, flex={"other/driver": True}) == {}


def test_an_inline_flex_volume_is_desired_and_may_be_multi_attached():
    w = flex_world(pod_with("ns", "p", "n1", inline_flex("data", read_only=True)),
                   pod_with("ns", "q", "n2", inline_flex("data")))
    got = dsw(w)
    assert set(got) == {("volplane-demo/disk/data", "n1"), ("volplane-demo/disk/data", "n2")}
    v = got[("volplane-demo/disk/data", "n1")].volume
    assert v.flex and v.volume is not None and v.pv is None and v.read_only
    assert v.multi_attach is True         # upstream IsMultiAttachAllowed: inline -> allowed


def test_csi_and_flex_volumes_of_one_pod_are_both_desired():
    w = flex_world(pv("pv1", claim=("ns", "c2", "uid-ns-c2")), pvc("ns", "c2", "pv1"),
                   pod_with("ns", "p", "n1", claim_vol("c1"),
                            {"name": "w", "persistentVolumeClaim": {"claimName": "c2"}}))
    # CSI: keyed by the unique volume name (parity); flex: by its flex key
    assert set(dsw(w)) == {("volplane-demo/disk/fpv", "n1"), (uname("pv1"), "n1")}


def test_pod_flex_keys_names_every_flex_volume_whatever_the_driver_state():
    w = flex_world()
    p = pod_with("ns", "p", None, claim_vol("c1"), inline_flex("x", driver="a/b"))
    assert D.pod_flex_keys(p, pvcs=w["pvcs"], pvs=w["pvs"]) == {
        "volplane-demo/disk/fpv", "a/b/x"}


def test_the_slim_pod_keeps_inline_flex_sources_and_the_claims_read_only():
    full = pod_with("ns", "p", "n1", claim_vol("c1", read_only=True),
                    inline_flex("data", options={"size": "1Mi"}, secret="s"),
                    {"name": "cfg", "configMap": {"name": "c"}})
    vols = slim_pod(full)["spec"]["volumes"]
    assert vols == [{"name": "v", "persistentVolumeClaim": {"claimName": "c1",
                                                            "readOnly": True}},
                    inline_flex("data", options={"size": "1Mi"}, secret="s")]


def test_rwo_flex_pv_on_another_node_waits_for_detach_with_upstreams_message():
    w = flex_world(pod_with("ns", "first", "n1", claim_vol("c1")),
                   pod_with("ns", "second", "n2", claim_vol("c1"),
                            created="2024-01-02T00:00:00Z"))
    want = dsw(w)
    key = "volplane-demo/disk/fpv"
    asw = {(key, "n1"): A.Actual(pv_name=key, node="n1", va_name="", attacher=DRIVER,
                                 state=A.AState.ATTACHED, unique_name=key,
                                 multi_attach=False, device_path="/dev/x")}
    ops = RC.reconcile(want, asw, w["nodes"], now=0.0, max_wait=360.0)
    assert [(o.kind, o.node) for o in ops] == [(RC.OpKind.MULTI_ATTACH, "n2")]
    (p, msg), = ops[0].events
    assert p.name == "second"
    assert msg == 'Waiting for detach for volume "fpv" Volume is already used by pod(s) first'


def test_a_flex_attachment_still_in_use_waits_for_unmount_then_detaches():
    key = "volplane-demo/disk/fpv"
    a = A.Actual(pv_name=key, node="n1", va_name="", attacher=DRIVER, state=A.AState.ATTACHED,
                 unique_name=key, multi_attach=False)
    nodes = {"n1": node("n1", in_use=[key])}
    ops = RC.reconcile({}, {a.key: a}, nodes, now=0.0, max_wait=360.0)
    assert [o.kind for o in ops] == [RC.OpKind.WAIT_UNMOUNT]
    ops = RC.reconcile({}, {a.key: a}, {"n1": node("n1")}, now=0.0, max_wait=360.0)
    assert [o.kind for o in ops] == [RC.OpKind.DETACH]


def test_flex_actual_state_is_rebuilt_from_node_status_and_csi_entries_are_left_alone():
    nodes = {"n1": node("n1", attached=[
        {"name": uname("pv1"), "devicePath": "/dev/csi"},
        {"name": "volplane-demo/disk/fpv", "devicePath": "/disks/fpv.img"},
        {"name": "volplane-demo/disk/data", "devicePath": ""},
        {"name": "garbage", "devicePath": ""}])}
    pvs = {"fpv": bound_flex_pv()}
    asw = A.flex_actual_from_nodes(nodes, pvs)
    assert set(asw) == {("volplane-demo/disk/fpv", "n1"), ("volplane-demo/disk/data", "n1")}
    fpv = asw[("volplane-demo/disk/fpv", "n1")]
    assert fpv.state is A.AState.ATTACHED and fpv.device_path == "/disks/fpv.img"
    assert fpv.attacher == DRIVER and fpv.multi_attach is False   # as its RWO PV
    assert asw[("volplane-demo/disk/data", "n1")].multi_attach is True  # no PV: inline
    assert A.flex_actual_from_nodes(nodes, pvs, ignore=[DRIVER]) == {}


def test_the_node_report_lists_flex_attachments_with_the_drivers_device():
    key = "volplane-demo/disk/fpv"
    a = A.Actual(pv_name=key, node="n1", va_name="", attacher=DRIVER, state=A.AState.ATTACHED,
                 unique_name=key, device_path="/disks/fpv.img")
    attaching = A.Actual(pv_name="a/b/c", node="n1", va_name="", attacher="a/b",
                         state=A.AState.ATTACHING, unique_name="a/b/c")
    assert R.node_volumes_attached([a, attaching], "n1") == [
        {"name": key, "devicePath": "/disks/fpv.img"}]
    assert R.node_volumes_attached([a], "n1", detaching=[a.key]) == []


def test_flex_driver_names_that_no_plugin_dir_can_give_are_ignored():
    w = flex_world()
    for bad in ("nodriver", "a/b/c", "/x", "x/", ""):
        p = pod_with("ns", "p", "n1", inline_flex("x", driver=bad))
        assert D.pod_flex_keys(p, pvcs=w["pvcs"], pvs=w["pvs"]) == set(), bad
        assert dsw(world(node("n1"), p), flex={bad: True}) == {}, bad
