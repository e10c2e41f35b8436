"""The PV controller's claim and volume state machines, as pure functions.

This is upstream ``pkg/controller/volume/persistentvolume/pv_controller.go``
(``syncClaim``, ``syncUnboundClaim``, ``syncBoundClaim``, ``syncVolume``,
``reclaimVolume``) turned into "gather, decide, act": each function reads cached objects
(plain Kubernetes JSON dicts) and returns *one* decision; the effect layer applies it and
the resulting watch events bring the object back here for the next step. Every decision
is safe to apply twice, and re-deciding after a crash between two writes converges.

The binding protocol (same as upstream, so other binders such as kube-scheduler
interoperate). The pointer is two-way: ``pv.spec.claimRef`` and
``pvc.spec.volumeName``. A bind is four writes, always in this order:

1. PV spec: ``claimRef`` = the claim (with its UID); ``bound-by-controller`` on the PV
   if the PV was not already pointing at this claim (i.e. not pre-bound by a user);
2. PV status: phase Bound;
3. claim: ``volumeName`` (plus ``bound-by-controller`` on the claim if *we* chose the
   volume) and ``bind-completed``;
4. claim status: phase Bound, accessModes and capacity copied from the PV.

If the controller dies between any two of them, the next sync of the claim sees a
half-done bind (the PV already points at the claim) and finishes it: ``BindStep``
lists exactly the writes still missing.

``bind-completed`` on a claim splits its life in two: before it, the claim is looking
for a volume (``_sync_unbound_claim``); after it, the claim must stay with its volume
and any inconsistency means data loss (``_sync_bound_claim`` marks the claim Lost).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from volplane.objects import annotations as _annotations
from volplane.objects import created as _created
from volplane.objects import md as _meta
from volplane.objects import name as _name
from volplane.objects import phase as _phase
from volplane.objects import spec as _spec
from volplane.objects import status as _status
from volplane.pv import constants as c
from volplane.pv.index import (
    VolumeIndex,
    access_modes,
    claim_class,
    claim_has_class,
    claim_key,
    claim_ref_key,
    claim_request,
    is_volume_bound_to_claim,
    volume_attributes_class,
    volume_capacity,
    volume_class,
    volume_mode_mismatch,
)
from volplane.quantity import parse_quantity

__all__ = [
    "BindStep",
    "ClaimAction",
    "ClaimDecision",
    "Event",
    "PatchClaim",
    "PatchVolume",
    "Provision",
    "Reclaim",
    "VolumeAction",
    "VolumeDecision",
    "Write",
    "claim_bind_patch",
    "claim_migration_patch",
    "claim_status_patch",
    "default_class",
    "is_volume_released",
    "missing_bind_steps",
    "sync_claim",
    "sync_expansion",
    "sync_volume",
    "volume_bind_patch",
    "volume_migration_patch",
    "volume_phase_patch",
    "volume_satisfies_claim",
    "volume_unbind_patch",
]


# --- decisions ---------------------------------------------------------------------------


class ClaimAction(Enum):
    """What the effect layer must do for a claim (see ClaimDecision)."""

    NOOP = "noop"  # nothing to write; everything is consistent
    BIND = "bind"  # run decision.steps (a subset of the 4 bind writes) for volume_name
    SET_PENDING = "set_pending"  # claim status -> Pending, accessModes/capacity cleared
    SET_LOST = "set_lost"  # claim status -> Lost (terminal), accessModes/capacity cleared
    SET_BOUND = "set_bound"  # only bind step 4 is missing: claim status -> Bound
    ASSIGN_DEFAULT_CLASS = "assign_default_class"  # spec.storageClassName = storage_class
    ANNOTATE_PROVISIONER = "annotate_provisioner"  # set both storage-provisioner annotations
    PROVISION = "provision"  # hand to the pool provisioner (storage_class, selected_node)
    WAIT = "wait"  # nothing to write now; emit decision.event if any
    ANNEAL_MIGRATION = "anneal_migration"  # pv.kubernetes.io/migrated-to set or removed


class VolumeAction(Enum):
    """What the effect layer must do for a PV (see VolumeDecision)."""

    NOOP = "noop"  # nothing to write (events may still be attached)
    SET_PHASE = "set_phase"  # PV status.phase = phase, status.message = status_message
    UNBIND = "unbind"  # roll back our binding: see volume_unbind_patch, then phase Available
    RECLAIM_DELETE = "reclaim_delete"  # Delete policy: hand to the deleter `provisioner`
    RECLAIM_RECYCLE = "reclaim_recycle"  # Recycle policy: hand to the recycler `provisioner`
    ANNEAL_MIGRATION = "anneal_migration"  # migrated-to annotation / deletion finalizers


class BindStep(Enum):
    """The four writes of a bind, in the order they must be applied."""

    VOLUME_CLAIM_REF = "volume_claim_ref"  # volume_bind_patch
    VOLUME_PHASE = "volume_phase"  # volume_phase_patch(volume, "Bound")
    CLAIM_VOLUME_NAME = "claim_volume_name"  # claim_bind_patch
    CLAIM_STATUS = "claim_status"  # claim_status_patch(claim, "Bound", volume)


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the object (type is "Normal" or "Warning")."""

    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class PatchVolume:
    """A JSON merge patch of the PV ``name`` (``status``: through its status subresource),
    sent with the resourceVersion of the PV it was decided on (or of the previous write
    to the same PV in this decision). ``step`` names the crash point after it
    (faults.py); ``assume``: the PV counts as patched for other decisions before the
    write lands (a bind's first write: no other claim may pick the PV meanwhile)."""

    name: str
    patch: Mapping[str, Any]
    status: bool = False
    step: str = ""
    assume: bool = False


@dataclass(frozen=True)
class PatchClaim:
    """A JSON merge patch of the claim ``namespace/name``, like PatchVolume."""

    namespace: str
    name: str
    patch: Mapping[str, Any]
    status: bool = False
    step: str = ""


@dataclass(frozen=True)
class Provision:
    """Ask the volume plugin ``provisioner`` for a volume for the claim."""

    provisioner: str
    storage_class: str
    selected_node: str | None


@dataclass(frozen=True)
class Reclaim:
    """Ask the volume plugin ``provisioner`` to delete (or recycle) the Released PV."""

    provisioner: str
    recycle: bool


Write = PatchVolume | PatchClaim | Provision | Reclaim


