"""`volplane node` against real loop devices, filesystems and mounts (see conftest.py)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import time

import grpc
import pytest

from .conftest import GI, MI


def _code(excinfo) -> grpc.StatusCode:
    return excinfo.value.code()


def _mounted(path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == str(path) for line in f)


def _fill(path, size: int) -> str:
    """Write `size` bytes of pseudo-random data to `path`, fsync, return its sha256."""
    h = hashlib.sha256()
    block = os.urandom(MI)
    with open(path, "wb") as f:
        for _ in range(size // MI):
            f.write(block)
            h.update(block)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_identity_and_info(plugin):
    pb = plugin.pb
    info = plugin.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == "pool.volplane.io" and info.vendor_version
    caps = plugin.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest())
    assert [c.service.type for c in caps.capabilities] == [
        pb.PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS]
    assert plugin.identity.Probe(pb.ProbeRequest()).ready.value is True
    node = plugin.node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert node.node_id == "node-a"
    assert node.max_volumes_per_node == 16
    assert dict(node.accessible_topology.segments) == {"topology.pool.volplane.io/node": "node-a"}
    rpc = pb.NodeServiceCapability.RPC.Type
    got = {rpc.Name(c.rpc.type) for c in plugin.node.NodeGetCapabilities(
        pb.NodeGetCapabilitiesRequest()).capabilities}
    assert got == {"STAGE_UNSTAGE_VOLUME", "EXPAND_VOLUME", "GET_VOLUME_STATS",
                   "VOLUME_CONDITION", "SINGLE_NODE_MULTI_WRITER"}


def test_filesystem_lifecycle_keeps_data_and_is_idempotent(plugin):
    vid, ctx = plugin.volume("pvc-fs", GI)
    staging = plugin.kubelet / "staging" / "pvc-fs"
    target = plugin.kubelet / "pods" / "a" / "mount"
    target.parent.mkdir(parents=True)
    cap = plugin.cap()

    for _ in range(2):  # every call twice: the second finds the work done
        plugin.stage(vid, ctx, staging, cap)
    assert _mounted(staging)
    assert len(plugin.loops(vid)) == 1
    blkid = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", plugin.loops(vid)[0]],
                           capture_output=True, text=True).stdout.strip()
    assert blkid == "ext4"
    for _ in range(2):
        plugin.publish(vid, ctx, staging, target, cap)
    assert _mounted(target)

    before = plugin.stats(vid, target)
    digest = _fill(target / "data.bin", 64 * MI)
    after = plugin.stats(vid, target)
    used = {u.unit: u for u in after.usage}
    was = {u.unit: u for u in before.usage}
    b = plugin.pb.VolumeUsage.BYTES
    i = plugin.pb.VolumeUsage.INODES
    grew = used[b].used - was[b].used
    assert 64 * MI <= grew <= 64 * MI + 4 * MI, grew
    assert used[b].total >= 900 * MI and used[b].available < was[b].available
    assert used[i].used == was[i].used + 1 and used[i].total > 0
    assert after.volume_condition.abnormal is False

    for _ in range(2):
        plugin.unpublish(vid, target)
    assert not _mounted(target) and not target.exists()
    for _ in range(2):
        plugin.unstage(vid, staging)
    assert not _mounted(staging)
    assert plugin.loops(vid) == []  # loop device detached

    # Re-stage (as on another pod start): same bytes, no re-format.
    target2 = plugin.kubelet / "pods" / "b" / "mount"
    target2.parent.mkdir(parents=True)
    plugin.stage(vid, ctx, staging, cap)
    plugin.publish(vid, ctx, staging, target2, cap)
    assert _sha(target2 / "data.bin") == digest
    plugin.unpublish(vid, target2)
    plugin.unstage(vid, staging)
    assert plugin.loops(vid) == []


def test_a_killed_plugin_picks_up_where_it_was(plugin):
    """SIGKILL between calls: the restarted plugin finds its mounts and loop devices (and,
    with its state file lost, still finds the loop device through the staging mount)."""
    vid, ctx = plugin.volume("pvc-crash", 256 * MI)
    staging = plugin.kubelet / "staging" / "crash"
    target = plugin.kubelet / "pods" / "crash"
    cap = plugin.cap()
    plugin.stage(vid, ctx, staging, cap)
    plugin.crash_and_restart()
    plugin.stage(vid, ctx, staging, cap)          # nothing left to do
    plugin.publish(vid, ctx, staging, target, cap)
    (target / "f").write_text("kept")
    plugin.crash_and_restart()
    plugin.publish(vid, ctx, staging, target, cap)
    assert (target / "f").read_text() == "kept" and len(plugin.loops(vid)) == 1
    plugin.unpublish(vid, target)
    for state in (plugin.base / "csi" / "volumes").glob("*.json"):
        state.unlink()                           # lost: unstage must manage without it
    plugin.crash_and_restart()
    plugin.unstage(vid, staging)
    assert not _mounted(staging) and plugin.loops(vid) == []


def test_size_is_enforced(plugin):
    vid, ctx = plugin.volume("pvc-small", GI)
    staging = plugin.kubelet / "staging" / "small"
    target = plugin.kubelet / "pods" / "small"
    cap = plugin.cap()
    plugin.stage(vid, ctx, staging, cap)
    plugin.publish(vid, ctx, staging, target, cap)
    fd = os.open(target / "big", os.O_CREAT | os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.posix_fallocate(fd, 0, 2 * GI)
        assert e.value.errno == errno.ENOSPC
        os.posix_fallocate(fd, 0, 900 * MI)  # what fits does fit
    finally:
        os.close(fd)
    plugin.unpublish(vid, target)
    plugin.unstage(vid, staging)


def test_block_mode_gives_a_device_of_the_requested_size(plugin):
    size = 512 * MI
    vid, ctx = plugin.volume("pvc-blk", size)
    staging = plugin.kubelet / "volumeDevices" / "staging" / "pvc-blk"
    target = plugin.kubelet / "volumeDevices" / "publish" / "pvc-blk" / "pod-a"
    ro_target = plugin.kubelet / "volumeDevices" / "publish" / "pvc-blk" / "pod-b"
    cap = plugin.cap(block=True)
    for _ in range(2):
        plugin.stage(vid, ctx, staging, cap)
    for _ in range(2):
        plugin.publish(vid, ctx, staging, target, cap)
    fd = os.open(target, os.O_RDWR)
    try:
        assert os.lseek(fd, 0, os.SEEK_END) == size
        os.pwrite(fd, b"volplane-block" * 10, 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    s = plugin.stats(vid, target)
    assert s.usage[0].total == size and len(s.usage) == 1

    # Read-only publish: a read-only loop device of its own; writes are refused.
    for _ in range(2):
        plugin.publish(vid, ctx, staging, ro_target, cap, readonly=True)
    with open(ro_target, "rb") as f:
        f.seek(4096)
        assert f.read(14) == b"volplane-block"
    fd = os.open(ro_target, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x", 0)
        assert e.value.errno in (errno.EPERM, errno.EROFS, errno.EACCES)
    finally:
        os.close(fd)

    for t in (target, ro_target):
        for _ in range(2):
            plugin.unpublish(vid, t)
        assert not t.exists()
    for _ in range(2):
        plugin.unstage(vid, staging)
    assert plugin.loops(vid) == []
    with open(plugin.pool_dir / "pvc-blk.img", "rb") as f:  # the bytes are in the file
        f.seek(4096)
        assert f.read(14) == b"volplane-block"


def _has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return bool(eff & (1 << 24))  # CAP_SYS_RESOURCE: ext4's online resize ioctl needs it


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_expand_grows_the_mounted_filesystem_online(plugin, fs_type):
    if shutil.which(f"mkfs.{fs_type}") is None:
        pytest.skip(f"mkfs.{fs_type} not installed")
    if fs_type == "ext4" and not _has_cap_sys_resource():
        pytest.skip("no CAP_SYS_RESOURCE here: ext4 cannot grow online (see "
                    "test_ext4_without_cap_sys_resource_grows_at_next_stage)")
    vid, ctx = plugin.volume(f"pvc-grow-{fs_type}", GI)
    staging = plugin.kubelet / "staging" / fs_type
    target = plugin.kubelet / "pods" / fs_type
    cap = plugin.cap(fs_type=fs_type)
    plugin.stage(vid, ctx, staging, cap)
    plugin.publish(vid, ctx, staging, target, cap)
    digest = _fill(target / "keep.bin", 8 * MI)
    total_before = os.statvfs(target).f_blocks * os.statvfs(target).f_frsize
    assert total_before < GI
    for _ in range(2):
        r = plugin.expand(vid, target, 2 * GI, cap, staging)
        assert r.capacity_bytes == 2 * GI
    vfs = os.statvfs(target)
    assert vfs.f_blocks * vfs.f_frsize > 1.8 * GI  # the filesystem grew while mounted
    assert _mounted(target) and _sha(target / "keep.bin") == digest
    assert os.path.getsize(plugin.pool_dir / f"pvc-grow-{fs_type}.img") == 2 * GI
    plugin.unpublish(vid, target)
    plugin.unstage(vid, staging)


def test_ext4_without_cap_sys_resource_grows_at_next_stage(plugin):
    if _has_cap_sys_resource():
        pytest.skip("CAP_SYS_RESOURCE present: ext4 grows online (tested above)")
    vid, ctx = plugin.volume("pvc-grow-offline", GI)
    staging = plugin.kubelet / "staging" / "offline"
    target = plugin.kubelet / "pods" / "offline"
    cap = plugin.cap()
    plugin.stage(vid, ctx, staging, cap)
    plugin.publish(vid, ctx, staging, target, cap)
    digest = _fill(target / "keep.bin", 8 * MI)
    with pytest.raises(grpc.RpcError) as e:
        plugin.expand(vid, target, 2 * GI, cap, staging)
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert "CAP_SYS_RESOURCE" in e.value.details()
    assert os.path.getsize(plugin.pool_dir / "pvc-grow-offline.img") == 2 * GI
    plugin.unpublish(vid, target)
    plugin.unstage(vid, staging)
    plugin.stage(vid, ctx, staging, cap)  # grows the filesystem before mounting it
    plugin.publish(vid, ctx, staging, target, cap)
    vfs = os.statvfs(target)
    assert vfs.f_blocks * vfs.f_frsize > 1.8 * GI
    assert _sha(target / "keep.bin") == digest
    # Now the filesystem spans its device: a NodeExpandVolume has nothing left to do.
    assert plugin.expand(vid, target, 2 * GI, cap, staging).capacity_bytes == 2 * GI
    plugin.unpublish(vid, target)
    plugin.unstage(vid, staging)


def test_block_expand_refreshes_the_device(plugin):
    vid, ctx = plugin.volume("pvc-blk-grow", 256 * MI)
    staging = plugin.kubelet / "bs"
    target = plugin.kubelet / "bp" / "dev"
    cap = plugin.cap(block=True)
    plugin.stage(vid, ctx, staging, cap)
    plugin.publish(vid, ctx, staging, target, cap)
    assert plugin.expand(vid, target, 512 * MI, cap).capacity_bytes == 512 * MI
    fd = os.open(target, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_END) == 512 * MI
    finally:
        os.close(fd)
    plugin.unpublish(vid, target)
    plugin.unstage(vid, staging)


def test_read_only_publish_refuses_writes(plugin):
    vid, ctx = plugin.volume("pvc-ro", 256 * MI)
    staging = plugin.kubelet / "staging" / "ro"
    rw = plugin.kubelet / "pods" / "rw"
    ro = plugin.kubelet / "pods" / "ro"
    cap = plugin.cap()
    plugin.stage(vid, ctx, staging, cap)
    plugin.publish(vid, ctx, staging, rw, cap)
    (rw / "hello").write_text("hi")
    for _ in range(2):
        plugin.publish(vid, ctx, staging, ro, cap, readonly=True)
    assert (ro / "hello").read_text() == "hi"
    with pytest.raises(OSError) as e:
        (ro / "nope").write_text("x")
    assert e.value.errno == errno.EROFS
    # The same target asked read-write now: incompatible.
    with pytest.raises(grpc.RpcError) as e:
        plugin.publish(vid, ctx, staging, ro, cap, readonly=False)
    assert _code(e) == grpc.StatusCode.ALREADY_EXISTS
    for t in (rw, ro):
        plugin.unpublish(vid, t)
    plugin.unstage(vid, staging)


def test_errors_carry_the_csi_codes(plugin):
    pb = plugin.pb
    vid, ctx = plugin.volume("pvc-err", 256 * MI)
    staging = plugin.kubelet / "staging" / "err"
    target = plugin.kubelet / "pods" / "err"
    cap = plugin.cap()

    def code(fn, *a, **kw):
        with pytest.raises(grpc.RpcError) as e:
            fn(*a, **kw)
        return _code(e)

    assert code(plugin.stage, "", ctx, staging, cap) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(plugin.node.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=vid, publish_context=ctx, staging_target_path=str(staging))
    ) == grpc.StatusCode.INVALID_ARGUMENT  # no capability
    assert code(plugin.stage, vid, ctx, "", cap) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(plugin.stage, vid, ctx, staging, plugin.cap(fs_type="ntfs")) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert code(plugin.stage, vid, ctx, staging, plugin.cap(mode="MULTI_NODE_MULTI_WRITER")) \
        == grpc.StatusCode.FAILED_PRECONDITION  # a local filesystem on many nodes
    assert code(plugin.stage, "p1/pvc-missing", {"backingFile": str(
        plugin.pool_dir / "pvc-missing.img")}, staging, cap) == grpc.StatusCode.NOT_FOUND
    assert code(plugin.stage, "not-a-handle", {}, staging, cap) == grpc.StatusCode.NOT_FOUND
    assert code(plugin.stage, vid, {}, staging, cap) == grpc.StatusCode.FAILED_PRECONDITION
    outside = plugin.base / "elsewhere" / "pvc-err.img"
    outside.parent.mkdir()
    outside.write_bytes(b"")
    assert code(plugin.stage, vid, {"backingFile": str(outside)}, staging, cap) == \
        grpc.StatusCode.FAILED_PRECONDITION
    assert code(plugin.publish, vid, ctx, staging, target, cap) == \
        grpc.StatusCode.FAILED_PRECONDITION  # not staged
    assert code(plugin.publish, vid, ctx, "", target, cap) == \
        grpc.StatusCode.FAILED_PRECONDITION  # no staging path
    assert code(plugin.stats, vid, plugin.kubelet / "nowhere") == grpc.StatusCode.NOT_FOUND
    assert code(plugin.expand, vid, target, GI) == grpc.StatusCode.NOT_FOUND  # not staged

    # Something else mounted at the staging path: ALREADY_EXISTS, and it is left alone.
    staging.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(staging)], check=True)
    assert code(plugin.stage, vid, ctx, staging, cap) == grpc.StatusCode.ALREADY_EXISTS
    subprocess.run(["umount", str(staging)], check=True)

    # Formatted ext4, then asked as xfs: refused, never re-formatted.
    plugin.stage(vid, ctx, staging, cap)
    plugin.unstage(vid, staging)
    assert code(plugin.stage, vid, ctx, staging, plugin.cap(fs_type="xfs")) == \
        grpc.StatusCode.FAILED_PRECONDITION
    plugin.unstage(vid, staging)
    assert plugin.loops(vid) == []

    # Unpublish/unstage of what was never there: OK (idempotent).
    plugin.unpublish(vid, plugin.kubelet / "never")
    plugin.unstage(vid, plugin.kubelet / "never-staged")
    assert code(plugin.expand, vid, target, GI) == grpc.StatusCode.NOT_FOUND


def test_volume_condition_reports_a_lost_mount(plugin):
    vid, ctx = plugin.volume("pvc-cond", 256 * MI)
    staging = plugin.kubelet / "staging" / "cond"
    target = plugin.kubelet / "pods" / "cond"
    cap = plugin.cap()
    plugin.stage(vid, ctx, staging, cap)
    plugin.publish(vid, ctx, staging, target, cap)
    assert plugin.stats(vid, target).volume_condition.abnormal is False
    subprocess.run(["umount", str(target)], check=True)  # someone unmounted it behind us
    cond = plugin.stats(vid, target).volume_condition
    assert cond.abnormal is True and "not mounted" in cond.message
    plugin.unpublish(vid, target)
    plugin.unstage(vid, staging)


def test_unstage_refuses_while_still_published(plugin):
    vid, ctx = plugin.volume("pvc-busy", 256 * MI)
    staging = plugin.kubelet / "staging" / "busy"
    target = plugin.kubelet / "pods" / "busy"
    cap = plugin.cap()
    plugin.stage(vid, ctx, staging, cap)
    plugin.publish(vid, ctx, staging, target, cap)
    with pytest.raises(grpc.RpcError) as e:
        plugin.unstage(vid, staging)
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert plugin.loops(vid)  # the loop device is kept for the mount that still uses it
    plugin.unpublish(vid, target)
    plugin.unstage(vid, staging)
    assert plugin.loops(vid) == []


def test_kubelet_registration_and_healthz():
    """What node-driver-registrar and livenessprobe do, served by `volplane node`."""
    import socket
    import tempfile
    import urllib.request
    from pathlib import Path

    from volplane.node.gen import pluginregistration_pb2 as reg
    from volplane.node.gen import pluginregistration_pb2_grpc as reg_grpc

    from .conftest import Plugin, _cleanup

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = Path(tempfile.mkdtemp(prefix="vp-reg-"))  # short: unix socket paths are <108 B
    registry = base / "reg"
    p = Plugin(base, ("--registration-dir", str(registry), "--kubelet-registration-path",
                      "/var/lib/kubelet/plugins/pool.volplane.io/csi.sock",
                      "--health-port", str(port), "--bind-address", "127.0.0.1"))
    try:
        sock = registry / "pool.volplane.io-reg.sock"
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sock.exists(), p.logs()
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            stub = reg_grpc.RegistrationStub(ch)
            info = stub.GetInfo(reg.InfoRequest(), timeout=10)
            assert (info.type, info.name, info.endpoint, list(info.supported_versions)) == (
                "CSIPlugin", "pool.volplane.io",
                "/var/lib/kubelet/plugins/pool.volplane.io/csi.sock", ["1.0.0"])
            url = f"http://127.0.0.1:{port}/healthz"
            assert urllib.request.urlopen(url, timeout=10).status == 200
            stub.NotifyRegistrationStatus(reg.RegistrationStatus(
                plugin_registered=False, error="version mismatch"), timeout=10)
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(url, timeout=10)
            assert e.value.code == 500 and b"version mismatch" in e.value.read()
            stub.NotifyRegistrationStatus(reg.RegistrationStatus(plugin_registered=True),
                                          timeout=10)
            assert urllib.request.urlopen(url, timeout=10).status == 200
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read()
            assert b"volplane_csi_operations_total" in metrics
    finally:
        p.stop()
        _cleanup(base)
    assert not sock.exists()
    shutil.rmtree(base, ignore_errors=True)  # removed on exit: the kubelet deregisters the driver
