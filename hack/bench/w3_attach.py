"""W3: attach. N pods (N = 500), one pool volume each, over 20 kwok nodes.

Set up once, not measured: volplane's CRDs and CSIDriver (attachRequired), a
StoragePool over 20 kwok nodes, N claims each bound to its own CSI PV of driver
pool.volplane.io (written directly in their bound state, like W5).

Per side, with the same attacher on both: volplane's pool attacher runs as a
separate process under the `aux` identity (its requests are reported apart and
charged to neither side). The attach/detach controller under test is upstream
kube-controller-manager's (default QPS, then unthrottled), or volplane's
`attachdetach`, or the floor (one VolumeAttachment create per pod, then one
node-status patch per node as volumes attach).

Measured from the first pod create until every pod's volume is attached
(VolumeAttachment status.attached) and reported in its node's
status.volumesAttached; per-pod latency to the later of the two. Checked: one
attached VolumeAttachment per pod under upstream's name (csi-<sha256>), no
other, distinct device slots per node, every node's volumesAttached exactly its
volumes. Teardown (not measured): pods deleted, attachments and node status
reset by the harness.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import Any

import lib
import w2_provision as w2
import w5_memory as w5
from lib import LABEL, WORKLOAD, Api, ApiError

NS = "bench-w3"
POOL = "bench-attach-pool"
NODES = 20
DRIVER = "pool.volplane.io"
VA_PATH = "/apis/storage.k8s.io/v1/volumeattachments"
# The shared pool attacher is not under test and must not be what W3 measures: at its
# defaults (8 attach workers, two writes each per attachment, QPS 200) it was the
# slowest stage of every side (VolumeAttachments queued seconds before it got to
# them). 32 workers and no client rate limit of its own; the same for every side.
ATTACHER_FLAGS = ["--workers", "64", "--api-workers", "32",
                  "--kube-api-qps", "10000", "--kube-api-burst", "10000"]


def node_name(i: int) -> str:
    return f"{w5.NODE_PREFIX}{i % NODES:02d}"


def handle(i: int) -> str:
    return f"{POOL}/w3-pv-{i:05d}"


def va_name(i: int) -> str:
    node = node_name(i)
    return "csi-" + hashlib.sha256(f"{handle(i)}{DRIVER}{node}".encode()).hexdigest()


def unique_name(i: int) -> str:
    return f"kubernetes.io/csi/{DRIVER}^{handle(i)}"


def pvc_body(i: int) -> dict:
    return {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": f"w3-pvc-{i:05d}", "namespace": NS, "labels": {LABEL: "w3"},
                     "annotations": {"pv.kubernetes.io/bind-completed": "yes",
                                     "pv.kubernetes.io/bound-by-controller": "yes"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": w2.POOL_CLASS,
                 "volumeName": f"w3-pv-{i:05d}",
                 "resources": {"requests": {"storage": "1Gi"}}},
    }


def pv_body(i: int, claim: dict) -> dict:
    md = claim["metadata"]
    return {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": f"w3-pv-{i:05d}", "labels": {LABEL: "w3", WORKLOAD: "w3"},
                     "annotations": {"pv.kubernetes.io/provisioned-by": DRIVER}},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "storageClassName": w2.POOL_CLASS, "persistentVolumeReclaimPolicy": "Retain",
                 "csi": {"driver": DRIVER, "volumeHandle": handle(i)},
                 "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                              "namespace": NS, "name": md["name"], "uid": md["uid"]}},
    }


def pod_body(i: int, run: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"w3-pod-{i:05d}", "namespace": NS, "labels": {LABEL: run}},
        "spec": {"nodeName": node_name(i), "automountServiceAccountToken": False,
                 "tolerations": [{"operator": "Exists"}],
                 "containers": [{"name": "app", "image": "registry.invalid/pause:3.10"}],
                 "volumes": [{"name": "data",
                              "persistentVolumeClaim": {"claimName": f"w3-pvc-{i:05d}"}}]},
    }


async def setup(env: lib.Env, api: Api, n: int) -> None:
    await w2.ensure_crds(api)
    await w2.ensure_csidriver(api)
    await w2.ensure_classes(api)
    await w5.ensure_nodes(env, api, w5.NODE_PREFIX, NODES)
    await api.apply_or_create(f"{w2.POOL_API}/storagepools", {
        "apiVersion": "volplane.io/v1alpha1", "kind": "StoragePool",
        "metadata": {"name": POOL, "labels": {LABEL: "pool"}},
        "spec": {"capacity": "100Ti", "slotsPerNode": 128,
                 "nodes": {"names": [node_name(i) for i in range(NODES)]}}})
    await lib.ensure_namespace(api, NS)
    await teardown(api, n)
    await lib.clean(api, namespaces=(NS,), pv_label=f"{WORKLOAD}=w3")
    claims_path = f"/api/v1/namespaces/{NS}/persistentvolumeclaims"
    _, claims = await lib.create_many(api, lambda b: claims_path, [pvc_body(i) for i in range(n)])
    claims.sort(key=lambda c: c["metadata"]["name"])
    await lib.create_many(api, lambda b: "/api/v1/persistentvolumes",
                          [pv_body(i, c) for i, c in enumerate(claims)])
    sem = asyncio.Semaphore(32)

    async def bound(i: int) -> None:
        async with sem:
            await api.merge_patch(f"/api/v1/persistentvolumes/w3-pv-{i:05d}/status",
                                  {"status": {"phase": "Bound"}})
            await api.merge_patch(f"{claims_path}/w3-pvc-{i:05d}/status", {"status": {
                "phase": "Bound", "accessModes": ["ReadWriteOnce"],
                "capacity": {"storage": "1Gi"}}})
    await asyncio.gather(*(bound(i) for i in range(n)))


async def teardown(api: Api, n: int) -> None:
    """Pods gone, our VolumeAttachments gone (finalizers stripped), node status reset."""
    await lib.clean(api, namespaces=(), extra=(f"/api/v1/namespaces/{NS}/pods",))
    vas = [v for v in (await api.list(VA_PATH))["items"]
           if v["spec"].get("attacher") == DRIVER and
           (v["spec"].get("source") or {}).get("persistentVolumeName", "").startswith("w3-pv-")]
    await w2._strip_and_delete(api, VA_PATH, vas)
    for i in range(NODES):
        try:
            await api.merge_patch(f"/api/v1/nodes/{node_name(i)}/status",
                                  {"status": {"volumesAttached": None}})
        except ApiError as e:
            if e.status != 404:
                raise
    for _ in range(100):
        left = [v for v in (await api.list(VA_PATH))["items"]
                if v["spec"].get("attacher") == DRIVER]
        if not left:
            break
        await w2._strip_and_delete(api, VA_PATH, left)
        await asyncio.sleep(0.2)


class Tracker:
    def __init__(self, n: int):
        self.n = n
        self.want = {unique_name(i): (i, node_name(i)) for i in range(n)}
        self.by_va = {va_name(i): i for i in range(n)}
        self.va_seen: dict[int, float] = {}    # (stage timestamps, for the report)
        self.slotted: dict[int, float] = {}
        self.attached: dict[int, float] = {}
        self.reported: dict[int, float] = {}
        self.node_events = 0
        self.done = asyncio.Event()

    def on_va(self, kind: str, obj: dict, t: float) -> None:
        i = self.by_va.get(obj["metadata"]["name"])
        if i is None or kind == "DELETED":
            return
        self.va_seen.setdefault(i, t)
        if "volplane.io/slot" in (obj["metadata"].get("annotations") or {}):
            self.slotted.setdefault(i, t)
        if (obj.get("status") or {}).get("attached"):
            self.attached.setdefault(i, t)
            self._check()

    def on_node(self, kind: str, obj: dict, t: float) -> None:
        if kind == "DELETED":
            return
        node = obj["metadata"]["name"]
        self.node_events += 1
        for va in (obj.get("status") or {}).get("volumesAttached") or ():
            hit = self.want.get(va.get("name"))
            if hit and hit[1] == node:
                self.reported.setdefault(hit[0], t)
        self._check()

    def _check(self) -> None:
        if len(self.attached) >= self.n and len(self.reported) >= self.n:
            self.done.set()


def stages(tracker: Tracker, sent: dict[str, float], t0: float) -> dict[str, Any]:
    """Where the time goes: per stage, when (s after the first pod POST) the first, the
    median and the last pod reached it, and per-step latencies (p50 / p95 / max) from
    one stage to the next. Stages from the watches: pod POSTed, its VolumeAttachment
    seen, slot recorded (attacher write 1), attached (attacher write 2), volume in the
    node's status."""
    posted = {i: sent[f"w3-pod-{i:05d}"] for i in range(tracker.n) if f"w3-pod-{i:05d}" in sent}
    seq = [("posted", posted), ("va_seen", tracker.va_seen), ("slotted", tracker.slotted),
           ("attached", tracker.attached), ("reported", tracker.reported)]
    out: dict[str, Any] = {}
    for name, d in seq:
        ts = sorted(d.values())
        if ts:
            out[name] = {"n": len(ts), "first": round(ts[0] - t0, 2),
                         "p50": round(lib.percentile(ts, 50) - t0, 2),
                         "last": round(ts[-1] - t0, 2)}
    for (a, da), (b, db) in zip(seq, seq[1:], strict=False):
        steps = [db[i] - da[i] for i in db if i in da]
        if steps:
            s = lib.latency_summary(steps)
            out[f"{a}->{b}"] = {"p50": round(s["p50_s"], 2), "p95": round(s["p95_s"], 2),
                                "max": round(s["max_s"], 2)}
    out["node_watch_events"] = tracker.node_events
    return out


