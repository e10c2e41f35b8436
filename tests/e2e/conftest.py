"""Fixtures for volplane's end-to-end tests.

The cluster, in order of precedence:
  1. VOLPLANE_E2E_KUBECONFIG=<path>: any cluster, used as is ("external");
  2. `--kind`: a kind cluster made from hack/kind-config.yaml (pytest-kind, "volplane-e2e");
  3. otherwise the local upstream control plane of hack/cluster.py, started or reused
     (and left running for the next session; `make cluster-down` stops it).

On kind (`--kind`, `make e2e-kind`) the cluster is hack/kind/kind.py's: built offline,
created or reused, volplane's Deployment installed. The suite scales that Deployment
to zero while it runs (its tests start their own operators; two would fight) and back
up at the end; the install tests that need it scale it themselves.

The operator never starts by itself: request `operator` and call start(), or use
`operator_running`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pykube
import pytest

from .helpers import (
    E2ENodes,
    delete_quietly,
    discover_nodes,
    get_or_none,
    kpatch_response,
    pykube_client,
    remove_e2e_leftovers,
    wait_for,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Operator logs, pid records and the operator's kubeconfig live beside the cluster they
# belong to, so a local-cluster session and a kind session can run at once.
if "--kind" in sys.argv:
    LOG_DIR = REPO_ROOT / ".local" / "kind" / "logs"
elif os.environ.get("VOLPLANE_CLUSTER"):
    LOG_DIR = REPO_ROOT / ".local" / "clusters" / os.environ["VOLPLANE_CLUSTER"] / "logs"
else:
    LOG_DIR = REPO_ROOT / ".local" / "logs"


def _load_hack_module(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_cluster_module():
    """hack/cluster.py as a module (hack/ is not a package)."""
    return _load_hack_module("volplane_hack_cluster", REPO_ROOT / "hack" / "cluster.py")


def load_kind_module():
    """hack/kind/kind.py as a module."""
    return _load_hack_module("volplane_hack_kind", REPO_ROOT / "hack" / "kind" / "kind.py")


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    flavor: str  # "local" (hack/cluster.py), "kind" or "external"

    @property
    def local(self) -> bool:
        return self.flavor == "local"

    @cached_property
    def nodes(self) -> E2ENodes:
        """The nodes tests pin pods and pools to (kwok's or kind's, by what is there)."""
        client = pykube_client(str(self.kubeconfig))
        try:
            return discover_nodes(client)
        finally:
            client.session.close()


@pytest.fixture(scope="session")
def cluster(request) -> Cluster:
    external = os.environ.get("VOLPLANE_E2E_KUBECONFIG")
    if external:
        yield Cluster(Path(external).expanduser().resolve(), "external")
        return

    if request.config.getoption("kind"):
        kind = load_kind_module()
        try:
            kubeconfig = kind.up()
        except kind.EngineUnavailable as exc:
            pytest.skip(f"kind e2e skipped: no Docker engine can run here: {exc}")
        except kind.KindError as exc:
            pytest.exit(f"kind cluster failed: {exc}", returncode=3)
        scaled = _scale_in_cluster_operator(kubeconfig, 0)
        yield Cluster(Path(kubeconfig).resolve(), "kind")
        if scaled:
            _scale_in_cluster_operator(kubeconfig, 2)
        return

    cluster_module = load_cluster_module()
    try:
        kubeconfig = cluster_module.up(REPO_ROOT)
    except cluster_module.ClusterError as exc:
        pytest.exit(f"local control plane failed to start: {exc}", returncode=3)
    yield Cluster(Path(kubeconfig), "local")


def _scale_in_cluster_operator(kubeconfig: Path, replicas: int) -> bool:
    """Scales volplane-system/volplane (the in-cluster Deployment); False if absent."""
    import subprocess as sp

    kubectl_bin = shutil.which("kubectl") or "kubectl"
    args = [kubectl_bin, "--kubeconfig", str(kubeconfig), "-n", "volplane-system"]
    if sp.run([*args, "get", "deployment", "volplane"], capture_output=True).returncode != 0:
        return False
    sp.run([*args, "scale", "deployment", "volplane", f"--replicas={replicas}"], check=True,
           capture_output=True)
    if replicas == 0:
        wait_for(lambda: not sp.run([*args, "get", "pods", "-l", "app.kubernetes.io/name=volplane",
                                     "-o", "name"], capture_output=True, text=True).stdout.strip(),
                 timeout=120, message="in-cluster volplane pods gone")
        # its Lease would keep the tests' operators waiting for it to expire
        sp.run([*args, "delete", "lease", "volplane", "--ignore-not-found"], capture_output=True)
    return True


@pytest.fixture(scope="session")
def kubeconfig(cluster) -> str:
    return str(cluster.kubeconfig)


@pytest.fixture(scope="session")
def api(kubeconfig) -> pykube.HTTPClient:
    client = pykube_client(kubeconfig)
    yield client
    client.session.close()


@pytest.fixture(scope="session")
def e2e_leftovers_removed(api) -> dict[str, list[str]]:
    """Once per session, before the first test namespace: delete the test-made objects
    (helpers.remove_e2e_leftovers: e2e-named PVs, pools, classes, drivers, fake nodes,
    pool volumes/allocations/capacities of e2e pools, e2e namespaces) an earlier killed
    session left on a reused cluster; tests that count cluster-wide objects assume a
    clean slate. One session per cluster at a time (two would step on each other's
    claims anyway). VOLPLANE_E2E_KEEP_LEFTOVERS=1 skips it, e.g. to inspect a failure.
    First, operators a killed session left running are killed (kill_orphaned_operators):
    they would keep provisioning and binding on the cluster."""
    orphans = kill_orphaned_operators()
    if orphans:
        print(f"\ne2e: killed operators an earlier session left running: {orphans}",
              file=sys.stderr)
    if os.environ.get("VOLPLANE_E2E_KEEP_LEFTOVERS") == "1":
        return {}
    removed = remove_e2e_leftovers(api)
    if removed:
        summary = ", ".join(f"{len(names)} {kind}" for kind, names in sorted(removed.items()))
        print(f"\ne2e: removed leftovers of an earlier session: {summary}", file=sys.stderr)
    return removed


@pytest.fixture
def namespace(api, e2e_leftovers_removed) -> str:
    """A fresh namespace `e2e-<random>`, deleted (without waiting) after the test.

    Waits for its `default` ServiceAccount, without which Pods are refused."""
    name = f"e2e-{secrets.token_hex(3)}"
    ns = pykube.Namespace(api, {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {"volplane.io/e2e": "true"}},
    })
    ns.create()
    wait_for(
        lambda: pykube.ServiceAccount.objects(api, namespace=name).get_or_none(name="default"),
        timeout=30,
        message=f"ServiceAccount {name}/default",
    )
    yield name
    delete_quietly(ns)
    # PVs are cluster-scoped: the tests name theirs "<namespace>-…". Left behind they
    # would go Released and keep the next test's operator busy at start-up. A Bound one
    # keeps kubernetes.io/pv-protection until a binder releases it, and no operator runs
    # any more: strip the finalizers after the delete, as every other e2e cleanup does
    # (else it stays Terminating, Bound to a claim that is gone: `volplane check` after
    # the module reports it).
    for pv in pykube.PersistentVolume.objects(api):
        if pv.name.startswith(f"{name}-"):
            delete_quietly(pv)
            if get_or_none(api, "v1", "PersistentVolume", pv.name) is not None:
                kpatch_response(api, "PersistentVolume", pv.name,
                                {"metadata": {"finalizers": None}})


# ----------------------------------------------------------------------------- invariants
CHECK_WAIT = float(os.environ.get("VOLPLANE_E2E_CHECK_WAIT") or 60)


def run_check(kubeconfig: str, *extra: str, wait: float = CHECK_WAIT) -> tuple[int, dict, str]:
    """`volplane check -o json` against the cluster: (exit code, report, stderr)."""
    out = subprocess.run([_volplane_executable(), "check", "--kubeconfig", kubeconfig,
                          "-o", "json", "--wait", str(wait), *extra],
                         capture_output=True, text=True, timeout=wait + 120)
    try:
        report = json.loads(out.stdout)
    except ValueError:
        report = {}
    return out.returncode, report, out.stderr


@pytest.fixture(scope="module", autouse=True)
def cluster_invariants(request):
    """After every e2e module: `volplane check` finds every invariant holding.

    Scope (what is fair to judge once a module's tests and their cleanup are done):
    - objects and namespaces labelled `volplane.io/check-exclude` are skipped, with what
      is bound to them (`check/invariants.py` Scope): a test that breaks something on
      purpose labels it so;
    - `--wait`: a cleanup leaves work in flight (namespaces being deleted, claims going
      away with them); the check re-runs for up to VOLPLANE_E2E_CHECK_WAIT seconds (60)
      until every invariant holds;
    - tests that use no cluster (or VOLPLANE_E2E_CHECK=0) skip it.
    A violation fails the module's last test (as a teardown error) with the report."""
    yield
    if os.environ.get("VOLPLANE_E2E_CHECK") == "0":
        return
    mine = [i for i in request.session.items if i.path == request.node.path]
    if not any("cluster" in getattr(i, "fixturenames", ()) for i in mine):
        return
    kubeconfig = request.getfixturevalue("kubeconfig")
    code, report, err = run_check(kubeconfig)
    if code == 0:
        return
    if code == 1:
        lines = [f"- [{v['invariant']}] {v['message']}" for v in report.get("violations", [])]
        pytest.fail(f"volplane check after {request.node.name}: "
                    f"{len(lines)} violation(s)\n" + "\n".join(lines), pytrace=False)
    pytest.fail(f"volplane check could not run (exit {code}): {err.strip()}", pytrace=False)


# ----------------------------------------------------------------------------- operator


def _volplane_executable() -> str:
    beside_python = Path(sys.executable).parent / "volplane"
    if beside_python.exists():
        return str(beside_python)
    venv = REPO_ROOT / ".venv" / "bin" / "volplane"
    if venv.exists():
        return str(venv)
    found = shutil.which("volplane")
    if found:
        return found
    raise RuntimeError("no `volplane` executable (pip install -e . in the venv)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:100] or "test"


# Operators run in their own session (so a test can kill the whole group), which also
# means they outlive a killed pytest and keep acting on the cluster. Each start is
# recorded here (pid -> pytest pid and argv); the next session kills the ones whose
# pytest is gone and that are still that very command line.
OPERATOR_PIDS = LOG_DIR / "operator-pids"


def _record_operator(pid: int, argv: list[str]) -> None:
    OPERATOR_PIDS.mkdir(parents=True, exist_ok=True)
    (OPERATOR_PIDS / str(pid)).write_text(json.dumps({"owner": os.getpid(), "argv": argv}))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def kill_orphaned_operators() -> list[int]:
    """SIGKILLs operators an earlier, killed pytest session started; returns their pids."""
    killed: list[int] = []
    for record in OPERATOR_PIDS.glob("*") if OPERATOR_PIDS.is_dir() else ():
        try:
            pid = int(record.name)
            info = json.loads(record.read_text())
        except (ValueError, OSError):
            record.unlink(missing_ok=True)
            continue
        owner = int(info.get("owner") or 0)
        if owner and _alive(owner) and "pytest" in _cmdline(owner):
            continue  # a live session's operator (not ours to touch)
        if " ".join(info.get("argv") or ()) in _cmdline(pid) and _cmdline(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
                killed.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
        record.unlink(missing_ok=True)
    return killed


class Operator:
    """`volplane run` as a subprocess, one log file per start.

    Logs go to .local/logs/operator-<test>-<n>.log (stdout and stderr together)."""

    def __init__(self, kubeconfig: str, test_name: str, instance: str = ""):
        self.kubeconfig = kubeconfig
        self.test_name = _safe(test_name) + (f"-{instance}" if instance else "")
        self.proc: subprocess.Popen | None = None
        self.args: tuple[str, ...] = ()
        self.env: dict[str, str] | None = None
        self.starts = 0
        self.log_path: Path | None = None
        self.log_paths: list[Path] = []
        self._others: list[Operator] = []
        self.metrics_port: int | None = None
        self.health_port: int | None = None

    # -- lifecycle

    def start(self, *args: str, env: dict[str, str] | None = None) -> Operator:
        if self.running:
            raise RuntimeError(f"operator already running (pid {self.proc.pid})")
        self.args = tuple(args)
        self.env = dict(env) if env else None
        self.starts += 1
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"operator-{self.test_name}-{self.starts}.log"
        self.log_paths.append(self.log_path)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        extra: list[str] = []
        # Free ports unless the test chose them: several operators (HA tests, parallel
        # runs) must not fight over 8080/8081.
        if "--metrics-port" not in self.args:
            self.metrics_port = _free_port()
            extra += ["--metrics-port", str(self.metrics_port)]
        if "--health-port" not in self.args:
            self.health_port = _free_port()
            extra += ["--health-port", str(self.health_port)]
        argv = [_volplane_executable(), "run", "--kubeconfig", self.kubeconfig, *extra,
                *self.args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=full_env, cwd=REPO_ROOT, start_new_session=True,
            )
        _record_operator(self.proc.pid, argv)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def wait_ready(self, timeout: float = 60) -> Operator:
        """Waits for the `"caches synced"` log line of the current run."""
        if self.proc is None:
            raise RuntimeError("operator not started")
        deadline = time.monotonic() + timeout
        while True:
            if any('"caches synced"' in line for line in self.raw_lines()):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"operator exited with {self.proc.returncode} before its caches synced; "
                    f"{self.log_path}:\n{self.tail()}")
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"operator not ready after {timeout} s; {self.log_path}:\n{self.tail()}")
            time.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Sends `sig` to the operator's process group (no waiting unless SIGKILL)."""
        if not self.running:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        if sig == signal.SIGKILL:
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, wait for exit; returns the exit code (SIGKILL after `timeout`: -9)."""
        if self.proc is None:
            raise RuntimeError("operator not started")
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
        # anything the operator left in its session goes too
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        (OPERATOR_PIDS / str(self.proc.pid)).unlink(missing_ok=True)
        return self.proc.returncode

    def restart(self, *args: str, env: dict[str, str] | None = None) -> Operator:
        """stop() then start() again, with the previous arguments unless new ones are given."""
        if self.running:
            self.stop()
        return self.start(*(args or self.args), env=env if env is not None else self.env)

    def another(self, name: str = "") -> Operator:
        """An independent second operator for the same test (also stopped at teardown)."""
        other = Operator(self.kubeconfig, self.test_name,
                         instance=name or f"i{len(self._others) + 2}")
        self._others.append(other)
        return other

    def teardown(self) -> None:
        for op in [self, *self._others]:
            if op.proc is not None:
                op.stop(timeout=15)

    # -- logs

    def raw_lines(self, all_runs: bool = False) -> list[str]:
        paths = self.log_paths if all_runs else [self.log_path] if self.log_path else []
        lines: list[str] = []
        for path in paths:
            try:
                lines.extend(path.read_text(errors="replace").splitlines())
            except FileNotFoundError:
                pass
        return lines

    def log_lines(self, all_runs: bool = False) -> list[dict]:
        """The JSON log lines of the current run (or of every run); other lines skipped."""
        parsed = []
        for line in self.raw_lines(all_runs):
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                parsed.append(json.loads(line))
            except ValueError:
                continue
        return parsed

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.raw_lines()[-n:])


def kubectl(kubeconfig: str, *args: str, input: str | None = None) -> str:
    out = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, *args], input=input,
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


INSTALL_FILES = ("rbac.yaml", "csidriver.yaml")


def install_prerequisites(kubeconfig: str) -> None:
    """What the operator needs from manifests/ except its Deployment: CRDs, namespace,
    ServiceAccount and least-privilege RBAC, the CSIDriver. The namespace only where it
    is missing: an install may have labelled it otherwise (kind's, with
    manifests/flexvolume/, admits the operator's hostPath: Pod Security `privileged`)."""
    kubectl(kubeconfig, "apply", "--server-side", "--force-conflicts", "-k",
            str(REPO_ROOT / "crds"))
    args = ["apply", "--server-side", "--force-conflicts"]
    if subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "get", "namespace",
                       "volplane-system"], capture_output=True).returncode != 0:
        args += ["-f", str(REPO_ROOT / "manifests" / "namespace.yaml")]
    for f in INSTALL_FILES:
        args += ["-f", str(REPO_ROOT / "manifests" / f)]
    kubectl(kubeconfig, *args)
    kubectl(kubeconfig, "wait", "--for=condition=Established", "--timeout=60s",
            "crd/storagepools.volplane.io", "crd/storageallocations.volplane.io")


