"""Shared plumbing for the benchmarks: the cluster, identities, an async API client,
apiserver metrics, controller processes and their memory.

How the controller's API requests are counted
---------------------------------------------
`apiserver_request_total` has no user label, so on its own it cannot tell the
controller's requests from the load generator's (or from kwok's heartbeats).
Instead every controller under test talks to the API server under an identity
of its own, and API Priority and Fairness does the bookkeeping: the harness
installs FlowSchemas (`vpb-*`, see FLOW_SCHEMAS) that match only those
identities, one per verb, all pointing at the built-in `exempt` priority level
(no queueing, no limits: the same treatment for both sides). The apiserver's
`apiserver_flowcontrol_dispatched_requests_total{flow_schema=...}` is then an
exact per-verb count of the controller's requests. The identities:

- upstream kube-controller-manager runs as upstream deploys it, with
  `--use-service-account-credentials`: the PV controller's requests come from
  `system:serviceaccount:kube-system:persistent-volume-binder`, the A/D
  controller's from `...:attachdetach-controller`. Nothing else uses those
  service accounts (the cluster's own kcm has both controllers off). Its shared
  informers LIST/WATCH under the kcm's root identity: a client certificate with
  the kcm's user name (system:kube-controller-manager, so upstream's RBAC applies
  as is) and our group, so they are counted too;
- volplane, and the write-floor client, run with a client certificate in group
  `volplane-bench-ctl` (bound to cluster-admin);
- helpers that are not under test (volplane's pool attacher in W3) run in group
  `volplane-bench-aux`, counted separately and not charged to either side.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[2]
VPY = REPO / ".venv" / "bin" / "python"
# BENCH_VOLPLANE: another build of volplane to measure as the "volplane" side (e.g. a
# snapshot installed apart, so the checkout can change while a long run goes on).
VOLPLANE = Path(os.environ.get("BENCH_VOLPLANE") or REPO / ".venv" / "bin" / "volplane")
# The "volplane-0.2" side: the last 0.2 commit (reflector watch layer), built by the
# harness into a virtualenv of its own (ensure_volplane_02).
V02_COMMIT = "eab5b8c"
V02_ROOT = REPO / ".local" / "bench" / f"volplane-0.2-{V02_COMMIT}"

CTL_GROUP = "volplane-bench-ctl"
AUX_GROUP = "volplane-bench-aux"
KCM_SERVICE_ACCOUNTS = ("persistent-volume-binder", "attachdetach-controller")
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
LABEL = "bench.volplane.io/run"
# the controller's own counters kept in the results (volplane only; kcm has none)
OWN_METRICS = ("volplane_api_writes", "volplane_conflicts", "volplane_sync_total",
               "volplane_events")
WORKLOAD = "bench.volplane.io/workload"  # w1, w5, ...: what a workload's cleanup may delete
ANN_PAIR = "bench.volplane.io/pv"
KEEP_FAILED = os.environ.get("BENCH_KEEP") == "1"  # leave a failed run's objects in place


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_cluster_module():
    name = "volplane_hack_cluster"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "hack" / "cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- environment


class Env:
    """The bench cluster (its own instance: VOLPLANE_CLUSTER=bench) and our files."""

    def __init__(self) -> None:
        os.environ.setdefault("VOLPLANE_CLUSTER", "bench")
        self.cluster = load_cluster_module()
        log(f"control plane: instance {os.environ['VOLPLANE_CLUSTER']!r}")
        self.kubeconfig = Path(self.cluster.up(REPO))
        self.layout = self.cluster.Layout(REPO)
        state = self.cluster.load_state(self.layout)
        self.state = state
        self.bin_dir = Path(state["bin_dir"])
        self.k8s_version = state.get("kubernetes_version", "?")
        self.server = f"https://127.0.0.1:{state['ports']['kube-apiserver']}"
        self.pki = self.layout.pki
        self.work = self.layout.local / "bench"
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs = self.work / "logs"
        self.logs.mkdir(exist_ok=True)
        # the kcm user name (so upstream's RBAC applies unchanged), plus our group
        self.kcm_kubeconfig = self._identity(
            "bench-kcm", f"/O={CTL_GROUP}/CN=system:kube-controller-manager")
        self.ctl_kubeconfig = self._identity("bench-ctl", f"/O={CTL_GROUP}/CN=volplane-bench")
        self.aux_kubeconfig = self._identity("bench-aux", f"/O={AUX_GROUP}/CN=volplane-bench-aux")

    def _identity(self, name: str, subject: str) -> Path:
        crt, key = self.work / f"{name}.crt", self.work / f"{name}.key"
        ca = self.pki / "ca.crt"
        if not crt.exists() or crt.stat().st_mtime < ca.stat().st_mtime:
            ext = self.work / f"{name}.ext"
            ext.write_text(self.cluster.CLIENT_EXT)
            run = lambda *a: subprocess.run(["openssl", *a], cwd=self.work, check=True,  # noqa: E731
                                            capture_output=True)
            run("genrsa", "-out", key.name, "2048")
            run("req", "-new", "-key", key.name, "-subj", subject, "-out", f"{name}.csr")
            run("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca), "-CAkey",
                str(self.pki / "ca.key"), "-CAcreateserial", "-days", "3650", "-sha256",
                "-extfile", ext.name, "-out", crt.name)
            (self.work / f"{name}.csr").unlink()
            ext.unlink()
        import base64
        b64 = lambda p: base64.b64encode(Path(p).read_bytes()).decode()  # noqa: E731
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "bench", "cluster": {
                "server": self.server, "certificate-authority-data": b64(ca)}}],
            "users": [{"name": name, "user": {"client-certificate-data": b64(crt),
                                              "client-key-data": b64(key)}}],
            "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": name}}],
            "current-context": "bench",
        }
        path = self.work / f"{name}.kubeconfig"
        path.write_text(json.dumps(config, indent=1))
        os.chmod(path, 0o600)
        return path

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by the API server and etcd (for per-run deltas)."""
        return {name: proc_cpu_seconds(self.state["pids"][name])
                for name in ("kube-apiserver", "etcd")}

    def ssl_context(self, cert: str = "admin") -> ssl.SSLContext:
        if cert == "admin":
            return client_ssl(self.pki / "ca.crt", self.pki / "admin.crt", self.pki / "admin.key")
        return client_ssl(self.pki / "ca.crt", self.work / f"{cert}.crt",
                          self.work / f"{cert}.key")

    def api(self, cert: str = "admin", limit: int = 32) -> Api:
        return Api(self.server, self.ssl_context(cert), limit)


