"""Node-level tests: a real `volplane node` on a temporary unix socket, driven by a gRPC
client through real loop devices, mkfs and mounts.

They need root, /dev/loop-control and the filesystem tools; otherwise every test here
is skipped with the reason. Whatever a test leaves mounted or attached under its own
temporary directory is unmounted and detached afterwards, pass or fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

GI = 1 << 30
MI = 1 << 20


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop devices, mount)"
    if not os.path.exists("/dev/loop-control"):
        return "needs /dev/loop-control"
    missing = [t for t in ("losetup", "blkid", "mount", "umount", "mkfs.ext4", "resize2fs")
               if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)}"
    try:
        from volplane.node.gen import csi_pb2  # noqa: F401
    except ImportError:
        return "gRPC stubs not generated (make csi-stubs)"
    return None


WHY_NOT = _why_not()


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.node)
            if WHY_NOT:
                item.add_marker(pytest.mark.skip(reason=WHY_NOT))


def _cleanup(base: Path) -> list[str]:
    """Unmount everything under `base` (deepest first) and detach loops of its files."""
    done = []
    base_s = str(base)
    for _ in range(10):
        with open("/proc/self/mountinfo") as f:
            points = [line.split(" ")[4] for line in f]
        points = [p.replace("\\040", " ") for p in points if p.startswith(base_s)]
        if not points:
            break
        for p in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", p], capture_output=True)
            done.append(f"umount {p}")
    out = subprocess.run(["losetup", "-J", "-l"], capture_output=True, text=True).stdout
    for d in (json.loads(out).get("loopdevices") if out.strip() else []) or []:
        if (d.get("back-file") or "").startswith(base_s):
            subprocess.run(["losetup", "-d", d["name"]], capture_output=True)
            done.append(f"losetup -d {d['name']}")
    return done


class Plugin:
    """A running `volplane node` and gRPC stubs bound to it."""

    def __init__(self, base: Path, extra_args: tuple[str, ...] = ()):
        from volplane.node.gen import csi_pb2
        self.pb = csi_pb2
        self.base = base
        self.root = base / "backing"            # --backing-root
        self.pool_dir = self.root / "pools" / "p1"
        self.pool_dir.mkdir(parents=True)
        self.kubelet = base / "kubelet"          # staging and target paths live here
        self.kubelet.mkdir()
        self.socket = base / "csi" / "csi.sock"
        self.log = open(base / "node.log", "a")
        self.argv = [sys.executable, "-m", "volplane.cli", "node", "--csi-address",
                     str(self.socket), "--node-id", "node-a", "--backing-root", str(self.root),
                     "--no-agent", "--max-volumes", "16", "--log-format", "console",
                     *(extra_args or ("--health-port", "0"))]
        self._start()

    def _start(self) -> None:
        import grpc

        from volplane.node.gen import csi_pb2_grpc
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"volplane node did not start: {self.logs()}")
            time.sleep(0.1)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    def crash_and_restart(self) -> None:
        """SIGKILL the plugin (no clean-up of any kind) and start it again."""
        self.channel.close()
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._start()

    def logs(self) -> str:
        self.log.flush()
        return (self.base / "node.log").read_text()[-4000:]

    def stop(self) -> None:
        self.channel.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    # -- helpers ----------------------------------------------------------------------------
    def volume(self, name: str, size: int) -> tuple[str, dict[str, str]]:
        """A backing file as the node agent makes it: (volume id, publish context)."""
        path = self.pool_dir / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        return f"p1/{name}", {"backingType": "File", "backingFile": str(path)}

    def cap(self, *, block: bool = False, fs_type: str = "", mode: str = "SINGLE_NODE_WRITER",
            flags: tuple[str, ...] = ()):
        vc = self.pb.VolumeCapability
        access = vc.AccessMode(mode=vc.AccessMode.Mode.Value(mode))
        if block:
            return vc(block=vc.BlockVolume(), access_mode=access)
        return vc(mount=vc.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
                  access_mode=access)

    def stage(self, vid, ctx, staging, cap):
        return self.node.NodeStageVolume(self.pb.NodeStageVolumeRequest(
            volume_id=vid, publish_context=ctx, staging_target_path=str(staging),
            volume_capability=cap), timeout=120)

    def unstage(self, vid, staging):
        return self.node.NodeUnstageVolume(self.pb.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=str(staging)), timeout=60)

    def publish(self, vid, ctx, staging, target, cap, readonly=False):
        return self.node.NodePublishVolume(self.pb.NodePublishVolumeRequest(
            volume_id=vid, publish_context=ctx, staging_target_path=str(staging),
            target_path=str(target), volume_capability=cap, readonly=readonly), timeout=60)

    def unpublish(self, vid, target):
        return self.node.NodeUnpublishVolume(self.pb.NodeUnpublishVolumeRequest(
            volume_id=vid, target_path=str(target)), timeout=60)

    def stats(self, vid, path):
        return self.node.NodeGetVolumeStats(self.pb.NodeGetVolumeStatsRequest(
            volume_id=vid, volume_path=str(path)), timeout=30)

    def expand(self, vid, path, size, cap=None, staging=""):
        req = self.pb.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=str(path), staging_target_path=str(staging),
            capacity_range=self.pb.CapacityRange(required_bytes=size))
        if cap is not None:
            req.volume_capability.CopyFrom(cap)
        return self.node.NodeExpandVolume(req, timeout=120)

    def loops(self, vid: str) -> list[str]:
        path = self.pool_dir / (vid.split("/", 1)[1] + ".img")
        out = subprocess.run(["losetup", "-J", "-l", "-j", str(path)], capture_output=True,
                             text=True, check=True).stdout
        return [d["name"] for d in (json.loads(out)["loopdevices"] if out.strip() else [])]


@pytest.fixture
def plugin(tmp_path):
    base = tmp_path / "vp"
    base.mkdir()
    p = Plugin(base)
    try:
        yield p
    finally:
        p.stop()
        left = _cleanup(base)
        if left:
            print(f"cleanup after test: {left}")
