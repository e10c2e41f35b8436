"""The pool attacher (volplane.pools.attacher) on the shared fake API, with and without
the attach/detach controller in front of it."""

from __future__ import annotations

import asyncio

from volplane import kinds as K
from volplane.attach.controller import AttachDetachController
from volplane.pools import slots as S
from volplane.pools.attacher import PoolAttacher

from ..attach.world import DRIVER, node, pod, pv, pvc, uname
from ..fakeapi import FakeApi, context, settle


def pool_obj(name, names, slots=16):
    return {"apiVersion": "volplane.io/v1alpha1", "kind": "StoragePool",
            "metadata": {"name": name},
            "spec": {"capacity": "10Gi", "nodes": {"names": list(names)},
                     "slotsPerNode": slots}}


def attachment(name, pv_name, node_name):
    return {"apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment",
            "metadata": {"name": name},
            "spec": {"attacher": DRIVER, "nodeName": node_name,
                     "source": {"persistentVolumeName": pv_name}}}


def attached(va):
    return (va.get("status") or {}).get("attached")


def test_controller_and_pool_attacher_attach_report_and_detach():
    async def body():
        api = FakeApi()
        ctx = context(api)
        adc = AttachDetachController(ctx)
        pa = PoolAttacher(ctx)
        api.add(pool_obj("pool-a", ["n1"], slots=2))
        for n in (node("n1"), node("n2")):
            api.add(n)
        for i in range(3):
            api.add(pv(f"pv{i}", claim=("ns", f"c{i}", f"uid-ns-c{i}")))
            api.add(pvc("ns", f"c{i}", f"pv{i}"))
            api.add(pod("ns", f"p{i}", "n1", f"c{i}"))
        api.add(pod("ns", "elsewhere", "n2", "c0"))
        loops = [(adc.volumes, adc._sync_volume), (pa.queue, pa.sync),
                 (adc.node_queue, adc._sync_node)]
        adc.running = True
        await settle(api, ctx, loops)

        vas = {v["metadata"]["name"]: v for v in api.of_kind(K.VOLUME_ATTACHMENTS)}
        assert len(vas) == 3  # one per volume; pv0 not attached to n2 too
        slots = sorted(v["metadata"]["annotations"][S.SLOT_ANNOTATION]
                       for v in vas.values() if attached(v))
        assert slots == ["0", "1"]  # slots per node: 2
        waiting = [v for v in vas.values() if not attached(v)]
        assert len(waiting) == 1
        assert waiting[0]["status"]["attachError"]["message"] == S.no_slot_message(
            "n1", 2, 2, "pool-a")
        reported = api.obj(K.NODES, "n1")["status"]["volumesAttached"]
        assert len(reported) == 2
        assert all(e["devicePath"] == "" for e in reported)  # upstream's for CSI volumes
        events = ctx.events.posted
        assert any(r == "FailedAttachVolume" and "no free device slot" in m
                   for _, r, m in events)
        assert any(p == "elsewhere" and m.startswith('Waiting for detach for volume "pv0"')
                   for p, _, m in events)

        # delete an attached pod: its volume detaches, its slot goes to the waiting one
        holder = next(v for v in vas.values() if attached(v))
        pv_freed = holder["spec"]["source"]["persistentVolumeName"]
        await api.delete(K.PODS.path(f"p{pv_freed[2:]}", "ns"))
        await api.delete(K.PODS.path("elsewhere", "ns"))
        await settle(api, ctx, loops)
        vas = {v["metadata"]["name"]: v for v in api.of_kind(K.VOLUME_ATTACHMENTS)}
        assert holder["metadata"]["name"] not in vas
        assert all(attached(v) for v in vas.values())
        assert sorted(v["metadata"]["annotations"][S.SLOT_ANNOTATION]
                      for v in vas.values()) == ["0", "1"]
        names = {e["name"] for e in api.obj(K.NODES, "n1")["status"]["volumesAttached"]}
        assert uname(pv_freed) not in names and len(names) == 2

    asyncio.run(body())


def test_pool_attacher_rejects_a_node_outside_the_pool():
    async def body():
        api = FakeApi()
        ctx = context(api)
        pa = PoolAttacher(ctx)
        api.add(pool_obj("pool-a", ["n1"]))
        api.add(node("n2"))
        api.add(pv("pv1"))
        api.add(attachment("va1", "pv1", "n2"))
        await settle(api, ctx, [(pa.queue, pa.sync)])
        va1 = api.obj(K.VOLUME_ATTACHMENTS, "va1")
        assert va1["status"]["attached"] is False
        assert va1["status"]["attachError"]["message"].startswith(
            "node n2 is not attached to StoragePool pool-a")
        assert "finalizers" not in va1["metadata"]

    asyncio.run(body())


def test_pool_attacher_concurrent_allocations_on_one_node_never_share_a_slot():
    async def body():
        api = FakeApi()
        api.delay = 0.001  # let concurrent writes interleave
        ctx = context(api)
        pa = PoolAttacher(ctx)
        api.add(pool_obj("pool-a", ["n1"], slots=8))
        api.add(node("n1"))
        names = []
        for i in range(10):
            api.add(pv(f"pv{i}"))
            api.add(attachment(f"va{i}", f"pv{i}", "n1"))
            names.append(f"va{i}")
        api.sync(ctx.informers)
        await asyncio.gather(*(pa.sync(n) for n in names))   # all at once
        await settle(api, ctx, [(pa.queue, pa.sync)])
        vas = [api.obj(K.VOLUME_ATTACHMENTS, n) for n in names]
        slots = [v["metadata"]["annotations"][S.SLOT_ANNOTATION] for v in vas if attached(v)]
        assert sorted(slots, key=int) == [str(i) for i in range(8)]
        failed = [v for v in vas if not attached(v)]
        assert len(failed) == 2
        assert all("no free device slot (8/8 in use" in v["status"]["attachError"]["message"]
                   for v in failed)
        assert pa.reserved == {}

    asyncio.run(body())
