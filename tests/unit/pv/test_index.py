"""VolumeIndex and the claim -> volume matching rules (upstream FindMatchingVolume)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volplane.pv import constants as c
from volplane.pv.index import (
    ACCESS_MODES,
    ATTRIBUTES_CLASS,
    BOUND_ELSEWHERE,
    DELAY_BINDING,
    DELETING,
    NODE_AFFINITY,
    NOT_AVAILABLE,
    SELECTOR,
    STORAGE_CLASS,
    TOO_SMALL,
    VOLUME_MODE,
    VolumeIndex,
    brute_force_match,
    volume_capacity,
)

GI = 1024**3
RWO, ROX, RWX = "ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany"


def pv(
    name: str,
    size: str = "1Gi",
    *,
    cls: str | None = "",
    modes: tuple[str, ...] = (RWO,),
    mode: str | None = None,
    phase: str | None = "Available",
    claim: str | None = None,
    uid: str | None = None,
    labels: dict | None = None,
    annotations: dict | None = None,
    deleting: bool = False,
    affinity: dict | None = None,
    vac: str | None = None,
) -> dict[str, Any]:
    """A PersistentVolume dict; ``claim`` is "namespace/name" for spec.claimRef."""
    spec: dict[str, Any] = {"capacity": {"storage": size}, "accessModes": list(modes)}
    if vac:
        spec["volumeAttributesClassName"] = vac
    if cls:
        spec["storageClassName"] = cls
    if mode:
        spec["volumeMode"] = mode
    if claim:
        ns, claim_name = claim.split("/")
        spec["claimRef"] = {"kind": "PersistentVolumeClaim", "namespace": ns, "name": claim_name}
        if uid:
            spec["claimRef"]["uid"] = uid
    if affinity:
        spec["nodeAffinity"] = affinity
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    if annotations:
        meta["annotations"] = annotations
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    out = {"metadata": meta, "spec": spec}
    if phase:
        out["status"] = {"phase": phase}
    return out


def pvc(
    size: str = "1Gi",
    *,
    key: str = "ns/claim",
    uid: str = "uid-1",
    cls: str | None = None,
    modes: tuple[str, ...] = (RWO,),
    mode: str | None = None,
    selector: dict | None = None,
    annotations: dict | None = None,
    vac: str | None = None,
) -> dict[str, Any]:
    """A PersistentVolumeClaim dict (storageClassName omitted when cls is None)."""
    ns, name = key.split("/")
    spec: dict[str, Any] = {
        "accessModes": list(modes),
        "resources": {"requests": {"storage": size}},
    }
    if vac:
        spec["volumeAttributesClassName"] = vac
    if cls is not None:
        spec["storageClassName"] = cls
    if mode:
        spec["volumeMode"] = mode
    if selector is not None:
        spec["selector"] = selector
    meta: dict[str, Any] = {"name": name, "namespace": ns, "uid": uid}
    if annotations:
        meta["annotations"] = annotations
    return {"metadata": meta, "spec": spec, "status": {"phase": "Pending"}}


def zone_affinity(zone: str) -> dict:
    expr = {"key": "zone", "operator": "In", "values": [zone]}
    return {"required": {"nodeSelectorTerms": [{"matchExpressions": [expr]}]}}


NODE_A = {"metadata": {"name": "node-a", "labels": {"zone": "a"}}}


def both(volumes: list[dict], claim: dict, **kw: Any):
    """Run the index and the reference; assert they agree; return the index result."""
    index = VolumeIndex(volumes)
    fast = index.find_best_match(claim, **kw)
    slow = brute_force_match(claim, volumes, **kw)
    assert _name(fast.volume) == _name(slow.volume)
    return fast


def _name(volume: dict | None) -> str | None:
    return None if volume is None else volume["metadata"]["name"]


# --- smallest fit --------------------------------------------------------------------------

LADDER = [pv(f"pv-{n}", f"{n}Gi") for n in (20, 1, 10, 5, 2)]


@pytest.mark.parametrize(
    ("request_size", "expected"),
    [
        ("0", "pv-1"),
        ("1Gi", "pv-1"),
        ("1.5Gi", "pv-2"),
        ("3Gi", "pv-5"),
        ("5Gi", "pv-5"),
        ("6Gi", "pv-10"),
        ("10Gi", "pv-10"),
        ("11Gi", "pv-20"),
        ("20Gi", "pv-20"),
        ("21Gi", None),
    ],
)
def test_smallest_fit(request_size: str, expected: str | None) -> None:
    assert _name(both(LADDER, pvc(request_size)).volume) == expected


def test_ties_are_broken_by_name() -> None:
    volumes = [pv("b", "5Gi"), pv("a", "5Gi"), pv("c", "5Gi")]
    assert _name(both(volumes, pvc("5Gi")).volume) == "a"


# --- each criterion alone ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("volume", "claim", "criterion"),
    [
        (pv("v", "1Gi"), pvc("2Gi"), TOO_SMALL),
        (pv("v", mode="Block"), pvc(), VOLUME_MODE),
        (pv("v"), pvc(mode="Block"), VOLUME_MODE),
        (pv("v", mode="Filesystem"), pvc(mode="Block"), VOLUME_MODE),
        (pv("v", cls="fast"), pvc(cls="slow"), STORAGE_CLASS),
        (pv("v", cls="fast"), pvc(), STORAGE_CLASS),  # claim without class wants ""
        (pv("v"), pvc(cls="slow"), STORAGE_CLASS),
        (pv("v", modes=(RWO,)), pvc(modes=(RWX,)), ACCESS_MODES),
        (pv("v", modes=(RWO,)), pvc(modes=(RWO, ROX)), ACCESS_MODES),
        (
            pv("v", labels={"tier": "silver"}),
            pvc(selector={"matchLabels": {"tier": "gold"}}),
            SELECTOR,
        ),
        (pv("v"), pvc(selector={"matchLabels": {"tier": "gold"}}), SELECTOR),
        (pv("v", claim="ns/other", uid="u9"), pvc(), BOUND_ELSEWHERE),
        (pv("v", claim="other-ns/claim"), pvc(), BOUND_ELSEWHERE),
        # an empty claimRef {} is a claimRef (upstream: non-nil), never a free volume
        ({**pv("v"), "spec": {**pv("v")["spec"], "claimRef": {}}}, pvc(), BOUND_ELSEWHERE),
        (pv("v", phase="Released"), pvc(), NOT_AVAILABLE),
        (pv("v", phase="Pending"), pvc(), NOT_AVAILABLE),
        (pv("v", phase=None), pvc(), NOT_AVAILABLE),
        (pv("v", deleting=True), pvc(), DELETING),
        # VolumeAttributesClass: unset matches only unset
        (pv("v", vac="fast"), pvc(vac="slow"), ATTRIBUTES_CLASS),
        (pv("v", vac="fast"), pvc(), ATTRIBUTES_CLASS),
        (pv("v"), pvc(vac="fast"), ATTRIBUTES_CLASS),
    ],
)
def test_each_criterion_rejects_alone(volume: dict, claim: dict, criterion: str) -> None:
    result = both([volume], claim)
    assert result.volume is None
    slow = brute_force_match(claim, [volume])
    assert slow.counts == {criterion: 1}
    assert slow.considered == 1


@pytest.mark.parametrize(
    ("volume", "claim"),
    [
        (pv("v", modes=(RWO, ROX, RWX)), pvc(modes=(RWO, RWX))),  # superset of modes is fine
        (pv("v", modes=()), pvc(modes=())),
        (pv("v", modes=(RWO,)), pvc(modes=())),
        (pv("v", mode="Filesystem"), pvc()),  # unset means Filesystem
        (pv("v", mode="Block"), pvc(mode="Block")),
        (pv("v", cls="fast"), pvc(cls="fast")),
        (pv("v", annotations={c.ANN_BETA_STORAGE_CLASS: "fast"}), pvc(cls="fast")),
        (pv("v", cls="fast"), pvc(annotations={c.ANN_BETA_STORAGE_CLASS: "fast"})),
        # the beta annotation wins over spec.storageClassName, as upstream
        (
            pv("v", cls="slow", annotations={c.ANN_BETA_STORAGE_CLASS: "fast"}),
            pvc(cls="fast"),
        ),
        (pv("v", labels={"tier": "gold"}), pvc(selector={"matchLabels": {"tier": "gold"}})),
        (pv("v"), pvc(selector={})),
        (pv("v", "1000Mi"), pvc("1000Mi")),
        (pv("v", "2G"), pvc("1.5Gi")),
        (pv("v", vac="fast"), pvc(vac="fast")),
    ],
)
def test_matches(volume: dict, claim: dict) -> None:
    assert _name(both([volume], claim).volume) == "v"


# --- access-mode preference ----------------------------------------------------------------


def test_attributes_class_picks_the_volume_of_the_claims_class() -> None:
    volumes = [pv("plain", "1Gi"), pv("fast", "2Gi", vac="fast"), pv("gold", "1Gi", vac="gold")]
    assert _name(both(volumes, pvc("1Gi", vac="fast")).volume) == "fast"
    assert _name(both(volumes, pvc("1Gi")).volume) == "plain"
    assert both(volumes, pvc("1Gi", vac="silver")).volume is None
    why = brute_force_match(pvc("1Gi", vac="silver"), volumes).reason
    assert '3 volumeAttributesClassName ≠ "silver"' in why


def test_fewest_access_modes_first_then_smallest() -> None:
    """Upstream searches RWO volumes before RWO+RWX ones, even if those are smaller."""
    volumes = [pv("wide-1g", "1Gi", modes=(RWO, RWX)), pv("narrow-10g", "10Gi", modes=(RWO,))]
    assert _name(both(volumes, pvc("1Gi")).volume) == "narrow-10g"
    # when the narrow set has nothing that fits, the wider set is used
    assert _name(both(volumes, pvc("11Gi")).volume) is None
    volumes.append(pv("wide-20g", "20Gi", modes=(RWO, RWX)))
    assert _name(both(volumes, pvc("11Gi")).volume) == "wide-20g"
    # a claim for RWX only looks at sets containing RWX
    assert _name(both(volumes, pvc("1Gi", modes=(RWX,))).volume) == "wide-1g"


# --- pre-bound volumes ---------------------------------------------------------------------


def test_prebound_wins_over_smaller_free_volume() -> None:
    volumes = [pv("free", "1Gi"), pv("reserved", "10Gi", claim="ns/claim", phase="Available")]
    result = both(volumes, pvc("1Gi"))
    assert _name(result.volume) == "reserved"
    assert "pre-bound" in result.reason


def test_prebound_ignores_class_selector_and_phase() -> None:
    reserved = pv("reserved", "5Gi", cls="other", claim="ns/claim", uid="uid-1", phase="Bound")
    claim = pvc("1Gi", cls="mine", selector={"matchLabels": {"x": "y"}})
    assert _name(both([reserved], claim).volume) == "reserved"


@pytest.mark.parametrize(
    ("reserved", "criterion"),
    [
        (pv("reserved", "5Gi", claim="ns/claim", uid="other-uid"), BOUND_ELSEWHERE),
        (pv("reserved", "1Gi", claim="ns/claim"), TOO_SMALL),
        (pv("reserved", "5Gi", claim="ns/claim", mode="Block"), VOLUME_MODE),
        (pv("reserved", "5Gi", claim="ns/claim", modes=(ROX,)), ACCESS_MODES),
        (pv("reserved", "5Gi", claim="ns/claim", deleting=True), DELETING),
        # upstream checks the attributes class before the pre-bound shortcut
        (pv("reserved", "5Gi", claim="ns/claim", vac="fast"), ATTRIBUTES_CLASS),
    ],
)
def test_prebound_must_still_fit(reserved: dict, criterion: str) -> None:
    claim = pvc("2Gi")
    assert both([reserved], claim).volume is None
    # ... and then an ordinary volume can still be chosen
    assert _name(both([reserved, pv("free", "3Gi")], claim).volume) == "free"
    assert brute_force_match(claim, [reserved]).counts == {criterion: 1}


def test_prebound_with_matching_uid_wins() -> None:
    volumes = [pv("reserved", "5Gi", claim="ns/claim", uid="uid-1"), pv("free", "2Gi")]
    assert _name(both(volumes, pvc("1Gi")).volume) == "reserved"


def test_several_prebound_take_the_smallest() -> None:
    volumes = [pv("r-big", "9Gi", claim="ns/claim"), pv("r-small", "3Gi", claim="ns/claim")]
    assert _name(both(volumes, pvc("1Gi")).volume) == "r-small"


# --- WaitForFirstConsumer and nodes --------------------------------------------------------


def test_delay_binding_skips_unbound_volumes() -> None:
    volumes = [pv("free", "5Gi")]
    result = both(volumes, pvc("1Gi"), delay_binding=True)
    assert result.volume is None
    assert brute_force_match(pvc("1Gi"), volumes, delay_binding=True).counts == {DELAY_BINDING: 1}


def test_delay_binding_still_binds_prebound() -> None:
    volumes = [pv("free", "5Gi"), pv("reserved", "5Gi", claim="ns/claim")]
    assert _name(both(volumes, pvc("1Gi"), delay_binding=True).volume) == "reserved"


def test_delay_binding_with_node_is_the_scheduler_path() -> None:
    volumes = [
        pv("b", "5Gi", affinity=zone_affinity("b")),
        pv("a", "8Gi", affinity=zone_affinity("a")),
    ]
    result = both(volumes, pvc("1Gi"), delay_binding=True, node=NODE_A)
    assert _name(result.volume) == "a"
    slow = brute_force_match(pvc("1Gi"), volumes, delay_binding=True, node=NODE_A)
    assert slow.counts == {NODE_AFFINITY: 1}


def test_node_affinity_ignored_without_node() -> None:
    assert _name(both([pv("b", affinity=zone_affinity("b"))], pvc()).volume) == "b"


def test_prebound_not_fitting_node_means_no_match() -> None:
    volumes = [pv("reserved", "5Gi", claim="ns/claim", affinity=zone_affinity("b")), pv("free")]
    result = both(volumes, pvc("1Gi"), node=NODE_A)
    assert result.volume is None
    assert 'node "node-a"' in result.reason
    slow = brute_force_match(pvc("1Gi"), volumes, node=NODE_A)
    assert slow.volume is None and "pre-bound" in slow.reason


# --- explanations --------------------------------------------------------------------------


def test_explanation_reads_like_the_seed_example() -> None:
    """Issue 14: "of 6 gold PVs: 3 too small (largest 10Gi < 100Gi), 3 bound to other
    claims" and the PVs of every other class as one line."""
    volumes = [pv(f"small-{n}", f"{n}Gi", cls="gold") for n in (1, 5, 10)]
    volumes += [pv(f"taken-{n}", "200Gi", cls="gold", claim=f"ns/other-{n}") for n in range(3)]
    volumes += [pv(f"silver-{n}", "500Gi", cls="silver") for n in range(20)]
    volumes += [pv(f"plain-{n}", "500Gi") for n in range(4)]
    claim = pvc("100Gi", cls="gold")
    index = VolumeIndex(volumes)
    assert index.find_best_match(claim).volume is None
    result = index.explain(claim)
    assert result.volume is None
    assert result.considered == 30
    assert result.counts == {TOO_SMALL: 3, BOUND_ELSEWHERE: 3, STORAGE_CLASS: 24}
    assert result.reason == (
        "no persistent volumes matched: of 6 gold PVs: 3 too small (largest 10Gi < 100Gi), "
        "3 bound to other claims; 24 of other classes"
    )


