"""hack/chaos/plan.py: one seed, one schedule; the intent stays coherent (issue 15)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PLAN = Path(__file__).resolve().parents[2] / "hack" / "chaos" / "plan.py"


def _plan():
    spec = importlib.util.spec_from_file_location("volplane_chaos_plan", PLAN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _schedule(seed: int, steps: int):
    plan = _plan()
    planner = plan.Planner(seed, ["p1", "p2", "p3"])
    ops = [str(op) for _ in range(steps) for op in planner.next_ops()]
    return planner, ops


def test_one_seed_gives_one_schedule_and_another_seed_another():
    _, a = _schedule(42, 2000)
    _, b = _schedule(42, 2000)
    _, c = _schedule(43, 2000)
    assert a == b
    assert a != c


def test_intent_stays_coherent_and_every_verb_occurs():
    plan = _plan()
    planner, ops = _schedule(1, 4000)
    intent = planner.intent
    verbs = {op.split()[0] for op in ops}
    assert verbs == {"create-claim", "delete-claim", "create-pod", "delete-pod", "move-pod",
                     "resize-pool", "add-node", "taint-node", "delete-node", "sweep"}
    # every pod's claim lives, and is that claim's one pod
    for pod, claim in intent.pods.items():
        assert claim in intent.claims
        assert intent.pod_of[claim] == pod
    # a WaitForFirstConsumer claim always has its consumer
    assert all(c in intent.pod_of for c, k in intent.claims.items() if k in plan.WFFC)
    # nothing both live and deleted; pool claims within their cap
    assert not intent.deleted_claims & set(intent.claims)
    assert not intent.deleted_pods & set(intent.pods)
    assert not intent.deleted_nodes & set(intent.nodes)
    assert sum(k in plan.POOL_KINDS for k in intent.claims.values()) <= planner.pool_claims
    assert len(intent.nodes) <= plan.MAX_CHAOS_NODES
