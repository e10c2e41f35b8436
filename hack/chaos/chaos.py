#!/usr/bin/env python3
"""`make chaos`: a seeded, bounded churn run against the local control plane (issue 15).

    .venv/bin/python hack/chaos/chaos.py [--seed 1] [--minutes 10] [--keep] [--doc PATH]

For --minutes (default 10) it churns claims (static PVs and pool classes, Immediate and
WaitForFirstConsumer), pods (created, deleted, moved between nodes), kwok nodes (added,
tainted node.kubernetes.io/out-of-service, deleted) and pool sizes (plan.py: the
schedule, one random.Random per actor, all seeded from --seed), while
  - two `volplane run` replicas compete for the Lease; the leader is SIGKILLed every
    1-10 s (a random gap) and every replica that exits is started again;
  - a third writer merge-patches labels and annotations of the same claims, PVs,
    attachments, pools and nodes, so that the operator's conditional writes meet 409s;
  - kube-apiserver is paused (SIGSTOP, 2-5 s, SIGCONT) at random times, >= 5 times.
Then it stops the chaos, waits (bounded) until every object reached its end state (each
deleted object gone, each surviving claim Bound, each surviving pod Running with its
volume attached), runs `volplane check`, prints a summary and, on a full-length run,
writes it into docs/reliability.md. Any failure prints the seed and the command that
repeats the run. Whatever happens (Ctrl-C included), the API server is resumed and the
operators this run started are stopped; the control plane keeps running.

Its files: .local[/clusters/$VOLPLANE_CLUSTER]/chaos/ (operator logs, summary.json).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pykube
import requests

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from plan import POOL_KINDS, WFFC, Op, Planner  # noqa: E402

NS = "chaos"
LABEL = "volplane.io/chaos"
POKE = "chaos.volplane.io/poke"
POOL_DRIVER = "pool.volplane.io"
OOS_TAINT = "node.kubernetes.io/out-of-service"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
POOLS = ("chaos-pool-a", "chaos-pool-b", "chaos-pool-wide")
CLASS_OF = {"static": "chaos-static", "static-wffc": "chaos-static-wffc",
            "pool": "chaos-pool", "pool-wffc": "chaos-pool-wffc"}
API = {  # kind -> (group path, plural, namespaced)
    "claim": ("/api/v1", "persistentvolumeclaims", True),
    "pod": ("/api/v1", "pods", True),
    "pv": ("/api/v1", "persistentvolumes", False),
    "node": ("/api/v1", "nodes", False),
    "namespace": ("/api/v1", "namespaces", False),
    "class": ("/apis/storage.k8s.io/v1", "storageclasses", False),
    "va": ("/apis/storage.k8s.io/v1", "volumeattachments", False),
    "pool": ("/apis/volplane.io/v1alpha1", "storagepools", False),
    "allocation": ("/apis/volplane.io/v1alpha1", "storageallocations", False),
}
LEASE = "/apis/coordination.k8s.io/v1/namespaces/volplane-system/leases/volplane"


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_cluster_module():
    spec = importlib.util.spec_from_file_location("volplane_hack_cluster",
                                                  REPO / "hack" / "cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def path(kind: str, name: str = "", sub: str = "") -> str:
    group, plural, namespaced = API[kind]
    p = f"{group}/namespaces/{NS}/{plural}" if namespaced else f"{group}/{plural}"
    return p + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")


class ChaosError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- API client


class Api:
    """Plain REST through pykube's session (one per thread). Connection errors, timeouts
    (a paused API server), 429 and 5xx are retried until `patience` runs out."""

    def __init__(self, kubeconfig: str, patience: float = 90.0):
        self.client = pykube.HTTPClient(pykube.KubeConfig.from_file(kubeconfig), timeout=10)
        self.patience = patience

    def call(self, method: str, url: str, body=None, *, params=None,
             ctype: str = "application/json") -> tuple[int, dict]:
        deadline = time.monotonic() + self.patience
        attempt = 0
        while True:
            attempt += 1
            try:
                r = self.client.session.request(
                    method, self.client.url + url, params=params,
                    data=json.dumps(body) if body is not None else None,
                    headers={"Content-Type": ctype} if body is not None else None, timeout=10)
                if r.status_code != 429 and r.status_code < 500:
                    try:
                        return r.status_code, r.json()
                    except ValueError:
                        return r.status_code, {}
                err = f"HTTP {r.status_code}"
            except requests.RequestException as e:
                err = repr(e)
            if time.monotonic() >= deadline:
                raise ChaosError(f"{method} {url}: no answer in {self.patience:.0f} s: {err}")
            time.sleep(min(2.0, 0.2 * attempt))

    def get(self, url: str, **params) -> dict | None:
        code, body = self.call("GET", url, params=params or None)
        if code == 404:
            return None
        if code != 200:
            raise ChaosError(f"GET {url}: {code} {body.get('message', '')}")
        return body

    def items(self, kind: str, **params) -> list[dict]:
        return (self.get(path(kind), **params) or {}).get("items") or []

    def create(self, kind: str, body: dict) -> int:
        """POST; an object that already exists (our own retried POST) counts as made."""
        code, resp = self.call("POST", path(kind), body)
        if code not in (201, 409):
            raise ChaosError(f"create {kind} {body['metadata']['name']}: {code} "
                             f"{resp.get('message', '')}")
        return code

    def delete(self, kind: str, name: str, grace0: bool = False) -> int:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0} \
            if grace0 else None
        code, resp = self.call("DELETE", path(kind, name), body)
        if code not in (200, 202, 404, 409):
            raise ChaosError(f"delete {kind} {name}: {code} {resp.get('message', '')}")
        return code

    def patch(self, kind: str, name: str, patch: dict, sub: str = "") -> int:
        code, _ = self.call("PATCH", path(kind, name, sub), patch,
                            ctype="application/merge-patch+json")
        return code


# ----------------------------------------------------------------------------- manifests


def labels(**extra: str) -> dict:
    return {LABEL: "true", **extra}


def claim_manifest(name: str, kind: str) -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": NS, "labels": labels(kind=kind)},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": CLASS_OF[kind],
                     "resources": {"requests": {"storage": "1Gi"}}}}


def static_pv_manifest(name: str, kind: str) -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name, "labels": labels()},
            "spec": {"accessModes": ["ReadWriteOnce"], "capacity": {"storage": "1Gi"},
                     "storageClassName": CLASS_OF[kind],
                     "persistentVolumeReclaimPolicy": "Retain",
                     "hostPath": {"path": f"/tmp/{name}"}}}


def pod_manifest(name: str, claim: str, avoid: str = "") -> dict:
    spec: dict = {
        "terminationGracePeriodSeconds": 0, "nodeSelector": {"type": "kwok"},
        "containers": [{"name": "main", "image": PAUSE_IMAGE,
                        "volumeMounts": [{"name": "d", "mountPath": "/d"}]}],
        "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": claim}}]}
    if avoid:
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": [avoid]}]}]}}}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": labels(claim=claim)},
            "spec": spec}


def node_manifest(cluster, name: str, zone: str) -> dict:
    node = cluster.node_manifest(name, 0)
    node["metadata"]["labels"].update({"topology.kubernetes.io/zone": zone, LABEL: "true"})
    return node


def setup_objects(api: Api, cluster) -> None:
    """Namespace, pools, classes (idempotent)."""
    api.create("namespace", {"apiVersion": "v1", "kind": "Namespace",
                             "metadata": {"name": NS, "labels": labels()}})
    base = sorted(n["metadata"]["name"] for n in api.items("node")
                  if (n["metadata"].get("labels") or {}).get("type") == "kwok"
                  and LABEL not in (n["metadata"].get("labels") or {}))
    zones = {"chaos-pool-a": base[0::2], "chaos-pool-b": base[1::2]}
    for pool in POOLS:
        nodes = ({"selector": {"matchLabels": {"type": "kwok"}}} if pool == "chaos-pool-wide"
                 else {"names": zones[pool]})
        api.create("pool", {"apiVersion": "volplane.io/v1alpha1", "kind": "StoragePool",
                            "metadata": {"name": pool, "labels": labels()},
                            "spec": {"capacity": "60Gi", "nodes": nodes, "slotsPerNode": 128}})
    for kind, cls in CLASS_OF.items():
        body = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                "metadata": {"name": cls, "labels": labels()},
                "volumeBindingMode": "WaitForFirstConsumer" if kind in WFFC else "Immediate"}
        if kind in POOL_KINDS:
            body.update(provisioner=POOL_DRIVER, reclaimPolicy="Delete",
                        parameters={"poolSelector": f"{LABEL}=true"})
        else:
            body.update(provisioner="kubernetes.io/no-provisioner", reclaimPolicy="Retain")
        api.create("class", body)
    for _ in range(150):
        sa = api.get(f"/api/v1/namespaces/{NS}/serviceaccounts/default")
        if sa:
            return
        time.sleep(0.2)
    raise ChaosError(f"no ServiceAccount {NS}/default after 30 s")


def remove_objects(api: Api, timeout: float) -> list[str]:
    """Deletes everything a run made (operators running: they reclaim what they own);
    what is still there at the deadline loses its finalizers. Returns what was forced."""
    for pod in api.items("pod"):
        api.delete("pod", pod["metadata"]["name"], grace0=True)
    for claim in api.items("claim"):
        api.delete("claim", claim["metadata"]["name"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (api.items("claim") or _our_pvs(api)):
        for pv in _our_pvs(api):
            if pv["metadata"].get("labels", {}).get(LABEL) and not \
                    pv["metadata"].get("deletionTimestamp"):
                api.delete("pv", pv["metadata"]["name"])
        time.sleep(2)
    forced = []
    for kind, objs in (("claim", api.items("claim")), ("pv", _our_pvs(api))):
        for obj in objs:
            name = obj["metadata"]["name"]
            api.delete(kind, name)
            api.patch(kind, name, {"metadata": {"finalizers": None}})
            forced.append(f"{kind}/{name}")
    for rec in api.items("allocation"):
        if (rec.get("spec") or {}).get("pool") in POOLS:
            api.delete("allocation", rec["metadata"]["name"])
            forced.append(f"allocation/{rec['metadata']['name']}")
    for kind in ("pool", "class", "node"):
        for obj in api.items(kind, labelSelector=LABEL):
            api.delete(kind, obj["metadata"]["name"])
    return forced


def _our_pvs(api: Api) -> list[dict]:
    return [pv for pv in api.items("pv")
            if (pv["metadata"].get("labels") or {}).get(LABEL)
            or ((pv.get("spec") or {}).get("claimRef") or {}).get("namespace") == NS]


# ----------------------------------------------------------------------------- operators


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            text = r.read().decode()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


class Replica:
    """One `volplane run` slot: started again whenever it exits. Each start has its own
    identity (chaos-<run>-r<slot>-<n>), metrics port and log file."""

    ARGS = ("--health-port", "0", "--bind-address", "127.0.0.1",
            "--leader-elect-lease-duration", "4", "--leader-elect-renew-deadline", "3",
            "--leader-elect-retry-period", "0.5")

    def __init__(self, slot: int, kubeconfig: str, logs: Path, run_id: str):
        self.slot = slot
        self.run_id = run_id
        self.kubeconfig = kubeconfig
        self.logs = logs
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.port = 0
        self.identity = ""
        self.log_path: Path | None = None
        self.last: dict[str, float] = {}   # the last scrape of the current process
        self.exits: Counter[int] = Counter()  # exit code -> count
        self.totals: Counter[str] = Counter()  # counters summed over ended processes

    def start(self) -> None:
        self.starts += 1
        self.port = free_port()
        self.identity = f"chaos-{self.run_id}-r{self.slot}-{self.starts}"
        self.log_path = self.logs / f"operator-r{self.slot}-{self.starts:03d}.log"
        argv = [str(REPO / ".venv" / "bin" / "volplane"), "run", "--kubeconfig",
                self.kubeconfig, "--metrics-port", str(self.port),
                "--leader-elect-identity", self.identity, *self.ARGS]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=REPO,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                         start_new_session=True)
        self.last = {}

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def leading(self) -> bool:
        return self.alive and self.last.get("volplane_leader") == 1.0

    def ended(self) -> int:
        """Bookkeeping of a process that exited; returns its exit code."""
        code = self.proc.returncode
        self.exits[code] += 1
        for key, value in self.last.items():
            if key.startswith(("volplane_sync_total", "volplane_api_conflicts_total")):
                self.totals[key] += value
        self.last = {}
        return code

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def synced(self) -> bool:
        """/readyz: caches synced (a follower is a warm standby; the leader also runs
        every controller loop)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz",
                                        timeout=1) as r:
                return r.status == 200
        except OSError:
            return False