@dataclass(frozen=True)
class ClaimDecision:
    """Outcome of sync_claim.

    ``message`` explains the decision (for logs); ``phase`` is the claim phase the
    decision leads to (written only by SET_*/BIND); ``event`` goes on the claim.
    ``explain``: the event says "no volume matched"; the effect layer may replace or
    extend its message with ``VolumeIndex.explain(claim, delay_binding=delay_binding)``
    (a full scan, so do it only when the event is actually posted, deduplicated).
    ``delay_binding``: the claim's class is WaitForFirstConsumer (as used for matching).
    ``writes``: exactly what the effect layer does, in order (nothing else is written).
    """

    action: ClaimAction
    message: str = ""
    volume_name: str | None = None
    phase: str | None = None
    event: Event | None = None
    provisioner: str | None = None
    storage_class: str | None = None
    selected_node: str | None = None
    steps: tuple[BindStep, ...] = ()
    explain: bool = False
    delay_binding: bool = False
    writes: tuple[Write, ...] = ()


@dataclass(frozen=True)
class VolumeDecision:
    """Outcome of sync_volume.

    ``event`` goes on the PV and ``claim_event`` on the claim its claimRef names.
    ``status_message`` is written to PV status.message together with ``phase``.
    ``enqueue_claim`` asks the controller to sync that claim soon (it has a step to do).
    ``verify_claim`` is upstream's guard against a stale cache: before acting, GET the
    claim named by claimRef from the API server; if it exists with claimRef's UID, drop
    this decision and run sync_volume again with the fresh claim.
    ``clear_claim_ref`` (UNBIND): remove claimRef entirely (we bound it) instead of only
    its UID (a user pre-bound it).
    ``writes``: exactly what the effect layer does, in order (nothing else is written).
    """

    action: VolumeAction
    message: str = ""
    phase: str | None = None
    status_message: str = ""
    event: Event | None = None
    claim_event: Event | None = None
    provisioner: str | None = None
    clear_claim_ref: bool = False
    enqueue_claim: str | None = None
    verify_claim: bool = False
    writes: tuple[Write, ...] = ()


# --- write planning (pure; the effect layer applies these as JSON merge patches) --------


