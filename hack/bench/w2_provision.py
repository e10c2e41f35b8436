"""W2: dynamic provisioning. N claims of 1Gi, no PVs: each side makes and binds them.

- upstream: kube-controller-manager's PV binder with its in-tree hostPath
  provisioner (`--enable-hostpath-provisioner`, class provisioner
  kubernetes.io/host-path; it makes a directory under /tmp/hostpath_pv per volume);
- volplane: pv-binder + pool-provisioner, class provisioner pool.volplane.io on one
  big StoragePool over the cluster's kwok nodes (each volume also writes its
  StorageAllocation record: one more write per claim than upstream);
- floor: per claim, a pre-bound PV create, PV status Bound, claim volumeName,
  claim status Bound (4 writes).

Measured from the first claim create until every claim is Bound (watch). Checked:
every claim Bound to its own PV (claimRef uid, phase, size, class,
provisioned-by), and for volplane the ledger: one StorageAllocation per PV, their
sizes summing to the pool's status.allocatedBytes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from typing import Any

import lib
import yaml
from lib import LABEL, Api, ApiError

NS = "bench-w2"
POOL = "bench-pool"
POOL_CLASS = "bench-pool"
HOSTPATH_CLASS = "bench-hostpath"
FLOOR_CLASS = "bench-floor"
POOL_API = "/apis/volplane.io/v1alpha1"
GI = 1 << 30


async def ensure_crds(api: Api) -> None:
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    names = []
    for f in sorted((lib.REPO / "crds").glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                await api.apply_or_create(path, doc)
                names.append(doc["metadata"]["name"])
    for name in names:
        for _ in range(100):
            crd = await api.get(f"{path}/{name}")
            # A CRD created a moment ago has no status yet: "status": {"conditions": null}.
            conds = {c["type"]: c["status"]
                     for c in (crd.get("status") or {}).get("conditions") or []}
            if conds.get("Established") == "True":
                break
            await asyncio.sleep(0.2)


async def ensure_csidriver(api: Api) -> None:
    body = yaml.safe_load((lib.REPO / "manifests" / "csidriver.yaml").read_text())
    await api.apply_or_create("/apis/storage.k8s.io/v1/csidrivers", body)


async def ensure_pool(api: Api, nodes: list[str], capacity: str = "100Ti",
                      slots: int | None = None) -> None:
    spec: dict[str, Any] = {"capacity": capacity, "nodes": {"names": nodes}}
    if slots:
        spec["slotsPerNode"] = slots
    await api.apply_or_create(f"{POOL_API}/storagepools", {
        "apiVersion": "volplane.io/v1alpha1", "kind": "StoragePool",
        "metadata": {"name": POOL, "labels": {LABEL: "pool"}}, "spec": spec})


async def ensure_classes(api: Api) -> None:
    for name, prov, params in ((POOL_CLASS, "pool.volplane.io", {"pool": POOL}),
                               (HOSTPATH_CLASS, "kubernetes.io/host-path", {}),
                               (FLOOR_CLASS, "bench.volplane.io/floor", {})):
        path = "/apis/storage.k8s.io/v1/storageclasses"
        body = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                "metadata": {"name": name}, "provisioner": prov, "parameters": params,
                "volumeBindingMode": "Immediate", "reclaimPolicy": "Delete"}
        try:
            cur = await api.get(f"{path}/{name}")
        except ApiError as e:
            if e.status != 404:
                raise
            cur = None
        if cur is not None and (cur.get("parameters") or {}) != params:
            # parameters are immutable: replace the class
            await api.request("DELETE", f"{path}/{name}", ok=(200, 202, 404))
            cur = None
        if cur is None:
            await api.create(path, body)


def claim_body(i: int, cls: str, run: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": f"w2-pvc-{i:05d}", "namespace": NS, "labels": {LABEL: run}},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": cls,
                 "resources": {"requests": {"storage": "1Gi"}}},
    }


async def clean(api: Api) -> None:
    """Claims, the PVs provisioned for them and their allocation records, finalizers
    stripped (no controller runs between runs)."""
    await lib.clean(api, namespaces=(NS,))
    pvs = (await api.list("/api/v1/persistentvolumes"))["items"]
    ours = [p for p in pvs if (p["spec"].get("claimRef") or {}).get("namespace") == NS
            or p["spec"].get("storageClassName") in (POOL_CLASS, HOSTPATH_CLASS, FLOOR_CLASS)]
    await _strip_and_delete(api, "/api/v1/persistentvolumes", ours)
    try:
        recs = (await api.list(f"{POOL_API}/storageallocations"))["items"]
    except ApiError as e:
        if e.status != 404:
            raise
        recs = []
    await _strip_and_delete(api, f"{POOL_API}/storageallocations", [
        r for r in recs if (r.get("spec") or {}).get("pool") == POOL
        or ((r.get("spec") or {}).get("claim") or {}).get("namespace") == NS])
    for p in ours:  # the hostPath provisioner's directories
        hp = (p["spec"].get("hostPath") or {}).get("path", "")
        if hp.startswith("/tmp/hostpath_pv/"):
            shutil.rmtree(hp, ignore_errors=True)


async def _strip_and_delete(api: Api, base: str, items: list[dict]) -> None:
    sem = asyncio.Semaphore(32)

    async def one(item: dict) -> None:
        name = item["metadata"]["name"]
        async with sem:
            if item["metadata"].get("finalizers"):
                try:
                    await api.merge_patch(f"{base}/{name}", {"metadata": {"finalizers": None}})
                except ApiError as e:
                    if e.status != 404:
                        raise
            await api.request("DELETE", f"{base}/{name}", ok=(200, 202, 404))
    await asyncio.gather(*(one(i) for i in items))


class Tracker:
    def __init__(self, n: int):
        self.n = n
        self.bound: dict[str, float] = {}
        self.done = asyncio.Event()

    def on_claim(self, kind: str, obj: dict, t: float) -> None:
        if kind != "DELETED" and (obj.get("status") or {}).get("phase") == "Bound":
            self.bound.setdefault(obj["metadata"]["name"], t)
            if len(self.bound) >= self.n:
                self.done.set()


async def verify(api: Api, run: str, n: int, side: str, provisioner: str) -> list[str]:
    errors: list[str] = []
    claims = (await api.list(f"/api/v1/namespaces/{NS}/persistentvolumeclaims",
                             {"labelSelector": f"{LABEL}={run}"}))["items"]
    pvs = {p["metadata"]["name"]: p for p in (await api.list("/api/v1/persistentvolumes"))["items"]
           if (p["spec"].get("claimRef") or {}).get("namespace") == NS}
    if len(claims) != n:
        errors.append(f"expected {n} claims, found {len(claims)}")
    used: set[str] = set()
    for c in claims:
        name, vn = c["metadata"]["name"], c["spec"].get("volumeName")
        if (c.get("status") or {}).get("phase") != "Bound" or not vn:
            errors.append(f"claim {name} is {(c.get('status') or {}).get('phase')}")
            continue
        if vn in used:
            errors.append(f"volume {vn} bound twice")
        used.add(vn)
        pv = pvs.get(vn)
        if pv is None:
            errors.append(f"claim {name}: volume {vn} missing")
            continue
        if (pv["spec"].get("claimRef") or {}).get("uid") != c["metadata"]["uid"] or \
                (pv.get("status") or {}).get("phase") != "Bound":
            errors.append(f"volume {vn} not Bound back to {name}")
        if pv["spec"].get("storageClassName") != c["spec"].get("storageClassName"):
            errors.append(f"volume {vn}: class differs from its claim's")
        ann = pv["metadata"].get("annotations") or {}
        if side != "floor" and ann.get("pv.kubernetes.io/provisioned-by") != provisioner:
            by = ann.get("pv.kubernetes.io/provisioned-by")
            errors.append(f"volume {vn}: provisioned-by {by}")
    if len(pvs) != n:
        errors.append(f"{len(pvs)} PVs for {n} claims (leaked or missing volumes)")
    if side.startswith("volplane"):
        recs = [r for r in (await api.list(f"{POOL_API}/storageallocations"))["items"]
                if r["spec"].get("pool") == POOL]
        rec_bytes = sum(int(r["spec"]["sizeBytes"]) for r in recs)
        if {r["metadata"]["name"] for r in recs} != set(pvs):
            errors.append(f"ledger: {len(recs)} allocation records for {len(pvs)} PVs "
                          "(names differ)")
        # the pool's status is derived from the records asynchronously: give it a moment
        allocated = None
        for _ in range(50):
            status = (await api.get(f"{POOL_API}/storagepools/{POOL}")).get("status") or {}
            allocated = status.get("allocatedBytes")
            if allocated == rec_bytes:
                break
            await asyncio.sleep(0.2)
        if not (rec_bytes == allocated == n * GI):
            errors.append(f"ledger: records {rec_bytes} B, pool status {allocated} B, "
                          f"expected {n * GI} B")
    return errors


async def run_side(env: lib.Env, api: Api, side: str, n: int, ctl: lib.Controller, cls: str,
                   provisioner: str, timeout: float) -> dict[str, Any]:
    run = f"{side}-{int(time.time())}"
    await clean(api)
    result: dict[str, Any] = {"side": side, "n": n}
    await ctl.start()
    try:
        result["ready_after_s"] = round(ctl.ready_after, 2)
        await asyncio.sleep(1.0)
        tracker = Tracker(n)
        stop = asyncio.Event()
        path = f"/api/v1/namespaces/{NS}/persistentvolumeclaims"
        sel = {"labelSelector": f"{LABEL}={run}"}
        rv = (await api.list(path, sel))["metadata"]["resourceVersion"]
        watcher = asyncio.create_task(lib.watch(api, path, rv, tracker.on_claim, sel, stop))
        before = await api.metrics()
        cpu0, ctl_cpu0 = env.cpu(), ctl.memory()["cpu_seconds"]
        load0 = os.getloadavg()[0]
        api.counts.clear()
        t0 = time.monotonic()
        sent, _ = await lib.create_many(api, lambda b: path,
                                        [claim_body(i, cls, run) for i in range(n)])
        t_created = time.monotonic()
        try:
            await asyncio.wait_for(tracker.done.wait(), timeout)
        except TimeoutError:
            result["error"] = f"timeout after {timeout:.0f} s: {len(tracker.bound)}/{n} Bound"
        t_end = max([*tracker.bound.values(), t0])
        cpu1, ctl_cpu1 = env.cpu(), ctl.memory()["cpu_seconds"]
        await asyncio.sleep(2.0)
        after = await api.metrics()
        result["memory"] = ctl.memory()
        own = ctl.own_metrics(lib.OWN_METRICS)
        if own:
            result["own_metrics"] = own
        stop.set()
        watcher.cancel()
        lat = [tracker.bound[k] - sent[k] for k in tracker.bound if k in sent]
        result.update({
            "wall_s": round(t_end - t0, 3),
            "claims_created_s": round(t_created - t0, 3),
            "latency": lib.latency_summary(lat),
            "requests": lib.diff_requests(before, after),
            "cpu_s": {"controller": round(ctl_cpu1 - ctl_cpu0, 2), **lib.cpu_delta(cpu0, cpu1)},
            "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        })
    finally:
        await ctl.stop()
    errors = await verify(api, run, n, side, provisioner)
    if "error" in result:
        errors.insert(0, result["error"])
    result["correct"] = not errors
    result["errors"] = errors[:10]
    if errors and lib.KEEP_FAILED:
        raise RuntimeError(f"kept the failed state for inspection (BENCH_KEEP=1): {errors[:3]}")
    await clean(api)
    return result


async def run(env: lib.Env, n: int, include: set[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    ctrl = ["persistentvolume-binder-controller"]
    sides = [
        ("upstream-default", HOSTPATH_CLASS, "kubernetes.io/host-path",
         lambda: lib.kcm(env, ctrl, qps=None, burst=None, hostpath=True, tag="-w2-default")),
        ("upstream-unthrottled", HOSTPATH_CLASS, "kubernetes.io/host-path",
         lambda: lib.kcm(env, ctrl, qps=10000, burst=10000, hostpath=True,
                         tag="-w2-unthrottled")),
        ("volplane", POOL_CLASS, "pool.volplane.io",
         lambda: lib.volplane(env, "pv-binder,pool-provisioner", tag="-w2")),
        ("volplane-unthrottled", POOL_CLASS, "pool.volplane.io",
         lambda: lib.volplane(env, "pv-binder,pool-provisioner", tag="-w2-unthrottled",
                              extra=["--kube-api-qps", "10000", "--kube-api-burst", "10000"])),
        ("volplane-0.2", POOL_CLASS, "pool.volplane.io",
         lambda: lib.volplane(env, "pv-binder,pool-provisioner", tag="-w2-0.2",
                              executable=lib.ensure_volplane_02())),
        ("floor", FLOOR_CLASS, "",
         lambda: lib.floor(env, "provision", NS, 16, tag="-w2")),
    ]
    async with env.api(limit=32) as api:
        await ensure_crds(api)
        await ensure_classes(api)
        await lib.ensure_namespace(api, NS)
        nodes = [f"kwok-node-{i}" for i in range(int(env.state.get("nodes", 4)))]
        await ensure_pool(api, nodes)
        for side, cls, prov, make in sides:
            if side not in include:
                continue
            lib.log(f"W2 {side}: {n} claims, class {cls}")
            try:
                r = await run_side(env, api, side, n, make(), cls, prov, max(120.0, n * 1.0))
            except (ApiError, RuntimeError) as e:
                r = {"side": side, "n": n, "correct": False, "errors": [str(e)[:2000]]}
            results[side] = r
            lib.log(f"W2 {side}: wall {r.get('wall_s')} s, cpu {r.get('cpu_s')}, p50 "
                    f"{r.get('latency', {}).get('p50_s')} s, controller requests "
                    f"{r.get('requests', {}).get('controller')}, mem {r.get('memory')}, "
                    f"correct {r['correct']} {r['errors'][:2]}")
    return results

