"""In-memory PV index and the claim -> volume matching rules.

Matching follows upstream ``FindMatchingVolume`` (component-helpers) as called by the PV
controller's ``persistentVolumeOrderedIndex.findByClaim``. For one claim, a volume is
rejected by the first rule it breaks, in this order:

1. ``spec.claimRef`` names another claim (name/namespace differ, or the claimRef has a
   UID that is not the claim's)                                   -> ``bound_elsewhere``
2. the volume's access modes do not include every mode the claim asks for
   (upstream gets this from its access-mode index)                -> ``access_modes``
3. ``spec.capacity.storage`` < the claim's storage request        -> ``too_small``
4. ``volumeMode`` differs (unset means Filesystem on both sides)  -> ``volume_mode``
5. ``volumeAttributesClassName`` differs (unset matches only unset; upstream's
   VolumeAttributesClass gate, on since 1.34)                     -> ``attributes_class``
6. the volume has a ``deletionTimestamp``                         -> ``deleting``
7. a volume whose claimRef names *this* claim (pre-bound by a user, by the scheduler,
   or provisioned for it) wins at once: it is the answer if its node affinity fits the
   node (when a node is given), and there is no answer otherwise. Class, selector and
   phase are *not* checked for it (its attributes class is, as upstream).
8. WaitForFirstConsumer without a node: the scheduler binds unbound volumes, so the
   controller considers nothing else                              -> ``delay_binding``
9. ``status.phase`` is not Available                              -> ``not_available``
10. the claim's ``spec.selector`` does not match the volume labels -> ``selector``
11. storage class differs                                         -> ``storage_class``
12. node given and the volume's node affinity does not fit it     -> ``node_affinity``

Among the survivors upstream walks access-mode sets from the fewest modes to the most
and returns the smallest volume of the first set that has one: a claim for RWO gets an
RWO volume before a (possibly smaller) RWO+RWX one, so wider volumes are kept for the
claims that need them. We keep that preference; ties are broken by set (sorted mode
names), then capacity, then volume name, so the answer is deterministic.

Deliberate difference: upstream only finds a pre-bound volume if no narrower access-mode
set produced a match first (an artefact of its loop order). Here a pre-bound volume
always wins, which is what the user who pre-bound it meant. If several volumes are
pre-bound to one claim, the first in (capacity, name) order that passes rules 2-5 is
taken (upstream takes whichever its cache lists first).

``VolumeIndex.find_best_match`` answers in O(buckets * log n) plus the candidates it has
to look at and reject for a rule the index cannot see (6, 9, 10, 12). ``brute_force_match``
is the plain-loop reference; ``VolumeIndex.explain`` uses it to write a detailed reason.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from volplane.objects import annotations as _annotations
from volplane.objects import md as _meta
from volplane.objects import name as _name
from volplane.objects import phase as _phase
from volplane.objects import spec as _spec
from volplane.pv import constants as c
from volplane.quantity import format_quantity, parse_quantity
from volplane.selectors import match_label_selector, match_node_affinity

__all__ = [
    "CRITERIA",
    "HUMAN_ORDER",
    "ClaimQuery",
    "MatchResult",
    "VolumeIndex",
    "access_modes",
    "brute_force_match",
    "claim_class",
    "claim_has_class",
    "claim_key",
    "claim_ref_key",
    "claim_request",
    "claim_volume_mode",
    "is_volume_bound_to_claim",
    "volume_capacity",
    "volume_class",
    "volume_attributes_class",
    "volume_mode",
    "volume_mode_mismatch",
    "why_pending",
]

# Rejection criteria, in the order they are checked.
BOUND_ELSEWHERE = "bound_elsewhere"
ACCESS_MODES = "access_modes"
TOO_SMALL = "too_small"
VOLUME_MODE = "volume_mode"
ATTRIBUTES_CLASS = "attributes_class"
DELETING = "deleting"
DELAY_BINDING = "delay_binding"
NOT_AVAILABLE = "not_available"
SELECTOR = "selector"
STORAGE_CLASS = "storage_class"
NODE_AFFINITY = "node_affinity"
CRITERIA = (
    BOUND_ELSEWHERE,
    ACCESS_MODES,
    TOO_SMALL,
    VOLUME_MODE,
    ATTRIBUTES_CLASS,
    DELETING,
    DELAY_BINDING,
    NOT_AVAILABLE,
    SELECTOR,
    STORAGE_CLASS,
    NODE_AFFINITY,
)
# Marker returned by _classify for a volume whose claimRef names the claim.
_PREBOUND = "prebound"


# --- field accessors ------------------------------------------------------------------


def claim_key(claim: Mapping[str, Any]) -> str:
    """``namespace/name`` of a claim."""
    meta = _meta(claim)
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def claim_ref_key(volume: Mapping[str, Any]) -> str | None:
    """``namespace/name`` of the claim a PV's claimRef names, or None when unclaimed.

    An empty ``claimRef: {}`` is a claim (upstream: any non-nil claimRef), named "/"."""
    ref = _spec(volume).get("claimRef")
    if ref is None:
        return None
    return f"{ref.get('namespace', '')}/{ref.get('name', '')}"


def volume_class(volume: Mapping[str, Any]) -> str:
    """A PV's class: the beta annotation first (as upstream), then spec.storageClassName."""
    annotations = _annotations(volume)
    if c.ANN_BETA_STORAGE_CLASS in annotations:
        return annotations[c.ANN_BETA_STORAGE_CLASS]
    return _spec(volume).get("storageClassName") or ""


