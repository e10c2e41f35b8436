"""The gatherer of `volplane check`: LIST what the invariants read. Read-only: GETs only.

Each kind is listed in pages (500 objects) through kube.py, the project's one door to
the API. The lists are taken one after the other, so they are not one consistent
snapshot of a cluster that is changing; `volplane check --wait` re-gathers until the
invariants hold (or the time is up), which is how a busy cluster is judged fairly.
"""

from __future__ import annotations

import time

from .. import kinds as K
from ..kube import ApiError, Kube
from .invariants import Snapshot

KINDS = {
    "pvs": K.PVS.path(),
    "pvcs": K.PVCS.path(),
    "pods": K.PODS.path(),
    "nodes": K.NODES.path(),
    "namespaces": "/api/v1/namespaces",
    "vas": K.VOLUME_ATTACHMENTS.path(),
    "classes": K.CLASSES.path(),
    "drivers": K.CSI_DRIVERS.path(),
    "pools": K.POOLS.path(),
    "allocations": K.ALLOCATIONS.path(),
}
OPTIONAL = ("pools", "allocations")  # the CRDs may not be installed


class GatherError(RuntimeError):
    pass


async def list_all(kube: Kube, path: str, page: int = 500) -> list[dict]:
    items: list[dict] = []
    cont = None
    while True:
        body = await kube.get(path, query={"limit": page, "continue": cont})
        items.extend(body.get("items") or ())
        cont = (body.get("metadata") or {}).get("continue")
        if not cont:
            return items


async def gather(kube: Kube, now=time.time) -> Snapshot:
    lists: dict[str, list[dict]] = {}
    installed = True
    for kind, path in KINDS.items():
        try:
            lists[kind] = await list_all(kube, path)
        except ApiError as e:
            if e.not_found and kind in OPTIONAL:
                installed = False
                lists[kind] = []
                continue
            raise GatherError(f"cannot list {path}: {e}") from e
    return Snapshot.of(now(), pools_installed=installed, **lists)
