"""The write floor: a plain client doing exactly the minimum writes a workload needs.

It is no controller: it knows the answer (the load generator writes the intended
PV's name on each claim, annotation bench.volplane.io/pv) and does no matching,
no caching, no retries beyond the transport. What is left is the cost of the
writes themselves on this machine: the physical limit for any controller.

    --mode static   per new PV, the Pending -> Available status write (upstream's volume
                    worker does it too, and claims only bind to Available PVs); per
                    claim, upstream's four bind writes, in order, as merge patches:
                    PV spec.claimRef (+ bound-by-controller), PV status Bound,
                    PVC spec.volumeName (+ bind-completed, bound-by-controller),
                    PVC status Bound (capacity, access modes)

    --mode provision  per claim, a PV pvc-<uid> created pre-bound to it (hostPath), PV
                    status Bound, claim volumeName (+ annotations), claim status Bound

    --mode attach   per pod, the VolumeAttachment under upstream's name (the shared
                    pool attacher attaches it); as attachments report attached, the
                    node's status.volumesAttached, one merge patch per node per batch,
                    batched on the same schedule as volplane's attach/detach controller
                    (volplane.attach.reports.NodeReportSchedule: 0.1 s debounce, reports
                    of a node with attachments still in progress >= 1 s apart)

`--concurrency` claims are in flight at once (volplane's default --workers is 16),
each claim's writes one after the other, like a controller worker. One aiohttp
session; the claims come from one watch of the namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib import ANN_PAIR, REPO, Api, client_ssl, watch  # noqa: E402

sys.path.insert(0, str(REPO / "operator"))
from volplane.attach import reports as R  # noqa: E402  (pure: the node-report schedule)
from volplane.attach.names import volume_attachment_name  # noqa: E402

BOUND_BY = "pv.kubernetes.io/bound-by-controller"
BIND_COMPLETED = "pv.kubernetes.io/bind-completed"
DRIVER = "pool.volplane.io"


async def make_available(api: Api, pv: dict) -> None:
    await api.merge_patch(f"/api/v1/persistentvolumes/{pv['metadata']['name']}/status",
                          {"status": {"phase": "Available"}})


async def bind_static(api: Api, claim: dict) -> None:
    md = claim["metadata"]
    ns, name = md["namespace"], md["name"]
    pv_name = md["annotations"][ANN_PAIR]
    pv = await api.merge_patch(f"/api/v1/persistentvolumes/{pv_name}", {
        "metadata": {"annotations": {BOUND_BY: "yes"}},
        "spec": {"claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                              "namespace": ns, "name": name, "uid": md["uid"],
                              "resourceVersion": md["resourceVersion"]}}})
    await api.merge_patch(f"/api/v1/persistentvolumes/{pv_name}/status",
                          {"status": {"phase": "Bound"}})
    path = f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}"
    await api.merge_patch(path, {
        "metadata": {"annotations": {BIND_COMPLETED: "yes", BOUND_BY: "yes"}},
        "spec": {"volumeName": pv_name}})
    await api.merge_patch(path + "/status", {"status": {
        "phase": "Bound", "accessModes": pv["spec"]["accessModes"],
        "capacity": {"storage": pv["spec"]["capacity"]["storage"]}}})


async def provision(api: Api, claim: dict) -> None:
    md = claim["metadata"]
    ns, name, uid = md["namespace"], md["name"], md["uid"]
    pv_name = f"pvc-{uid}"
    request = claim["spec"]["resources"]["requests"]["storage"]
    await api.create("/api/v1/persistentvolumes", {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": pv_name, "annotations": {
            "pv.kubernetes.io/provisioned-by": "bench.volplane.io/floor"}},
        "spec": {"capacity": {"storage": request}, "accessModes": claim["spec"]["accessModes"],
                 "storageClassName": claim["spec"].get("storageClassName", ""),
                 "persistentVolumeReclaimPolicy": "Delete",
                 "hostPath": {"path": f"/tmp/volplane-bench/floor/{uid}"},
                 "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                              "namespace": ns, "name": name, "uid": uid,
                              "resourceVersion": md["resourceVersion"]}}})
    await api.merge_patch(f"/api/v1/persistentvolumes/{pv_name}/status",
                          {"status": {"phase": "Bound"}})
    path = f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}"
    await api.merge_patch(path, {
        "metadata": {"annotations": {BIND_COMPLETED: "yes", BOUND_BY: "yes"}},
        "spec": {"volumeName": pv_name}})
    await api.merge_patch(path + "/status", {"status": {
        "phase": "Bound", "accessModes": claim["spec"]["accessModes"],
        "capacity": {"storage": request}}})


class NodeReporter:
    """node.status.volumesAttached, one merge patch per node per batch of changes, on
    volplane's schedule (R.NodeReportSchedule), so both make comparable batches."""

    def __init__(self, api: Api):
        self.api = api
        self.attached: dict[str, dict[str, str]] = {}  # node -> unique name -> devicePath
        self.attaching: dict[str, set[str]] = {}       # node -> wanted, not attached yet
        self.sent: dict[str, list] = {}                # node -> last report written
        self.schedule = R.NodeReportSchedule(R.NODE_STATUS_DEBOUNCE,
                                             R.NODE_STATUS_MIN_INTERVAL)
        self.locks: dict[str, asyncio.Lock] = {}
        self.tasks: set[asyncio.Task] = set()

    def wanted(self, node: str, va: str) -> None:
        self.attaching.setdefault(node, set()).add(va)

    def add(self, node: str, va: str, unique: str, device: str) -> None:
        self.attaching.get(node, set()).discard(va)
        vols = self.attached.setdefault(node, {})
        if vols.get(unique) == device:
            return
        vols[unique] = device
        self._changed(node)

    def _busy(self, node: str) -> bool:
        return bool(self.attaching.get(node))

    def _changed(self, node: str) -> None:
        delay = self.schedule.changed(node, time.monotonic(), self._busy(node))
        if delay is not None:
            self._at(node, delay)

    def _at(self, node: str, delay: float) -> None:
        def fire() -> None:
            t = asyncio.create_task(self._flush(node))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)
        asyncio.get_running_loop().call_later(delay, fire)

    async def _flush(self, node: str) -> None:
        async with self.locks.setdefault(node, asyncio.Lock()):
            if self.schedule.begin(node, time.monotonic()) is not None:
                return  # superseded: due later
            body = [{"name": k, "devicePath": v} for k, v in sorted(self.attached[node].items())]
            wrote = failed = False
            try:
                if body != self.sent.get(node):
                    await self.api.merge_patch(f"/api/v1/nodes/{node}/status",
                                               {"status": {"volumesAttached": body}})
                    self.sent[node], wrote = body, True
            except Exception as e:
                print(f"floor: node {node}: {e}", flush=True)
                failed = True
            again = self.schedule.finish(node, time.monotonic(), wrote, self._busy(node))
            if again is not None:
                self._at(node, again)
            elif failed:
                self._changed(node)