def apiserver_writes(before: str, after: str) -> dict[str, int]:
    """Mutating requests the API server served in the window, by anyone, per resource."""
    def per(text: str) -> dict[str, float]:
        acc: dict[str, float] = {}
        for _, lb, v in lib.parse_metrics(text, ("apiserver_request_total",)):
            if lb.get("verb") in ("POST", "PUT", "PATCH", "DELETE", "APPLY"):
                k = lb.get("resource", "") + ("/" + lb["subresource"] if lb.get("subresource")
                                              else "")
                acc[k] = acc.get(k, 0.0) + v
        return acc
    b, a = per(before), per(after)
    out = {k: int(round(a[k] - b.get(k, 0.0))) for k in a if a[k] - b.get(k, 0.0) >= 1}
    out["total"] = sum(out.values())
    return dict(sorted(out.items()))


def apiserver_write_ms(before: str, after: str) -> dict[str, float]:
    """Mean API server latency (ms) of the window's writes, per verb and resource."""
    def per(text: str) -> dict[str, list[float]]:
        acc: dict[str, list[float]] = {}
        for name, lb, v in lib.parse_metrics(text, ("apiserver_request_duration_seconds_sum",
                                                    "apiserver_request_duration_seconds_count")):
            if lb.get("verb") not in ("POST", "PATCH", "PUT", "DELETE"):
                continue
            k = f"{lb['verb']} {lb.get('resource', '')}" + (
                "/" + lb["subresource"] if lb.get("subresource") else "")
            acc.setdefault(k, [0.0, 0.0])[name.endswith("_count")] += v
        return acc
    b, a = per(before), per(after)
    out = {}
    for k, (sm, n) in a.items():
        sb, nb = b.get(k, [0.0, 0.0])
        if n - nb >= 1:
            out[k] = round(1000 * (sm - sb) / (n - nb), 1)
    return dict(sorted(out.items()))


