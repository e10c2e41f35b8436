"""The invariants `volplane check` verifies: pure functions over a Snapshot of plain dicts.

Nothing here performs I/O or reads a clock: the gatherer (gather.py) lists the objects
and passes the wall-clock time in `Snapshot.now` (ages are measured from the objects'
own timestamps, which the API server wrote). Each invariant returns the Violations it
finds; `check` runs them all and drops those touching excluded objects.

What "correct" means is not re-implemented here: the decision layer already knows.
Claims are judged by `pv.decide.sync_claim` over a `pv.index.VolumeIndex` (a Bound
claim the binder would mark Lost is a violation; a Pending one it would bind or
provision, with room in a pool by `pools.placement.choose_pool`, is stuck), the desired
attachments are `attach.desired.build_dsw`, the actual ones `attach.actual.build_asw`,
and what must happen to them `attach.reconcile.reconcile`; node reports are
`attach.reports.node_volumes_attached`; device slots are `pools.slots`'.

Groups and invariants (ids are stable: the JSON report and tests use them):

binding
  bind-symmetric        a Bound PV's claimRef names a claim that has its uid and whose
                        volumeName is that PV; a Bound claim's PV is Bound (to it)
  pv-two-claims         no PV is the volumeName of two Bound claims
  claim-two-pvs         no claim uid is the claimRef of two Bound PVs
  bound-claim-lost      no Bound claim whose PV is gone (or bound to another claim)
                        without the claim being Lost
ledger (StoragePools)
  pool-ledger           per pool: sum of its allocation records = sum of its provisioned
                        PVs' sizes (plus records younger than the grace, whose PV may be
                        in flight) = status.allocatedBytes; status.volumeCount = records
  allocation-pv         every record older than the grace has its PV, of the same pool
                        and size; every provisioned pool PV (not being deleted) has its
                        record; every record names an existing pool
  pool-over-capacity    no pool's records sum to more than its capacity
attachments
  attachment-desired    every VolumeAttachment is desired (a pod on that node uses the
                        volume), being detached, or kept while the node still uses it
  multi-attach          no ReadWriteOnce/ReadWriteOncePod volume attached (or being
                        attached or detached) on two nodes
  device-slots          pool attachments: an attached one holds exactly one slot (and
                        the attacher's finalizer) whose device path it reports; no two
                        hold one slot of a node and pool
  node-volumes-attached node.status.volumesAttached lists exactly the node's attached
                        VolumeAttachments, with devicePath "" (upstream's, for CSI);
                        FlexVolume entries are not judged
stuck (each with its age; only objects older than Limits.stuck_after)
  claim-pending         a Pending claim with a fitting PV, or room in a pool
  pv-released           a Released PV whose reclaim policy is Delete
  attachment-stuck      an attachment waiting (not attached, failing, or not detached)
                        longer than the deadline, or a pod waiting that long for one
"""

from __future__ import annotations

import calendar
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..attach import actual as A
from ..attach import desired as D
from ..attach import names as N
from ..attach import reconcile as RC
from ..attach import reports as R
from ..pools import slots as S
from ..pools.ledger import Ledger
from ..pools.parameters import ParameterError, parse_class_parameters
from ..pools.placement import choose_pool, pool_capacity
from ..pools.records import ORPHAN_GRACE, PROVISIONER, orphan_due
from ..pv import constants as C
from ..pv.decide import ClaimAction, sync_claim
from ..pv.index import VolumeIndex, access_modes, claim_request, volume_capacity

EXCLUDE_LABEL = "volplane.io/check-exclude"
STUCK_AFTER = 120.0
Obj = Mapping[str, Any]
Body = dict[str, Any]


# -- inputs ----------------------------------------------------------------------------------
def key_of(obj: Obj) -> str:
    md = obj.get("metadata") or {}
    ns = md.get("namespace")
    return f"{ns}/{md.get('name')}" if ns else str(md.get("name"))


def _by_key(objs: Iterable[Obj] | Mapping[str, Obj] | None) -> dict[str, Body]:
    if objs is None:
        return {}
    if isinstance(objs, Mapping):
        return {k: dict(v) for k, v in objs.items()}
    return {key_of(o): dict(o) for o in objs}