def client_ssl(ca: Path, crt: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(crt), str(key))
    return ctx


# ----------------------------------------------------------------------------- API client


class ApiError(Exception):
    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        super().__init__(f"HTTP {status}: {str(body)[:300]}")


class Api:
    """One aiohttp session (keep-alive, `limit` connections) for the load generator."""

    def __init__(self, server: str, ssl_context: ssl.SSLContext, limit: int = 32):
        self.server = server
        self.ssl_context = ssl_context
        self.limit = limit
        self.session: aiohttp.ClientSession | None = None
        self.counts: Counter[str] = Counter()  # verb -> requests made

    async def __aenter__(self) -> Api:
        conn = aiohttp.TCPConnector(ssl=self.ssl_context, limit=self.limit)
        self.session = aiohttp.ClientSession(
            self.server, connector=conn, read_bufsize=2 ** 20,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def request(self, method: str, path: str, body: Any = None, *,
                      params: dict | None = None, content_type: str = "application/json",
                      ok: tuple[int, ...] = (200, 201, 202), retries: int = 5,
                      verb: str | None = None) -> Any:
        verb = verb or {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete",
                        "GET": "get"}[method]
        data = json.dumps(body) if body is not None else None
        for attempt in range(retries + 1):
            self.counts[verb] += 1
            try:
                async with self.session.request(
                        method, path, data=data, params=params,
                        headers={"Content-Type": content_type, "Accept": "application/json"},
                        timeout=aiohttp.ClientTimeout(total=120)) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError) as e:
                if attempt == retries:
                    raise ApiError(0, str(e)) from None
                await asyncio.sleep(0.1 * 2 ** attempt)
                continue
            parsed = json.loads(raw) if raw and raw[:1] in b"{[" else raw
            if status in ok:
                return parsed
            if (status == 429 or status >= 500) and attempt < retries:
                await asyncio.sleep(0.1 * 2 ** attempt)
                continue
            raise ApiError(status, parsed)
        raise AssertionError("unreachable")

    async def get(self, path: str, **kw) -> Any:
        return await self.request("GET", path, **kw)

    async def create(self, path: str, body: dict, **kw) -> Any:
        return await self.request("POST", path, body, **kw)

    async def merge_patch(self, path: str, body: dict) -> Any:
        return await self.request("PATCH", path, body, content_type="application/merge-patch+json")

    async def apply_or_create(self, path: str, body: dict) -> None:
        """Create, or replace what is there (cluster-wide setup objects)."""
        try:
            await self.create(path, body)
        except ApiError as e:
            if e.status != 409:
                raise
            cur = await self.get(f"{path}/{body['metadata']['name']}")
            body = {**body, "metadata": {**body["metadata"],
                                         "resourceVersion": cur["metadata"]["resourceVersion"]}}
            await self.request("PUT", f"{path}/{body['metadata']['name']}", body)

    async def list(self, path: str, params: dict | None = None) -> dict:
        return await self.request("GET", path, params=params, verb="list")

    async def metrics(self) -> str:
        async with self.session.get("/metrics") as resp:
            return await resp.text()