async def verify(api: Api, n: int) -> list[str]:
    errors: list[str] = []
    vas = {v["metadata"]["name"]: v for v in (await api.list(VA_PATH))["items"]
           if v["spec"].get("attacher") == DRIVER}
    slots: dict[tuple[str, str], str] = {}
    for i in range(n):
        va = vas.pop(va_name(i), None)
        if va is None:
            errors.append(f"pod {i}: no VolumeAttachment {va_name(i)[:20]}…")
            continue
        if not (va.get("status") or {}).get("attached"):
            errors.append(f"pod {i}: VolumeAttachment not attached")
        if va["spec"].get("nodeName") != node_name(i):
            errors.append(f"pod {i}: attachment on {va['spec'].get('nodeName')}")
        slot = (va["metadata"].get("annotations") or {}).get("volplane.io/slot")
        if slot is not None:
            key = (va["spec"]["nodeName"], slot)
            if key in slots:
                errors.append(f"slot {slot} on {key[0]} given twice")
            slots[key] = va["metadata"]["name"]
    if vas:
        errors.append(f"{len(vas)} unexpected VolumeAttachments")
    for k in range(NODES):
        node = await api.get(f"/api/v1/nodes/{node_name(k)}")
        have = {v["name"] for v in (node.get("status") or {}).get("volumesAttached") or ()}
        want = {unique_name(i) for i in range(n) if i % NODES == k}
        if have != want:
            errors.append(f"node {node_name(k)}: volumesAttached has {len(have)}, "
                          f"want {len(want)} ({len(have - want)} extra)")
    return errors


