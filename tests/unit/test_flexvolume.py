"""FlexVolume driver protocol (volplane.volumeplugins.flex): the real sample driver
(hack/flexvolume/volplane-demo~disk/disk) and small fake drivers written into tmp dirs,
run as real subprocesses. No cluster."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from volplane.volumeplugins import (
    CSIPlugin,
    FlexVolumeError,
    FlexVolumePlugin,
    MultiplePluginsMatched,
    NoPluginMatched,
    VolumePluginRegistry,
    VolumeSpec,
    split_unique_name,
    unique_volume_name,
)
from volplane.volumeplugins import flex as F
from volplane.volumeplugins.prober import ProbeEvent, ProbeOp

from .flex_helpers import DRIVER, fake_driver, flex_pv, inline_flex, metric


def run(coro):
    return asyncio.run(coro)


# -- the sample driver, end to end through the plugin ---------------------------------------
def test_sample_driver_controller_calls(sample):
    plugin = run(FlexVolumePlugin.probe(str(sample.dir), "volplane-demo~disk"))
    assert plugin.name == DRIVER and plugin.attachable
    spec = VolumeSpec.from_pv(flex_pv(options={"size": "32Mi"}))

    async def scenario():
        name = await unique_volume_name(plugin, spec)
        device = await plugin.attach(spec, "node-a")
        on_a = await plugin.volumes_are_attached([spec], "node-a")
        on_b = await plugin.volumes_are_attached([spec], "node-b")
        await plugin.detach(split_unique_name(name)[1], "node-a")
        after = await plugin.volumes_are_attached([spec], "node-a")
        return name, device, on_a, on_b, after

    name, device, on_a, on_b, after = run(scenario())
    assert name == "volplane-demo/disk/pv-1"
    assert device == str(Path(os.environ["VOLPLANE_DEMO_DISK_DIR"]) / "pv-1.img")
    assert (on_a, on_b, after) == ([True], [False], [False])

    # the exact command lines and options upstream passes
    attach = sample.calls("attach")[0]
    opts, node = attach["args"]
    assert node == "node-a"
    assert json.loads(opts) == {"kubernetes.io/fsType": "ext4", "kubernetes.io/readwrite": "rw",
                                "kubernetes.io/pvOrVolumeName": "pv-1", "size": "32Mi"}
    assert opts == ('{"kubernetes.io/fsType":"ext4","kubernetes.io/pvOrVolumeName":"pv-1",'
                    '"kubernetes.io/readwrite":"rw","size":"32Mi"}')  # Go's sorted, compact form
    assert sample.calls("detach")[0]["args"] == ["pv-1", "node-a"]
    assert [c["args"][1] for c in sample.calls("isattached")] == ["node-a", "node-b", "node-a"]
    # getvolumename answered Not supported once and was never run again
    assert len(sample.calls("getvolumename")) == 1
    assert plugin.driver.unsupported == {"getvolumename"}
    run(unique_volume_name(plugin, spec))
    assert len(sample.calls("getvolumename")) == 1


def test_sample_driver_rejects_bad_input(sample):
    plugin = run(FlexVolumePlugin.probe(str(sample.dir), "volplane-demo~disk"))
    bad_size = VolumeSpec.from_pv(flex_pv(options={"size": "1.5Gi"}))
    with pytest.raises(FlexVolumeError) as e:
        run(plugin.attach(bad_size, "node-a"))
    assert str(e.value) == ('flexVolume driver volplane-demo/disk: attach command failed, '
                            'status: Failure, reason: invalid size "1.5Gi": use bytes or Ki/Mi/Gi')
    assert e.value.kind == "failure" and e.value.command == "attach"
    with pytest.raises(FlexVolumeError, match="invalid node name"):
        run(plugin.attach(VolumeSpec.from_pv(flex_pv()), "../etc"))
    assert not (sample.state / "attachments" / "pv-1").exists()


def test_options_readonly_from_claim_and_source_options_win(sample):
    """PV: readwrite comes from the pod's claim (spec.read_only), not the PV source's
    readOnly; the source's options override the kubernetes.io keys (upstream order)."""
    plugin = run(FlexVolumePlugin.probe(str(sample.dir), "volplane-demo~disk"))
    pv = flex_pv("pv-ro", read_only_in_source=True, fs_type="",
                 options={"kubernetes.io/pvOrVolumeName": "override", "a&b": "<x>"})
    run(plugin.attach(VolumeSpec.from_pv(pv, read_only=False), "n1"))
    run(plugin.volumes_are_attached([VolumeSpec.from_pv(pv, read_only=True)], "n1"))
    attach, isattached = sample.calls("attach")[0], sample.calls("isattached")[0]
    assert json.loads(attach["args"][0]) == {
        "kubernetes.io/fsType": "", "kubernetes.io/readwrite": "rw",
        "kubernetes.io/pvOrVolumeName": "override", "a&b": "<x>"}
    assert json.loads(isattached["args"][0])["kubernetes.io/readwrite"] == "ro"
    assert "\\u003cx\\u003e" in attach["args"][0] and "a\\u0026b" in attach["args"][0]
    # inline volume: its own readOnly and name
    run(plugin.attach(VolumeSpec.from_volume(inline_flex("scratch", read_only=True)), "n1"))
    opts = json.loads(sample.calls("attach")[1]["args"][0])
    assert opts == {"kubernetes.io/fsType": "", "kubernetes.io/readwrite": "ro",
                    "kubernetes.io/pvOrVolumeName": "scratch"}


