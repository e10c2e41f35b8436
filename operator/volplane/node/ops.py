"""The node operations: gather from the system, decide (volumes.py), act (system.py).

A pool volume on a node, from the bottom up:

    <pool dir>/<volume>.img     sparse file (created by the node agent, agent.py)
    /dev/loopN                  NodeStageVolume: `losetup --find` (reused if attached)
    <staging path>              NodeStageVolume: mkfs if blank, mount (Filesystem mode)
    <target path>               NodePublishVolume: bind mount of the staging path, or
                                (Block mode) of /dev/loopN onto a file

Every operation reads the current state first and does only the missing steps, so a
repeated call, or one after a crash half-way, converges. What the next steps need and
cannot see in the mount table (the backing file, the filesystem type, Block or not) is
kept in a small per-volume state file written *before* the first change (an intent
record), so NodeUnstageVolume always finds the loop devices to detach.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from .. import logs
from . import backing as B
from .mounts import find_mount, mounts_of_source
from .system import CommandError, System
from .volumes import (
    FORMAT,
    Capability,
    CsiError,
    already_exists,
    block_published_check,
    expand_target,
    format_decision,
    invalid,
    not_found,
    precondition,
    publish_read_only,
    published_check,
    stage_mount_options,
    staged_check,
)

log = logs.get("node")

EXT = ("ext2", "ext3", "ext4")
GROW_SLACK = 1 << 20  # grow an ext filesystem offline when its device is this much larger
DEFAULT_STATE_DIR = "/var/lib/kubelet/plugins/pool.volplane.io/volumes"


class StateStore:
    """One small JSON file per staged volume, written atomically (write, fsync, rename)."""

    def __init__(self, directory: str):
        self.dir = directory

    def path(self, volume_id: str) -> str:
        return os.path.join(self.dir, urllib.parse.quote(volume_id, safe="") + ".json")

    def load(self, volume_id: str) -> dict | None:
        try:
            with open(self.path(volume_id)) as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("unreadable volume state ignored", volume=volume_id, error=str(e))
            return None
        return data if isinstance(data, dict) else None

    def save(self, volume_id: str, data: dict) -> None:
        os.makedirs(self.dir, exist_ok=True)
        path = self.path(volume_id)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def delete(self, volume_id: str) -> None:
        try:
            os.unlink(self.path(volume_id))
        except FileNotFoundError:
            pass


@dataclass
class VolumeStats:
    block: bool
    total: int
    available: int = 0
    used: int = 0
    inodes_total: int = 0
    inodes_free: int = 0
    inodes_used: int = 0
    abnormal: bool = False
    message: str = "volume is healthy"


class NodeOps:
    def __init__(self, system: System, state: StateStore, backing_root: str = B.DEFAULT_ROOT,
                 pool_backing=None):
        self.sys = system
        self.state = state
        self.backing_root = backing_root
        # pool name -> Backing | None, from the node agent's cache: the fallback for an
        # attachment made before its pool had a backing (no backingFile in its metadata).
        self.pool_backing = pool_backing

    # -- where the bytes are ------------------------------------------------------------------
    def backing_file(self, volume_id: str, publish_context: Mapping[str, str] | None) -> str:
        try:
            pool, volume = B.split_handle(volume_id)
        except B.BackingError as e:
            raise not_found(f"no pool volume {volume_id!r}: {e.message}") from None
        ctx = publish_context or {}
        path = ctx.get(B.PC_BACKING_FILE) or (self.state.load(volume_id) or {}).get("backingFile")
        if not path and self.pool_backing is not None:
            found = self.pool_backing(pool)
            path = B.backing_file(found, volume) if found is not None else None
        if not path:
            raise precondition(
                f"volume {volume_id} has no bytes on nodes: its StoragePool {pool} has no "
                "spec.backing (the attachment's metadata has no backingFile)")
        kind = ctx.get(B.PC_BACKING_TYPE, B.FILE)
        if kind != B.FILE:
            raise precondition(f"volume {volume_id}: backing type {kind!r} is not supported "
                               "by this node plugin")
        if os.path.basename(path) != B.file_name(volume) or not os.path.isabs(path):
            raise invalid(f"publish context backingFile {path!r} is not volume {volume}'s file")
        real = os.path.realpath(path)
        root = os.path.realpath(self.backing_root)
        if not B.within(real, root):
            raise precondition(f"backing file {path} is outside {self.backing_root}, the "
                               "directory this node plugin serves (StoragePool "
                               f"{pool} spec.backing.path)")
        if not os.path.isfile(real):
            raise not_found(f"backing file {path} of volume {volume_id} does not exist (the "
                            "node agent creates it once the StorageAllocation exists)")
        return path

    def _rw_loop(self, path: str) -> str:
        """The read-write loop device of `path`, attached if there is none."""
        loops = self.sys.loops_of(path)
        rw = [lo for lo in loops if not lo.read_only]
        if rw:
            return rw[0].name
        dev = (self.sys.attach_new(path) if loops else self.sys.attach(path))
        log.info("loop device attached", file=path, device=dev)
        return dev

    # -- NodeStageVolume ------------------------------------------------------------------------
    def stage(self, volume_id: str, staging: str, cap: Capability,
              publish_context: Mapping[str, str] | None) -> None:
        path = self.backing_file(volume_id, publish_context)
        rec = {"volumeId": volume_id, "backingFile": path, "block": cap.block,
               "fsType": None if cap.block else cap.fs_type, "stagingPath": staging,
               "readOnly": cap.read_only_mode, "mountFlags": list(cap.mount_flags)}
        if self.state.load(volume_id) != rec:
            self.state.save(volume_id, rec)  # intent first: unstage can always find the file
        dev = self._rw_loop(path)
        if cap.block:
            return
        if staged_check(find_mount(self.sys.mountinfo(), staging), self.sys.rdev(dev),
                        staging, cap.fs_type):
            return
        if format_decision(self.sys.blkid(dev), cap.fs_type, cap.read_only_mode) == FORMAT:
            log.info("formatting", volume=volume_id, device=dev, fs_type=cap.fs_type)
            self.sys.mkfs(dev, cap.fs_type)
        elif cap.fs_type in EXT and not cap.read_only_mode:
            self._grow_ext_offline(volume_id, dev)
        os.makedirs(staging, exist_ok=True)
        self.sys.mount(dev, staging, cap.fs_type, stage_mount_options(cap))
        log.info("staged", volume=volume_id, device=dev, path=staging)

    def _grow_ext_offline(self, volume_id: str, dev: str) -> None:
        """The device grew while the volume was not mounted (expansion of an unused
        volume, or an online resize the kernel refused): grow the filesystem before
        mounting it. Offline resize2fs needs no CAP_SYS_RESOURCE; online resize does."""
        have, want = self.sys.ext_fs_size(dev), self.sys.device_size(dev)
        if want - have >= GROW_SLACK:
            log.info("growing filesystem offline", volume=volume_id, device=dev,
                     fs_bytes=have, device_bytes=want)
            self.sys.grow_ext_offline(dev)

    # -- NodeUnstageVolume ----------------------------------------------------------------------
    def unstage(self, volume_id: str, staging: str) -> None:
        rec = self.state.load(volume_id) or {}
        path = rec.get("backingFile")
        entries = self.sys.mountinfo()
        se = find_mount(entries, staging)
        if path is None and se is not None and se.source.startswith("/dev/loop"):
            info = self.sys.loop_info(se.source)  # no state (lost): learn it from the mount
            path = info.back_file if info is not None else None
        loops = []
        if path:
            if os.path.exists(path):
                loops = self.sys.loops_of(path)
            else:
                loops = [lo for lo in self.sys.all_loops() if lo.back_file == path]
        for lo in loops:  # before any change: refuse while a publish still uses it
            self._check_unused(lo.name, entries, volume_id, staging)
        while find_mount(entries, staging) is not None:
            self.sys.umount(staging)
            entries = self.sys.mountinfo()
        for lo in loops:
            self.sys.detach(lo.name)
            log.info("loop device detached", volume=volume_id, device=lo.name)
        self.state.delete(volume_id)

    def _check_unused(self, device: str, entries, volume_id: str, staging: str) -> None:
        try:
            rdev = self.sys.rdev(device)
        except Exception:  # gone already: nothing can be using it
            return
        name = os.path.basename(device)
        busy = [e.mount_point for e in mounts_of_source(entries, rdev)
                if e.mount_point != staging]
        busy += [e.mount_point for e in entries
                 if e.fs_type in ("devtmpfs", "tmpfs") and os.path.basename(e.root) == name]
        if busy:
            raise precondition(f"volume {volume_id} is still published at {', '.join(busy)}: "
                               "NodeUnpublishVolume first")

    # -- NodePublishVolume ----------------------------------------------------------------------
    def publish(self, volume_id: str, staging: str, target: str, cap: Capability,
                readonly: bool, publish_context: Mapping[str, str] | None) -> None:
        ro = publish_read_only(cap, readonly)
        if cap.block:
            return self._publish_block(volume_id, target, ro, publish_context)
        entries = self.sys.mountinfo()
        se = find_mount(entries, staging)
        if se is None:
            raise precondition(f"volume {volume_id} is not staged at {staging}: "
                               "NodeStageVolume first")
        if published_check(find_mount(entries, target), se, target, ro):
            return
        os.makedirs(target, exist_ok=True)
        self.sys.bind(staging, target, read_only=ro, flags=cap.mount_flags)
        log.info("published", volume=volume_id, target=target, read_only=ro)

    def _publish_block(self, volume_id: str, target: str, ro: bool,
                       publish_context: Mapping[str, str] | None) -> None:
        path = self.backing_file(volume_id, publish_context)
        loops = self.sys.loops_of(path)
        if not any(not lo.read_only for lo in loops):
            raise precondition(f"volume {volume_id} is not staged on this node (no loop "
                               "device): NodeStageVolume first")
        mine = [lo for lo in loops if lo.read_only == ro]
        wanted = {self.sys.rdev(lo.name) for lo in mine}
        entries = self.sys.mountinfo()
        te = find_mount(entries, target)
        target_rdev = None
        try:
            st = os.stat(target)
            if stat.S_ISBLK(st.st_mode):
                target_rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        except FileNotFoundError:
            pass
        if block_published_check(target_rdev, te is not None, wanted, target):
            return
        # A read-only publish gets a read-only loop device of its own: a read-only mount of
        # a device node does not stop writes through it.
        dev = mine[0].name if mine else self.sys.attach_new(path, read_only=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.isdir(target):
            raise already_exists(f"target_path {target} is a directory; a Block volume is "
                                 "published onto a file")
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o660))
        self.sys.bind(dev, target)
        log.info("published", volume=volume_id, target=target, device=dev, read_only=ro)

    # -- NodeUnpublishVolume --------------------------------------------------------------------
    def unpublish(self, volume_id: str, target: str) -> None:
        entries = self.sys.mountinfo()
        while find_mount(entries, target) is not None:
            self.sys.umount(target)
            entries = self.sys.mountinfo()
        try:
            self.sys.remove_path(target)
        except OSError as e:
            if e.errno == errno.ENOTEMPTY:
                raise precondition(f"target_path {target} is not a mount point and not "
                                   "empty: left untouched") from None
            raise
        log.info("unpublished", volume=volume_id, target=target)

    # -- NodeExpandVolume -----------------------------------------------------------------------
    def expand(self, volume_id: str, volume_path: str, required: int, limit: int) -> int:
        rec = self.state.load(volume_id)
        if rec is None:
            raise not_found(f"volume {volume_id} is not staged on this node")
        if not os.path.exists(volume_path):
            raise not_found(f"volume_path {volume_path} does not exist")
        path = rec["backingFile"]
        if not os.path.isfile(path):
            raise not_found(f"backing file {path} of volume {volume_id} does not exist")
        want = expand_target(required, limit, os.stat(path).st_size)
        self.sys.grow_file(path, want)
        loops = self.sys.loops_of(path)
        rw = [lo for lo in loops if not lo.read_only]
        if not rw:
            raise precondition(f"volume {volume_id} is not attached on this node")
        for lo in loops:
            self.sys.refresh(lo.name)
        dev = rw[0].name
        if not rec.get("block"):
            staging = rec.get("stagingPath") or ""
            entry = find_mount(self.sys.mountinfo(), staging)
            if entry is None:
                raise precondition(f"volume {volume_id} is not mounted at {staging}")
            fs_type = rec.get("fsType") or entry.fs_type
            try:
                self.sys.resize_fs(dev, staging, fs_type)
            except CommandError as e:
                if fs_type in EXT and "Permission denied" in e.stderr:
                    raise precondition(
                        f"the kernel refused to grow the mounted {fs_type} filesystem of "
                        f"{volume_id} online (the node plugin lacks CAP_SYS_RESOURCE); the "
                        "device has grown, and the filesystem grows offline the next time "
                        "the volume is staged (restart the pod)") from None
                raise
        size = self.sys.device_size(dev)
        log.info("expanded", volume=volume_id, bytes=size)
        return size

    # -- NodeGetVolumeStats ---------------------------------------------------------------------
    def stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        try:
            st = os.stat(volume_path)
        except FileNotFoundError:
            raise not_found(f"volume_path {volume_path} does not exist") from None
        rec = self.state.load(volume_id) or {}
        entries = self.sys.mountinfo()
        entry = find_mount(entries, volume_path)
        problems = []
        if entry is None:
            problems.append(f"{volume_path} is not mounted")
        path = rec.get("backingFile")
        if path and not os.path.isfile(path):
            problems.append(f"backing file {path} is missing")
        if stat.S_ISBLK(st.st_mode):
            out = VolumeStats(block=True, total=self.sys.device_size(volume_path))
        else:
            vfs = os.statvfs(volume_path)
            out = VolumeStats(
                block=False, total=vfs.f_blocks * vfs.f_frsize,
                available=vfs.f_bavail * vfs.f_frsize,
                used=(vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize,
                inodes_total=vfs.f_files, inodes_free=vfs.f_favail,
                inodes_used=vfs.f_files - vfs.f_ffree)
            if entry is not None and "ro" in entry.super_options and not rec.get("readOnly") \
                    and "ro" not in (rec.get("mountFlags") or ()):
                problems.append("the filesystem was remounted read-only (I/O or "
                                "filesystem errors?)")
        if problems:
            out.abnormal = True
            out.message = "; ".join(problems)
        return out


__all__ = ["DEFAULT_STATE_DIR", "CsiError", "NodeOps", "StateStore", "VolumeStats"]
