"""The PV controller's effects on the shared fake API: the writes a bind sends, what a
409 does, and convergence after a crash between any two writes."""

from __future__ import annotations

import asyncio

import pytest

from volplane import kinds as K
from volplane.kube import ApiError
from volplane.pv import constants as c
from volplane.pv.controller import PVController

from ..fakeapi import Crash, FakeApi, context, settle


def pv(name, size="10Gi", cls="std"):
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
            "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"],
                     "storageClassName": cls, "persistentVolumeReclaimPolicy": "Retain",
                     "hostPath": {"path": f"/tmp/{name}"}}}


def pvc(name, size="5Gi", cls="std", ns="ns"):
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}"},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": cls,
                     "resources": {"requests": {"storage": size}}}}


def world(*objs):
    api = FakeApi()
    for o in objs:
        api.add(o)
    ctx = context(api)
    ctl = PVController(ctx)
    return api, ctx, ctl


def loops(ctl):
    return [(ctl.volumes, ctl._sync_volume_key), (ctl.claims, ctl._sync_claim_key)]


def bound_pair(api, claim, ns="ns"):
    c_obj = api.obj(K.PVCS, claim, ns)
    volume = c_obj["spec"].get("volumeName")
    v_obj = api.obj(K.PVS, volume) if volume else None
    return c_obj, v_obj


def assert_bound(api, claim, want_volume):
    c_obj, v_obj = bound_pair(api, claim)
    assert c_obj["spec"]["volumeName"] == want_volume
    assert c_obj["status"]["phase"] == "Bound"
    assert v_obj["status"]["phase"] == "Bound"
    assert v_obj["spec"]["claimRef"]["uid"] == c_obj["metadata"]["uid"]
    assert c_obj["metadata"]["annotations"][c.ANN_BIND_COMPLETED] == "yes"


def test_a_bind_sends_exactly_the_decided_writes():
    async def body():
        api, ctx, ctl = world(pv("big", "20Gi"), pv("fit", "8Gi"), pvc("c1"))
        await settle(api, ctx, loops(ctl))
        assert_bound(api, "c1", "fit")
        pv_writes = api.writes(contains="/persistentvolumes/")
        claim_writes = api.writes(contains="/persistentvolumeclaims/")
        # both PVs go Available; then upstream's four bind writes, nothing more
        assert sorted(pv_writes[:2]) == [("patch", K.PVS.path("big", sub="status")),
                                         ("patch", K.PVS.path("fit", sub="status"))]
        assert pv_writes[2:] == [("patch", K.PVS.path("fit")),
                                 ("patch", K.PVS.path("fit", sub="status"))]
        assert claim_writes == [("patch", K.PVCS.path("c1", "ns")),
                                ("patch", K.PVCS.path("c1", "ns", sub="status"))]
        assert api.obj(K.PVS, "big")["status"]["phase"] == "Available"

    asyncio.run(body())


def test_a_conflict_rereads_and_the_next_sync_decides_again():
    """The claim changed under us between deciding and writing (409): the controller
    reads it again, and the retried sync finishes the bind from where it stopped."""

    async def body():
        api, ctx, ctl = world(pv("fit", "8Gi"), pvc("c1"))
        api.sync(ctx.informers)
        await ctl._sync_volume_key("fit")
        api.sync(ctx.informers)
        api.fail("patch", K.PVCS.path("c1", "ns"), 409)
        with pytest.raises(ApiError) as err:
            await ctl._sync_claim_key("ns/c1")
        assert err.value.conflict
        gets = [p for v, p in api.calls if v == "get"]
        assert K.PVCS.path("c1", "ns") in gets               # re-read after the 409
        await settle(api, ctx, loops(ctl))
        assert_bound(api, "c1", "fit")
        # the PV's two writes were not repeated
        assert len(api.writes("patch", "/persistentvolumes/fit")) == 3  # Available + 2

    asyncio.run(body())


@pytest.mark.parametrize("crash_after", [1, 2, 3, 4])
def test_a_crash_after_any_bind_write_converges_without_double_binding(crash_after):
    """Two claims, two PVs of which one fits both; the process dies right after the n-th
    write of the first bind; a new process (fresh informers, same API) converges."""

    async def body():
        api, ctx, ctl = world(pv("a", "8Gi"), pv("b", "9Gi"), pvc("c1"), pvc("c2"))
        api.sync(ctx.informers)
        for name in ("a", "b"):
            await ctl._sync_volume_key(name)
        api.sync(ctx.informers)
        api.crash_after(crash_after)
        with pytest.raises(Crash):
            await ctl._sync_claim_key("ns/c1")
        # restart
        ctx2 = context(api)
        ctl2 = PVController(ctx2)
        await settle(api, ctx2, loops(ctl2))
        c1, v1 = bound_pair(api, "c1")
        c2, v2 = bound_pair(api, "c2")
        assert {c1["spec"]["volumeName"], c2["spec"]["volumeName"]} == {"a", "b"}
        assert_bound(api, "c1", c1["spec"]["volumeName"])
        assert_bound(api, "c2", c2["spec"]["volumeName"])
        assert c1["spec"]["volumeName"] == "a"        # the interrupted bind was finished

    asyncio.run(body())