def test_mount_options_pod_secret_fsgroup():
    """The kubelet's mount options (upstream flexVolumeMounter.SetUpAt)."""
    spec = VolumeSpec.from_volume(inline_flex("data", secret="creds", options={"x": "1"}))
    pod = {"metadata": {"name": "web", "namespace": "shop", "uid": "u-1"},
           "spec": {"serviceAccountName": "robot"}}
    assert F.secret_ref(spec, "shop") == ("shop", "creds")
    pv_spec = VolumeSpec.from_pv(flex_pv(secret_ref={"name": "s", "namespace": "vault"}))
    assert F.secret_ref(pv_spec, "shop") == ("vault", "s")
    same_ns = VolumeSpec.from_pv(flex_pv(secret_ref={"name": "s"}))
    assert F.secret_ref(same_ns, "shop") == ("shop", "s")
    assert F.secret_ref(VolumeSpec.from_pv(flex_pv()), "shop") is None
    secret = {"type": DRIVER, "data": {"user": base64.b64encode(b"admin").decode(),
                                       "pass": base64.b64encode(b"p\x00ss").decode()}}
    opts = F.mount_options(DRIVER, spec, pod, secret=secret, fs_group=2000)
    assert opts == {"kubernetes.io/fsType": "", "kubernetes.io/readwrite": "rw",
                    "kubernetes.io/pvOrVolumeName": "data",
                    "kubernetes.io/pod.name": "web", "kubernetes.io/pod.namespace": "shop",
                    "kubernetes.io/pod.uid": "u-1", "kubernetes.io/serviceAccount.name": "robot",
                    "kubernetes.io/secret/user": "YWRtaW4=",
                    "kubernetes.io/secret/pass": base64.b64encode(b"p\x00ss").decode(),
                    "kubernetes.io/mounterArgs.FsGroup": "2000", "x": "1"}
    with pytest.raises(FlexVolumeError, match="cannot get secret of type volplane-demo/disk"):
        F.mount_options(DRIVER, spec, pod, secret={"type": "Opaque", "data": {}})