def claim_class(claim: Mapping[str, Any]) -> str:
    """A claim's requested class: beta annotation, then spec.storageClassName, else ""."""
    annotations = _annotations(claim)
    if c.ANN_BETA_STORAGE_CLASS in annotations:
        return annotations[c.ANN_BETA_STORAGE_CLASS]
    return _spec(claim).get("storageClassName") or ""


def claim_has_class(claim: Mapping[str, Any]) -> bool:
    """True when the claim names a class at all (even ""): no default class is assigned."""
    return (
        c.ANN_BETA_STORAGE_CLASS in _annotations(claim)
        or _spec(claim).get("storageClassName") is not None
    )


def volume_mode(volume: Mapping[str, Any]) -> str:
    """A PV's volumeMode; unset means Filesystem."""
    return _spec(volume).get("volumeMode") or c.FILESYSTEM


def claim_volume_mode(claim: Mapping[str, Any]) -> str:
    """A claim's volumeMode; unset means Filesystem."""
    return _spec(claim).get("volumeMode") or c.FILESYSTEM


def volume_mode_mismatch(claim: Mapping[str, Any], volume: Mapping[str, Any]) -> bool:
    """Upstream CheckVolumeModeMismatches."""
    return claim_volume_mode(claim) != volume_mode(volume)


def volume_attributes_class(obj: Mapping[str, Any]) -> str:
    """spec.volumeAttributesClassName of a PV or a claim; unset (or null) is ""."""
    return _spec(obj).get("volumeAttributesClassName") or ""


def access_modes(obj: Mapping[str, Any]) -> frozenset[str]:
    """spec.accessModes of a PV or a claim as a set."""
    return frozenset(_spec(obj).get("accessModes") or ())


def volume_capacity(volume: Mapping[str, Any]) -> int:
    """spec.capacity.storage in bytes (0 when missing)."""
    value = (_spec(volume).get("capacity") or {}).get("storage")
    return 0 if value is None else parse_quantity(value)


def claim_request(claim: Mapping[str, Any]) -> int:
    """spec.resources.requests.storage in bytes (0 when missing)."""
    requests = (_spec(claim).get("resources") or {}).get("requests") or {}
    value = requests.get("storage")
    return 0 if value is None else parse_quantity(value)


def is_volume_bound_to_claim(volume: Mapping[str, Any], claim: Mapping[str, Any]) -> bool:
    """Upstream IsVolumeBoundToClaim: claimRef names the claim, and its UID (if set) agrees."""
    ref = _spec(volume).get("claimRef")
    if not ref:
        return False
    meta = _meta(claim)
    if ref.get("name") != meta.get("name") or ref.get("namespace") != meta.get("namespace"):
        return False
    uid = ref.get("uid") or ""
    return not uid or uid == meta.get("uid")


def _bucket_order(modes: frozenset[str]) -> tuple[int, tuple[str, ...]]:
    """Access-mode sets with fewer modes are searched first (upstream byAccessModes)."""
    return (len(modes), tuple(sorted(modes)))


# --- the query and the result ----------------------------------------------------------