WHY = [
    # (id, volume, claim, the one part of the line)
    ("other class is one line, never 'too small'",
     pv("v", "1Gi", cls="silver"), pvc("5Gi", cls="gold"), "no gold PVs; 1 of other classes"),
    ("volume mode before size",
     pv("v", "1Gi", cls="g", mode="Block"), pvc("5Gi", cls="g"), '1 volumeMode ≠ "Filesystem"'),
    ("attributes class before selector",
     pv("v", cls="g", vac="fast"), pvc(cls="g", selector={"matchLabels": {"x": "y"}}),
     '1 volumeAttributesClassName ≠ ""'),
    ("selector before access modes",
     pv("v", cls="g", modes=(ROX,)), pvc(cls="g", selector={"matchLabels": {"x": "y"}}),
     "1 not matching the claim's selector"),
    ("access modes before size",
     pv("v", "1Gi", cls="g", modes=(ROX,)), pvc("5Gi", cls="g"),
     "1 lacking access modes ReadWriteOnce"),
    ("size before availability",
     pv("v", "1Gi", cls="g", claim="ns/else", uid="u9"), pvc("5Gi", cls="g"),
     "1 too small (largest 1Gi < 5Gi)"),
    ("availability: bound to other claims",
     pv("v", cls="g", claim="ns/else", uid="u9"), pvc(cls="g"), "1 bound to other claims"),
    ("availability: not Available, by phase",
     pv("v", cls="g", phase="Released"), pvc(cls="g"), "1 not Available (Released: 1)"),
    ("availability: being deleted",
     pv("v", cls="g", deleting=True), pvc(cls="g"), "1 being deleted"),
    ("a claim without class counts PVs without a class",
     pv("v", "1Gi"), pvc("5Gi"), "of 1 PVs without a class: 1 too small"),
]