# -- answers --------------------------------------------------------------------------------
@pytest.mark.parametrize("output,kind,text", [
    ('{"status": "Failure", "message": "disk on fire"}', "failure",
     "attach command failed, status: Failure, reason: disk on fire"),
    ('{"status": "Busy"}', "failure", "attach command failed, status: Busy, reason: "),
    ('{"message": "no status"}', "failure", "attach command failed, status: , reason: no status"),
    ('{"status": "Not supported"}', "not_supported", "attach command: Not supported"),
    ("", "invalid_output", "attach command printed an invalid answer: not JSON"),
    ("hello world", "invalid_output", "not JSON"),
    ('{"status": "Success"} trailing', "invalid_output", "not JSON (Extra data"),
    ('["Success"]', "invalid_output", "a JSON array, not an object"),
    ('{"status": "Success", "attached": "yes"}', "invalid_output",
     '"attached" is a JSON string, want a boolean'),
    ('{"status": 1}', "invalid_output", '"status" is a JSON number, want a string'),
    ('{"status": "Success", "capabilities": {"attach": "no"}}', "invalid_output",
     '"capabilities.attach" is a JSON string, want a boolean'),
    ('{"status": "Success", "volumeNewSize": 1.5}', "invalid_output",
     '"volumeNewSize" is a JSON number, want an integer'),
    ('{"status": "Success", "device": NaN}', "invalid_output", "not JSON"),
])
def test_check_status_errors(output, kind, text):
    with pytest.raises(FlexVolumeError) as e:
        F.check_status(DRIVER, "attach", output)
    assert e.value.kind == kind
    assert text in str(e.value)
    assert str(e.value).startswith("flexVolume driver volplane-demo/disk: ")


def test_check_status_success_shapes():
    s = F.check_status(DRIVER, "init", '  {"status":"Success"}\n')
    assert s.capabilities == F.Capabilities(attach=True, selinux_relabel=True,
                                            supports_metrics=False, fs_group=True,
                                            requires_fs_resize=True)
    # partial capabilities keep the other defaults; Go matches member names case-insensitively
    s = F.check_status(DRIVER, "init", '{"Status":"Success","Capabilities":{"Attach":false},'
                                       '"unknown":[1,2]}')
    assert s.capabilities.attach is False and s.capabilities.fs_group is True
    s = F.check_status(DRIVER, "attach", '{"status":"Success","device":"/dev/x","message":null,'
                                         '"capabilities":null,"volumeNewSize":42}')
    assert (s.device, s.message, s.capabilities.attach, s.volume_new_size) == (
        "/dev/x", "", True, 42)


@pytest.mark.parametrize("result,kind,text", [
    (F.ExecResult(start_error="/x: Permission denied"), "exec_error",
     "attach command could not be executed: /x: Permission denied"),
    (F.ExecResult(timed_out=True), "timeout", "attach command timed out after 5s"),
    (F.ExecResult(returncode=1, output=b'{"status":"Success"}'), "driver_bug",
     "attach command exited with status 1 but answered Success (driver bug)"),
    (F.ExecResult(returncode=2, output=b"sh: 1: jq: not found"), "invalid_output",
     "attach command exited with status 2 and printed an invalid answer: not JSON"),
    (F.ExecResult(returncode=1, output=b'{"status":"Failure","message":"m"}'), "failure",
     "status: Failure, reason: m"),
    (F.ExecResult(returncode=1, output=b'{"status":"Not supported"}'), "not_supported",
     "Not supported"),
    (F.ExecResult(returncode=0, output=b"x" * 10, truncated=True), "invalid_output",
     "printed more than"),
])
def test_interpret_exec_results(result, kind, text):
    with pytest.raises(FlexVolumeError) as e:
        F.interpret(DRIVER, "attach", result, 5.0)
    assert e.value.kind == kind and text in str(e.value)


