"""The Attach/Detach controller's actual state of world: pure functions over cached
objects.

Actual state of world (ASW)
---------------------------
VolumeAttachments are the durable record of attachment: every attach the
controller asks for is one, and an attacher removes its finalizer only once
the volume is detached. So the ASW is derived from them, per (volume, node):
ATTACHING (exists, not yet ``status.attached``), ATTACHED, DETACHING (being
deleted). The volume (``vid``) is the unique volume name of the attachment's PV
(upstream's identity), or the PV's name once the PV is gone.
``node.status.volumesAttached`` is the controller's report derived
from the ASW (ATTACHED entries the controller has not started to detach);
its entries (and ``volumesInUse``) also let the ASW name a volume whose PV is
already gone, by hashing them to VolumeAttachment names.

FlexVolume attachments have no API object. The controller keeps them in memory
(``Actual`` entries keyed by (unique name, node), ``va_name`` empty), and the one
durable record is its own report, ``node.status.volumesAttached``: after a restart
``flex_actual_from_nodes`` rebuilds them from every entry that is not a CSI volume
(upstream populateActualStateOfWorld), and the controller verifies them with the
driver's ``isattached`` (upstream's VolumesAreAttached sync).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from volplane.objects import md as _md
from volplane.objects import spec as _spec
from volplane.objects import status as _status

from .desired import flex_driver, multi_attach_allowed, volume_ref
from .names import parse_unique_volume_name, volume_attachment_name


# -- actual state --------------------------------------------------------------------------
class AState(StrEnum):
    ATTACHING = "attaching"
    ATTACHED = "attached"
    DETACHING = "detaching"


@dataclass(frozen=True)
class Actual:
    """One VolumeAttachment, as the reconciler sees it."""
    pv_name: str
    node: str
    va_name: str
    attacher: str
    state: AState
    unique_name: str | None = None      # None: the PV is gone and no node entry names it
    multi_attach: bool = True           # unknown (PV gone) never blocks another node
    device_path: str = ""
    attach_error: str | None = None
    detach_error: str | None = None
    vid: str = ""                       # volume identity: unique name of the PV, else PV name

    @property
    def key(self) -> tuple[str, str]:
        return (self.vid or self.pv_name, self.node)


ASW = dict[tuple[str, str], Actual]


def _names_by_attachment(node: str, node_obj: Mapping[str, Any] | None) -> dict[str, str]:
    """VolumeAttachment name -> unique volume name, for every CSI volume the node lists
    (volumesAttached and volumesInUse): how a VA whose PV is gone gets its name back."""
    st = _status(node_obj)
    names = [e.get("name") for e in st.get("volumesAttached") or ()]
    names += list(st.get("volumesInUse") or ())
    out = {}
    for n in names:
        parsed = parse_unique_volume_name(n or "")
        if parsed:
            out[volume_attachment_name(parsed[1], parsed[0], node)] = n
    return out


def actual_of(va: Mapping[str, Any], *, pvs: Mapping[str, Mapping[str, Any]],
              nodes: Mapping[str, Mapping[str, Any]]) -> Actual | None:
    """The ASW entry of one VolumeAttachment (None: not a PV attachment)."""
    spec = _spec(va)
    pv_name = (spec.get("source") or {}).get("persistentVolumeName")
    node = spec.get("nodeName")
    if not pv_name or not node:
        return None
    md = _md(va)
    st = _status(va)
    if md.get("deletionTimestamp"):
        state = AState.DETACHING
    elif st.get("attached"):
        state = AState.ATTACHED
    else:
        state = AState.ATTACHING
    pv = pvs.get(pv_name)
    v = volume_ref(pv) if pv is not None else None
    unique: str | None
    if v is not None:
        unique, multi, vid = v.unique_name, v.multi_attach, v.unique_name
    else:
        vid = pv_name
        by_va = _names_by_attachment(node, nodes.get(node))
        unique, multi = by_va.get(str(md.get("name"))), True
    meta = st.get("attachmentMetadata") or {}
    return Actual(
        pv_name=pv_name, node=node, va_name=md.get("name", ""),
        attacher=spec.get("attacher") or "", state=state, unique_name=unique,
        multi_attach=multi, device_path=meta.get("devicePath") or "",
        attach_error=(st.get("attachError") or {}).get("message"),
        detach_error=(st.get("detachError") or {}).get("message"), vid=vid)


def build_asw(vas: Iterable[Mapping[str, Any]], *, pvs: Mapping[str, Mapping[str, Any]],
              nodes: Mapping[str, Mapping[str, Any]]) -> ASW:
    """The actual state of world from VolumeAttachments. Should two attachments exist for
    one (volume, node) (another tool made one under another name), the upstream-named
    one counts; the reconciler never creates a second."""
    out: ASW = {}
    for va in vas:
        a = actual_of(va, pvs=pvs, nodes=nodes)
        if a is None:
            continue
        prev = out.get(a.key)
        if prev is not None:
            pv = pvs.get(a.pv_name)
            v = volume_ref(pv) if pv else None
            if v is None or prev.va_name == v.attachment_name(a.node):
                continue
        out[a.key] = a
    return out


def flex_actual_from_nodes(nodes: Mapping[str, Mapping[str, Any]],
                           pvs: Mapping[str, Mapping[str, Any]],
                           ignore: Iterable[str] = ()) -> ASW:
    """The flex entries of the actual state, rebuilt from every node's
    ``status.volumesAttached``: each entry whose name is not a CSI unique name and splits
    as ``<vendor>/<driver>/<volume>`` is ATTACHED with its devicePath. Entries of plugins
    in `ignore` (names of other non-flex plugins) are left out. An entry whose driver is
    not installed (now) is kept too: it stays reported until a detach succeeds. A
    volume named like a PV of that driver forbids multi-attach as that PV does."""
    skip = set(ignore)
    out: ASW = {}
    for node_name, node in nodes.items():
        for e in _status(node).get("volumesAttached") or ():
            name = str(e.get("name") or "")
            if parse_unique_volume_name(name) is not None:
                continue
            parts = name.split("/", 2)
            if len(parts) != 3 or not all(parts) or f"{parts[0]}/{parts[1]}" in skip:
                continue
            driver = f"{parts[0]}/{parts[1]}"
            pv = pvs.get(parts[2])
            multi = True
            if pv is not None and flex_driver(_spec(pv)) == driver:
                multi = multi_attach_allowed(pv)
            out[(name, node_name)] = Actual(
                pv_name=name, node=node_name, va_name="", attacher=driver,
                state=AState.ATTACHED, unique_name=name, multi_attach=multi,
                device_path=str(e.get("devicePath") or ""))
    return out
