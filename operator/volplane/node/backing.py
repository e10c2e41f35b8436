"""Backing storage of pool volumes: pure functions shared by the controller and the node.

A StoragePool with ``spec.backing: {type: File, path: DIR}`` keeps each of its volumes as
a sparse file ``DIR/<volume>.img``, where ``<volume>`` is the second half of the PV's
volume handle ``<pool>/<volume>`` (the PV name for provisioned volumes). ``DIR`` defaults
to ``/var/lib/volplane/pools/<pool>``. The file is attached on a node as a loop device by
the CSI node plugin; the node agent creates it, grows it and deletes it (see
``plan``). A pool without ``spec.backing`` works as before: volumes are ledger entries
and device slots only, with no bytes on any node.

Nothing here performs I/O.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DRIVER = "pool.volplane.io"
FILE = "File"
BACKING_TYPES = (FILE,)
DEFAULT_ROOT = "/var/lib/volplane"
FILE_SUFFIX = ".img"

# Keys of the VolumeAttachment's attachmentMetadata (= the CSI publish context).
PC_BACKING_TYPE = "backingType"
PC_BACKING_FILE = "backingFile"

# The StorageAllocation annotation the provisioner sets when a Retain volume's PV is
# deleted: the bytes (and their allocation) stay until an administrator deletes it.
RETAINED_ANNOTATION = "volplane.io/retained"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


class BackingError(ValueError):
    """A bad backing description or volume handle; `field` names what is wrong."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class Backing:
    type: str
    path: str       # the pool's directory (absolute, normalized)


