"""Garbage collection of orphaned StorageAllocation records: the grace is the record's
own age (creationTimestamp), so a restart does not start it over. Wall clock injected."""

import asyncio
import calendar
import time

from volplane.context import Context
from volplane.informers import Informers
from volplane.kinds import ALLOCATIONS
from volplane.kube import ApiError
from volplane.pools.gc import ORPHAN_GRACE, orphan_due
from volplane.pools.provisioner import PoolProvisioner

T0 = calendar.timegm(time.strptime("2026-03-01T12:00:00Z", "%Y-%m-%dT%H:%M:%SZ"))


def record(name="pvc-u1", created="2026-03-01T12:00:00Z", claim=("ns", "c1", "u1")):
    md = {"name": name, "uid": f"rec-{name}", "resourceVersion": "5"}
    if created is not None:
        md["creationTimestamp"] = created
    return {"apiVersion": "volplane.io/v1alpha1", "kind": "StorageAllocation", "metadata": md,
            "spec": {"pool": "p", "sizeBytes": 1 << 30,
                     "claim": {"namespace": claim[0], "name": claim[1], "uid": claim[2]}}}


def test_orphan_is_due_once_the_record_is_older_than_the_grace():
    r = record()
    assert not orphan_due(r, T0, 30)
    assert not orphan_due(r, T0 + 29.9, 30)
    assert orphan_due(r, T0 + 30, 30)
    assert orphan_due(r, T0 + 86400, 30)


def test_a_record_without_a_readable_timestamp_is_never_due():
    assert not orphan_due(record(created=None), T0 + 1e6, 30)
    assert not orphan_due(record(created="yesterday"), T0 + 1e6, 30)


class Api:
    """The three requests the GC makes (unit test double; e2e uses the real API)."""

    def __init__(self, pvs=(), claims=()):
        self.pvs, self.claims = set(pvs), dict(claims)
        self.deleted = []

    async def get(self, path):
        name = path.rsplit("/", 1)[-1]
        if "/persistentvolumes/" in path and name in self.pvs:
            return {"metadata": {"name": name}}
        if "/persistentvolumeclaims/" in path and name in self.claims:
            return self.claims[name]
        raise ApiError(404, "Not Found", {"reason": "NotFound", "details": {"name": name}})

    async def request(self, method, path, body=None):
        assert method == "DELETE"
        self.deleted.append(path.rsplit("/", 1)[-1])


class Wall:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


def provisioner(api, wall):
    ctx = Context(kube=api, informers=Informers(), events=None)
    p = PoolProvisioner(ctx, wall=wall)
    p.informers = ctx.informers
    return p


def feed(p, record):
    """The watch brings the record (Informers.feed plays it without Kopf)."""
    p.informers.feed(record, ALLOCATIONS)


def test_gc_frees_an_orphan_by_its_age_even_in_a_fresh_process():
    """A process that has just started (no memory of the record) frees an orphan whose
    record is older than the grace at its first pass; a younger one waits."""
    api = Api()
    wall = Wall(T0 + ORPHAN_GRACE + 1)
    p = provisioner(api, wall)
    feed(p, record("pvc-old"))
    feed(p, record("pvc-young", created="2026-03-01T12:00:20Z",
                                claim=("ns", "c2", "u2")))
    freed = asyncio.run(p.gc.collect_orphans())
    assert freed == ["pvc-old"] and api.deleted == ["pvc-old"]
    assert "pvc-old" not in p.allocations and "pvc-young" in p.allocations
    # a "restart": a new process, the same records, later on the wall clock
    wall.t = T0 + 20 + ORPHAN_GRACE
    p2 = provisioner(api, wall)
    feed(p2, record("pvc-young", created="2026-03-01T12:00:20Z",
                                 claim=("ns", "c2", "u2")))
    assert asyncio.run(p2.gc.collect_orphans()) == ["pvc-young"]


def test_gc_keeps_records_with_a_pv_a_live_claim_or_a_provision_in_flight():
    api = Api(pvs={"pvc-haspv"},
              claims={"c3": {"metadata": {"name": "c3", "uid": "u3"}, "spec": {}}})
    p = provisioner(api, Wall(T0 + 3600))
    feed(p, record("pvc-haspv", claim=("ns", "gone", "ux")))   # PV exists (API)
    feed(p, record("pvc-u3", claim=("ns", "c3", "u3")))        # claim lives (API)
    feed(p, record("pvc-busy", claim=("ns", "c4", "u4")))
    p.pc.provisioning.add("pvc-busy")                                         # in flight here
    assert asyncio.run(p.gc.collect_orphans()) == []
    assert api.deleted == []
    p.pc.provisioning.discard("pvc-busy")
    assert asyncio.run(p.gc.collect_orphans()) == ["pvc-busy"]
