"""The node side against the real control plane (issue 12): `volplane node`'s agent keeps
backing files in step with the StorageAllocations, reports a pool's real capacity, and
the pool attacher tells the node plugin where a volume's bytes are.

`volplane node` runs here as a process on this machine standing in for node kwok-node-1
(its backing root is a temporary directory), under the ServiceAccount and RBAC of
manifests/node/. The CSI calls at the end need root and loop devices (skipped otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from volplane.attach.names import volume_attachment_name

from . import test_pools as _pools
from .conftest import LOG_DIR, _volplane_executable, kubectl, serviceaccount_kubeconfig
from .helpers import (
    create,
    events_for,
    holds_for,
    kcreate_strict,
    kdelete,
    kget,
    kpatch,
    kpatch_response,
    wait_for,
)

claim_phase = _pools.claim_phase
crds = _pools.crds          # fixtures shared with test_pools.py
pool_env = _pools.pool_env

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE = "kwok-node-1"
GI = 1 << 30


@pytest.fixture(scope="session")
def node_kubeconfig(kubeconfig) -> str:
    """Credentials of manifests/node/'s ServiceAccount, so the suite proves its RBAC."""
    kubectl(kubeconfig, "apply", "--server-side", "--force-conflicts",
            "-f", str(REPO_ROOT / "manifests" / "node" / "namespace.yaml"),
            "-f", str(REPO_ROOT / "manifests" / "node" / "rbac.yaml"))
    return str(serviceaccount_kubeconfig(kubeconfig, LOG_DIR.parent / "node.kubeconfig",
                                         "volplane-node", "volplane-node"))


