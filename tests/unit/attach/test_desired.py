"""The desired state of world (volplane.attach.desired)."""

from __future__ import annotations

import pytest

from volplane.attach import desired as D

from .world import (
    DRIVER,
    base_world,
    csidriver,
    dsw_of,
    node,
    pod,
    pv,
    pvc,
    uname,
    world,
)

# -- desired state -------------------------------------------------------------------------


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
    # keyed by (unique volume name, node); the table names the PV for readability
    got = {(d.volume.pv_name, k[1]): [p.name for p in d.pods] for k, d in dsw_of(w).items()}
    assert got == want
    assert all(k[0] == uname(d.volume.pv_name) for k, d in dsw_of(w).items())


@pytest.mark.parametrize("claim,volume,want", [
    pytest.param(pvc("ns", "c1", "pv1", phase="Pending"),
                 pv("pv1", claim=("ns", "c1", "uid-ns-c1")),
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
    assert list(dsw_of(w)) == [(uname("pv9"), "n1")]
    stranger = pvc("ns", "p-scratch", "pv9", owner="someone-else")
    w = world(node("n1"), p, stranger, pv("pv9", claim=("ns", "p-scratch", "uid-ns-p-scratch")))
    assert dsw_of(w) == {}


def test_pods_sharing_a_volume_on_one_node_are_one_entry():
    w = base_world(pod("ns", "a", "n1", "c1"), pod("ns", "b", "n1", "c1"),
                   pod("ns", "c", "n2", "c1"))
    d = dsw_of(w)
    assert sorted(d) == [(uname("pv1"), "n1"), (uname("pv1"), "n2")]
    assert [p.name for p in d[(uname("pv1"), "n1")].pods] == ["a", "b"]
    assert d[(uname("pv1"), "n1")].volume.unique_name == uname("pv1")




def test_in_use_metric_counts_every_scheduled_pods_volumes_as_upstream():
    """getVolumeInUseCount: pods on a node with no Node object (or not managed), and
    drivers that need no attaching, count too; unscheduled pods do not."""
    w = world(node("n1", managed=False), pv("pv1", claim=("ns", "c1", "uid-ns-c1")),
              pvc("ns", "c1", "pv1"), csidriver(DRIVER, False),
              pod("ns", "a", "n1", "c1"), pod("ns", "b", "gone-node", "c1"),
              pod("ns", "c", "", "c1"))
    got = D.volumes_in_use(w["pods"].values(), pvcs=w["pvcs"], pvs=w["pvs"])
    plugin = f"kubernetes.io/csi:{DRIVER}"
    assert got == {("n1", plugin): 1, ("gone-node", plugin): 1}
