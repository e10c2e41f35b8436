"""FlexVolume drivers run by the attach/detach controller (issue 16).

Run on a cluster of your own when others share the machine:
    VOLPLANE_CLUSTER=flex .venv/bin/python -m pytest tests/e2e/test_flexvolume.py -x -q
    VOLPLANE_KIND_CLUSTER=flex VOLPLANE_IMAGE=volplane:flex \
        .venv/bin/python -m pytest tests/e2e/test_flexvolume.py --kind -x -q

On kind (the tests at the end) nothing is played: hack/flexvolume/'s installer
DaemonSet has put the sample driver into every node's plugin dir, the in-cluster
operator (manifests/ + manifests/flexvolume/) runs its controller-side calls from a
hostPath of that dir, and the real kubelets run waitforattach/mountdevice/mount on a
loop device over the disk's backing file, which pods write and read.

The operator runs as a subprocess with --flex-volume-plugin-dir pointing at a temp dir
holding the sample driver (hack/flexvolume/volplane-demo~disk), whose log shows every
call and its options. On the local control plane kwok plays the kubelets: pods go
Running, nobody mounts anything, and nobody reports status.volumesInUse, so the tests
that need it patch node status themselves, as tests/e2e/test_attach.py does. A flex
PV is static and pre-bound to its claim (claimRef + volumeName, both marked Bound here),
pods are pinned with spec.nodeName: only the attach/detach controller is under test.
Those tests skip on kind, where real kubelets would mount what they only pretend.
"""

from __future__ import annotations

import json
import shutil
import signal
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, kubectl, load_kind_module
from .helpers import create, events_for, holds_for, kdelete, kget, klist, wait_for
from .test_attach import World, kwok_nodes, node_obj, patch_status
from .test_kind import NS as OPERATOR_NS
from .test_kind import _operator_pods, in_cluster_operator, kind_cluster  # noqa: F401 (fixtures)

SAMPLE = REPO_ROOT / "hack" / "flexvolume" / "volplane-demo~disk"
DRIVER = "volplane-demo/disk"


class Flex:
    """The plugin dir and the sample driver's log, state and disks of one test."""

    def __init__(self, tmp_path: Path, install_sample: bool = True):
        self.dir = tmp_path / "plugins"
        self.dir.mkdir()
        self.log = tmp_path / "driver.log"
        self.state = tmp_path / "state"
        self.disks = tmp_path / "disks"
        if install_sample:
            self.install()

    def install(self) -> None:
        shutil.copytree(SAMPLE, self.dir / SAMPLE.name)

    def remove(self) -> None:
        shutil.rmtree(self.dir / SAMPLE.name)

    def env(self) -> dict[str, str]:
        return {"VOLPLANE_DEMO_DISK_LOG": str(self.log),
                "VOLPLANE_DEMO_DISK_STATE": str(self.state),
                "VOLPLANE_DEMO_DISK_DIR": str(self.disks)}

    def args(self, *extra: str) -> list[str]:
        return ["--controllers=attachdetach", "--health-port=0", "--bind-address=127.0.0.1",
                "--no-leader-elect", f"--flex-volume-plugin-dir={self.dir}",
                "--flex-volume-verify-period=5", *extra]

    def calls(self, command: str | None = None) -> list[dict]:
        if not self.log.exists():
            return []
        out = [json.loads(line) for line in self.log.read_text().splitlines() if line]
        return [c for c in out if command is None or c["command"] == command]

    def driver(self, name: str, body: str) -> None:
        """A broken driver <vendor>~<name>: POSIX sh handling "$1"."""
        exe = name.split("~")[-1]
        d = self.dir / name
        d.mkdir()
        path = d / exe
        path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


