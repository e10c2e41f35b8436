#!/usr/bin/env python3
"""What Kopf costs per object at start-up, without the network or an API server.

    .venv/bin/python hack/bench/kopf_event_cost.py 2000            # µs of CPU per object
    .venv/bin/python hack/bench/kopf_event_cost.py 1000 profile    # + a cProfile table
    NOPATCH=1 ...   # Kopf's own index barrier (kopf_patches.py not applied)
    FASTPATH=0 ...  # Kopf's own per-object event path (kopf_fastpath.py not applied)
    SORT=cumulative TOP=60 ...                                      # the table's order/size

Runs Kopf's real processing path (queueing.watcher -> per-object worker ->
processing.process_resource_event -> volplane's index and event handlers; or, by
default, volplane's fast path: kopf_fastpath.FastWatcher in place of queueing.watcher)
on an in-memory initial listing of N PVs, N PVCs and N/2 pods, until every object
reached volplane's listeners: the per-object cost the W5 start-up pays, apart from JSON
decoding and the network. The objects are made one by one as the listing yields them,
so the peak RSS growth it prints is what the processing path holds (the slim index
entries, and whatever else keeps a body alive). It uses Kopf's internal modules: a
measuring tool, not a test.
"""

from __future__ import annotations

import asyncio
import cProfile
import functools
import os
import pstats
import resource as rusage
import sys
import time

import kopf
from kopf._cogs.aiokits import aiotoggles
from kopf._cogs.clients import watching
from kopf._cogs.structs import references
from kopf._core.actions import lifecycles
from kopf._core.engines import indexing, posting
from kopf._core.reactor import inventory, processing, queueing

from volplane import kinds as K
from volplane import kopf_fastpath, kopf_patches
from volplane import settings as vsettings
from volplane.informers import Informers

MANAGED = [{"manager": "kube-controller-manager", "fieldsV1": {"f:spec": {}}}] * 3


def pv(i: int) -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": f"pv-{i}", "uid": f"u-pv-{i}", "resourceVersion": str(i),
                         "managedFields": MANAGED,
                         "annotations": {"pv.kubernetes.io/bound-by-controller": "yes"}},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                     "storageClassName": "std", "hostPath": {"path": f"/tmp/{i}"},
                     "claimRef": {"namespace": "ns", "name": f"c-{i}", "uid": f"u-c-{i}"}},
            "status": {"phase": "Bound"}}


def pvc(i: int) -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": f"c-{i}", "namespace": "ns", "uid": f"u-c-{i}",
                         "resourceVersion": str(i), "managedFields": MANAGED},
            "spec": {"volumeName": f"pv-{i}", "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "1Gi"}}},
            "status": {"phase": "Bound"}}


def pod(i: int) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"p-{i}", "namespace": "ns", "uid": f"u-p-{i}",
                         "resourceVersion": str(i), "managedFields": MANAGED},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}],
                     "volumes": [{"name": "d",
                                  "persistentVolumeClaim": {"claimName": f"c-{i}"}}]},
            "status": {"phase": "Running", "containerStatuses": [{"state": {"running": {}}}]}}


def resource(plural: str, kind: str, namespaced: bool) -> references.Resource:
    return references.Resource("", "v1", plural, kind=kind, namespaced=namespaced,
                               verbs=["list", "watch"])


async def main(n: int, profile: bool) -> None:
    if os.environ.get("NOPATCH") != "1":
        assert kopf_patches.apply()
    fast = os.environ.get("FASTPATH", "1") != "0"
    if fast:
        assert kopf_fastpath.apply()
    inf = Informers()  # the kinds and indexes of pv-binder + attachdetach (W5)
    for spec in (K.PVS_BY_CLAIM, K.UNBOUND_CLAIMS_BY_CLASS, K.PODS_BY_CLAIM, K.PODS_BY_NODE):
        inf.index(spec)
    for kind in (K.PVS, K.PVCS, K.PODS):
        inf.listen(kind, lambda *_: None)
    registry = kopf.OperatorRegistry()
    inf.register(registry)
    settings = kopf.OperatorSettings()
    vsettings.configure(settings, [K.PVS, K.PVCS, K.PODS])
    indexers = indexing.OperatorIndexers()
    indexers.ensure(registry._indexing.get_all_handlers())
    inf.bind(dict(indexers.indices))
    posting.settings_var.set(settings)
    objects = {"persistentvolumes": (resource("persistentvolumes", "PersistentVolume", False),
                                     (pv, n)),
               "persistentvolumeclaims": (resource("persistentvolumeclaims",
                                                   "PersistentVolumeClaim", True), (pvc, n)),
               "pods": (resource("pods", "Pod", True), (pod, n // 2))}
    total = sum(v[1][1] for v in objects.values())
    operator_indexed = aiotoggles.ToggleSet(all)
    toggles = {p: await operator_indexed.make_toggle(name=p) for p in objects}
    done, seen = asyncio.Event(), [0]
    on_event = inf.on_event

    def counting(*args, **kwargs):
        on_event(*args, **kwargs)
        seen[0] += 1
        if seen[0] == total:
            done.set()

    inf.on_event = counting  # type: ignore[method-assign]

    async def listing(*, resource, **_):  # the initial listing, then a quiet stream
        make, count = objects[resource.plural][1]
        for i in range(count):
            yield {"type": None, "object": make(i)}
            if i % 100 == 99:
                await asyncio.sleep(0)  # the network's pauses: the kinds interleave
        yield watching.Bookmark.LISTED
        await asyncio.Event().wait()

    queueing.watching.infinite_watch = listing
    processor = functools.partial(
        processing.process_resource_event, lifecycle=lifecycles.all_at_once,
        registry=registry, settings=settings, indexers=indexers,
        memories=inventory.ResourceMemories(), memobase=kopf.Memo(), operator_paused=None,
        event_queue=asyncio.Queue())
    prof = cProfile.Profile() if profile else None
    rss0 = rusage.getrusage(rusage.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    tasks = [asyncio.create_task(queueing.watcher(
        namespace=None, settings=settings, resource=res,
        processor=functools.partial(processor, resource=res),
        operator_indexed=operator_indexed, resource_indexed=toggles[p]))
        for p, (res, _) in objects.items()]
    await done.wait()
    if prof:
        prof.disable()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    grown = (rusage.getrusage(rusage.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    print(f"{'fast path' if fast else 'Kopf path'}: {total} objects: {wall:.2f} s wall, "
          f"{cpu:.2f} s CPU, {cpu / total * 1e6:.0f} µs CPU per object, "
          f"peak RSS +{grown:.0f} MiB (load {os.getloadavg()[0]:.1f})")
    for t in tasks:
        t.cancel()
    if prof:
        stats = pstats.Stats(prof).sort_stats(os.environ.get("SORT", "tottime"))
        stats.print_stats(int(os.environ.get("TOP", "25")))
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000, len(sys.argv) > 2))