# ----------------------------------------------------------------------------- the run


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.seed = args.seed
        self.cluster = load_cluster_module()
        self.kubeconfig = str(self.cluster.up(REPO))
        self.layout = self.cluster.Layout(REPO)
        state = self.cluster.load_state(self.layout)
        self.apiserver_pid = int(state["pids"]["kube-apiserver"])
        self.apiserver_bin = str(Path(state["bin_dir"]) / "kube-apiserver")
        self.work = self.layout.local / "chaos"
        self.logs = self.work / f"logs-seed{self.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.api = Api(self.kubeconfig)
        run_id = time.strftime("%H%M%S")
        self.replicas = [Replica(i, self.kubeconfig, self.logs, run_id) for i in (0, 1)]
        self.planner = Planner(self.seed, list(POOLS))
        self.stop = threading.Event()       # the chaos actors
        self.stop_supervisor = threading.Event()
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.kill_log: list[tuple[float, str]] = []
        self.pauses: list[float] = []
        self.paused = False
        self.max_depth: Counter[str] = Counter()
        self.max_pending = 0
        self.two_leaders = 0
        self.errors: list[str] = []
        self.threads: list[threading.Thread] = []

    # -- safety: the API server is never left stopped

    def resume_apiserver(self) -> None:
        if self.cluster.pid_alive(self.apiserver_pid, self.apiserver_bin):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.apiserver_pid, signal.SIGCONT)
        self.paused = False

    # -- actors

    def _thread(self, name: str, target) -> None:
        def guarded():
            try:
                target()
            except Exception as e:  # an actor's failure fails the run, never hangs it
                self.errors.append(f"{name}: {e!r}")
                log(f"actor {name} failed: {e!r}")
                self.stop.set()
        t = threading.Thread(target=guarded, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def supervise(self) -> None:
        """Restarts exited replicas, scrapes their metrics (local HTTP, no API server)."""
        while not self.stop_supervisor.is_set():
            leaders = 0
            for r in self.replicas:
                if r.proc is not None and not r.alive:
                    code = r.ended()
                    if code != -signal.SIGKILL:
                        log(f"replica {r.identity} exited by itself with {code}")
                    r.start()
                    continue
                sample = scrape(r.port)
                if sample:
                    r.last = sample
                    for key, value in sample.items():
                        m = re.match(r'volplane_workqueue_depth\{controller="([^"]+)"', key)
                        if m and value > self.max_depth[m.group(1)]:
                            self.max_depth[m.group(1)] = int(value)
                leaders += r.leading()
            if leaders > 1:
                self.two_leaders += 1
            self.stop_supervisor.wait(0.5)

    def killer(self) -> None:
        rng = random.Random(f"{self.seed}/kill")
        last = time.monotonic()
        while not self.stop.is_set():
            gap = rng.uniform(1.0, 10.0)
            if self.stop.wait(max(0.0, last + gap - time.monotonic())):
                return
            while not self.stop.is_set():  # the next leader (a takeover takes ~4 s)
                leaders = [r for r in self.replicas if r.leading()]
                if leaders:
                    victim = leaders[0]
                    victim.kill()
                    last = time.monotonic()
                    self.kill_log.append((time.time(), victim.identity))
                    break
                self.stop.wait(0.1)

    def pauser(self, duration: float) -> None:
        rng = random.Random(f"{self.seed}/pause")
        count = max(5, round(duration / 60 * 0.8))
        start = time.monotonic()
        plan = sorted((rng.uniform(0.05, 0.95) * duration, rng.uniform(2.0, 5.0))
                      for _ in range(count))
        for at, length in plan:
            if self.stop.wait(max(0.0, start + at - time.monotonic())):
                return
            if not self.cluster.pid_alive(self.apiserver_pid, self.apiserver_bin):
                raise ChaosError("kube-apiserver is not running")
            self.paused = True
            os.kill(self.apiserver_pid, signal.SIGSTOP)
            try:
                time.sleep(length)
            finally:
                self.resume_apiserver()
            self.pauses.append(length)

    def writer(self) -> None:
        """The third writer: label/annotation patches on the operator's objects, mostly
        on those it is about to write (claims not Bound, PVs not Bound, attachments not
        attached or being deleted), so that its conditional writes meet 409s."""
        rng = random.Random(f"{self.seed}/writer")
        api = Api(self.kubeconfig)
        busy: list[tuple[str, str]] = []
        every: list[tuple[str, str]] = []
        refreshed = 0.0
        n = 0
        while not self.stop.is_set():
            if time.monotonic() - refreshed > 2:
                busy, every = self._writer_targets(api)
                refreshed = time.monotonic()
            pick_busy = rng.random() < 0.7
            targets = busy if pick_busy and busy else every
            if targets:
                kind, name = rng.choice(targets)
                n += 1
                value = f"{n}"
                code = api.patch(kind, name, {"metadata": {"labels": {POKE: value},
                                                           "annotations": {POKE: value}}})
                self.counts[f"writer:{code}"] += 1
            self.stop.wait(rng.uniform(0.02, 0.1))

    def _writer_targets(self, api: Api) -> tuple[list, list]:
        busy, every = [], []
        for kind, objs in (("claim", api.items("claim")), ("pv", _our_pvs(api)),
                           ("va", api.items("va"))):
            for obj in objs:
                key = (kind, obj["metadata"]["name"])
                every.append(key)
                status = obj.get("status") or {}
                settled = status.get("attached") if kind == "va" else \
                    status.get("phase") in ("Bound", "Available")
                if obj["metadata"].get("deletionTimestamp") or not settled:
                    busy.append(key)
        every += [("pool", p) for p in POOLS]
        every += [("node", n["metadata"]["name"]) for n in api.items("node")]
        return sorted(busy), sorted(every)

    def sampler(self) -> None:
        """The backlog as a user sees it: claims not Bound, pods not Running."""
        api = Api(self.kubeconfig)
        while not self.stop_supervisor.is_set():
            with contextlib.suppress(ChaosError):
                pending = sum(1 for c in api.items("claim")
                              if (c.get("status") or {}).get("phase") != "Bound")
                self.max_pending = max(self.max_pending, pending)
            self.stop_supervisor.wait(2)

    # -- the churn (this thread applies the planner's operations)

    def churn(self, duration: float) -> None:
        interval = self.args.interval
        start = time.monotonic()
        step = 0
        while not self.stop.is_set():
            now = time.monotonic()
            if now - start >= duration and self.targets_met(duration):
                return
            if now - start >= duration * 3:
                return  # bounded: the targets check reports what fell short
            for op in self.planner.next_ops():
                self.apply(op)
            step += 1
            self.stop.wait(max(0.0, start + step * interval - time.monotonic()))

    def apply(self, op: Op) -> None:
        api = self.api
        self.counts[op.verb] += 1
        if op.verb == "create-claim":
            if op.pv:
                api.create("pv", static_pv_manifest(op.pv, op.kind))
            api.create("claim", claim_manifest(op.name, op.kind))
        elif op.verb == "delete-claim":
            api.delete("claim", op.name)
        elif op.verb == "create-pod":
            api.create("pod", pod_manifest(op.name, op.claim))
        elif op.verb == "delete-pod":
            api.delete("pod", op.name, grace0=True)
        elif op.verb == "move-pod":
            old = api.get(path("pod", op.old)) or {}
            node = (old.get("spec") or {}).get("nodeName") or ""
            api.delete("pod", op.old, grace0=True)
            api.create("pod", pod_manifest(op.name, op.claim, avoid=node))
            self.counts["moved-from-a-node"] += bool(node)
        elif op.verb == "resize-pool":
            code = api.patch("pool", op.name, {"spec": {"capacity": f"{op.size_gi}Gi"}})
            self.counts[f"resize-pool:{code}"] += 1
        elif op.verb == "add-node":
            api.create("node", node_manifest(self.cluster, op.name, op.zone))
        elif op.verb == "taint-node":
            api.patch("node", op.name, {"spec": {"taints": [
                {"key": OOS_TAINT, "value": "nodeshutdown", "effect": "NoExecute"}]}})
        elif op.verb == "delete-node":
            api.delete("node", op.name)
        elif op.verb == "sweep":
            self.sweep()

    def sweep(self) -> int:
        """Static PVs of deleted claims go Released (Retain): the admin deletes them."""
        n = 0
        for pv in self.api.items("pv", labelSelector=LABEL):
            if (pv.get("status") or {}).get("phase") == "Released" and \
                    not pv["metadata"].get("deletionTimestamp"):
                self.api.delete("pv", pv["metadata"]["name"])
                self.planner.intent.static_pvs.discard(pv["metadata"]["name"])
                n += 1
        self.counts["static-pv-swept"] += n
        return n

    def targets(self, duration: float) -> dict[str, tuple[int, int]]:
        """What a run of this length must have done: (done, wanted)."""
        m = duration / 60
        c = self.planner.counts
        pod_ops = c["create-pod"] + c["delete-pod"] + c["move-pod"]
        return {"claims created": (c["create-claim"], round(100 * m)),
                "claims deleted": (c["delete-claim"], round(80 * m)),
                "pod operations": (pod_ops, round(50 * m)),
                "leader kills": (len(self.kill_log), round(10 * m)),
                "API server pauses": (len(self.pauses), 5),
                "nodes added": (c["add-node"], 1), "nodes tainted": (c["taint-node"], 1),
                "nodes deleted": (c["delete-node"], 1),
                "pool resizes": (c["resize-pool"], 1)}

    def targets_met(self, duration: float) -> bool:
        return all(done >= want for done, want in self.targets(duration).values())

    # -- the end

    def end_state(self) -> list[str]:
        """What is not yet as the intent says (empty: converged). Replaces pods that the
        cluster removed (evicted, collected with their node) and sweeps Released PVs."""
        api, intent = self.api, self.planner.intent
        self.sweep()
        claims = {c["metadata"]["name"]: c for c in api.items("claim")}
        pods = {p["metadata"]["name"]: p for p in api.items("pod")}
        nodes = {n["metadata"]["name"] for n in api.items("node")}
        pvs = {p["metadata"]["name"]: p for p in api.items("pv")}
        vas = api.items("va")
        issues = []
        for pod in sorted(intent.pods):
            p = pods.get(pod)
            if p is None or p["metadata"].get("deletionTimestamp") or \
                    (p["spec"].get("nodeName") and p["spec"]["nodeName"] not in nodes):
                if p is None:
                    self.apply(self.planner.replace_pod(pod))
                issues.append(f"pod {pod}: removed by the cluster, made again")
        issues += [f"deleted claim {n} still there" for n in intent.deleted_claims if n in claims]
        issues += [f"deleted pod {n} still there" for n in intent.deleted_pods if n in pods]
        issues += [f"deleted node {n} still there" for n in intent.deleted_nodes if n in nodes]
        for name, pv in pvs.items():
            ref = (pv["spec"].get("claimRef") or {})
            if ref.get("namespace") == NS and ref.get("name") not in intent.claims:
                issues.append(f"PV {name} of deleted claim {ref.get('name')} "
                              f"({(pv.get('status') or {}).get('phase')}) still there")
        for name, kind in sorted(intent.claims.items()):
            c = claims.get(name)
            phase = (c or {}).get("status", {}).get("phase")
            if phase != "Bound":
                issues.append(f"claim {name} ({kind}) is {phase or 'absent'}")
        for pod, claim in sorted(intent.pods.items()):
            issues += self._pod_issues(pods.get(pod), claims.get(claim), pvs, vas)
        return issues

    def _pod_issues(self, pod: dict | None, claim: dict | None, pvs: dict,
                    vas: list[dict]) -> list[str]:
        if pod is None:
            return []
        name = pod["metadata"]["name"]
        node = pod["spec"].get("nodeName")
        phase = (pod.get("status") or {}).get("phase")
        if not node or phase != "Running":
            return [f"pod {name} is {phase} on {node or 'no node'}"]
        pv = pvs.get(((claim or {}).get("spec") or {}).get("volumeName") or "")
        if pv is None:
            return [f"pod {name}: its claim has no PV"]
        if ((pv["spec"].get("csi") or {}).get("driver")) != POOL_DRIVER:
            return []  # hostPath: nothing to attach
        attached = [v for v in vas if v["spec"]["nodeName"] == node
                    and (v["spec"].get("source") or {}).get("persistentVolumeName")
                    == pv["metadata"]["name"] and (v.get("status") or {}).get("attached")]
        return [] if attached else [f"pod {name}: {pv['metadata']['name']} not attached "
                                    f"on {node}"]

    def converge(self, timeout: float) -> tuple[float | None, list[str]]:
        t0 = time.monotonic()
        for op in self.planner.finish_nodes():
            self.apply(op)
        issues: list[str] = []
        while time.monotonic() - t0 < timeout:
            issues = self.end_state()
            if not issues:
                return time.monotonic() - t0, []
            time.sleep(2)
        return None, issues

    def check(self) -> tuple[int, dict, str]:
        out = subprocess.run([str(REPO / ".venv" / "bin" / "volplane"), "check",
                              "--kubeconfig", self.kubeconfig, "-o", "json", "--wait", "120"],
                             capture_output=True, text=True, timeout=300)
        try:
            report = json.loads(out.stdout)
        except ValueError:
            report = {}
        return out.returncode, report, out.stderr

    def audit(self, since: float, until: float) -> tuple[Counter[str], dict]:
        """From the API server's audit log (writes to PVs, claims, attachments, records):
        the operator's writes answered 409, by resource; and whether two replicas ever
        wrote in the same span of time: each identity's first..last successful write
        (the user agent carries it), and the pairs of identities whose spans overlap."""
        found: Counter[str] = Counter()
        spans: dict[str, list[float]] = {}
        for f in sorted(self.layout.logs.glob("audit*.log")):
            with open(f, errors="replace") as fh:
                for line in fh:
                    if "volplane/" not in line:
                        continue
                    e = json.loads(line)
                    ua = e.get("userAgent", "")
                    t = datetime.fromisoformat(
                        e["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
                    if not (ua.startswith("volplane/") and since <= t <= until):
                        continue
                    code = (e.get("responseStatus") or {}).get("code", 0)
                    if code == 409:
                        ref = e.get("objectRef") or {}
                        sub = f"/{ref['subresource']}" if ref.get("subresource") else ""
                        found[f"{ref.get('resource')}{sub}"] += 1
                    elif 200 <= code < 300:
                        who = ua.rsplit("(", 1)[-1].rstrip(")")
                        span = spans.setdefault(who, [t, t])
                        span[0], span[1] = min(span[0], t), max(span[1], t)
        overlaps = []
        latest = ("", 0.0)  # the identity whose writes ended last so far, and when
        for who, (start, end) in sorted(spans.items(), key=lambda kv: kv[1][0]):
            if start < latest[1]:
                overlaps.append(f"{latest[0]} until +{latest[1] - start:.2f} s after "
                                f"{who} began")
            if end > latest[1]:
                latest = (who, end)
        return found, {"writers": len(spans), "overlaps": overlaps}

    # -- main

    def run(self) -> int:
        args = self.args
        duration = args.minutes * 60
        summary: dict = {"seed": self.seed, "minutes": args.minutes}
        t_wall0 = time.time()
        try:
            self.resume_apiserver()  # an earlier run killed mid-pause
            self.prepare()
            log(f"seed {self.seed}: churn for {args.minutes} min")
            t_churn = time.monotonic()
            self._thread("supervisor", self.supervise)
            self._thread("sampler", self.sampler)
            self._thread("killer", self.killer)
            self._thread("writer", self.writer)
            self._thread("pauser", lambda: self.pauser(duration))
            try:
                self.churn(duration)
            finally:
                self.stop.set()
                self.resume_apiserver()
            summary["churn_seconds"] = round(time.monotonic() - t_churn)
            log(f"churn over after {summary['churn_seconds']} s; waiting for convergence")
            for r in self.replicas:  # both replicas up again for the convergence
                if not r.alive:
                    r.ended()
                    r.start()
            converged, issues = self.converge(args.converge_timeout)
            summary["converge_seconds"] = None if converged is None else round(converged, 1)
            code, report, err = self.check() if not issues else (None, {}, "")
            summary.update(self.figures(t_wall0, duration))
            summary["end_state_issues"] = issues[:50]
            summary["check"] = {"exit": code, "violations": report.get("violations", [])[:50],
                                "objects": report.get("objects"), "stderr": err[-2000:]}
            failures = self.failures(summary, duration)
            summary["result"] = "FAIL" if failures else "PASS"
            summary["failures"] = failures
            self.report(summary)
            if not args.keep:
                forced = remove_objects(self.api, 120)
                if forced:
                    log(f"cleanup: forced {len(forced)} objects: {forced[:10]}")
            return 1 if failures else 0
        except BaseException as e:
            self.stop.set()
            self.resume_apiserver()
            log(f"run aborted: {e!r}")
            self.print_repro()
            raise
        finally:
            self.stop.set()
            self.resume_apiserver()
            self.stop_supervisor.set()
            for t in self.threads:
                t.join(timeout=30)
            for r in self.replicas:
                r.stop()
            self.resume_apiserver()

    def prepare(self) -> None:
        kubectl = ["kubectl", "--kubeconfig", self.kubeconfig]
        subprocess.run([*kubectl, "apply", "--server-side", "--force-conflicts", "-k",
                        str(REPO / "crds")], check=True, capture_output=True)
        files = [a for f in ("namespace.yaml", "rbac.yaml", "csidriver.yaml")
                 for a in ("-f", str(REPO / "manifests" / f))]
        subprocess.run([*kubectl, "apply", "--server-side", "--force-conflicts", *files],
                       check=True, capture_output=True)
        subprocess.run([*kubectl, "wait", "--for=condition=Established", "--timeout=60s",
                        "crd/storagepools.volplane.io", "crd/storageallocations.volplane.io"],
                       check=True, capture_output=True)
        for r in self.replicas:
            r.start()
        deadline = time.monotonic() + 120
        while not all(r.synced() for r in self.replicas):
            if time.monotonic() > deadline:
                raise ChaosError(f"operators not synced after 120 s; logs in {self.logs}")
            time.sleep(0.5)
        leftovers = self.api.items("claim") or self.api.items("pool", labelSelector=LABEL)
        if leftovers:
            log("removing what an earlier run left")
            remove_objects(self.api, 120)
            deadline = time.monotonic() + 60
            while self.api.get(path("namespace", NS)) and time.monotonic() < deadline:
                if not self.api.items("claim") and not self.api.items("pod"):
                    break
                time.sleep(1)
            deadline = time.monotonic() + 60
            while any(self.api.items(k, labelSelector=LABEL) for k in ("pool", "class", "node")):
                if time.monotonic() > deadline:
                    raise ChaosError("an earlier run's pools/classes/nodes are not gone")
                time.sleep(1)
        setup_objects(self.api, self.cluster)

    def figures(self, t_wall0: float, duration: float) -> dict:
        for r in self.replicas:
            if r.alive:
                r.last = scrape(r.port) or r.last
        totals: Counter[str] = Counter()
        for r in self.replicas:
            totals.update(r.totals)
            for k, v in r.last.items():
                if k.startswith(("volplane_sync_total", "volplane_api_conflicts_total")):
                    totals[k] += v
        sync_conflicts = {re.search(r'controller="([^"]+)",kind="([^"]+)"', k).group(1, 2): v
                          for k, v in totals.items()
                          if k.startswith("volplane_sync_total") and 'outcome="conflict"' in k}
        by_ctl: Counter[str] = Counter()
        for (ctl, _kind), v in sync_conflicts.items():
            by_ctl[ctl] += int(v)
        exits: Counter[int] = Counter()
        for r in self.replicas:
            exits.update(r.exits)
        audit, writers = self.audit(t_wall0, time.time())
        return {
            "operations": dict(sorted(self.planner.counts.items())),
            "applied": dict(sorted(self.counts.items())),
            "targets": {k: list(v) for k, v in self.targets(duration).items()},
            "leader_kills": len(self.kill_log),
            "operator_starts": sum(r.starts for r in self.replicas),
            "operator_exits": {str(k): v for k, v in sorted(exits.items())},
            "two_leaders_samples": self.two_leaders,
            "api_pauses": len(self.pauses),
            "api_paused_seconds": round(sum(self.pauses), 1),
            "conflicts_operator_syncs": dict(by_ctl),
            "conflicts_audit": dict(sorted(audit.items())),
            "writer_spans": writers,
            "max_workqueue_depth": dict(sorted(self.max_depth.items())),
            "max_claims_not_bound": self.max_pending,
            "actor_errors": self.errors,
            "logs": str(self.logs),
        }

    def failures(self, s: dict, duration: float) -> list[str]:
        out = [f"actor failed: {e}" for e in self.errors]
        for what, (done, want) in self.targets(duration).items():
            if done < want:
                out.append(f"{what}: {done} < {want}")
        if s["converge_seconds"] is None:
            out.append(f"no convergence within {self.args.converge_timeout:.0f} s: "
                       f"{len(s['end_state_issues'])} issue(s)")
        elif s["check"]["exit"] != 0:
            out.append(f"volplane check exit {s['check']['exit']}: "
                       f"{len(s['check']['violations'])} violation(s)")
        return out

    def repro(self) -> str:
        cluster = os.environ.get("VOLPLANE_CLUSTER", "")
        prefix = f"VOLPLANE_CLUSTER={cluster} " if cluster else ""
        return f"{prefix}make chaos CHAOS_SEED={self.seed} CHAOS_MINUTES={self.args.minutes:g}"

    def print_repro(self) -> None:
        log(f"seed {self.seed}; reproduce with: {self.repro()}")

    def report(self, s: dict) -> None:
        (self.work / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
        (self.logs / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
        print(render(s, self.repro()))
        if s["result"] != "PASS":
            for line in s["end_state_issues"][:30]:
                log(f"end state: {line}")
            for v in s["check"]["violations"][:30]:
                log(f"check: [{v.get('invariant')}] {v.get('message')}")
            self.print_repro()
            log(f"operator logs: {self.logs}")
        doc = self.args.doc or (REPO / "docs" / "reliability.md"
                                if self.args.minutes >= 10 else None)
        if doc:
            write_doc(Path(doc), render(s, self.repro(), markdown=True))
            log(f"figures written to {doc}")


BEGIN, END = "<!-- chaos:begin (hack/chaos/chaos.py writes this section) -->", "<!-- chaos:end -->"


def render(s: dict, repro: str, markdown: bool = False) -> str:
    ops, applied = s.get("operations", {}), s.get("applied", {})
    pod_ops = sum(ops.get(k, 0) for k in ("create-pod", "delete-pod", "move-pod"))
    rows = [
        ("result", s["result"] + (f" ({'; '.join(s['failures'])})" if s["failures"] else "")),
        ("seed / minutes", f"{s['seed']} / {s['minutes']:g} (churn ran {s['churn_seconds']} s)"),
        ("reproduce", f"`{repro}`" if markdown else repro),
        ("claims created / deleted",
         f"{ops.get('create-claim', 0)} / {ops.get('delete-claim', 0)} (by kind: " + ", ".join(
             f"{k.split(':')[1]} {v}" for k, v in ops.items() if k.startswith("create-claim:"))
         + ")"),
        ("pod operations", f"{pod_ops}: {ops.get('create-pod', 0)} created, "
                           f"{ops.get('delete-pod', 0)} deleted, {ops.get('move-pod', 0)} moved "
                           f"({applied.get('moved-from-a-node', 0)} off a node they ran on), "
                           f"{ops.get('replace-pod', 0)} made again after the cluster "
                           "removed them"),
        ("nodes", f"{ops.get('add-node', 0)} added, {ops.get('taint-node', 0)} tainted "
                  f"out-of-service, {ops.get('delete-node', 0)} deleted"),
        ("pool resizes", f"{ops.get('resize-pool', 0)} ({applied.get('resize-pool:200', 0)} "
                         f"applied, {applied.get('resize-pool:422', 0)} refused below "
                         "allocated)"),
        ("static PVs swept (Released)", str(applied.get("static-pv-swept", 0))),
        ("third-writer patches", ", ".join(f"HTTP {k.split(':')[1]}: {v}" for k, v in
                                           sorted(applied.items()) if k.startswith("writer:"))),
        ("leader SIGKILLs", str(s.get("leader_kills"))),
        ("operator starts / exits", f"{s.get('operator_starts')} / "
                                    + ", ".join(f"code {k}: {v}" for k, v in
                                                s.get("operator_exits", {}).items())),
        ("two leaders seen (0.5 s samples)", str(s.get("two_leaders_samples"))),
        ("replicas that wrote / write spans overlapping (audit log)",
         f"{s.get('writer_spans', {}).get('writers')} / "
         f"{len(s.get('writer_spans', {}).get('overlaps', []))}"
         + "".join(f"; {o}" for o in s.get("writer_spans", {}).get("overlaps", [])[:5])),
        ("API server pauses", f"{s.get('api_pauses')} ({s.get('api_paused_seconds')} s stopped)"),
        ("409s on the operator's writes (audit log)", _kv(s.get("conflicts_audit", {}))),
        ("409s that ended an operator sync (metrics)",
         _kv(s.get("conflicts_operator_syncs", {}))),
        ("max work-queue depth (metrics, per queue)",
         ", ".join(f"{k} {v:g}" for k, v in s.get("max_workqueue_depth", {}).items()) or "0"),
        ("max claims not Bound (2 s samples)", str(s.get("max_claims_not_bound"))),
        ("time to converge", "-" if s["converge_seconds"] is None
         else f"{s['converge_seconds']} s"),
        ("volplane check", f"exit {s['check']['exit']}, "
                           f"{len(s['check']['violations'])} violation(s)"),
    ]
    if not markdown:
        return "\n".join(f"{k:45} {v}" for k, v in rows)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    lines = [BEGIN, f"### Last full run ({when}, commit {commit})", "",
             "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n" + END


def _kv(d: dict) -> str:
    total = sum(d.values())
    return f"{total:g} (" + ", ".join(f"{k} {v:g}" for k, v in d.items()) + ")" if d else "0"


def write_doc(doc: Path, section: str) -> None:
    text = doc.read_text() if doc.exists() else "# Reliability\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=int(os.environ.get("CHAOS_SEED") or 1))
    p.add_argument("--minutes", type=float,
                   default=float(os.environ.get("CHAOS_MINUTES") or 10))
    p.add_argument("--interval", type=float, default=0.15,
                   help="seconds between churn steps (default 0.15)")
    p.add_argument("--converge-timeout", type=float, default=300.0)
    p.add_argument("--keep", action="store_true", help="leave the run's objects in place")
    p.add_argument("--doc", default=None,
                   help="write the figures here (default: docs/reliability.md on runs of "
                        ">= 10 minutes)")
    args = p.parse_args(argv)
    run = Run(args)

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    try:
        return run.run()
    except KeyboardInterrupt:
        return 130
    except ChaosError as e:
        log(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