class FlexWorld(World):
    def flex_volume(self, i: int, *, driver: str = DRIVER, modes=("ReadWriteOnce",),
                    options: dict | None = None) -> tuple[str, str]:
        """A claim and a static flexVolume PV bound to each other: (claim, pv)."""
        claim, pv_name = f"fc{i}", f"{self.tag}-fpv{i}"
        pvc = create(self.api, {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": self.ns},
            "spec": {"accessModes": list(modes), "storageClassName": "",
                     "volumeName": pv_name, "resources": {"requests": {"storage": "1Gi"}}}})
        src = {"driver": driver, "fsType": "ext4", "options": options or {"size": "8Mi"}}
        create(self.api, {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "labels": {"volplane.io/e2e": self.tag}},
            "spec": {"accessModes": list(modes), "capacity": {"storage": "1Gi"},
                     "storageClassName": "", "persistentVolumeReclaimPolicy": "Retain",
                     "flexVolume": src,
                     "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                                  "namespace": self.ns, "name": claim,
                                  "uid": pvc.obj["metadata"]["uid"]}}})
        self.pvs.append(pv_name)
        patch_status(self.api, f"/api/v1/persistentvolumes/{pv_name}",
                     {"status": {"phase": "Bound"}})
        patch_status(self.api, f"/api/v1/namespaces/{self.ns}/persistentvolumeclaims/{claim}",
                     {"status": {"phase": "Bound", "accessModes": list(modes),
                                 "capacity": {"storage": "1Gi"}}})
        return claim, pv_name

    def events(self, pod: str, reason: str) -> list[dict]:
        return [e for e in events_for(self.api, self.ns, pod, "Pod") if e["reason"] == reason]


@pytest.fixture
def fworld(api, namespace, operator, cluster):
    if not cluster.nodes.fake_kubelets:
        pytest.skip("plays the kubelet (kwok): on kind, test_kind_* mount for real")
    w = FlexWorld(api, namespace, fake_kubelets=True)
    yield w
    w.cleanup()
    nodes = kwok_nodes(cluster)
    for n in nodes:   # what the tests played as the kubelet
        patch_status(api, f"/api/v1/nodes/{n}", {"status": {"volumesInUse": None}})

    def mine(n):
        return [k for k in reported(api, n) if w.tag in k and not k.startswith("kubernetes.io/")]
    try:   # the pods are gone: the running operator detaches their flex volumes
        wait_for(lambda: not any(mine(n) for n in nodes), timeout=20,
                 message="this test's flex volumes detached")
    except TimeoutError:
        # the operator is dead or a driver broken: no leftovers for the next operator
        for n in nodes:
            if mine(n):
                keep = [e for e in node_obj(api, n)["status"].get("volumesAttached") or ()
                        if e["name"] not in mine(n)]
                patch_status(api, f"/api/v1/nodes/{n}", {"status": {"volumesAttached": keep}})


def start(operator, flex: Flex, *extra: str, env: dict | None = None):
    operator.start(*flex.args(*extra), env={**flex.env(), **(env or {})})
    operator.wait_ready(timeout=90)
    return operator


def reported(api, node: str) -> dict[str, str]:
    st = node_obj(api, node).get("status") or {}
    return {e["name"]: e.get("devicePath", "") for e in st.get("volumesAttached") or ()}


def unique(pv: str) -> str:
    return f"{DRIVER}/{pv}"


