"""The claim and volume state machines (upstream syncClaim / syncVolume), table-driven."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from volplane.pv import constants as c
from volplane.pv.decide import (
    BindStep,
    ClaimAction,
    ClaimDecision,
    Event,
    VolumeAction,
    VolumeDecision,
    claim_bind_patch,
    claim_migration_patch,
    claim_status_patch,
    default_class,
    is_volume_released,
    missing_bind_steps,
    sync_claim,
    sync_volume,
    volume_bind_patch,
    volume_migration_patch,
    volume_phase_patch,
    volume_unbind_patch,
)
from volplane.pv.index import VolumeIndex

RWO, RWX = "ReadWriteOnce", "ReadWriteMany"
ALL_STEPS = tuple(BindStep)
EXT = "ebs.csi.aws.com"
POOL = c.POOL_PROVISIONER


# --- builders --------------------------------------------------------------------------------


def pv(
    name: str = "pv-1",
    size: str = "10Gi",
    *,
    cls: str = "",
    modes: tuple[str, ...] = (RWO,),
    mode: str | None = None,
    phase: str | None = "Available",
    claim: str | None = None,
    uid: str | None = None,
    annotations: Mapping[str, str] | None = None,
    policy: str | None = "Retain",
    csi_driver: str | None = None,
    deleting: bool = False,
    vac: str | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"capacity": {"storage": size}, "accessModes": list(modes)}
    if vac:
        spec["volumeAttributesClassName"] = vac
    if cls:
        spec["storageClassName"] = cls
    if mode:
        spec["volumeMode"] = mode
    if policy:
        spec["persistentVolumeReclaimPolicy"] = policy
    if claim:
        ns, claim_name = claim.split("/")
        spec["claimRef"] = {"kind": "PersistentVolumeClaim", "namespace": ns, "name": claim_name}
        if uid:
            spec["claimRef"]["uid"] = uid
    if csi_driver:
        spec["csi"] = {"driver": csi_driver, "volumeHandle": name}
    else:
        spec["hostPath"] = {"path": f"/data/{name}"}
    meta: dict[str, Any] = {"name": name, "resourceVersion": "1"}
    if annotations:
        meta["annotations"] = dict(annotations)
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    out: dict[str, Any] = {"metadata": meta, "spec": spec}
    if phase:
        out["status"] = {"phase": phase}
    return out


def finalized(obj: dict[str, Any], *finalizers: str) -> dict[str, Any]:
    obj["metadata"]["finalizers"] = list(finalizers)
    return obj


def pvc(
    size: str = "5Gi",
    *,
    key: str = "ns/claim",
    uid: str = "uid-1",
    cls: str | None = None,
    modes: tuple[str, ...] = (RWO,),
    mode: str | None = None,
    volume: str | None = None,
    phase: str | None = "Pending",
    annotations: Mapping[str, str] | None = None,
    status: Mapping[str, Any] | None = None,
    vac: str | None = None,
) -> dict[str, Any]:
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
    if volume:
        spec["volumeName"] = volume
    meta: dict[str, Any] = {"name": name, "namespace": ns, "uid": uid, "resourceVersion": "7"}
    if annotations:
        meta["annotations"] = dict(annotations)
    st: dict[str, Any] = dict(status or {})
    if phase:
        st["phase"] = phase
    return {"metadata": meta, "spec": spec, "status": st}


def sc(
    name: str,
    provisioner: str,
    *,
    wffc: bool = False,
    default: bool = False,
    created: str = "2024-01-01T00:00:00Z",
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "creationTimestamp": created}
    if default:
        meta["annotations"] = {c.ANN_IS_DEFAULT_CLASS: "true"}
    return {
        "metadata": meta,
        "provisioner": provisioner,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": c.WAIT_FOR_FIRST_CONSUMER if wffc else c.IMMEDIATE,
    }


CLASSES = {
    "pool": sc("pool", POOL),
    "pool-wffc": sc("pool-wffc", POOL, wffc=True),
    "ext": sc("ext", EXT),
    "local": sc("local", c.NO_PROVISIONER, wffc=True),
    "local-now": sc("local-now", c.NO_PROVISIONER),
    "intree": sc("intree", "kubernetes.io/host-path"),
    "ebs": sc("ebs", "kubernetes.io/aws-ebs"),
}

BOUND_CLAIM = {c.ANN_BIND_COMPLETED: "yes", c.ANN_BOUND_BY_CONTROLLER: "yes"}
BOUND_STATUS = {"accessModes": [RWO], "capacity": {"storage": "10Gi"}}
FAILED_BINDING_NO_CLASS = Event(
    c.NORMAL,
    c.FAILED_BINDING,
    "no persistent volumes available for this claim and no storage class is set",
)
WFFC_EVENT = Event(
    c.NORMAL,
    c.WAIT_FOR_FIRST_CONSUMER_REASON,
    "waiting for first consumer to be created before binding",
)
EXTERNAL_MESSAGE = (
    f"Waiting for a volume to be created either by the external provisioner '{EXT}' "
    "or manually by the system administrator. If volume creation is delayed, please verify "
    "that the provisioner is running and correctly registered."
)


def pod(name: str = "web-0", *, ns: str = "ns", node: str | None = None,
        phase: str = "Pending", deleting: bool = False, running: bool = False) -> dict:
    """A slim pod (kinds.slim_pod) using claim ns/claim."""
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    return {"metadata": meta,
            "spec": {"nodeName": node, "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": "claim"}}]},
            "status": {"phase": phase, "containersRunning": running}}


BY_US = {c.ANN_BOUND_BY_CONTROLLER: "yes"}
BY_POOL = {c.ANN_PROVISIONED_BY: POOL, c.ANN_BOUND_BY_CONTROLLER: "yes"}
# --- the claim state machine -------------------------------------------------------------------


@dataclass
class ClaimCase:
    id: str
    claim: dict
    volumes: list[dict] = field(default_factory=list)
    action: ClaimAction = ClaimAction.NOOP
    expect: dict[str, Any] = field(default_factory=dict)  # ClaimDecision fields to check
    classes: dict = field(default_factory=lambda: CLASSES)
    provisioners: frozenset[str] = frozenset({POOL})
    pods: list[dict] = field(default_factory=list)


EBS = "ebs.csi.aws.com"
EBS_MESSAGE = EXTERNAL_MESSAGE.replace(EXT, EBS)
IN_TREE_EBS = "kubernetes.io/aws-ebs"

CLAIM_CASES = [
    # ---- CSI migration (upstream provisionClaimOperationExternal, updateMigrationAnnotations)
    ClaimCase(
        "migrated in-tree class is handed to its CSI driver with ExternalProvisioning",
        pvc(cls="ebs"), [], ClaimAction.ANNOTATE_PROVISIONER,
        {"provisioner": EBS, "event": Event(c.NORMAL, c.EXTERNAL_PROVISIONING, EBS_MESSAGE)},
    ),
    ClaimCase(
        "a claim annotated with the in-tree provisioner (from kcm) gets migrated-to first",
        pvc(cls="ebs", annotations={c.ANN_STORAGE_PROVISIONER: IN_TREE_EBS}), [],
        ClaimAction.ANNEAL_MIGRATION, {"event": None},
    ),
    ClaimCase(
        "a beta-annotated in-tree claim gets migrated-to too",
        pvc(annotations={c.ANN_BETA_STORAGE_PROVISIONER: "kubernetes.io/gce-pd"}), [],
        ClaimAction.ANNEAL_MIGRATION, {},
    ),
    ClaimCase(
        "a claim of a driver that is not migrated loses a stale migrated-to (rollback)",
        pvc(cls="ext", annotations={c.ANN_STORAGE_PROVISIONER: EXT, c.ANN_MIGRATED_TO: EXT}),
        [], ClaimAction.ANNEAL_MIGRATION, {},
    ),
    ClaimCase(
        "migrated-to already right: the claim syncs on",
        pvc(cls="ebs", annotations={c.ANN_STORAGE_PROVISIONER: EBS,
                                    c.ANN_BETA_STORAGE_PROVISIONER: EBS}),
        [], ClaimAction.WAIT, {"provisioner": EBS},
    ),
    # ---- WaitForPodScheduled (upstream emitEventForUnboundDelayBindingClaim) ----------------
    ClaimCase(
        "WaitForPodScheduled names the one pod using the claim that is not scheduled",
        pvc(cls="pool-wffc"), [], ClaimAction.WAIT,
        {"event": Event(c.NORMAL, c.WAIT_FOR_POD_SCHEDULED,
                        "waiting for pod web-0 to be scheduled"), "writes": ()},
        pods=[pod("web-0")],
    ),
    ClaimCase(
        "WaitForPodScheduled lists every unscheduled pod, by name, comma-joined",
        pvc(cls="pool-wffc"), [], ClaimAction.WAIT,
        {"event": Event(c.NORMAL, c.WAIT_FOR_POD_SCHEDULED,
                        "waiting for pods a,b to be scheduled")},
        pods=[pod("a"), pod("b"), pod("c", node="n1")],
    ),
    ClaimCase(
        "scheduled or terminated pods leave the plain WaitForFirstConsumer event",
        pvc(cls="pool-wffc"), [], ClaimAction.WAIT, {"event": WFFC_EVENT},
        pods=[pod("c", node="n1"), pod("done", phase="Failed"), pod("gone", deleting=True)],
    ),
    # ---- VolumeAttributesClass (upstream: GA in 1.34, on in 1.36) ---------------------------
    ClaimCase(
        "attributes class: binds only a PV of the claim's attributes class",
        pvc("5Gi", vac="fast"),
        [pv("plain", "8Gi"), pv("fast", "20Gi", vac="fast")],
        ClaimAction.BIND,
        {"volume_name": "fast", "steps": ALL_STEPS},
    ),
    ClaimCase(
        "attributes class: a claim without one never binds a PV that has one",
        pvc("5Gi"),
        [pv("fast", "20Gi", vac="fast")],
        ClaimAction.WAIT,
        {"volume_name": None, "event": FAILED_BINDING_NO_CLASS},
        classes={},
    ),
    ClaimCase(
        "attributes class: requested PV of another class -> VolumeMismatch, Pending, PV untouched",
        pvc("5Gi", vac="fast", volume="slow-pv"),
        [pv("slow-pv", "20Gi", vac="slow")],
        ClaimAction.WAIT,
        {
            "event": Event(
                c.WARNING,
                c.VOLUME_MISMATCH,
                'Cannot bind to requested volume "slow-pv": '
                "volumeAttributesClassName does not match",
            ),
            "phase": c.CLAIM_PENDING,
            "writes": (),
        },
    ),
    ClaimCase(
        "attributes class: a PV pre-bound to the claim with another class is not bound",
        pvc("5Gi", vac="fast", cls="ext"),
        [pv("mine", "20Gi", vac="slow", claim="ns/claim", cls="ext")],
        ClaimAction.ANNOTATE_PROVISIONER,
        {"volume_name": None},
    ),
    # ---- unbound, no volumeName: match, or default class, or provision --------------------
    ClaimCase(
        "match binds the smallest fitting volume, all four writes",
        pvc("5Gi"),
        [pv("big", "20Gi"), pv("fit", "8Gi"), pv("small", "1Gi")],
        ClaimAction.BIND,
        {"volume_name": "fit", "steps": ALL_STEPS, "phase": c.CLAIM_BOUND, "event": None},
    ),
    ClaimCase(
        "no match, no class, no default class -> FailedBinding, stays Pending",
        pvc("50Gi"),
        [pv("small", "1Gi")],
        ClaimAction.WAIT,
        {"event": FAILED_BINDING_NO_CLASS, "phase": c.CLAIM_PENDING, "explain": True},
        classes={},
    ),
    ClaimCase(
        "a brand-new claim without a phase gets Pending written",
        pvc("50Gi", phase=None),
        [],
        ClaimAction.SET_PENDING,
        {"event": FAILED_BINDING_NO_CLASS, "phase": c.CLAIM_PENDING},
        classes={},
    ),
    ClaimCase(
        "a Pending claim with stale status capacity gets it cleared",
        pvc("50Gi", status=BOUND_STATUS),
        [],
        ClaimAction.SET_PENDING,
        {"event": FAILED_BINDING_NO_CLASS},
        classes={},
    ),
    ClaimCase(
        "no match, no class at all -> the default class is assigned (retroactively)",
        pvc("50Gi"),
        [],
        ClaimAction.ASSIGN_DEFAULT_CLASS,
        {"storage_class": "std", "event": None},
        classes={"std": sc("std", POOL, default=True), "other": sc("other", POOL)},
    ),
    ClaimCase(
        'an explicit storageClassName "" never gets the default class',
        pvc("50Gi", cls=""),
        [],
        ClaimAction.WAIT,
        {"event": FAILED_BINDING_NO_CLASS},
        classes={"std": sc("std", POOL, default=True)},
    ),
    ClaimCase(
        "a claim without class still binds a class-less PV before any defaulting",
        pvc("5Gi"),
        [pv("plain", "10Gi")],
        ClaimAction.BIND,
        {"volume_name": "plain"},
        classes={"std": sc("std", POOL, default=True)},
    ),
    ClaimCase(
        "missing StorageClass -> ProvisioningFailed, status untouched",
        pvc(cls="ghost"),
        [],
        ClaimAction.WAIT,
        {
            "event": Event(
                c.WARNING,
                c.PROVISIONING_FAILED,
                'storageclass.storage.k8s.io "ghost" not found',
            ),
            "phase": None,
        },
    ),
    ClaimCase(
        "kubernetes.io/no-provisioner, Immediate -> ProvisioningFailed",
        pvc(cls="local-now"),
        [],
        ClaimAction.WAIT,
        {
            "event": Event(
                c.WARNING,
                c.PROVISIONING_FAILED,
                "no volume plugin matched name: kubernetes.io/no-provisioner",
            )
        },
    ),
    ClaimCase(
        "in-tree provisioner -> ProvisioningFailed (volplane has no in-tree plugins)",
        pvc(cls="intree"),
        [],
        ClaimAction.WAIT,
        {
            "event": Event(
                c.WARNING,
                c.PROVISIONING_FAILED,
                "no volume plugin matched name: kubernetes.io/host-path",
            )
        },
    ),
    ClaimCase(
        "kubernetes.io/no-provisioner, WFFC, no pod yet -> WaitForFirstConsumer",
        pvc(cls="local"),
        [pv("local-pv", "10Gi", cls="local")],
        ClaimAction.WAIT,
        {"event": WFFC_EVENT, "delay_binding": True, "phase": c.CLAIM_PENDING},
    ),
    ClaimCase(
        "a pool class while the pool provisioner is not enabled -> ProvisioningFailed",
        pvc(cls="pool"),
        [],
        ClaimAction.WAIT,
        {"event": Event(c.WARNING, c.PROVISIONING_FAILED,
                        f'provisioner "{POOL}" is not enabled in this volplane'),
         "writes": ()},
        provisioners=frozenset(),
    ),
    ClaimCase(
        "WFFC does not bind a free PV itself (the scheduler does)",
        pvc(cls="pool-wffc"),
        [pv("free", "10Gi", cls="pool-wffc")],
        ClaimAction.WAIT,
        {"event": WFFC_EVENT},
    ),
    ClaimCase(
        "WFFC binds a PV the scheduler pre-bound to the claim",
        pvc(cls="pool-wffc", annotations={c.ANN_SELECTED_NODE: "node-1"}),
        [
            pv("free", "10Gi", cls="pool-wffc"),
            pv("chosen", "20Gi", cls="pool-wffc", claim="ns/claim"),
        ],
        ClaimAction.BIND,
        {"volume_name": "chosen", "delay_binding": True},
    ),
    ClaimCase(
        "WFFC pool class with selected-node -> PROVISION for that node",
        pvc(cls="pool-wffc", annotations={c.ANN_SELECTED_NODE: "node-1"}),
        [],
        ClaimAction.PROVISION,
        {
            "provisioner": POOL,
            "storage_class": "pool-wffc",
            "selected_node": "node-1",
            "delay_binding": True,
        },
    ),
    ClaimCase(
        "WFFC no-provisioner class with selected-node -> ProvisioningFailed",
        pvc(cls="local", annotations={c.ANN_SELECTED_NODE: "node-1"}),
        [],
        ClaimAction.WAIT,
        {
            "event": Event(
                c.WARNING,
                c.PROVISIONING_FAILED,
                "no volume plugin matched name: kubernetes.io/no-provisioner",
            )
        },
    ),
    ClaimCase(
        "Immediate pool class -> PROVISION, no node",
        pvc(cls="pool"),
        [pv("too-small", "1Gi", cls="pool")],
        ClaimAction.PROVISION,
        {"provisioner": POOL, "storage_class": "pool", "selected_node": None, "event": None},
    ),
    ClaimCase(
        "external provisioner -> hand-off annotation with ExternalProvisioning event",
        pvc(cls="ext"),
        [],
        ClaimAction.ANNOTATE_PROVISIONER,
        {
            "provisioner": EXT,
            "event": Event(c.NORMAL, c.EXTERNAL_PROVISIONING, EXTERNAL_MESSAGE),
        },
    ),
    ClaimCase(
        "external provisioner already annotated -> ExternalProvisioning re-emitted, no write",
        pvc(cls="ext", annotations={c.ANN_STORAGE_PROVISIONER: EXT,
                                    c.ANN_BETA_STORAGE_PROVISIONER: EXT}),
        [],
        ClaimAction.WAIT,
        {"provisioner": EXT, "writes": (),
         "event": Event(c.NORMAL, c.EXTERNAL_PROVISIONING, EXTERNAL_MESSAGE)},
    ),
    ClaimCase(
        "annotated for another provisioner (class changed) -> annotate again",
        pvc(cls="ext", annotations={c.ANN_STORAGE_PROVISIONER: "old.example.com"}),
        [],
        ClaimAction.ANNOTATE_PROVISIONER,
        {"provisioner": EXT},
    ),
    ClaimCase(
        "external provisioner's PV (claimRef with UID) is bound from the claim side",
        pvc(cls="ext", annotations={c.ANN_STORAGE_PROVISIONER: EXT}),
        [
            pv(
                "pvc-uid-1",
                "5Gi",
                cls="ext",
                claim="ns/claim",
                uid="uid-1",
                phase="Bound",
                annotations={c.ANN_PROVISIONED_BY: EXT},
            )
        ],
        ClaimAction.BIND,
        {
            "volume_name": "pvc-uid-1",
            "steps": (BindStep.CLAIM_VOLUME_NAME, BindStep.CLAIM_STATUS),
        },
    ),
    ClaimCase(
        "crash after write 1: the PV already points at the claim -> finish the rest",
        pvc("5Gi"),
        [
            pv(
                "half",
                "10Gi",
                claim="ns/claim",
                uid="uid-1",
                annotations={c.ANN_BOUND_BY_CONTROLLER: "yes"},
            ),
            pv("smaller", "6Gi"),
        ],
        ClaimAction.BIND,
        {
            "volume_name": "half",
            "steps": (BindStep.VOLUME_PHASE, BindStep.CLAIM_VOLUME_NAME, BindStep.CLAIM_STATUS),
        },
    ),
    # ---- unbound, volumeName set by the user ----------------------------------------------
    ClaimCase(
        "requested volume does not exist -> Pending, no event",
        pvc(volume="nope"),
        [],
        ClaimAction.WAIT,
        {"event": None, "phase": c.CLAIM_PENDING},
    ),
    ClaimCase(
        "requested volume is free and fits -> BIND",
        pvc(volume="pv-1"),
        [pv("pv-1", "10Gi"), pv("smaller", "5Gi")],
        ClaimAction.BIND,
        {"volume_name": "pv-1", "steps": ALL_STEPS},
    ),
    ClaimCase(
        "requested volume is too small -> VolumeMismatch",
        pvc("50Gi", volume="pv-1"),
        [pv("pv-1", "10Gi")],
        ClaimAction.WAIT,
        {
            "event": Event(
                c.WARNING,
                c.VOLUME_MISMATCH,
                'Cannot bind to requested volume "pv-1": requested PV is too small',
            )
        },
    ),
    ClaimCase(
        "requested volume has another class -> VolumeMismatch",
        pvc(volume="pv-1", cls="gold"),
        [pv("pv-1", cls="silver")],
        ClaimAction.WAIT,
        {"message": 'Cannot bind to requested volume "pv-1": storageClassName does not match'},
    ),
    ClaimCase(
        "requested volume has another volumeMode -> VolumeMismatch",
        pvc(volume="pv-1", mode="Block"),
        [pv("pv-1")],
        ClaimAction.WAIT,
        {"message": 'Cannot bind to requested volume "pv-1": incompatible volumeMode'},
    ),
    ClaimCase(
        "requested volume lacks an access mode -> VolumeMismatch",
        pvc(volume="pv-1", modes=(RWX,)),
        [pv("pv-1")],
        ClaimAction.WAIT,
        {"message": 'Cannot bind to requested volume "pv-1": incompatible accessMode'},
    ),
    ClaimCase(
        "requested volume is being deleted -> VolumeMismatch",
        pvc(volume="pv-1"),
        [pv("pv-1", deleting=True)],
        ClaimAction.WAIT,
        {
            "message": 'Cannot bind to requested volume "pv-1": '
            'the volume is marked for deletion "pv-1"'
        },
    ),
    ClaimCase(
        "requested volume is pre-bound to this claim -> BIND (ignores class and phase)",
        pvc(volume="pv-1", cls="gold"),
        [pv("pv-1", cls="silver", claim="ns/claim", phase="Pending")],
        ClaimAction.BIND,
        {"volume_name": "pv-1", "steps": ALL_STEPS},
    ),
    ClaimCase(
        "requested volume bound to a different claim (user pre-bound claim) -> FailedBinding",
        pvc(volume="pv-1"),
        [pv("pv-1", claim="ns/other", uid="u2", phase="Bound")],
        ClaimAction.WAIT,
        {
            "event": Event(
                c.WARNING, c.FAILED_BINDING, 'volume "pv-1" already bound to a different claim.'
            ),
            "phase": c.CLAIM_PENDING,
        },
    ),
    ClaimCase(
        "requested volume's claimRef has an old UID of this claim's name -> FailedBinding",
        pvc(volume="pv-1"),
        [pv("pv-1", claim="ns/claim", uid="old-uid", phase="Released")],
        ClaimAction.WAIT,
        {
            "event": Event(
                c.WARNING, c.FAILED_BINDING, 'volume "pv-1" already bound to a different claim.'
            )
        },
    ),
    ClaimCase(
        "volumeName set by us but bind-completed removed -> error, no status write",
        pvc(volume="pv-1", annotations={c.ANN_BOUND_BY_CONTROLLER: "yes"}, phase="Bound"),
        [pv("pv-1", claim="ns/other", uid="u2", phase="Bound")],
        ClaimAction.WAIT,
        {"phase": None, "volume_name": "pv-1"},
    ),
    # ---- bound claims (bind-completed) ------------------------------------------------------
    ClaimCase(
        "fully bound -> NOOP",
        pvc(volume="pv-1", annotations=BOUND_CLAIM, phase="Bound", status=BOUND_STATUS),
        [
            pv(
                "pv-1",
                claim="ns/claim",
                uid="uid-1",
                phase="Bound",
                annotations={c.ANN_BOUND_BY_CONTROLLER: "yes"},
            )
        ],
        ClaimAction.NOOP,
        {"volume_name": "pv-1", "phase": c.CLAIM_BOUND, "event": None},
    ),
    ClaimCase(
        "only the claim status lags -> SET_BOUND",
        pvc(volume="pv-1", annotations=BOUND_CLAIM, phase="Pending"),
        [pv("pv-1", claim="ns/claim", uid="uid-1", phase="Bound")],
        ClaimAction.SET_BOUND,
        {"steps": (BindStep.CLAIM_STATUS,)},
    ),
    ClaimCase(
        "bound claim whose PV lost its claimRef -> bind again",
        pvc(volume="pv-1", annotations=BOUND_CLAIM, phase="Bound", status=BOUND_STATUS),
        [pv("pv-1", phase="Available")],
        ClaimAction.BIND,
        {"steps": (BindStep.VOLUME_CLAIM_REF, BindStep.VOLUME_PHASE)},
    ),
    ClaimCase(
        "bound claim with volumeName emptied -> Lost",
        pvc(annotations=BOUND_CLAIM, phase="Bound"),
        [],
        ClaimAction.SET_LOST,
        {
            "event": Event(
                c.WARNING,
                c.CLAIM_LOST_REASON,
                "Bound claim has lost reference to PersistentVolume. Data on the volume is lost!",
            ),
            "phase": c.CLAIM_LOST,
        },
    ),
    ClaimCase(
        "bound claim whose PV is gone -> Lost",
        pvc(volume="pv-1", annotations=BOUND_CLAIM, phase="Bound"),
        [],
        ClaimAction.SET_LOST,
        {
            "event": Event(
                c.WARNING,
                c.CLAIM_LOST_REASON,
                "Bound claim has lost its PersistentVolume. Data on the volume is lost!",
            )
        },
    ),
    ClaimCase(
        "already Lost -> NOOP, no repeated event",
        pvc(volume="pv-1", annotations=BOUND_CLAIM, phase="Lost"),
        [],
        ClaimAction.NOOP,
        {"event": None, "phase": c.CLAIM_LOST},
    ),
    ClaimCase(
        "Lost claim whose PV comes back bound to it -> Bound again",
        pvc(volume="pv-1", annotations=BOUND_CLAIM, phase="Lost"),
        [pv("pv-1", claim="ns/claim", uid="uid-1", phase="Bound")],
        ClaimAction.SET_BOUND,
        {"volume_name": "pv-1", "phase": c.CLAIM_BOUND},
    ),
    ClaimCase(
        "PV bound to another claim -> ClaimMisbound, Lost",
        pvc(volume="pv-1", annotations=BOUND_CLAIM, phase="Bound"),
        [pv("pv-1", claim="ns/other", uid="u2", phase="Bound")],
        ClaimAction.SET_LOST,
        {
            "event": Event(
                c.WARNING,
                c.CLAIM_MISBOUND,
                "Two claims are bound to the same volume, this one is bound incorrectly",
            )
        },
    ),
    ClaimCase(
        "a PV being deleted still counts as present for a bound claim",
        pvc(volume="pv-1", annotations=BOUND_CLAIM, phase="Bound", status=BOUND_STATUS),
        [pv("pv-1", claim="ns/claim", uid="uid-1", phase="Bound", deleting=True)],
        ClaimAction.NOOP,
        {"event": None},
    ),
]


@pytest.mark.parametrize("case", CLAIM_CASES, ids=[case.id for case in CLAIM_CASES])
def test_sync_claim(case: ClaimCase) -> None:
    decision = sync_claim(
        case.claim,
        index=VolumeIndex(case.volumes),
        classes=case.classes,
        provisioners=case.provisioners,
        pods=case.pods,
    )
    assert isinstance(decision, ClaimDecision)
    assert decision.action is case.action, decision
    for name, value in case.expect.items():
        assert getattr(decision, name) == value, (name, decision)


def test_vanished_claim_wait_becomes_set_pending_only_when_status_differs() -> None:
    """SET_PENDING vs WAIT is decided by whether the claim status would change."""
    index = VolumeIndex()
    waiting = sync_claim(pvc(volume="nope"), index=index, classes={}, provisioners={POOL})
    assert waiting.action is ClaimAction.WAIT
    writing = sync_claim(pvc(volume="nope", phase="Lost"), index=index, classes={},
                         provisioners={POOL})
    assert writing.action is ClaimAction.SET_PENDING


def test_malformed_selector_waits() -> None:
    claim = pvc()
    claim["spec"]["selector"] = {"matchExpressions": [{"key": "a", "operator": "Bogus"}]}
    decision = sync_claim(claim, index=VolumeIndex([pv()]), classes={}, provisioners={POOL})
    assert decision.action is ClaimAction.WAIT
    assert "Bogus" in decision.message


# --- the volume state machine ------------------------------------------------------------------


@dataclass
class VolumeCase:
    id: str
    volume: dict
    claims: list[dict] = field(default_factory=list)
    action: VolumeAction = VolumeAction.NOOP
    expect: dict[str, Any] = field(default_factory=dict)  # VolumeDecision fields to check
    deleters: frozenset[str] = frozenset({POOL})
    recyclers: frozenset[str] = frozenset()
    pods: list[dict] = field(default_factory=list)


RELEASED_RECYCLE = pv(claim="ns/claim", uid="uid-1", phase="Released", policy="Recycle",
                      annotations=BY_POOL)
IN_USE = Event(c.NORMAL, c.VOLUME_FAILED_RECYCLE, "Volume is used by pods: ns/a,ns/web-0")


NO_DELETER = (
    'error getting deleter volume plugin for volume "pv-1": no volume plugin matched'
)

VOLUME_CASES = [
    # ---- recycling waits for the pods of the released claim (upstream isVolumeUsed) -------
    VolumeCase(
        "recycle refused while pods use the released claim: Normal VolumeFailedRecycle",
        RELEASED_RECYCLE, [], VolumeAction.NOOP,
        {"event": IN_USE, "writes": (), "phase": None},
        recyclers=frozenset({POOL}),
        pods=[pod("web-0", node="n1", phase="Running", running=True), pod("a")],
    ),
    VolumeCase(
        "recycle refused while a pod uses the claim even with no recycler (no Failed)",
        pv(claim="ns/claim", uid="uid-1", phase="Released", policy="Recycle"), [],
        VolumeAction.NOOP,
        {"event": Event(c.NORMAL, c.VOLUME_FAILED_RECYCLE, "Volume is used by pods: ns/a")},
        pods=[pod("a")],
    ),
    VolumeCase(
        "recycle goes ahead once the pods of the claim are terminated",
        RELEASED_RECYCLE, [], VolumeAction.RECLAIM_RECYCLE, {"provisioner": POOL},
        recyclers=frozenset({POOL}),
        pods=[pod("done", phase="Succeeded"), pod("gone", deleting=True)],
    ),
    VolumeCase(
        "recycle goes ahead when a new claim of that name is what the pods use",
        RELEASED_RECYCLE, [pvc(uid="uid-2", volume="other")], VolumeAction.RECLAIM_RECYCLE,
        {"provisioner": POOL, "verify_claim": True},
        recyclers=frozenset({POOL}),
        pods=[pod("web-0", node="n1", phase="Running", running=True)],
    ),
    VolumeCase(
        "a deleting pod with a container still running still blocks recycling",
        RELEASED_RECYCLE, [], VolumeAction.NOOP,
        {"event": Event(c.NORMAL, c.VOLUME_FAILED_RECYCLE, "Volume is used by pods: ns/x")},
        recyclers=frozenset({POOL}),
        pods=[pod("x", deleting=True, running=True, phase="Running")],
    ),
    # ---- an empty claimRef {} is a claimRef (upstream: non-nil means claimed) -------------
    VolumeCase(
        "empty claimRef counts as claimed: pre-bound, not unused",
        {**pv(), "spec": {**pv()["spec"], "claimRef": {}}}, [], VolumeAction.NOOP,
        {"phase": "Available", "message": "volume is pre-bound to claim /"},
    ),
    # ---- unbound and pre-bound --------------------------------------------------------------
    VolumeCase("unused and Available -> NOOP", pv(), [], VolumeAction.NOOP, {"phase": "Available"}),
    VolumeCase(
        "unused, new (no phase) -> Available",
        pv(phase=None),
        [],
        VolumeAction.SET_PHASE,
        {"phase": "Available", "status_message": ""},
    ),
    VolumeCase(
        "unused but Released (claimRef removed by hand) -> Available",
        pv(phase="Released"),
        [],
        VolumeAction.SET_PHASE,
        {"phase": "Available"},
    ),
    VolumeCase(
        "pre-bound without UID, claim absent -> Available",
        pv(claim="ns/claim", phase=None),
        [],
        VolumeAction.SET_PHASE,
        {"phase": "Available", "verify_claim": False},
    ),
    VolumeCase(
        "pre-bound without UID, claim present -> stays Available, claim side binds",
        pv(claim="ns/claim"),
        [pvc()],
        VolumeAction.NOOP,
        {"phase": "Available"},
    ),
    # ---- claim gone: released and reclaimed -------------------------------------------------
    VolumeCase(
        "claim deleted -> Released, verified against the API first",
        pv(claim="ns/claim", uid="uid-1", phase="Bound"),
        [],
        VolumeAction.SET_PHASE,
        {"phase": "Released", "verify_claim": True},
    ),
    VolumeCase(
        "claim re-created with a new UID -> Released (verified)",
        pv(claim="ns/claim", uid="old", phase="Bound"),
        [pvc(uid="new")],
        VolumeAction.SET_PHASE,
        {"phase": "Released", "verify_claim": True},
    ),
    VolumeCase(
        "Released, Retain -> NOOP",
        pv(claim="ns/claim", uid="uid-1", phase="Released", policy="Retain"),
        [],
        VolumeAction.NOOP,
        {"verify_claim": False},
    ),
    VolumeCase(
        "no reclaim policy means Retain",
        pv(claim="ns/claim", uid="uid-1", phase="Released", policy=None),
        [],
        VolumeAction.NOOP,
    ),
    VolumeCase(
        "Released, Delete, provisioned by the pool -> RECLAIM_DELETE",
        pv(claim="ns/claim", uid="uid-1", phase="Released", policy="Delete", annotations=BY_POOL),
        [],
        VolumeAction.RECLAIM_DELETE,
        {"provisioner": POOL, "verify_claim": False},
    ),
    VolumeCase(
        "Released, Delete, re-created claim -> RECLAIM_DELETE, verified",
        pv(claim="ns/claim", uid="old", phase="Released", policy="Delete", annotations=BY_POOL),
        [pvc(uid="new")],
        VolumeAction.RECLAIM_DELETE,
        {"provisioner": POOL, "verify_claim": True},
    ),
    VolumeCase(
        "Released, Delete, static CSI PV of our driver -> RECLAIM_DELETE",
        pv(claim="ns/claim", uid="uid-1", phase="Released", policy="Delete", csi_driver=POOL),
        [],
        VolumeAction.RECLAIM_DELETE,
        {"provisioner": POOL},
    ),
    VolumeCase(
        "Released, Delete, external provisioner -> it deletes the PV, we wait",
        pv(
            claim="ns/claim",
            uid="uid-1",
            phase="Released",
            policy="Delete",
            annotations={c.ANN_PROVISIONED_BY: EXT},
            csi_driver=EXT,
        ),
        [],
        VolumeAction.NOOP,
        {"event": None},
    ),
    VolumeCase(
        "Released, Delete, CSI PV of another driver without annotation -> wait",
        pv(claim="ns/claim", uid="uid-1", phase="Released", policy="Delete", csi_driver=EXT),
        [],
        VolumeAction.NOOP,
    ),
    VolumeCase(
        "Released, Delete, in-tree provisioner -> Failed",
        finalized(pv(
            claim="ns/claim",
            uid="uid-1",
            phase="Released",
            policy="Delete",
            annotations={c.ANN_PROVISIONED_BY: "kubernetes.io/host-path"},
        ), c.FINALIZER_IN_TREE_DELETION),
        [],
        VolumeAction.SET_PHASE,
        {
            "phase": "Failed",
            "event": Event(
                c.WARNING,
                c.VOLUME_FAILED_DELETE,
                "no volume plugin matched name: kubernetes.io/host-path",
            ),
        },
    ),
    VolumeCase(
        "Released, Delete, static hostPath PV -> Failed, no deleter",
        pv(claim="ns/claim", uid="uid-1", phase="Released", policy="Delete"),
        [],
        VolumeAction.SET_PHASE,
        {
            "phase": "Failed",
            "status_message": NO_DELETER,
            "event": Event(c.WARNING, c.VOLUME_FAILED_DELETE, NO_DELETER),
        },
    ),
    VolumeCase(
        "already Failed without deleter -> NOOP, no repeated event",
        pv(claim="ns/claim", uid="uid-1", phase="Failed", policy="Delete"),
        [],
        VolumeAction.NOOP,
        {"event": None, "phase": "Failed"},
    ),
    VolumeCase(
        "Failed but a deleter exists -> delete is retried",
        pv(claim="ns/claim", uid="uid-1", phase="Failed", policy="Delete", annotations=BY_POOL),
        [],
        VolumeAction.RECLAIM_DELETE,
        {"provisioner": POOL},
    ),
    VolumeCase(
        "Released, Recycle with a recycler -> RECLAIM_RECYCLE",
        pv(claim="ns/claim", uid="uid-1", phase="Released", policy="Recycle", annotations=BY_POOL),
        [],
        VolumeAction.RECLAIM_RECYCLE,
        {"provisioner": POOL},
        recyclers=frozenset({POOL}),
    ),
    VolumeCase(
        "Released, Recycle without recycler -> Failed",
        pv(claim="ns/claim", uid="uid-1", phase="Released", policy="Recycle"),
        [],
        VolumeAction.SET_PHASE,
        {
            "phase": "Failed",
            "event": Event(
                c.WARNING, c.VOLUME_FAILED_RECYCLE, "No recycler plugin found for the volume!"
            ),
        },
    ),
    VolumeCase(
        "Released, unknown policy -> Failed",
        pv(claim="ns/claim", uid="uid-1", phase="Released", policy="Shred"),
        [],
        VolumeAction.SET_PHASE,
        {
            "phase": "Failed",
            "event": Event(
                c.WARNING,
                c.VOLUME_UNKNOWN_RECLAIM_POLICY,
                "Volume has unrecognized PersistentVolumeReclaimPolicy",
            ),
        },
    ),
    VolumeCase(
        "CSI-migrated volume -> the CSI driver reclaims it",
        pv(
            claim="ns/claim",
            uid="uid-1",
            phase="Released",
            policy="Delete",
            annotations={c.ANN_MIGRATED_TO: "ebs.csi.aws.com"},
        ),
        [],
        VolumeAction.NOOP,
    ),
    # ---- claim present ---------------------------------------------------------------------
    VolumeCase(
        "claim has no volumeName yet (our bind in progress) -> NOOP, nudge the claim",
        pv(claim="ns/claim", uid="uid-1", phase="Bound", annotations=BY_US),
        [pvc()],
        VolumeAction.NOOP,
        {"enqueue_claim": "ns/claim", "event": None},
    ),
    VolumeCase(
        "provisioned PV waiting for its claim -> NOOP, nudge the claim",
        pv(claim="ns/claim", uid="uid-1", phase="Bound", annotations={c.ANN_PROVISIONED_BY: EXT}),
        [pvc()],
        VolumeAction.NOOP,
        {"enqueue_claim": "ns/claim"},
    ),
    VolumeCase(
        "claim with no volumeName and another volumeMode -> VolumeMismatch on both",
        pv(claim="ns/claim", uid="uid-1", phase="Bound", mode="Block"),
        [pvc()],
        VolumeAction.NOOP,
        {
            "enqueue_claim": None,
            "event": Event(
                c.WARNING,
                c.VOLUME_MISMATCH,
                "Cannot bind PersistentVolume to requested PersistentVolumeClaim "
                '"claim" due to incompatible volumeMode.',
            ),
            "claim_event": Event(
                c.WARNING,
                c.VOLUME_MISMATCH,
                'Cannot bind PersistentVolume "pv-1" to requested PersistentVolumeClaim '
                "due to incompatible volumeMode.",
            ),
        },
    ),
    VolumeCase(
        "claim bound to this PV, PV phase lags -> Bound",
        pv(claim="ns/claim", uid="uid-1", phase="Available", annotations=BY_US),
        [pvc(volume="pv-1")],
        VolumeAction.SET_PHASE,
        {"phase": "Bound"},
    ),
    VolumeCase(
        "claim bound to this PV -> NOOP",
        pv(claim="ns/claim", uid="uid-1", phase="Bound", annotations=BY_US),
        [pvc(volume="pv-1", phase="Bound")],
        VolumeAction.NOOP,
        {"phase": "Bound"},
    ),
    VolumeCase(
        "claim bound elsewhere, we bound this PV -> UNBIND completely",
        pv(claim="ns/claim", uid="uid-1", phase="Bound", annotations=BY_US),
        [pvc(volume="pv-2", phase="Bound")],
        VolumeAction.UNBIND,
        {"clear_claim_ref": True, "phase": "Available"},
    ),
    VolumeCase(
        "claim bound elsewhere, user pre-bound this PV -> UNBIND keeps the name",
        pv(claim="ns/claim", uid="uid-1", phase="Bound"),
        [pvc(volume="pv-2", phase="Bound")],
        VolumeAction.UNBIND,
        {"clear_claim_ref": False, "phase": "Available"},
    ),
    VolumeCase(
        "claim bound elsewhere, PV provisioned for it with Delete -> Released",
        pv(claim="ns/claim", uid="uid-1", phase="Bound", policy="Delete", annotations=BY_POOL),
        [pvc(volume="pv-2", phase="Bound")],
        VolumeAction.SET_PHASE,
        {"phase": "Released", "verify_claim": False},
    ),
    VolumeCase(
        "... and once Released it is deleted",
        pv(claim="ns/claim", uid="uid-1", phase="Released", policy="Delete", annotations=BY_POOL),
        [pvc(volume="pv-2", phase="Bound")],
        VolumeAction.RECLAIM_DELETE,
        {"provisioner": POOL},
    ),
    VolumeCase(
        "claim bound elsewhere, provisioned PV with Retain -> UNBIND",
        pv(claim="ns/claim", uid="uid-1", phase="Bound", policy="Retain", annotations=BY_POOL),
        [pvc(volume="pv-2", phase="Bound")],
        VolumeAction.UNBIND,
        {"clear_claim_ref": True},
    ),
]


@pytest.mark.parametrize("case", VOLUME_CASES, ids=[case.id for case in VOLUME_CASES])
def test_sync_volume(case: VolumeCase) -> None:
    claims = {f"{x['metadata']['namespace']}/{x['metadata']['name']}": x for x in case.claims}
    decision = sync_volume(
        case.volume,
        claims=claims,
        deleters=case.deleters,
        recyclers=case.recyclers,
        pods=case.pods,
    )
    assert isinstance(decision, VolumeDecision)
    assert decision.action is case.action, decision
    for name, value in case.expect.items():
        assert getattr(decision, name) == value, (name, decision)


# --- write planning helpers ----------------------------------------------------------------------


def test_volume_bind_patch_for_a_free_volume_marks_it_ours() -> None:
    patch = volume_bind_patch(pv(), pvc())
    assert patch == {
        "spec": {
            "claimRef": {
                "kind": "PersistentVolumeClaim",
                "apiVersion": "v1",
                "namespace": "ns",
                "name": "claim",
                "uid": "uid-1",
                "resourceVersion": "7",
            }
        },
        "metadata": {"annotations": {c.ANN_BOUND_BY_CONTROLLER: "yes"}},
    }


def test_volume_bind_patch_keeps_a_user_prebinding_the_users() -> None:
    patch = volume_bind_patch(pv(claim="ns/claim"), pvc())
    assert patch is not None and "metadata" not in patch
    assert patch["spec"]["claimRef"]["uid"] == "uid-1"
    assert volume_bind_patch(pv(claim="ns/claim", uid="uid-1"), pvc()) is None


def test_volume_bind_patch_takes_over_from_an_old_claim_uid() -> None:
    patch = volume_bind_patch(pv(claim="ns/claim", uid="old"), pvc())
    assert patch is not None
    assert patch["metadata"] == {"annotations": {c.ANN_BOUND_BY_CONTROLLER: "yes"}}


@pytest.mark.parametrize(
    ("claim", "expect"),
    [
        pytest.param(pvc(annotations={c.ANN_STORAGE_PROVISIONER: IN_TREE_EBS}),
                     {c.ANN_MIGRATED_TO: EBS}, id="in-tree provisioner -> migrated-to driver"),
        pytest.param(pvc(annotations={c.ANN_STORAGE_PROVISIONER: IN_TREE_EBS,
                                      c.ANN_MIGRATED_TO: EBS}), None, id="already set"),
        pytest.param(pvc(annotations={c.ANN_STORAGE_PROVISIONER: "kubernetes.io/host-path",
                                      c.ANN_MIGRATED_TO: "x"}),
                     {c.ANN_MIGRATED_TO: None}, id="not migrated -> removed"),
        pytest.param(pvc(), None, id="no provisioner annotation -> nothing"),
    ],
)
def test_claim_migration_patch(claim: dict, expect: dict | None) -> None:
    patch = claim_migration_patch(claim)
    assert (patch and patch["metadata"]["annotations"]) == expect


def test_handing_a_legacy_claim_to_the_driver_drops_migrated_to_in_the_same_write() -> None:
    """upstream setClaimProvisioner: storage-provisioner becomes the CSI driver, which is
    not an in-tree name, so migrated-to goes (as kcm 1.36 with the real plugin manager)."""
    claim = pvc(cls="ebs", annotations={c.ANN_STORAGE_PROVISIONER: IN_TREE_EBS,
                                        c.ANN_MIGRATED_TO: EBS})
    d = sync_claim(claim, index=VolumeIndex(), classes=CLASSES, provisioners={POOL})
    assert d.action is ClaimAction.ANNOTATE_PROVISIONER
    assert d.writes[0].patch == {"metadata": {"annotations": {  # type: ignore[union-attr]
        c.ANN_STORAGE_PROVISIONER: EBS, c.ANN_BETA_STORAGE_PROVISIONER: EBS,
        c.ANN_MIGRATED_TO: None}}}


FIN_IN_TREE, FIN_EXT = c.FINALIZER_IN_TREE_DELETION, c.FINALIZER_EXTERNAL_DELETION


@pytest.mark.parametrize(
    ("provisioned_by", "policy", "finalizers", "annotations", "finalizers_after"),
    [
        pytest.param(IN_TREE_EBS, "Delete", [FIN_IN_TREE, "kubernetes.io/pv-protection"],
                     {c.ANN_MIGRATED_TO: EBS}, ["kubernetes.io/pv-protection"],
                     id="migrated in-tree PV: migrated-to set, pv-controller finalizer dropped"),
        pytest.param("kubernetes.io/host-path", "Delete", [], None, [FIN_IN_TREE],
                     id="in-tree Delete PV gets the pv-controller finalizer"),
        pytest.param("kubernetes.io/host-path", "Retain", [FIN_IN_TREE], None, [],
                     id="in-tree PV switched to Retain loses it"),
        pytest.param("kubernetes.io/host-path", "Recycle", [FIN_IN_TREE, FIN_EXT], None, [],
                     id="in-tree Recycle PV loses both finalizers"),
        pytest.param("kubernetes.io/host-path", "Delete", [FIN_IN_TREE, FIN_EXT], None,
                     [FIN_IN_TREE], id="external-provisioner finalizer dropped (rollback)"),
        pytest.param(EXT, "Delete", [FIN_EXT], None, "unchanged",
                     id="a CSI driver's PV is its provisioner's business"),
        pytest.param(None, "Delete", [FIN_IN_TREE], None, "unchanged",
                     id="statically provisioned PVs are never touched"),
        pytest.param(IN_TREE_EBS, "Delete", [], {c.ANN_MIGRATED_TO: EBS}, "unchanged",
                     id="migrated PV already annealed"),
    ],
)
def test_volume_migration_patch(provisioned_by: str | None, policy: str, finalizers: list,
                                annotations: dict | None, finalizers_after: Any) -> None:
    ann = {c.ANN_PROVISIONED_BY: provisioned_by} if provisioned_by else {}
    if finalizers_after == "unchanged" and annotations:
        ann.update(annotations)
        annotations = None
    volume = finalized(pv(policy=policy, annotations=ann), *finalizers)
    patch = volume_migration_patch(volume)
    if finalizers_after == "unchanged" and annotations is None:
        assert patch is None
        return
    assert patch is not None
    assert patch["metadata"].get("annotations") == annotations
    assert patch["metadata"].get("finalizers") == finalizers_after


def test_released_in_tree_pv_gets_migrated_to_then_reclaim_stands_down() -> None:
    """A Released PV provisioned in-tree is not marked Failed: it is annealed first, and
    with migrated-to the CSI driver's external-provisioner deletes it."""
    volume = finalized(pv(claim="ns/claim", uid="uid-1", phase="Released", policy="Delete",
                          annotations={c.ANN_PROVISIONED_BY: IN_TREE_EBS}), FIN_IN_TREE)
    first = sync_volume(volume, claims={}, deleters={POOL}, recyclers=set())
    assert first.action is VolumeAction.ANNEAL_MIGRATION
    assert first.event is None
    volume["metadata"]["annotations"][c.ANN_MIGRATED_TO] = EBS
    volume["metadata"]["finalizers"] = []
    second = sync_volume(volume, claims={}, deleters={POOL}, recyclers=set())
    assert second.action is VolumeAction.NOOP and second.event is None
    assert second.phase is None


