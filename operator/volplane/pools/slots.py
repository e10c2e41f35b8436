"""The pool attacher's device-slot ledger: pure functions over VolumeAttachments.

A pool volume attached to a node holds one device slot of its pool there
(``/dev/volplane/<pool>/slot-<n>``). The ledger is the VolumeAttachments themselves:
the slot is recorded on the attachment (annotations ``volplane.io/pool`` and
``volplane.io/slot``) from the attacher's first write until the attachment is gone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from volplane.objects import md as _md
from volplane.objects import spec as _spec

POOL_DRIVER = "pool.volplane.io"
SLOT_ANNOTATION = "volplane.io/slot"
POOL_ANNOTATION = "volplane.io/pool"
ATTACHER_FINALIZER = "volplane.io/attacher"
DEFAULT_SLOTS_PER_NODE = 16


def pool_of_handle(handle: str | None) -> str | None:
    """The pool of a pool volume: its volumeHandle is ``<pool>/<pv name>``."""
    if not handle or "/" not in handle:
        return None
    pool = handle.split("/", 1)[0]
    return pool or None


def device_path(pool: str, slot: int) -> str:
    return f"/dev/volplane/{pool}/slot-{slot}"


def slot_of(va: Mapping[str, Any]) -> tuple[str, int] | None:
    """(pool, slot) recorded on a VolumeAttachment, None when it holds no slot."""
    ann = _md(va).get("annotations") or {}
    pool, raw = ann.get(POOL_ANNOTATION), ann.get(SLOT_ANNOTATION)
    if not pool or raw is None:
        return None
    try:
        return pool, int(raw)
    except (TypeError, ValueError):
        return None


def slots_in_use(vas: Iterable[Mapping[str, Any]], node: str, pool: str,
                 attacher: str = POOL_DRIVER) -> dict[int, str]:
    """slot -> VolumeAttachment name, for the slots held on (node, pool).

    The ledger is the VolumeAttachments themselves: a slot is held from the write that
    records it on the attachment until the attachment is gone (its finalizer is removed
    only after the slot is released), so a restart rebuilds it exactly."""
    out: dict[int, str] = {}
    for va in vas:
        spec = _spec(va)
        if spec.get("attacher") != attacher or spec.get("nodeName") != node:
            continue
        s = slot_of(va)
        if s is None or s[0] != pool:
            continue
        name = _md(va).get("name", "")
        # Two holders of one slot cannot arise from the attacher (allocation is serialized
        # per node and pool, and write-through); should one appear, the name order decides.
        if s[1] not in out or name < out[s[1]]:
            out[s[1]] = name
    return out


def free_slot(used: Iterable[int], slots: int) -> int | None:
    """The lowest slot in [0, slots) that is not used, None when all are."""
    taken = set(used)
    for i in range(max(0, slots)):
        if i not in taken:
            return i
    return None


def slots_per_node(pool: Mapping[str, Any] | None) -> int:
    try:
        return int(_spec(pool).get("slotsPerNode") or DEFAULT_SLOTS_PER_NODE)
    except (TypeError, ValueError):
        return DEFAULT_SLOTS_PER_NODE


def no_slot_message(node: str, used: int, slots: int, pool: str) -> str:
    return f"node {node} has no free device slot ({used}/{slots} in use on pool {pool})"
