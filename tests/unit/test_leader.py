"""Leader election decisions, with the clock passed in."""

from volplane.leader import decide


def lease(holder, renew="2026-01-01T00:00:00.000000Z", transitions=0, duration=15):
    return {"spec": {"holderIdentity": holder, "renewTime": renew,
                     "leaseTransitions": transitions, "leaseDurationSeconds": duration}}


def test_missing_or_released_lease_is_acquired():
    assert decide(None, "me", 0, {}) == "acquire"
    assert decide(lease(""), "me", 0, {}) == "acquire"


def test_own_lease_is_renewed():
    assert decide(lease("me"), "me", 0, {}) == "renew"


def test_other_holder_is_respected_until_it_stops_renewing_for_a_full_duration():
    obs = {}
    assert decide(lease("other"), "me", 100.0, obs) == "wait"     # first sighting
    assert decide(lease("other"), "me", 114.9, obs) == "wait"     # not yet expired
    assert decide(lease("other"), "me", 115.0, obs) == "acquire"  # 15 s without renewal


def test_a_renewal_resets_the_expiry_clock():
    obs = {}
    assert decide(lease("other", renew="t1"), "me", 0.0, obs) == "wait"
    assert decide(lease("other", renew="t2"), "me", 14.0, obs) == "wait"   # renewed
    assert decide(lease("other", renew="t2"), "me", 28.0, obs) == "wait"
    assert decide(lease("other", renew="t2"), "me", 29.0, obs) == "acquire"
