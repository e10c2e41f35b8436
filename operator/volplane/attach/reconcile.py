"""The Attach/Detach controller's reconciler: pure; the controller passes `now` in.

Reconcile
---------
``reconcile`` returns detaches first, then attaches, like upstream's
reconciler: a volume moving to another node is detached from the old one
before it is attached to the new one. Detach rules (safe detach):

* the Node object is gone                      -> detach now ("node-deleted");
* the node has ``node.kubernetes.io/out-of-service`` -> detach now, forced;
* the node lists the volume in ``status.volumesInUse`` -> wait, unless the node
  is NotReady and the maximum wait for unmount has passed (forced "timeout");
* otherwise                                    -> detach.

A ReadWriteOnce/ReadWriteOncePod volume (no RWX/ROX mode; a PV without access
modes allows multi-attach, as upstream) is never attached to a second node:
the pods that want it elsewhere get upstream's (1.36) FailedAttachVolume
``Waiting for detach`` event once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from volplane.objects import spec as _spec
from volplane.objects import status as _status

from .actual import Actual, AState
from .desired import Desired, PodRef, VolumeRef

OUT_OF_SERVICE_TAINT = "node.kubernetes.io/out-of-service"


# -- node predicates -----------------------------------------------------------------------

def node_ready(node: Mapping[str, Any] | None) -> bool:
    """upstream nodeutil.IsNodeReady: the Ready condition is True (no condition: not ready)."""
    for c in _status(node).get("conditions") or ():
        if c.get("type") == "Ready":
            return bool(c.get("status") == "True")
    return False


def node_out_of_service(node: Mapping[str, Any] | None) -> bool:
    return any(t.get("key") == OUT_OF_SERVICE_TAINT for t in _spec(node).get("taints") or ())


def volumes_in_use(node: Mapping[str, Any] | None) -> set[str]:
    return set(_status(node).get("volumesInUse") or ())


# -- reconcile -----------------------------------------------------------------------------
class OpKind(StrEnum):
    DETACH = "detach"                  # delete the VolumeAttachment (after the node report)
    WAIT_UNMOUNT = "wait-unmount"      # not desired, but the node still uses it
    ATTACH = "attach"                  # create the VolumeAttachment
    WAIT = "wait"                      # desired; an attach/detach is under way
    MULTI_ATTACH = "multi-attach"      # desired, but attached to another node (RWO/RWOP)
    ATTACH_FAILED = "attach-failed"    # the attacher reports status.attachError
    DETACH_FAILED = "detach-failed"    # the attacher reports status.detachError


@dataclass(frozen=True)
class Op:
    kind: OpKind
    pv_name: str
    node: str
    volume: VolumeRef | None = None
    va_name: str | None = None
    reason: str = ""                    # detach: normal/node-deleted/out-of-service/timeout
    forced: str | None = None           # forced-detach reason (metric), None if safe
    since: float | None = None          # WAIT_UNMOUNT: when the detach was first wanted
    retry_at: float | None = None       # when a timed wait must be looked at again
    events: tuple[tuple[PodRef, str], ...] = ()   # (pod, message) to post as Warning events
    vid: str = ""                       # volume identity (unique volume name), see actual.py

    @property
    def key(self) -> tuple[str, str]:
        return (self.vid or self.pv_name, self.node)


def attach_failed_message(pv_name: str, error: str) -> str:
    """upstream: GenerateError("AttachVolume.Attach failed", err) simple message."""
    return f'AttachVolume.Attach failed for volume "{pv_name}" : {error}'


def detach_failed_message(pv_name: str, error: str) -> str:
    return f'DetachVolume.Detach failed for volume "{pv_name}" : {error}'


def multi_attach_message(pv_name: str, pod: PodRef, others: Iterable[PodRef]) -> str:
    """v1.36.5 reconciler.reportMultiAttachError through VolumeToAttach.GenerateMsg
    ("Waiting for detach for volume %q %s"): pods of the pod's own namespace are named,
    pods of other namespaces only counted; without any pod, the exclusive-attach text.
    `pv_name` is the volume's spec name (the PV's, or a flex inline volume's)."""
    others = list(others)
    head = f'Waiting for detach for volume "{pv_name}"'
    if not others:
        return (f"{head} Volume is already exclusively attached to one node, waiting on "
                "detach before it can be attached to another node")
    local = [p.name for p in others if p.namespace == pod.namespace]
    foreign = len(others) - len(local)
    if local:
        msg = f"Volume is already used by pod(s) {', '.join(local)}"
        if foreign:
            msg = f"{msg} and {foreign} pod(s) in different namespaces"
    else:
        msg = f"Volume is already used by {foreign} pod(s) in different namespaces"
    return f"{head} {msg}"