# ----------------------------------------------------------------------------- tests
def test_flex_pv_attached_by_the_driver_reported_and_detached_after_unmount(
        api, fworld, operator, cluster, tmp_path):
    flex = Flex(tmp_path)
    start(operator, flex)
    n0, n1 = kwok_nodes(cluster)[:2]
    claim, pv = fworld.flex_volume(0)
    fworld.pod("first", n0, claim)

    device = str(flex.disks / f"{pv}.img")
    wait_for(lambda: reported(api, n0).get(unique(pv)) == device, timeout=30,
             message=f"{unique(pv)} in {n0}'s volumesAttached with the driver's device")
    attach = [c for c in flex.calls("attach") if c["args"][1] == n0]
    assert len(attach) == 1, flex.calls()
    opts = json.loads(attach[0]["args"][0])
    assert opts == {"kubernetes.io/fsType": "ext4", "kubernetes.io/readwrite": "rw",
                    "kubernetes.io/pvOrVolumeName": pv, "size": "8Mi"}
    assert attach[0]["device"] == device
    assert [c["args"] for c in flex.calls("getvolumename")]   # asked (Not supported: once)
    wait_for(lambda: fworld.events("first", "SuccessfulAttachVolume"), timeout=10,
             message="SuccessfulAttachVolume on first")

    # a second pod on another node with the RWO flex PV: upstream 1.36's event, no attach
    fworld.pod("second", n1, claim)
    evs = wait_for(lambda: fworld.events("second", "FailedAttachVolume"), timeout=20,
                   message="FailedAttachVolume on second")
    assert evs[0]["message"] == (
        f'Waiting for detach for volume "{pv}" Volume is already used by pod(s) first')
    assert evs[0]["source"]["component"] == "attachdetach-controller"
    holds_for(lambda: not [c for c in flex.calls("attach") if c["args"][1] == n1],
              duration=3, message=f"no attach on {n1}")

    # kwok: no kubelet; the test plays n0's, which still has it mounted
    patch_status(api, f"/api/v1/nodes/{n0}", {"status": {"volumesInUse": [unique(pv)]}})
    fworld.delete_pod("first")
    holds_for(lambda: not flex.calls("detach") and unique(pv) in reported(api, n0),
              duration=4, message="no detach while the node uses it")
    patch_status(api, f"/api/v1/nodes/{n0}", {"status": {"volumesInUse": None}})
    wait_for(lambda: flex.calls("detach"), timeout=20, message="driver detach")
    assert [c["args"] for c in flex.calls("detach")] == [[pv, n0]]
    assert unique(pv) not in reported(api, n0)   # dropped from the report before detach

    # now the waiting pod's node gets it
    wait_for(lambda: reported(api, n1).get(unique(pv)) == device, timeout=30,
             message=f"{unique(pv)} attached to {n1}")
    fworld.delete_pod("second")
    wait_for(lambda: unique(pv) not in reported(api, n1), timeout=30,
             message=f"{unique(pv)} no longer reported on {n1}")
    # (the report drops it before the driver's detach runs: upstream's order)
    wait_for(lambda: len(flex.calls("detach")) == 2, timeout=20, message="second detach")
    assert [c["args"] for c in flex.calls("detach")] == [[pv, n0], [pv, n1]]
    assert operator.running


def test_inline_flex_volume_attached_read_only_and_detached_by_its_name(
        api, fworld, operator, cluster, tmp_path):
    flex = Flex(tmp_path)
    start(operator, flex)
    node = kwok_nodes(cluster)[0]
    vol = f"{fworld.tag}-data"   # an inline volume's unique name has no namespace
    create(api, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "inline", "namespace": fworld.ns},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 0,
                 "tolerations": [{"operator": "Exists"}],
                 "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10",
                                 "volumeMounts": [{"name": vol, "mountPath": "/d"}]}],
                 "volumes": [{"name": vol, "flexVolume": {
                     "driver": DRIVER, "readOnly": True, "options": {"size": "4Mi"}}}]}})
    name = f"{DRIVER}/{vol}"
    device = str(flex.disks / f"{vol}.img")
    wait_for(lambda: reported(api, node).get(name) == device, timeout=30,
             message=f"{name} in {node}'s volumesAttached")
    (attach,) = flex.calls("attach")
    assert json.loads(attach["args"][0]) == {
        "kubernetes.io/fsType": "", "kubernetes.io/readwrite": "ro",
        "kubernetes.io/pvOrVolumeName": vol, "size": "4Mi"}
    fworld.delete_pod("inline")
    wait_for(lambda: flex.calls("detach"), timeout=30, message="driver detach")
    assert [c["args"] for c in flex.calls("detach")] == [[vol, node]]
    wait_for(lambda: name not in reported(api, node), timeout=10, message="not reported")


