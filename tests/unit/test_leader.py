"""Leader election: the pure decision, and the elector's two clocks (injected)."""

import asyncio
import copy

import pytest

from volplane.kube import ApiError
from volplane.leader import LeaderElector, LeaseConfig, _parse_micro, decide, default_identity


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


def test_a_holder_renewtime_far_in_the_past_or_future_does_not_matter():
    """Expiry never compares the holder's renewTime with our clock (skew-safe)."""
    obs = {}
    old = lease("other", renew="2001-01-01T00:00:00.000000Z")
    assert decide(old, "me", 5.0, obs) == "wait"
    assert decide(old, "me", 19.9, obs) == "wait"
    obs = {}
    future = lease("other", renew="2099-01-01T00:00:00.000000Z")
    assert decide(future, "me", 5.0, obs) == "wait"
    assert decide(future, "me", 20.0, obs) == "acquire"


# -- identity ------------------------------------------------------------------------------
def test_identity_is_pod_name_when_set():
    assert default_identity({"POD_NAME": "volplane-7d9-abc"}) == "volplane-7d9-abc"


def test_identity_without_pod_name_is_unique_per_process():
    import socket
    a, b = default_identity({}), default_identity({})
    assert a != b
    assert a.startswith(socket.gethostname() + "_") and b.startswith(socket.gethostname() + "_")
    assert LeaseConfig().identity != LeaseConfig().identity


# -- the elector with injected clocks ------------------------------------------------------
class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


class LeaseServer:
    """An in-memory Lease endpoint with resourceVersion preconditions (unit tests only;
    the e2e tests run against a real API server)."""

    def __init__(self):
        self.lease = None
        self.rv = 0
        self.write_guard = None
        self.writes = []

    def with_own_limit(self, qps, burst):
        return self

    async def get(self, path):
        if self.lease is None:
            raise ApiError(404, "Not Found", {"reason": "NotFound"})
        return copy.deepcopy(self.lease)

    async def create(self, path, body):
        if self.lease is not None:
            raise ApiError(409, "Conflict", {"reason": "AlreadyExists"})
        self.rv += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.rv)
        self.writes.append(("create", body["spec"]["holderIdentity"]))
        return copy.deepcopy(self.lease)

    async def merge_patch(self, path, patch):
        if patch["metadata"]["resourceVersion"] != self.lease["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", {"reason": "Conflict"})
        self.rv += 1
        self.lease["spec"].update(patch["spec"])
        self.lease["metadata"]["resourceVersion"] = str(self.rv)
        self.writes.append(("patch", patch["spec"]["holderIdentity"]))
        return copy.deepcopy(self.lease)


def elector(server, identity, mono, wall):
    return LeaderElector(server, LeaseConfig(identity=identity, lease_duration=15,
                                             renew_deadline=10, retry_period=2),
                         clock=mono, wall=wall)


def run(coro):
    return asyncio.run(coro)


def test_a_follower_whose_wall_clock_steps_does_not_take_a_live_lease():
    server = LeaseServer()
    mono_a, wall_a = Clock(), Clock(1_700_000_000.0)
    mono_b, wall_b = Clock(50.0), Clock(1_700_000_000.0)
    a, b = elector(server, "a", mono_a, wall_a), elector(server, "b", mono_b, wall_b)
    assert run(a._try()) is True                     # a creates the Lease
    assert run(b._try()) is False                    # b sees a for the first time
    for i in range(20):                              # 40 s of a renewing every 2 s
        for clock in (mono_a, wall_a, mono_b, wall_b):
            clock.t += 1
        assert run(b._try()) is False, "b took a lease a renews"
        for clock in (mono_a, wall_a, mono_b, wall_b):
            clock.t += 1
        if i == 3:
            wall_b.t += 33                           # b's wall clock steps +33 s once,
        assert run(b._try()) is False, "b took a lease a renews"  # lease unchanged
        assert run(a._try()) is True
    assert server.lease["spec"]["holderIdentity"] == "a"
    assert {w[1] for w in server.writes} == {"a"}


def test_the_follower_takes_over_after_a_full_duration_on_its_monotonic_clock():
    server = LeaseServer()
    a = elector(server, "a", Clock(), Clock(1_700_000_000.0))
    mono_b, wall_b = Clock(7.0), Clock(1_600_000_000.0)
    b = elector(server, "b", mono_b, wall_b)
    assert run(a._try()) is True
    assert run(b._try()) is False
    wall_b.t += 3600                                 # a wall step alone changes nothing
    assert run(b._try()) is False
    mono_b.t += 14.9
    assert run(b._try()) is False
    mono_b.t += 0.1                                  # 15 s with no renewal by a
    assert run(b._try()) is True
    spec = server.lease["spec"]
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    # the strings come from the wall clock, the only thing it is used for
    assert _parse_micro(spec["renewTime"]) == pytest.approx(wall_b.t, abs=1e-3)
    assert spec["acquireTime"] == spec["renewTime"]


def test_the_renew_deadline_is_measured_on_the_monotonic_clock():
    server = LeaseServer()
    mono, wall = Clock(), Clock(1_700_000_000.0)
    a = elector(server, "a", mono, wall)
    assert run(a._try()) is True
    a.last_renew = mono()
    a.leading.set()
    wall.t += 3600                                   # wall step forward: still ours
    assert not a.renew_expired()
    wall.t -= 7200                                   # and backward
    assert not a.renew_expired()
    a.check()                                        # the write guard lets writes pass
    mono.t += 9.9
    assert not a.renew_expired()
    mono.t += 0.1                                    # 10 s without a renewal: lost
    assert a.renew_expired()


def test_the_write_guard_stops_a_leader_past_its_renew_deadline(monkeypatch):
    server = LeaseServer()
    mono = Clock()
    a = elector(server, "a", mono, Clock(1_700_000_000.0))
    a.last_renew = mono()
    a.leading.set()
    stopped = []
    monkeypatch.setattr(a, "lost", lambda: stopped.append(True))
    assert server.write_guard == a.check
    mono.t += 10.5
    a.check()
    assert stopped == [True]


def test_a_cold_candidate_waits_for_its_caches_but_keeps_the_expiry_clock_running():
    server = LeaseServer()
    a = elector(server, "a", Clock(), Clock(1_700_000_000.0))
    assert run(a._try()) is True
    synced = False
    mono_b = Clock(7.0)
    b = LeaderElector(server, LeaseConfig(identity="b", lease_duration=15, renew_deadline=10,
                                          retry_period=2),
                      clock=mono_b, wall=Clock(1_700_000_000.0), ready=lambda: synced)
    assert run(b._try()) is False                    # b sees a for the first time
    mono_b.t += 20                                   # a stopped renewing long ago,
    assert run(b._try()) is False                    # but b's caches are not synced
    assert server.lease["spec"]["holderIdentity"] == "a"
    synced = True                                    # warm: b takes it at once
    assert run(b._try()) is True
    assert server.lease["spec"]["holderIdentity"] == "b"


def test_a_cold_candidate_does_not_create_a_missing_lease():
    server = LeaseServer()
    a = LeaderElector(server, LeaseConfig(identity="a"), clock=Clock(),
                      wall=Clock(1_700_000_000.0), ready=lambda: False)
    assert run(a._try()) is False
    assert server.lease is None