def test_claim_bind_patch() -> None:
    chosen_by_us = claim_bind_patch(pvc(), pv())
    assert chosen_by_us == {
        "spec": {"volumeName": "pv-1"},
        "metadata": {
            "annotations": {c.ANN_BOUND_BY_CONTROLLER: "yes", c.ANN_BIND_COMPLETED: "yes"}
        },
    }
    chosen_by_user = claim_bind_patch(pvc(volume="pv-1"), pv())
    assert chosen_by_user == {"metadata": {"annotations": {c.ANN_BIND_COMPLETED: "yes"}}}
    done = pvc(volume="pv-1", annotations={c.ANN_BIND_COMPLETED: "yes"})
    assert claim_bind_patch(done, pv()) is None


def test_claim_status_patch() -> None:
    volume = pv(size="10Gi", modes=(RWO, RWX))
    assert claim_status_patch(pvc(), c.CLAIM_BOUND, volume) == {
        "status": {
            "phase": "Bound",
            "accessModes": [RWO, RWX],
            "capacity": {"storage": "10Gi"},
        }
    }
    # an existing capacity difference on a Bound claim is left alone (filesystem vs block)
    bound = pvc(phase="Bound", status={"accessModes": [RWO, RWX], "capacity": {"storage": "9Gi"}})
    assert claim_status_patch(bound, c.CLAIM_BOUND, volume) is None
    # equal quantities written differently are equal
    same = pvc(phase="Pending", status={"capacity": {"storage": "10240Mi"}})
    assert claim_status_patch(same, c.CLAIM_BOUND, volume) == {
        "status": {"phase": "Bound", "accessModes": [RWO, RWX]}
    }
    # pre-resize capacity wins
    resized = pv(size="20Gi", annotations={c.ANN_PRE_RESIZE_CAPACITY: "10Gi"})
    patch = claim_status_patch(pvc(), c.CLAIM_BOUND, resized)
    assert patch is not None and patch["status"]["capacity"] == {"storage": "10Gi"}
    # Pending / Lost clear what a Bound claim had
    stale = pvc(phase="Bound", status=BOUND_STATUS)
    assert claim_status_patch(stale, c.CLAIM_LOST, None) == {
        "status": {"phase": "Lost", "accessModes": None, "capacity": None}
    }
    assert claim_status_patch(pvc(), c.CLAIM_PENDING, None) is None


