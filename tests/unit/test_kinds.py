"""Slimmed objects: what the listers keep of Pods and Nodes (volplane.kinds)."""

from __future__ import annotations

from volplane import kinds as K
from volplane.attach import desired as D
from volplane.attach import reconcile as RC

from .attach.world import (
    base_world,
    dsw_of,
    node,
    pod,
)


def test_slim_pod_keeps_what_the_decisions_read():
    p = pod("ns", "p", "n1", "c1", deleted=True, running=False, ephemeral=("e",))
    p["spec"]["containers"] = [{"name": "c", "image": "x" * 1000}]
    p["metadata"]["managedFields"] = [{"big": "x" * 1000}]
    slim = K.slim_pod(p)
    assert len(str(slim)) < 600
    assert D.pod_terminated(slim) and D.pod_terminated(p)
    assert [v["name"] for v in slim["spec"]["volumes"]] == ["v0", "e"]
    w = base_world(K.slim_pod(pod("ns", "p", "n1", "c1")))
    assert [(d.volume.pv_name, k[1]) for k, d in dsw_of(w).items()] == [("pv1", "n1")]


def test_slim_node_keeps_labels_taints_ready_and_volume_lists():
    n = node("n1", ready=False, in_use=["x"], taints=[{"key": RC.OUT_OF_SERVICE_TAINT}])
    n["status"]["images"] = [{"names": ["x" * 500]}]
    n["metadata"]["annotations"]["flannel/huge"] = "y" * 500
    s = K.slim_node(n)
    assert D.node_managed(s) and not RC.node_ready(s) and RC.node_out_of_service(s)
    assert RC.volumes_in_use(s) == {"x"}
    assert "images" not in s["status"] and "flannel/huge" not in s["metadata"]["annotations"]
    assert s["metadata"]["labels"] == n["metadata"]["labels"]