@pytest.mark.parametrize(("volume", "claim", "part"), [w[1:] for w in WHY],
                         ids=[w[0] for w in WHY])
def test_why_pending_classifies_by_the_first_criterion_a_person_checks(
        volume: dict, claim: dict, part: str) -> None:
    result = VolumeIndex([volume]).explain(claim)
    assert result.volume is None
    assert part in result.reason, result.reason
    assert sum(result.counts.values()) == 1


def test_why_pending_lists_criteria_in_the_seed_order() -> None:
    volumes = [
        pv("gold", "20Gi", cls="gold", labels={"tier": "a"}),
        pv("released", "20Gi", cls="want", phase="Released", labels={"tier": "a"}),
        pv("block", "20Gi", cls="want", mode="Block"),
        pv("rox", "20Gi", cls="want", modes=(ROX,), labels={"tier": "a"}),
        pv("gone", "20Gi", cls="want", deleting=True, labels={"tier": "a"}),
        pv("label", "20Gi", cls="want", labels={"tier": "b"}),
        pv("tiny", "1Gi", cls="want", labels={"tier": "a"}),
    ]
    claim = pvc("10Gi", cls="want", selector={"matchLabels": {"tier": "a"}})
    assert VolumeIndex(volumes).explain(claim).reason == (
        "no persistent volumes matched: of 6 want PVs: "
        '1 volumeMode ≠ "Filesystem", 1 not matching the claim\'s selector, '
        "1 lacking access modes ReadWriteOnce, 1 too small (largest 1Gi < 10Gi), "
        "1 not Available (Released: 1), 1 being deleted; 1 of other classes"
    )