@pytest.mark.parametrize(
    ("claim", "phase", "volume", "expect"),
    [
        pytest.param(pvc(), c.CLAIM_BOUND, pv(vac="fast"), "fast",
                     id="a Pending claim becoming Bound takes the PV's attributes class"),
        pytest.param(pvc(status={"currentVolumeAttributesClassName": "old"}), c.CLAIM_BOUND,
                     pv(), None, id="a PV without attributes class clears a stale current one"),
        pytest.param(pvc(phase="Bound", status={"accessModes": [RWO]}), c.CLAIM_BOUND,
                     pv(vac="fast"), "absent",
                     id="an already Bound claim's current class is left to the resizer"),
        pytest.param(pvc(phase="Bound", status={"currentVolumeAttributesClassName": "fast"}),
                     c.CLAIM_LOST, None, None, id="Lost clears the current attributes class"),
        pytest.param(pvc(), c.CLAIM_BOUND, pv(), "absent",
                     id="neither side has an attributes class: nothing written"),
    ],
)
def test_claim_status_patch_current_attributes_class(
    claim: dict, phase: str, volume: dict | None, expect: str | None
) -> None:
    patch = claim_status_patch(claim, phase, volume) or {"status": {}}
    key = "currentVolumeAttributesClassName"
    if expect == "absent":
        assert key not in patch["status"]
    else:
        assert patch["status"][key] == expect


