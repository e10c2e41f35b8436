#!/usr/bin/env python3
"""A real, upstream Kubernetes control plane on loopback, for volplane's e2e tests.

    hack/cluster.py up       # start (or reuse) etcd, kube-apiserver, kube-controller-manager,
                             # kube-scheduler and kwok; print the kubeconfig path
    hack/cluster.py down     # stop everything and wipe etcd's data
    hack/cluster.py status   # one line per component; exit 1 if not healthy

The binaries come from hack/build-controlplane.sh (upstream sources at the pinned
versions, cached outside the repo). kube-controller-manager runs every controller
except the two volplane replaces (see KCM_CONTROLLERS). kwok plays the kubelets of
VOLPLANE_NODES (default 4) fake nodes, so that scheduled pods go Running.

Everything lives under .local/ in the repo root (git-ignored): pki/ (CA, serving
and client certificates, service-account keys, per-component kubeconfigs), etcd/,
logs/<component>.log, kubeconfig (admin) and state.json (pids and ports). The
components run in their own sessions and outlive this script.

Importable: up(repo_root) -> kubeconfig path, down(repo_root), is_healthy(repo_root).
Standard library only (plus openssl and go on PATH).

Environment: VOLPLANE_NODES, VOLPLANE_ETCD_PORT (23790), VOLPLANE_ETCD_PEER_PORT
(23800), VOLPLANE_APISERVER_PORT (36443), VOLPLANE_KCM_PORT (36257),
VOLPLANE_SCHEDULER_PORT (36259).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# kube-controller-manager's canonical names (k8s 1.36, cmd/kube-controller-manager/names)
# of the two controllers volplane replaces. Their legacy aliases are
# "persistentvolume-binder" and "attachdetach"; hack/kind-config.yaml uses the same names.
DISABLED_CONTROLLERS = (
    "persistentvolume-binder-controller",
    "persistentvolume-attach-detach-controller",
)
KCM_CONTROLLERS = ",".join(["*", *("-" + name for name in DISABLED_CONTROLLERS)])

SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # the first address of SERVICE_CIDR: the `kubernetes` Service
POD_CIDR = "10.244.0.0/16"  # kwok hands out pod IPs from here
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def instance() -> str:
    """VOLPLANE_CLUSTER names a second, independent local cluster (own dir and ports),
    so that e.g. a benchmark and the e2e suite never share one API server."""
    return os.environ.get("VOLPLANE_CLUSTER", "").strip()


def _port_offset() -> int:
    name = instance()
    return 0 if not name else 100 * (1 + sum(name.encode()) % 50)


def ports() -> dict[str, int]:
    off = _port_offset()
    return {
        "etcd": _env_int("VOLPLANE_ETCD_PORT", 23790 + off),
        "etcd-peer": _env_int("VOLPLANE_ETCD_PEER_PORT", 23800 + off),
        "kube-apiserver": _env_int("VOLPLANE_APISERVER_PORT", 36443 + off),
        "kube-controller-manager": _env_int("VOLPLANE_KCM_PORT", 36257 + off),
        "kube-scheduler": _env_int("VOLPLANE_SCHEDULER_PORT", 36259 + off),
    }


def node_count() -> int:
    return _env_int("VOLPLANE_NODES", 4)


def node_names(count: int) -> list[str]:
    return [f"kwok-node-{i}" for i in range(count)]


class ClusterError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    verbs: [create, update, patch, delete]
    resources:
      - group: ""
        resources: [persistentvolumes, persistentvolumes/status, persistentvolumeclaims,
                    persistentvolumeclaims/status]
      - group: storage.k8s.io
        resources: [volumeattachments, volumeattachments/status]
      - group: volplane.io
        resources: [storageallocations]
  - level: None
"""


def write_audit_policy(layout: Layout) -> Path:
    path = layout.pki / "audit-policy.yaml"
    path.write_text(AUDIT_POLICY)
    return path


# ----------------------------------------------------------------------------- layout


class Layout:
    def __init__(self, repo_root: Path | str | None = None):
        self.root = Path(repo_root or REPO_ROOT).resolve()
        self.local = self.root / ".local"
        if instance():
            self.local = self.local / "clusters" / instance()
        self.pki = self.local / "pki"
        self.etcd = self.local / "etcd"
        self.logs = self.local / "logs"
        self.kubeconfig = self.local / "kubeconfig"
        self.state = self.local / "state.json"
        self.kwok_config = self.local / "kwok.yaml"

    def cert(self, name: str) -> Path:
        return self.pki / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.pki / f"{name}.key"

    def component_kubeconfig(self, name: str) -> Path:
        return self.pki / f"{name}.kubeconfig"