# -- real fake drivers ----------------------------------------------------------------------
def test_failure_nonzero_exit_and_garbage_from_real_processes(tmp_path):
    fake_driver(tmp_path, """
        case "$1" in
        init) echo '{"status":"Success"}' ;;
        attach) echo '{"status":"Failure","message":"no capacity on '"$3"'"}'; exit 1 ;;
        isattached) echo 'sh: jq: not found' >&2; exit 127 ;;
        detach) echo '{"status":"Success"}'; exit 3 ;;
        getvolumename) printf 'garbage\\n' ;;
        esac
    """)
    plugin = run(FlexVolumePlugin.probe(str(tmp_path), "acme~fake"))
    spec = VolumeSpec.from_pv(flex_pv(driver="acme/fake"))
    before = metric("volplane_flexvolume_driver_calls_total", driver="acme/fake",
                    command="attach", status="failure")
    with pytest.raises(FlexVolumeError) as e:
        run(plugin.attach(spec, "node-9"))
    assert str(e.value) == ("flexVolume driver acme/fake: attach command failed, status: "
                            "Failure, reason: no capacity on node-9")
    assert metric("volplane_flexvolume_driver_calls_total", driver="acme/fake",
                  command="attach", status="failure") == before + 1
    # stderr is read with stdout (upstream CombinedOutput): a stray message is an invalid answer
    with pytest.raises(FlexVolumeError) as e:
        run(plugin.volumes_are_attached([spec], "node-9"))
    assert e.value.kind == "invalid_output"
    assert "isattached command exited with status 127" in str(e.value)
    assert "jq: not found" in str(e.value)
    with pytest.raises(FlexVolumeError) as e:
        run(plugin.detach("pv-1", "node-9"))
    assert e.value.kind == "driver_bug"
    # getvolumename failing fails the unique name (upstream GetVolumeName returns the error)
    with pytest.raises(FlexVolumeError, match="getvolumename command printed an invalid answer"):
        run(unique_volume_name(plugin, spec))
    assert plugin.driver.unsupported == set()  # only "Not supported" is remembered


def test_not_supported_fallbacks_and_cache(tmp_path):
    calls = tmp_path / "calls"
    fake_driver(tmp_path, f"""
        echo "$1" >> {calls}
        case "$1" in
        init) echo '{{"status":"Success","capabilities":{{"attach":true}}}}' ;;
        getvolumename) echo '{{"status":"Success","volumeName":"ignored-by-upstream"}}' ;;
        *) echo '{{"status":"Not supported"}}'; exit 1 ;;
        esac
    """)
    plugin = run(FlexVolumePlugin.probe(str(tmp_path), "acme~fake"))
    spec = VolumeSpec.from_volume(inline_flex("vol-a", driver="acme/fake"))

    async def twice():
        out = []
        for _ in range(2):
            out.append((await plugin.attach(spec, "n1"),
                        await plugin.volumes_are_attached([spec], "n1"),
                        await plugin.detach("vol-a", "n1"),
                        await unique_volume_name(plugin, spec)))
        return out

    # attach -> "" (attacherDefaults), isattached -> None (keep state), detach -> done,
    # getvolumename Success -> still the volume's own name (upstream ignores volumeName)
    assert run(twice()) == [("", None, None, "acme/fake/vol-a")] * 2
    assert calls.read_text().split() == ["init", "attach", "isattached", "detach",
                                         "getvolumename", "getvolumename"]
    assert plugin.driver.unsupported == {"attach", "isattached", "detach"}


def test_init_not_supported_or_failing_fails_the_probe(tmp_path):
    fake_driver(tmp_path, """echo '{"status":"Not supported"}'; exit 1\n""", "acme~ns")
    fake_driver(tmp_path, """echo '{"status":"Failure","message":"no license"}'; exit 1\n""",
                "acme~fail")
    with pytest.raises(FlexVolumeError) as e:
        run(FlexVolumePlugin.probe(str(tmp_path), "acme~ns"))
    assert e.value.not_supported and e.value.command == "init"
    with pytest.raises(FlexVolumeError, match="init command failed, status: Failure, "
                                              "reason: no license"):
        run(FlexVolumePlugin.probe(str(tmp_path), "acme~fail"))