async def watch(api: Api, path: str, rv: str, on_event, params: dict | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Follows a watch from `rv`, reconnecting from the last seen resourceVersion,
    until `stop` is set. on_event(type, object, monotonic_time)."""
    stop = stop or asyncio.Event()
    while not stop.is_set():
        q = {"watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true",
             "timeoutSeconds": "900", **(params or {})}
        api.counts["watch"] += 1
        try:
            async with api.session.get(path, params=q, timeout=aiohttp.ClientTimeout(
                    total=None, sock_read=None)) as resp:
                if resp.status == 410:
                    raise ApiError(410, "watch expired")
                if resp.status != 200:
                    raise ApiError(resp.status, await resp.text())
                async for line in resp.content:
                    t = time.monotonic()
                    if not line.strip():
                        continue
                    ev = json.loads(line)
                    obj = ev.get("object") or {}
                    if ev.get("type") == "ERROR":
                        if obj.get("code") == 410:
                            raise ApiError(410, "watch expired")
                        break
                    rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    if ev["type"] != "BOOKMARK":
                        on_event(ev["type"], obj, t)
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                aiohttp.ClientConnectionError):
            await asyncio.sleep(0.05)


# ----------------------------------------------------------------------------- metrics

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}\s+([0-9.eE+-]+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str, names: tuple[str, ...]) -> list[tuple[str, dict, float]]:
    out = []
    for line in text.splitlines():
        if not line or line[0] == "#" or not line.startswith(names):
            continue
        m = _SAMPLE.match(line)
        if m:
            out.append((m.group(1), dict(_LABEL.findall(m.group(2))), float(m.group(3))))
    return out


def flow_counts(text: str) -> dict[str, float]:
    """flow schema -> dispatched requests, for our vpb-* schemas."""
    out: dict[str, float] = {}
    names = ("apiserver_flowcontrol_dispatched_requests_total",)
    for _, labels, value in parse_metrics(text, names):
        fs = labels.get("flow_schema", "")
        if fs.startswith("vpb-"):
            out[fs] = out.get(fs, 0.0) + value
    return out


def diff_requests(before: str, after: str) -> dict[str, dict[str, int]]:
    """{'controller': {verb: n, 'events': n, 'other': n, 'total': n}, 'aux': {...}}"""
    b, a = flow_counts(before), flow_counts(after)
    res: dict[str, dict[str, int]] = {"controller": {}, "aux": {}}
    for fs in sorted(set(a) | set(b)):
        n = int(round(a.get(fs, 0.0) - b.get(fs, 0.0)))
        _, who, what = fs.split("-", 2)
        side = "controller" if who == "ctl" else "aux"
        if n:
            res[side][what] = res[side].get(what, 0) + n
    for name, side in res.items():
        side["total"] = sum(side.values())
        if name == "controller":  # (aux is counted in one schema: no verbs)
            side["writes"] = sum(v for k, v in side.items()
                                 if k in ("create", "update", "patch", "delete",
                                          "deletecollection"))
    return res


def flow_schemas() -> list[dict]:
    ctl_subjects = [{"kind": "Group", "group": {"name": CTL_GROUP}}] + [
        {"kind": "ServiceAccount", "serviceAccount": {"namespace": "kube-system", "name": sa}}
        for sa in KCM_SERVICE_ACCOUNTS]
    aux_subjects = [{"kind": "Group", "group": {"name": AUX_GROUP}}]

    def fs(name: str, precedence: int, subjects: list, rules: list) -> dict:
        return {
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "volplane-bench"}},
            "spec": {"matchingPrecedence": precedence,
                     "priorityLevelConfiguration": {"name": "exempt"},
                     "distinguisherMethod": {"type": "ByUser"},
                     "rules": [{"subjects": subjects, **r} for r in rules]},
        }

    def res_rule(verbs, groups=("*",), resources=("*",)) -> dict:
        return {"resourceRules": [{"verbs": list(verbs), "apiGroups": list(groups),
                                   "resources": list(resources), "clusterScope": True,
                                   "namespaces": ["*"]}]}

    out = [fs("vpb-ctl-events", 20, ctl_subjects,
              [res_rule(["*"], ("", "events.k8s.io"), ("events",))])]
    out += [fs(f"vpb-ctl-{v}", 21, ctl_subjects, [res_rule([v])]) for v in VERBS]
    out.append(fs("vpb-ctl-nonresource", 22, ctl_subjects,
                  [{"nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}]}]))
    out.append(fs("vpb-aux-all", 23, aux_subjects,
                  [res_rule(["*"]), {"nonResourceRules": [{"verbs": ["*"],
                                                          "nonResourceURLs": ["*"]}]}]))
    return out


async def install_accounting(env: Env, api: Api) -> None:
    """RBAC for the bench identities and the FlowSchemas that count their requests."""
    for group in (CTL_GROUP, AUX_GROUP):
        await api.apply_or_create("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": group},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "cluster-admin"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                          "name": group}],
        })
    for body in flow_schemas():
        await api.apply_or_create("/apis/flowcontrol.apiserver.k8s.io/v1/flowschemas", body)
    # The APF config controller picks FlowSchemas up asynchronously: wait until ours count.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if "vpb-ctl-nonresource" in flow_counts(await api.metrics()):
            return
        # a request from the ctl identity, so that the schema's series exists
        async with env.api("bench-ctl", limit=1) as probe:
            with contextlib.suppress(ApiError):
                await probe.get("/version")
        await asyncio.sleep(0.5)
    raise RuntimeError("the vpb-* FlowSchemas never showed up in apiserver metrics")


# ----------------------------------------------------------------------------- processes


def proc_mem(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process, in KiB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def proc_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class Controller:
    """A controller process under test: started in its own session, watched for
    readiness in its log, its memory sampled while it runs, stopped by pid."""

    def __init__(self, name: str, argv: list[str], ready, log_path: Path,
                 env: dict | None = None):
        self.name = name
        self.argv = argv
        self.ready = ready  # (log text) -> bool
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.peak_rss = 0
        self._sampler: asyncio.Task | None = None
        self.started = 0.0
        self.ready_after = 0.0
        self.metrics_url: str | None = None  # the controller's own /metrics, if plain HTTP
        self.profile: Path | None = None  # py-spy output, when run under py-spy

    async def start(self, timeout: float = 180.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **(self.env or {})})
        self.started = time.monotonic()
        self._sampler = asyncio.create_task(self._sample())
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); log "
                                   f"{self.log_path}:\n{self.tail()}")
            if self.ready(self.log_path.read_text(errors="replace")):
                break
            if time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; log "
                                   f"{self.log_path}:\n{self.tail()}")
            await asyncio.sleep(0.1)
        self.ready_after = time.monotonic() - self.started

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def _sample(self) -> None:
        while self.proc and self.proc.poll() is None:
            self.peak_rss = max(self.peak_rss, proc_mem(self.proc.pid).get("VmRSS", 0))
            await asyncio.sleep(0.25)

    def memory(self) -> dict[str, float]:
        m = proc_mem(self.proc.pid) if self.proc else {}
        return {"rss_mib": round(m.get("VmRSS", 0) / 1024, 1),
                "hwm_mib": round(m.get("VmHWM", 0) / 1024, 1),
                "peak_sampled_rss_mib": round(self.peak_rss / 1024, 1),
                "cpu_seconds": round(proc_cpu_seconds(self.proc.pid), 2) if self.proc else 0.0}

    def own_metrics(self, prefixes: tuple[str, ...] = ("volplane_",)) -> dict[str, float]:
        """Counters from the controller's own /metrics (volplane: writes, conflicts, syncs)."""
        if not self.metrics_url or not self.alive():
            return {}
        import urllib.request
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for name, labels, value in parse_metrics(text, prefixes):
            if name.endswith(("_bucket", "_created")) or not value:
                continue
            key = name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
            out[key] = value
        return out

    def alive(self) -> bool:
        return bool(self.proc) and self.proc.poll() is None

    async def stop(self) -> None:
        if self._sampler:
            self._sampler.cancel()
        if not self.proc or self.proc.poll() is not None:
            return
        sigs = ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))
        if self.profile:  # py-spy writes its profile on SIGINT
            sigs = ((signal.SIGINT, 30.0), *sigs)
        for sig, wait in sigs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            deadline = time.monotonic() + wait
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.proc.poll() is not None:
                return


