"""Pool volumes hold real bytes (issue 12), on kind: real kubelets mount them through
volplane's CSI node plugin (the manifests/node/ DaemonSet `make kind` installs), the
operator under test provisions, binds and attaches them.

On the local control plane (kwok: no kubelet, no mounts) these tests skip; the node
plugin itself is also driven directly by tests/node/ and test_node_agent.py there.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, kubectl
from .helpers import create, kdelete, kget, klist, kpatch, node_plugin_registered, wait_for

BUSYBOX = "volplane/busybox:1.35"
DRIVER = "pool.volplane.io"
GI = 1 << 30
MI = 1 << 20
POOLS_ON_HOST = REPO_ROOT / ".local" / "kind" / "pools" / "pools"  # kind.py's shared dir


@pytest.fixture
def data_path(api, cluster, namespace, operator_running):
    if cluster.flavor != "kind":
        pytest.skip("needs real kubelets and volplane's node plugin: make e2e-kind")
    nodes = list(cluster.nodes.names)
    missing = [n for n in nodes if not node_plugin_registered(api, n)]
    if missing:
        pytest.fail(f"the node plugin is not registered on {missing} (manifests/node/)")
    env = DataPath(api, namespace, nodes)
    yield env
    env.cleanup()


class DataPath:
    def __init__(self, api, ns: str, nodes: list[str]):
        self.api, self.ns, self.nodes = api, ns, nodes
        self.pool = f"{ns}-pool"
        self.classes: list[str] = []
        create(api, {"apiVersion": "volplane.io/v1alpha1", "kind": "StoragePool",
                     "metadata": {"name": self.pool},
                     "spec": {"capacity": "20Gi", "backing": {"type": "File"},
                              "nodes": {"selector": {"matchExpressions": [
                                  {"key": "kubernetes.io/os", "operator": "In",
                                   "values": ["linux"]}]}}}})

    def storage_class(self, suffix: str, reclaim: str = "Delete", **params) -> str:
        name = f"{self.ns}-{suffix}"
        create(self.api, {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                          "metadata": {"name": name}, "provisioner": DRIVER,
                          "parameters": {"pool": self.pool, **params},
                          "reclaimPolicy": reclaim, "allowVolumeExpansion": True,
                          "volumeBindingMode": "WaitForFirstConsumer"})
        self.classes.append(name)
        return name

    def claim(self, name: str, size: str, cls: str, mode: str = "Filesystem",
              volume_name: str | None = None) -> None:
        spec = {"accessModes": ["ReadWriteOnce"], "storageClassName": cls, "volumeMode": mode,
                "resources": {"requests": {"storage": size}}}
        if volume_name:
            spec["volumeName"] = volume_name
        create(self.api, {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                          "metadata": {"name": name, "namespace": self.ns}, "spec": spec})

    def pod(self, name: str, claim: str, node: str, script: str, block: bool = False) -> None:
        vol = {"name": "v", "persistentVolumeClaim": {"claimName": claim}}
        container = {"name": "main", "image": BUSYBOX, "command": ["sh", "-c", script]}
        if block:
            container["volumeDevices"] = [{"name": "v", "devicePath": "/dev/xvda"}]
        else:
            container["volumeMounts"] = [{"name": "v", "mountPath": "/data"}]
        create(self.api, {"apiVersion": "v1", "kind": "Pod",
                          "metadata": {"name": name, "namespace": self.ns},
                          "spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                                   "terminationGracePeriodSeconds": 0,
                                   "restartPolicy": "Never", "containers": [container],
                                   "volumes": [vol]}})

    def wait_phase(self, pod: str, *phases: str, timeout: float = 180) -> dict:
        return wait_for(lambda: (p := kget(self.api, "Pod", pod, self.ns))
                        and p["status"].get("phase") in phases and p, timeout=timeout,
                        message=f"pod {pod} {'/'.join(phases)}")

    def logs(self, pod: str, kubeconfig: str) -> str:
        return kubectl(kubeconfig, "-n", self.ns, "logs", pod)

    def delete_pod(self, name: str) -> None:
        kdelete(self.api, "Pod", name, self.ns)
        wait_for(lambda: kget(self.api, "Pod", name, self.ns) is None, timeout=120,
                 message=f"pod {name} gone")

    def volume_of(self, claim: str) -> dict:
        c = wait_for(lambda: (c := kget(self.api, "PersistentVolumeClaim", claim, self.ns))
                     and c["status"].get("phase") == "Bound" and c, timeout=120,
                     message=f"claim {claim} Bound")
        return kget(self.api, "PersistentVolume", c["spec"]["volumeName"])

    def backing_file(self, pv: dict) -> Path:
        volume = pv["spec"]["csi"]["volumeHandle"].split("/", 1)[1]
        return POOLS_ON_HOST / self.pool / f"{volume}.img"

    def cleanup(self) -> None:
        for p in klist(self.api, "Pod", self.ns):
            kdelete(self.api, "Pod", p["metadata"]["name"], self.ns)
        # The kubelet unmounts, then the operator detaches: both must finish while this
        # test's operator still runs, or its VolumeAttachments outlive it (attached, with
        # the attacher's finalizer, for a volume that is gone: `volplane check` after the
        # module finds them).
        wait_for(lambda: not klist(self.api, "Pod", self.ns), timeout=180,
                 message="the test's pods gone")
        wait_for(lambda: not [va for va in klist(self.api, "VolumeAttachment")
                              if (va["metadata"].get("annotations") or {})
                              .get("volplane.io/pool") == self.pool],
                 timeout=180, message="the pool's VolumeAttachments detached and gone")
        for c in klist(self.api, "PersistentVolumeClaim", self.ns):
            kdelete(self.api, "PersistentVolumeClaim", c["metadata"]["name"], self.ns)
        try:  # the operator reclaims (Delete) while it still runs
            wait_for(lambda: not [pv for pv in klist(self.api, "PersistentVolume")
                                  if pv["spec"].get("csi", {}).get("volumeHandle", "")
                                  .startswith(self.pool + "/")
                                  and pv["spec"].get("persistentVolumeReclaimPolicy") == "Delete"],
                     timeout=90, message="pool PVs reclaimed")
        except TimeoutError:
            pass
        # What an admin does with a retained volume once done with it: delete its PV and
        # its allocation record (the bytes go with the record); then the pool itself, so
        # that no stale pool status outlives the operator (module-end volplane check).
        for pv in klist(self.api, "PersistentVolume"):
            if pv["spec"].get("csi", {}).get("volumeHandle", "").startswith(self.pool + "/"):
                kdelete(self.api, "PersistentVolume", pv["metadata"]["name"])
        for r in klist(self.api, "StorageAllocation"):
            if (r.get("spec") or {}).get("pool") == self.pool:
                kdelete(self.api, "StorageAllocation", r["metadata"]["name"])
        kdelete(self.api, "StoragePool", self.pool)
        try:
            wait_for(lambda: kget(self.api, "StoragePool", self.pool) is None
                     and not [r for r in klist(self.api, "StorageAllocation")
                              if (r.get("spec") or {}).get("pool") == self.pool],
                     timeout=60, message="pool and its records deleted")
        except TimeoutError:
            pass
        for cls in self.classes:
            kdelete(self.api, "StorageClass", cls)


def test_bytes_outlive_the_pod_and_come_back_on_the_same_node(data_path, kubeconfig):
    d = data_path
    cls = d.storage_class("keep")
    d.claim("data", "1Gi", cls)
    node = d.nodes[0]
    d.pod("writer", "data", node, "echo written-by-writer > /data/file && sync")
    d.wait_phase("writer", "Succeeded")
    pv = d.volume_of("data")
    assert d.backing_file(pv).exists(), "the volume's bytes live in its backing file"
    d.delete_pod("writer")
    d.pod("reader", "data", node, "cat /data/file")
    d.wait_phase("reader", "Succeeded")
    assert d.logs("reader", kubeconfig).strip() == "written-by-writer"


def test_block_claim_is_a_raw_device_of_the_requested_size(data_path, kubeconfig):
    d = data_path
    cls = d.storage_class("block")
    d.claim("raw", "64Mi", cls, mode="Block")
    d.pod("dev", "raw", d.nodes[1], "test -b /dev/xvda && blockdev --getsize64 /dev/xvda && "
          "echo raw-bytes | dd of=/dev/xvda bs=512 conv=sync 2>/dev/null && "
          "dd if=/dev/xvda bs=9 count=1 2>/dev/null", block=True)
    d.wait_phase("dev", "Succeeded")
    size, data = d.logs("dev", kubeconfig).split("\n", 1)
    assert int(size) == 64 * MI
    assert data.startswith("raw-bytes")


def test_a_one_gi_filesystem_cannot_hold_two_gi(data_path, kubeconfig):
    d = data_path
    cls = d.storage_class("small")
    d.claim("small", "1Gi", cls)
    d.pod("fill", "small", d.nodes[2],
          "dd if=/dev/zero of=/data/big bs=1M count=2048 2>&1; echo rc=$?; "
          "du -m /data/big | cut -f1")
    d.wait_phase("fill", "Succeeded", "Failed")
    out = d.logs("fill", kubeconfig)
    assert "No space left on device" in out, out
    written_mi = int(out.strip().splitlines()[-1])
    assert written_mi < 1024, out


def test_expanding_a_bound_claim_grows_the_filesystem_in_the_running_pod(data_path, api,
                                                                          kubeconfig):
    """xfs grows online here; ext4's online resize needs CAP_SYS_RESOURCE, which no
    container on this machine has (docs/data-path.md), so the class asks for xfs."""
    d = data_path
    cls = d.storage_class("grow", **{"csi.storage.k8s.io/fstype": "xfs"})
    d.claim("grow", "512Mi", cls)
    d.pod("app", "grow", d.nodes[0], "while true; do df -k /data | tail -1 > /tmp/df; "
          "cat /tmp/df; sleep 2; done")
    d.wait_phase("app", "Running")

    def size_kib() -> int:
        out = kubectl(kubeconfig, "-n", d.ns, "exec", "app", "--", "df", "-k", "/data")
        return int(out.strip().splitlines()[-1].split()[1])

    before = size_kib()
    assert before < 512 * 1024
    kpatch(api, "PersistentVolumeClaim", "grow",
           {"spec": {"resources": {"requests": {"storage": "1Gi"}}}}, d.ns)
    wait_for(lambda: size_kib() > 900 * 1024, timeout=180,
             message="the filesystem in the running pod grew past 900 MiB")
    claim = wait_for(lambda: (c := kget(api, "PersistentVolumeClaim", "grow", d.ns))
                     and c["status"].get("capacity", {}).get("storage") == "1Gi" and c,
                     timeout=60, message="claim capacity 1Gi")
    assert not claim["status"].get("allocatedResourceStatuses")


def test_delete_removes_the_bytes_and_retain_keeps_them_for_a_new_pv(data_path, api,
                                                                     kubeconfig):
    d = data_path
    gone_cls = d.storage_class("gone", reclaim="Delete")
    kept_cls = d.storage_class("kept", reclaim="Retain")
    d.claim("gone", "100Mi", gone_cls)
    d.claim("kept", "100Mi", kept_cls)
    for claim in ("gone", "kept"):
        d.pod(f"w-{claim}", claim, d.nodes[1], f"echo {claim}-data > /data/f && sync")
        d.wait_phase(f"w-{claim}", "Succeeded")
        d.delete_pod(f"w-{claim}")
    gone_pv, kept_pv = d.volume_of("gone"), d.volume_of("kept")
    gone_file, kept_file = d.backing_file(gone_pv), d.backing_file(kept_pv)
    assert gone_file.exists() and kept_file.exists()
    kdelete(api, "PersistentVolumeClaim", "gone", d.ns)
    kdelete(api, "PersistentVolumeClaim", "kept", d.ns)
    wait_for(lambda: kget(api, "PersistentVolume", gone_pv["metadata"]["name"]) is None,
             timeout=120, message="Delete: the PV is gone")
    wait_for(lambda: not gone_file.exists(), timeout=120,
             message=f"Delete: {gone_file.name} removed from the node")
    # Retain: the PV is Released, its bytes stay; an admin re-creates a PV for the same
    # volume handle and a new claim sees the old data
    wait_for(lambda: (kget(api, "PersistentVolume", kept_pv["metadata"]["name"]) or {})
             .get("status", {}).get("phase") == "Released", timeout=60, message="Released")
    kdelete(api, "PersistentVolume", kept_pv["metadata"]["name"])
    wait_for(lambda: kget(api, "PersistentVolume", kept_pv["metadata"]["name"]) is None,
             timeout=60, message="retained PV deleted")
    time.sleep(5)
    assert kept_file.exists(), "Retain: the bytes outlive the PV"
    again = f"{d.ns}-again"
    spec = {k: v for k, v in kept_pv["spec"].items() if k not in ("claimRef",)}
    spec["persistentVolumeReclaimPolicy"] = "Retain"
    create(api, {"apiVersion": "v1", "kind": "PersistentVolume",
                 "metadata": {"name": again}, "spec": spec})
    d.claim("again", "100Mi", kept_cls, volume_name=again)
    d.pod("reader", "again", d.nodes[1], "cat /data/f")
    d.wait_phase("reader", "Succeeded")
    assert d.logs("reader", kubeconfig).strip() == "kept-data"


def test_kubelet_volume_stats_match_what_the_pod_wrote(data_path, kubeconfig):
    d = data_path
    cls = d.storage_class("stats")
    d.claim("stats", "1Gi", cls)
    node = d.nodes[2]
    d.pod("w", "stats", node, "dd if=/dev/urandom of=/data/blob bs=1M count=100 && sync && "
          "sleep 100000")
    d.wait_phase("w", "Running")
    pvc = f'namespace="{d.ns}",persistentvolumeclaim="stats"'

    def used_bytes():
        text = kubectl(kubeconfig, "get", "--raw", f"/api/v1/nodes/{node}/proxy/metrics")
        m = re.search(r"^kubelet_volume_stats_used_bytes\{" + re.escape(pvc) + r"\} (\S+)$",
                      text, re.M)
        return float(m.group(1)) if m and float(m.group(1)) >= 100 * MI else None

    used = wait_for(used_bytes, timeout=240, interval=5,
                    message="kubelet_volume_stats_used_bytes for the claim")
    # 100 MiB written, plus the filesystem's own metadata
    assert 100 * MI <= used <= 100 * MI + 64 * MI, used