@dataclass(frozen=True)
class ClaimQuery:
    """Everything matching needs from a claim, extracted once."""

    claim: Mapping[str, Any]
    request: int
    modes: frozenset[str]
    mode: str
    storage_class: str
    attributes_class: str
    selector: Mapping[str, Any] | None
    delay_binding: bool
    node: Mapping[str, Any] | None

    @classmethod
    def of(
        cls,
        claim: Mapping[str, Any],
        *,
        delay_binding: bool = False,
        node: Mapping[str, Any] | None = None,
    ) -> ClaimQuery:
        return cls(
            claim=claim,
            request=claim_request(claim),
            modes=access_modes(claim),
            mode=claim_volume_mode(claim),
            storage_class=claim_class(claim),
            attributes_class=volume_attributes_class(claim),
            selector=_spec(claim).get("selector"),
            delay_binding=delay_binding,
            node=node,
        )


@dataclass(frozen=True)
class MatchResult:
    """Outcome of a lookup.

    ``volume`` is the chosen PV (None: no match); ``reason`` one line for logs/events;
    ``counts`` how many examined volumes each criterion rejected (keys from CRITERIA);
    ``considered`` how many volumes were examined.
    """

    volume: Mapping[str, Any] | None
    reason: str
    counts: dict[str, int] = field(default_factory=dict)
    considered: int = 0


def _classify(volume: Mapping[str, Any], q: ClaimQuery, capacity: int | None = None) -> str | None:
    """Return the first criterion ``volume`` fails, ``_PREBOUND``, or None (a candidate).

    For ``_PREBOUND`` the caller still has to check node affinity (rule 7).
    """
    ref = _spec(volume).get("claimRef")
    bound_to_claim = bool(ref) and is_volume_bound_to_claim(volume, q.claim)
    if ref is not None and not bound_to_claim:  # an empty claimRef {} claims it too
        return BOUND_ELSEWHERE
    verdict = _shape_misfit(volume, q, capacity)
    if verdict is not None:
        return verdict
    if bound_to_claim:
        return _PREBOUND
    return _free_misfit(volume, q)


def _shape_misfit(volume: Mapping[str, Any], q: ClaimQuery, capacity: int | None) -> str | None:
    """Rules 2-6: what even a volume pre-bound to the claim must satisfy."""
    if not q.modes <= access_modes(volume):
        return ACCESS_MODES
    if (volume_capacity(volume) if capacity is None else capacity) < q.request:
        return TOO_SMALL
    if volume_mode(volume) != q.mode:
        return VOLUME_MODE
    if volume_attributes_class(volume) != q.attributes_class:
        return ATTRIBUTES_CLASS
    if _meta(volume).get("deletionTimestamp"):
        return DELETING
    return None


def _free_misfit(volume: Mapping[str, Any], q: ClaimQuery) -> str | None:
    """Rules 8-12: what a volume nobody reserved must satisfy besides its shape."""
    if q.delay_binding and q.node is None:
        return DELAY_BINDING
    if _phase(volume) != c.VOLUME_AVAILABLE:
        return NOT_AVAILABLE
    if q.selector is not None and not match_label_selector(q.selector, _meta(volume).get("labels")):
        return SELECTOR
    if volume_class(volume) != q.storage_class:
        return STORAGE_CLASS
    if q.node is not None and not _fits_node(volume, q.node):
        return NODE_AFFINITY
    return None


def _fits_node(volume: Mapping[str, Any], node: Mapping[str, Any] | None) -> bool:
    return node is None or match_node_affinity(_spec(volume).get("nodeAffinity"), node)


def _matched(
    volume: Mapping[str, Any], capacity: int, prebound: bool, considered: int,
    counts: Mapping[str, int],
) -> MatchResult:
    how = "pre-bound to this claim" if prebound else "smallest matching volume"
    reason = f'volume "{_name(volume)}" ({format_quantity(capacity)}): {how}'
    return MatchResult(volume, reason, dict(counts), considered)


def _prebound_misfit(volume: Mapping[str, Any], q: ClaimQuery, considered: int,
                     counts: Mapping[str, int]) -> MatchResult:
    node_name = _name(q.node or {})
    reason = (
        f'volume "{_name(volume)}" is pre-bound to this claim but its node affinity '
        f'does not allow node "{node_name}"'
    )
    return MatchResult(None, reason, dict(counts), considered)