def test_not_executable_and_missing(tmp_path):
    d = tmp_path / "acme~plain"
    d.mkdir()
    (d / "plain").write_text("#!/bin/sh\necho '{\"status\":\"Success\"}'\n")  # no x bit
    with pytest.raises(FlexVolumeError) as e:
        run(FlexVolumePlugin.probe(str(tmp_path), "acme~plain"))
    assert e.value.kind == "exec_error" and "Permission denied" in str(e.value)
    (tmp_path / "acme~empty").mkdir()
    with pytest.raises(FlexVolumeError) as e:
        run(FlexVolumePlugin.probe(str(tmp_path), "acme~empty"))
    assert e.value.kind == "exec_error" and "No such file" in str(e.value)


def test_hanging_driver_is_killed_after_the_timeout(tmp_path):
    pidfile = tmp_path / "pids"
    fake_driver(tmp_path, f"""
        case "$1" in
        init) echo '{{"status":"Success"}}' ;;
        attach)
            sleep 300 &
            echo $! >> {pidfile}
            echo $$ >> {pidfile}
            trap '' TERM   # ignores SIGTERM: only SIGKILL ends it
            wait ;;
        esac
    """)
    plugin = run(FlexVolumePlugin.probe(str(tmp_path), "acme~fake", call_timeout=0.5,
                                        kill_grace=0.3))
    t0 = time.monotonic()
    with pytest.raises(FlexVolumeError) as e:
        run(plugin.attach(VolumeSpec.from_pv(flex_pv(driver="acme/fake")), "n1"))
    elapsed = time.monotonic() - t0
    assert e.value.kind == "timeout"
    assert str(e.value) == "flexVolume driver acme/fake: attach command timed out after 0.5s"
    assert elapsed < 10
    # the whole process group is gone: the driver and the child it started
    for pid in map(int, pidfile.read_text().split()):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            if Path(f"/proc/{pid}/stat").exists() and \
                    Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                break  # a zombie awaiting its (killed) parent's reaper
            time.sleep(0.05)
        else:
            pytest.fail(f"process {pid} survived the timeout")


def test_huge_output_is_cut(tmp_path):
    fake_driver(tmp_path, """
        case "$1" in
        init) echo '{"status":"Success"}' ;;
        attach) yes '{"status":"Success"}' ;;
        esac
    """)
    plugin = run(FlexVolumePlugin.probe(str(tmp_path), "acme~fake", call_timeout=20))
    with pytest.raises(FlexVolumeError, match="printed more than 1048576 bytes"):
        run(plugin.attach(VolumeSpec.from_pv(flex_pv(driver="acme/fake")), "n1"))


def test_attach_false_driver_is_not_attachable_and_never_called(tmp_path):
    calls = tmp_path / "calls"
    fake_driver(tmp_path, f"""
        echo "$1" >> {calls}
        echo '{{"status":"Success","capabilities":{{"attach":false}}}}'
    """, "acme~nfs")
    plugin = run(FlexVolumePlugin.probe(str(tmp_path), "acme~nfs"))
    registry = VolumePluginRegistry()
    registry.apply([ProbeEvent(ProbeOp.ADD_OR_UPDATE, plugin.name, plugin, "acme~nfs")])
    spec = VolumeSpec.from_pv(flex_pv(driver="acme/nfs"))
    assert registry.find_plugin_by_spec(spec) is plugin
    assert registry.find_attachable_plugin_by_spec(spec) is None
    assert registry.find_attachable_plugin_by_name("acme/nfs") is None
    for call in (plugin.attach(spec, "n1"), plugin.detach("pv-1", "n1"),
                 plugin.volumes_are_attached([spec], "n1")):
        with pytest.raises(FlexVolumeError, match="does not support attach"):
            run(call)
    assert calls.read_text().split() == ["init"]


# -- the registry ---------------------------------------------------------------------------
def csi_pv(name="pv-c", driver="pool.volplane.io", handle="h-1", modes=("ReadWriteOnce",)):
    return {"metadata": {"name": name},
            "spec": {"accessModes": list(modes), "csi": {"driver": driver, "volumeHandle": handle}}}


