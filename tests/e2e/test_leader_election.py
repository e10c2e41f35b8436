"""Leader election survives wall-clock steps; identities are unique per process (issue 15).

Each replica's wall clock is stepped inside its own process: VOLPLANE_WALL_CLOCK_OFFSET_FILE
(faults.py) names a file whose number of seconds that process adds to time.time(), as
an NTP step on its host would. Durations (lease expiry, renew deadline) must not notice.
The API server's audit log (hack/cluster.py's policy: writes to PVs, claims, attachments,
allocations) tells which replica wrote what: the operator's user agent carries its
identity, `volplane/<version> (<identity>)`.
"""

from __future__ import annotations

import json
import time
from datetime import datetime

import pykube

from .conftest import LOG_DIR, kubectl
from .helpers import create, holds_for, wait_for

LEASE_NS = "volplane-system"


def _lease(kubeconfig, name) -> dict | None:
    try:
        return json.loads(kubectl(kubeconfig, "get", "lease", name, "-n", LEASE_NS, "-o",
                                  "json"))
    except RuntimeError:
        return None


def _holder(kubeconfig, name) -> str | None:
    lease = _lease(kubeconfig, name)
    return (lease or {}).get("spec", {}).get("holderIdentity")


def _readyz(port: int) -> int:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _claim(ns, name, cls):
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"storageClassName": cls, "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "1Gi"}}}}


def _pv(name, cls):
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
            "spec": {"storageClassName": cls, "accessModes": ["ReadWriteOnce"],
                     "capacity": {"storage": "1Gi"}, "persistentVolumeReclaimPolicy": "Retain",
                     "hostPath": {"path": f"/tmp/{name}"}}}


def _bound(api, ns) -> int:
    return sum(1 for c in pykube.PersistentVolumeClaim.objects(api, namespace=ns)
               if c.obj.get("status", {}).get("phase") == "Bound")


def _audit_writes(since: float) -> list[dict]:
    path = LOG_DIR / "audit.log"
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        e = json.loads(line)
        if not e.get("userAgent", "").startswith("volplane/"):
            continue
        if not 200 <= (e.get("responseStatus") or {}).get("code", 0) < 300:
            continue
        t = datetime.fromisoformat(e["requestReceivedTimestamp"].replace("Z", "+00:00"))
        if t.timestamp() >= since:
            out.append(e)
    return out