def test_prober_picks_up_a_driver_copied_in_and_forgets_a_removed_one(
        api, fworld, operator, cluster, tmp_path):
    flex = Flex(tmp_path, install_sample=False)
    start(operator, flex)
    node = kwok_nodes(cluster)[2]
    claim, pv = fworld.flex_volume(0)
    fworld.pod("early", node, claim)
    evs = wait_for(lambda: fworld.events("early", "FailedAttachVolume"), timeout=20,
                   message="FailedAttachVolume naming the missing driver")
    assert f'flexVolume driver "{DRIVER}" is not loaded' in evs[0]["message"]
    assert unique(pv) not in reported(api, node)

    flex.install()   # copied in while the operator runs
    wait_for(lambda: reported(api, node).get(unique(pv)), timeout=30,
             message="attached once the driver appeared")
    assert len(flex.calls("attach")) == 1

    flex.remove()
    wait_for(lambda: any('"removed volume plugin"' in line and DRIVER in line
                         for line in operator.raw_lines()), timeout=20,
             message="the prober forgot the driver")
    claim1, pv1 = fworld.flex_volume(1)
    fworld.pod("late", node, claim1)
    evs = wait_for(lambda: fworld.events("late", "FailedAttachVolume"), timeout=20,
                   message="FailedAttachVolume for a pod of the removed driver")
    assert f'flexVolume driver "{DRIVER}" is not loaded' in evs[0]["message"]
    holds_for(lambda: unique(pv1) not in reported(api, node), duration=3,
              message="nothing attached without the driver")
    # the volume attached before stays reported: its detach waits for the driver
    fworld.delete_pod("early")
    holds_for(lambda: unique(pv) in reported(api, node), duration=3,
              message="still reported while its driver is away")
    flex.install()
    wait_for(lambda: flex.calls("detach"), timeout=30,
             message="detached once the driver is back")
    assert [c["args"] for c in flex.calls("detach")] == [[pv, node]]
    assert unique(pv) not in reported(api, node)
    wait_for(lambda: reported(api, node).get(unique(pv1)), timeout=30,
             message="the late pod's volume attached once the driver is back")


def test_broken_drivers_get_events_and_break_nothing_else(api, fworld, operator, cluster,
                                                          tmp_path):
    flex = Flex(tmp_path)
    flex.driver("acme~garbage", """
        case "$1" in
          init) echo '{"status": "Success", "capabilities": {"attach": true}}';;
          getvolumename) echo '{"status": "Not supported"}';;
          *) echo 'this is not JSON';;
        esac
    """)
    flex.driver("acme~hang", """
        case "$1" in
          init) echo '{"status": "Success", "capabilities": {"attach": true}}';;
          getvolumename) echo '{"status": "Not supported"}';;
          *) sleep 300;;
        esac
    """)
    start(operator, flex, "--flex-volume-call-timeout=4")
    node = kwok_nodes(cluster)[3]
    gclaim, gpv = fworld.flex_volume(0, driver="acme/garbage")
    hclaim, hpv = fworld.flex_volume(1, driver="acme/hang")
    claim, pv = fworld.flex_volume(2)
    fworld.pod("garbage", node, gclaim)
    fworld.pod("hang", node, hclaim)
    fworld.pod("good", node, claim)
    # a CSI volume alongside: its VolumeAttachment is created while the hang runs
    csi_driver = fworld.csidriver(True)
    cclaim, cpv, handle = fworld.volume(3, driver=csi_driver)
    fworld.pod("csi", node, cclaim)

    wait_for(lambda: reported(api, node).get(unique(pv)), timeout=30,
             message="the good flex volume attached beside the broken ones")
    wait_for(lambda: fworld.va_for(cpv, node, handle, csi_driver), timeout=10,
             message="the CSI volume's VolumeAttachment, while a flex driver hangs")
    evs = wait_for(lambda: fworld.events("garbage", "FailedAttachVolume"), timeout=20,
                   message="FailedAttachVolume for the garbage driver")
    msg = evs[0]["message"]
    assert msg.startswith(f'AttachVolume.Attach failed for volume "{gpv}" : ')
    assert "acme/garbage" in msg and "attach" in msg and "this is not JSON" in msg, msg
    evs = wait_for(lambda: fworld.events("hang", "FailedAttachVolume"), timeout=30,
                   message="FailedAttachVolume for the hanging driver")
    msg = evs[0]["message"]
    assert "acme/hang" in msg and "attach" in msg and "timed out" in msg, msg
    assert not [k for k in reported(api, node) if k.startswith("acme/")]
    assert operator.running