def _detach_decision(a: Actual, nodes: Mapping[str, Mapping[str, Any]], now: float,
                     max_wait: float, detach_requested: Mapping[tuple[str, str], float]) -> Op:
    node = nodes.get(a.node)
    detach = Op(OpKind.DETACH, a.pv_name, a.node, va_name=a.va_name, reason="normal",
                vid=a.key[0])
    if node is None:
        return replace(detach, reason="node-deleted", forced="node-deleted")
    since = detach_requested.get(a.key, now)
    expired = now - since > max_wait
    healthy = node_ready(node)
    if node_out_of_service(node):
        return replace(detach, reason="out-of-service", forced="out-of-service")
    mounted = a.unique_name is not None and a.unique_name in volumes_in_use(node)
    if mounted and not (expired and not healthy):
        retry = None if healthy else since + max_wait
        return replace(detach, kind=OpKind.WAIT_UNMOUNT, reason="in-use", since=since,
                       retry_at=retry)
    if mounted:
        return replace(detach, reason="timeout", forced="timeout")
    return detach


def _attach_order(d: Desired) -> tuple[Any, ...]:
    """Who gets an exclusive volume first: the node whose oldest pod is oldest."""
    return (min((p.created or "~" for p in d.pods), default="~"), d.node)


def reconcile(dsw: Mapping[tuple[str, str], Desired], asw: Mapping[tuple[str, str], Actual],
              nodes: Mapping[str, Mapping[str, Any]], now: float, max_wait: float,
              detach_requested: Mapping[tuple[str, str], float] | None = None) -> list[Op]:
    """Drive the actual state toward the desired one: detach ops first, then attach ops.

    `detach_requested` remembers since when each not-desired attachment has been
    waiting for unmount (the caller keeps the `since` of the WAIT_UNMOUNT ops it gets
    back, and forgets the rest); `now` and it are on the same clock. `dsw` and `asw`
    may cover only some volumes, but then all entries of those volumes."""
    ops = _detaches(dsw, asw, nodes, now, max_wait, detach_requested or {})
    detaching_now = {op.key for op in ops if op.kind is OpKind.DETACH}
    on_nodes: dict[str, set[str]] = {}   # volume -> nodes it is (being) attached to
    for key, a in asw.items():
        if key not in detaching_now:
            on_nodes.setdefault(key[0], set()).add(a.node)
    for d in sorted(dsw.values(), key=_attach_order):
        op = _attach_op(d, dsw, asw, on_nodes, detaching_now)
        if op is not None:
            ops.append(op)
        if op is not None and op.kind is OpKind.ATTACH:
            on_nodes.setdefault(d.key[0], set()).add(d.node)
    return ops


