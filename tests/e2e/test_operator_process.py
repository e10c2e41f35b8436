"""`volplane run` as a process: connects, logs JSON, exits cleanly on SIGTERM (issue 2)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request

import yaml


def test_run_connects_logs_json_and_exits_cleanly_on_sigterm(operator):
    operator.start()
    operator.wait_ready(timeout=60)
    assert operator.stop(timeout=30) == 0
    lines = [ln for ln in operator.raw_lines() if ln.strip()]
    parsed = [json.loads(ln) for ln in lines]  # every line is one JSON object
    events = [p.get("event") for p in parsed]
    assert "starting" in events and "caches synced" in events and "stopped" in events
    synced = next(p for p in parsed if p.get("event") == "caches synced")
    assert set(synced["controllers"]) == {"pv-binder", "pool-provisioner", "attachdetach",
                                          "pool-attacher"}
    assert all("timestamp" in p and "level" in p for p in parsed)


def test_controllers_flag_selects_controllers_like_kube_controller_manager(operator):
    operator.start("--controllers", "*,-attachdetach,-pool-attacher")
    operator.wait_ready()
    synced = next(p for p in operator.log_lines() if p.get("event") == "caches synced")
    assert synced["controllers"] == ["pv-binder", "pool-provisioner"]
    # Watches follow the controllers: nothing attach-related is listed. (Pods are: the
    # PV controller reads them as upstream's podIndexer does, issue 14.)
    assert "volumeattachments" not in synced["objects"] and "csidrivers" not in synced["objects"]


def test_unknown_controller_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "volplane.cli", "run", "--controllers",
                          "*,nope", "--kubeconfig", "/dev/null"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown controller 'nope'" in out.stdout + out.stderr


def test_version():
    out = subprocess.run([sys.executable, "-m", "volplane.cli", "version"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("volplane ")


class _Proxy:
    """A TCP proxy to the API server that can be cut (listener and connections closed)
    and restored on the same port: a network partition between operator and API."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = 0
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        self.port = ls.getsockname()[1]
        ls.listen(64)
        self.listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        self.conns = []


def _healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_healthz_fails_while_a_watch_stream_cannot_reconnect(operator, tmp_path):
    """The operator talks to the API server through a proxy. Cut it: Kopf keeps retrying
    its watches, and once they have failed for longer than --watch-reconnect-budget,
    /healthz answers 500 (the kubelet would restart the pod). Restore it: the watches
    come back and /healthz answers 200 again."""
    from .helpers import wait_for

    cfg = yaml.safe_load(open(operator.kubeconfig))
    server = urllib.parse.urlsplit(cfg["clusters"][0]["cluster"]["server"])
    proxy = _Proxy((server.hostname, server.port))
    cfg["clusters"][0]["cluster"]["server"] = f"https://{server.hostname}:{proxy.port}"
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    try:
        operator.start("--kubeconfig", str(path), "--no-leader-elect",
                       "--controllers", "pv-binder", "--watch-reconnect-budget", "3")
        operator.wait_ready()
        assert _healthz(operator.health_port) == 200
        proxy.cut()
        wait_for(lambda: _healthz(operator.health_port) == 500, timeout=60,
                 message="/healthz 500 while the watches cannot reconnect")
        assert operator.running
        proxy.restore()
        wait_for(lambda: _healthz(operator.health_port) == 200, timeout=90,
                 message="/healthz 200 once the watches are back")
    finally:
        proxy.cut()