def kcm(env: Env, controllers: list[str], *, qps: float | None, burst: int | None,
        hostpath: bool = False, tag: str = "") -> Controller:
    """A second kube-controller-manager from the cluster's binaries, only `controllers`."""
    kc = str(env.kcm_kubeconfig)
    argv = [
        str(env.bin_dir / "kube-controller-manager"),
        f"--controllers={','.join(controllers)}",
        f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}",
        "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
        f"--cert-dir={env.work / 'kcm-cert-dir'}",
        "--use-service-account-credentials=true",
        "--leader-elect=false", "--v=1",
    ]
    if qps is not None:
        argv += [f"--kube-api-qps={qps:g}", f"--kube-api-burst={burst}"]
    if hostpath:
        argv.append("--enable-hostpath-provisioner=true")
    # Ready = the controllers under test have synced their informers. "Caches are
    # synced" carries no controller name at -v=1 and the secure-serving machinery logs
    # it three times too, so: each controller's start line is there, and every
    # "Waiting for caches to sync" has its "Caches are synced".
    markers = {"persistentvolume-binder-controller": '"Starting persistent volume controller"',
               "persistentvolume-attach-detach-controller": '"Starting attach detach controller"'}
    want = [markers[c] for c in controllers if c in markers]

    def ready(text: str) -> bool:
        return all(m in text for m in want) and \
            text.count('"Caches are synced"') >= text.count('"Waiting for caches to sync"')

    return Controller(f"kcm{tag}", argv, ready, env.logs / f"kcm{tag}.log")