def test_volume_phase_patch() -> None:
    assert volume_phase_patch(pv(), "Available") is None
    assert volume_phase_patch(pv(), "Failed", "boom") == {
        "status": {"phase": "Failed", "message": "boom"}
    }


def test_volume_unbind_patch() -> None:
    ours = pv(claim="ns/claim", uid="uid-1", annotations=BY_US)
    assert volume_unbind_patch(ours) == {
        "metadata": {"annotations": {c.ANN_BOUND_BY_CONTROLLER: None}},
        "spec": {"claimRef": None},
    }
    users = pv(claim="ns/claim", uid="uid-1")
    assert volume_unbind_patch(users) == {"spec": {"claimRef": {"uid": None}}}


def test_missing_bind_steps() -> None:
    assert missing_bind_steps(pv(), pvc()) == ALL_STEPS
    claim = pvc(volume="pv-1", annotations=BOUND_CLAIM, phase="Bound", status=BOUND_STATUS)
    volume = pv(claim="ns/claim", uid="uid-1", phase="Bound", annotations=BY_US)
    assert missing_bind_steps(volume, claim) == ()


@pytest.mark.parametrize(
    ("volume", "claims", "released"),
    [
        (pv(), [], False),
        (pv(claim="ns/claim"), [], False),  # pre-bound, not bound
        (pv(claim="ns/claim", uid="uid-1"), [], True),
        (pv(claim="ns/claim", uid="uid-1"), [pvc(uid="other")], True),
        (pv(claim="ns/claim", uid="uid-1"), [pvc()], False),  # binding in progress
        (pv(claim="ns/claim", uid="uid-1"), [pvc(volume="pv-1")], False),
        (pv(claim="ns/claim", uid="uid-1"), [pvc(volume="pv-2")], True),
    ],
)
def test_is_volume_released(volume: dict, claims: list[dict], released: bool) -> None:
    by_key = {f"{x['metadata']['namespace']}/{x['metadata']['name']}": x for x in claims}
    assert is_volume_released(volume, by_key) is released


