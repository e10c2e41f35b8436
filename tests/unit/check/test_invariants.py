"""`volplane check`: every invariant finds its broken fixture; a healthy world passes.

The healthy world: two nodes, one pool, three provisioned claims bound and attached
(device slots, node reports), a claim on a static PV, a WaitForFirstConsumer claim
waiting for its pod, a Lost claim, a Released Retain PV, an Available PV. Each broken
fixture is one mutation of it; the test asserts the invariant it breaks is reported
(and, where the mutation touches nothing else, that nothing else is)."""

from __future__ import annotations

import calendar
import copy
import json
import time

import pytest

from volplane import kinds as K
from volplane.attach import names as N
from volplane.check.invariants import (
    EXCLUDE_LABEL,
    INVARIANTS,
    Limits,
    Scope,
    Snapshot,
    check,
)
from volplane.check.report import as_json, text
from volplane.pools import slots as PS

GI = 1024 ** 3
T0 = calendar.timegm(time.strptime("2026-03-01T12:00:00Z", "%Y-%m-%dT%H:%M:%SZ"))
NOW = T0 + 3600.0
POOL = "pool.volplane.io"


def ts(seconds_after_t0: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + seconds_after_t0))


OLD = ts(0)                     # an hour before NOW
YOUNG = ts(3600 - 5)            # five seconds before NOW


def node(name, attached=()):
    return {"metadata": {"name": name, "creationTimestamp": OLD,
                         "annotations": {K.MANAGED_ANNOTATION: "true"},
                         "labels": {"kubernetes.io/hostname": name}},
            "spec": {},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       # devicePath "" for CSI volumes, as upstream reports them
                       "volumesAttached": [{"name": N.unique_volume_name(POOL, h),
                                            "devicePath": ""}
                                           for h, _slot in attached]}}


def claim(name, uid, *, cls="pool", size="1Gi", volume=None, phase="Pending",
          created=OLD, annotations=None, ns="ns"):
    ann = dict(annotations or {})
    if phase in ("Bound", "Lost") and volume:
        ann["pv.kubernetes.io/bind-completed"] = "yes"
        ann["pv.kubernetes.io/bound-by-controller"] = "yes"
    spec = {"accessModes": ["ReadWriteOnce"], "storageClassName": cls,
            "resources": {"requests": {"storage": size}}}
    if volume:
        spec["volumeName"] = volume
    st = {"phase": phase}
    if phase == "Bound":
        st.update(accessModes=["ReadWriteOnce"], capacity={"storage": size})
    return {"metadata": {"name": name, "namespace": ns, "uid": uid, "creationTimestamp": created,
                         "annotations": ann},
            "spec": spec, "status": st}


def pool_pv(claim_name, uid, *, size="1Gi", phase="Bound", pool="p1", ns="ns"):
    name = f"pvc-{uid}"
    return {"metadata": {"name": name, "creationTimestamp": OLD,
                         "annotations": {"pv.kubernetes.io/provisioned-by": POOL,
                                         "volplane.io/pool": pool},
                         "finalizers": ["volplane.io/allocation"]},
            "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"],
                     "storageClassName": "pool", "persistentVolumeReclaimPolicy": "Delete",
                     "volumeMode": "Filesystem",
                     "claimRef": {"kind": "PersistentVolumeClaim", "namespace": ns,
                                  "name": claim_name, "uid": uid},
                     "csi": {"driver": POOL, "volumeHandle": f"{pool}/{name}"}},
            "status": {"phase": phase, "lastPhaseTransitionTime": OLD}}


def static_pv(name, *, size="5Gi", claim_ref=None, phase="Available", policy="Retain",
              since=OLD):
    spec = {"capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"],
            "storageClassName": "", "persistentVolumeReclaimPolicy": policy,
            "hostPath": {"path": f"/tmp/{name}"}}
    if claim_ref:
        spec["claimRef"] = claim_ref
    return {"metadata": {"name": name, "creationTimestamp": OLD}, "spec": spec,
            "status": {"phase": phase, "lastPhaseTransitionTime": since}}


def record(uid, claim_name, *, size=GI, pool="p1", created=OLD):
    return {"metadata": {"name": f"pvc-{uid}", "uid": f"r-{uid}", "creationTimestamp": created},
            "spec": {"pool": pool, "sizeBytes": size, "storageClassName": "pool",
                     "claim": {"namespace": "ns", "name": claim_name, "uid": uid}}}