def ensure_volplane_02() -> Path:
    """The `volplane` executable of volplane 0.2 (commit V02_COMMIT): its source is taken
    from this repository (git archive) and pip-installed, with the dependency pins of its
    own pyproject.toml, into V02_ROOT/venv. Built once; later runs reuse it."""
    exe = V02_ROOT / "venv" / "bin" / "volplane"
    if exe.exists():
        return exe
    src = V02_ROOT / "src"
    src.mkdir(parents=True, exist_ok=True)
    log(f"building volplane 0.2 ({V02_COMMIT}) into {V02_ROOT}")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", V02_COMMIT],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    subprocess.run([str(VPY), "-m", "venv", str(V02_ROOT / "venv")], check=True)
    subprocess.run([str(V02_ROOT / "venv" / "bin" / "pip"), "install", "-q", str(src)],
                   check=True)
    version = subprocess.run([str(exe), "version"], check=True, capture_output=True,
                             text=True).stdout.strip()
    if version != "volplane 0.2.0":
        raise RuntimeError(f"{exe}: expected volplane 0.2.0, got {version!r}")
    return exe


def volplane(env: Env, controllers: str, *, kubeconfig: Path | None = None,
             tag: str = "", extra: list[str] | None = None,
             executable: Path | None = None, env_extra: dict | None = None) -> Controller:
    """`volplane run` (this checkout's, or `executable`: e.g. ensure_volplane_02())."""
    port = free_port()
    argv = [str(executable or VOLPLANE), "run",
            "--kubeconfig", str(kubeconfig or env.ctl_kubeconfig),
            "--controllers", controllers, "--metrics-port", str(port),
            "--health-port", str(free_port()), "--bind-address", "127.0.0.1",
            "--no-leader-elect", *(extra or [])]

    def ready(text: str) -> bool:
        return '"caches synced"' in text

    profile = None
    if os.environ.get("BENCH_PYSPY"):  # profile volplane: BENCH_PYSPY=<dir>
        pyspy = VPY.parent / "py-spy"
        out = Path(os.environ["BENCH_PYSPY"])
        out.mkdir(parents=True, exist_ok=True)
        profile = out / f"volplane{tag}.txt"
        argv = [str(pyspy), "record", "-r", "100", "-f", "raw", "-o", str(profile), "--", *argv]
        # (memory numbers are then py-spy's, not volplane's: profile and measure apart)
    c = Controller(f"volplane{tag}", argv, ready, env.logs / f"volplane{tag}.log",
                   env=env_extra)
    c.metrics_url = f"http://127.0.0.1:{port}/metrics"
    c.profile = profile
    return c