def test_default_class_prefers_newest_then_name() -> None:
    assert default_class({}) is None
    assert default_class({"a": sc("a", POOL)}) is None
    classes = {
        "old": sc("old", POOL, default=True, created="2023-01-01T00:00:00Z"),
        "new-b": sc("new-b", POOL, default=True, created="2024-06-01T00:00:00Z"),
        "new-a": sc("new-a", POOL, default=True, created="2024-06-01T00:00:00Z"),
        "plain": sc("plain", POOL, created="2025-01-01T00:00:00Z"),
    }
    assert default_class(classes) == "new-a"
    beta = sc("beta", POOL)
    beta["metadata"]["annotations"] = {c.ANN_BETA_IS_DEFAULT_CLASS: "true"}
    assert default_class({"beta": beta}) == "beta"


# --- crash safety: interrupted binds converge --------------------------------------------------


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


def apply_step(step: BindStep, volume: dict, claim: dict) -> tuple[dict, dict]:
    """What the effect layer does for one bind step."""
    if step is BindStep.VOLUME_CLAIM_REF:
        volume = merge(volume, volume_bind_patch(volume, claim) or {})
    elif step is BindStep.VOLUME_PHASE:
        volume = merge(volume, volume_phase_patch(volume, c.VOLUME_BOUND) or {})
    elif step is BindStep.CLAIM_VOLUME_NAME:
        claim = merge(claim, claim_bind_patch(claim, volume) or {})
    else:
        claim = merge(claim, claim_status_patch(claim, c.CLAIM_BOUND, volume) or {})
    return volume, claim