class NodeProcess:
    def __init__(self, kubeconfig: str, base: Path, name: str):
        self.root = base / "root"
        self.root.mkdir(parents=True)
        self.socket = base / "csi" / "csi.sock"
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"node-{name}.log"
        argv = [_volplane_executable(), "node", "--kubeconfig", kubeconfig,
                "--csi-address", str(self.socket), "--node-id", NODE,
                "--backing-root", str(self.root), "--health-port", "0",
                "--agent-period", "1", "--delete-grace", "2"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def lines(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture
def node_process(node_kubeconfig, tmp_path, request, cluster):
    if not cluster.nodes.fake_kubelets:
        pytest.skip("stands in for a kwok node's plugin; on kind the DaemonSet's node plugin "
                    "is the real one (test_data_path.py)")
    p = NodeProcess(node_kubeconfig, tmp_path / "node", request.node.name)
    yield p
    p.stop()
    subprocess.run(["sh", "-c", f"grep -o ' {tmp_path}[^ ]*' /proc/self/mountinfo | sort -r "
                    "| xargs -r -n1 umount -l"], capture_output=True)


def file_backed_pool(pool_env, node_process, suffix: str, capacity="1000Ti", path=None):
    name = pool_env.name(suffix)
    return pool_env.pool(suffix, capacity, names=[NODE], backing={
        "type": "File", "path": path or str(node_process.root / "pools" / name)})


def backing_file(node_process, pool: str, pv: str) -> Path:
    return node_process.root / "pools" / pool / f"{pv}.img"


def test_backing_files_follow_allocations_and_capacity_is_real(api, pool_env, node_process):
    pool = file_backed_pool(pool_env, node_process, "files")
    cls = pool_env.storage_class("files", allowVolumeExpansion=True)
    pool_env.start_ready()
    ns = pool_env.ns

    # The agent reports what the directory's filesystem really offers; the pool's
    # capacity becomes min(spec.capacity, that).
    report = wait_for(lambda: pool_env.pool_status(pool).get("backing"), timeout=30,
                      message="status.backing reported")
    assert report["node"] == NODE and report["type"] == "File"
    assert report["path"] == str(node_process.root / "pools" / pool)
    vfs = os.statvfs(node_process.root)
    free = vfs.f_bavail * vfs.f_frsize
    assert abs(report["freeBytes"] - free) < 2 * GI
    assert report["capacityBytes"] == report["freeBytes"] + report["usedBytes"]
    wait_for(lambda: pool_env.pool_status(pool).get("capacityBytes")
             == pool_env.pool_status(pool)["backing"]["capacityBytes"], timeout=30,
             message="the pool's capacity is what the backing really offers (< 1000Ti)")

    # Provisioning makes the sparse file, at the claim's size.
    pool_env.claim("a", "1Gi", cls)
    wait_for(lambda: claim_phase(api, ns, "a") == "Bound", timeout=60, message="Bound")
    pv = kget(api, "PersistentVolumeClaim", "a", ns)["spec"]["volumeName"]
    f = backing_file(node_process, pool, pv)
    wait_for(lambda: f.exists() and f.stat().st_size == GI, timeout=30,
             message=f"{f} created at 1Gi")
    assert f.stat().st_blocks * 512 < 16 << 20  # sparse: no bytes written yet

    # Expansion: the record and the file grow; the kubelet is asked to finish the resize
    # on the node (capacity in claim status stays until it has).
    kpatch(api, "PersistentVolumeClaim", "a", {"spec": {"resources": {"requests": {
        "storage": "2Gi"}}}}, ns)
    wait_for(lambda: f.stat().st_size == 2 * GI, timeout=30, message="file grown to 2Gi")
    claim = wait_for(lambda: (c := kget(api, "PersistentVolumeClaim", "a", ns))["status"].get(
        "allocatedResourceStatuses") and c, timeout=30, message="NodeResizePending")
    st = claim["status"]
    assert st["allocatedResourceStatuses"] == {"storage": "NodeResizePending"}
    assert st["allocatedResources"] == {"storage": "2Gi"}
    assert st["capacity"] == {"storage": "1Gi"}
    assert [c["type"] for c in st["conditions"]] == ["FileSystemResizePending"]
    assert kget(api, "PersistentVolume", pv)["spec"]["capacity"]["storage"] == "2Gi"
    assert any(e["reason"] == "FileSystemResizeRequired"
               for e in events_for(api, ns, "a", "PersistentVolumeClaim"))

    # Reclaim Delete: the record goes, then the bytes.
    pool_env.delete_claim("a")
    wait_for(lambda: not f.exists(), timeout=60, message=f"{f} deleted with its volume")
    assert kget(api, "StorageAllocation", pv) is None
    assert any(line.get("event") == "backing file deleted" for line in node_process.lines())


def test_retain_keeps_the_bytes_for_a_re_created_pv(api, pool_env, node_process):
    pool = file_backed_pool(pool_env, node_process, "keep")
    cls = pool_env.storage_class("keep", reclaim="Retain")
    pool_env.start_ready()
    ns = pool_env.ns
    pool_env.claim("k", "1Gi", cls)
    wait_for(lambda: claim_phase(api, ns, "k") == "Bound", timeout=60, message="Bound")
    pv = kget(api, "PersistentVolumeClaim", "k", ns)["spec"]["volumeName"]
    f = backing_file(node_process, pool, pv)
    wait_for(f.exists, timeout=30, message="file created")
    f.write_bytes(b"precious")  # stands in for what a pod wrote (grows back below)
    os.truncate(f, GI)

    pool_env.delete_claim("k")
    wait_for(lambda: (kget(api, "PersistentVolume", pv) or {}).get("status", {}).get(
        "phase") == "Released", timeout=60, message="Released")
    kdelete(api, "PersistentVolume", pv)
    wait_for(lambda: kget(api, "PersistentVolume", pv) is None, timeout=60,
             message="the Retain PV deleted by the administrator")
    record = kget(api, "StorageAllocation", pv)
    assert record is not None, "a Retain volume's allocation outlives its PV"
    assert record["metadata"]["annotations"]["volplane.io/retained"] == "true"
    holds_for(lambda: f.exists() and f.read_bytes()[:8] == b"precious", 6,
              message="the bytes stay (delete grace 2 s, agent period 1 s)")

    # A re-created PV pointing at the same volume; then the record is deleted: the PV
    # still names the bytes, so they stay.
    again = f"{ns}-again"
    create(api, {"apiVersion": "v1", "kind": "PersistentVolume",
                 "metadata": {"name": again},
                 "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                          "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                          "csi": {"driver": "pool.volplane.io",
                                  "volumeHandle": f"{pool}/{pv}"}}})
    kdelete(api, "StorageAllocation", pv)
    holds_for(lambda: f.exists() and f.read_bytes()[:8] == b"precious", 6,
              message="a PV still names the volume: its bytes stay")
    kdelete(api, "PersistentVolume", again)
    wait_for(lambda: not f.exists(), timeout=60,
             message="neither record nor PV: the bytes go")


def test_backing_outside_the_node_plugins_root_is_reported(api, pool_env, node_process):
    pool = file_backed_pool(pool_env, node_process, "outside", path="/srv/not-mounted-here")
    cls = pool_env.storage_class("outside")
    pool_env.start_ready()
    report = wait_for(lambda: pool_env.pool_status(pool).get("backing"), timeout=30,
                      message="status.backing reported")
    assert report["message"].startswith("spec.backing.path: /srv/not-mounted-here is outside")
    assert report["capacityBytes"] == 0
    assert not Path("/srv/not-mounted-here").exists()  # nothing made outside the root
    pool_env.claim("x", "1Gi", cls)
    ev = wait_for(lambda: [e for e in events_for(api, pool_env.ns, "x", "PersistentVolumeClaim")
                           if e["reason"] == "ProvisioningFailed"], timeout=60,
                  message="ProvisioningFailed")
    assert f'pool "{pool}" full' in ev[-1]["message"]


def test_backing_is_validated_and_immutable(api, pool_env):
    base = {"capacity": "1Gi", "nodes": {"names": [NODE]}}
    for backing, field in (({"type": "LVM"}, "spec.backing.type"),
                           ({"type": "File", "path": "relative/dir"}, "spec.backing.path"),
                           ({"type": "File", "path": "/var/lib/volplane/../etc"},
                            "spec.backing.path"),
                           ({"path": "/var/lib/volplane/x"}, "spec.backing.type")):
        r = kcreate_strict(api, "StoragePool", {
            "apiVersion": "volplane.io/v1alpha1", "kind": "StoragePool",
            "metadata": {"name": pool_env.name("bad")}, "spec": {**base, "backing": backing}})
        assert r.status_code == 422, r.text
        assert field in r.text, r.text
    pool = pool_env.pool("imm", "1Gi", names=[NODE])
    kpatch(api, "StoragePool", pool, {"spec": {"backing": {"type": "File"}}})  # may be added
    for change in ({"backing": {"type": "File", "path": "/var/lib/volplane/elsewhere"}},
                   {"backing": None}):
        r = kpatch_response(api, "StoragePool", pool, {"spec": change})
        assert r.status_code == 422 and "spec.backing" in r.text, r.text


# --------------------------------------------------------------- the CSI calls (root only)


def _csi_ready() -> str | None:
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        return "needs root and loop devices"
    if not shutil.which("mkfs.ext4"):
        return "needs mkfs.ext4"
    return None


@pytest.mark.skipif(_csi_ready() is not None, reason=str(_csi_ready()))
def test_attachment_metadata_leads_the_node_plugin_to_the_bytes(api, pool_env, node_process,
                                                                 operator, tmp_path):
    import grpc

    from volplane.node.gen import csi_pb2, csi_pb2_grpc

    pool = file_backed_pool(pool_env, node_process, "attach")
    cls = pool_env.storage_class("attach")
    operator.start("--controllers", "pv-binder,pool-provisioner,pool-attacher",
                   "--health-port", "0").wait_ready(timeout=90)
    ns = pool_env.ns
    pool_env.claim("v", "1Gi", cls)
    wait_for(lambda: claim_phase(api, ns, "v") == "Bound", timeout=60, message="Bound")
    pv = kget(api, "PersistentVolumeClaim", "v", ns)["spec"]["volumeName"]
    handle = kget(api, "PersistentVolume", pv)["spec"]["csi"]["volumeHandle"]
    f = backing_file(node_process, pool, pv)
    wait_for(f.exists, timeout=30, message="file created")

    # What the AD controller would create for a pod on NODE (it is not running here).
    va_name = volume_attachment_name(handle, "pool.volplane.io", NODE)
    create(api, {"apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment",
                 "metadata": {"name": va_name},
                 "spec": {"attacher": "pool.volplane.io", "nodeName": NODE,
                          "source": {"persistentVolumeName": pv}}})
    try:
        va = wait_for(lambda: (v := kget(api, "VolumeAttachment", va_name)) and (
            v.get("status") or {}).get("attached") and v, timeout=30, message="attached")
        meta = va["status"]["attachmentMetadata"]
        assert meta["backingType"] == "File" and meta["backingFile"] == str(f)

        # The kubelet passes attachmentMetadata as the publish context.
        ch = grpc.insecure_channel(f"unix://{node_process.socket}")
        node = csi_pb2_grpc.NodeStub(ch)
        vc = csi_pb2.VolumeCapability
        cap = vc(mount=vc.MountVolume(), access_mode=vc.AccessMode(
            mode=vc.AccessMode.SINGLE_NODE_WRITER))
        staging, target = tmp_path / "staging", tmp_path / "target"
        node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=handle, publish_context=meta, staging_target_path=str(staging),
            volume_capability=cap), timeout=120)
        node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=handle, publish_context=meta, staging_target_path=str(staging),
            target_path=str(target), volume_capability=cap), timeout=60)
        (target / "hello").write_text("from a pod")
        node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=handle, target_path=str(target)), timeout=60)
        node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=handle, staging_target_path=str(staging)), timeout=60)
        ch.close()
        assert f.stat().st_blocks * 512 > 1 << 20  # a filesystem and a file landed in it
        out = subprocess.run(["losetup", "-j", str(f)], capture_output=True, text=True)
        assert out.stdout.strip() == ""  # detached
    finally:
        kdelete(api, "VolumeAttachment", va_name)  # the pool attacher detaches it
        try:
            wait_for(lambda: kget(api, "VolumeAttachment", va_name) is None, timeout=30,
                     message="VolumeAttachment detached and gone")
        finally:
            kpatch(api, "VolumeAttachment", va_name, {"metadata": {"finalizers": None}})


