"""The attach/detach controller's effects, on the shared fake API (tests/unit/fakeapi.py)."""

from __future__ import annotations

import asyncio

from volplane import kinds as K
from volplane.attach.controller import AttachDetachController
from volplane.attach.reports import NodeReportSchedule
from volplane.workqueue import process

from ..fakeapi import FakeApi, context
from .world import node, pv, uname, va


def test_controller_coalesces_node_reports_while_attachments_arrive():
    """Attachments on one node completing one by one, 50 ms apart: a handful of node
    status writes (not one each), the last one complete and not held back."""

    async def body():
        api = FakeApi()
        ctx = context(api)
        adc = AttachDetachController(ctx)
        adc.node_reports = NodeReportSchedule(debounce=0.01, min_interval=0.3)
        api.add(node("n1"))
        n = 12
        for i in range(n):
            api.add(pv(f"pv{i}"))
            api.add(va(f"pv{i}", "n1", attached=False))
        api.sync(ctx.informers)
        worker = asyncio.create_task(process(adc.node_queue, adc._sync_node,
                                             controller="test", log=None))
        try:
            await asyncio.sleep(0.05)
            t0 = asyncio.get_running_loop().time()
            for i in range(n):
                obj = api.obj(K.VOLUME_ATTACHMENTS, va(f"pv{i}", "n1")["metadata"]["name"])
                path = K.VOLUME_ATTACHMENTS.path(obj["metadata"]["name"], sub="status")
                await api.merge_patch(path,
                                      {"status": {"attached": True, "attachmentMetadata": {
                                          "devicePath": f"/dev/x{i}"}}})
                api.sync(ctx.informers)
                await asyncio.sleep(0.05)
            done_at = asyncio.get_running_loop().time()
            for _ in range(100):
                got = api.obj(K.NODES, "n1")["status"].get("volumesAttached") or []
                if len(got) == n:
                    break
                await asyncio.sleep(0.01)
            reported_at = asyncio.get_running_loop().time()
        finally:
            worker.cancel()
        writes = api.writes("patch", "/api/v1/nodes/n1/status")
        assert {e["name"] for e in got} == {uname(f"pv{i}") for i in range(n)}
        assert {e["devicePath"] for e in got} == {""}  # upstream's devicePath for CSI
        # 0.6 s of arrivals at one write per 0.3 s at most while busy, plus the last
        assert 2 <= len(writes) <= 5, writes
        assert len(writes) < n
        assert reported_at - done_at < 0.2   # the quiet node's last report: debounce only
        assert done_at - t0 > 0.5

    asyncio.run(body())


def test_a_created_attachment_is_not_created_twice_before_the_watch_sees_it():
    """The attachment the controller created is found by its PV at once (the lister
    keeps it until the watch brings it): a second sync creates nothing."""
    from .world import pod, pvc

    async def body():
        api = FakeApi()
        ctx = context(api)
        adc = AttachDetachController(ctx)
        api.add(node("n1"))
        api.add(pv("pv1", claim=("ns", "c1", "uid-ns-c1")))
        api.add(pvc("ns", "c1", "pv1"))
        api.add(pod("ns", "p", "n1", "c1"))
        api.sync(ctx.informers)
        await adc._sync_volume("pv1")
        await adc._sync_volume("pv1")          # the watch has not delivered it yet
        assert len(api.writes("create", "volumeattachments")) == 1
        assert len(api.of_kind(K.VOLUME_ATTACHMENTS)) == 1

    asyncio.run(body())


def test_two_pvs_on_one_handle_share_one_attachment_and_a_pod_going_keeps_it():
    """Upstream's identity is the unique volume name: pods of two PVs on one volume
    handle on one node need one VolumeAttachment; the first pod going detaches nothing."""
    from volplane.kinds import PODS

    from ..fakeapi import settle
    from .world import pod, pvc

    async def body():
        api = FakeApi()
        ctx = context(api)
        adc = AttachDetachController(ctx)
        adc.node_reports = NodeReportSchedule(debounce=0.01, min_interval=0.05)
        api.add(node("n1"))
        for name, claim in (("pv-a", "ca"), ("pv-b", "cb")):
            api.add(pv(name, handle="pool-a/shared", claim=("ns", claim, f"uid-ns-{claim}")))
            api.add(pvc("ns", claim, name))
        api.add(pod("ns", "a", "n1", "ca"))
        api.add(pod("ns", "b", "n1", "cb"))
        adc.running = True
        loops = [(adc.volumes, adc._sync_volume), (adc.node_queue, adc._sync_node)]
        await settle(api, ctx, loops)
        vas = api.of_kind(K.VOLUME_ATTACHMENTS)
        assert len(vas) == 1, vas
        assert vas[0]["spec"]["source"]["persistentVolumeName"] == "pv-a"
        await api.delete(PODS.path("a", "ns"))
        await settle(api, ctx, loops)
        assert len(api.of_kind(K.VOLUME_ATTACHMENTS)) == 1
        assert not [v for v in api.of_kind(K.VOLUME_ATTACHMENTS)
                    if v["metadata"].get("deletionTimestamp")]

    asyncio.run(body())