def test_explanation_wffc_and_node() -> None:
    volumes = [pv("free", "5Gi")]
    assert "left to the scheduler" in VolumeIndex(volumes).explain(pvc(), delay_binding=True).reason
    volumes = [pv("b", affinity=zone_affinity("b"))]
    reason = VolumeIndex(volumes).explain(pvc(), node=NODE_A).reason
    assert '1 not reachable from node "node-a"' in reason


def test_explanation_of_empty_index() -> None:
    assert VolumeIndex().explain(pvc()).reason == "no persistent volumes matched: 0 considered"


def test_explain_agrees_with_find_on_success() -> None:
    index = VolumeIndex(LADDER)
    assert _name(index.explain(pvc("3Gi")).volume) == _name(
        index.find_best_match(pvc("3Gi")).volume
    )


# --- maintenance and cost ------------------------------------------------------------------


def test_upsert_moves_and_remove_forgets() -> None:
    index = VolumeIndex()
    index.upsert(pv("v", "5Gi", cls="a"))
    assert len(index) == 1 and "v" in index
    assert _name(index.find_best_match(pvc(cls="a")).volume) == "v"
    index.upsert(pv("v", "5Gi", cls="b"))  # class change moves it to another bucket
    assert len(index) == 1
    assert index.find_best_match(pvc(cls="a")).volume is None
    assert _name(index.find_best_match(pvc(cls="b")).volume) == "v"
    index.upsert(pv("v", "1Gi", cls="b"))  # capacity change
    assert index.find_best_match(pvc("2Gi", cls="b")).volume is None
    index.upsert(pv("v", "5Gi", cls="b", claim="ns/claim"))  # claimed: only for its claim
    assert _name(index.find_best_match(pvc(cls="b")).volume) == "v"
    assert index.find_best_match(pvc(cls="b", key="ns/else")).volume is None
    index.upsert(pv("v", "5Gi", cls="b"))  # claimRef removed: free again
    assert _name(index.find_best_match(pvc(cls="b", key="ns/else")).volume) == "v"
    index.remove("v")
    index.remove("v")  # unknown names are ignored
    assert len(index) == 0 and index.get("v") is None
    assert list(index.volumes()) == []
    assert index._buckets == {} and index._claimed == {} and index._slots == {}