def floor(env: Env, mode: str, namespace: str, concurrency: int, tag: str = "") -> Controller:
    argv = [str(VPY), str(Path(__file__).with_name("floor.py")), "--mode", mode,
            "--server", env.server, "--ca", str(env.pki / "ca.crt"),
            "--cert", str(env.work / "bench-ctl.crt"), "--key", str(env.work / "bench-ctl.key"),
            "--namespace", namespace, "--concurrency", str(concurrency)]
    return Controller(f"floor{tag}", argv, lambda t: "floor ready" in t,
                      env.logs / f"floor{tag}.log")


# ----------------------------------------------------------------------------- stats


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def latency_summary(values: list[float]) -> dict[str, float]:
    return {"p50_s": round(percentile(values, 50), 3), "p95_s": round(percentile(values, 95), 3),
            "p99_s": round(percentile(values, 99), 3),
            "max_s": round(max(values), 3) if values else float("nan")}


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0.0), 2) for k in after}


def machine() -> dict[str, Any]:
    import platform
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    return {"cpu": model, "cores": os.cpu_count(), "mem_mib": mem,
            "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg()}


# ----------------------------------------------------------------------------- objects


async def ensure_namespace(api: Api, ns: str) -> None:
    try:
        await api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                "metadata": {"name": ns}})
    except ApiError as e:
        if e.status != 409:
            raise
    # a namespace still terminating from a previous run: wait until it can take objects
    for _ in range(600):
        obj = await api.get(f"/api/v1/namespaces/{ns}")
        if (obj.get("status") or {}).get("phase") != "Terminating":
            return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"namespace {ns} stuck Terminating")


async def _gather_limited(coros, limit: int = 32) -> list:
    sem = asyncio.Semaphore(limit)

    async def one(c):
        async with sem:
            return await c
    return await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)


async def clean(api: Api, *, namespaces: tuple[str, ...] = (), pv_label: str | None = None,
                extra: tuple[str, ...] = (), timeout: float = 600) -> None:
    """Deletes every PVC/Pod (and `extra` collections) in `namespaces` and every PV with
    `pv_label`, stripping finalizers: no PV controller runs between benchmark runs,
    so pv-protection would otherwise keep Bound PVs forever."""
    collections: list[tuple[str, dict | None]] = []
    for ns in namespaces:
        for res in ("pods", "persistentvolumeclaims", "events"):
            collections.append((f"/api/v1/namespaces/{ns}/{res}", None))
    for path in extra:
        collections.append((path, None))
    if pv_label:
        collections.append(("/api/v1/persistentvolumes", {"labelSelector": pv_label}))
    deadline = time.monotonic() + timeout
    for path, params in collections:
        await api.request("DELETE", path, params={**(params or {}), "gracePeriodSeconds": "0"},
                          ok=(200, 404))
    while True:
        left = 0
        for path, params in collections:
            try:
                items = (await api.list(path, params=params))["items"]
            except ApiError as e:
                if e.status == 404:
                    continue
                raise
            left += len(items)
            stuck = [i for i in items if i["metadata"].get("finalizers")]
            base = path if "?" not in path else path.split("?")[0]
            await _gather_limited(
                api.merge_patch(f"{base}/{i['metadata']['name']}",
                                {"metadata": {"finalizers": None}}) for i in stuck)
            await _gather_limited(
                api.request("DELETE", f"{base}/{i['metadata']['name']}",
                            params={"gracePeriodSeconds": "0"}, ok=(200, 202, 404))
                for i in items if not i["metadata"].get("deletionTimestamp"))
        if not left:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"cleanup: {left} objects still there after {timeout:.0f} s")
        await asyncio.sleep(0.5)


async def create_many(api: Api, path_of, bodies: list[dict], limit: int = 32
                      ) -> tuple[dict[str, float], list[dict]]:
    """POSTs every body, `limit` at a time; returns (name -> monotonic time the POST was
    sent, created objects). Raises on the first failure."""
    sent: dict[str, float] = {}
    sem = asyncio.Semaphore(limit)

    async def one(body: dict) -> dict:
        async with sem:
            sent[body["metadata"]["name"]] = time.monotonic()
            return await api.create(path_of(body), body)
    created = await asyncio.gather(*(one(b) for b in bodies))
    return sent, list(created)
