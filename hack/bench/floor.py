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

`--concurrency` claims are in flight at once (volplane's default --workers is 16),
each claim's writes one after the other, like a controller worker. One aiohttp
session; the claims come from one watch of the namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib import ANN_PAIR, Api, client_ssl, watch  # noqa: E402

BOUND_BY = "pv.kubernetes.io/bound-by-controller"
BIND_COMPLETED = "pv.kubernetes.io/bind-completed"


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
                queue.put_nowait((bind_static, obj))

        def on_volume(kind: str, obj: dict, _t: float) -> None:
            if kind == "ADDED" and (obj.get("status") or {}).get("phase") == "Pending":
                queue.put_nowait((make_available, obj))

        pv_path, pv_sel = "/api/v1/persistentvolumes", {"labelSelector": args.pv_label}
        watchers = []
        for p, sel, fn in ((path, None, on_claim), (pv_path, pv_sel, on_volume)):
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
    p.add_argument("--mode", choices=["static"], default="static")
    p.add_argument("--server", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--pv-label", default="bench.volplane.io/run")
    p.add_argument("--concurrency", type=int, default=16)
    sys.exit(asyncio.run(main(p.parse_args())))