def attachments(pod: dict, pool: str) -> list[tuple[str, str, str]]:
    """(VolumeAttachment name, PV, node) for each claim of the pod."""
    node = pod["spec"]["nodeName"]
    out = []
    for v in pod["spec"].get("volumes") or ():
        if v.get("persistentVolumeClaim"):
            pv = v["persistentVolumeClaim"]["claimName"].replace("-pvc-", "-pv-")  # (so named)
            out.append((volume_attachment_name(f"{pool}/{pv}", DRIVER, node), pv, node))
    return out


async def attach(api: Api, pod: dict, pool: str) -> None:
    for name, pv, node in attachments(pod, pool):
        try:
            await api.create("/apis/storage.k8s.io/v1/volumeattachments", {
                "apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment",
                "metadata": {"name": name},
                "spec": {"attacher": DRIVER, "nodeName": node,
                         "source": {"persistentVolumeName": pv}}})
        except Exception as e:
            if "409" not in str(e):
                raise


async def main(args: argparse.Namespace) -> int:
    ssl = client_ssl(Path(args.ca), Path(args.cert), Path(args.key))
    async with Api(args.server, ssl, limit=args.concurrency + 3) as api:
        queue: asyncio.Queue = asyncio.Queue()
        seen: set[str] = set()
        path = f"/api/v1/namespaces/{args.namespace}/persistentvolumeclaims"

        def on_claim(kind: str, obj: dict, _t: float) -> None:
            md = obj["metadata"]
            if kind == "ADDED" and not (obj.get("spec") or {}).get("volumeName") \
                    and md["name"] not in seen:
                seen.add(md["name"])
                queue.put_nowait((bind_static if args.mode == "static" else provision, obj))

        def on_volume(kind: str, obj: dict, _t: float) -> None:
            if kind == "ADDED" and (obj.get("status") or {}).get("phase") == "Pending":
                queue.put_nowait((make_available, obj))

        pv_path, pv_sel = "/api/v1/persistentvolumes", {"labelSelector": args.pv_label}
        watchers = []
        streams = [(path, None, on_claim)]
        if args.mode == "static":
            streams.append((pv_path, pv_sel, on_volume))
        if args.mode == "attach":
            reporter = NodeReporter(api)
            pods_seen: set[str] = set()

            def on_pod(kind: str, obj: dict, _t: float) -> None:
                name = obj["metadata"]["name"]
                if kind == "ADDED" and obj["spec"].get("nodeName") and name not in pods_seen:
                    pods_seen.add(name)
                    for va, _, node in attachments(obj, args.pool):
                        reporter.wanted(node, va)
                    queue.put_nowait((lambda a, o: attach(a, o, args.pool), obj))

            def on_va(kind: str, obj: dict, _t: float) -> None:
                st, spec = obj.get("status") or {}, obj["spec"]
                if kind == "DELETED" or spec.get("attacher") != DRIVER or not st.get("attached"):
                    return
                pv = (spec.get("source") or {}).get("persistentVolumeName", "")
                unique = f"kubernetes.io/csi/{DRIVER}^{args.pool}/{pv}"
                device = (st.get("attachmentMetadata") or {}).get("devicePath", "")
                reporter.add(spec["nodeName"], obj["metadata"]["name"], unique, device)

            streams = [(f"/api/v1/namespaces/{args.namespace}/pods", None, on_pod),
                       ("/apis/storage.k8s.io/v1/volumeattachments", None, on_va)]
        for p, sel, fn in streams:
            initial = await api.list(p, sel)
            for item in initial["items"]:
                fn("ADDED", item, 0.0)
            watchers.append(asyncio.create_task(
                watch(api, p, initial["metadata"]["resourceVersion"], fn, sel)))

        async def worker() -> None:
            while True:
                handler, obj = await queue.get()
                try:
                    await handler(api, obj)
                except Exception as e:  # report, keep going: the harness checks end state
                    print(f"floor: {obj['metadata']['name']}: {e}", flush=True)

        workers = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
        print("floor ready", flush=True)
        await asyncio.gather(*watchers, *workers)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["static", "provision", "attach"], default="static")
    p.add_argument("--server", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--pv-label", default="bench.volplane.io/workload=w1")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--pool", default="bench-attach-pool")
    sys.exit(asyncio.run(main(p.parse_args())))
