"""The actual state of world (volplane.attach.actual)."""

from __future__ import annotations

from volplane.attach import actual as A
from volplane.attach import reports as R

from .world import (
    node,
    pv,
    uname,
    va,
    world,
)


# -- actual state --------------------------------------------------------------------------
def test_actual_state_from_volume_attachments():
    w = world(node("n1"), pv("pv1"))
    asw = A.build_asw([va("pv1", "n1"), va("pv2", "n1", attached=False),
                       va("pv3", "n1", deleting=True)], pvs=w["pvs"], nodes=w["nodes"])
    # keyed by volume identity: the unique volume name of a known PV, else the PV name
    assert {k: a.state for k, a in asw.items()} == {
        (uname("pv1"), "n1"): A.AState.ATTACHED, ("pv2", "n1"): A.AState.ATTACHING,
        ("pv3", "n1"): A.AState.DETACHING}
    assert asw[(uname("pv1"), "n1")].unique_name == uname("pv1")
    assert asw[("pv2", "n1")].unique_name is None  # PV gone, node names nothing


def test_actual_state_names_a_volume_whose_pv_is_gone_from_the_node_lists():
    n = node("n1", in_use=[uname("pv2")])
    asw = A.build_asw([va("pv2", "n1")], pvs={}, nodes={"n1": n})
    assert asw[("pv2", "n1")].unique_name == uname("pv2")


def test_node_volumes_attached_reports_attached_not_detaching():
    w = world(node("n1"), pv("pv1"), pv("pv2"), pv("pv3"))
    a1 = va("pv1", "n1")
    a1["status"]["attachmentMetadata"] = {"devicePath": "/dev/volplane/pool-a/slot-0"}
    asw = A.build_asw([a1, va("pv2", "n1", attached=False), va("pv3", "n1"),
                       va("pv1", "n2")], pvs=w["pvs"], nodes=w["nodes"])
    got = R.node_volumes_attached(asw.values(), "n1", detaching=[(uname("pv3"), "n1")])
    # devicePath: "" for CSI volumes, as upstream (not the attacher's attachmentMetadata)
    assert got == [{"name": uname("pv1"), "devicePath": ""}]