def _detaches(dsw: Mapping[tuple[str, str], Desired], asw: Mapping[tuple[str, str], Actual],
              nodes: Mapping[str, Mapping[str, Any]], now: float, max_wait: float,
              detach_requested: Mapping[tuple[str, str], float]) -> list[Op]:
    """Every attachment not desired: detach it (safely), or report its detach error."""
    ops = []
    for key in sorted(asw):
        a = asw[key]
        if key in dsw:
            continue
        if a.state is AState.DETACHING:
            if a.detach_error:
                ops.append(Op(OpKind.DETACH_FAILED, a.pv_name, a.node, va_name=a.va_name,
                              reason=detach_failed_message(a.pv_name, a.detach_error),
                              vid=key[0]))
            continue
        ops.append(_detach_decision(a, nodes, now, max_wait, detach_requested))
    return ops


def _attach_op(d: Desired, dsw: Mapping[tuple[str, str], Desired],
               asw: Mapping[tuple[str, str], Actual], on_nodes: Mapping[str, set[str]],
               detaching_now: set[tuple[str, str]]) -> Op | None:
    """What one desired (volume, node) needs: nothing, a wait, an error, or an attach."""
    pv_name = d.volume.pv_name
    base = Op(OpKind.WAIT, pv_name, d.node, volume=d.volume, vid=d.key[0])
    a = asw.get(d.key)
    if a is not None:
        if a.state is AState.ATTACHING and a.attach_error:
            msg = attach_failed_message(pv_name, a.attach_error)
            return replace(base, kind=OpKind.ATTACH_FAILED, va_name=a.va_name,
                           reason=a.attach_error, events=tuple((p, msg) for p in d.pods))
        if a.state is not AState.ATTACHED:
            return replace(base, va_name=a.va_name, reason=a.state.value)
        return None
    if not d.volume.multi_attach:
        blocked = _exclusive_elsewhere(d, dsw, asw, on_nodes, detaching_now)
        if blocked is not None:
            return blocked
    return replace(base, kind=OpKind.ATTACH, va_name=d.volume.attachment_name(d.node))


def _exclusive_elsewhere(d: Desired, dsw: Mapping[tuple[str, str], Desired],
                         asw: Mapping[tuple[str, str], Actual],
                         on_nodes: Mapping[str, set[str]],
                         detaching_now: set[tuple[str, str]]) -> Op | None:
    """A ReadWriteOnce volume wanted on d.node while it is elsewhere: the op that holds
    it back, or None (free to attach).

    Attached there (or being attached there in this pass): the multi-attach report.
    An attach there still in flight, its outcome unknown (uncertain): wait quietly, as
    upstream's IsOperationPending for the volume. An attach there that failed (the
    attacher reports attachError) does not hold the volume. Being detached there: wait.
    """
    pv_name, vid = d.volume.pv_name, d.key[0]
    base = Op(OpKind.WAIT, pv_name, d.node, volume=d.volume, vid=vid)
    others = on_nodes.get(vid, set()) - {d.node}
    elsewhere = {n: asw.get((vid, n)) for n in others}
    holding = [n for n, x in elsewhere.items() if x is None or x.state is AState.ATTACHED]
    if holding:
        users = sorted({p for n in holding
                        if (there := dsw.get((vid, n))) is not None for p in there.pods})
        ev = tuple((p, multi_attach_message(d.volume.display_name, p, users))
                   for p in d.pods)
        return replace(base, kind=OpKind.MULTI_ATTACH, reason="multi-attach", events=ev)
    if any(x is not None and x.state is AState.ATTACHING and not x.attach_error
           for x in elsewhere.values()):
        return replace(base, reason="attaching-elsewhere")
    if (any(x is not None and x.state is AState.DETACHING for x in elsewhere.values())
            or any(k[0] == vid for k in detaching_now)):
        return replace(base, reason="detaching-elsewhere")
    return None


def volume_attachment_body(volume: VolumeRef, node: str) -> dict[str, Any]:
    """The VolumeAttachment upstream's csiAttacher.Attach creates."""
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "VolumeAttachment",
        "metadata": {"name": volume.attachment_name(node)},
        "spec": {
            "attacher": volume.driver,
            "nodeName": node,
            "source": {"persistentVolumeName": volume.pv_name},
        },
    }
