"""The node agent: the backing files of pool volumes, and the real capacity of pools.

It runs in the node plugin's process (`volplane node`, one per node) and owns the
bytes, while the controller owns the records:

    StorageAllocation created (provisioning)  -> create <pool dir>/<volume>.img, sparse,
                                                 at sizeBytes
    StorageAllocation.sizeBytes grown         -> grow the file (NodeExpandVolume grows it
                                                 too, and the loop device and filesystem)
    StorageAllocation gone (reclaim Delete)   -> delete the file, once it is certain:
      * no allocation record of that name, in the cache and in a live GET;
      * no PV (live LIST) whose volumeHandle is "<pool>/<volume>" -- a re-created PV of a
        retained volume keeps the bytes;
      * the file is attached to no loop device on this host;
      * it was seen orphaned for the whole grace period (--delete-grace).
    Each step is repeatable: a crash between any two leaves a state the next round
    finishes. Several agents sharing one directory (nodes of one shared pool) do the same
    idempotent steps; the loser of a race sees EEXIST or ENOENT and moves on.

Capacity: for each File pool reaching this node, ``status.backing`` gets what the
directory's filesystem really offers (statvfs free + bytes its volume files already
use). Only that field is written (a JSON merge patch of status.backing), so the
controller's status writer (every other status field) is never overwritten; the pool
provisioner counts min(spec.capacity, status.backing.capacityBytes).

What it reads comes from its own embedded Kopf operator (watch.py): pools, allocations,
PVs and this node's Node. Pool and allocation changes wake it (debounced); PV changes
do not (they only veto deletions, which are confirmed live), nor do its Node's (status
heartbeats; its labels are read at the next round); otherwise a round runs every
--agent-period. The first round waits for the caches to be synced.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import os
import threading
import time

from .. import logs
from ..informers import Informers
from ..kinds import ALLOCATIONS, POOLS
from ..kube import ApiError, Kube
from ..pools.placement import pool_nodes
from . import backing as B
from . import watch
from .system import System

log = logs.get("node-agent")

DEFAULT_SLOTS = 16
SYNC_PATIENCE = 60.0  # seconds before a start-up still waiting for its Node says so


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Agent:
    def __init__(self, kube: Kube, node_name: str, system: System, *,
                 root: str = B.DEFAULT_ROOT, period: float = 10.0, grace: float = 30.0,
                 clock=time.monotonic):
        self.kube = kube
        self.node_name = node_name
        self.sys = system
        self.root = root
        self.period = period
        self.grace = grace
        self.clock = clock
        self.stopping = threading.Event()      # stop() was called (from any thread)
        self._stop_flag = asyncio.Event()      # Kopf's stop flag, in the agent's loop
        self._loop: asyncio.AbstractEventLoop | None = None
        # The listers (Kopf's indexes), read by the agent's loop only.
        self.informers = Informers()
        self.pools = self.informers.lister(POOLS)
        self.allocations = self.informers.lister(ALLOCATIONS)
        self.pvs = self.informers.lister(watch.PVS)
        self.node: dict | None = None          # this node (slim), from the watch
        # The pools as the CSI threads read them (NodeGetInfo, NodeStage): a plain dict
        # this loop updates one key per event, safe to read from another thread (a
        # lister is not: it walks Kopf's per-key stores while this loop changes them).
        self._pool_view: dict[str, dict] = {}
        self._orphans: dict[str, float] = {}   # file path -> first time seen orphaned
        self._wake = asyncio.Event()
        self.synced = asyncio.Event()          # the Node's first event: every index full
        self.rounds = 0
        self.first_round = threading.Event()   # NodeGetInfo waits for it (other thread)
        self.last_error: str | None = None
        # Pools and allocations say what to create, grow or delete: act soon after they
        # change. PVs only veto deletions (confirmed live anyway): no wake-up for them,
        # so a busy cluster's PV churn costs the agents nothing.
        self.informers.listen(POOLS, self._pool_changed)
        self.informers.listen(ALLOCATIONS, lambda *_: self._wake.set())
        self.informers.listen(watch.node_kind(node_name), self._node_changed)

    def _pool_changed(self, key: str, _old: dict | None, new: dict | None) -> None:
        if new is None:
            self._pool_view.pop(key, None)
        else:
            self._pool_view[key] = new
        self._wake.set()

    def _node_changed(self, _key: str, _old: dict | None, new: dict | None) -> None:
        self.node = new
        self.synced.set()  # Kopf calls no handler before every index is populated

    # -- facts for NodeGetInfo ------------------------------------------------------------------
    def reaches(self, pool: dict) -> bool:
        node = self.node
        if node is None:
            return False
        return bool(pool_nodes(pool, {self.node_name: node}))

    def backing_of(self, pool_name: str) -> B.Backing | None:
        """The backing of a pool in the cache (None: unknown, none or malformed)."""
        try:
            return B.pool_backing(self._pool_view.get(pool_name))
        except B.BackingError:
            return None

    def max_volumes(self) -> int:
        """The node's device slots: slotsPerNode summed over the File pools reaching it."""
        total = 0
        for pool in list(self._pool_view.values()):
            try:
                if B.pool_backing(pool) is None or not self.reaches(pool):
                    continue
            except B.BackingError:
                continue
            total += int((pool.get("spec") or {}).get("slotsPerNode") or DEFAULT_SLOTS)
        return total

    # -- loop -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the watches and the rounds; callable from any thread."""
        self.stopping.set()
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._stop_flag.set)
            except RuntimeError:
                pass  # the loop has ended already

    async def run(self) -> None:
        """Kopf (the watches) and the rounds, until stop() or Kopf ends."""
        self._loop = asyncio.get_running_loop()
        if self.stopping.is_set():
            self._stop_flag.set()
        # Created before Kopf starts: Kopf leaves the tasks it found running alone.
        rounds = asyncio.create_task(self._rounds(), name="agent-rounds")
        try:
            await watch.run(self.informers, self.kube, self._stop_flag)
        finally:
            rounds.cancel()
            await asyncio.gather(rounds, return_exceptions=True)

    async def _rounds(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.synced.wait(), timeout=SYNC_PATIENCE)
                break
            except TimeoutError:
                log.warning("agent not synced yet: no event of its Node", node=self.node_name)
        log.info("agent synced", node=self.node_name, pools=len(self.pools),
                 allocations=len(self.allocations))
        while True:
            self._wake.clear()
            try:
                await self.reconcile()
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.last_error = str(e)
                log.warning("agent round failed", error=str(e))
            self.rounds += 1
            self.first_round.set()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.period)
                await asyncio.sleep(0.5)  # debounce a burst of changes
            except TimeoutError:
                pass

    def _scan(self, dirs: dict[str, B.Backing]) -> dict[str, dict[str, B.FileState]]:
        """Files in each pool directory (created if missing), with their loop attachment."""
        attached = set()
        for lo in self.sys.all_loops():
            if lo.back_dev is not None and lo.back_ino:
                attached.add((lo.back_dev, lo.back_ino))
        out: dict[str, dict[str, B.FileState]] = {}
        for pool, backing in dirs.items():
            os.makedirs(backing.path, exist_ok=True)
            files = {}
            with os.scandir(backing.path) as it:
                for entry in it:
                    if B.volume_of_file(entry.name) is None or not entry.is_file(
                            follow_symlinks=False):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    key = ((os.major(st.st_dev), os.minor(st.st_dev)), st.st_ino)
                    files[entry.name] = B.FileState(st.st_size, st.st_blocks * 512,
                                                    key in attached)
            out[pool] = files
        return out

    async def reconcile(self) -> None:
        # Which directories to look at: the plan with no files tells (cheap, pure).
        first = B.plan(self.pools, self.allocations, self.pvs.values(), {}, self.reaches,
                       self.root)
        files = await asyncio.to_thread(self._scan, first.dirs)
        p = B.plan(self.pools, self.allocations, self.pvs.values(), files, self.reaches,
                   self.root)
        for action in p.of("create") + p.of("grow"):
            await asyncio.to_thread(self._ensure_file, action)
        await self._deletions(p.of("delete"))
        await self._report(p, files)

    # -- create / grow ------------------------------------------------------------------------
    def _ensure_file(self, a: B.Action) -> None:
        try:
            fd = os.open(a.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            created = True
        except FileExistsError:
            fd = os.open(a.path, os.O_RDWR | os.O_CLOEXEC)
            created = False
        try:
            if os.fstat(fd).st_size < a.size:
                os.ftruncate(fd, a.size)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(os.path.dirname(a.path))
        log.info("backing file " + ("created" if created else "grown"), pool=a.pool,
                 volume=a.volume, path=a.path, bytes=a.size, action=a.kind)

    # -- delete -------------------------------------------------------------------------------
    async def _deletions(self, candidates: list[B.Action]) -> None:
        now = self.clock()
        seen = {a.path for a in candidates}
        for path in list(self._orphans):
            if path not in seen:
                del self._orphans[path]  # adopted again (or gone): start over
        due = []
        for a in candidates:
            first = self._orphans.setdefault(a.path, now)
            if now - first >= self.grace:
                due.append(a)
        if not due:
            return
        live_handles = None
        for a in due:
            try:  # the cache may lag: the API server must say the record is gone
                await self.kube.get(f"/apis/volplane.io/v1alpha1/storageallocations/{a.volume}")
                self._orphans.pop(a.path, None)
                continue
            except ApiError as e:
                if not e.not_found:
                    raise
            if live_handles is None:
                body = await self.kube.get("/api/v1/persistentvolumes")
                live_handles = B.handles_in_use((body or {}).get("items") or ())
            if f"{a.pool}/{a.volume}" in live_handles:
                self._orphans.pop(a.path, None)
                continue
            await asyncio.to_thread(self._delete_file, a)
            self._orphans.pop(a.path, None)

    def _delete_file(self, a: B.Action) -> None:
        try:
            st = os.stat(a.path)
        except FileNotFoundError:
            return
        key = ((os.major(st.st_dev), os.minor(st.st_dev)), st.st_ino)
        for lo in self.sys.all_loops():
            if (lo.back_dev, lo.back_ino) == key:
                log.warning("orphaned backing file still attached; kept", path=a.path,
                            device=lo.name)
                return
        try:
            os.unlink(a.path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            return
        _fsync_dir(os.path.dirname(a.path))
        log.info("backing file deleted", pool=a.pool, volume=a.volume, path=a.path,
                 reason=a.reason, action="delete")

    # -- capacity report ------------------------------------------------------------------------
    async def _report(self, p: B.Plan, files: dict[str, dict[str, B.FileState]]) -> None:
        desired: dict[str, dict] = {}
        for pool, backing in p.dirs.items():
            vfs = await asyncio.to_thread(os.statvfs, backing.path)
            free = vfs.f_bavail * vfs.f_frsize
            used = sum(f.allocated for f in (files.get(pool) or {}).values())
            desired[pool] = {"type": backing.type, "path": backing.path,
                             "capacityBytes": B.capacity_report(free, used),
                             "freeBytes": free, "usedBytes": used, "message": None}
        for pool, field, message in p.problems:
            raw = (self.pools.get(pool) or {}).get("spec", {}).get("backing") or {}
            if not self.reaches(self.pools.get(pool) or {}):
                continue
            desired[pool] = {"type": raw.get("type"), "path": raw.get("path"),
                             "capacityBytes": 0, "freeBytes": 0, "usedBytes": 0,
                             "message": f"{field}: {message}"}
        for pool, want in desired.items():
            obj = self.pools.get(pool)
            if obj is None:
                continue
            have = (obj.get("status") or {}).get("backing")
            if not B.report_differs(have, want):
                continue
            body = dict(want, node=self.node_name, lastReportTime=_now())
            try:
                new = await self.kube.merge_patch(
                    f"/apis/volplane.io/v1alpha1/storagepools/{pool}/status",
                    {"status": {"backing": body}})
            except ApiError as e:
                if e.not_found:
                    continue
                raise
            if new:
                self.pools.put(new)  # seen at once, until the watch brings it
            log.info("pool capacity reported", pool=pool, capacity=want["capacityBytes"],
                     free=want["freeBytes"], used=want["usedBytes"],
                     problem=want["message"])


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
