"""The capacity ledger (volplane.pools.ledger), alone and under random allocate/free."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from volplane.pools.ledger import Ledger
from volplane.pools.parameters import (
    BEST_FIT,
    SPREAD,
    ClassParams,
)
from volplane.pools.placement import choose_pool

from .world import GI, NODES, RWO, pool, pools

# --- the ledger ------------------------------------------------------------------------------


def test_ledger_reserve_observe_cancel():
    led = Ledger()
    assert led.reserve("v1", "a", 10, capacity=15)
    assert not led.reserve("v2", "a", 10, capacity=15)  # no room
    assert led.reserve("v1", "a", 10, capacity=15)  # idempotent
    assert led.allocated("a") == 10 and led.count("a") == 1
    led.cancel("v1")
    assert led.allocated("a") == 0 and len(led) == 0
    assert led.reserve("v1", "a", 10, capacity=15)
    led.observe("v1", "a", 10)  # the record landed
    led.cancel("v1")  # no effect on a committed allocation
    assert led.allocated("a") == 10
    assert led.release("v1").size == 10
    assert led.allocated("a") == 0 and led.pools() == set()


def test_ledger_grow_in_flight_is_not_shrunk_by_a_stale_record():
    led = Ledger()
    led.observe("v", "a", 10)
    assert not led.grow("v", 30, capacity=25)
    assert led.grow("v", 20, capacity=25)
    assert led.allocated("a") == 20
    led.observe("v", "a", 10)  # e.g. a watch event from before the grow landed
    assert led.allocated("a") == 20
    led.cancel("v")  # the grow's write failed
    assert led.allocated("a") == 10
    assert led.grow("v", 20, capacity=25)
    led.observe("v", "a", 20)
    led.cancel("v")
    assert led.allocated("a") == 20


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "grow"]),
                          st.integers(1, 8), st.integers(0, 30)), max_size=80),
       st.sampled_from([BEST_FIT, SPREAD]))
def test_random_allocate_free_never_exceeds_capacity(ops, placement):
    caps = {"a": 10 * GI, "b": 16 * GI, "c": 7 * GI}
    ps = pools(*(pool(n, capacity=c, names=["n0"]) for n, c in caps.items()))
    params = ClassParams(placement=placement)
    led = Ledger()
    live: list[str] = []
    for i, (op, gi, pick) in enumerate(ops):
        if op == "alloc":
            choice = choose_pool(gi * GI, RWO, params, ps, led, nodes=NODES)
            fits = [n for n, c in caps.items() if led.allocated(n) + gi * GI <= c]
            assert (choice.pool is None) == (not fits)
            if choice.pool:
                assert led.reserve(f"v{i}", choice.pool, gi * GI, caps[choice.pool])
                if pick % 3:  # most records land; some writes fail and are cancelled
                    led.observe(f"v{i}", choice.pool, gi * GI)
                    live.append(f"v{i}")
                else:
                    led.cancel(f"v{i}")
        elif op == "free" and live:
            led.release(live.pop(pick % len(live)))
        elif op == "grow" and live:
            name = live[pick % len(live)]
            a = led.get(name)
            if led.grow(name, a.size + gi * GI, caps[a.pool]):
                led.observe(name, a.pool, a.size + gi * GI)
        for n, c in caps.items():
            assert led.allocated(n) <= c
            assert led.allocated(n) == sum(led.sizes(n))
            assert led.count(n) == len(led.sizes(n))