def test_get_returns_deleting_volumes() -> None:
    index = VolumeIndex([pv("v", deleting=True)])
    assert index.get("v") is not None
    assert index.find_best_match(pvc()).volume is None


def test_bad_capacity_is_rejected_without_changing_the_index() -> None:
    index = VolumeIndex([pv("v", "1Gi")])
    with pytest.raises(ValueError):
        index.upsert(pv("v", "lots"))
    assert volume_capacity(index.get("v")) == GI


def test_lookup_does_not_scan_every_volume() -> None:
    volumes = [pv(f"bound-{i}", "100Gi", claim=f"ns/c{i}", uid=f"u{i}") for i in range(1000)]
    volumes += [pv(f"small-{i}", "1Gi") for i in range(1000)]
    volumes += [pv(f"other-class-{i}", "100Gi", cls="x") for i in range(1000)]
    volumes += [pv("fit-b", "50Gi"), pv("fit-a", "50Gi"), pv("big", "80Gi")]
    index = VolumeIndex(volumes)
    result = index.find_best_match(pvc("10Gi"))
    assert _name(result.volume) == "fit-a"
    assert result.considered == 1
    missing = index.find_best_match(pvc("200Gi"))
    assert missing.volume is None and missing.considered == 0


# --- property test: the index agrees with the reference ------------------------------------

