"""The attach/detach controller running FlexVolume drivers (real processes: the sample
driver and broken ones) against the shared fake API."""

from __future__ import annotations

import asyncio
import json

from volplane import kinds as K
from volplane.attach.controller import AttachDetachController

from ..fakeapi import FakeApi, context, settle
from ..flex_helpers import DRIVER, fake_driver, flex_pv
from .world import node, pod, pvc

KEY = "volplane-demo/disk/fpv"


def bound_flex_pv(name="fpv", driver=DRIVER):
    obj = flex_pv(name, driver=driver)
    obj["spec"]["claimRef"] = {"namespace": "ns", "name": "c1", "uid": "uid-ns-c1"}
    return obj


def controller(api, plugin_dir):
    ctx = context(api, flex_volume_plugin_dir=str(plugin_dir), flex_call_timeout=5.0,
                  flex_verify_period=3600.0)
    return ctx, AttachDetachController(ctx)


async def run_until_quiet(api, ctx, adc, rounds=20):
    loops = [(adc.volumes, adc._sync_volume), (adc.node_queue, adc._sync_node)]
    for _ in range(rounds):
        await settle(api, ctx, loops)
        if not adc.flex.tasks:
            await asyncio.sleep(0.15)   # node report debounce
            await settle(api, ctx, loops)
            if not adc.flex.tasks:
                return
        await asyncio.gather(*list(adc.flex.tasks), return_exceptions=True)
    raise AssertionError("flex operations did not finish")


def attached(api, name="n1"):
    return (api.obj(K.NODES, name)["status"].get("volumesAttached") or [])


def world(api, *, driver=DRIVER, node_name="n1", pod_name="p"):
    api.add(node("n1"))
    api.add(node("n2"))
    api.add(bound_flex_pv(driver=driver))
    api.add(pvc("ns", "c1", "fpv"))
    api.add(pod("ns", pod_name, node_name, "c1"))


def test_flex_pv_is_attached_by_the_driver_reported_and_detached(sample):
    async def body():
        api = FakeApi()
        ctx, adc = controller(api, sample.dir)
        world(api)
        await adc.flex.registry.refresh()
        api.sync(ctx.informers)
        await run_until_quiet(api, ctx, adc)
        (call,) = sample.calls("attach")
        opts = json.loads(call["args"][0])
        assert call["args"][1] == "n1"
        assert opts["kubernetes.io/pvOrVolumeName"] == "fpv"
        assert opts["kubernetes.io/readwrite"] == "rw"
        assert opts["kubernetes.io/fsType"] == "ext4"
        assert attached(api) == [{"name": KEY, "devicePath": call["device"]}]
        assert any(r == "SuccessfulAttachVolume" for _, r, _ in ctx.events.posted)
        assert not api.writes("create", "volumeattachments")     # no API object for flex

        await api.delete(K.PODS.path("p", namespace="ns"))
        await run_until_quiet(api, ctx, adc)
        (d,) = sample.calls("detach")
        assert d["args"] == ["fpv", "n1"]
        assert attached(api) == []
        # the node report dropped it before the driver's detach ran (upstream's order)
        patches = api.writes("patch", "/api/v1/nodes/n1/status")
        assert patches

    asyncio.run(body())


def test_a_volume_in_use_is_not_detached_until_the_node_stops_using_it(sample):
    async def body():
        api = FakeApi()
        ctx, adc = controller(api, sample.dir)
        world(api)
        await adc.flex.registry.refresh()
        api.sync(ctx.informers)
        await run_until_quiet(api, ctx, adc)
        await api.merge_patch("/api/v1/nodes/n1/status", {"status": {"volumesInUse": [KEY]}})
        await api.delete(K.PODS.path("p", namespace="ns"))
        await run_until_quiet(api, ctx, adc)
        assert sample.calls("detach") == []
        assert [e["name"] for e in attached(api)] == [KEY]
        await api.merge_patch("/api/v1/nodes/n1/status", {"status": {"volumesInUse": []}})
        await run_until_quiet(api, ctx, adc)
        assert len(sample.calls("detach")) == 1
        assert attached(api) == []

    asyncio.run(body())


