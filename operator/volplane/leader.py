"""Leader election with a coordination.k8s.io Lease, as upstream controllers do.

Kopf's peering is not leader election (no per-object locks; equal priorities
freeze everyone), so volplane uses client-go's protocol instead:

- a candidate acquires the Lease when it is free or its holder has not renewed
  it for leaseDurationSeconds; every write carries the Lease's resourceVersion,
  so of two candidates racing for an expired lease exactly one wins;
- the leader renews every retry period; if it cannot renew within the renew
  deadline it has lost the lease and stops acting at once — like
  kube-controller-manager, by exiting the process (a fresh start re-syncs
  caches as a follower; nothing is left half-done because every multi-write
  operation is idempotent and resumed by whichever replica leads next).

Two clocks, never mixed:

- durations (has the holder stopped renewing for leaseDurationSeconds? has our last
  renewal outlived the renew deadline?) are measured on `time.monotonic()`, which
  never jumps. client-go gets this for free (Go's time.Now() carries a monotonic
  reading); Python's `time.time()` does not: an NTP step of +30 s on a follower made
  it judge a live leader's unchanged Lease expired and take it while the leader kept
  acting (issue 15). The holder's renewTime is never compared with our clock at
  all: expiry is "we have seen the same (holder, renewTime) for a full duration";
- the wall clock is used only to write the renewTime/acquireTime strings.

A candidate takes the Lease only once `ready()` (the runtime: caches synced). Before,
it still watches the holder's renewals, so a warm candidate takes an expired Lease at
once. A cold one must not: its initial listing, run on the event loop that also renews,
kept a fresh leader from renewing within the deadline: with the restarted replica
always the cold one, each new leader lost the Lease seconds after taking it and the two
replicas took turns doing nothing (`make chaos`, issue 15). A cold leader cannot act
before its caches sync anyway.

The decision part (`decide`) is pure and takes the (monotonic) clock as an argument.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import time
import uuid
from dataclasses import dataclass

from . import logs, metrics
from .kube import ApiError, Kube

log = logs.get("leader-election")


@dataclass
class LeaseConfig:
    namespace: str = "volplane-system"
    name: str = "volplane"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    identity: str = ""

    def __post_init__(self):
        if not self.identity:
            self.identity = default_identity()


def default_identity(env: dict | None = None) -> str:
    """$POD_NAME (unique per replica, stable across container restarts), else the
    hostname plus a random suffix, as kube-controller-manager and other client-go
    callers build theirs: two processes on one host must never share an identity, or
    both would "renew" one Lease and act at once."""
    env = os.environ if env is None else env
    return env.get("POD_NAME") or f"{socket.gethostname()}_{uuid.uuid4()}"


def _wall() -> float:
    return time.time()  # looked up at each call (faults.py may step it in e2e tests)


def _micro(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_micro(s: str | None) -> float | None:
    if not s:
        return None
    for fmt in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return dt.datetime.strptime(s, fmt).replace(tzinfo=dt.UTC).timestamp()
        except ValueError:
            continue
    return None


def decide(lease: dict | None, identity: str, now: float, observed: dict) -> str:
    """'acquire' | 'renew' | 'wait' for a candidate looking at the current Lease.

    `observed` remembers (holder, renewTime) and the local time it was first seen,
    so expiry is measured on our own clock, as client-go does (clock skew safe).
    `now` must be a monotonic reading: a wall clock that steps forward would expire a
    live holder's lease early.
    """
    if lease is None:
        return "acquire"
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity") or ""
    if holder == identity:
        return "renew"
    if not holder:
        return "acquire"
    marker = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
    if observed.get("marker") != marker:
        observed["marker"] = marker
        observed["since"] = now
        return "wait"
    duration = spec.get("leaseDurationSeconds") or 15
    return "acquire" if now - observed["since"] >= duration else "wait"


class LeaderElector:
    def __init__(self, kube: Kube, cfg: LeaseConfig, clock=time.monotonic, wall=None,
                 ready=None):
        self.cfg = cfg
        self.ready = ready or (lambda: True)  # may we take the Lease (caches synced)?
        self.clock = clock  # durations: lease expiry, renew deadline (monotonic)
        self.wall = wall or _wall  # only for the renewTime / acquireTime strings
        self.leading = asyncio.Event()
        self._observed: dict = {}
        self.last_renew = 0.0  # self.clock() of the last successful acquire/renew
        kube.write_guard = self.check
        # Lease requests get a rate limit of their own (client-go gives leader election
        # its own client): a renewal must never queue behind the controllers' backlog,
        # or a busy leader with a low --kube-api-qps loses its lease to its own writes.
        self.kube = kube.with_own_limit(qps=10, burst=10)

    @property
    def path(self) -> str:
        ns, name = self.cfg.namespace, self.cfg.name
        return f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}"

    async def _try(self) -> bool:
        now = self.clock()
        stamp = _micro(self.wall())
        try:
            lease = await self.kube.get(self.path)
        except ApiError as e:
            if not e.not_found:
                raise
            lease = None
        action = decide(lease, self.cfg.identity, now, self._observed)
        if action == "wait":
            return False
        if not self.leading.is_set() and not self.ready():
            return False  # observed (expiry runs on), but a cold candidate never takes it
        spec = {
            "holderIdentity": self.cfg.identity,
            "leaseDurationSeconds": int(self.cfg.lease_duration),
            "renewTime": stamp,
        }
        if lease is None:
            spec.update(acquireTime=stamp, leaseTransitions=0)
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.cfg.name, "namespace": self.cfg.namespace},
                    "spec": spec}
            await self.kube.create(self.path.rsplit("/", 1)[0], body)
            return True
        old = lease.get("spec") or {}
        if action == "acquire":
            spec.update(acquireTime=stamp,
                        leaseTransitions=int(old.get("leaseTransitions") or 0) + 1)
        await self.kube.merge_patch(self.path, {
            "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
            "spec": spec})
        return True

    async def run(self) -> None:
        """Acquire, then renew forever; exit the process if the lease is lost."""
        while not self.leading.is_set():
            try:
                if await self._try():
                    self.last_renew = self.clock()
                    self.leading.set()
                    metrics.leader.set(1)
                    log.info("became leader", identity=self.cfg.identity,
                             lease=f"{self.cfg.namespace}/{self.cfg.name}")
                    break
            except ApiError as e:
                if not (e.conflict or e.already_exists):
                    log.warning("lease acquire failed", error=str(e))
            await asyncio.sleep(self.cfg.retry_period)
        while True:
            await asyncio.sleep(self.cfg.retry_period)
            try:
                if await asyncio.wait_for(self._try(), timeout=self.cfg.renew_deadline):
                    self.last_renew = self.clock()
                    continue
            except (ApiError, TimeoutError, OSError) as e:
                log.warning("lease renew failed", error=str(e))
            if self.renew_expired():
                self.lost()

    def renew_expired(self) -> bool:
        """Our last successful renewal is older than the renew deadline (monotonic)."""
        return self.clock() - self.last_renew >= self.cfg.renew_deadline

    def check(self) -> None:
        """Before any write: a leader whose last renewal is older than the renew
        deadline (e.g. the process was paused) may no longer hold the lease; stop now
        rather than write on stale authority. Lease writes themselves pass."""
        if self.leading.is_set() and self.clock() - self.last_renew > self.cfg.renew_deadline:
            self.lost()

    def lost(self) -> None:
        metrics.leader.set(0)
        log.error("leader lease lost, stopping at once", identity=self.cfg.identity)
        os._exit(1)

    async def ensure_namespace(self) -> None:
        try:
            await self.kube.create("/api/v1/namespaces", {
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": self.cfg.namespace}})
        except ApiError as e:
            if not (e.already_exists or e.status == 403):
                raise