MODE_SETS = st.sets(st.sampled_from([RWO, ROX, RWX]), max_size=3).map(tuple)
SIZES = st.sampled_from(["0", "1Gi", "2Gi", "1500Mi", "3Gi", "5Gi"])
AFFINITIES = [None, zone_affinity("a"), zone_affinity("b")]
LABEL_SETS = [None, {"tier": "a"}, {"tier": "b"}]
# One tuple per volume keeps Hypothesis' per-example cost low. Values are weighted towards
# volumes that fit, so that most examples have several candidates to choose between.
VOLUME_FIELDS = st.tuples(
    SIZES,
    st.sampled_from(["", "", "a"]),
    MODE_SETS,
    st.sampled_from([None, None, "Filesystem", "Block"]),
    st.sampled_from(["Available"] * 4 + ["Bound", "Released", None]),
    st.sampled_from([None] * 4 + ["ns/claim", "ns/other", "other/claim"]),
    st.sampled_from([None, "uid-1", "uid-2"]),
    st.sampled_from([0, 0, 1, 2]),  # index into LABEL_SETS
    st.integers(0, 5),  # 0: deleting
    st.sampled_from([0, 0, 1, 2]),  # index into AFFINITIES
    st.sampled_from([None, None, "fast"]),  # volumeAttributesClassName
)
SELECTORS = [
    None,
    {"matchLabels": {"tier": "a"}},
    {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["b"]}]},
]
CLAIM_FIELDS = st.tuples(
    SIZES,
    st.sampled_from([None, "", "a"]),
    MODE_SETS,
    st.sampled_from([None, None, None, "Block"]),
    st.sampled_from([0, 0, 1, 2]),  # index into SELECTORS
    st.sampled_from([False, False, True]),  # delay_binding
    st.booleans(),  # with node
    st.sampled_from([None, None, "fast"]),  # volumeAttributesClassName
)


