"""FlexVolume drivers run by the attach/detach controller (issue 16 phase 2).

Run on a cluster of your own when others share the machine:
    VOLPLANE_CLUSTER=flex .venv/bin/python -m pytest tests/e2e/test_flexvolume.py -x -q

The operator runs as a subprocess with --flex-volume-plugin-dir pointing at a temp dir
holding the sample driver (hack/flexvolume/volplane-demo~disk), whose log shows every
call and its options. On the local control plane kwok plays the kubelets: pods go
Running, nobody mounts anything, and nobody reports status.volumesInUse, so the tests
that need it patch node status themselves, as tests/e2e/test_attach.py does. A flex
PV is static and pre-bound to its claim (claimRef + volumeName, both marked Bound here),
pods are pinned with spec.nodeName: only the attach/detach controller is under test.
"""

from __future__ import annotations

import json
import shutil
import signal
import stat
import textwrap
from pathlib import Path

import pytest

from .conftest import REPO_ROOT
from .helpers import create, events_for, holds_for, wait_for
from .test_attach import World, kwok_nodes, node_obj, patch_status

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
        pytest.skip("the kind step (real kubelets mounting flex volumes) is documented in "
                    "docs/flexvolume.md, not run here")
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