def test_registry_csi_entry():
    reg = VolumePluginRegistry()
    spec = VolumeSpec.from_pv(csi_pv())
    plugin = reg.find_attachable_plugin_by_spec(spec)
    assert isinstance(plugin, CSIPlugin) and plugin.attach_mechanism == "VolumeAttachment"
    assert run(unique_volume_name(plugin, spec)) == "kubernetes.io/csi/pool.volplane.io^h-1"
    assert split_unique_name("kubernetes.io/csi/pool.volplane.io^h-1") == (
        "kubernetes.io/csi", "pool.volplane.io^h-1")
    assert plugin.metric_plugin_name(spec) == "kubernetes.io/csi:pool.volplane.io"
    assert not plugin.multi_attach_allowed(spec)
    assert plugin.multi_attach_allowed(VolumeSpec.from_pv(csi_pv(modes=("ReadWriteMany",))))
    assert plugin.multi_attach_allowed(VolumeSpec.from_pv(csi_pv(modes=())))
    drivers = {"pool.volplane.io": {"spec": {"attachRequired": False}}}
    assert reg.find_attachable_plugin_by_spec(spec, csi_drivers=drivers) is None
    drivers = {"pool.volplane.io": {"spec": {}}}
    assert reg.find_attachable_plugin_by_spec(spec, csi_drivers=drivers) is plugin
    inline = VolumeSpec.from_volume({"name": "eph", "csi": {"driver": "pool.volplane.io"}})
    assert reg.find_attachable_plugin_by_spec(inline) is None  # ephemeral: never attached


def test_registry_flex_lookup_add_remove(sample):
    reg = VolumePluginRegistry()
    spec = VolumeSpec.from_pv(flex_pv())
    with pytest.raises(NoPluginMatched,
                       match='flexVolume driver "volplane-demo/disk" is not installed'):
        reg.find_attachable_plugin_by_spec(spec)
    with pytest.raises(NoPluginMatched):
        reg.find_plugin_by_spec(VolumeSpec.from_volume({"name": "tmp", "emptyDir": {}}))
    plugin = run(FlexVolumePlugin.probe(str(sample.dir), "volplane-demo~disk"))
    reg.apply([ProbeEvent(ProbeOp.ADD_OR_UPDATE, DRIVER, plugin, "volplane-demo~disk")])
    assert reg.find_attachable_plugin_by_spec(spec) is plugin
    assert reg.find_attachable_plugin_by_name(DRIVER) is plugin
    assert reg.find_plugin_by_name("kubernetes.io/csi").name == "kubernetes.io/csi"
    assert metric("volplane_volume_plugins", plugin=DRIVER, attachable="true") == 1
    # an inline flex volume: multi-attach allowed (upstream: only PVs are known to forbid it)
    assert plugin.multi_attach_allowed(VolumeSpec.from_volume(inline_flex()))
    assert not plugin.multi_attach_allowed(spec)
    reg.apply([ProbeEvent(ProbeOp.REMOVE, DRIVER, None, "volplane-demo~disk")])
    with pytest.raises(NoPluginMatched):
        reg.find_plugin_by_name(DRIVER)
    assert metric("volplane_volume_plugins", plugin=DRIVER, attachable="true") == 0


def test_registry_rejects_two_plugins_for_one_spec():
    class Greedy:
        name = "example.com/greedy"
        attachable = False

        def can_support(self, spec):
            return True

    reg = VolumePluginRegistry([CSIPlugin(), Greedy()])
    with pytest.raises(MultiplePluginsMatched, match="kubernetes.io/csi,example.com/greedy"):
        reg.find_plugin_by_spec(VolumeSpec.from_pv(csi_pv()))
    with pytest.raises(ValueError, match="registered more than once"):
        VolumePluginRegistry([CSIPlugin(), CSIPlugin()])


