"""W1: static binding. N PVs and N PVCs of mixed sizes, classes and access modes.

Every claim has a PV of exactly its size, class and access modes (the two
multisets are equal), so smallest-fit matching binds all of them whatever the
order; the end state is checked for that (all Bound, symmetric, no PV twice).

Timeline of one run: clean slate -> controller started, caches synced -> metrics
snapshot -> watches on PVs and PVCs -> all PVs created as fast as one client can
-> wait until the controller has made every PV Available (a barrier: a claim
created while its exact PV is still Pending would take a bigger one and strand
another claim, with any binder) -> all PVCs created -> wait (watch events) until
every PV and PVC is Bound -> 2 s settle -> metrics snapshot, controller memory ->
controller stopped -> end state verified from a fresh LIST -> clean slate.
wall_s runs from the first PV create to the last Bound; bind_wall_s from the
first PVC create; latencies are per claim, from its POST to the watch event
that shows it Bound.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import lib
from lib import ANN_PAIR, LABEL, WORKLOAD, Api, ApiError

NS = "bench-w1"
CLASSES = ("bench-fast", "bench-std", "bench-slow")
SIZES = ("1Gi", "2Gi", "5Gi", "10Gi", "50Gi", "100Gi")
MODES = ((("ReadWriteOnce",), 0.80), (("ReadWriteOnce", "ReadOnlyMany"), 0.15),
         (("ReadWriteMany",), 0.05))
SIZE_BYTES = {"Gi": 1 << 30, "Mi": 1 << 20}


def to_bytes(q: str) -> int:
    return int(q[:-2]) * SIZE_BYTES[q[-2:]]


def pairs(n: int, seed: int = 7) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        r, acc = rnd.random(), 0.0
        modes = MODES[-1][0]
        for m, w in MODES:
            acc += w
            if r < acc:
                modes = m
                break
        out.append({"i": i, "cls": rnd.choice(CLASSES), "size": rnd.choice(SIZES),
                    "modes": list(modes)})
    return out


def pv_body(p: dict, run: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": f"w1-pv-{p['i']:05d}", "labels": {LABEL: run, WORKLOAD: "w1"}},
        "spec": {"capacity": {"storage": p["size"]}, "accessModes": p["modes"],
                 "storageClassName": p["cls"], "persistentVolumeReclaimPolicy": "Retain",
                 "hostPath": {"path": f"/tmp/volplane-bench/w1-{p['i']:05d}"}},
    }


def pvc_body(p: dict, run: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": f"w1-pvc-{p['i']:05d}", "namespace": NS,
                     "labels": {LABEL: run}, "annotations": {ANN_PAIR: f"w1-pv-{p['i']:05d}"}},
        "spec": {"accessModes": p["modes"], "storageClassName": p["cls"],
                 "resources": {"requests": {"storage": p["size"]}}},
    }


async def ensure_classes(api: Api) -> None:
    for cls in CLASSES:
        await api.apply_or_create("/apis/storage.k8s.io/v1/storageclasses", {
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": cls}, "provisioner": "kubernetes.io/no-provisioner",
            "volumeBindingMode": "Immediate", "reclaimPolicy": "Retain"})


class Tracker:
    """Watch-fed: first time each PV / PVC is seen Bound."""

    def __init__(self, n: int):
        self.n = n
        self.claim_bound: dict[str, float] = {}
        self.volume_bound: dict[str, float] = {}
        self.volume_available: dict[str, float] = {}
        self.done = asyncio.Event()
        self.all_available = asyncio.Event()

    def on_claim(self, kind: str, obj: dict, t: float) -> None:
        name = obj["metadata"]["name"]
        if kind != "DELETED" and (obj.get("status") or {}).get("phase") == "Bound":
            self.claim_bound.setdefault(name, t)
            self._check()

    def on_volume(self, kind: str, obj: dict, t: float) -> None:
        name = obj["metadata"]["name"]
        if kind != "DELETED" and (obj.get("status") or {}).get("phase") in ("Available", "Bound"):
            self.volume_available.setdefault(name, t)
            if len(self.volume_available) >= self.n:
                self.all_available.set()
        if kind != "DELETED" and (obj.get("status") or {}).get("phase") == "Bound":
            self.volume_bound.setdefault(name, t)
            self._check()

    def _check(self) -> None:
        if len(self.claim_bound) >= self.n and len(self.volume_bound) >= self.n:
            self.done.set()


async def verify(api: Api, run: str, n: int, plan: list[dict]) -> list[str]:
    """The end state, from a fresh LIST: all bound, symmetric, no PV twice, fits."""
    errors: list[str] = []
    claims = (await api.list(f"/api/v1/namespaces/{NS}/persistentvolumeclaims",
                             {"labelSelector": f"{LABEL}={run}"}))["items"]
    vols = (await api.list("/api/v1/persistentvolumes",
                           {"labelSelector": f"{LABEL}={run}"}))["items"]
    pv_by_name = {v["metadata"]["name"]: v for v in vols}
    if len(claims) != n or len(vols) != n:
        errors.append(f"expected {n} claims and volumes, found {len(claims)} / {len(vols)}")
    used: dict[str, str] = {}
    exact = 0
    for c in claims:
        md, spec = c["metadata"], c["spec"]
        name = md["name"]
        if (c.get("status") or {}).get("phase") != "Bound":
            errors.append(f"claim {name} is {c.get('status', {}).get('phase')}")
            continue
        vn = spec.get("volumeName")
        if vn in used:
            errors.append(f"volume {vn} bound to {used[vn]} and {name}")
        used[vn] = name
        pv = pv_by_name.get(vn)
        if pv is None:
            errors.append(f"claim {name} -> missing volume {vn}")
            continue
        ref = pv["spec"].get("claimRef") or {}
        if (ref.get("name"), ref.get("namespace"), ref.get("uid")) != (name, NS, md["uid"]):
            errors.append(f"volume {vn} claimRef {ref.get('namespace')}/{ref.get('name')} "
                          f"does not point back at {name}")
        if (pv.get("status") or {}).get("phase") != "Bound":
            errors.append(f"volume {vn} is {pv.get('status', {}).get('phase')}")
        if pv["spec"].get("storageClassName") != spec.get("storageClassName"):
            errors.append(f"claim {name}: class mismatch with {vn}")
        if to_bytes(pv["spec"]["capacity"]["storage"]) < to_bytes(
                spec["resources"]["requests"]["storage"]):
            errors.append(f"claim {name}: {vn} too small")
        if not set(spec["accessModes"]) <= set(pv["spec"]["accessModes"]):
            errors.append(f"claim {name}: {vn} lacks access modes")
        if pv["spec"]["capacity"]["storage"] == spec["resources"]["requests"]["storage"]:
            exact += 1
        ann = md.get("annotations") or {}
        if ann.get("pv.kubernetes.io/bind-completed") != "yes":
            errors.append(f"claim {name}: no bind-completed annotation")
    if exact != len(claims):
        errors.append(f"only {exact}/{len(claims)} claims got a PV of exactly their size")
    return errors


async def run_side(env: lib.Env, api: Api, side: str, n: int, ctl: lib.Controller,
                   timeout: float) -> dict[str, Any]:
    run = f"{side}-{int(time.time())}"
    plan = pairs(n)
    await lib.ensure_namespace(api, NS)
    await ensure_classes(api)
    await lib.clean(api, namespaces=(NS,), pv_label=f"{WORKLOAD}=w1")
    result: dict[str, Any] = {"side": side, "n": n}
    await ctl.start()
    try:
        result["ready_after_s"] = round(ctl.ready_after, 2)
        await asyncio.sleep(1.0)
        tracker = Tracker(n)
        stop = asyncio.Event()
        claims_path = f"/api/v1/namespaces/{NS}/persistentvolumeclaims"
        sel = {"labelSelector": f"{LABEL}={run}"}
        rv_c = (await api.list(claims_path, sel))["metadata"]["resourceVersion"]
        rv_v = (await api.list("/api/v1/persistentvolumes", sel))["metadata"]["resourceVersion"]
        watchers = [
            asyncio.create_task(lib.watch(api, claims_path, rv_c, tracker.on_claim, sel, stop)),
            asyncio.create_task(lib.watch(api, "/api/v1/persistentvolumes", rv_v,
                                          tracker.on_volume, sel, stop)),
        ]
        before = await api.metrics()
        cpu0, ctl_cpu0 = env.cpu(), ctl.memory()["cpu_seconds"]
        load0 = os.getloadavg()[0]
        api.counts.clear()
        t0 = time.monotonic()
        await lib.create_many(api, lambda b: "/api/v1/persistentvolumes",
                              [pv_body(p, run) for p in plan])
        # Barrier: claims only bind to Available PVs (upstream too); creating them
        # while the controller still moves new PVs from Pending to Available would
        # let a claim take a bigger PV and strand another claim (for any binder).
        try:
            await asyncio.wait_for(tracker.all_available.wait(), timeout)
        except TimeoutError:
            raise RuntimeError(f"{len(tracker.volume_available)}/{n} PVs Available after "
                               f"{timeout:.0f} s") from None
        t1 = time.monotonic()
        sent, _ = await lib.create_many(api, lambda b: claims_path,
                                        [pvc_body(p, run) for p in plan])
        t_created = time.monotonic()
        loadgen = dict(api.counts)
        try:
            await asyncio.wait_for(tracker.done.wait(), timeout)
        except TimeoutError:
            result["error"] = (f"timeout after {timeout:.0f} s: {len(tracker.claim_bound)}/{n} "
                               f"claims, {len(tracker.volume_bound)}/{n} volumes Bound")
        t_end = max([*tracker.claim_bound.values(), *tracker.volume_bound.values(), t0])
        cpu1, ctl_cpu1 = env.cpu(), ctl.memory()["cpu_seconds"]
        await asyncio.sleep(2.0)
        after = await api.metrics()
        result["memory"] = ctl.memory()
        own = ctl.own_metrics(lib.OWN_METRICS)
        if own:
            result["own_metrics"] = own
        stop.set()
        for w in watchers:
            w.cancel()
        lat = [tracker.claim_bound[k] - sent[k] for k in tracker.claim_bound if k in sent]
        result.update({
            "wall_s": round(t_end - t0, 3),
            "pvs_available_s": round(t1 - t0, 3),
            "bind_wall_s": round(t_end - t1, 3),
            "claims_created_s": round(t_created - t1, 3),
            "cpu_s": {"controller": round(ctl_cpu1 - ctl_cpu0, 2), **lib.cpu_delta(cpu0, cpu1)},
            "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "latency": lib.latency_summary(lat),
            "requests": lib.diff_requests(before, after),
            "loadgen_requests": loadgen,
        })
    finally:
        await ctl.stop()
    errors = await verify(api, run, n, plan)
    if "error" in result:
        errors.insert(0, result["error"])
    result["correct"] = not errors
    result["errors"] = errors[:10]
    if errors and lib.KEEP_FAILED:
        raise RuntimeError(f"kept the failed state for inspection (BENCH_KEEP=1): {errors[:3]}")
    await lib.clean(api, namespaces=(NS,), pv_label=f"{WORKLOAD}=w1")
    return result


def sides(env: lib.Env, include: set[str]) -> list[tuple[str, lib.Controller]]:
    ctrl = ["persistentvolume-binder-controller"]
    out = [
        ("upstream-default", lambda: lib.kcm(env, ctrl, qps=None, burst=None, tag="-w1-default")),
        ("upstream-unthrottled", lambda: lib.kcm(env, ctrl, qps=10000, burst=10000,
                                                 tag="-w1-unthrottled")),
        ("volplane", lambda: lib.volplane(env, "pv-binder", tag="-w1")),
        ("volplane-unthrottled", lambda: lib.volplane(
            env, "pv-binder", tag="-w1-unthrottled",
            extra=["--kube-api-qps", "10000", "--kube-api-burst", "10000"])),
        ("volplane-nofast", lambda: lib.volplane(env, "pv-binder", tag="-w1-nofast",
                                                 env_extra={"VOLPLANE_KOPF_FASTPATH": "0"})),
        ("volplane-0.2", lambda: lib.volplane(env, "pv-binder", tag="-w1-0.2",
                                              executable=lib.ensure_volplane_02())),
        ("volplane-w32", lambda: lib.volplane(env, "pv-binder", tag="-w1-w32",
                                              extra=["--workers", "32"])),
        ("floor", lambda: lib.floor(env, "static", NS, 16, tag="-w1")),
        ("floor-32", lambda: lib.floor(env, "static", NS, 32, tag="-w1-32")),
    ]
    return [(name, make) for name, make in out if name in include]


async def run(env: lib.Env, n: int, include: set[str]) -> dict[str, Any]:
    results = {}
    async with env.api(limit=32) as api:
        for side, make in sides(env, include):
            timeout = max(120.0, n * 0.6)
            lib.log(f"W1 {side}: {n} PVs + {n} PVCs")
            try:
                r = await run_side(env, api, side, n, make(), timeout)
            except (ApiError, RuntimeError) as e:
                r = {"side": side, "n": n, "correct": False, "errors": [str(e)[:2000]]}
            results[side] = r
            lib.log(f"W1 {side}: wall {r.get('wall_s')} s "
                    f"(PVs Available {r.get('pvs_available_s')} s,"
                    f" bind {r.get('bind_wall_s')} s), cpu {r.get('cpu_s')}, p50 "
                    f"{r.get('latency', {}).get('p50_s')} s, controller requests "
                    f"{r.get('requests', {}).get('controller')}, mem {r.get('memory')}, "
                    f"correct {r['correct']} {r['errors'][:2]}")
    return results