# ----------------------------------------------------------------------------- binaries


def build_controlplane(layout: Layout) -> Path:
    """Runs hack/build-controlplane.sh (a no-op when cached); returns the bin dir."""
    script = layout.root / "hack" / "build-controlplane.sh"
    proc = subprocess.run([str(script)], stdout=subprocess.PIPE, text=True, cwd=layout.root)
    if proc.returncode != 0:
        raise ClusterError(f"{script} failed with exit code {proc.returncode}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise ClusterError(f"{script} printed no bin directory")
    bin_dir = Path(lines[-1].strip())
    missing = [c for c in COMPONENTS if not (bin_dir / c).is_file()]
    if missing:
        raise ClusterError(f"missing binaries in {bin_dir}: {', '.join(missing)}")
    return bin_dir


def _go_module_version(layout: Layout, subdir: str, module: str) -> str:
    for line in (layout.root / "hack" / subdir / "go.mod").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "require" and parts[1] == module:
            return parts[2]
        if len(parts) == 2 and parts[0] == module:
            return parts[1]
    raise ClusterError(f"{module} not found in hack/{subdir}/go.mod")


def kubernetes_version(repo_root: Path | str | None = None) -> str:
    """The pinned Kubernetes version (hack/k8s/go.mod's `require k8s.io/kubernetes`)."""
    return _go_module_version(Layout(repo_root), "k8s", "k8s.io/kubernetes")


# kwok ships its standard Stages (node-initialize, node heartbeat, pod-ready, ...)
# as YAML in its module, but the standalone `kwok` binary has none built in: they
# are given with --config. We take them from the pinned module, as kwokctl does.
KWOK_STAGES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)


def _kwok_module_dir(layout: Layout, version: str) -> Path:
    go = shutil.which("go") or "/usr/local/go/bin/go"
    cwd = layout.root / "hack" / "kwok"
    for cmd in (
        [go, "list", "-m", "-f", "{{.Dir}}", "sigs.k8s.io/kwok"],
        [go, "mod", "download", "-json", f"sigs.k8s.io/kwok@{version}"],
    ):
        try:
            out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode != 0:
            continue
        text = out.stdout.strip()
        path = Path(json.loads(text)["Dir"]) if text.startswith("{") else Path(text)
        if (path / KWOK_STAGES[0]).is_file():
            return path
    raise ClusterError(f"cannot locate the sigs.k8s.io/kwok@{version} module (for its Stages)")


def ensure_kwok_config(layout: Layout) -> Path:
    version = _go_module_version(layout, "kwok", "sigs.k8s.io/kwok")
    stamp = f"# kwok {version} stages\n"
    if layout.kwok_config.is_file() and layout.kwok_config.read_text().startswith(stamp):
        return layout.kwok_config
    moddir = _kwok_module_dir(layout, version)
    docs = [(moddir / rel).read_text().strip() + "\n" for rel in KWOK_STAGES]
    layout.kwok_config.parent.mkdir(parents=True, exist_ok=True)
    tmp = layout.kwok_config.with_suffix(".tmp")
    tmp.write_text(stamp + "---\n".join(docs))
    tmp.replace(layout.kwok_config)
    return layout.kwok_config


# ----------------------------------------------------------------------------- PKI


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def _self_signed_ca(pki: Path, name: str, subject: str) -> None:
    _openssl("genrsa", "-out", f"{name}.key", "2048", cwd=pki)
    _openssl(
        "req", "-x509", "-new", "-nodes", "-key", f"{name}.key", "-sha256", "-days", "3650",
        "-subj", subject,
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        "-out", f"{name}.crt", cwd=pki,
    )


def _client_or_server_cert(pki: Path, name: str, subject: str, ext: str, ca: str = "ca") -> None:
    if (pki / f"{name}.crt").exists() and (pki / f"{name}.key").exists():
        return
    ext_file = pki / f"{name}.ext"
    ext_file.write_text(ext)
    _openssl("genrsa", "-out", f"{name}.key", "2048", cwd=pki)
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr", cwd=pki)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "3650", "-sha256", "-extfile", ext_file.name,
        "-out", f"{name}.crt", cwd=pki,
    )
    (pki / f"{name}.csr").unlink()
    ext_file.unlink()