def _kwok_cpu(env: lib.Env) -> float:
    pid = env.state.get("pids", {}).get("kwok")
    return lib.proc_cpu_seconds(pid) if pid else 0.0


async def run_side(env: lib.Env, api: Api, side: str, n: int, ctl: lib.Controller,
                   timeout: float) -> dict[str, Any]:
    run = f"{side}-{int(time.time())}"
    await teardown(api, n)
    result: dict[str, Any] = {"side": side, "n": n}
    attacher = lib.volplane(env, "pool-attacher", kubeconfig=env.aux_kubeconfig,
                            tag=f"-w3-attacher-{side}", extra=ATTACHER_FLAGS)
    await attacher.start()
    try:
        await ctl.start()
        try:
            result["ready_after_s"] = round(ctl.ready_after, 2)
            await asyncio.sleep(1.0)
            tracker = Tracker(n)
            stop = asyncio.Event()
            rv_va = (await api.list(VA_PATH))["metadata"]["resourceVersion"]
            node_sel = {"labelSelector": "bench.volplane.io/node=true"}
            rv_n = (await api.list("/api/v1/nodes", node_sel))["metadata"]["resourceVersion"]
            watchers = [
                asyncio.create_task(lib.watch(api, VA_PATH, rv_va, tracker.on_va, None, stop)),
                asyncio.create_task(lib.watch(api, "/api/v1/nodes", rv_n, tracker.on_node,
                                              node_sel, stop)),
            ]
            before = await api.metrics()
            cpu0, ctl_cpu0 = env.cpu(), ctl.memory()["cpu_seconds"]
            aux_cpu0, kwok_cpu0 = attacher.memory()["cpu_seconds"], _kwok_cpu(env)
            load0 = os.getloadavg()[0]
            t0 = time.monotonic()
            sent, _ = await lib.create_many(api, lambda b: f"/api/v1/namespaces/{NS}/pods",
                                            [pod_body(i, run) for i in range(n)])
            t_created = time.monotonic()
            try:
                await asyncio.wait_for(tracker.done.wait(), timeout)
            except TimeoutError:
                result["error"] = (f"timeout after {timeout:.0f} s: {len(tracker.attached)}/{n} "
                                   f"attached, {len(tracker.reported)}/{n} in node status")
            t_end = max([*tracker.attached.values(), *tracker.reported.values(), t0])
            cpu1, ctl_cpu1 = env.cpu(), ctl.memory()["cpu_seconds"]
            aux_cpu1, kwok_cpu1 = attacher.memory()["cpu_seconds"], _kwok_cpu(env)
            await asyncio.sleep(2.0)
            after = await api.metrics()
            result["memory"] = ctl.memory()
            result["attacher_memory"] = attacher.memory()
            own = ctl.own_metrics(lib.OWN_METRICS)
            if own:
                result["own_metrics"] = own
            stop.set()
            for w in watchers:
                w.cancel()
            lat = []
            for i in range(n):
                name = f"w3-pod-{i:05d}"
                if i in tracker.attached and i in tracker.reported and name in sent:
                    lat.append(max(tracker.attached[i], tracker.reported[i]) - sent[name])
            result.update({
                "wall_s": round(t_end - t0, 3),
                "pods_created_s": round(t_created - t0, 3),
                "latency": lib.latency_summary(lat),
                "requests": lib.diff_requests(before, after),
                "apiserver_writes": apiserver_writes(before, after),
                "apiserver_write_ms": apiserver_write_ms(before, after),
                "stages": stages(tracker, sent, t0),
                "cpu_s": {"controller": round(ctl_cpu1 - ctl_cpu0, 2),
                          **lib.cpu_delta(cpu0, cpu1),
                          "attacher": round(aux_cpu1 - aux_cpu0, 2),
                          "kwok": round(kwok_cpu1 - kwok_cpu0, 2)},
                "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
            })
        finally:
            await ctl.stop()
        errors = await verify(api, n)
    finally:
        await attacher.stop()
    if "error" in result:
        errors.insert(0, result["error"])
    result["correct"] = not errors
    result["errors"] = errors[:10]
    if errors and lib.KEEP_FAILED:
        raise RuntimeError(f"kept the failed state for inspection (BENCH_KEEP=1): {errors[:3]}")
    await teardown(api, n)
    return result