def test_garbage_from_attach_is_an_event_naming_driver_and_command(tmp_path, monkeypatch):
    from volplane.attach import flexvolumes
    monkeypatch.setattr(flexvolumes, "BACKOFF_BASE", 1000.0)   # retries only by hand

    async def body():
        plugins = tmp_path / "plugins"
        fake_driver(plugins, """
            case "$1" in
              init) echo '{"status": "Success", "capabilities": {"attach": true}}';;
              getvolumename) echo '{"status": "Not supported"}';;
              *) echo 'this is not JSON';;
            esac
        """, name="acme~garbage")
        api = FakeApi()
        ctx, adc = controller(api, plugins)
        world(api, driver="acme/garbage")
        await adc.flex.registry.refresh()
        api.sync(ctx.informers)
        await run_until_quiet(api, ctx, adc)
        failed = [(o, m) for o, r, m in ctx.events.posted if r == "FailedAttachVolume"]
        assert failed, ctx.events.posted
        obj, msg = failed[0]
        assert obj == "p"
        assert msg.startswith('AttachVolume.Attach failed for volume "fpv" : ')
        assert "acme/garbage" in msg and "attach" in msg and "this is not JSON" in msg
        assert attached(api) == []
        key = ("acme/garbage/fpv", "n1")
        assert key in adc.flex.uncertain      # the driver may have attached it: unknown
        assert adc.flex.retry_at   # backed off, not hammering the driver

        # no longer desired: an uncertain attachment is detached (upstream's uncertain)
        await api.delete(K.PODS.path("p", namespace="ns"))
        adc.flex.retry_at.clear()
        await run_until_quiet(api, ctx, adc)
        detach_failed = [m for o, r, m in ctx.events.posted if r == "FailedDetachVolume"]
        assert detach_failed and detach_failed[0].startswith(
            'DetachVolume.Detach failed for volume "fpv" : '), ctx.events.posted
        assert "acme/garbage" in detach_failed[0] and "detach" in detach_failed[0]
        assert attached(api) == []            # never reported meanwhile

    asyncio.run(body())


def test_a_failed_attach_is_detached_when_no_longer_desired(tmp_path, monkeypatch):
    """A driver that fails attach (it may have attached anyway): once the pod is gone,
    the controller runs detach; while the pod exists it retries attach."""
    from volplane.attach import flexvolumes
    monkeypatch.setattr(flexvolumes, "BACKOFF_BASE", 1000.0)   # retries only by hand

    async def body():
        plugins = tmp_path / "plugins"
        log = tmp_path / "calls"
        fake_driver(plugins, f"""
            echo "$1" >> {log}
            case "$1" in
              init) echo '{{"status": "Success", "capabilities": {{"attach": true}}}}';;
              attach) echo '{{"status": "Failure", "message": "backend busy"}}';;
              *) echo '{{"status": "Success"}}';;
            esac
        """, name="acme~flaky")
        api = FakeApi()
        ctx, adc = controller(api, plugins)
        world(api, driver="acme/flaky")
        await adc.flex.registry.refresh()
        api.sync(ctx.informers)
        await run_until_quiet(api, ctx, adc)
        assert "backend busy" in [m for _, r, m in ctx.events.posted
                                  if r == "FailedAttachVolume"][0]
        adc.flex.retry_at.clear()
        adc.volumes.add("acme/flaky/fpv")
        await run_until_quiet(api, ctx, adc)
        assert log.read_text().split().count("attach") == 2      # retried while desired
        assert attached(api) == []
        adc.flex.retry_at.clear()
        await api.delete(K.PODS.path("p", namespace="ns"))
        await run_until_quiet(api, ctx, adc)
        assert log.read_text().split().count("detach") == 1
        assert adc.flex.asw == {} and adc.flex.uncertain == set()
        assert attached(api) == []

    asyncio.run(body())


def test_an_attach_false_driver_is_never_called_for_attach(tmp_path):
    async def body():
        plugins = tmp_path / "plugins"
        log = tmp_path / "calls"
        fake_driver(plugins, f"""
            echo "$1" >> {log}
            case "$1" in
              init) echo '{{"status": "Success", "capabilities": {{"attach": false}}}}';;
              *) echo '{{"status": "Success"}}';;
            esac
        """, name="acme~noattach")
        api = FakeApi()
        ctx, adc = controller(api, plugins)
        world(api, driver="acme/noattach")
        await adc.flex.registry.refresh()
        api.sync(ctx.informers)
        await run_until_quiet(api, ctx, adc)
        assert log.read_text().split() == ["init"]
        assert attached(api) == []
        assert not [r for _, r, _ in ctx.events.posted if r == "FailedAttachVolume"]

    asyncio.run(body())


def test_a_missing_driver_gets_one_event_naming_it(tmp_path):
    async def body():
        plugins = tmp_path / "plugins"
        plugins.mkdir()
        api = FakeApi()
        ctx, adc = controller(api, plugins)
        world(api, driver="acme/absent")
        await adc.flex.registry.refresh()
        api.sync(ctx.informers)
        await run_until_quiet(api, ctx, adc)
        adc.volumes.add("acme/absent/fpv")
        await run_until_quiet(api, ctx, adc)
        msgs = [m for _, r, m in ctx.events.posted if r == "FailedAttachVolume"]
        assert len(msgs) == 1 and '"acme/absent"' in msgs[0], msgs

    asyncio.run(body())


