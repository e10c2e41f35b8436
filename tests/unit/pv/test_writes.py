"""The writes a decision carries (decide.py): exactly what the effect layer sends."""

from __future__ import annotations

from volplane.pv import constants as c
from volplane.pv.decide import (
    ClaimAction,
    PatchClaim,
    PatchVolume,
    Provision,
    Reclaim,
    VolumeAction,
    sync_claim,
    sync_expansion,
    sync_volume,
)
from volplane.pv.index import VolumeIndex

from .test_decide import BOUND_CLAIM, CLASSES, POOL, RWO, pv, pvc, sc


def decide(claim, *volumes, classes=CLASSES, provisioners=frozenset({POOL})):
    return sync_claim(claim, index=VolumeIndex(volumes), classes=classes,
                      provisioners=provisioners)


def test_a_bind_carries_upstreams_four_writes_in_order():
    d = decide(pvc("5Gi"), pv("fit", "8Gi"))
    assert d.action is ClaimAction.BIND
    w1, w2, w3, w4 = d.writes
    assert w1 == PatchVolume("fit", {
        "spec": {"claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                              "namespace": "ns", "name": "claim", "uid": "uid-1",
                              "resourceVersion": "7"}},
        "metadata": {"annotations": {c.ANN_BOUND_BY_CONTROLLER: "yes"}}},
        step="bind-1", assume=True)
    assert w2 == PatchVolume("fit", {"status": {"phase": "Bound", "message": ""}},
                             status=True, step="bind-2")
    assert w3 == PatchClaim("ns", "claim", {
        "spec": {"volumeName": "fit"},
        "metadata": {"annotations": {c.ANN_BOUND_BY_CONTROLLER: "yes",
                                     c.ANN_BIND_COMPLETED: "yes"}}}, step="bind-3")
    assert w4 == PatchClaim("ns", "claim", {"status": {
        "phase": "Bound", "accessModes": [RWO], "capacity": {"storage": "8Gi"}}},
        status=True, step="bind-4")


def test_a_half_done_bind_carries_only_the_missing_writes():
    """The PV already points at the claim and is Bound (the process died after write 2)."""
    volume = pv("fit", "8Gi", claim="ns/claim", uid="uid-1", phase="Bound",
                annotations={c.ANN_BOUND_BY_CONTROLLER: "yes"})
    d = decide(pvc("5Gi"), volume)
    assert [w.step for w in d.writes] == ["bind-3", "bind-4"]
    assert all(isinstance(w, PatchClaim) for w in d.writes)


def test_status_only_decisions_write_the_claim_status():
    d = decide(pvc("50Gi", phase=None), classes={})
    assert d.action is ClaimAction.SET_PENDING
    assert d.writes == (PatchClaim("ns", "claim", {"status": {"phase": "Pending"}},
                                   status=True),)
    lost = decide(pvc(volume="gone", phase="Bound", annotations=BOUND_CLAIM))
    assert lost.action is ClaimAction.SET_LOST
    assert lost.writes == (PatchClaim("ns", "claim", {"status": {"phase": "Lost"}},
                                      status=True),)


def test_provisioning_annotates_then_asks_the_plugin():
    d = decide(pvc(cls="pool"))
    assert d.action is ClaimAction.PROVISION
    annotate, ask = d.writes
    assert annotate == PatchClaim("ns", "claim", {"metadata": {"annotations": {
        c.ANN_STORAGE_PROVISIONER: POOL, c.ANN_BETA_STORAGE_PROVISIONER: POOL}}})
    assert ask == Provision(POOL, "pool", None)
    annotated = pvc(cls="pool", annotations={c.ANN_STORAGE_PROVISIONER: POOL,
                                             c.ANN_BETA_STORAGE_PROVISIONER: POOL,
                                             c.ANN_SELECTED_NODE: "n1"})
    assert decide(annotated).writes == (Provision(POOL, "pool", "n1"),)


def test_waiting_and_noop_decisions_write_nothing():
    assert decide(pvc(cls="pool"), provisioners=frozenset()).writes == ()
    bound = pvc(volume="pv-1", phase="Bound", annotations=BOUND_CLAIM,
                status={"accessModes": [RWO], "capacity": {"storage": "10Gi"}})
    volume = pv(claim="ns/claim", uid="uid-1", phase="Bound")
    d = decide(bound, volume)
    assert d.action is ClaimAction.NOOP and d.writes == ()


def test_volume_decisions_carry_their_writes():
    kw = {"claims": {}, "deleters": {POOL}, "recyclers": set()}
    d = sync_volume(pv(phase=None), **kw)
    assert d.action is VolumeAction.SET_PHASE
    assert d.writes == (PatchVolume("pv-1", {"status": {"phase": "Available", "message": ""}},
                                    status=True),)
    released = pv(claim="ns/claim", uid="uid-1", phase="Released", policy="Delete",
                  annotations={c.ANN_PROVISIONED_BY: POOL})
    assert sync_volume(released, **kw).writes == (Reclaim(POOL, recycle=False),)
    ours = pv(claim="ns/claim", uid="uid-1", phase="Bound",
              annotations={c.ANN_BOUND_BY_CONTROLLER: "yes"})
    other = pvc(volume="pv-2", phase="Bound", annotations=BOUND_CLAIM)
    d = sync_volume(ours, **{**kw, "claims": {"ns/claim": other}})
    assert d.action is VolumeAction.UNBIND
    assert [w.step for w in d.writes] == ["unbind-1", ""]
    assert d.writes[0].patch == {"metadata": {"annotations": {c.ANN_BOUND_BY_CONTROLLER: None}},
                                 "spec": {"claimRef": None}}


def test_expansion_needs_a_bound_claim_a_class_that_allows_it_and_a_plugin():
    classes = {"pool": {**sc("pool", POOL), "allowVolumeExpansion": True},
               "fixed": sc("fixed", POOL)}
    volume = pv("pv-1", "10Gi", cls="pool", claim="ns/claim", uid="uid-1", phase="Bound",
                annotations={c.ANN_PROVISIONED_BY: POOL})
    bigger = pvc("20Gi", cls="pool", volume="pv-1", phase="Bound", annotations=BOUND_CLAIM,
                 status={"capacity": {"storage": "10Gi"}})
    kw = {"classes": classes, "expanders": {POOL}}
    assert sync_expansion(bigger, volume, **kw) == POOL
    assert sync_expansion(bigger, volume, classes=classes, expanders=set()) is None
    assert sync_expansion(pvc("20Gi", cls="fixed", volume="pv-1", phase="Bound"),
                          volume, **kw) is None
    same = pvc("10Gi", cls="pool", volume="pv-1", phase="Bound",
               status={"capacity": {"storage": "10Gi"}})
    assert sync_expansion(same, volume, **kw) is None
    # the PV grew but the claim's status did not yet: finish it
    grown = pv("pv-1", "20Gi", cls="pool", claim="ns/claim", uid="uid-1", phase="Bound",
               annotations={c.ANN_PROVISIONED_BY: POOL})
    assert sync_expansion(bigger, grown, **kw) == POOL
    assert sync_expansion(pvc("20Gi", cls="pool", volume="pv-1"), volume, **kw) is None