def pod(name, node_name, *claims, created=OLD):
    return {"metadata": {"name": name, "namespace": "ns", "uid": f"pod-{name}",
                         "creationTimestamp": created},
            "spec": {"nodeName": node_name,
                     "volumes": [{"name": f"v{i}", "persistentVolumeClaim": {"claimName": c}}
                                 for i, c in enumerate(claims)]},
            "status": {"phase": "Running"}}


def va(uid, node_name, slot, *, attached=True, created=OLD, error=None, deleting=None):
    handle = f"p1/pvc-{uid}"
    md = {"name": N.volume_attachment_name(handle, POOL, node_name), "creationTimestamp": created,
          "annotations": {PS.POOL_ANNOTATION: "p1", PS.SLOT_ANNOTATION: str(slot)},
          "finalizers": [PS.ATTACHER_FINALIZER]}
    if deleting:
        md["deletionTimestamp"] = deleting
    st = {"attached": attached}
    if attached:
        st["attachmentMetadata"] = {"devicePath": PS.device_path("p1", slot)}
    if error:
        st["attachError"] = {"message": error}
    return {"metadata": md, "spec": {"attacher": POOL, "nodeName": node_name,
                                     "source": {"persistentVolumeName": f"pvc-{uid}"}},
            "status": st}


def world() -> dict:
    """The healthy world, as lists of objects."""
    return {
        "nodes": [node("n1", [("p1/pvc-ua", 0), ("p1/pvc-uc", 1)]),
                  node("n2", [("p1/pvc-ub", 0)])],
        "pools": [{"metadata": {"name": "p1", "creationTimestamp": OLD},
                   "spec": {"capacity": "10Gi", "nodes": {"names": ["n1", "n2"]},
                            "slotsPerNode": 4},
                   "status": {"allocatedBytes": 3 * GI, "volumeCount": 3}}],
        "classes": [
            {"metadata": {"name": "pool"}, "provisioner": POOL, "reclaimPolicy": "Delete",
             "volumeBindingMode": "Immediate"},
            {"metadata": {"name": "wffc"}, "provisioner": POOL, "reclaimPolicy": "Delete",
             "volumeBindingMode": "WaitForFirstConsumer"}],
        "drivers": [{"metadata": {"name": POOL}, "spec": {"attachRequired": True}}],
        "pvcs": [
            claim("a", "ua", volume="pvc-ua", phase="Bound"),
            claim("b", "ub", volume="pvc-ub", phase="Bound"),
            claim("c", "uc", volume="pvc-uc", phase="Bound"),
            claim("s", "us", cls="", size="2Gi", volume="static-2", phase="Bound"),
            claim("w", "uw", cls="wffc"),
            claim("lost", "ul", cls="", volume="gone", phase="Lost"),
        ],
        "pvs": [
            pool_pv("a", "ua"), pool_pv("b", "ub"), pool_pv("c", "uc"),
            static_pv("static-1", size="500Mi"),   # Available, fits nothing Pending
            static_pv("static-2", size="2Gi", phase="Bound",
                      claim_ref={"namespace": "ns", "name": "s", "uid": "us"}),
            static_pv("released-retain", phase="Released",
                      claim_ref={"namespace": "ns", "name": "old", "uid": "uo"}),
        ],
        "allocations": [record("ua", "a"), record("ub", "b"), record("uc", "c")],
        "pods": [pod("pa", "n1", "a", "c"), pod("pb", "n2", "b")],
        "vas": [va("ua", "n1", 0), va("ub", "n2", 0), va("uc", "n1", 1)],
        "namespaces": [{"metadata": {"name": "ns"}}],
    }


def snap(w: dict, now: float = NOW) -> Snapshot:
    return Snapshot.of(now, **copy.deepcopy(w))


def found(w: dict, **kw) -> set[str]:
    return {v.invariant for v in check(snap(w), **kw).violations}


def by_name(w, kind, name):
    return next(o for o in w[kind] if o["metadata"]["name"] == name)


# -- the healthy world passes -----------------------------------------------------------------
def test_healthy_world_passes_every_invariant():
    report = check(snap(world()))
    assert report.violations == [], [v.message for v in report.violations]
    assert report.ok and report.checked == list(INVARIANTS)
    assert report.counts["pvs"] == 6 and report.counts["vas"] == 3


