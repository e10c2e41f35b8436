"""Install with kubectl apply, least privilege, a real Prometheus, leader election (issue 6)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pykube
import pytest
import yaml

from .conftest import REPO_ROOT, kubectl, serviceaccount_kubeconfig
from .helpers import create, holds_for, scrape_metrics, wait_for

SA = "system:serviceaccount:volplane-system:volplane"


def rendered_manifests() -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(REPO_ROOT / "manifests")],
                         capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_apply_is_complete_and_idempotent_and_delete_removes_it(kubeconfig, api, cluster,
                                                               operator_kubeconfig):
    docs = rendered_manifests()
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole",
            "ClusterRoleBinding", "Role", "RoleBinding", "Deployment", "Service",
            "CSIDriver"} <= kinds
    first = kubectl(kubeconfig, "apply", "--server-side", "--force-conflicts", "-k",
                    str(REPO_ROOT / "manifests"))
    assert first.count("serverside-applied") == len(docs), first
    # Every object exists on the server.
    for d in docs:
        ns = d["metadata"].get("namespace")
        args = ["get", f"{d['kind'].lower()}.{d['apiVersion'].split('/')[0]}"
                if "/" in d["apiVersion"] else d["kind"].lower(), d["metadata"]["name"]]
        if ns:
            args += ["-n", ns]
        kubectl(kubeconfig, *args, "-o", "name")
    # Re-apply changes nothing: same resourceVersions before and after.
    def versions():
        return {(d["kind"], d["metadata"]["name"]): json.loads(kubectl(
            kubeconfig, "get", d["kind"].lower() if "/" not in d["apiVersion"] else
            f"{d['kind'].lower()}.{d['apiVersion'].split('/')[0]}", d["metadata"]["name"],
            *(["-n", d["metadata"]["namespace"]] if d["metadata"].get("namespace") else []),
            "-o", "json"))["metadata"]["resourceVersion"] for d in docs
            if d["kind"] not in ("Namespace", "Deployment")}  # status churn is not ours
    before = versions()
    kubectl(kubeconfig, "apply", "--server-side", "--force-conflicts", "-k",
            str(REPO_ROOT / "manifests"))
    assert versions() == before
    # Delete removes everything but what other tests need; re-install those after.
    deletable = [d for d in docs if d["kind"] not in ("CustomResourceDefinition", "Namespace")]
    out = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "delete", "--wait=false",
                          "-f", "-"], input=yaml.safe_dump_all(deletable), capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("deleted") == len(deletable)
    wait_for(lambda: subprocess.run(
        ["kubectl", "--kubeconfig", kubeconfig, "get", "clusterrole", "volplane"],
        capture_output=True).returncode != 0, timeout=30, message="ClusterRole deleted")
    # The whole-kustomization delete works too (CRDs included), then put it all back.
    kubectl(kubeconfig, "apply", "--server-side", "--force-conflicts", "-k",
            str(REPO_ROOT / "manifests"))
    kubectl(kubeconfig, "delete", "--wait=false", "--ignore-not-found", "-k",
            str(REPO_ROOT / "manifests"))
    wait_for(lambda: subprocess.run(
        ["kubectl", "--kubeconfig", kubeconfig, "get", "crd", "storagepools.volplane.io"],
        capture_output=True).returncode != 0, timeout=60, message="CRD deleted")
    wait_for(lambda: subprocess.run(
        ["kubectl", "--kubeconfig", kubeconfig, "get", "ns", "volplane-system"],
        capture_output=True).returncode != 0, timeout=90, message="namespace deleted")
    from .conftest import _scale_in_cluster_operator, install_prerequisites, load_kind_module
    install_prerequisites(kubeconfig)
    if cluster.flavor == "kind":
        # apply -k brought back the 2-replica Deployment; the session keeps it at zero
        # (the tests run their own operators) and restores it at the end. Applied as
        # hack/kind/kind.py installs it: with the image the cluster's nodes have
        # (VOLPLANE_IMAGE), not the kustomization's volplane:dev, which a cluster built
        # under another tag cannot pull (test_kind's Deployment then never got Ready),
        # and with manifests/flexvolume/ (the plugin dir's hostPath, its namespace label)
        load_kind_module().install_operator()
        _scale_in_cluster_operator(Path(kubeconfig), 0)
    if Path(operator_kubeconfig).resolve() != Path(kubeconfig).resolve():
        # The ServiceAccount was re-created: its old token is void. Re-mint it in place so
        # the rest of the session's operators keep running under that identity.
        serviceaccount_kubeconfig(kubeconfig, Path(operator_kubeconfig))


def test_rbac_has_no_wildcards_and_is_least_privilege(kubeconfig, operator_kubeconfig):
    for d in rendered_manifests():
        for rule in d.get("rules", []):
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(key, []), (d["metadata"]["name"], rule)
    if Path(operator_kubeconfig).resolve() == Path(kubeconfig).resolve():
        pytest.skip("operator runs as admin (VOLPLANE_E2E_OPERATOR_IDENTITY=admin)")

    def can(*args: str) -> bool:
        out = subprocess.run(["kubectl", "--kubeconfig", operator_kubeconfig, "auth", "can-i",
                              *args], capture_output=True, text=True)
        return out.stdout.strip() == "yes"

    # What it needs:
    assert can("patch", "persistentvolumes", "--subresource=status")
    assert can("create", "volumeattachments.storage.k8s.io")
    assert can("patch", "nodes", "--subresource=status")
    assert not can("patch", "pods", "--subresource=status", "-A")
    assert can("update", "leases.coordination.k8s.io", "-n", "volplane-system")
    # What it must not have:
    assert not can("get", "secrets", "-A")
    assert not can("list", "secrets", "-n", "volplane-system")
    assert not can("delete", "nodes")
    assert not can("update", "nodes")
    assert not can("create", "clusterrolebindings")
    assert not can("escalate", "clusterroles")
    assert not can("bind", "clusterroles")
    assert not can("create", "pods", "-n", "default")
    assert not can("update", "leases.coordination.k8s.io", "-n", "kube-system")
    assert not can("impersonate", "serviceaccounts")


def _claim(ns, name, cls, size="1Gi", **extra):
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"storageClassName": cls, "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": size}}, **extra}}


def _pv(name, cls, size="1Gi"):
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
            "spec": {"storageClassName": cls, "accessModes": ["ReadWriteOnce"],
                     "capacity": {"storage": size}, "persistentVolumeReclaimPolicy": "Retain",
                     "hostPath": {"path": f"/tmp/{name}"}}}


def _bound(api, ns, name):
    return pykube.PersistentVolumeClaim.objects(api, namespace=ns).get_by_name(
        name).obj.get("status", {}).get("phase") == "Bound"


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="no prometheus binary (make setup installs Debian's package)")
def test_prometheus_scrapes_the_operator(api, namespace, operator, tmp_path):
    operator.start("--controllers", "pv-binder")
    operator.wait_ready()
    cls = f"prom-{namespace}"
    for i in range(3):
        create(api, _pv(f"{namespace}-pv{i}", cls))
    for i in range(5):  # 3 bind, 2 stay Pending
        create(api, _claim(namespace, f"c{i}", cls))
    wait_for(lambda: sum(_bound(api, namespace, f"c{i}") for i in range(5)) == 3, timeout=60,
             message="3 claims bound")
    port = _free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "volplane", "static_configs": [
            {"targets": [f"127.0.0.1:{operator.metrics_port}"]}]}]}))
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=open(tmp_path / "prometheus.log", "wb"), stderr=subprocess.STDOUT)
    try:
        def query(q):
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.load(r)
            assert body["status"] == "success"
            return body["data"]["result"]

        def value(q):
            res = query(q)
            return float(res[0]["value"][1]) if res else None

        def up():
            try:
                return value('up{job="volplane"}') == 1
            except (OSError, ValueError):  # Prometheus itself still starting
                return False

        wait_for(up, timeout=60, message="target up")
        assert wait_for(lambda: value(
            f'sum(pv_collector_bound_pvc_count{{namespace="{namespace}"}})') == 3,
            timeout=30, message="bound pvc count 3")
        assert value(f'sum(pv_collector_unbound_pvc_count{{namespace="{namespace}"}})') == 2
        assert value(f'sum(pv_collector_bound_pv_count{{storage_class="{cls}"}})') == 3
        assert value('sum(volplane_api_writes_total{controller="pv-binder"})') >= 12
        assert value('volplane_leader') == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leader(kubeconfig) -> str | None:
    try:
        out = kubectl(kubeconfig, "get", "lease", "volplane", "-n", "volplane-system",
                      "-o", "json")
    except RuntimeError:  # no Lease yet
        return None
    return json.loads(out)["spec"].get("holderIdentity")


def _readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:  # not listening yet
        return 0, str(e)


def _audit(cluster) -> list[dict]:
    from .conftest import LOG_DIR
    path = LOG_DIR / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_two_replicas_one_leader_and_failover(api, kubeconfig, cluster, namespace, operator):
    """Only the leader acts; SIGKILL it mid-run and the standby leads within 20 s and
    finishes; the API server's audit log shows no write made twice."""
    lease = ["--leader-elect-lease-duration", "8", "--leader-elect-renew-deadline", "5",
             "--leader-elect-retry-period", "1", "--controllers", "pv-binder"]
    ida, idb = f"a-{namespace}", f"b-{namespace}"
    # a is throttled (500 writes at 25/s take ~20 s) so that the kill lands mid-run.
    a = operator.start(*lease, "--leader-elect-identity", ida,
                       "--kube-api-qps", "25", "--kube-api-burst", "5")
    wait_for(lambda: _leader(kubeconfig) == ida, timeout=60, message="a leads")
    a.wait_ready()
    b = operator.another("b").start(*lease, "--leader-elect-identity", idb)
    wait_for(lambda: _readyz(b.metrics_port)[0] == 200, timeout=60, message="b ready (standby)")
    assert "standby" in _readyz(b.metrics_port)[1]
    cls = f"ha-{namespace}"
    n = 100
    for i in range(n):
        create(api, _pv(f"{namespace}-pv{i:03d}", cls))
    for i in range(n):
        create(api, _claim(namespace, f"c{i:03d}", cls))

    def bound_count():
        return sum(1 for c in pykube.PersistentVolumeClaim.objects(api, namespace=namespace)
                   if c.obj.get("status", {}).get("phase") == "Bound")

    wait_for(lambda: bound_count() >= 20, timeout=60, message="a has bound some claims")
    killed_at = time.time()
    assert bound_count() < n, "a finished before it could be killed: nothing to fail over"
    a.kill(signal.SIGKILL)
    wait_for(lambda: _leader(kubeconfig) == idb, timeout=20, message="b leads within 20 s")
    assert time.time() - killed_at < 20
    wait_for(lambda: bound_count() == n, timeout=120, message="b finishes the work")
    # Symmetric, no PV with two claims.
    pvs = [pv.obj for pv in pykube.PersistentVolume.objects(api)
           if pv.name.startswith(f"{namespace}-pv")]
    refs = [pv["spec"]["claimRef"]["name"] for pv in pvs if pv["spec"].get("claimRef")]
    assert len(refs) == len(set(refs)) == n
    if not cluster.local:
        return
    # The audit log: who wrote what, when.
    writes = [e for e in _audit(cluster)
              if e.get("userAgent", "").startswith("volplane/")
              and 200 <= e.get("responseStatus", {}).get("code", 0) < 300
              and (e["objectRef"].get("namespace") == namespace
                   or e["objectRef"].get("name", "").startswith(f"{namespace}-pv"))]
    by_a = [e for e in writes if f"({ida})" in e["userAgent"]]
    by_b = [e for e in writes if f"({idb})" in e["userAgent"]]
    assert by_a and by_b, (len(by_a), len(by_b))
    from datetime import datetime

    def ts(e):
        return datetime.fromisoformat(e["requestReceivedTimestamp"].replace("Z", "+00:00")
                                      ).timestamp()

    assert max(ts(e) for e in by_a) <= killed_at + 1, "a wrote after it was killed"
    assert min(ts(e) for e in by_b) >= killed_at, "b wrote while a was leading"
    # Each claim got volumeName once and went Bound once; each PV got a claimRef once.
    from collections import Counter
    steps = Counter((e["objectRef"]["resource"], e["objectRef"].get("subresource", ""),
                     e["objectRef"]["name"]) for e in writes
                    if e["objectRef"]["resource"] == "persistentvolumeclaims"
                    or e["objectRef"].get("subresource", "") == "")
    dup = {k: v for k, v in steps.items() if v > 1}
    assert not dup, f"writes made more than once: {dup}"