def make_volume(name: str, fields: tuple) -> dict:
    size, cls, modes, mode, phase, claim_ref, uid, labels, deleting, aff, vac = fields
    return pv(
        name,
        size,
        cls=cls,
        modes=modes,
        mode=mode,
        phase=phase,
        claim=claim_ref,
        uid=uid if claim_ref else None,
        labels=LABEL_SETS[labels],
        deleting=deleting == 0,
        affinity=AFFINITIES[aff],
        vac=vac,
    )


def make_claim(fields: tuple) -> tuple[dict, dict]:
    size, cls, modes, mode, selector, delay, with_node, vac = fields
    claim = pvc(size, cls=cls, modes=modes, mode=mode, selector=SELECTORS[selector], vac=vac)
    return claim, {"delay_binding": delay, "node": NODE_A if with_node else None}


def _answer(result) -> tuple | None:
    if result.volume is None:
        return None
    volume = result.volume
    modes = frozenset(volume["spec"]["accessModes"])
    return (len(modes), tuple(sorted(modes)), volume_capacity(volume), volume["metadata"]["name"])


@settings(max_examples=150, deadline=None)
@given(st.lists(VOLUME_FIELDS, max_size=16), CLAIM_FIELDS)
def test_index_agrees_with_brute_force(volume_fields: list[tuple], claim_fields: tuple) -> None:
    volumes = [make_volume(f"pv-{i}", f) for i, f in enumerate(volume_fields)]
    claim, options = make_claim(claim_fields)
    fast = VolumeIndex(volumes).find_best_match(claim, **options)
    slow = brute_force_match(claim, volumes, **options)
    assert _answer(fast) == _answer(slow)
    assert slow.considered == len(volumes)
    assert sum(slow.counts.values()) <= len(volumes)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(VOLUME_FIELDS, max_size=8),
    st.lists(
        st.tuples(st.integers(0, 9), st.one_of(st.none(), VOLUME_FIELDS)), max_size=12
    ),  # (volume number, new version or None = remove)
    CLAIM_FIELDS,
)
def test_index_agrees_after_updates_and_removals(
    initial: list[tuple], updates: list[tuple[int, tuple | None]], claim_fields: tuple
) -> None:
    index = VolumeIndex()
    live: dict[str, dict] = {}
    for i, fields in enumerate(initial):
        live[f"pv-{i}"] = make_volume(f"pv-{i}", fields)
        index.upsert(live[f"pv-{i}"])
    for number, fields in updates:
        name = f"pv-{number}"
        if fields is None:
            index.remove(name)
            live.pop(name, None)
        else:
            live[name] = make_volume(name, fields)
            index.upsert(live[name])
    assert len(index) == len(live)
    claim, options = make_claim(claim_fields)
    slow = brute_force_match(claim, list(live.values()), **options)
    assert _answer(index.find_best_match(claim, **options)) == _answer(slow)
    assert _answer(index.explain(claim, **options)) == _answer(slow)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(SIZES, MODE_SETS, st.sampled_from([None] * 5 + ["ns/claim"])),
        min_size=2,
        max_size=16,
    ),
    SIZES,
    st.sampled_from([(), (RWO,), (RWO,), (RWX,), (RWO, RWX)]),
)
def test_index_agrees_on_dense_candidates(
    volume_fields: list[tuple], size: str, modes: tuple[str, ...]
) -> None:
    """Nearly every volume is a candidate: exercises the size and access-mode ordering."""
    volumes = [
        pv(f"pv-{i}", v_size, modes=v_modes, claim=claim_ref)
        for i, (v_size, v_modes, claim_ref) in enumerate(volume_fields)
    ]
    claim = pvc(size, modes=modes)
    slow = brute_force_match(claim, volumes)
    assert _answer(VolumeIndex(volumes).find_best_match(claim)) == _answer(slow)