def test_young_work_in_progress_is_not_stuck():
    """Objects younger than the limits: a Pending claim with room, a young orphan record
    (its PV may be in flight), a young Released PV, a young unattached attachment."""
    w = world()
    w["pvcs"].append(claim("new", "un", created=YOUNG))
    w["allocations"].append(record("uy", "gone-claim", created=YOUNG))
    w["pools"][0]["status"] = {"allocatedBytes": 4 * GI, "volumeCount": 4}
    w["pvs"].append(static_pv("released-young", phase="Released", policy="Delete",
                              since=YOUNG))
    w["pvcs"].append(claim("d", "ud", volume="pvc-ud", phase="Bound"))
    w["pvs"].append(pool_pv("d", "ud"))
    w["allocations"].append(record("ud", "d"))
    w["pools"][0]["status"] = {"allocatedBytes": 5 * GI, "volumeCount": 5}
    w["pods"].append(pod("pd", "n2", "d", created=YOUNG))
    w["vas"].append(va("ud", "n2", 1, attached=False, created=YOUNG))
    assert found(w) == set()


# -- each broken fixture is found ---------------------------------------------------------
def break_claim_bound_to_available_pv(w):
    by_name(w, "pvs", "pvc-ua")["status"]["phase"] = "Available"


def break_pv_bound_to_missing_claim(w):
    w["pvs"].append(static_pv("ghost-pv", phase="Bound",
                              claim_ref={"namespace": "ns", "name": "ghost", "uid": "ug"}))


def break_two_claims_on_one_pv(w):
    w["pvcs"].append(claim("a2", "ua2", volume="pvc-ua", phase="Bound"))


def break_two_pvs_for_one_claim(w):
    dup = static_pv("dup", size="1Gi", phase="Bound",
                    claim_ref={"namespace": "ns", "name": "s", "uid": "us"})
    w["pvs"].append(dup)


def break_bound_claim_whose_pv_is_gone(w):
    w["pvs"] = [pv for pv in w["pvs"] if pv["metadata"]["name"] != "static-2"]


def break_pool_status(w):
    w["pools"][0]["status"]["allocatedBytes"] = 4 * GI


def break_orphan_record(w):
    w["allocations"].append(record("uz", "deleted-claim"))
    w["pools"][0]["status"] = {"allocatedBytes": 4 * GI, "volumeCount": 4}


def break_pv_without_record(w):
    w["allocations"] = [r for r in w["allocations"] if r["metadata"]["name"] != "pvc-ub"]
    w["pools"][0]["status"] = {"allocatedBytes": 2 * GI, "volumeCount": 2}


def break_record_size(w):
    by_name(w, "allocations", "pvc-uc")["spec"]["sizeBytes"] = 2 * GI
    w["pools"][0]["status"] = {"allocatedBytes": 4 * GI, "volumeCount": 3}


def break_record_of_unknown_pool(w):
    r = record("ux", "x", pool="no-such-pool", created=YOUNG)
    w["allocations"].append(r)


def break_over_capacity(w):
    w["pools"][0]["spec"]["capacity"] = "2Gi"


def break_undesired_attachment(w):
    w["pods"] = [p for p in w["pods"] if p["metadata"]["name"] != "pb"]


def break_attachment_on_deleted_node(w):
    w["nodes"] = [n for n in w["nodes"] if n["metadata"]["name"] != "n2"]
    w["pods"] = [p for p in w["pods"] if p["metadata"]["name"] != "pb"]


def break_rwo_on_two_nodes(w):
    w["vas"].append(va("ua", "n2", 1))
    w["pods"].append(pod("pa2", "n2", "a"))
    by_name(w, "nodes", "n2")["status"]["volumesAttached"].append(
        {"name": N.unique_volume_name(POOL, "p1/pvc-ua"), "devicePath": ""})


def break_shared_slot(w):
    v = next(v for v in w["vas"] if v["spec"]["source"]["persistentVolumeName"] == "pvc-uc")
    v["metadata"]["annotations"][PS.SLOT_ANNOTATION] = "0"
    v["status"]["attachmentMetadata"]["devicePath"] = PS.device_path("p1", 0)


def break_slot_without_finalizer(w):
    w["vas"][0]["metadata"]["finalizers"] = []


def break_attached_without_slot(w):
    del w["vas"][0]["metadata"]["annotations"][PS.SLOT_ANNOTATION]


def break_device_path(w):
    w["vas"][1]["status"]["attachmentMetadata"]["devicePath"] = "/dev/sdz"


def break_node_report_missing(w):
    by_name(w, "nodes", "n1")["status"]["volumesAttached"] = []


def break_node_report_extra(w):
    by_name(w, "nodes", "n2")["status"]["volumesAttached"].append(
        {"name": N.unique_volume_name(POOL, "p1/pvc-gone"), "devicePath": "/dev/x"})


def break_pending_with_pool_room(w):
    w["pvcs"].append(claim("p", "up"))