def test_kill_between_flex_attach_and_node_status_then_restart(api, fworld, operator,
                                                               cluster, tmp_path):
    """No API object records a flex attach. Killed after the driver attached but before
    the node report: the restarted operator attaches again (idempotent) and reports.
    Killed after the report: the restart rebuilds from node status and detaches a
    volume whose pod went away meanwhile, by its name."""
    flex = Flex(tmp_path)
    start(operator, flex, env={"VOLPLANE_CRASH_AT": "flex-attach-1"})
    node = kwok_nodes(cluster)[1]
    claim, pv = fworld.flex_volume(0)
    fworld.pod("p", node, claim)
    wait_for(lambda: operator.proc.poll() is not None, timeout=30,
             message="operator exits at flex-attach-1")
    assert operator.returncode == 86
    assert len(flex.calls("attach")) == 1
    assert unique(pv) not in reported(api, node)

    start(operator, flex)
    device = str(flex.disks / f"{pv}.img")
    wait_for(lambda: reported(api, node).get(unique(pv)) == device, timeout=30,
             message="reported after the restart")
    assert len(flex.calls("attach")) == 2     # attached again, same device

    operator.kill(signal.SIGKILL)
    fworld.delete_pod("p")
    wait_for(lambda: not [p for p in fworld.api.session.get(
        f"{api.url}/api/v1/namespaces/{fworld.ns}/pods").json()["items"]],
        timeout=30, message="pod gone")
    start(operator, flex)
    wait_for(lambda: flex.calls("detach"), timeout=30, message="detach after the restart")
    assert [c["args"] for c in flex.calls("detach")] == [[pv, node]]
    wait_for(lambda: unique(pv) not in reported(api, node), timeout=20,
             message="no longer reported")
    assert any('"flex attachments rebuilt from node status"' in line
               for line in operator.raw_lines())


# ----------------------------------------------------------------------------- kind
# The sample driver as hack/flexvolume/'s installer puts it on every kind node, and where
# each side logs: the kubelet runs it as root on the node (/var/log is writable there),
# the operator as uid 10001 on a read-only root with an emptyDir at /tmp
# (manifests/flexvolume/).
PLUGIN_FILE = "/usr/libexec/kubernetes/kubelet-plugins/volume/exec/volplane-demo~disk/disk"
NODE_LOG = "volplane-demo-disk.log"            # in the node's /var/log
OPERATOR_LOG = "/tmp/volplane-demo-disk.log"   # in the operator's container
NODE_DISKS = "/var/lib/volplane-demo-disk/disks"   # on every node: one host dir (kind.py)
BUSYBOX = "volplane/busybox:1.35"