def apply_volume_decision(decision: VolumeDecision, volume: dict) -> dict:
    if decision.action is VolumeAction.SET_PHASE:
        return merge(
            volume, volume_phase_patch(volume, decision.phase, decision.status_message) or {}
        )
    if decision.action is VolumeAction.UNBIND:
        volume = merge(volume, volume_unbind_patch(volume))
        return merge(volume, volume_phase_patch(volume, c.VOLUME_AVAILABLE) or {})
    assert decision.action is VolumeAction.NOOP, decision
    return volume


@pytest.mark.parametrize("crash_after", range(4))
@pytest.mark.parametrize("volume_first", [False, True])
def test_interrupted_bind_converges(crash_after: int, volume_first: bool) -> None:
    """Stop the bind after any write, let the volume side run, resume: it ends fully bound."""
    volume, claim = pv("pv-1", "10Gi"), pvc("5Gi")
    decision = sync_claim(claim, index=VolumeIndex([volume, pv("pv-2", "20Gi")]), classes={},
                          provisioners={POOL})
    assert decision.action is ClaimAction.BIND and decision.steps == ALL_STEPS
    for step in decision.steps[: crash_after + 1]:
        volume, claim = apply_step(step, volume, claim)
    # the controller restarts; the two workers may run in either order
    for _ in range(6):
        if volume_first:
            volume = apply_volume_decision(
                sync_volume(
                    volume, claims={"ns/claim": claim}, deleters=set(), recyclers=set()
                ),
                volume,
            )
        decision = sync_claim(
            claim, index=VolumeIndex([volume, pv("pv-2", "20Gi")]), classes={},
            provisioners={POOL},
        )
        assert decision.volume_name in (None, "pv-1"), decision
        for step in decision.steps:
            volume, claim = apply_step(step, volume, claim)
        if not volume_first:
            volume = apply_volume_decision(
                sync_volume(
                    volume, claims={"ns/claim": claim}, deleters=set(), recyclers=set()
                ),
                volume,
            )
    assert (
        sync_claim(claim, index=VolumeIndex([volume]), classes={},
                   provisioners={POOL}).action is ClaimAction.NOOP
    )
    final = sync_volume(
        volume, claims={"ns/claim": claim}, deleters=set(), recyclers=set()
    )
    assert final.action is VolumeAction.NOOP
    assert claim["spec"]["volumeName"] == "pv-1"
    assert claim["status"] == {
        "phase": "Bound",
        "accessModes": [RWO],
        "capacity": {"storage": "10Gi"},
    }
    assert volume["spec"]["claimRef"]["uid"] == "uid-1"
    assert volume["status"]["phase"] == "Bound"
    assert volume["metadata"]["annotations"] == BY_US
    assert claim["metadata"]["annotations"] == BOUND_CLAIM


