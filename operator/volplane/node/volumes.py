"""The node plugin's decisions: pure functions over requests and observed state.

``ops.py`` gathers (mount table, loop devices, blkid probe), asks these functions what
to do, and does it. Each function answers for one step of one call, so that every call
is idempotent: the same request against the state it left behind decides "nothing to
do" (CSI spec: NodeStage/Publish/Unpublish/Unstage MUST be idempotent).

Errors are ``CsiError(code, message)``, with the codes the CSI spec assigns:
INVALID_ARGUMENT for a missing field, NOT_FOUND for a volume that does not exist,
ALREADY_EXISTS for a path already holding something incompatible, FAILED_PRECONDITION
for a capability the volume does not have or a step called out of order.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from .mounts import MountEntry

DEFAULT_FS = "ext4"
FS_TYPES = ("ext2", "ext3", "ext4", "xfs", "btrfs")
FSTYPE_KEY = "csi.storage.k8s.io/fstype"

# csi.v1 VolumeCapability.AccessMode.Mode values (csi.proto); kept as numbers so that this
# module needs no generated code.
UNKNOWN = 0
SINGLE_NODE_WRITER = 1
SINGLE_NODE_READER_ONLY = 2
MULTI_NODE_READER_ONLY = 3
MULTI_NODE_SINGLE_WRITER = 4
MULTI_NODE_MULTI_WRITER = 5
SINGLE_NODE_SINGLE_WRITER = 6
SINGLE_NODE_MULTI_WRITER = 7
MODE_NAMES = {0: "UNKNOWN", 1: "SINGLE_NODE_WRITER", 2: "SINGLE_NODE_READER_ONLY",
              3: "MULTI_NODE_READER_ONLY", 4: "MULTI_NODE_SINGLE_WRITER",
              5: "MULTI_NODE_MULTI_WRITER", 6: "SINGLE_NODE_SINGLE_WRITER",
              7: "SINGLE_NODE_MULTI_WRITER"}
READ_ONLY_MODES = (SINGLE_NODE_READER_ONLY, MULTI_NODE_READER_ONLY)
SINGLE_NODE_MODES = (SINGLE_NODE_WRITER, SINGLE_NODE_READER_ONLY, SINGLE_NODE_SINGLE_WRITER,
                     SINGLE_NODE_MULTI_WRITER)


class CsiError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code.name}: {message}")


def invalid(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.NOT_FOUND, message)


def already_exists(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.ALREADY_EXISTS, message)


def precondition(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.FAILED_PRECONDITION, message)


@dataclass(frozen=True)
class Capability:
    """A VolumeCapability, reduced to what the node plugin acts on."""

    block: bool
    mode: int
    fs_type: str = DEFAULT_FS
    mount_flags: tuple[str, ...] = ()
    volume_mount_group: str = ""

    @property
    def read_only_mode(self) -> bool:
        return self.mode in READ_ONLY_MODES


def require(value: str, field: str) -> str:
    if not value:
        raise invalid(f"{field} is required")
    return value


def require_abs(path: str, field: str) -> str:
    require(path, field)
    if not os.path.isabs(path):
        raise invalid(f"{field} {path!r} must be an absolute path")
    return os.path.normpath(path)


def parse_capability(cap, volume_context: Mapping[str, str] | None = None) -> Capability:
    """Validate a csi.v1 VolumeCapability message (or None) and reduce it.

    - exactly one access type, block or mount;
    - a known access mode; several nodes writing one filesystem is refused (ext4/xfs
      are not cluster filesystems), as a raw block device it is the application's call;
    - fs_type from the capability, else the volume context's
      ``csi.storage.k8s.io/fstype``, else ext4; one of ext2/ext3/ext4/xfs/btrfs.
    """
    if cap is None:
        raise invalid("volume_capability is required")
    kind = cap.WhichOneof("access_type")
    if kind is None:
        raise invalid("volume_capability needs an access type (block or mount)")
    mode = cap.access_mode.mode if cap.HasField("access_mode") else UNKNOWN
    if mode not in MODE_NAMES or mode == UNKNOWN:
        raise invalid(f"volume_capability.access_mode {MODE_NAMES.get(mode, mode)} is not "
                      "supported")
    if kind == "block":
        return Capability(block=True, mode=mode)
    if mode in (MULTI_NODE_SINGLE_WRITER, MULTI_NODE_MULTI_WRITER):
        raise precondition(f"access mode {MODE_NAMES[mode]} on a filesystem volume: pool "
                           "volumes carry local filesystems, which one node at a time may "
                           "write (use volumeMode: Block to share the raw device)")
    m = cap.mount
    fs = m.fs_type or (volume_context or {}).get(FSTYPE_KEY) or DEFAULT_FS
    if fs not in FS_TYPES:
        raise invalid(f"volume_capability.mount.fs_type {fs!r} is not one of "
                      f"{', '.join(FS_TYPES)}")
    flags = []
    for flag in m.mount_flags:
        for f in flag.split(","):
            f = f.strip()
            if f:
                flags.append(f)
    return Capability(block=False, mode=mode, fs_type=fs, mount_flags=tuple(flags),
                      volume_mount_group=m.volume_mount_group)


# --- NodeStageVolume ------------------------------------------------------------------------

FORMAT = "format"
MOUNT = "mount"


def format_decision(probe: Mapping[str, str], fs_type: str, read_only: bool) -> str:
    """Given `blkid -p` of the device: FORMAT (blank), MOUNT (holds `fs_type`), or an error.

    Never formats a device that holds anything blkid recognises: another filesystem, a
    partition table, RAID/LVM signatures."""
    found = probe.get("TYPE")
    if found:
        if found == fs_type:
            return MOUNT
        raise precondition(f"the volume already holds a {found} filesystem, not {fs_type}; "
                           "it is left untouched (set the PV's csi.fsType to match)")
    if probe.get("PTTYPE"):
        raise precondition(f"the volume holds a {probe['PTTYPE']} partition table and no "
                           "filesystem; refusing to format it")
    if probe:
        raise precondition(f"the volume holds data blkid recognises ({dict(probe)}); "
                           "refusing to format it")
    if read_only:
        raise precondition("the volume has no filesystem yet and is asked for read-only: "
                           "it cannot be formatted")
    return FORMAT


def staged_check(entry: MountEntry | None, device: tuple[int, int], staging: str,
                 fs_type: str) -> bool:
    """Is the staging path already the volume's mount? True: done. False: mount it.
    Something else mounted there, or this volume with another filesystem type:
    ALREADY_EXISTS."""
    if entry is None:
        return False
    if entry.device == device and entry.root == "/":
        if entry.fs_type != fs_type:
            raise already_exists(f"staging_target_path {staging} already has this volume "
                                 f"mounted as {entry.fs_type}, asked {fs_type}")
        return True
    raise already_exists(f"staging_target_path {staging} already has {entry.source} "
                         f"({entry.fs_type}) mounted, not this volume")


def stage_mount_options(cap: Capability) -> list[str]:
    opts = list(cap.mount_flags)
    if cap.read_only_mode and "ro" not in opts:
        opts.append("ro")
    return opts


# --- NodePublishVolume ----------------------------------------------------------------------


def published_check(target_entry: MountEntry | None, staging_entry: MountEntry,
                    target: str, read_only: bool) -> bool:
    """Is the target already this volume's bind mount, with the asked read-only flag?
    True: done. False: bind it. Anything else there: ALREADY_EXISTS."""
    if target_entry is None:
        return False
    if target_entry.device != staging_entry.device or target_entry.root != staging_entry.root:
        raise already_exists(f"target_path {target} already has {target_entry.source} "
                             f"({target_entry.fs_type}:{target_entry.root}) mounted")
    if target_entry.read_only != read_only:
        have = "read-only" if target_entry.read_only else "read-write"
        raise already_exists(f"target_path {target} is already published {have}, asked "
                             f"{'read-only' if read_only else 'read-write'}")
    return True


def publish_read_only(cap: Capability, readonly_flag: bool) -> bool:
    return readonly_flag or cap.read_only_mode


def block_published_check(target_rdev: tuple[int, int] | None, mounted: bool,
                          wanted: set[tuple[int, int]], target: str) -> bool:
    """Block publish: the target file is a bind mount of one of the volume's loop devices?
    `target_rdev`: the device the target stats as (None if not a block device)."""
    if not mounted:
        return False
    if target_rdev is not None and target_rdev in wanted:
        return True
    raise already_exists(f"target_path {target} already has another device or filesystem "
                         "mounted")


# --- NodeExpandVolume -----------------------------------------------------------------------


def expand_target(required: int, limit: int, current: int) -> int:
    """The size to grow the backing file to. 0 required: as it is (refresh only)."""
    if required < 0 or limit < 0:
        raise invalid("capacity_range bytes must not be negative")
    if limit and required > limit:
        raise CsiError(grpc.StatusCode.OUT_OF_RANGE,
                       f"required_bytes {required} exceeds limit_bytes {limit}")
    if limit and current > limit:
        raise CsiError(grpc.StatusCode.OUT_OF_RANGE,
                       f"the volume is already {current} bytes, over limit_bytes {limit}")
    return max(required, current)