def serviceaccount_kubeconfig(admin_kubeconfig: str, path: Path,
                              namespace: str = "volplane-system", name: str = "volplane") -> Path:
    """A kubeconfig that authenticates as the operator's ServiceAccount (token request)."""
    import yaml

    token = kubectl(admin_kubeconfig, "create", "token", name, "-n", namespace,
                    "--duration=12h").strip()
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    ctx_name = admin.get("current-context")
    ctx = next(c["context"] for c in admin["contexts"] if c["name"] == ctx_name)
    cluster = next(c["cluster"] for c in admin["clusters"] if c["name"] == ctx["cluster"])
    cfg = {
        "apiVersion": "v1", "kind": "Config", "current-context": "volplane",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": f"system:serviceaccount:{namespace}:{name}", "user": {"token": token}}],
        "contexts": [{"name": "volplane", "context": {
            "cluster": "c", "user": f"system:serviceaccount:{namespace}:{name}"}}],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def operator_kubeconfig(kubeconfig) -> str:
    """The operator runs as manifests/' ServiceAccount in every e2e test, so the whole
    suite proves the RBAC is sufficient. VOLPLANE_E2E_OPERATOR_IDENTITY=admin opts out."""
    install_prerequisites(kubeconfig)
    if os.environ.get("VOLPLANE_E2E_OPERATOR_IDENTITY") == "admin":
        return kubeconfig
    return str(serviceaccount_kubeconfig(kubeconfig, LOG_DIR.parent / "operator.kubeconfig"))


@pytest.fixture
def operator(operator_kubeconfig, request) -> Operator:
    op = Operator(operator_kubeconfig, request.node.name)
    yield op
    op.teardown()


@pytest.fixture
def operator_running(operator) -> Operator:
    operator.start()
    operator.wait_ready()
    return operator