def test_recycle_is_refused_for_a_volume_with_bytes(api, pool_env, node_process):
    """Recycle would hand the old bytes to the next claim: Failed, as upstream does for
    a volume no recycler can scrub."""
    pool = file_backed_pool(pool_env, node_process, "recycle")
    pool_env.start_ready()
    ns = pool_env.ns
    pv = f"{ns}-recycled"
    create(api, {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                 "metadata": {"name": "r", "namespace": ns},
                 "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                          "volumeName": pv, "resources": {"requests": {"storage": "1Gi"}}}})
    create(api, {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                 "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                          "persistentVolumeReclaimPolicy": "Recycle", "storageClassName": "",
                          "csi": {"driver": "pool.volplane.io",
                                  "volumeHandle": f"{pool}/{pv}"}}})
    wait_for(lambda: claim_phase(api, ns, "r") == "Bound", timeout=60, message="Bound")
    pool_env.delete_claim("r")
    failed = wait_for(lambda: (p := kget(api, "PersistentVolume", pv)) and p.get(
        "status", {}).get("phase") == "Failed" and p, timeout=60, message="PV Failed")
    assert "unscrubbed" in failed["status"]["message"]
    assert any(e["reason"] == "VolumeFailedRecycle" for e in events_for(api, "default", pv,
                                                                          "PersistentVolume"))
    kdelete(api, "PersistentVolume", pv)