def volume_bind_patch(volume: Mapping[str, Any], claim: Mapping[str, Any]) -> dict[str, Any] | None:
    """Bind step 1 (upstream GetBindVolumeToClaim): point claimRef at the claim.

    ``bound-by-controller`` is added only when the PV was not already bound/pre-bound
    to this claim: a user's pre-binding stays recognisable as the user's.
    Returns None when nothing needs writing.
    """
    meta = _meta(claim)
    ref = _spec(volume).get("claimRef") or {}
    patch: dict[str, Any] = {}
    if (
        ref.get("name") != meta.get("name")
        or ref.get("namespace") != meta.get("namespace")
        or ref.get("uid") != meta.get("uid")
    ):
        patch["spec"] = {
            "claimRef": {
                "kind": "PersistentVolumeClaim",
                "apiVersion": "v1",
                "namespace": meta.get("namespace"),
                "name": meta.get("name"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            }
        }
    if not is_volume_bound_to_claim(volume, claim) and (
        c.ANN_BOUND_BY_CONTROLLER not in _annotations(volume)
    ):
        patch["metadata"] = {"annotations": {c.ANN_BOUND_BY_CONTROLLER: "yes"}}
    return patch or None


def volume_phase_patch(
    volume: Mapping[str, Any], phase: str, message: str = ""
) -> dict[str, Any] | None:
    """PV status phase (bind step 2 and SET_PHASE); None when the phase is already set.

    Like upstream updateVolumePhase, the message is written only with a phase change.
    """
    if _phase(volume) == phase:
        return None
    return {"status": {"phase": phase, "message": message}}


def claim_bind_patch(claim: Mapping[str, Any], volume: Mapping[str, Any]) -> dict[str, Any] | None:
    """Bind step 3 (upstream bindClaimToVolume): volumeName + bind-completed."""
    annotations: dict[str, str] = {}
    patch: dict[str, Any] = {}
    if _spec(claim).get("volumeName") != _name(volume):
        patch["spec"] = {"volumeName": _name(volume)}
        if c.ANN_BOUND_BY_CONTROLLER not in _annotations(claim):
            annotations[c.ANN_BOUND_BY_CONTROLLER] = "yes"
    if c.ANN_BIND_COMPLETED not in _annotations(claim):
        annotations[c.ANN_BIND_COMPLETED] = "yes"
    if annotations:
        patch["metadata"] = {"annotations": annotations}
    return patch or None


def claim_status_patch(
    claim: Mapping[str, Any], phase: str, volume: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """Claim status write (upstream updateClaimStatus); None when nothing changes.

    With a volume: copy its accessModes, and its capacity when the claim is *becoming*
    ``phase`` (an existing difference may be a deliberate filesystem/block size gap),
    preferring the PV's pre-resize-capacity annotation; a Pending claim becoming Bound
    takes the PV's volumeAttributesClassName as currentVolumeAttributesClassName (only
    then: afterwards the external-resizer owns the field). Without one (Pending, Lost):
    clear accessModes, capacity and currentVolumeAttributesClassName.
    """
    status = _status(claim)
    new: dict[str, Any] = {}
    if _phase(claim) != phase:
        new["phase"] = phase
    if volume is None:
        for key in ("accessModes", "capacity", _CURRENT_VAC):
            if status.get(key):
                new[key] = None
        return {"status": new} if new else None
    current = _spec(volume).get("volumeAttributesClassName")
    if (_phase(claim) == c.CLAIM_PENDING and phase == c.CLAIM_BOUND
            and status.get(_CURRENT_VAC) != current):
        new[_CURRENT_VAC] = current
    modes = list(_spec(volume).get("accessModes") or [])
    if list(status.get("accessModes") or []) != modes:
        new["accessModes"] = modes
    if _phase(claim) != phase:
        capacity = _status_capacity(claim, volume)
        if capacity is not None:
            new["capacity"] = capacity
    return {"status": new} if new else None


_CURRENT_VAC = "currentVolumeAttributesClassName"


def _status_capacity(claim: Mapping[str, Any], volume: Mapping[str, Any]) -> dict[str, Any] | None:
    """Capacity to record on a claim that is becoming Bound, or None to leave it."""
    pre_resize = _annotations(volume).get(c.ANN_PRE_RESIZE_CAPACITY)
    if pre_resize is not None:
        return {"storage": pre_resize}
    volume_cap = (_spec(volume).get("capacity") or {}).get("storage")
    claim_cap = (_status(claim).get("capacity") or {}).get("storage")
    if claim_cap is None or parse_quantity(claim_cap) != volume_capacity(volume):
        return dict(_spec(volume).get("capacity") or {}) if volume_cap is not None else None
    return None


def volume_unbind_patch(volume: Mapping[str, Any]) -> dict[str, Any]:
    """Upstream unbindVolume, spec part: undo our binding, keep a user's pre-binding.

    Bound by the controller: drop claimRef and the bound-by-controller annotation.
    Pre-bound by a user: clear only claimRef.uid, so the PV stays reserved for the name.
    The effect layer then sets phase Available (volume_phase_patch).
    """
    if c.ANN_BOUND_BY_CONTROLLER in _annotations(volume):
        return {
            "metadata": {"annotations": {c.ANN_BOUND_BY_CONTROLLER: None}},
            "spec": {"claimRef": None},
        }
    return {"spec": {"claimRef": {"uid": None}}}


def missing_bind_steps(volume: Mapping[str, Any], claim: Mapping[str, Any]) -> tuple[BindStep, ...]:
    """The bind writes not yet done, in order (empty: fully bound)."""
    steps = []
    if volume_bind_patch(volume, claim) is not None:
        steps.append(BindStep.VOLUME_CLAIM_REF)
    if _phase(volume) != c.VOLUME_BOUND:
        steps.append(BindStep.VOLUME_PHASE)
    if claim_bind_patch(claim, volume) is not None:
        steps.append(BindStep.CLAIM_VOLUME_NAME)
    if claim_status_patch(claim, c.CLAIM_BOUND, volume) is not None:
        steps.append(BindStep.CLAIM_STATUS)
    return tuple(steps)


# --- the writes of a decision -----------------------------------------------------------------


def _claim_patch(claim: Mapping[str, Any], patch: Mapping[str, Any] | None, *,
                 status: bool = False, step: str = "") -> tuple[Write, ...]:
    if not patch:
        return ()
    meta = _meta(claim)
    return (PatchClaim(meta.get("namespace") or "", _name(claim), patch, status, step),)


def _provisioner_patch(claim: Mapping[str, Any], provisioner: str) -> dict[str, Any] | None:
    """Both storage-provisioner annotations (upstream setClaimProvisioner), with the
    migrated-to annotation they imply in the same write."""
    annotations = _annotations(claim)
    if (annotations.get(c.ANN_STORAGE_PROVISIONER) == provisioner
            and annotations.get(c.ANN_BETA_STORAGE_PROVISIONER) == provisioner):
        return None
    new = {c.ANN_STORAGE_PROVISIONER: provisioner, c.ANN_BETA_STORAGE_PROVISIONER: provisioner}
    migrated = _migrated_to_patch({**annotations, **new}, provisioner)
    if migrated is not None:
        new.update(migrated["metadata"]["annotations"])
    return {"metadata": {"annotations": new}}


def _bind_writes(volume: Mapping[str, Any], claim: Mapping[str, Any],
                 steps: tuple[BindStep, ...]) -> tuple[Write, ...]:
    """The four writes of a bind that are still missing, in upstream's order."""
    name = _name(volume)
    out: list[Write] = []
    if BindStep.VOLUME_CLAIM_REF in steps:
        out.append(PatchVolume(name, volume_bind_patch(volume, claim) or {}, step="bind-1",
                               assume=True))
    if BindStep.VOLUME_PHASE in steps:
        out.append(PatchVolume(name, volume_phase_patch(volume, c.VOLUME_BOUND) or {},
                               status=True, step="bind-2"))
    if BindStep.CLAIM_VOLUME_NAME in steps:
        out += _claim_patch(claim, claim_bind_patch(claim, volume), step="bind-3")
    if BindStep.CLAIM_STATUS in steps:
        out += _claim_patch(claim, claim_status_patch(claim, c.CLAIM_BOUND, volume),
                            status=True, step="bind-4")
    return tuple(out)


def _with_claim_writes(
    d: ClaimDecision, claim: Mapping[str, Any], index: VolumeIndex
) -> ClaimDecision:
    a = d.action
    volume = index.get(d.volume_name) if d.volume_name else None
    writes: tuple[Write, ...] = ()
    if a is ClaimAction.BIND and volume is not None:
        writes = _bind_writes(volume, claim, d.steps)
    elif a is ClaimAction.SET_BOUND and volume is not None:
        writes = _claim_patch(claim, claim_status_patch(claim, c.CLAIM_BOUND, volume),
                              status=True, step="bind-4")
    elif a in (ClaimAction.SET_PENDING, ClaimAction.SET_LOST):
        writes = _claim_patch(claim, claim_status_patch(claim, d.phase or "", None),
                              status=True)
    elif a is ClaimAction.ASSIGN_DEFAULT_CLASS:
        writes = _claim_patch(claim, {"spec": {"storageClassName": d.storage_class}})
    elif a is ClaimAction.ANNOTATE_PROVISIONER:
        writes = _claim_patch(claim, _provisioner_patch(claim, d.provisioner or ""))
    elif a is ClaimAction.PROVISION:
        provisioner = d.provisioner or ""
        writes = (*_claim_patch(claim, _provisioner_patch(claim, provisioner)),
                  Provision(provisioner, d.storage_class or "", d.selected_node))
    return replace(d, writes=writes)


def _with_volume_writes(d: VolumeDecision, volume: Mapping[str, Any]) -> VolumeDecision:
    name = _name(volume)
    writes: tuple[Write, ...] = ()
    if d.action is VolumeAction.SET_PHASE:
        patch = volume_phase_patch(volume, d.phase or "", d.status_message)
        writes = (PatchVolume(name, patch, status=True),) if patch else ()
    elif d.action is VolumeAction.UNBIND:
        writes = (PatchVolume(name, volume_unbind_patch(volume), step="unbind-1"),)
        patch = volume_phase_patch(volume, c.VOLUME_AVAILABLE)
        if patch:
            writes += (PatchVolume(name, patch, status=True),)
    elif d.action in (VolumeAction.RECLAIM_DELETE, VolumeAction.RECLAIM_RECYCLE):
        writes = (Reclaim(d.provisioner or "", d.action is VolumeAction.RECLAIM_RECYCLE),)
    return replace(d, writes=writes)


# --- CSI migration and deletion finalizers (upstream pv_controller_base.go) -------------


def _migrated_to_patch(annotations: Mapping[str, str], plugin: str) -> dict[str, Any] | None:
    """upstream updateMigrationAnnotations: migrated-to = the CSI driver of a migrated
    in-tree plugin; removed when the plugin is not (or no longer) migrated."""
    driver = c.MIGRATED_PLUGINS.get(plugin)
    current = annotations.get(c.ANN_MIGRATED_TO) or ""
    if driver is not None:
        if current == driver:
            return None
        return {"metadata": {"annotations": {c.ANN_MIGRATED_TO: driver}}}
    if current:
        return {"metadata": {"annotations": {c.ANN_MIGRATED_TO: None}}}
    return None


def claim_migration_patch(claim: Mapping[str, Any]) -> dict[str, Any] | None:
    """The claim's migrated-to annotation, following its storage-provisioner annotation
    (GA name, else beta); None: nothing to change."""
    annotations = _annotations(claim)
    plugin = annotations.get(c.ANN_STORAGE_PROVISIONER,
                             annotations.get(c.ANN_BETA_STORAGE_PROVISIONER))
    if plugin is None:
        return None
    return _migrated_to_patch(annotations, plugin)


def _deletion_finalizers(volume: Mapping[str, Any], plugin: str) -> list[str] | None:
    """upstream modifyDeletionFinalizers for a dynamically provisioned PV: the new
    finalizer list, or None when unchanged.

    Migrated in-tree plugin: drop kubernetes.io/pv-controller (its CSI driver's
    provisioner owns deletion). Other in-tree plugins: the finalizer is present exactly
    with policy Delete, and external-provisioner's finalizer is dropped. PVs of any other
    provisioner are left alone."""
    before = list(_meta(volume).get("finalizers") or [])
    after = list(before)
    if plugin in c.MIGRATED_PLUGINS:
        after = [f for f in after if f != c.FINALIZER_IN_TREE_DELETION]
    elif plugin.startswith(c.IN_TREE_PREFIX):
        policy = _spec(volume).get("persistentVolumeReclaimPolicy")
        if policy == c.RECLAIM_DELETE and c.FINALIZER_IN_TREE_DELETION not in after:
            after.append(c.FINALIZER_IN_TREE_DELETION)
        elif policy in (c.RECLAIM_RETAIN, c.RECLAIM_RECYCLE):
            after = [f for f in after if f != c.FINALIZER_IN_TREE_DELETION]
        after = [f for f in after if f != c.FINALIZER_EXTERNAL_DELETION]
    return None if after == before else after


def volume_migration_patch(volume: Mapping[str, Any]) -> dict[str, Any] | None:
    """upstream updateVolumeMigrationAnnotationsAndFinalizers: migrated-to and the
    deletion finalizers of a dynamically provisioned PV (provisioned-by); None: nothing
    to change. Statically provisioned PVs are never touched. The finalizer list is
    written whole (a merge patch replaces lists) under the PV's resourceVersion."""
    annotations = _annotations(volume)
    if c.ANN_PROVISIONED_BY not in annotations:
        return None
    plugin = annotations[c.ANN_PROVISIONED_BY]
    patch = _migrated_to_patch(annotations, plugin) or {}
    finalizers = _deletion_finalizers(volume, plugin)
    if finalizers is not None:
        patch.setdefault("metadata", {})["finalizers"] = finalizers
    return patch or None


# --- checks ------------------------------------------------------------------------------


def volume_satisfies_claim(volume: Mapping[str, Any], claim: Mapping[str, Any]) -> str | None:
    """Why a user-requested volume (claim.spec.volumeName) cannot serve the claim, or None.

    Upstream checkVolumeSatisfyClaim, same checks and messages, same order.
    """
    if _meta(volume).get("deletionTimestamp"):
        return f'the volume is marked for deletion "{_name(volume)}"'
    if volume_capacity(volume) < claim_request(claim):
        return "requested PV is too small"
    if volume_class(volume) != claim_class(claim):
        return "storageClassName does not match"
    if volume_attributes_class(volume) != volume_attributes_class(claim):
        return "volumeAttributesClassName does not match"
    if volume_mode_mismatch(claim, volume):
        return "incompatible volumeMode"
    if not access_modes(claim) <= access_modes(volume):
        return "incompatible accessMode"
    return None


def _is_default_class(storage_class: Mapping[str, Any]) -> bool:
    annotations = _annotations(storage_class)
    return (
        annotations.get(c.ANN_IS_DEFAULT_CLASS) == "true"
        or annotations.get(c.ANN_BETA_IS_DEFAULT_CLASS) == "true"
    )


def default_class(classes: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Name of the default StorageClass: the newest one marked default, ties by name."""
    defaults = [(name, sc) for name, sc in classes.items() if _is_default_class(sc)]
    if not defaults:
        return None
    newest = max(_created(sc) for _, sc in defaults)
    return min(name for name, sc in defaults if _created(sc) == newest)


def is_volume_released(volume: Mapping[str, Any], claims: Mapping[str, Mapping[str, Any]]) -> bool:
    """Upstream isVolumeReleased: may the PV be deleted/recycled now?

    True when the PV is bound (claimRef with UID) and its claim is gone, has another UID,
    or is bound to a different volume. The effect layer re-checks this on fresh objects
    right before running a deleter or recycler.
    """
    ref = _spec(volume).get("claimRef")
    if not ref or not ref.get("uid"):
        return False
    claim = claims.get(claim_ref_key(volume) or "")
    if claim is None or _meta(claim).get("uid") != ref.get("uid"):
        return True
    bound_to = _spec(claim).get("volumeName") or ""
    return bool(bound_to) and bound_to != _name(volume)


# --- the claim state machine ---------------------------------------------------------------


def sync_claim(
    claim: Mapping[str, Any],
    *,
    index: VolumeIndex,
    classes: Mapping[str, Mapping[str, Any]],
    provisioners: AbstractSet[str],
    pods: Sequence[Mapping[str, Any]] = (),
) -> ClaimDecision:
    """Decide the next step for a claim (upstream syncClaim), with the writes it takes.

    ``index`` holds every PV (deleting ones too), ``classes`` StorageClasses by name,
    ``provisioners`` the names of the volume plugins this volplane runs (pv/plugins.py),
    ``pods`` the (slim) pods that use the claim (upstream's pod index by claim).
    """
    migration = claim_migration_patch(claim)
    if migration is not None:
        # upstream updateClaimMigrationAnnotations, first thing in syncClaim
        return ClaimDecision(ClaimAction.ANNEAL_MIGRATION, "CSI migration annotation",
                             writes=_claim_patch(claim, migration))
    if c.ANN_BIND_COMPLETED in _annotations(claim):
        decision = _sync_bound_claim(claim, index)
    else:
        decision = _sync_unbound_claim(claim, index, classes, provisioners)
        if decision.event == _WAIT_FOR_CONSUMER:
            decision = replace(decision, event=_wait_for_consumer_event(pods))
    return _with_claim_writes(decision, claim, index)


def is_pod_terminated(pod: Mapping[str, Any]) -> bool:
    """Upstream util.IsPodTerminated over a slim pod (kinds.slim_pod): finished, or
    deleted with no container running (``status.containersRunning``)."""
    if _phase(pod) in ("Succeeded", "Failed"):
        return True
    return bool(_meta(pod).get("deletionTimestamp")) and not _status(pod).get(
        "containersRunning")


def _wait_for_consumer_event(pods: Sequence[Mapping[str, Any]]) -> Event:
    """Upstream emitEventForUnboundDelayBindingClaim: name the active pods not yet
    scheduled (by name, as upstream), else the plain WaitForFirstConsumer event."""
    waiting = [_name(p) for p in pods
               if not is_pod_terminated(p) and not _spec(p).get("nodeName")]
    if not waiting:
        return _WAIT_FOR_CONSUMER
    if len(waiting) == 1:
        return Event(c.NORMAL, c.WAIT_FOR_POD_SCHEDULED,
                     f"waiting for pod {waiting[0]} to be scheduled")
    return Event(c.NORMAL, c.WAIT_FOR_POD_SCHEDULED,
                 f"waiting for pods {','.join(waiting)} to be scheduled")


def _sync_unbound_claim(
    claim: Mapping[str, Any],
    index: VolumeIndex,
    classes: Mapping[str, Mapping[str, Any]],
    provisioners: AbstractSet[str],
) -> ClaimDecision:
    """A claim that has never completed binding; it is (or will be) Pending.

    * no volumeName: the user takes any fitting PV -> find one, or provision;
    * volumeName set: the user asked for that PV -> bind it if it is free (and fits) or
      already points at this claim; otherwise keep waiting.
    """
    volume_name = _spec(claim).get("volumeName") or ""
    if not volume_name:
        return _find_or_provision(claim, index, classes, provisioners)
    volume = index.get(volume_name)
    if volume is None:
        # The requested PV does not exist (yet): stay Pending and retry later.
        return _pending(claim, f'requested volume "{volume_name}" not found, will retry')
    if _spec(volume).get("claimRef") is None:
        # The requested PV is free. Bind it if it can serve the claim.
        problem = volume_satisfies_claim(volume, claim)
        if problem is None:
            return _bind(volume, claim)
        text = f'Cannot bind to requested volume "{volume_name}": {problem}'
        return _pending(claim, text, Event(c.WARNING, c.VOLUME_MISMATCH, text))
    if is_volume_bound_to_claim(volume, claim):
        # The PV already points at us (pre-bound, or step 1 done before a crash): finish.
        return _bind(volume, claim)
    # The requested PV belongs to another claim.
    text = f'volume "{volume_name}" already bound to a different claim.'
    event = Event(c.WARNING, c.FAILED_BINDING, text)
    if c.ANN_BOUND_BY_CONTROLLER not in _annotations(claim):
        # The user pre-bound the claim to a taken PV; it may be released later.
        return _pending(claim, text + " Will retry.", event)
    # We set volumeName ourselves, so somebody removed bind-completed from the claim.
    # Upstream reports an error and changes nothing; so do we.
    message = (
        f'invalid binding of claim "{claim_key(claim)}" to volume "{volume_name}": '
        f'volume already claimed by "{claim_ref_key(volume)}"'
    )
    return ClaimDecision(ClaimAction.WAIT, message, volume_name=volume_name, event=event)


def _find_or_provision(
    claim: Mapping[str, Any],
    index: VolumeIndex,
    classes: Mapping[str, Mapping[str, Any]],
    provisioners: AbstractSet[str],
) -> ClaimDecision:
    """Claim without volumeName: bind the best PV, else default the class, else provision.

    WaitForFirstConsumer ("delay binding") classes: the controller only binds PVs already
    pre-bound to the claim (by the scheduler or a provisioner); everything else waits
    until kube-scheduler picks a node and writes the selected-node annotation, which is
    the signal to provision.
    """
    class_name = claim_class(claim)
    storage_class = classes.get(class_name) if class_name else None
    delay = _delay_binding(storage_class)
    decision = _match_or_provision(
        claim, index, classes, provisioners, class_name, storage_class, delay
    )
    return replace(decision, delay_binding=True) if delay else decision


def _match_or_provision(
    claim: Mapping[str, Any],
    index: VolumeIndex,
    classes: Mapping[str, Mapping[str, Any]],
    provisioners: AbstractSet[str],
    class_name: str,
    storage_class: Mapping[str, Any] | None,
    delay: bool,
) -> ClaimDecision:
    """The body of _find_or_provision, once the class and binding mode are known."""
    try:
        match = index.find_best_match(claim, delay_binding=delay)
    except ValueError as err:  # a malformed selector or quantity: nothing sane to do
        return ClaimDecision(ClaimAction.WAIT, f"error finding PV for claim: {err}")
    if match.volume is not None:
        return _bind(match.volume, claim)
    if not claim_has_class(claim):
        # Retroactive default StorageClass: a claim that names no class gets the default.
        default = default_class(classes)
        if default is not None:
            message = f'assigning default StorageClass "{default}"'
            return ClaimDecision(ClaimAction.ASSIGN_DEFAULT_CLASS, message, storage_class=default)
    if delay and c.ANN_SELECTED_NODE not in _annotations(claim):
        # No pod using the claim has been scheduled yet.
        return _pending(claim, match.reason, _WAIT_FOR_CONSUMER)
    if class_name:
        return _provision(claim, class_name, storage_class, provisioners)
    event = Event(
        c.NORMAL,
        c.FAILED_BINDING,
        "no persistent volumes available for this claim and no storage class is set",
    )
    return replace(_pending(claim, match.reason, event), explain=True)


def _delay_binding(storage_class: Mapping[str, Any] | None) -> bool:
    """Upstream IsDelayBindingMode; a missing class means Immediate."""
    if storage_class is None:
        return False
    return storage_class.get("volumeBindingMode") == c.WAIT_FOR_FIRST_CONSUMER


# The plain event; sync_claim turns it into WaitForPodScheduled when pods wait (above).
_WAIT_FOR_CONSUMER = Event(
    c.NORMAL, c.WAIT_FOR_FIRST_CONSUMER_REASON,
    "waiting for first consumer to be created before binding",
)


def _provision(
    claim: Mapping[str, Any],
    class_name: str,
    storage_class: Mapping[str, Any] | None,
    provisioners: AbstractSet[str],
) -> ClaimDecision:
    """No PV fits and the claim names a class: provision (upstream provisionClaim).

    A provisioner served by one of volplane's volume plugins provisions here (its own,
    ``pool.volplane.io``, says so when it is not enabled); any other is handed over
    with the storage-provisioner annotations. Upstream does not touch the claim status
    on this path, and neither do we.
    """
    if storage_class is None:
        text = f'storageclass.storage.k8s.io "{class_name}" not found'
        return ClaimDecision(
            ClaimAction.WAIT, text, event=Event(c.WARNING, c.PROVISIONING_FAILED, text),
            explain=True,
        )
    provisioner = storage_class.get("provisioner") or ""
    # CSI migration (upstream provisionClaimOperationExternal): a migrated in-tree
    # provisioner is handed to its CSI driver's external-provisioner.
    provisioner = c.MIGRATED_PLUGINS.get(provisioner, provisioner)
    if provisioner == c.POOL_PROVISIONER and provisioner not in provisioners:
        text = f'provisioner "{provisioner}" is not enabled in this volplane'
        return ClaimDecision(
            ClaimAction.WAIT, text, provisioner=provisioner,
            event=Event(c.WARNING, c.PROVISIONING_FAILED, text),
        )
    if provisioner in provisioners:
        selected = _annotations(claim).get(c.ANN_SELECTED_NODE)
        pool = provisioner == c.POOL_PROVISIONER
        how = "from a storage pool" if pool else f'with "{provisioner}"'
        message = f'provisioning a volume of class "{class_name}" {how}'
        return ClaimDecision(
            ClaimAction.PROVISION,
            message,
            provisioner=provisioner,
            storage_class=class_name,
            selected_node=selected,
        )
    if provisioner.startswith(c.IN_TREE_PREFIX):
        # In-tree plugins (and kubernetes.io/no-provisioner) cannot provision here.
        text = f"no volume plugin matched name: {provisioner}"
        return ClaimDecision(
            ClaimAction.WAIT, text, event=Event(c.WARNING, c.PROVISIONING_FAILED, text),
            explain=True,
        )
    message = (
        f"Waiting for a volume to be created either by the external provisioner '{provisioner}' "
        "or manually by the system administrator. If volume creation is delayed, please verify "
        "that the provisioner is running and correctly registered."
    )
    if _annotations(claim).get(c.ANN_STORAGE_PROVISIONER) == provisioner:
        # Already handed over; the external provisioner owns the next step. Upstream
        # posts the event on every sync all the same (deduplicated into one, counted).
        return ClaimDecision(ClaimAction.WAIT, message, provisioner=provisioner,
                             event=Event(c.NORMAL, c.EXTERNAL_PROVISIONING, message))
    return ClaimDecision(
        ClaimAction.ANNOTATE_PROVISIONER,
        message,
        provisioner=provisioner,
        storage_class=class_name,
        event=Event(c.NORMAL, c.EXTERNAL_PROVISIONING, message),
    )


def _sync_bound_claim(claim: Mapping[str, Any], index: VolumeIndex) -> ClaimDecision:
    """A claim that has been bound once (bind-completed). It must stay with its volume.

    * volumeName emptied, or the PV is gone          -> Lost (data is gone);
    * PV has no claimRef (unbound, or our step 1 not yet visible) -> bind again;
    * PV's claimRef has this claim's UID             -> finish/confirm the bind (this
      also brings a Lost claim back to Bound if its PV returns);
    * PV's claimRef names another claim              -> Lost (misbound).
    """
    volume_name = _spec(claim).get("volumeName") or ""
    if not volume_name:
        return _lost(
            claim,
            c.CLAIM_LOST_REASON,
            "Bound claim has lost reference to PersistentVolume. Data on the volume is lost!",
        )
    volume = index.get(volume_name)
    if volume is None:
        return _lost(
            claim,
            c.CLAIM_LOST_REASON,
            "Bound claim has lost its PersistentVolume. Data on the volume is lost!",
        )
    ref = _spec(volume).get("claimRef")
    if ref is None or ref.get("uid") == _meta(claim).get("uid"):
        return _bind(volume, claim)
    return _lost(
        claim,
        c.CLAIM_MISBOUND,
        "Two claims are bound to the same volume, this one is bound incorrectly",
    )


def _bind(volume: Mapping[str, Any], claim: Mapping[str, Any]) -> ClaimDecision:
    """BIND with the missing steps, SET_BOUND if only the claim status lags, else NOOP."""
    name = _name(volume)
    steps = missing_bind_steps(volume, claim)
    if not steps:
        return ClaimDecision(
            ClaimAction.NOOP, f'bound to volume "{name}"', volume_name=name, phase=c.CLAIM_BOUND
        )
    action = ClaimAction.SET_BOUND if steps == (BindStep.CLAIM_STATUS,) else ClaimAction.BIND
    return ClaimDecision(
        action,
        f'binding to volume "{name}": {", ".join(s.value for s in steps)}',
        volume_name=name,
        phase=c.CLAIM_BOUND,
        steps=steps,
    )


def _pending(claim: Mapping[str, Any], message: str, event: Event | None = None) -> ClaimDecision:
    """Stay Pending: SET_PENDING if the status must change, WAIT otherwise."""
    needs_write = claim_status_patch(claim, c.CLAIM_PENDING, None) is not None
    action = ClaimAction.SET_PENDING if needs_write else ClaimAction.WAIT
    return ClaimDecision(action, message, phase=c.CLAIM_PENDING, event=event)


def _lost(claim: Mapping[str, Any], reason: str, text: str) -> ClaimDecision:
    """Mark the claim Lost, with the event, only on the transition (as upstream)."""
    if _phase(claim) == c.CLAIM_LOST:
        return ClaimDecision(ClaimAction.NOOP, text, phase=c.CLAIM_LOST)
    return ClaimDecision(
        ClaimAction.SET_LOST, text, phase=c.CLAIM_LOST, event=Event(c.WARNING, reason, text)
    )


# --- expansion ---------------------------------------------------------------------------


def sync_expansion(
    claim: Mapping[str, Any],
    volume: Mapping[str, Any] | None,
    *,
    classes: Mapping[str, Mapping[str, Any]],
    expanders: AbstractSet[str],
) -> str | None:
    """Which plugin must grow ``volume`` to its claim's request, or None.

    A Bound claim asks for more than its volume holds (``spec.capacity``) or than its
    status records (an expansion interrupted between the volume and the claim), its
    class allows expansion, and the volume belongs to a plugin among ``expanders``
    (provisioned-by, then CSI driver). The API server refuses a larger request for a
    class without ``allowVolumeExpansion``, so that check only guards odd histories.
    """
    if volume is None or _phase(claim) != c.CLAIM_BOUND:
        return None
    if (_spec(claim).get("volumeName") or "") != _name(volume):
        return None
    storage_class = classes.get(claim_class(claim))
    if storage_class is None or not storage_class.get("allowVolumeExpansion"):
        return None
    plugin = _plugin_for(volume, expanders)
    if plugin is None:
        return None
    recorded = (_status(claim).get("capacity") or {}).get("storage") or "0"
    try:
        want = claim_request(claim)
        grown = want > volume_capacity(volume) or want > parse_quantity(recorded)
    except ValueError:
        return None
    return plugin if grown else None


# --- the volume state machine -------------------------------------------------------------


def sync_volume(
    volume: Mapping[str, Any],
    *,
    claims: Mapping[str, Mapping[str, Any]],
    deleters: AbstractSet[str],
    recyclers: AbstractSet[str],
    pods: Sequence[Mapping[str, Any]] = (),
) -> VolumeDecision:
    """Decide the next step for a PV (upstream syncVolume), with the writes it takes.

    ``pods``: the (slim) pods that use the claim named by the PV's claimRef; while an
    active one remains and that claim is gone, a Recycle volume is not recycled."""
    migration = volume_migration_patch(volume)
    if migration is not None:
        # upstream updateVolumeMigrationAnnotationsAndFinalizers, first thing in syncVolume
        return VolumeDecision(VolumeAction.ANNEAL_MIGRATION,
                              "CSI migration annotation / deletion finalizers",
                              writes=(PatchVolume(_name(volume), migration),))
    in_use = tuple(sorted(f"{_meta(p).get('namespace')}/{_name(p)}" for p in pods
                          if not is_pod_terminated(p)))
    decision = _sync_volume(volume, claims, deleters, recyclers, in_use)
    return _with_volume_writes(decision, volume)


def _sync_volume(
    volume: Mapping[str, Any],
    claims: Mapping[str, Mapping[str, Any]],
    deleters: AbstractSet[str],
    recyclers: AbstractSet[str],
    in_use: tuple[str, ...] = (),
) -> VolumeDecision:
    """The volume state machine (upstream syncVolume).

    ``claims`` maps "namespace/name" to claims; ``deleters``/``recyclers`` name the
    provisioners (or CSI drivers) whose volumes volplane itself can delete/recycle.

    States, by the PV's claimRef:

    * none                      -> Available (unused);
    * without UID (pre-bound)   -> Available; the claim side binds it;
    * with UID, claim missing or re-created with another UID -> Released, then the
      reclaim policy runs;
    * claim exists, volumeName empty -> the bind is half-done; the claim side finishes it
      (we only nudge it, or report a volumeMode mismatch that would block it forever);
    * claim bound to this PV    -> Bound;
    * claim bound to another PV -> a provisioned Delete volume is released and deleted;
      otherwise the binding is rolled back (UNBIND).
    """
    ref = _spec(volume).get("claimRef")
    if ref is None:  # upstream: a non-nil claimRef, even {}, is claimed
        return _volume_phase(volume, c.VOLUME_AVAILABLE, "volume is unused")
    key = claim_ref_key(volume) or ""
    if not ref.get("uid"):
        # Reserved for a claim that has not bound to it yet; syncClaim will do it.
        return _volume_phase(volume, c.VOLUME_AVAILABLE, f"volume is pre-bound to claim {key}")
    claim = claims.get(key)
    if claim is None:
        # Upstream re-checks the live API before believing the claim is gone, unless the
        # PV is already Released/Failed.
        verify = _phase(volume) not in (c.VOLUME_RELEASED, c.VOLUME_FAILED)
        return _release(volume, deleters, recyclers, f"claim {key} not found", verify,
                        in_use)
    if _meta(claim).get("uid") != ref.get("uid"):
        message = f"claim {key} was re-created with a new UID"
        return _release(volume, deleters, recyclers, message, True)
    bound_to = _spec(claim).get("volumeName") or ""
    if not bound_to:
        return _claim_binding_in_progress(volume, claim, key)
    if bound_to == _name(volume):
        return _volume_phase(volume, c.VOLUME_BOUND, f"bound to claim {key}")
    return _claim_bound_elsewhere(volume, deleters, recyclers, key, bound_to)


def _claim_binding_in_progress(
    volume: Mapping[str, Any], claim: Mapping[str, Any], key: str
) -> VolumeDecision:
    """PV points at the claim (with UID) but the claim has no volumeName yet.

    Either our bind is between steps 2 and 3, or a provisioner just created the PV for
    the claim, or a user emptied volumeName. In all cases syncClaim completes the bind;
    ask for it soon. A volumeMode mismatch would make that impossible: report it.
    """
    if volume_mode_mismatch(claim, volume):
        claim_name, name = _name(claim), _name(volume)
        return VolumeDecision(
            VolumeAction.NOOP,
            f"claim {key} and the volume have incompatible volumeModes",
            event=Event(
                c.WARNING,
                c.VOLUME_MISMATCH,
                "Cannot bind PersistentVolume to requested PersistentVolumeClaim "
                f'"{claim_name}" due to incompatible volumeMode.',
            ),
            claim_event=Event(
                c.WARNING,
                c.VOLUME_MISMATCH,
                f'Cannot bind PersistentVolume "{name}" to requested PersistentVolumeClaim '
                "due to incompatible volumeMode.",
            ),
        )
    if c.ANN_BOUND_BY_CONTROLLER in _annotations(volume):
        message = f"volume not bound yet, waiting for claim {key} to finish binding"
    else:
        message = f"volume was bound and got unbound (by user?), waiting for claim {key} to rebind"
    return VolumeDecision(VolumeAction.NOOP, message, enqueue_claim=key)


def _claim_bound_elsewhere(
    volume: Mapping[str, Any],
    deleters: AbstractSet[str],
    recyclers: AbstractSet[str],
    key: str,
    bound_to: str,
) -> VolumeDecision:
    """PV points at a claim that is bound to another PV.

    A dynamically provisioned PV with Delete policy was made for this claim and is not
    needed any more: release and delete it. Otherwise undo the binding: completely if the
    controller made it, only the UID if a user pre-bound the PV (it stays reserved).
    """
    annotations = _annotations(volume)
    policy = _spec(volume).get("persistentVolumeReclaimPolicy") or c.RECLAIM_RETAIN
    if c.ANN_PROVISIONED_BY in annotations and policy == c.RECLAIM_DELETE:
        message = f"provisioned volume not needed: claim {key} is bound to {bound_to}"
        return _release(volume, deleters, recyclers, message, False)
    by_controller = c.ANN_BOUND_BY_CONTROLLER in annotations
    if by_controller:
        message = f"claim {key} is bound to volume {bound_to}; unbinding our binding"
    else:
        message = (
            f"volume is bound by user to claim {key} that is bound to volume {bound_to}, "
            "waiting for the claim to get unbound"
        )
    return VolumeDecision(
        VolumeAction.UNBIND, message, phase=c.VOLUME_AVAILABLE, clear_claim_ref=by_controller
    )


def _volume_phase(volume: Mapping[str, Any], phase: str, message: str) -> VolumeDecision:
    """SET_PHASE when the phase differs, else NOOP."""
    if _phase(volume) == phase:
        return VolumeDecision(VolumeAction.NOOP, message, phase=phase)
    return VolumeDecision(VolumeAction.SET_PHASE, message, phase=phase)


def _release(
    volume: Mapping[str, Any],
    deleters: AbstractSet[str],
    recyclers: AbstractSet[str],
    message: str,
    verify: bool,
    in_use: tuple[str, ...] = (),
) -> VolumeDecision:
    """The PV's claim is gone: mark it Released, and once it is, apply the reclaim policy.

    A Failed PV stays Failed (the user should see what went wrong) while the reclaim is
    retried on every sync. Released is written in its own step; the resulting watch event
    brings the PV back here for the reclaim.
    """
    if _phase(volume) not in (c.VOLUME_RELEASED, c.VOLUME_FAILED):
        return VolumeDecision(
            VolumeAction.SET_PHASE,
            f"{message}; volume is released",
            phase=c.VOLUME_RELEASED,
            verify_claim=verify,
        )
    decision = _reclaim(volume, deleters, recyclers, in_use)
    if verify and decision.action is not VolumeAction.NOOP:
        return _with_verify(decision)
    return decision


def _with_verify(decision: VolumeDecision) -> VolumeDecision:
    return replace(decision, verify_claim=True)


def _plugin_for(volume: Mapping[str, Any], names: AbstractSet[str]) -> str | None:
    """The provisioner/driver among ``names`` that handles this PV, if any."""
    provisioned_by = _annotations(volume).get(c.ANN_PROVISIONED_BY) or ""
    if provisioned_by in names:
        return provisioned_by
    driver = (_spec(volume).get("csi") or {}).get("driver") or ""
    if driver in names:
        return driver
    return None


def _reclaim(
    volume: Mapping[str, Any],
    deleters: AbstractSet[str],
    recyclers: AbstractSet[str],
    in_use: tuple[str, ...] = (),
) -> VolumeDecision:
    """Upstream reclaimVolume: act on spec.persistentVolumeReclaimPolicy.

    ``in_use``: active pods ("ns/name") of the claim, which is gone from the cache
    (upstream recycleVolumeOperation: such a volume is not recycled, whichever recycler,
    and none is looked for; the next sync tries again)."""
    if _annotations(volume).get(c.ANN_MIGRATED_TO):
        return VolumeDecision(VolumeAction.NOOP, "CSI-migrated volume: its CSI driver reclaims it")
    policy = _spec(volume).get("persistentVolumeReclaimPolicy") or c.RECLAIM_RETAIN
    if policy == c.RECLAIM_RETAIN:
        return VolumeDecision(VolumeAction.NOOP, "reclaim policy is Retain, nothing to do")
    if policy == c.RECLAIM_RECYCLE:
        if in_use:
            text = f"Volume is used by pods: {','.join(in_use)}"
            return VolumeDecision(VolumeAction.NOOP, text,
                                  event=Event(c.NORMAL, c.VOLUME_FAILED_RECYCLE, text))
        recycler = _plugin_for(volume, recyclers)
        if recycler is not None:
            return VolumeDecision(
                VolumeAction.RECLAIM_RECYCLE, "recycling volume", provisioner=recycler
            )
        return _failed(volume, c.VOLUME_FAILED_RECYCLE, "No recycler plugin found for the volume!")
    if policy == c.RECLAIM_DELETE:
        return _delete(volume, deleters)
    return _failed(
        volume,
        c.VOLUME_UNKNOWN_RECLAIM_POLICY,
        "Volume has unrecognized PersistentVolumeReclaimPolicy",
    )


def _delete(volume: Mapping[str, Any], deleters: AbstractSet[str]) -> VolumeDecision:
    """Delete policy: find who deletes the volume (upstream findDeletablePlugin).

    provisioned-by names the provisioner: ours -> delete; an external one -> it deletes
    the PV itself, we wait; an in-tree plugin -> none exists here, fail. Without the
    annotation a CSI PV belongs to its driver (ours or external); anything else has no
    deleter at all.
    """
    deleter = _plugin_for(volume, deleters)
    if deleter is not None:
        return VolumeDecision(VolumeAction.RECLAIM_DELETE, "deleting volume", provisioner=deleter)
    provisioned_by = _annotations(volume).get(c.ANN_PROVISIONED_BY) or ""
    if provisioned_by and not provisioned_by.startswith(c.IN_TREE_PREFIX):
        return VolumeDecision(
            VolumeAction.NOOP, f"waiting for external provisioner {provisioned_by} to delete"
        )
    if provisioned_by:
        return _failed(
            volume, c.VOLUME_FAILED_DELETE, f"no volume plugin matched name: {provisioned_by}"
        )
    driver = (_spec(volume).get("csi") or {}).get("driver")
    if driver:
        return VolumeDecision(VolumeAction.NOOP, f"waiting for CSI driver {driver} to delete")
    return _failed(
        volume,
        c.VOLUME_FAILED_DELETE,
        f'error getting deleter volume plugin for volume "{_name(volume)}": '
        "no volume plugin matched",
    )


def _failed(volume: Mapping[str, Any], reason: str, text: str) -> VolumeDecision:
    """Mark the PV Failed with a Warning event, only on the transition (as upstream)."""
    if _phase(volume) == c.VOLUME_FAILED:
        return VolumeDecision(VolumeAction.NOOP, text, phase=c.VOLUME_FAILED)
    return VolumeDecision(
        VolumeAction.SET_PHASE,
        text,
        phase=c.VOLUME_FAILED,
        status_message=text,
        event=Event(c.WARNING, reason, text),
    )