class KindFlex:
    """A flex PV bound to a claim, pods using it, and both sides' driver logs."""

    def __init__(self, api, kubeconfig: str, ns: str, nodes: list[str]):
        self.api, self.kubeconfig, self.ns, self.nodes = api, kubeconfig, ns, nodes
        self.pvs: list[str] = []
        self.inline: list[str] = []   # inline flexVolume names (unique without namespace)

    def volume(self, name: str, size: str = "32Mi") -> str:
        """A static flex PV pre-bound to claim `name` (the in-cluster operator binds)."""
        pv = f"{self.ns}-{name}"
        create(self.api, {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv, "labels": {"volplane.io/e2e": self.ns}},
            "spec": {"accessModes": ["ReadWriteOnce"], "capacity": {"storage": "1Gi"},
                     "storageClassName": "", "persistentVolumeReclaimPolicy": "Retain",
                     "flexVolume": {"driver": DRIVER, "fsType": "ext4",
                                    "options": {"size": size}},
                     "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                                  "namespace": self.ns, "name": name}}})
        self.pvs.append(pv)
        create(self.api, {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                     "volumeName": pv, "resources": {"requests": {"storage": "1Gi"}}}})
        wait_for(lambda: (kget(self.api, "PersistentVolumeClaim", name, self.ns) or {})
                 .get("status", {}).get("phase") == "Bound", timeout=60,
                 message=f"claim {name} Bound to {pv}")
        return pv

    def pod(self, name: str, claim: str, node: str, script: str) -> None:
        create(self.api, {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": self.ns},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                     "terminationGracePeriodSeconds": 0, "restartPolicy": "Never",
                     "containers": [{"name": "main", "image": BUSYBOX,
                                     "command": ["sh", "-c", script],
                                     "volumeMounts": [{"name": "v", "mountPath": "/data"}]}],
                     "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}]}})

    def running(self, name: str, timeout: float = 180) -> dict:
        return wait_for(lambda: (p := kget(self.api, "Pod", name, self.ns))
                        and p["status"].get("phase") == "Running" and p, timeout=timeout,
                        message=f"pod {name} Running")

    def logs(self, pod: str) -> str:
        return kubectl(self.kubeconfig, "-n", self.ns, "logs", pod)

    def delete_pod(self, name: str) -> None:
        kdelete(self.api, "Pod", name, self.ns)
        wait_for(lambda: kget(self.api, "Pod", name, self.ns) is None, timeout=120,
                 message=f"pod {name} gone")

    def events(self, pod: str, reason: str) -> list[dict]:
        return [e for e in events_for(self.api, self.ns, pod, "Pod") if e["reason"] == reason]

    # -- the driver's logs: every call, one JSON line, filtered to one volume

    def node_calls(self, node: str, pv: str) -> list[dict]:
        """What the node's kubelet ran, read through the kubelet's /logs/ (its /var/log)."""
        try:
            text = kubectl(self.kubeconfig, "get", "--raw",
                           f"/api/v1/nodes/{node}/proxy/logs/{NODE_LOG}")
        except RuntimeError as e:
            if "NotFound" in str(e) or "not found" in str(e):
                return []
            raise
        return _calls(text, pv)

    def operator_calls(self, pv: str) -> list[dict]:
        """What the operator's pods ran (the leader; a standby runs nothing)."""
        out: list[dict] = []
        for p in _operator_pods(self.api):
            if (p.get("status") or {}).get("phase") != "Running":
                continue
            text = kubectl(self.kubeconfig, "-n", OPERATOR_NS, "exec", p["metadata"]["name"],
                           "--", "sh", "-c", f"cat {OPERATOR_LOG} 2>/dev/null || true")
            out += _calls(text, pv)
        return sorted(out, key=lambda c: c["time"])

    def cleanup(self) -> None:
        for p in klist(self.api, "Pod", self.ns):
            kdelete(self.api, "Pod", p["metadata"]["name"], self.ns)
        wait_for(lambda: not klist(self.api, "Pod", self.ns), timeout=180,
                 message="the test's pods gone")
        # unmounted by the kubelets, then detached by the operator while it still runs
        wait_for(lambda: not [n for n in self.nodes for v in self.pvs + self.inline
                              if unique(v) in reported(self.api, n)],
                 timeout=180, message="the test's flex volumes detached everywhere")
        for c in klist(self.api, "PersistentVolumeClaim", self.ns):
            kdelete(self.api, "PersistentVolumeClaim", c["metadata"]["name"], self.ns)
        for pv in self.pvs:
            kdelete(self.api, "PersistentVolume", pv)
        disks = load_kind_module().flex_disk_dir()
        for v in self.pvs + self.inline:
            (disks / f"{v}.img").unlink(missing_ok=True)


def _calls(text: str, pv: str) -> list[dict]:
    """The log lines of calls about `pv` (by name, device file, or mount dir)."""
    out = []
    for line in text.splitlines():
        try:
            c = json.loads(line)
        except ValueError:
            continue
        if any(pv in a for a in c.get("args") or ()):
            out.append(c)
    return out


def _mounting(calls: list[dict]) -> list[dict]:
    """The kubelet's mount and unmount calls (getvolumename and init left out)."""
    return [c for c in calls if c["command"] in (
        "waitforattach", "mountdevice", "mount", "unmount", "unmountdevice")]


@pytest.fixture
def kind_flex(api, cluster, kubeconfig, namespace, in_cluster_operator):  # noqa: F811
    if cluster.flavor != "kind":
        pytest.skip("needs real kubelets: make e2e-kind")
    nodes = list(cluster.nodes.names)
    # installed by hack/flexvolume/'s DaemonSet (kind.py applies it): the sample driver,
    # byte for byte, in every node's plugin dir
    want = (SAMPLE / "disk").read_text()
    for n in nodes:
        got = subprocess.run(["docker", "exec", n, "cat", PLUGIN_FILE], capture_output=True,
                             text=True)
        assert got.returncode == 0 and got.stdout == want, \
            f"{n}: {PLUGIN_FILE} is not the sample driver ({got.stderr.strip()})"
    env = KindFlex(api, kubeconfig, namespace, nodes)
    yield env
    env.cleanup()


@pytest.mark.timeout(600)
def test_kind_flex_pv_attached_by_volplane_mounted_by_the_kubelet_and_moved(kind_flex, api):
    """The seed's walk-through, for real: volplane's attach puts the device in node
    status, the kubelet's waitforattach makes it a loop device, mountdevice formats and
    mounts it, mount bind-mounts it into the pod; the bytes a pod wrote on one node are
    read by a pod on another after the kubelet unmounted and volplane detached."""
    k = kind_flex
    a, b = k.nodes[0], k.nodes[1]
    pv = k.volume("data")
    device = f"{NODE_DISKS}/{pv}.img"
    k.pod("writer", "data", a, "echo written-on-" + a + " > /data/file && sync && "
          "grep ' /data ' /proc/mounts && sleep 3600")
    k.running("writer")

    # volplane's part: attach ran in the operator's container, with upstream's options
    attach = [c for c in k.operator_calls(pv) if c["command"] == "attach"]
    assert [c["args"][1] for c in attach] == [a], attach
    assert json.loads(attach[0]["args"][0]) == {
        "kubernetes.io/fsType": "ext4", "kubernetes.io/pvOrVolumeName": pv,
        "kubernetes.io/readwrite": "rw", "size": "32Mi"}
    assert attach[0]["status"] == "Success" and attach[0]["device"] == device
    node = node_obj(api, a)["status"]
    assert {"name": unique(pv), "devicePath": device} in node["volumesAttached"]
    assert unique(pv) in node.get("volumesInUse", ()), "the real kubelet reports it in use"

    # the kubelet's part, on node a: the device from node status, a loop device made of it,
    # formatted and mounted at the global mount dir, bind-mounted into the pod
    wfa, mdev, mnt = _mounting(k.node_calls(a, pv))[:3]
    assert (wfa["command"], wfa["args"][0], wfa["status"]) == ("waitforattach", device,
                                                                "Success")
    loop = wfa["device"]
    assert loop.startswith("/dev/loop"), wfa
    assert mdev["command"] == "mountdevice" and mdev["status"] == "Success", mdev
    assert mdev["args"][0].endswith(f"/plugins/kubernetes.io/flexvolume/{DRIVER}/mounts/{pv}")
    assert mdev["args"][1] == loop
    assert json.loads(mdev["args"][2])["kubernetes.io/fsType"] == "ext4"
    assert mnt["command"] == "mount" and mnt["status"] == "Success", mnt
    pod = kget(api, "Pod", "writer", k.ns)
    assert mnt["args"][0].endswith(f"/pods/{pod['metadata']['uid']}/volumes/"
                                   f"volplane-demo~disk/{pv}")
    # the kubelet adds the pod's fields (upstream's mounter); no secretRef, no fsGroup here
    assert json.loads(mnt["args"][1]) == {
        "kubernetes.io/fsType": "ext4", "kubernetes.io/pod.name": "writer",
        "kubernetes.io/pod.namespace": k.ns, "kubernetes.io/pod.uid": pod["metadata"]["uid"],
        "kubernetes.io/pvOrVolumeName": pv, "kubernetes.io/readwrite": "rw",
        "kubernetes.io/serviceAccount.name": "default", "size": "32Mi"}
    seen = wait_for(lambda: k.logs("writer").strip(), timeout=30, message="writer's output")
    assert seen.split()[:3] == [loop, "/data", "ext4"], seen
    backing = load_kind_module().flex_disk_dir() / f"{pv}.img"
    assert backing.stat().st_size == 32 << 20, "the disk is the backing file on the host"

    # RWO on a second node: upstream's event, no attach there while a holds it
    k.pod("reader", "data", b, "cat /data/file && sleep 3600")
    evs = wait_for(lambda: k.events("reader", "FailedAttachVolume"), timeout=60,
                   message="FailedAttachVolume on reader")
    assert evs[0]["message"] == (
        f'Waiting for detach for volume "{pv}" Volume is already used by pod(s) writer')

    # the writer goes: the kubelet unmounts (mount, then device), volplane detaches from a
    # once a no longer lists it in volumesInUse, then attaches to b
    k.delete_pod("writer")
    wait_for(lambda: unique(pv) not in {e["name"] for e in node_obj(api, a)["status"].get(
        "volumesAttached") or ()}, timeout=120, message=f"{unique(pv)} detached from {a}")
    got = wait_for(lambda: (kget(api, "Pod", "reader", k.ns) or {}).get("status", {})
                   .get("phase") == "Running" and k.logs("reader").strip(),
                   timeout=180, message="reader read the file")
    assert got == f"written-on-{a}"

    on_a = [(c["command"], c["status"]) for c in _mounting(k.node_calls(a, pv))]
    assert on_a == [("waitforattach", "Success"), ("mountdevice", "Success"),
                    ("mount", "Success"), ("unmount", "Success"),
                    ("unmountdevice", "Success")], on_a
    ops = [(c["command"], c["args"][-1], c["status"]) for c in k.operator_calls(pv)
           if c["command"] in ("attach", "detach")]
    assert ops == [("attach", a, "Success"), ("detach", a, "Success"),
                   ("attach", b, "Success")], ops
    detach = next(c for c in k.operator_calls(pv) if c["command"] == "detach")
    assert detach["args"] == [pv, a]
    b_status = node_obj(api, b)["status"]
    assert {"name": unique(pv), "devicePath": device} in b_status["volumesAttached"]
    assert unique(pv) in b_status.get("volumesInUse", ())

    # and away from b too
    k.delete_pod("reader")
    wait_for(lambda: unique(pv) not in reported(api, b), timeout=120,
             message=f"{unique(pv)} detached from {b}")
    on_b = [c["command"] for c in _mounting(k.node_calls(b, pv))]
    assert on_b == ["waitforattach", "mountdevice", "mount", "unmount", "unmountdevice"], on_b
    wait_for(lambda: [c for c in k.operator_calls(pv) if c["command"] == "detach"
                      and c["args"] == [pv, b] and c["status"] == "Success"], timeout=30,
             message=f"the driver's detach from {b}")


@pytest.mark.timeout(600)
def test_kind_inline_read_only_flex_volume_is_mounted_read_only(kind_flex, api):
    """An inline `flexVolume` with readOnly: volplane attaches it by its pod volume name
    with readwrite "ro", the kubelet mounts it read-only, the pod cannot write to it."""
    k = kind_flex
    node = k.nodes[2]
    vol = f"{k.ns}-ro"
    k.inline.append(vol)
    create(api, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ro", "namespace": k.ns},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                 "terminationGracePeriodSeconds": 0, "restartPolicy": "Never",
                 "containers": [{"name": "main", "image": BUSYBOX, "command": [
                     "sh", "-c", "grep ' /data ' /proc/mounts; echo x > /data/x || "
                     "echo write-refused; sleep 3600"],
                     "volumeMounts": [{"name": vol, "mountPath": "/data"}]}],
                 "volumes": [{"name": vol, "flexVolume": {
                     "driver": DRIVER, "fsType": "ext4", "readOnly": True,
                     "options": {"size": "16Mi"}}}]}})
    k.running("ro")
    out = wait_for(lambda: "write-refused" in (s := k.logs("ro")) and s, timeout=30,
                   message="the pod's write refused")
    mount_line = out.splitlines()[0].split()
    assert mount_line[1:3] == ["/data", "ext4"] and "ro" in mount_line[3].split(","), out
    (attach,) = [c for c in k.operator_calls(vol) if c["command"] == "attach"]
    assert attach["args"][1] == node
    assert json.loads(attach["args"][0]) == {
        "kubernetes.io/fsType": "ext4", "kubernetes.io/pvOrVolumeName": vol,
        "kubernetes.io/readwrite": "ro", "size": "16Mi"}
    assert reported(api, node).get(unique(vol)) == f"{NODE_DISKS}/{vol}.img"
    wfa, mdev, mnt = _mounting(k.node_calls(node, vol))[:3]
    assert (wfa["command"], mdev["command"], mnt["command"]) == (
        "waitforattach", "mountdevice", "mount")
    assert json.loads(mdev["args"][2])["kubernetes.io/readwrite"] == "ro"
    assert json.loads(mnt["args"][1])["kubernetes.io/readwrite"] == "ro"

    k.delete_pod("ro")
    wait_for(lambda: unique(vol) not in reported(api, node), timeout=120,
             message=f"{unique(vol)} detached from {node}")
    wait_for(lambda: [c for c in k.operator_calls(vol) if c["command"] == "detach"
                      and c["status"] == "Success"], timeout=30, message="the driver's detach")
    assert [c["args"] for c in k.operator_calls(vol) if c["command"] == "detach"] == [
        [vol, node]]
    assert [c["command"] for c in _mounting(k.node_calls(node, vol))] == [
        "waitforattach", "mountdevice", "mount", "unmount", "unmountdevice"]