# --- the reference implementation ------------------------------------------------------


def brute_force_match(
    claim: Mapping[str, Any],
    volumes: Iterable[Mapping[str, Any]],
    *,
    delay_binding: bool = False,
    node: Mapping[str, Any] | None = None,
) -> MatchResult:
    """Match ``claim`` against every volume with a plain loop (the semantic reference).

    On failure its ``reason`` and ``counts`` are the explanation for people
    (``why_pending``), not the order the matching rules run in.
    """
    q = ClaimQuery.of(claim, delay_binding=delay_binding, node=node)
    ordered = sorted(((volume_capacity(v), _name(v), v) for v in volumes), key=lambda t: t[:2])
    counts: Counter[str] = Counter()  # rejections in matching order (see MatchResult)
    best: tuple[Any, ...] | None = None
    for capacity, _, volume in ordered:
        verdict = _classify(volume, q, capacity)
        if verdict == _PREBOUND:
            if _fits_node(volume, node):
                return _matched(volume, capacity, True, len(ordered), counts)
            return _prebound_misfit(volume, q, len(ordered), counts)
        if verdict is not None:
            counts[verdict] += 1
            continue
        key = (_bucket_order(access_modes(volume)), capacity, _name(volume))
        if best is None or key < best[0]:
            best = (key, capacity, volume)
    if best is not None:
        return _matched(best[2], best[1], False, len(ordered), counts)
    return why_pending(q, ordered)


# --- why Pending, for people -------------------------------------------------------------

# The order a person checks a PV against a claim (the seed's "why Pending"): its class
# first (PVs of other classes are one line), then volume mode, attributes class,
# selector, access modes, size, and last whether it is free to take (bound elsewhere,
# phase, deletion, WaitForFirstConsumer, node affinity).
HUMAN_ORDER = (
    STORAGE_CLASS,
    VOLUME_MODE,
    ATTRIBUTES_CLASS,
    SELECTOR,
    ACCESS_MODES,
    TOO_SMALL,
    BOUND_ELSEWHERE,
    NOT_AVAILABLE,
    DELETING,
    DELAY_BINDING,
    NODE_AFFINITY,
)


def _human_classify(volume: Mapping[str, Any], q: ClaimQuery, capacity: int) -> str | None:
    """The first criterion of HUMAN_ORDER ``volume`` fails (None: it would match).

    A volume reserved for this claim is judged as matching does: class and selector do
    not apply to it."""
    reserved = is_volume_bound_to_claim(volume, q.claim) and bool(_spec(volume).get("claimRef"))
    if not reserved and volume_class(volume) != q.storage_class:
        return STORAGE_CLASS
    if volume_mode(volume) != q.mode:
        return VOLUME_MODE
    if volume_attributes_class(volume) != q.attributes_class:
        return ATTRIBUTES_CLASS
    if (not reserved and q.selector is not None
            and not match_label_selector(q.selector, _meta(volume).get("labels"))):
        return SELECTOR
    if not q.modes <= access_modes(volume):
        return ACCESS_MODES
    if capacity < q.request:
        return TOO_SMALL
    if _spec(volume).get("claimRef") is not None and not reserved:
        return BOUND_ELSEWHERE
    return _human_availability(volume, q, reserved)


def _human_availability(volume: Mapping[str, Any], q: ClaimQuery, reserved: bool) -> str | None:
    if _meta(volume).get("deletionTimestamp"):
        return DELETING
    if reserved:
        return NODE_AFFINITY if q.node is not None and not _fits_node(volume, q.node) else None
    if q.delay_binding and q.node is None:
        return DELAY_BINDING
    if _phase(volume) != c.VOLUME_AVAILABLE:
        return NOT_AVAILABLE
    if q.node is not None and not _fits_node(volume, q.node):
        return NODE_AFFINITY
    return None


def why_pending(q: ClaimQuery, ordered: Iterable[tuple[int, str, Mapping[str, Any]]]
                ) -> MatchResult:
    """No volume matched: count each PV under the first criterion a person checks
    (HUMAN_ORDER) and say so in one line, e.g. ``no persistent volumes matched: of 6
    gold PVs: 3 too small (largest 10Gi < 100Gi), 3 bound to other claims; 24 of other
    classes``. ``ordered``: (capacity, name, volume) triples."""
    counts: Counter[str] = Counter()
    detail = _Detail()
    considered = 0
    for capacity, _, volume in ordered:
        considered += 1
        verdict = _human_classify(volume, q, capacity)
        if verdict is not None:
            counts[verdict] += 1
            detail.note(verdict, volume, capacity)
    return MatchResult(None, detail.explain(q, counts, considered), dict(counts), considered)


