"""The churn schedule of `make chaos`: pure, seeded, reproducible.

A Planner owns the *intent* of the run (which claims, pods and nodes should exist) and
one random.Random seeded from the run's seed. Each call to `next_ops()` draws the next
operation from that generator and the intent alone, updates the intent as if the
operation succeeded, and returns it as plain Op records; chaos.py applies them to the
cluster. Nothing the cluster does (timing, evictions, API errors) feeds back into the
draws, so one seed always yields the same sequence of operations (tests/unit/
test_chaos_plan.py holds it to that).

Claim kinds (their StorageClasses are made by chaos.py):
  static       a hand-made PV (hostPath, Retain) of class chaos-static, Immediate
  static-wffc  the same, class chaos-static-wffc, WaitForFirstConsumer (the scheduler binds)
  pool         provisioned from a StoragePool, class chaos-pool, Immediate
  pool-wffc    provisioned from a StoragePool, class chaos-pool-wffc, WaitForFirstConsumer
Every WaitForFirstConsumer claim always has a pod (else it would rightly stay Pending);
an Immediate claim has one or none. A claim is deleted together with its pod.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

KINDS = ("static", "static-wffc", "pool", "pool-wffc")
KIND_WEIGHTS = (0.2, 0.15, 0.4, 0.25)
WFFC = frozenset({"static-wffc", "pool-wffc"})
POOL_KINDS = frozenset({"pool", "pool-wffc"})
POOL_SIZES_GI = tuple(range(40, 101, 10))  # what a resize sets a pool's capacity to
MAX_CHAOS_NODES = 3


@dataclass(frozen=True)
class Op:
    """One operation. verb: create-claim, delete-claim, create-pod, delete-pod, move-pod,
    resize-pool, add-node, taint-node, delete-node, sweep."""

    verb: str
    name: str = ""
    claim: str = ""          # create-pod / move-pod: the claim the pod uses
    kind: str = ""           # create-claim: one of KINDS
    pv: str = ""             # create-claim (static kinds): the PV made for the claim
    old: str = ""            # move-pod: the pod replaced (its node is avoided)
    size_gi: int = 0         # resize-pool
    zone: str = ""           # add-node

    def __str__(self) -> str:
        extra = {k: v for k, v in (("claim", self.claim), ("kind", self.kind), ("pv", self.pv),
                                    ("old", self.old), ("size_gi", self.size_gi),
                                    ("zone", self.zone)) if v}
        return f"{self.verb} {self.name} {extra}".rstrip(" {}")


@dataclass
class Intent:
    """What should exist now, and what was deleted on purpose (must end up gone)."""

    claims: dict[str, str] = field(default_factory=dict)       # claim -> kind
    pod_of: dict[str, str] = field(default_factory=dict)       # claim -> its pod
    pods: dict[str, str] = field(default_factory=dict)         # pod -> claim
    nodes: dict[str, str] = field(default_factory=dict)        # chaos node -> ready|tainted
    deleted_claims: set[str] = field(default_factory=set)
    deleted_pods: set[str] = field(default_factory=set)
    deleted_nodes: set[str] = field(default_factory=set)
    static_pvs: set[str] = field(default_factory=set)          # made by the run


class Planner:
    def __init__(self, seed: int | str, pools: list[str], *, live_claims: int = 90,
                 pool_claims: int = 60, sweep_every: int = 40):
        self.rng = random.Random(f"{seed}/churn")
        self.pools = sorted(pools)
        self.live_claims = live_claims
        self.pool_claims = pool_claims  # 1Gi each: below the smallest total pool capacity
        self.sweep_every = sweep_every
        self.intent = Intent()
        self.counts: Counter[str] = Counter()
        self._seq: Counter[str] = Counter()
        self._steps = 0

    def _name(self, prefix: str) -> str:
        self._seq[prefix] += 1
        return f"chaos-{prefix}-{self._seq[prefix]:05d}"

    # -- the schedule

    def next_ops(self) -> list[Op]:
        self._steps += 1
        if self._steps % self.sweep_every == 0:
            return [Op("sweep")]
        r = self.rng.random()
        if r < 0.65:
            ops = self._claim_op()
        elif r < 0.95:
            ops = self._pod_op()
        elif r < 0.98:
            ops = [Op("resize-pool", name=self.rng.choice(self.pools),
                      size_gi=self.rng.choice(POOL_SIZES_GI))]
        else:
            ops = self._node_op()
        for op in ops:
            self.counts[op.verb] += 1
        return ops

    def _claim_op(self) -> list[Op]:
        live = len(self.intent.claims)
        target = self.live_claims
        p_create = min(0.9, max(0.1, 0.5 + 0.5 * (target - live) / target))
        if self.rng.random() < p_create or not self.intent.claims:
            return self._create_claim()
        return self._delete_claim(self.rng.choice(sorted(self.intent.claims)))

    def _create_claim(self) -> list[Op]:
        kind = self.rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
        with_pod = self.rng.random() < 0.5
        pooled = sum(1 for k in self.intent.claims.values() if k in POOL_KINDS)
        if kind in POOL_KINDS and pooled >= self.pool_claims:
            kind = "static-wffc" if kind in WFFC else "static"
        name = self._name("c")
        pv = self._name("spv") if kind not in POOL_KINDS else ""
        if pv:
            self.intent.static_pvs.add(pv)
        self.intent.claims[name] = kind
        self.counts[f"create-claim:{kind}"] += 1
        ops = [Op("create-claim", name=name, kind=kind, pv=pv)]
        if kind in WFFC or with_pod:
            ops.append(self._new_pod(name))
        return ops

    def _new_pod(self, claim: str, old: str = "") -> Op:
        pod = self._name("p")
        self.intent.pods[pod] = claim
        self.intent.pod_of[claim] = pod
        return Op("move-pod" if old else "create-pod", name=pod, claim=claim, old=old)

    def _drop_pod(self, pod: str) -> Op:
        claim = self.intent.pods.pop(pod)
        self.intent.pod_of.pop(claim, None)
        self.intent.deleted_pods.add(pod)
        return Op("delete-pod", name=pod, claim=claim)

    def _delete_claim(self, claim: str) -> list[Op]:
        ops = []
        pod = self.intent.pod_of.get(claim)
        pod_first = self.rng.random() < 0.5
        if pod:
            ops.append(self._drop_pod(pod))
        kind = self.intent.claims.pop(claim)
        self.intent.deleted_claims.add(claim)
        delete = Op("delete-claim", name=claim, kind=kind)
        # the claim first exercises pvc-protection (the claim waits for its pod)
        return [*ops, delete] if pod_first else [delete, *ops]

    def _pod_op(self) -> list[Op]:
        verb = self.rng.choices(("create", "delete", "move"), weights=(0.35, 0.25, 0.4))[0]
        if verb == "create":
            free = sorted(c for c, k in self.intent.claims.items()
                          if k not in WFFC and c not in self.intent.pod_of)
            if free:
                return [self._new_pod(self.rng.choice(free))]
        if verb == "delete":
            optional = sorted(p for p, c in self.intent.pods.items()
                              if self.intent.claims[c] not in WFFC)
            if optional:
                return [self._drop_pod(self.rng.choice(optional))]
        if not self.intent.pods:
            return self._claim_op()
        old = self.rng.choice(sorted(self.intent.pods))
        claim = self.intent.pods.pop(old)
        self.intent.deleted_pods.add(old)
        return [self._new_pod(claim, old=old)]

    def _node_op(self) -> list[Op]:
        nodes = self.intent.nodes
        ready = sorted(n for n, s in nodes.items() if s == "ready")
        tainted = sorted(n for n, s in nodes.items() if s == "tainted")
        choices = []
        if len(nodes) < MAX_CHAOS_NODES:
            choices.append("add")
        if ready:
            choices.append("taint")
        if tainted:
            choices.append("delete")
        verb = self.rng.choice(choices)
        if verb == "add":
            name = self._name("n")
            nodes[name] = "ready"
            return [Op("add-node", name=name, zone=self.rng.choice(("zone-a", "zone-b")))]
        if verb == "taint":
            name = self.rng.choice(ready)
            nodes[name] = "tainted"
            return [Op("taint-node", name=name)]
        name = self.rng.choice(tainted)
        del nodes[name]
        self.intent.deleted_nodes.add(name)
        return [Op("delete-node", name=name)]

    # -- the end of the run

    def finish_nodes(self) -> list[Op]:
        """Nodes left tainted out-of-service are deleted: each ends live or gone."""
        ops = []
        for name in sorted(n for n, s in self.intent.nodes.items() if s == "tainted"):
            del self.intent.nodes[name]
            self.intent.deleted_nodes.add(name)
            ops.append(Op("delete-node", name=name))
        return ops

    def replace_pod(self, pod: str) -> Op:
        """A pod the cluster removed (evicted from a tainted node, collected after its node
        was deleted) is made again under a new name, for the same claim."""
        claim = self.intent.pods.pop(pod)
        self.intent.deleted_pods.add(pod)
        self.counts["replace-pod"] += 1
        return self._new_pod(claim)