def test_wall_clock_steps_take_no_live_lease_and_stop_no_leader(api, kubeconfig, cluster,
                                                                namespace, operator, tmp_path):
    """The follower's wall clock jumps +60 s (six lease durations): it must not judge the
    live leader's lease expired. The leader's clock jumps +60 s, then back to -60 s: it
    must keep renewing and acting. Throughout, one replica leads and only it writes.
    (Before: the follower took the lease within a second of its step.)"""
    lease_name = f"clock-{namespace}"
    common = ["--leader-elect-name", lease_name, "--leader-elect-lease-duration", "10",
              "--leader-elect-renew-deadline", "8", "--controllers", "pv-binder"]
    ida, idb = f"a-{namespace}", f"b-{namespace}"
    clock_a, clock_b = tmp_path / "clock-a", tmp_path / "clock-b"
    started = time.time()
    a = operator.start(*common, "--leader-elect-retry-period", "1",
                       "--leader-elect-identity", ida,
                       env={"VOLPLANE_WALL_CLOCK_OFFSET_FILE": str(clock_a)})
    wait_for(lambda: _holder(kubeconfig, lease_name) == ida, timeout=60, message="a leads")
    a.wait_ready()
    # b looks at the Lease four times per renewal of a, so a step lands between two
    # sightings of one unchanged renewTime (what a +33 s NTP step did in the churn run).
    b = operator.another("b").start(*common, "--leader-elect-retry-period", "0.25",
                                    "--leader-elect-identity", idb,
                                    env={"VOLPLANE_WALL_CLOCK_OFFSET_FILE": str(clock_b)})
    wait_for(lambda: _readyz(b.metrics_port) == 200, timeout=60, message="b ready (standby)")
    time.sleep(2)  # b has seen the Lease
    transitions = _lease(kubeconfig, lease_name)["spec"].get("leaseTransitions", 0)
    cls = f"clock-{namespace}"

    def work(first: int, n: int) -> None:
        for i in range(first, first + n):
            create(api, _pv(f"{namespace}-pv{i:02d}", cls))
            create(api, _claim(namespace, f"c{i:02d}", cls))

    def one_leader() -> bool:
        return a.running and b.running and _holder(kubeconfig, lease_name) == ida

    # 1. the follower's wall clock steps forward by six lease durations
    clock_b.write_text("60")
    work(0, 5)
    holds_for(one_leader, duration=15, interval=0.5,
              message="a leads, b waits, after b's clock stepped +60 s")
    wait_for(lambda: _bound(api, namespace) == 5, timeout=60, message="a binds 5 claims")
    # 2. the leader's wall clock steps forward, then back
    clock_a.write_text("60")
    work(5, 5)
    holds_for(one_leader, duration=12, interval=0.5,
              message="a leads after its own clock stepped +60 s")
    clock_a.write_text("-60")
    work(10, 5)
    holds_for(one_leader, duration=12, interval=0.5,
              message="a leads after its own clock stepped back to -60 s")
    wait_for(lambda: _bound(api, namespace) == 15, timeout=60, message="a binds 15 claims")
    lease = _lease(kubeconfig, lease_name)
    assert lease["spec"]["holderIdentity"] == ida
    assert lease["spec"].get("leaseTransitions", 0) == transitions, "the lease changed hands"
    # The renewTime strings come from the stepped wall clock (the only use of it): the
    # last one is about 60 s behind the real time now.
    renewed = datetime.fromisoformat(lease["spec"]["renewTime"].replace("Z", "+00:00"))
    assert -80 < renewed.timestamp() - time.time() < -40, lease["spec"]["renewTime"]
    assert any(ln.get("event") == "test hook: the wall clock follows "
               "VOLPLANE_WALL_CLOCK_OFFSET_FILE" for ln in b.log_lines())
    assert not any(ln.get("event") == "became leader" for ln in b.log_lines())
    if not cluster.local:
        return
    writes = _audit_writes(started - 1)
    by_a = [e for e in writes if f"({ida})" in e["userAgent"]]
    by_b = [e for e in writes if f"({idb})" in e["userAgent"]]
    assert by_a, "a wrote nothing (the audit log should show its binds)"
    assert by_b == [], [(e["verb"], e["objectRef"]) for e in by_b]
    kubectl(kubeconfig, "delete", "lease", lease_name, "-n", LEASE_NS, "--ignore-not-found")


def test_replicas_without_pod_name_get_distinct_identities(api, kubeconfig, namespace,
                                                           operator):
    """Two replicas on one host, no POD_NAME, no --leader-elect-identity: before, both
    took the hostname and both "renewed" one Lease, leading at once. Now each process
    has its own identity (hostname_<uuid>), and one leads while the other waits."""
    import os
    import socket
    lease_name = f"ids-{namespace}"
    args = ["--leader-elect-name", lease_name, "--controllers", "pv-binder"]  # 15 s / 10 s
    env = {k: v for k, v in os.environ.items() if k != "POD_NAME"}
    ops = [operator, operator.another("r1")]
    for op in ops:
        op.start(*args, env={**env, "POD_NAME": ""})
    wait_for(lambda: all(_readyz(op.metrics_port) == 200 for op in ops), timeout=60,
             message="replicas ready")

    def identity(op):
        return next(ln.get("identity") for ln in op.log_lines() if ln.get("event") == "starting")

    ids = [identity(op) for op in ops]
    host = socket.gethostname()
    assert ids[0] != ids[1] and all(i.startswith(host + "_") for i in ids), ids
    holder = wait_for(lambda: _holder(kubeconfig, lease_name), timeout=30, message="a leader")
    assert holder in ids

    def leading(op):
        return any(ln.get("event") == "became leader" for ln in op.log_lines())

    holds_for(lambda: sum(leading(op) for op in ops if op.running) == 1, duration=8,
              message="exactly one running replica leads")
    assert _holder(kubeconfig, lease_name) == holder
    kubectl(kubeconfig, "delete", "lease", lease_name, "-n", LEASE_NS, "--ignore-not-found")