def _metric_names_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label names, selectors, functions dropped)."""
    import re
    expr = re.sub(r"\b(by|without)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    names = re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr)
    return {n for n in names if "_" in n}


def test_alerts_and_dashboard_use_only_exported_metrics(operator, tmp_path):
    operator.start()  # every controller
    operator.wait_ready()
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics") as r:
        text = r.read().decode()
    exported = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    exported |= {f"{n}_bucket" for n in exported} | {f"{n}_total" for n in exported}
    rules = yaml.safe_load((REPO_ROOT / "manifests/monitoring/prometheusrule.yaml").read_text())
    exprs = [r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]]
    dash = json.loads((REPO_ROOT / "manifests/monitoring/volplane-dashboard.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = set().union(*(_metric_names_in(e) for e in exprs))
    assert used, exprs
    missing = sorted(used - exported)
    assert not missing, f"not exported by the operator: {missing}"
    if shutil.which("promtool"):
        f = tmp_path / "rules.yml"
        f.write_text(yaml.safe_dump({"groups": rules["spec"]["groups"]}))
        out = subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def test_a_replica_that_lost_the_lease_stops_at_once(api, kubeconfig, cluster, namespace,
                                                     operator):
    """Pause the leader past its lease, in the middle of a backlog of writes; the
    standby takes over; the paused one, when resumed, exits without writing anything
    (audit log) — not even the writes it had queued before it was paused."""
    lease = ["--leader-elect-lease-duration", "4", "--leader-elect-renew-deadline", "3",
             "--leader-elect-retry-period", "1", "--controllers", "pv-binder",
             "--resync-period", "1"]
    ida, idb = f"a-{namespace}", f"b-{namespace}"
    # a is throttled so that it has writes waiting for tokens when it is paused.
    a = operator.start(*lease, "--leader-elect-identity", ida,
                       "--kube-api-qps", "5", "--kube-api-burst", "1")
    wait_for(lambda: _leader(kubeconfig) == ida, timeout=60, message="a leads")
    a.wait_ready()
    b = operator.another("b").start(*lease, "--leader-elect-identity", idb)
    wait_for(lambda: _readyz(b.metrics_port)[0] == 200, timeout=60, message="b standby")
    backlog = f"backlog-{namespace}"
    # 60 status writes at 5 QPS: ~12 s of work, enough for "busy" to hold 4 s once seen
    # (the depth gauge is live since the chaos run; it used to be a resync-time sample,
    # which read "busy" even after the writes were done)
    for i in range(60):
        create(api, _pv(f"{namespace}-bl{i:02d}", backlog))

    def busy():
        """a has written and still has keys queued (its own metrics)."""
        m = scrape_metrics(a.metrics_port)
        writes = sum(v for k, v in m.items() if k.startswith("volplane_api_writes_total"))
        queued = sum(v for k, v in m.items() if k.startswith("volplane_workqueue_depth"))
        return writes >= 2 and queued >= 5

    wait_for(busy, timeout=60, message="a works through a backlog")
    # Its lease renewals do not queue behind that backlog (their own rate limit): a
    # keeps the lease for longer than the renew deadline while 16 workers wait for tokens.
    holds_for(lambda: a.running and _leader(kubeconfig) == ida and busy(), 4,
              message="a leads while busy")
    a.kill(signal.SIGSTOP)
    wait_for(lambda: _leader(kubeconfig) == idb, timeout=30, message="b takes the lease")
    cls = f"lost-{namespace}"
    for i in range(5):
        create(api, _claim(namespace, f"c{i}", cls))
        create(api, _pv(f"{namespace}-pv{i}", cls))
    wait_for(lambda: all(_bound(api, namespace, f"c{i}") for i in range(5)), timeout=60,
             message="b binds")
    resumed_at = time.time()
    a.kill(signal.SIGCONT)
    wait_for(lambda: not a.running, timeout=20, message="a exits after resuming")
    assert a.returncode not in (0, None)
    assert any(ln.get("event") == "leader lease lost, stopping at once" for ln in a.log_lines())
    if cluster.local:
        late = [e for e in _audit(cluster) if f"({ida})" in e.get("userAgent", "")
                and e["requestReceivedTimestamp"] > time.strftime(
                    "%Y-%m-%dT%H:%M:%S", time.gmtime(resumed_at))]
        assert late == [], late