class _Detail:
    """Cheap extra facts gathered while rejecting, to make the explanation specific."""

    def __init__(self) -> None:
        self.largest_too_small = 0
        self.phases: Counter[str] = Counter()

    def note(self, verdict: str, volume: Mapping[str, Any], capacity: int) -> None:
        if verdict == TOO_SMALL:
            self.largest_too_small = max(self.largest_too_small, capacity)
        elif verdict == NOT_AVAILABLE:
            self.phases[_phase(volume) or "<none>"] += 1

    def explain(self, q: ClaimQuery, counts: Mapping[str, int], considered: int) -> str:
        head = "no persistent volumes matched: "
        if not considered:
            return head + "0 considered"
        label = f"{q.storage_class} PVs" if q.storage_class else "PVs without a class"
        others = counts.get(STORAGE_CLASS, 0)
        mine = considered - others
        parts = [self._part(k, counts[k], q) for k in HUMAN_ORDER[1:] if counts.get(k)]
        body = f"of {mine} {label}: " + ", ".join(parts) if mine else f"no {label}"
        if mine and not parts:  # cannot happen on failure; keep the line honest anyway
            body = f"of {mine} {label}: none rejected"
        if others:
            body += f"; {others} of other classes"
        return head + body

    def _part(self, criterion: str, n: int, q: ClaimQuery) -> str:
        if criterion == TOO_SMALL:
            largest, want = format_quantity(self.largest_too_small), format_quantity(q.request)
            return f"{n} too small (largest {largest} < {want})"
        if criterion == NOT_AVAILABLE:
            spread = ", ".join(f"{k}: {v}" for k, v in self.phases.most_common())
            return f"{n} not Available ({spread})"
        if criterion == ACCESS_MODES:
            return f"{n} lacking access modes {','.join(sorted(q.modes))}"
        if criterion == VOLUME_MODE:
            return f'{n} volumeMode ≠ "{q.mode}"'
        if criterion == ATTRIBUTES_CLASS:
            return f'{n} volumeAttributesClassName ≠ "{q.attributes_class}"'
        if criterion == NODE_AFFINITY:
            return f'{n} not reachable from node "{_name(q.node or {})}"'
        return f"{n} {_SIMPLE_LABELS[criterion]}"


_SIMPLE_LABELS = {
    BOUND_ELSEWHERE: "bound to other claims",
    DELETING: "being deleted",
    DELAY_BINDING: "left to the scheduler (WaitForFirstConsumer)",
    SELECTOR: "not matching the claim's selector",
}


# --- the index -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slot:
    """Where a volume is filed: in a free bucket, or under the claim its claimRef names."""

    capacity: int
    bucket: tuple[str, str, str, frozenset[str]] | None = None  # (class, mode, VAC, modes)
    claim: str | None = None