def break_pending_with_fitting_pv(w):
    w["pvcs"].append(claim("q", "uq", cls="", size="400Mi"))


def break_released_delete_pv(w):
    w["pvs"].append(static_pv("released-del", phase="Released", policy="Delete",
                              claim_ref={"namespace": "ns", "name": "gone", "uid": "ux"}))


def break_attachment_never_attached(w):
    w["pvcs"].append(claim("d", "ud", volume="pvc-ud", phase="Bound"))
    w["pvs"].append(pool_pv("d", "ud"))
    w["allocations"].append(record("ud", "d"))
    w["pools"][0]["status"] = {"allocatedBytes": 4 * GI, "volumeCount": 4}
    w["pods"].append(pod("pd", "n2", "d"))
    w["vas"].append(va("ud", "n2", 1, attached=False, error="disk on fire"))


def break_detach_never_finishes(w):
    w["pods"] = [p for p in w["pods"] if p["metadata"]["name"] != "pb"]
    v = w["vas"][1]
    v["metadata"]["deletionTimestamp"] = OLD
    v["status"] = {"attached": False}
    by_name(w, "nodes", "n2")["status"]["volumesAttached"] = []


def break_pod_without_attachment(w):
    w["vas"] = w["vas"][:2]
    by_name(w, "nodes", "n1")["status"]["volumesAttached"] = [
        {"name": N.unique_volume_name(POOL, "p1/pvc-ua"), "devicePath": ""}]


BROKEN = [
    # (mutation, the invariant it breaks, the complete set reported)
    (break_claim_bound_to_available_pv, "bind-symmetric", {"bind-symmetric"}),
    (break_pv_bound_to_missing_claim, "bind-symmetric", {"bind-symmetric"}),
    (break_two_claims_on_one_pv, "pv-two-claims", {"pv-two-claims", "bound-claim-lost"}),
    (break_two_pvs_for_one_claim, "claim-two-pvs", {"claim-two-pvs", "bind-symmetric"}),
    (break_bound_claim_whose_pv_is_gone, "bound-claim-lost", {"bound-claim-lost"}),
    (break_pool_status, "pool-ledger", {"pool-ledger"}),
    (break_orphan_record, "allocation-pv", {"allocation-pv", "pool-ledger"}),
    (break_pv_without_record, "allocation-pv", {"allocation-pv", "pool-ledger"}),
    (break_record_size, "allocation-pv", {"allocation-pv", "pool-ledger"}),
    (break_record_of_unknown_pool, "allocation-pv", {"allocation-pv"}),
    (break_over_capacity, "pool-over-capacity", {"pool-over-capacity"}),
    (break_undesired_attachment, "attachment-desired", {"attachment-desired"}),
    (break_attachment_on_deleted_node, "attachment-desired", {"attachment-desired"}),
    (break_rwo_on_two_nodes, "multi-attach", {"multi-attach"}),
    (break_shared_slot, "device-slots", {"device-slots"}),
    (break_slot_without_finalizer, "device-slots", {"device-slots"}),
    (break_attached_without_slot, "device-slots", {"device-slots"}),
    (break_device_path, "device-slots", {"device-slots"}),
    (break_node_report_missing, "node-volumes-attached", {"node-volumes-attached"}),
    (break_node_report_extra, "node-volumes-attached", {"node-volumes-attached"}),
    (break_pending_with_pool_room, "claim-pending", {"claim-pending"}),
    (break_pending_with_fitting_pv, "claim-pending", {"claim-pending"}),
    (break_released_delete_pv, "pv-released", {"pv-released"}),
    (break_attachment_never_attached, "attachment-stuck", {"attachment-stuck"}),
    (break_detach_never_finishes, "attachment-stuck", {"attachment-stuck"}),
    (break_pod_without_attachment, "attachment-stuck", {"attachment-stuck"}),
]


@pytest.mark.parametrize("mutate, invariant, reported", BROKEN,
                         ids=[m.__name__.removeprefix("break_") for m, _, _ in BROKEN])
def test_each_broken_fixture_is_found(mutate, invariant, reported):
    w = world()
    mutate(w)
    report = check(snap(w))
    got = {v.invariant for v in report.violations}
    assert invariant in got, [v.message for v in report.violations]
    assert got == reported, [v.message for v in report.violations]
    # the same invariant alone finds it too
    assert not check(snap(w), only=[invariant]).ok


def test_every_invariant_has_a_broken_fixture():
    assert {inv for _, inv, _ in BROKEN} == set(INVARIANTS)