def test_split_unique_name_rejects_short_names():
    assert split_unique_name("volplane-demo/disk/pv-1") == ("volplane-demo/disk", "pv-1")
    with pytest.raises(ValueError):
        split_unique_name("disk/pv-1")


# -- the sample driver's node side (real loop devices; needs root) --------------------------
def _can_loop() -> bool:
    if os.geteuid() != 0 or not shutil.which("losetup") or not shutil.which("mkfs.ext4"):
        return False
    return os.path.exists("/dev/loop-control")


@pytest.mark.skipif(not _can_loop(), reason="needs root, losetup and mkfs.ext4")
def test_sample_driver_node_side_mounts_for_real(sample, tmp_path):
    """waitforattach -> mountdevice -> mount -> unmount -> unmountdevice, as the kubelet
    calls them, with a real loop device, ext4 and bind mount."""
    drv = F.FlexDriver(str(sample.dir), "volplane-demo~disk", call_timeout=60)
    spec = VolumeSpec.from_pv(flex_pv("pv-node", options={"size": "16Mi"}))
    opts = F.go_json(F.driver_options(DRIVER, "attach", spec))
    root = tmp_path / "kubelet"
    global_dir = root / "plugins/kubernetes.io/flexvolume/volplane-demo/disk/mounts/pv-node"
    pod_dir = root / "pods/uid-1/volumes/volplane-demo~disk/pv-node"
    pod = {"metadata": {"name": "p", "namespace": "ns", "uid": "uid-1"},
           "spec": {"serviceAccountName": "default"}}
    loop = None

    async def node_side():
        nonlocal loop
        device = (await drv.call("attach", opts, "n1")).device
        loop = (await drv.call("waitforattach", device, opts)).device
        again = (await drv.call("waitforattach", device, opts)).device
        await drv.call("mountdevice", str(global_dir), loop, opts)
        await drv.call("mount", str(pod_dir),
                       F.go_json(F.mount_options(DRIVER, spec, pod, fs_group=1000)))
        (pod_dir / "hello").write_text("hi")
        seen = (global_dir / "hello").read_text()
        await drv.call("unmount", str(pod_dir))
        await drv.call("unmountdevice", str(global_dir))
        return again, seen

    try:
        again, seen = run(node_side())
    finally:
        for d in (pod_dir, global_dir):
            subprocess.run(["umount", str(d)], capture_output=True)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
    assert loop.startswith("/dev/loop") and again == loop  # idempotent
    assert seen == "hi"
    assert subprocess.run(["mountpoint", "-q", str(global_dir)]).returncode != 0
    assert loop not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    mount_call = sample.calls("mount")[0]
    assert mount_call["args"][0] == str(pod_dir)
    mopts = json.loads(mount_call["args"][1])
    assert mopts["kubernetes.io/pod.uid"] == "uid-1"
    assert mopts["kubernetes.io/mounterArgs.FsGroup"] == "1000"
    assert sample.calls("mountdevice")[0]["args"][:2] == [str(global_dir), loop]


def test_escaped_child_holding_the_output_pipe_cannot_hang_a_call(tmp_path):
    """A driver that answers but leaves a process outside its group holding stdout: the
    call ends at the timeout (upstream would wait for the pipe forever)."""
    pidfile = tmp_path / "pid"
    fake_driver(tmp_path, f"""
        case "$1" in
        init) echo '{{"status":"Success"}}' ;;
        attach) setsid sleep 300 & echo $! > {pidfile}; echo '{{"status":"Success"}}' ;;
        esac
    """)
    plugin = run(FlexVolumePlugin.probe(str(tmp_path), "acme~fake", call_timeout=0.5,
                                        kill_grace=0.2))
    try:
        with pytest.raises(FlexVolumeError) as e:
            run(plugin.attach(VolumeSpec.from_pv(flex_pv(driver="acme/fake")), "n1"))
        assert e.value.kind == "timeout"
    finally:
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), 9)
            except ProcessLookupError:
                pass