CLIENT_EXT = (
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=clientAuth\n"
)

# Client identities: file name -> subject. The CNs/Os are the ones upstream's
# bootstrap RBAC policy binds (system:kube-controller-manager, system:kube-scheduler).
CLIENTS = {
    "admin": "/O=system:masters/CN=volplane-admin",
    "kube-controller-manager": "/CN=system:kube-controller-manager",
    "kube-scheduler": "/CN=system:kube-scheduler",
    "kwok": "/O=system:masters/CN=kwok",
}


def ensure_pki(layout: Layout) -> None:
    pki = layout.pki
    pki.mkdir(parents=True, exist_ok=True)
    os.chmod(pki, 0o700)
    if not (pki / "ca.crt").exists() or not (pki / "ca.key").exists():
        for stale in pki.iterdir():  # a new CA invalidates everything signed by the old one
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        _self_signed_ca(pki, "ca", "/CN=volplane-local-ca")
    sans = ",".join([
        "IP:127.0.0.1", f"IP:{SERVICE_IP}", "DNS:localhost", "DNS:kubernetes",
        "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
        "DNS:kubernetes.default.svc.cluster.local",
    ])
    _client_or_server_cert(
        pki, "kube-apiserver", "/CN=kube-apiserver",
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        f"subjectAltName={sans}\n",
    )
    for name, subject in CLIENTS.items():
        _client_or_server_cert(pki, name, subject, CLIENT_EXT)
    # The front proxy (aggregation layer) gets its own CA, as upstream recommends; the
    # apiserver publishes it in kube-system/extension-apiserver-authentication, where
    # the controller manager and scheduler expect to find it.
    if not (pki / "front-proxy-ca.crt").exists() or not (pki / "front-proxy-ca.key").exists():
        (pki / "front-proxy-client.crt").unlink(missing_ok=True)
        _self_signed_ca(pki, "front-proxy-ca", "/CN=volplane-front-proxy-ca")
    _client_or_server_cert(pki, "front-proxy-client", "/CN=front-proxy-client", CLIENT_EXT,
                           ca="front-proxy-ca")
    if not (pki / "sa.key").exists() or not (pki / "sa.pub").exists():
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def kubeconfig_text(layout: Layout, client: str, server: str) -> str:
    """A self-contained kubeconfig (certificates embedded) for one client identity."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "volplane-local",
            "cluster": {"server": server, "certificate-authority-data": _b64(layout.cert("ca"))},
        }],
        "users": [{
            "name": client,
            "user": {
                "client-certificate-data": _b64(layout.cert(client)),
                "client-key-data": _b64(layout.key(client)),
            },
        }],
        "contexts": [{"name": "volplane-local",
                      "context": {"cluster": "volplane-local", "user": client}}],
        "current-context": "volplane-local",
        "preferences": {},
    }
    return json.dumps(config, indent=2) + "\n"  # JSON is YAML


def write_kubeconfigs(layout: Layout, apiserver_port: int) -> None:
    server = f"https://127.0.0.1:{apiserver_port}"
    for client in CLIENTS:
        path = layout.kubeconfig if client == "admin" else layout.component_kubeconfig(client)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(kubeconfig_text(layout, client, server))
        os.chmod(tmp, 0o600)
        tmp.replace(path)


# ----------------------------------------------------------------------------- API access


class Api:
    """A tiny HTTPS client for the local apiserver (admin identity, stdlib only)."""

    def __init__(self, layout: Layout, port: int):
        self.base = f"https://127.0.0.1:{port}"
        ctx = ssl.create_default_context(cafile=str(layout.cert("ca")))
        ctx.load_cert_chain(str(layout.cert("admin")), str(layout.key("admin")))
        self.ctx = ctx

    def request(self, method: str, path: str, body: dict | None = None,
                timeout: float = 5.0) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        req.add_header("Accept", "application/json")
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            return 0, str(err).encode()

    def get_json(self, path: str) -> dict | None:
        code, body = self.request("GET", path)
        return json.loads(body) if code == 200 else None

    def readyz(self) -> bool:
        code, _ = self.request("GET", "/readyz", timeout=2.0)
        return code == 200


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1,
               check=None):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def node_ready(node: dict) -> bool:
    for cond in node.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def node_manifest(name: str, index: int) -> dict:
    resources = {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "1Ti"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "topology.kubernetes.io/zone": "zone-a" if index % 2 == 0 else "zone-b",
            },
            "annotations": {
                KWOK_ANNOTATION: "fake",
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
        },
        "spec": {},
        "status": {"allocatable": dict(resources), "capacity": dict(resources)},
    }


# ----------------------------------------------------------------------------- processes


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def pid_alive(pid: int | None, binary: str | None = None) -> bool:
    """True if pid runs (not a zombie) and, when given, runs `binary`."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
        return False
    if binary is not None:
        cmd = _cmdline(pid)
        return bool(cmd) and cmd[0] == binary
    return True


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _spawn(layout: Layout, name: str, argv: list[str]) -> subprocess.Popen:
    layout.logs.mkdir(parents=True, exist_ok=True)
    logfile = open(layout.logs / f"{name}.log", "wb")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
            cwd=layout.local, start_new_session=True,
        )
    finally:
        logfile.close()
    # The component outlives us: don't let Popen's destructor warn that it still runs.
    proc.returncode = 0
    return proc