def test_stuck_ones_carry_their_age():
    w = world()
    break_pending_with_pool_room(w)
    break_released_delete_pv(w)
    vs = check(snap(w)).violations
    assert sorted(v.invariant for v in vs) == ["claim-pending", "pv-released"]
    assert all(v.age == pytest.approx(3600) for v in vs)


def test_orphan_grace_is_a_limit():
    w = world()
    break_orphan_record(w)
    assert "allocation-pv" not in found(w, limits=Limits(orphan_grace=7200))


def test_pending_claim_with_no_room_is_not_stuck():
    w = world()
    w["pvcs"].append(claim("big", "ubig", size="100Gi"))
    assert found(w) == set()


def test_pending_wffc_claim_with_selected_node_and_room_is_stuck():
    w = world()
    w["pvcs"].append(claim("sel", "usel", cls="wffc",
                           annotations={"volume.kubernetes.io/selected-node": "n1"}))
    assert found(w) == {"claim-pending"}


# -- scope ------------------------------------------------------------------------------------
def test_excluded_namespace_drops_its_objects_and_what_hangs_off_them():
    w = world()
    break_pv_bound_to_missing_claim(w)        # PV -> claim in ns
    break_undesired_attachment(w)             # VA of a PV bound to a claim in ns
    assert found(w) == {"bind-symmetric", "attachment-desired"}
    report = check(snap(w), scope=Scope(exclude_namespaces=frozenset({"ns"})))
    assert report.ok and len(report.excluded) == 2


def test_labelled_objects_and_namespaces_are_excluded():
    w = world()
    break_pool_status(w)
    w["pools"][0]["metadata"]["labels"] = {EXCLUDE_LABEL: "deliberately broken"}
    assert found(w) == set()
    w = world()
    break_two_claims_on_one_pv(w)
    w["namespaces"][0]["metadata"]["labels"] = {EXCLUDE_LABEL: "true"}
    assert found(w) == set()


def test_an_excluded_object_does_not_hide_others():
    w = world()
    break_pool_status(w)
    break_released_delete_pv(w)
    by_name(w, "pvs", "released-del")["metadata"]["labels"] = {EXCLUDE_LABEL: ""}
    assert found(w) == {"pool-ledger"}


def test_without_the_pool_crds_the_ledger_is_not_judged():
    w = world()
    w["pools"], w["allocations"] = [], []
    s = Snapshot.of(NOW, pools_installed=False, **copy.deepcopy(w))
    assert check(s).ok


# -- reports ----------------------------------------------------------------------------------
def test_text_and_json_reports():
    w = world()
    break_pool_status(w)
    break_released_delete_pv(w)
    report = check(snap(w))
    out = text(report)
    assert "FAIL  ledger       pool-ledger (1)" in out
    assert "ok    binding      bind-symmetric" in out
    assert "[age 60m00s]" in out and "2 violation(s)" in out
    data = json.loads(as_json(report))
    assert data["ok"] is False
    assert data["violationCounts"] == {"pool-ledger": 1, "pv-released": 1}
    released = next(v for v in data["violations"] if v["invariant"] == "pv-released")
    assert released["ageSeconds"] == 3600 and "PersistentVolume/released-del" in released[
        "objects"]
    assert json.loads(as_json(check(snap(world()))))["ok"] is True


# -- after the flex2 + parity merge -------------------------------------------------------------
def test_a_flex_entry_in_the_node_report_is_not_judged():
    """FlexVolume attachments have no API object: their node-report entries (with the
    driver's devicePath) are neither missing nor extra."""
    w = world()
    by_name(w, "nodes", "n1")["status"]["volumesAttached"].append(
        {"name": "volplane-demo/disk/fpv", "devicePath": "/disks/fpv.img"})
    assert found(w) == set()


def test_two_pvs_on_one_handle_attached_on_two_nodes_is_a_multi_attach():
    """The volume is the unique volume name (as the controller's): a second PV on pvc-ua's
    handle attached on n2 while pvc-ua is attached on n1 breaks RWO."""
    w = world()
    w["pvcs"].append(claim("d", "ud", volume="pvc-ud", phase="Bound"))
    pv = pool_pv("d", "ud")
    pv["spec"]["csi"]["volumeHandle"] = "p1/pvc-ua"
    w["pvs"].append(pv)
    v = va("ua", "n2", 1)
    v["spec"]["source"]["persistentVolumeName"] = "pvc-ud"
    w["vas"].append(v)
    w["pods"].append(pod("pd", "n2", "d"))
    assert "multi-attach" in found(w)
    assert not check(snap(w), only=["multi-attach"]).ok