def test_deleting_the_claim_releases_then_deletes() -> None:
    """Claim deleted: Released first (one write), then the deleter is asked."""
    volume = pv(claim="ns/claim", uid="uid-1", phase="Bound", policy="Delete", annotations=BY_POOL)
    kw: dict[str, Any] = {"claims": {}, "deleters": {POOL}, "recyclers": set()}
    first = sync_volume(volume, **kw)
    assert first.action is VolumeAction.SET_PHASE and first.phase == c.VOLUME_RELEASED
    volume = apply_volume_decision(first, volume)
    second = sync_volume(volume, **kw)
    assert second.action is VolumeAction.RECLAIM_DELETE and second.provisioner == POOL
    assert is_volume_released(volume, {})


def test_race_two_claims_one_volume() -> None:
    """After claim A's write 1, claim B no longer sees the volume; B provisions instead."""
    volume = pv("only", "10Gi", cls="pool")
    claim_a, claim_b = pvc(key="ns/a", uid="ua", cls="pool"), pvc(key="ns/b", uid="ub", cls="pool")
    index = VolumeIndex([volume])
    decision_a = sync_claim(claim_a, index=index, classes=CLASSES, provisioners={POOL})
    assert decision_a.volume_name == "only"
    volume, claim_a = apply_step(BindStep.VOLUME_CLAIM_REF, volume, claim_a)
    index.upsert(volume)
    decision_b = sync_claim(claim_b, index=index, classes=CLASSES, provisioners={POOL})
    assert decision_b.action is ClaimAction.PROVISION
    decision_a = sync_claim(claim_a, index=index, classes=CLASSES, provisioners={POOL})
    assert decision_a.action is ClaimAction.BIND and decision_a.volume_name == "only"