class VolumeIndex:
    """PVs by (storage class, volumeMode, attributes class, access-mode set), capacities
    kept sorted.

    Volumes without a claimRef go to a bucket list of ``(capacity, name)`` kept sorted
    with :mod:`bisect`. Volumes with a claimRef can only ever match the claim it names,
    so they are filed under that claim's ``namespace/name`` instead and never slow down
    the search for other claims.
    """

    def __init__(self, volumes: Iterable[Mapping[str, Any]] = ()) -> None:
        self._volumes: dict[str, Mapping[str, Any]] = {}
        self._slots: dict[str, _Slot] = {}
        # (class, volumeMode, attributes class) -> access-mode set -> [(capacity, name)]
        self._buckets: dict[tuple[str, str, str],
                            dict[frozenset[str], list[tuple[int, str]]]] = {}
        self._claimed: dict[str, set[str]] = {}
        for volume in volumes:
            self.upsert(volume)

    # -- maintenance --

    def upsert(self, volume: Mapping[str, Any]) -> None:
        """Add or replace a PV (keyed by metadata.name)."""
        name = _name(volume)
        slot = _Slot(capacity=volume_capacity(volume))  # parse first: a bad PV changes nothing
        self.remove(name)
        ref_key = claim_ref_key(volume)
        if ref_key is not None:
            slot = _Slot(slot.capacity, claim=ref_key)
            self._claimed.setdefault(ref_key, set()).add(name)
        else:
            key = (volume_class(volume), volume_mode(volume), volume_attributes_class(volume),
                   access_modes(volume))
            slot = _Slot(slot.capacity, bucket=key)
            lists = self._buckets.setdefault(key[:3], {})
            bisect.insort(lists.setdefault(key[3], []), (slot.capacity, name))
        self._volumes[name] = volume  # shared with the lister, never modified in place
        self._slots[name] = slot

    def remove(self, name: str) -> None:
        """Forget a PV; unknown names are ignored."""
        slot = self._slots.pop(name, None)
        self._volumes.pop(name, None)
        if slot is None:
            return
        if slot.claim is not None:
            names = self._claimed[slot.claim]
            names.discard(name)
            if not names:
                del self._claimed[slot.claim]
            return
        assert slot.bucket is not None
        lists = self._buckets[slot.bucket[:3]]
        entries = lists[slot.bucket[3]]
        del entries[bisect.bisect_left(entries, (slot.capacity, name))]
        if not entries:
            del lists[slot.bucket[3]]
            if not lists:
                del self._buckets[slot.bucket[:3]]

    def get(self, name: str) -> Any:
        """The PV called ``name`` (deleting PVs included), or None."""
        return self._volumes.get(name)

    def __len__(self) -> int:
        return len(self._volumes)

    def __contains__(self, name: object) -> bool:
        return name in self._volumes

    def volumes(self) -> Iterator[Mapping[str, Any]]:
        """All indexed PVs, in no particular order."""
        return iter(self._volumes.values())

    # -- lookups --

    def find_best_match(
        self,
        claim: Mapping[str, Any],
        *,
        delay_binding: bool = False,
        node: Mapping[str, Any] | None = None,
    ) -> MatchResult:
        """Best PV for ``claim`` (see the module docstring), with a short reason."""
        q = ClaimQuery.of(claim, delay_binding=delay_binding, node=node)
        counts: Counter[str] = Counter()
        considered = 0
        for capacity, name in self._prebound_candidates(q):
            considered += 1
            volume = self._volumes[name]
            verdict = _classify(volume, q, capacity)
            if verdict != _PREBOUND:
                counts[verdict or ""] += 1
                continue
            if _fits_node(volume, node):
                return _matched(volume, capacity, True, considered, counts)
            return _prebound_misfit(volume, q, considered, counts)
        if delay_binding and node is None:
            reason = "WaitForFirstConsumer: only volumes pre-bound to the claim are bound here"
            return MatchResult(None, reason, dict(counts), considered)
        for entries in self._candidate_lists(q):
            start = bisect.bisect_left(entries, (q.request, ""))
            for i in range(start, len(entries)):
                capacity, name = entries[i]
                considered += 1
                verdict = _classify(self._volumes[name], q, capacity)
                if verdict is None:
                    return _matched(self._volumes[name], capacity, False, considered, counts)
                counts[verdict] += 1
        reason = f"no persistent volumes matched ({considered} examined, {len(self)} indexed)"
        return MatchResult(None, reason, dict(counts), considered)

    def explain(
        self,
        claim: Mapping[str, Any],
        *,
        delay_binding: bool = False,
        node: Mapping[str, Any] | None = None,
    ) -> MatchResult:
        """Same answer as find_best_match, with a per-criterion reason; scans every PV."""
        return brute_force_match(
            claim, self._volumes.values(), delay_binding=delay_binding, node=node
        )

    def _prebound_candidates(self, q: ClaimQuery) -> list[tuple[int, str]]:
        names = self._claimed.get(claim_key(q.claim), ())
        return sorted((self._slots[n].capacity, n) for n in names)

    def _candidate_lists(self, q: ClaimQuery) -> list[list[tuple[int, str]]]:
        """Bucket lists of the claim's class, volumeMode and attributes class whose access
        modes cover the claim's."""
        lists = self._buckets.get((q.storage_class, q.mode, q.attributes_class), {})
        usable = [modes for modes in lists if q.modes <= modes]
        return [lists[modes] for modes in sorted(usable, key=_bucket_order)]