def _spec(obj: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return (obj or {}).get("spec") or {}


def _name(obj: Mapping[str, Any] | None) -> str:
    return ((obj or {}).get("metadata") or {}).get("name") or ""


def default_path(pool_name: str, root: str = DEFAULT_ROOT) -> str:
    return posixpath.join(root, "pools", pool_name)


def pool_backing(pool: Mapping[str, Any] | None) -> Backing | None:
    """The pool's backing, None when it has none; BackingError when it is malformed
    (the CRD rejects all of these; this guards against an older CRD or a direct write)."""
    raw = _spec(pool).get("backing")
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise BackingError("spec.backing", "must be an object")
    type_ = raw.get("type")
    if type_ not in BACKING_TYPES:
        raise BackingError("spec.backing.type",
                           f"{type_!r} is not one of {', '.join(BACKING_TYPES)}")
    path = raw.get("path") or default_path(_name(pool))
    if not isinstance(path, str) or not path.startswith("/"):
        raise BackingError("spec.backing.path", f"{path!r} is not an absolute path")
    if ".." in path.split("/"):
        raise BackingError("spec.backing.path", f"{path!r} must not contain '..'")
    return Backing(type_, posixpath.normpath(path))


def split_handle(handle: str) -> tuple[str, str]:
    """(pool, volume) of a volume handle "<pool>/<volume>"; BackingError if malformed."""
    pool, sep, name = (handle or "").partition("/")
    if not sep or not pool or not name:
        raise BackingError("volume_id", f"{handle!r} is not <pool>/<volume>")
    if not _NAME_RE.match(name) or name.endswith(FILE_SUFFIX):
        raise BackingError("volume_id", f"volume name {name!r} must be 1-253 of [A-Za-z0-9._-], "
                                        "starting with a letter or digit")
    return pool, name


def file_name(volume: str) -> str:
    return volume + FILE_SUFFIX


def volume_of_file(name: str) -> str | None:
    """The volume a file in a pool directory belongs to, None for files not ours."""
    if not name.endswith(FILE_SUFFIX):
        return None
    vol = name[: -len(FILE_SUFFIX)]
    return vol if _NAME_RE.match(vol) else None


def backing_file(backing: Backing, volume: str) -> str:
    return posixpath.join(backing.path, file_name(volume))


def publish_context(pool: Mapping[str, Any] | None, handle: str) -> dict[str, str]:
    """What the pool attacher adds to attachmentMetadata so the node plugin finds the
    volume's bytes. Empty for pools without (or with a malformed) backing."""
    try:
        backing = pool_backing(pool)
        if backing is None:
            return {}
        _, volume = split_handle(handle)
    except BackingError:
        return {}
    return {PC_BACKING_TYPE: backing.type, PC_BACKING_FILE: backing_file(backing, volume)}


def within(path: str, root: str) -> bool:
    """Is `path` (normalized) inside directory `root`? Lexical: callers also resolve links."""
    path, root = posixpath.normpath(path), posixpath.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def reported_capacity(pool: Mapping[str, Any] | None) -> int | None:
    """status.backing.capacityBytes as reported by a node agent, for pools with a backing.

    The pool provisioner counts min(spec.capacity, this) as the pool's capacity. None
    when the pool has no backing or no report yet (then spec.capacity alone counts)."""
    if _spec(pool).get("backing") is None:
        return None
    report = ((pool or {}).get("status") or {}).get("backing") or {}
    value = report.get("capacityBytes")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


# --- the node agent's plan ---------------------------------------------------------------


@dataclass(frozen=True)
class FileState:
    size: int           # apparent size (bytes)
    allocated: int      # bytes really used on disk (st_blocks * 512)
    attached: bool = False  # attached to a loop device on this host


@dataclass(frozen=True)
class Action:
    kind: str           # "create" | "grow" | "delete"
    pool: str
    volume: str
    path: str
    size: int = 0
    reason: str = ""


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (pool, field, msg)
    dirs: dict[str, Backing] = field(default_factory=dict)  # pool -> backing to manage

    def of(self, kind: str) -> list[Action]:
        return [a for a in self.actions if a.kind == kind]


def handles_in_use(pvs: Iterable[Mapping[str, Any]]) -> set[str]:
    """The volume handles of every PV of our driver (bound, released or being deleted)."""
    out = set()
    for pv in pvs:
        csi = _spec(pv).get("csi") or {}
        if csi.get("driver") == DRIVER and csi.get("volumeHandle"):
            out.add(csi["volumeHandle"])
    return out


def plan(pools: Mapping[str, Mapping[str, Any]], allocations: Mapping[str, Mapping[str, Any]],
         pvs: Iterable[Mapping[str, Any]], files: Mapping[str, Mapping[str, FileState]],
         reaches: Callable[[Mapping[str, Any]], bool], root: str = DEFAULT_ROOT) -> Plan:
    """What the node agent must do to make the backing files match the records.

    `pools`, `allocations`: by name. `files`: pool name -> file name -> FileState, as found
    in each pool's directory. `reaches(pool) -> bool`: does the pool reach this node.

    - an allocation of a File-backed pool this node reaches whose file is missing: create
      it (sparse, at the allocation's size); smaller than the allocation: grow it.
      Files never shrink (allocations only grow).
    - a ``<volume>.img`` file with no allocation record and no PV whose handle names it:
      a delete *candidate*. The caller confirms with the API server and a grace period
      before deleting (a cache can lag); a file attached to a loop device is never one.
    - a pool whose backing is malformed or outside `root` (not mounted into the node
      plugin): a problem naming the field, and nothing is done for it.
    """
    out = Plan()
    in_use = handles_in_use(pvs)
    by_pool = _sizes_by_pool(allocations)
    for pool_name in sorted(pools):
        pool = pools[pool_name]
        try:
            backing = pool_backing(pool)
        except BackingError as e:
            out.problems.append((pool_name, e.field, e.message))
            continue
        if backing is None or not reaches(pool):
            continue
        if not within(backing.path, root):
            out.problems.append((pool_name, "spec.backing.path",
                                 f"{backing.path} is outside {root}, the directory the node "
                                 "plugin can reach"))
            continue
        out.dirs[pool_name] = backing
        have = files.get(pool_name) or {}
        wanted = _creates_and_grows(out, pool_name, backing, by_pool.get(pool_name, ()), have)
        _deletes(out, pool_name, backing, have, wanted, in_use)
    return out


def _sizes_by_pool(allocations: Mapping[str, Mapping[str, Any]]
                   ) -> dict[str, list[tuple[str, int]]]:
    """pool -> (volume, sizeBytes) of its allocations (malformed records skipped)."""
    by_pool: dict[str, list[tuple[str, int]]] = {}
    for name, rec in allocations.items():
        spec = _spec(rec)
        try:
            by_pool.setdefault(spec["pool"], []).append((name, int(spec["sizeBytes"])))
        except (KeyError, TypeError, ValueError):
            continue
    return by_pool


def _creates_and_grows(out: Plan, pool_name: str, backing: Backing,
                       sizes: Iterable[tuple[str, int]],
                       have: Mapping[str, FileState]) -> set[str]:
    """The create and grow actions of one pool's allocations; the file names they want."""
    wanted = set()
    for volume, size in sorted(sizes):
        if not _NAME_RE.match(volume):
            continue
        fname = file_name(volume)
        wanted.add(fname)
        path = backing_file(backing, volume)
        st = have.get(fname)
        if st is None:
            out.actions.append(Action("create", pool_name, volume, path, size,
                                      f"allocation {volume} has no backing file"))
        elif st.size < size:
            out.actions.append(Action("grow", pool_name, volume, path, size,
                                      f"allocation {volume} is {size} bytes, its file "
                                      f"{st.size}"))
    return wanted


def _deletes(out: Plan, pool_name: str, backing: Backing, have: Mapping[str, FileState],
             wanted: set[str], in_use: set[str]) -> None:
    """Delete candidates: volume files no allocation wants, no PV names, no loop holds."""
    for fname in sorted(have):
        volume = volume_of_file(fname)
        if volume is None or fname in wanted:
            continue
        if f"{pool_name}/{volume}" in in_use or have[fname].attached:
            continue
        out.actions.append(Action("delete", pool_name, volume,
                                  os.path.join(backing.path, fname), 0,
                                  f"no StorageAllocation {volume} and no PV uses "
                                  f"{pool_name}/{volume}"))


def capacity_report(free: int, used_by_files: int) -> int:
    """The capacity a pool's backing really offers to volplane: what is free on its
    filesystem plus what its own files already occupy (sparse files count as they fill)."""
    return max(0, free) + max(0, used_by_files)


def report_differs(current: Mapping[str, Any] | None, desired: Mapping[str, Any],
                   *, slack: int = 64 << 20) -> bool:
    """Write a new capacity report only on a real change: path/type/message changed, or a
    number moved by more than max(`slack`, 1%) (files fill, other tenants write)."""
    current = current or {}
    for k in ("type", "path", "message"):
        if current.get(k) != desired.get(k):
            return True
    for k in ("capacityBytes", "freeBytes", "usedBytes"):
        a, b = current.get(k), desired.get(k)
        if not isinstance(a, int) or not isinstance(b, int):
            if a != b:
                return True
            continue
        if abs(a - b) > max(slack, b // 100):
            return True
    return False


# --- expansion handed to the node ------------------------------------------------------------

NODE_RESIZE_PENDING = "NodeResizePending"
FS_RESIZE_PENDING = "FileSystemResizePending"
FS_RESIZE_REQUIRED = "FileSystemResizeRequired"  # the event external-resizer posts
FS_RESIZE_MESSAGE = ("Waiting for user to (re-)start a pod to finish file system resize of "
                     "volume on node.")


def has_backing(pool: Mapping[str, Any] | None) -> bool:
    """Do the pool's volumes hold bytes on nodes?"""
    return _spec(pool).get("backing") is not None


def needs_node_expansion(pool: Mapping[str, Any] | None) -> bool:
    """Volumes with bytes on nodes finish an expansion there (NodeExpandVolume grows the
    loop device and the filesystem). Pools without backing have nothing to grow."""
    return has_backing(pool)


RECYCLE_REFUSED = ("Recycle is not supported for volumes of a StoragePool with "
                   "spec.backing: their bytes would reach the next claim unscrubbed "
                   "(use reclaimPolicy Delete or Retain)")


def node_resize_pending(claim: Mapping[str, Any], size: int,
                        parse: Callable[[str], int]) -> bool:
    """Has the claim already been handed to the kubelet for `size` bytes?"""
    status = claim.get("status") or {}
    if (status.get("allocatedResourceStatuses") or {}).get("storage") not in (
            NODE_RESIZE_PENDING, "NodeResizeInProgress"):
        return False
    try:
        return parse(((status.get("allocatedResources") or {}).get("storage")) or "0") >= size
    except ValueError:
        return False


def node_resize_status(size_quantity: str, now: str) -> dict[str, Any]:
    """The claim status external-resizer writes when the node must finish the resize
    (markPVCAsFSResizeRequired): capacity stays as it is until the kubelet has run
    NodeExpandVolume; it then sets it and clears both markers."""
    return {"allocatedResources": {"storage": size_quantity},
            "allocatedResourceStatuses": {"storage": NODE_RESIZE_PENDING},
            "conditions": [{"type": FS_RESIZE_PENDING, "status": "True",
                            "lastTransitionTime": now, "message": FS_RESIZE_MESSAGE}]}