def _log_tail(layout: Layout, name: str, lines: int = 25) -> str:
    try:
        text = (layout.logs / f"{name}.log").read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def load_state(layout: Layout) -> dict | None:
    try:
        return json.loads(layout.state.read_text())
    except (OSError, ValueError):
        return None


def _save_state(layout: Layout, state: dict) -> None:
    tmp = layout.state.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(layout.state)


def _component_argv(layout: Layout, bin_dir: Path, p: dict[str, int]) -> dict[str, list[str]]:
    pki = layout.pki
    b = lambda name: str(bin_dir / name)  # noqa: E731
    etcd_url = f"http://127.0.0.1:{p['etcd']}"
    peer_url = f"http://127.0.0.1:{p['etcd-peer']}"
    kcm_kc = str(layout.component_kubeconfig("kube-controller-manager"))
    sched_kc = str(layout.component_kubeconfig("kube-scheduler"))
    return {
        "etcd": [
            b("etcd"), "--name=volplane", f"--data-dir={layout.etcd}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=volplane={peer_url}", "--initial-cluster-state=new",
            # a throwaway test cluster: durability buys nothing, fsync costs seconds
            "--unsafe-no-fsync=true", "--log-level=warn",
        ],
        "kube-apiserver": [
            b("kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", f"--secure-port={p['kube-apiserver']}",
            "--advertise-address=127.0.0.1",
            # the advertised address is loopback, which Endpoints reject; nothing here
            # needs the `kubernetes` Service to have endpoints
            "--endpoint-reconciler-type=none",
            f"--cert-dir={pki / 'apiserver-cert-dir'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--tls-cert-file={pki / 'kube-apiserver.crt'}",
            f"--tls-private-key-file={pki / 'kube-apiserver.key'}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            # Writes to storage objects are audited (tests count who wrote what).
            f"--audit-policy-file={write_audit_policy(layout)}",
            f"--audit-log-path={layout.logs / 'audit.log'}",
            "--audit-log-maxsize=200", "--audit-log-maxbackup=1",
            "--v=1",
        ],
        "kube-controller-manager": [
            b("kube-controller-manager"),
            f"--controllers={KCM_CONTROLLERS}",
            f"--kubeconfig={kcm_kc}",
            f"--authentication-kubeconfig={kcm_kc}",
            f"--authorization-kubeconfig={kcm_kc}",
            "--bind-address=127.0.0.1", f"--secure-port={p['kube-controller-manager']}",
            f"--cert-dir={pki / 'kcm-cert-dir'}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            "--use-service-account-credentials=true",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--leader-elect=false",
            # client-side rate limits (default 20 QPS) slow its startup, which creates
            # a ServiceAccount and token per controller, by seconds
            "--kube-api-qps=200", "--kube-api-burst=400",
            "--v=1",
        ],
        "kube-scheduler": [
            b("kube-scheduler"),
            f"--kubeconfig={sched_kc}",
            f"--authentication-kubeconfig={sched_kc}",
            f"--authorization-kubeconfig={sched_kc}",
            "--bind-address=127.0.0.1", f"--secure-port={p['kube-scheduler']}",
            f"--cert-dir={pki / 'scheduler-cert-dir'}",
            "--leader-elect=false",
            "--v=1",
        ],
        "kwok": [
            b("kwok"),
            f"--kubeconfig={layout.component_kubeconfig('kwok')}",
            f"--config={layout.kwok_config}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
            f"--cidr={POD_CIDR}",
            "--node-ip=127.0.0.1",
            "--node-lease-duration-seconds=40",
        ],
    }


# ----------------------------------------------------------------------------- commands


def is_healthy(repo_root: Path | str | None = None, state: dict | None = None) -> bool:
    """A cluster started by up() runs: every recorded pid alive and /readyz answers ok."""
    layout = Layout(repo_root)
    state = state if state is not None else load_state(layout)
    if not state or not layout.kubeconfig.is_file():
        return False
    procs = state.get("pids", {})
    bin_dir = state.get("bin_dir", "")
    for name in COMPONENTS:
        if not pid_alive(procs.get(name), str(Path(bin_dir) / name)):
            return False
    try:
        return Api(layout, state["ports"]["kube-apiserver"]).readyz()
    except (OSError, ssl.SSLError, KeyError):
        return False


def _stop_pids(pids: dict[str, int], bin_dir: str, grace: float = 5.0) -> None:
    """Stops components in reverse dependency order: the API clients, then the
    apiserver, then etcd. Each tier gets SIGTERM (to its process groups) and `grace`
    seconds, then SIGKILL. (etcd and the apiserver stopped together can take >10 s:
    each waits for the other's connections to drain.)"""
    tiers = [
        ("kwok", "kube-scheduler", "kube-controller-manager"),
        ("kube-apiserver",),
        ("etcd",),
    ]
    for tier in tiers:
        live = {
            name: pids[name] for name in tier
            if name in pids
            and pid_alive(pids[name], str(Path(bin_dir) / name) if bin_dir else None)
        }
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for pid in live.values():
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while live and time.monotonic() < deadline:
                live = {n: p for n, p in live.items() if pid_alive(p)}
                if live:
                    time.sleep(0.05)
            if not live:
                break


@contextlib.contextmanager
def _locked(layout: Layout):
    """Serialises up/down across processes (two test sessions starting at once)."""
    layout.local.mkdir(parents=True, exist_ok=True)
    with open(layout.local / "cluster.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def down(repo_root: Path | str | None = None, quiet: bool = False) -> None:
    """Stops every component and wipes etcd's data (certificates are kept)."""
    layout = Layout(repo_root)
    with _locked(layout):
        _down(layout, quiet)


def _down(layout: Layout, quiet: bool) -> None:
    state = load_state(layout)
    if state:
        _stop_pids(state.get("pids", {}), state.get("bin_dir", ""))
        if not quiet:
            log("stopped: " + ", ".join(state.get("pids", {})))
    elif not quiet:
        log("no cluster state; nothing to stop")
    shutil.rmtree(layout.etcd, ignore_errors=True)
    layout.state.unlink(missing_ok=True)


def up(repo_root: Path | str | None = None, nodes: int | None = None, quiet: bool = False) -> Path:
    """Starts the local control plane (or reuses a healthy one); returns the admin kubeconfig."""
    layout = Layout(repo_root)
    with _locked(layout):
        return _up(layout, nodes, quiet)


def _up(layout: Layout, nodes: int | None, quiet: bool) -> Path:
    t0 = time.monotonic()
    say = (lambda msg: None) if quiet else log

    state = load_state(layout)
    if state and is_healthy(layout.root, state):
        say(f"control plane already running (reused in {time.monotonic() - t0:.1f} s)")
        return layout.kubeconfig
    if state:
        say("stale control plane state: cleaning up and starting fresh")
        _down(layout, quiet=True)

    bin_dir = build_controlplane(layout)
    nodes = node_count() if nodes is None else nodes
    p = ports()

    def busy_ports() -> list[str]:
        return [f"{name}={port}" for name, port in p.items() if not _port_free(port)]

    busy = busy_ports()
    if busy and state:  # just stopped: the kernel may take a moment to release them
        deadline = time.monotonic() + 5
        while busy and time.monotonic() < deadline:
            time.sleep(0.1)
            busy = busy_ports()
    if busy:
        raise ClusterError(
            "ports in use (another cluster? set VOLPLANE_*_PORT): " + ", ".join(busy))

    layout.local.mkdir(parents=True, exist_ok=True)
    ensure_pki(layout)
    ensure_kwok_config(layout)
    write_kubeconfigs(layout, p["kube-apiserver"])
    shutil.rmtree(layout.etcd, ignore_errors=True)

    argv = _component_argv(layout, bin_dir, p)
    state = {
        "bin_dir": str(bin_dir),
        "kubernetes_version": kubernetes_version(layout.root),
        "ports": p,
        "nodes": nodes,
        "kubeconfig": str(layout.kubeconfig),
        "pids": {},
    }
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str) -> None:
        procs[name] = _spawn(layout, name, argv[name])
        state["pids"][name] = procs[name].pid
        _save_state(layout, state)  # saved after each start so `down` finds partial starts

    def check_alive() -> None:
        for name, proc in procs.items():
            if not pid_alive(proc.pid):
                raise ClusterError(
                    f"{name} exited during startup; {layout.logs / (name + '.log')}:\n"
                    + _log_tail(layout, name))

    try:
        start("etcd")
        start("kube-apiserver")  # retries etcd by itself until it answers
        api = Api(layout, p["kube-apiserver"])
        # kube-controller-manager gives up if the apiserver is not healthy within 10 s
        wait_until(api.readyz, 90, "kube-apiserver /readyz", check=check_alive)
        t_api = time.monotonic() - t0
        for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
            start(name)

        for i, name in enumerate(node_names(nodes)):
            code, body = api.request("POST", "/api/v1/nodes", node_manifest(name, i))
            if code not in (201, 409):
                raise ClusterError(f"creating node {name}: HTTP {code}: {body[:300]!r}")

        def nodes_ready() -> bool:
            items = (api.get_json("/api/v1/nodes") or {}).get("items", [])
            return sum(1 for n in items if node_ready(n)) >= nodes

        wait_until(nodes_ready, 60, f"{nodes} kwok nodes Ready", check=check_alive)
        t_nodes = time.monotonic() - t0
        wait_until(lambda: api.get_json("/api/v1/namespaces/default"), 60,
                   "namespace default", check=check_alive)
        wait_until(lambda: api.get_json("/api/v1/namespaces/default/serviceaccounts/default"),
                   60, "serviceaccount default/default (kube-controller-manager)",
                   check=check_alive)
        t_sa = time.monotonic() - t0
    except BaseException:
        # leave the logs for diagnosis, stop what was started
        _stop_pids(state["pids"], str(bin_dir))
        layout.state.unlink(missing_ok=True)
        raise

    state["started_at"] = time.time()
    _save_state(layout, state)
    say(f"kube-apiserver ready after {t_api:.1f} s, {nodes} nodes Ready after {t_nodes:.1f} s, "
        f"default ServiceAccount after {t_sa:.1f} s")
    say(f"control plane up in {time.monotonic() - t0:.1f} s")
    return layout.kubeconfig


def status(repo_root: Path | str | None = None) -> bool:
    layout = Layout(repo_root)
    state = load_state(layout)
    if not state:
        print("no cluster (no .local/state.json)")
        return False
    healthy = True
    bin_dir = state.get("bin_dir", "")
    for name in COMPONENTS:
        pid = state.get("pids", {}).get(name)
        alive = pid_alive(pid, str(Path(bin_dir) / name))
        healthy &= alive
        print(f"{name:25} pid {pid or '-':>8}  {'alive' if alive else 'DEAD'}")
    api = Api(layout, state["ports"]["kube-apiserver"])
    ready = api.readyz()
    healthy &= ready
    print(f"{'kube-apiserver /readyz':25} {'ok' if ready else 'NOT READY'}")
    items = (api.get_json("/api/v1/nodes") or {}).get("items", []) if ready else []
    n_ready = sum(1 for n in items if node_ready(n))
    want = state.get("nodes", 0)
    healthy &= n_ready >= want
    print(f"{'nodes Ready':25} {n_ready}/{len(items)} (want {want})")
    print(f"{'kubeconfig':25} {layout.kubeconfig}")
    print("healthy" if healthy else "NOT healthy")
    return healthy


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "up"
    try:
        if cmd == "up":
            print(up())
            return 0
        if cmd == "down":
            down()
            return 0
        if cmd == "status":
            return 0 if status() else 1
    except ClusterError as err:
        log(f"error: {err}")
        return 1
    log(f"usage: {sys.argv[0]} up|down|status")
    return 2


if __name__ == "__main__":
    sys.exit(main())