@dataclass
class Snapshot:
    """Everything the invariants read, keyed as the operator's caches are ("ns/name" for
    namespaced kinds). `now`: wall-clock seconds. `pools_installed`: the StoragePool
    CRDs exist (a cluster without them has no ledger to check)."""

    now: float
    pvs: dict[str, Body] = field(default_factory=dict)
    pvcs: dict[str, Body] = field(default_factory=dict)
    pods: dict[str, Body] = field(default_factory=dict)
    nodes: dict[str, Body] = field(default_factory=dict)
    vas: dict[str, Body] = field(default_factory=dict)
    pools: dict[str, Body] = field(default_factory=dict)
    allocations: dict[str, Body] = field(default_factory=dict)
    classes: dict[str, Body] = field(default_factory=dict)
    drivers: dict[str, Body] = field(default_factory=dict)
    namespaces: dict[str, Body] = field(default_factory=dict)
    pools_installed: bool = True

    @classmethod
    def of(cls, now: float, **kinds: Any) -> Snapshot:
        """From lists (or dicts) of objects: Snapshot.of(now, pvs=[...], pvcs=[...])."""
        installed = kinds.pop("pools_installed", True)
        return cls(now=now, pools_installed=installed,
                   **{k: _by_key(v) for k, v in kinds.items()})


@dataclass(frozen=True)
class Limits:
    orphan_grace: float = ORPHAN_GRACE   # a record without PV is an orphan after this
    stuck_after: float = STUCK_AFTER     # "stuck" = waiting longer than this
    unmount_max_wait: float = math.inf   # the AD controller's --unmount-max-wait


@dataclass(frozen=True)
class Scope:
    """What is not judged: objects labelled EXCLUDE_LABEL, everything in the namespaces
    named here or labelled so, and whatever is bound to or built on those (the claims'
    PVs and their records and attachments, the pools' volumes, ...)."""

    exclude_namespaces: frozenset[str] = frozenset()
    label: str = EXCLUDE_LABEL


@dataclass(frozen=True)
class Violation:
    invariant: str
    group: str
    message: str
    refs: tuple[str, ...] = ()          # "Kind/key" of every object involved
    age: float | None = None            # seconds (stuck ones: how long it has waited)

    def as_dict(self) -> Body:
        d: Body = {"invariant": self.invariant, "group": self.group, "message": self.message,
                   "objects": list(self.refs)}
        if self.age is not None:
            d["ageSeconds"] = round(self.age, 1)
        return d


# -- small helpers -----------------------------------------------------------------------------
def _md(o: Obj | None) -> Obj:
    return (o or {}).get("metadata") or {}


def _spec(o: Obj | None) -> Obj:
    return (o or {}).get("spec") or {}


def _status(o: Obj | None) -> Obj:
    return (o or {}).get("status") or {}


def _phase(o: Obj | None) -> str:
    return _status(o).get("phase") or ""


_FRACTION = re.compile(r"\.\d+")