async def run(env: lib.Env, n: int, include: set[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    ad = ["persistentvolume-attach-detach-controller"]
    sides = [
        ("upstream-default", lambda: lib.kcm(env, ad, qps=None, burst=None, tag="-w3-default")),
        ("upstream-unthrottled", lambda: lib.kcm(env, ad, qps=10000, burst=10000,
                                                 tag="-w3-unthrottled")),
        ("volplane", lambda: lib.volplane(env, "attachdetach", tag="-w3")),
        ("volplane-unthrottled", lambda: lib.volplane(
            env, "attachdetach", tag="-w3-unthrottled",
            extra=["--kube-api-qps", "10000", "--kube-api-burst", "10000"])),
        ("volplane-0.2", lambda: lib.volplane(env, "attachdetach", tag="-w3-0.2",
                                              executable=lib.ensure_volplane_02())),
        ("floor", lambda: lib.floor(env, "attach", NS, 16, tag="-w3")),
    ]
    async with env.api(limit=32) as api:
        lib.log(f"W3: setting up {n} bound pool volumes over {NODES} kwok nodes")
        await setup(env, api, n)
        try:
            for side, make in sides:
                if side not in include:
                    continue
                lib.log(f"W3 {side}: {n} pods")
                try:
                    r = await run_side(env, api, side, n, make(), max(120.0, n * 0.8))
                except (ApiError, RuntimeError) as e:
                    r = {"side": side, "n": n, "correct": False, "errors": [str(e)[:2000]]}
                results[side] = r
                lib.log(f"W3 {side}: wall {r.get('wall_s')} s, cpu {r.get('cpu_s')}, p50 "
                        f"{r.get('latency', {}).get('p50_s')} s, controller requests "
                        f"{r.get('requests', {}).get('controller')}, attacher requests "
                        f"{r.get('requests', {}).get('aux')}, mem {r.get('memory')}, "
                        f"stages {r.get('stages')}, all writes {r.get('apiserver_writes')}, "
                        f"write ms {r.get('apiserver_write_ms')}, "
                        f"correct {r['correct']} {r['errors'][:2]}")
        finally:
            if not lib.KEEP_FAILED:
                await teardown(api, n)
                await lib.clean(api, namespaces=(NS,), pv_label=f"{WORKLOAD}=w3")
                await api.request("DELETE", f"{w2.POOL_API}/storagepools/{POOL}",
                                  ok=(200, 202, 404))
    return results