def test_restart_rebuilds_from_node_status_and_verifies_with_isattached(sample):
    """The actual state after a restart is the node report; isattached drops what the
    driver no longer has, and a still-desired volume is attached again."""
    async def body():
        api = FakeApi()
        ctx, adc = controller(api, sample.dir)
        world(api)
        await adc.flex.registry.refresh()
        api.sync(ctx.informers)
        await run_until_quiet(api, ctx, adc)
        assert [e["name"] for e in attached(api)] == [KEY]

        # a new controller process: nothing in memory
        ctx2, adc2 = controller(api, sample.dir)
        await adc2.flex.registry.refresh()
        api.sync(ctx2.informers)
        adc2.flex.rebuild()
        assert set(adc2.flex.asw) == {(KEY, "n1")}
        await adc2.flex.verify()
        await asyncio.gather(*list(adc2.flex.tasks))
        assert (KEY, "n1") in adc2.flex.asw             # the driver says it is attached
        assert len(sample.calls("isattached")) == 1
        await run_until_quiet(api, ctx2, adc2)
        assert len(sample.calls("attach")) == 1          # nothing attached twice

        # the driver lost it (its state wiped): isattached false -> attached again
        for f in sample.state.rglob("*"):
            if f.is_file():
                f.unlink()
        await adc2.flex.verify()
        await asyncio.gather(*list(adc2.flex.tasks))
        await run_until_quiet(api, ctx2, adc2)
        assert len(sample.calls("attach")) == 2
        assert [e["name"] for e in attached(api)] == [KEY]

        # and a volume no longer desired after a restart is detached by its name
        await api.delete(K.PODS.path("p", namespace="ns"))
        ctx3, adc3 = controller(api, sample.dir)
        await adc3.flex.registry.refresh()
        api.sync(ctx3.informers)
        adc3.flex.rebuild()
        await run_until_quiet(api, ctx3, adc3)
        assert [c["args"] for c in sample.calls("detach")] == [["fpv", "n1"]]
        assert attached(api) == []

    asyncio.run(body())


def test_a_detach_whose_driver_is_missing_keeps_the_volume_reported(sample, tmp_path):
    """After a restart with the driver gone, the node report keeps the volume (no
    flapping), and the detach runs once the driver is back."""
    async def body():
        api = FakeApi()
        ctx, adc = controller(api, sample.dir)
        world(api)
        await adc.flex.registry.refresh()
        api.sync(ctx.informers)
        await run_until_quiet(api, ctx, adc)
        await api.delete(K.PODS.path("p", namespace="ns"))
        empty = tmp_path / "empty"
        empty.mkdir()
        ctx2, adc2 = controller(api, empty)
        await adc2.flex.registry.refresh()
        api.sync(ctx2.informers)
        adc2.flex.rebuild()
        before = len(api.writes("patch", "/api/v1/nodes/n1/status"))
        await run_until_quiet(api, ctx2, adc2)
        assert [e["name"] for e in attached(api)] == [KEY]
        assert len(api.writes("patch", "/api/v1/nodes/n1/status")) == before
        assert sample.calls("detach") == []
        import shutil
        shutil.copytree(sample.dir / "volplane-demo~disk", empty / "volplane-demo~disk")
        adc2.flex.registry.prober._probe_all_needed = True
        applied = await adc2.flex.registry.refresh()
        adc2.flex._plugins_changed(applied)
        await run_until_quiet(api, ctx2, adc2)
        assert len(sample.calls("detach")) == 1
        assert attached(api) == []

    asyncio.run(body())


def test_nothing_flex_is_decided_before_the_first_probe(sample):
    """Rebuilt attachments are not detached while no driver is known yet."""
    async def body():
        api = FakeApi()
        api.add(node("n1", attached=[{"name": KEY, "devicePath": "/d"}]))
        ctx, adc = controller(api, sample.dir)
        api.sync(ctx.informers)
        adc.flex.rebuild()
        assert await adc._sync_volume(KEY) == 0.2
        assert adc.flex.asw[(KEY, "n1")].state.value == "attached"
        assert sample.calls() == []
        await adc.flex.registry.refresh()
        await run_until_quiet(api, ctx, adc)
        assert [c["args"] for c in sample.calls("detach")] == [["fpv", "n1"]]
        assert attached(api) == []

    asyncio.run(body())