def parse_time(s: str | None) -> float | None:
    """An RFC 3339 timestamp of the API server (UTC, 'Z', optional fraction) in seconds."""
    if not s or not isinstance(s, str):
        return None
    try:
        return calendar.timegm(time.strptime(_FRACTION.sub("", s), "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return None


def age(now: float, stamp: str | None) -> float | None:
    t = parse_time(stamp)
    return None if t is None else max(0.0, now - t)


def ref(kind: str, key: str) -> str:
    return f"{kind}/{key}"


def _claim_ref_key(pv: Obj) -> str | None:
    r = _spec(pv).get("claimRef") or {}
    return f"{r.get('namespace') or ''}/{r['name']}" if r.get("name") else None


def _q(n: int) -> str:
    for unit, power in (("Ti", 4), ("Gi", 3), ("Mi", 2), ("Ki", 1)):
        if n and n % (1024 ** power) == 0:
            return f"{n // 1024 ** power}{unit}"
    return str(n)


def is_provisioned_pool_volume(pv: Obj) -> bool:
    """A PV the pool provisioner made (and so has an allocation record)."""
    return ((_md(pv).get("annotations") or {}).get(C.ANN_PROVISIONED_BY) == PROVISIONER
            and (_spec(pv).get("csi") or {}).get("driver") == PROVISIONER)


def _pool_of(pv: Obj) -> str | None:
    return S.pool_of_handle((_spec(pv).get("csi") or {}).get("volumeHandle"))


def _record_size(record: Obj) -> int:
    try:
        return int(_spec(record).get("sizeBytes") or 0)
    except (TypeError, ValueError):
        return 0


def _ledger(snap: Snapshot) -> Ledger:
    ledger = Ledger()
    for name, r in snap.allocations.items():
        pool = _spec(r).get("pool")
        if pool:
            ledger.observe(name, pool, _record_size(r))
    return ledger


# -- binding -----------------------------------------------------------------------------------
def bind_symmetric(snap: Snapshot, limits: Limits) -> Iterable[Violation]:
    for name, pv in snap.pvs.items():
        if _phase(pv) != C.VOLUME_BOUND:
            continue
        cref = _spec(pv).get("claimRef") or {}
        ck = _claim_ref_key(pv)
        if not ck or not cref.get("uid"):
            yield Violation("bind-symmetric", "binding",
                            f"PV {name} is Bound but its claimRef names no claim uid",
                            (ref("PersistentVolume", name),))
            continue
        claim = snap.pvcs.get(ck)
        refs = (ref("PersistentVolume", name), ref("PersistentVolumeClaim", ck))
        if claim is None or _md(claim).get("uid") != cref.get("uid"):
            yield Violation("bind-symmetric", "binding",
                            f"PV {name} is Bound to claim {ck} (uid {cref.get('uid')}), "
                            "which does not exist (the PV should be Released)", refs)
            continue
        bound_to = _spec(claim).get("volumeName") or ""
        if _phase(claim) == C.CLAIM_BOUND and bound_to != name:
            yield Violation("bind-symmetric", "binding",
                            f"PV {name} is Bound to claim {ck}, whose volumeName is "
                            f"{bound_to or '(empty)'}", refs + ((ref("PersistentVolume",
                                                                      bound_to),)
                                                                 if bound_to else ()))
    for ck, claim in snap.pvcs.items():
        if _phase(claim) != C.CLAIM_BOUND:
            continue
        vn = _spec(claim).get("volumeName") or ""
        bound_pv = snap.pvs.get(vn)
        if bound_pv is None:
            continue  # bound-claim-lost
        cref = _spec(bound_pv).get("claimRef") or {}
        if cref.get("uid") == _md(claim).get("uid") and _phase(bound_pv) != C.VOLUME_BOUND:
            yield Violation("bind-symmetric", "binding",
                            f"claim {ck} is Bound to PV {vn}, which is "
                            f"{_phase(bound_pv) or 'without a phase'}",
                            (ref("PersistentVolumeClaim", ck), ref("PersistentVolume", vn)))


def pv_two_claims(snap: Snapshot, limits: Limits) -> Iterable[Violation]:
    by_pv: dict[str, list[str]] = {}
    for ck, claim in snap.pvcs.items():
        vn = _spec(claim).get("volumeName")
        if vn and _phase(claim) == C.CLAIM_BOUND:
            by_pv.setdefault(vn, []).append(ck)
    for vn, cks in sorted(by_pv.items()):
        if len(cks) > 1:
            yield Violation("pv-two-claims", "binding",
                            f"PV {vn} is the volume of {len(cks)} Bound claims: "
                            f"{', '.join(sorted(cks))}",
                            (ref("PersistentVolume", vn),
                             *(ref("PersistentVolumeClaim", c) for c in sorted(cks))))


def claim_two_pvs(snap: Snapshot, limits: Limits) -> Iterable[Violation]:
    by_uid: dict[str, list[str]] = {}
    keys: dict[str, str] = {}
    for name, pv in snap.pvs.items():
        uid = (_spec(pv).get("claimRef") or {}).get("uid")
        if uid and _phase(pv) == C.VOLUME_BOUND:
            by_uid.setdefault(uid, []).append(name)
            keys[uid] = _claim_ref_key(pv) or ""
    for uid, names in sorted(by_uid.items()):
        if len(names) > 1:
            yield Violation("claim-two-pvs", "binding",
                            f"claim {keys[uid]} (uid {uid}) is the claimRef of {len(names)} "
                            f"Bound PVs: {', '.join(sorted(names))}",
                            (ref("PersistentVolumeClaim", keys[uid]),
                             *(ref("PersistentVolume", n) for n in sorted(names))))


def bound_claim_lost(snap: Snapshot, limits: Limits) -> Iterable[Violation]:
    """The binder's own judgement (sync_claim): a Bound claim it would mark Lost."""
    index = VolumeIndex(snap.pvs.values())
    for ck, claim in snap.pvcs.items():
        if _phase(claim) != C.CLAIM_BOUND:
            continue
        d = sync_claim(claim, index=index, classes=snap.classes,
                       provisioners={PROVISIONER})
        if d.action is ClaimAction.SET_LOST:
            vn = _spec(claim).get("volumeName") or ""
            yield Violation("bound-claim-lost", "binding",
                            f"claim {ck} is Bound to PV {vn or '(none)'} but is not Lost: "
                            f"{d.message}",
                            (ref("PersistentVolumeClaim", ck),)
                            + ((ref("PersistentVolume", vn),) if vn else ()))


# -- pool ledger -------------------------------------------------------------------------------
def pool_ledger(snap: Snapshot, limits: Limits) -> Iterable[Violation]:
    if not snap.pools_installed:
        return
    records: dict[str, list[tuple[str, Body]]] = {}
    for name, r in snap.allocations.items():
        records.setdefault(_spec(r).get("pool") or "", []).append((name, r))
    pv_bytes: dict[str, int] = {}
    for name, pv in snap.pvs.items():
        if is_provisioned_pool_volume(pv):
            if _md(pv).get("deletionTimestamp") and name not in snap.allocations:
                continue  # being deleted, its record already gone: its space is free
            owner = _pool_of(pv) or ""
            try:
                pv_bytes[owner] = pv_bytes.get(owner, 0) + volume_capacity(pv)
            except ValueError:
                pass
    for pool_name, pool in sorted(snap.pools.items()):
        recs = records.get(pool_name, [])
        in_records = sum(_record_size(r) for _, r in recs)
        # records whose PV may still be in flight (younger than the grace) count as made
        young = sum(_record_size(r) for n, r in recs if n not in snap.pvs
                    and not orphan_due(r, snap.now, limits.orphan_grace))
        in_pvs = pv_bytes.get(pool_name, 0) + young
        st = _status(pool)
        in_status = st.get("allocatedBytes")
        count = st.get("volumeCount")
        if in_records != in_pvs or in_status != in_records or count != len(recs):
            yield Violation("pool-ledger", "ledger",
                            f"pool {pool_name}: allocation records {_q(in_records)} "
                            f"({len(recs)}), provisioned PVs {_q(in_pvs)}, status."
                            f"allocatedBytes {in_status if in_status is None else _q(in_status)}"
                            f" (volumeCount {count}): they must agree",
                            (ref("StoragePool", pool_name),))


def allocation_pv(snap: Snapshot, limits: Limits) -> Iterable[Violation]:
    if not snap.pools_installed:
        return
    for name, r in sorted(snap.allocations.items()):
        pool = _spec(r).get("pool") or ""
        cl = _spec(r).get("claim") or {}
        refs: tuple[str, ...] = (
            ref("StorageAllocation", name), ref("StoragePool", pool),
            ref("PersistentVolumeClaim", f"{cl.get('namespace')}/{cl.get('name')}"))
        if pool not in snap.pools:
            yield Violation("allocation-pv", "ledger",
                            f"allocation {name} names StoragePool {pool}, which does not exist",
                            refs)
        pv = snap.pvs.get(name)
        if pv is None:
            a = age(snap.now, _md(r).get("creationTimestamp"))
            if orphan_due(r, snap.now, limits.orphan_grace):
                yield Violation("allocation-pv", "ledger",
                                f"allocation {name} ({_q(_record_size(r))} of pool {pool}, "
                                f"claim {cl.get('namespace')}/{cl.get('name')}) has no PV "
                                f"{a:.0f}s after it was made (grace {limits.orphan_grace:.0f}s)",
                                refs, age=a)
            continue
        refs += (ref("PersistentVolume", name),)
        if _pool_of(pv) != pool:
            yield Violation("allocation-pv", "ledger",
                            f"allocation {name} is in pool {pool}, its PV in {_pool_of(pv)}",
                            refs)
        try:
            size = volume_capacity(pv)
        except ValueError:
            size = -1
        if size != _record_size(r):
            yield Violation("allocation-pv", "ledger",
                            f"allocation {name} holds {_q(_record_size(r))}, its PV has "
                            f"capacity {_q(size) if size >= 0 else '(invalid)'}", refs)
    for name, pv in sorted(snap.pvs.items()):
        if not is_provisioned_pool_volume(pv) or _md(pv).get("deletionTimestamp"):
            continue
        if name not in snap.allocations:
            yield Violation("allocation-pv", "ledger",
                            f"provisioned PV {name} (pool {_pool_of(pv)}) has no allocation "
                            "record: its space is not counted",
                            (ref("PersistentVolume", name), ref("StoragePool",
                                                                 _pool_of(pv) or "")))


def pool_over_capacity(snap: Snapshot, limits: Limits) -> Iterable[Violation]:
    if not snap.pools_installed:
        return
    ledger = _ledger(snap)
    for name, pool in sorted(snap.pools.items()):
        cap = pool_capacity(pool)
        used = ledger.allocated(name)
        if cap is not None and used > cap:
            yield Violation("pool-over-capacity", "ledger",
                            f"pool {name}: {_q(used)} allocated exceeds its capacity {_q(cap)}",
                            (ref("StoragePool", name),))


# -- attachments -------------------------------------------------------------------------------
def _world(snap: Snapshot) -> tuple[D.DSW, A.ASW]:
    dsw = D.build_dsw(snap.pods.values(), pvcs=snap.pvcs, pvs=snap.pvs, drivers=snap.drivers,
                      nodes=snap.nodes)
    asw = A.build_asw(snap.vas.values(), pvs=snap.pvs, nodes=snap.nodes)
    return dsw, asw


def _va_refs(va_name: str | None, pv: str, node: str) -> tuple[str, ...]:
    out = (ref("PersistentVolume", pv), ref("Node", node))
    return ((ref("VolumeAttachment", va_name),) if va_name else ()) + out


def attachment_desired(snap: Snapshot, limits: Limits) -> Iterable[Violation]:
    dsw, asw = _world(snap)
    ops = RC.reconcile(dsw, asw, snap.nodes, snap.now, limits.unmount_max_wait)
    for op in ops:
        if op.kind is RC.OpKind.DETACH:
            why = {"node-deleted": "its node is gone",
                   "out-of-service": "its node is out of service"}.get(op.reason,
                                                                       "no pod there uses it")
            yield Violation("attachment-desired", "attachments",
                            f"VolumeAttachment {op.va_name} ({op.pv_name} on {op.node}) is "
                            f"not desired ({why}) and not being detached",
                            _va_refs(op.va_name, op.pv_name, op.node))
    # VolumeAttachments the ASW cannot place (no PV source, another one for the same
    # (PV, node)) are judged by their own existence: not desired by any pod.
    placed = {a.va_name for a in asw.values()}
    for name, va in sorted(snap.vas.items()):
        if name in placed or _md(va).get("deletionTimestamp"):
            continue
        spec = _spec(va)
        pv = (spec.get("source") or {}).get("persistentVolumeName")
        node = spec.get("nodeName") or ""
        if pv and (key := (_vid(snap, pv), node)) in dsw:
            d = dsw[key]
            if d.volume.attachment_name(node) != name:
                yield Violation("attachment-desired", "attachments",
                                f"VolumeAttachment {name} duplicates "
                                f"{d.volume.attachment_name(node)} ({pv} on {node})",
                                _va_refs(name, pv, node))


def _vid(snap: Snapshot, pv: str) -> str:
    """A PV's volume identity, as the controller's: its unique volume name (CSI), else
    its name. PVs on one volume handle are one volume."""
    v = D.volume_ref(snap.pvs.get(pv) or {})
    return v.unique_name if v is not None else pv


def multi_attach(snap: Snapshot, limits: Limits) -> Iterable[Violation]:
    nodes_of: dict[str, dict[str, str]] = {}
    pvs_of: dict[str, set[str]] = {}
    for name, va in snap.vas.items():
        spec = _spec(va)
        pv = (spec.get("source") or {}).get("persistentVolumeName")
        if pv:
            vid = _vid(snap, pv)
            nodes_of.setdefault(vid, {})[spec.get("nodeName") or ""] = name
            pvs_of.setdefault(vid, set()).add(pv)
    for vid, where in sorted(nodes_of.items()):
        rwo = sorted(n for n in pvs_of[vid] if (p := snap.pvs.get(n)) is not None
                     and not D.multi_attach_allowed(p))
        if not rwo or len(where) < 2:
            continue
        pv_name, pv = rwo[0], snap.pvs[rwo[0]]
        modes = ",".join(sorted(access_modes(pv)))
        yield Violation("multi-attach", "attachments",
                        f"{modes} volume {pv_name} is attached to {len(where)} nodes: "
                        f"{', '.join(sorted(where))}",
                        (ref("PersistentVolume", pv_name),
                         *(ref("VolumeAttachment", n) for n in sorted(where.values()))))


def device_slots(snap: Snapshot, limits: Limits) -> Iterable[Violation]:
    holders: dict[tuple[str, str, int], list[str]] = {}
    for name, va in sorted(snap.vas.items()):
        spec = _spec(va)
        if spec.get("attacher") != S.POOL_DRIVER:
            continue
        node = spec.get("nodeName") or ""
        slot = S.slot_of(va)
        if slot is not None:
            holders.setdefault((node, slot[0], slot[1]), []).append(name)
        st = _status(va)
        if not st.get("attached") or _md(va).get("deletionTimestamp"):
            continue
        refs = (ref("VolumeAttachment", name), ref("Node", node))
        if slot is None:
            yield Violation("device-slots", "attachments",
                            f"VolumeAttachment {name} on {node} is attached without a device "
                            "slot", refs)
            continue
        if S.ATTACHER_FINALIZER not in (_md(va).get("finalizers") or ()):
            yield Violation("device-slots", "attachments",
                            f"VolumeAttachment {name} on {node} holds slot {slot[1]} of pool "
                            f"{slot[0]} without the {S.ATTACHER_FINALIZER} finalizer (the slot "
                            "could be freed before the device is)", refs)
        path = (st.get("attachmentMetadata") or {}).get("devicePath")
        if path != S.device_path(*slot):
            yield Violation("device-slots", "attachments",
                            f"VolumeAttachment {name} on {node} holds slot {slot[1]} of pool "
                            f"{slot[0]} but reports device {path!r}", refs)
    for (node, pool, number), names in sorted(holders.items()):
        if len(names) > 1:
            yield Violation("device-slots", "attachments",
                            f"slot {number} of pool {pool} on node {node} is held by "
                            f"{len(names)} attachments: {', '.join(names)}",
                            (ref("Node", node), ref("StoragePool", pool),
                             *(ref("VolumeAttachment", n) for n in names)))


def node_volumes_attached(snap: Snapshot, limits: Limits) -> Iterable[Violation]:
    _, asw = _world(snap)
    actual = list(asw.values())
    for name, node in sorted(snap.nodes.items()):
        want = {e["name"]: e["devicePath"] for e in R.node_volumes_attached(actual, name)}
        # only CSI entries: a FlexVolume entry has no API object to judge it by
        have = {e.get("name"): e.get("devicePath") or ""
                for e in _status(node).get("volumesAttached") or ()
                if N.parse_unique_volume_name(str(e.get("name") or "")) is not None}
        if want == have:
            continue
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"not attached {', '.join(extra)}")
        if wrong:
            parts.append("wrong device path for " + ", ".join(
                f"{k} ({have[k]!r}, attached as {want[k]!r})" for k in wrong))
        involved = {N.volume_attachment_name(p[1], p[0], name)
                    for k in missing + extra + wrong
                    if (p := N.parse_unique_volume_name(k))}
        yield Violation("node-volumes-attached", "attachments",
                        f"node {name} status.volumesAttached: {'; '.join(parts)}",
                        (ref("Node", name), *(ref("VolumeAttachment", v)
                                               for v in sorted(involved))))


# -- stuck -------------------------------------------------------------------------------------
def claim_pending(snap: Snapshot, limits: Limits) -> Iterable[Violation]:
    index = VolumeIndex(snap.pvs.values())
    ledger = _ledger(snap)
    for ck, claim in sorted(snap.pvcs.items()):
        if _phase(claim) not in ("", C.CLAIM_PENDING) or _md(claim).get("deletionTimestamp"):
            continue
        a = age(snap.now, _md(claim).get("creationTimestamp"))
        if a is None or a < limits.stuck_after:
            continue
        d = sync_claim(claim, index=index, classes=snap.classes,
                       provisioners={PROVISIONER})
        refs = (ref("PersistentVolumeClaim", ck),)
        if d.action in (ClaimAction.BIND, ClaimAction.SET_BOUND) and d.volume_name:
            yield Violation("claim-pending", "stuck",
                            f"claim {ck} is Pending for {a:.0f}s although PV {d.volume_name} "
                            "fits it", refs + (ref("PersistentVolume", d.volume_name),), age=a)
        elif d.action in (ClaimAction.ASSIGN_DEFAULT_CLASS, ClaimAction.ANNOTATE_PROVISIONER):
            yield Violation("claim-pending", "stuck",
                            f"claim {ck} is Pending for {a:.0f}s with a step left undone: "
                            f"{d.message}", refs, age=a)
        elif d.action is ClaimAction.PROVISION and snap.pools_installed:
            sc = snap.classes.get(d.storage_class or "") or {}
            try:
                params = parse_class_parameters(sc.get("parameters"))
                size = claim_request(claim)
            except (ParameterError, ValueError):
                continue  # a bad class or request is reported on the claim, not stuck
            choice = choose_pool(size, sorted(access_modes(claim)), params, snap.pools,
                                 ledger, node=d.selected_node,
                                 allowed_topologies=sc.get("allowedTopologies"),
                                 nodes=snap.nodes)
            if choice.pool is not None:
                yield Violation("claim-pending", "stuck",
                                f"claim {ck} is Pending for {a:.0f}s although pool "
                                f"{choice.pool} has room ({_q(choice.available)} free, "
                                f"{_q(size)} requested)",
                                refs + (ref("StoragePool", choice.pool),), age=a)


def pv_released(snap: Snapshot, limits: Limits) -> Iterable[Violation]:
    for name, pv in sorted(snap.pvs.items()):
        if _phase(pv) != C.VOLUME_RELEASED:
            continue
        if _spec(pv).get("persistentVolumeReclaimPolicy") != C.RECLAIM_DELETE:
            continue
        a = age(snap.now, _status(pv).get("lastPhaseTransitionTime"))
        if a is None:
            a = age(snap.now, _md(pv).get("creationTimestamp"))
        if a is None or a < limits.stuck_after:
            continue
        yield Violation("pv-released", "stuck",
                        f"PV {name} is Released with reclaim policy Delete for {a:.0f}s",
                        (ref("PersistentVolume", name),
                         *((ref("PersistentVolumeClaim", ck),)
                           if (ck := _claim_ref_key(pv)) else ())), age=a)


def attachment_stuck(snap: Snapshot, limits: Limits) -> Iterable[Violation]:
    dsw, asw = _world(snap)
    ops = RC.reconcile(dsw, asw, snap.nodes, snap.now, limits.unmount_max_wait)
    for op in ops:
        refs = _va_refs(op.va_name, op.pv_name, op.node)
        va = snap.vas.get(op.va_name or "")
        if op.kind is RC.OpKind.ATTACH:
            d = dsw[op.key]
            oldest = min((p.created for p in d.pods if p.created), default=None)
            a = age(snap.now, oldest)
            if a is not None and a >= limits.stuck_after:
                pods = ", ".join(p.key for p in d.pods)
                yield Violation("attachment-stuck", "stuck",
                                f"{op.pv_name} is needed on {op.node} (pods {pods}) for "
                                f"{a:.0f}s and has no VolumeAttachment", refs, age=a)
        elif op.kind in (RC.OpKind.WAIT, RC.OpKind.ATTACH_FAILED) and va is not None:
            if _md(va).get("deletionTimestamp"):
                continue  # judged below, as a detach
            a = age(snap.now, _md(va).get("creationTimestamp"))
            if a is not None and a >= limits.stuck_after:
                err = (_status(va).get("attachError") or {}).get("message")
                yield Violation("attachment-stuck", "stuck",
                                f"VolumeAttachment {op.va_name} ({op.pv_name} on {op.node}) "
                                f"is not attached after {a:.0f}s"
                                + (f": {err}" if err else ""), refs, age=a)
    for name, va in sorted(snap.vas.items()):
        since = _md(va).get("deletionTimestamp")
        if not since:
            continue
        a = age(snap.now, since)
        if a is not None and a >= limits.stuck_after:
            spec = _spec(va)
            pv = (spec.get("source") or {}).get("persistentVolumeName") or ""
            err = (_status(va).get("detachError") or {}).get("message")
            yield Violation("attachment-stuck", "stuck",
                            f"VolumeAttachment {name} ({pv} on {spec.get('nodeName')}) is "
                            f"being detached for {a:.0f}s" + (f": {err}" if err else ""),
                            _va_refs(name, pv, spec.get("nodeName") or ""), age=a)


# -- the registry and the run ----------------------------------------------------------------
Invariant = Callable[[Snapshot, Limits], Iterable[Violation]]

INVARIANTS: dict[str, tuple[str, Invariant]] = {
    "bind-symmetric": ("binding", bind_symmetric),
    "pv-two-claims": ("binding", pv_two_claims),
    "claim-two-pvs": ("binding", claim_two_pvs),
    "bound-claim-lost": ("binding", bound_claim_lost),
    "pool-ledger": ("ledger", pool_ledger),
    "allocation-pv": ("ledger", allocation_pv),
    "pool-over-capacity": ("ledger", pool_over_capacity),
    "attachment-desired": ("attachments", attachment_desired),
    "multi-attach": ("attachments", multi_attach),
    "device-slots": ("attachments", device_slots),
    "node-volumes-attached": ("attachments", node_volumes_attached),
    "claim-pending": ("stuck", claim_pending),
    "pv-released": ("stuck", pv_released),
    "attachment-stuck": ("stuck", attachment_stuck),
}


def excluded_refs(snap: Snapshot, scope: Scope) -> set[str]:
    """Refs of every object out of scope: labelled ones, those in excluded namespaces,
    and what hangs off them (a claim's PV and the PV's claim, record and attachments; a
    pool's volumes and records; a node's attachments)."""
    namespaces = set(scope.exclude_namespaces)
    namespaces |= {n for n, ns in snap.namespaces.items()
                   if scope.label in (_md(ns).get("labels") or {})}
    out = _excluded_directly(snap, scope, namespaces)
    for k, r in snap.allocations.items():
        cl = _spec(r).get("claim") or {}
        in_pool = ref("StoragePool", _spec(r).get("pool") or "")
        if cl.get("namespace") in namespaces or in_pool in out:
            out.add(ref("StorageAllocation", k))
    for _ in range(2):  # claims <-> PVs, both ways
        _exclude_bound_pairs(snap, namespaces, out)
    for k in snap.allocations:
        if ref("PersistentVolume", k) in out:
            out.add(ref("StorageAllocation", k))
    for k, va in snap.vas.items():
        spec = _spec(va)
        pv = (spec.get("source") or {}).get("persistentVolumeName") or ""
        if ref("PersistentVolume", pv) in out or ref("Node", spec.get("nodeName") or "") in out:
            out.add(ref("VolumeAttachment", k))
    return out


def _excluded_directly(snap: Snapshot, scope: Scope, namespaces: set[str]) -> set[str]:
    """Labelled objects and those in an excluded namespace."""
    out: set[str] = set()
    kinds = (("PersistentVolume", snap.pvs), ("PersistentVolumeClaim", snap.pvcs),
             ("Pod", snap.pods), ("Node", snap.nodes), ("VolumeAttachment", snap.vas),
             ("StoragePool", snap.pools), ("StorageAllocation", snap.allocations))
    for kind, objs in kinds:
        for k, o in objs.items():
            if (scope.label in (_md(o).get("labels") or {})
                    or (_md(o).get("namespace") or None) in namespaces):
                out.add(ref(kind, k))
    return out


def _exclude_bound_pairs(snap: Snapshot, namespaces: set[str], out: set[str]) -> None:
    """One pass of claims <-> PVs (and a pool's or record's PV): adds to `out`."""
    for k, pv in snap.pvs.items():
        ck = _claim_ref_key(pv)
        if ck and (ck.split("/", 1)[0] in namespaces
                   or ref("PersistentVolumeClaim", ck) in out):
            out.add(ref("PersistentVolume", k))
        if ref("StoragePool", _pool_of(pv) or "") in out or ref(
                "StorageAllocation", k) in out:
            out.add(ref("PersistentVolume", k))
        if ref("PersistentVolume", k) in out and ck:
            out.add(ref("PersistentVolumeClaim", ck))
    for ck, claim in snap.pvcs.items():
        vn = _spec(claim).get("volumeName")
        if vn and ref("PersistentVolumeClaim", ck) in out:
            out.add(ref("PersistentVolume", vn))


@dataclass
class Report:
    violations: list[Violation]
    excluded: list[Violation]
    counts: dict[str, int]          # objects checked, by kind
    checked: list[str]              # invariant ids run

    @property
    def ok(self) -> bool:
        return not self.violations

    def as_dict(self) -> Body:
        by_inv: dict[str, int] = {}
        for v in self.violations:
            by_inv[v.invariant] = by_inv.get(v.invariant, 0) + 1
        return {"ok": self.ok, "objects": self.counts, "invariants": self.checked,
                "violationCounts": by_inv,
                "violations": [v.as_dict() for v in self.violations],
                "excluded": len(self.excluded)}


def check(snap: Snapshot, limits: Limits | None = None, scope: Scope | None = None,
          only: Iterable[str] | None = None) -> Report:
    """Run every invariant (or those in `only`) over `snap`."""
    limits = limits or Limits()
    scope = scope or Scope()
    skip = excluded_refs(snap, scope)
    ids = list(only) if only else list(INVARIANTS)
    found: list[Violation] = []
    left_out: list[Violation] = []
    for inv in ids:
        _, fn = INVARIANTS[inv]
        for v in fn(snap, limits):
            (left_out if any(r in skip for r in v.refs) else found).append(v)
    counts = {k: len(getattr(snap, k)) for k in ("pvs", "pvcs", "pods", "nodes", "vas",
                                                  "pools", "allocations")}
    return Report(found, left_out, counts, ids)


def group_of(invariant: str) -> str:
    return INVARIANTS[invariant][0]


__all__ = ["EXCLUDE_LABEL", "INVARIANTS", "Limits", "Report", "Scope", "Snapshot",
           "Violation", "age", "check", "excluded_refs", "parse_time"]

