"""W5: memory with N PVs, N PVCs and N/2 Pods in the cluster (N = 10,000).

The objects are written directly in their settled state (no controller runs while
they are made): claim i bound to PV i both ways, both phases Bound, and pod i
(for i < N/2) on one of 20 kwok nodes using claim i. The volumes are hostPath,
so neither attach/detach controller has anything to attach: what is measured
is the cost of holding the same objects in each controller's caches.

Each side is then started on that same cluster: upstream kube-controller-manager
with the PV binder and the attach/detach controller (default QPS), and volplane
with pv-binder and attachdetach. For each: time from start to caches synced,
then a settle period (the controllers sync every object once), then RSS
(VmRSS now, VmHWM peak) and the API requests made during the settle (a settled
cluster should cost no writes). Finally every claim is checked to be still Bound
to its PV.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import lib
from lib import LABEL, WORKLOAD, Api

NS = "bench-w5"
NODES = 20
NODE_PREFIX = "bench-node-"


def pvc_body(i: int, run: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": f"w5-pvc-{i:05d}", "namespace": NS, "labels": {LABEL: run},
                     "annotations": {"pv.kubernetes.io/bind-completed": "yes",
                                     "pv.kubernetes.io/bound-by-controller": "yes"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "bench-std",
                 "volumeName": f"w5-pv-{i:05d}",
                 "resources": {"requests": {"storage": "1Gi"}}},
    }


def pv_body(i: int, run: str, claim: dict) -> dict:
    md = claim["metadata"]
    return {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": f"w5-pv-{i:05d}", "labels": {LABEL: run, WORKLOAD: "w5"},
                     "annotations": {"pv.kubernetes.io/bound-by-controller": "yes"}},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "storageClassName": "bench-std", "persistentVolumeReclaimPolicy": "Retain",
                 "hostPath": {"path": f"/tmp/volplane-bench/w5-{i:05d}"},
                 "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                              "namespace": NS, "name": md["name"], "uid": md["uid"]}},
    }


def pod_body(i: int, run: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"w5-pod-{i:05d}", "namespace": NS, "labels": {LABEL: run}},
        "spec": {"nodeName": f"{NODE_PREFIX}{i % NODES:02d}",
                 "automountServiceAccountToken": False,
                 "tolerations": [{"operator": "Exists"}],
                 "containers": [{"name": "app", "image": "registry.invalid/pause:3.10"}],
                 "volumes": [{"name": "data",
                              "persistentVolumeClaim": {"claimName": f"w5-pvc-{i:05d}"}}]},
    }


async def ensure_nodes(env: lib.Env, api: Api, prefix: str, count: int) -> None:
    """kwok-managed nodes (kwok plays their kubelets: pods go Running)."""
    for i in range(count):
        body = env.cluster.node_manifest(f"{prefix}{i:02d}", i)
        body["metadata"]["labels"]["bench.volplane.io/node"] = "true"
        try:
            await api.create("/api/v1/nodes", body)
        except lib.ApiError as e:
            if e.status != 409:
                raise


async def populate(env: lib.Env, api: Api, n: int, pods: int, run: str) -> dict[str, float]:
    t0 = time.monotonic()
    await lib.ensure_namespace(api, NS)
    await ensure_nodes(env, api, NODE_PREFIX, NODES)
    claims_path = f"/api/v1/namespaces/{NS}/persistentvolumeclaims"
    _, claims = await lib.create_many(api, lambda b: claims_path,
                                      [pvc_body(i, run) for i in range(n)])
    claims.sort(key=lambda c: c["metadata"]["name"])
    await lib.create_many(api, lambda b: "/api/v1/persistentvolumes",
                          [pv_body(i, run, c) for i, c in enumerate(claims)])
    t1 = time.monotonic()

    async def bound(i: int) -> None:
        await api.merge_patch(f"/api/v1/persistentvolumes/w5-pv-{i:05d}/status",
                              {"status": {"phase": "Bound"}})
        await api.merge_patch(f"{claims_path}/w5-pvc-{i:05d}/status", {"status": {
            "phase": "Bound", "accessModes": ["ReadWriteOnce"], "capacity": {"storage": "1Gi"}}})
    await _limited((bound(i) for i in range(n)), 32)
    t2 = time.monotonic()
    await lib.create_many(api, lambda b: f"/api/v1/namespaces/{NS}/pods",
                          [pod_body(i, run) for i in range(pods)])
    # let kwok report the pods Running before anyone measures (status churn otherwise)
    deadline = time.monotonic() + max(120, pods * 0.1)
    while time.monotonic() < deadline:
        # (a field-selected LIST reports no remainingItemCount: count the items)
        items = (await api.list(f"/api/v1/namespaces/{NS}/pods",
                                {"fieldSelector": "status.phase=Running"}))
        running = len(items["items"])
        if running >= pods:
            break
        await asyncio.sleep(2)
    return {"claims_and_pvs_s": round(t1 - t0, 1), "status_s": round(t2 - t1, 1),
            "pods_running_s": round(time.monotonic() - t2, 1)}


async def _limited(coros, limit: int) -> None:
    sem = asyncio.Semaphore(limit)

    async def one(c):
        async with sem:
            await c
    await asyncio.gather(*(one(c) for c in coros))


async def verify(api: Api, n: int) -> list[str]:
    errors = []
    claims = (await api.list(f"/api/v1/namespaces/{NS}/persistentvolumeclaims"))["items"]
    vols = {v["metadata"]["name"]: v for v in (await api.list(
        "/api/v1/persistentvolumes", {"labelSelector": f"{WORKLOAD}=w5"}))["items"]}
    if len(claims) != n or len(vols) != n:
        errors.append(f"expected {n} claims and volumes, found {len(claims)} / {len(vols)}")
    for c in claims:
        name, vn = c["metadata"]["name"], c["spec"].get("volumeName")
        pv = vols.get(vn) or {}
        if (c.get("status") or {}).get("phase") != "Bound" or \
                (pv.get("status") or {}).get("phase") != "Bound" or \
                (pv["spec"].get("claimRef") or {}).get("uid") != c["metadata"]["uid"]:
            errors.append(f"claim {name} / volume {vn} no longer bound to each other")
    return errors


async def measure(env: lib.Env, api: Api, side: str, ctl: lib.Controller, settle: float,
                  start_timeout: float) -> dict[str, Any]:
    r: dict[str, Any] = {"side": side}
    before = await api.metrics()
    cpu0 = env.cpu()
    await ctl.start(timeout=start_timeout)
    try:
        r["ready_after_s"] = round(ctl.ready_after, 2)
        r["memory_at_ready"] = ctl.memory()
        await asyncio.sleep(settle)
        r["memory"] = ctl.memory()
        r["cpu_s"] = {"controller": r["memory"]["cpu_seconds"], **lib.cpu_delta(cpu0, env.cpu())}
        after = await api.metrics()
        r["requests"] = lib.diff_requests(before, after)
        own = ctl.own_metrics(lib.OWN_METRICS)
        if own:
            r["own_metrics"] = own
    finally:
        await ctl.stop()
    return r


async def run(env: lib.Env, n: int, include: set[str], quick: bool = False) -> dict[str, Any]:
    pods = n // 2
    run_id = f"w5-{int(time.time())}"
    settle = 10.0 if quick else 30.0
    out: dict[str, Any] = {"n": n, "objects": f"{n} PVs, {n} PVCs, {pods} pods",
                           "settle_s": settle, "sides": {}}
    async with env.api(limit=32) as api:
        import w1_static
        await w1_static.ensure_classes(api)
        lib.log(f"W5: cleaning, then writing {n} bound pairs and {pods} pods")
        await lib.clean(api, namespaces=(NS,), pv_label=f"{WORKLOAD}=w5")
        out["populate_s"] = await populate(env, api, n, pods, run_id)
        lib.log(f"W5: populated {out['populate_s']}")
        sides = []
        if "upstream-default" in include:
            sides.append(("upstream-default", lambda: lib.kcm(
                env, ["persistentvolume-binder-controller",
                      "persistentvolume-attach-detach-controller"],
                qps=None, burst=None, tag="-w5")))
        if "volplane" in include:
            sides.append(("volplane", lambda: lib.volplane(env, "pv-binder,attachdetach",
                                                           tag="-w5")))
        if "volplane-0.2" in include:  # the reflector watch layer, for before/after
            sides.append(("volplane-0.2", lambda: lib.volplane(
                env, "pv-binder,attachdetach", tag="-w5-0.2",
                executable=lib.ensure_volplane_02())))
        if "volplane-nopatch" in include:  # what the one Kopf patch buys (kopf_patches.py)
            sides.append(("volplane-nopatch", lambda: lib.volplane(
                env, "pv-binder,attachdetach", tag="-w5-nopatch",
                env_extra={"VOLPLANE_KOPF_BARRIER_PATCH": "0"})))
        if "volplane-nofast" in include:  # Kopf's per-object event path (kopf_fastpath.py off)
            sides.append(("volplane-nofast", lambda: lib.volplane(
                env, "pv-binder,attachdetach", tag="-w5-nofast",
                env_extra={"VOLPLANE_KOPF_FASTPATH": "0"})))
        if "volplane-list" in include:  # a paginated LIST instead of the streamed one
            sides.append(("volplane-list", lambda: lib.volplane(
                env, "pv-binder,attachdetach", tag="-w5-list", extra=["--watch-initial", "list"])))
        try:
            for side, make in sides:
                lib.log(f"W5 {side}: start, sync, settle {settle:.0f} s")
                load0 = os.getloadavg()[0]
                try:
                    r = await measure(env, api, side, make(), settle, 300.0 if quick else 900.0)
                    errors = await verify(api, n)
                except (lib.ApiError, RuntimeError) as e:
                    r, errors = {"side": side}, [str(e)[:2000]]
                r["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
                r["correct"] = not errors
                r["errors"] = errors[:10]
                out["sides"][side] = r
                lib.log(f"W5 {side}: ready after {r.get('ready_after_s')} s, memory "
                        f"{r.get('memory')}, requests {r.get('requests', {}).get('controller')}, "
                        f"correct {r['correct']} {errors[:2]}")
        finally:
            if not lib.KEEP_FAILED:
                try:  # a slow cleanup (a loaded API server) must not lose the measurements
                    await lib.clean(api, namespaces=(NS,), pv_label=f"{WORKLOAD}=w5")
                except RuntimeError as e:
                    out["cleanup_error"] = str(e)
                    lib.log(f"W5: {e} (the next run cleans up first)")
    return out
