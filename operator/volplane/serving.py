"""The metrics port: Prometheus exposition (prometheus-client's WSGI app) plus /readyz.

Readiness = caches synced and, on the leader, every controller loop running; a
follower with synced caches is ready (it is a warm standby). Liveness is Kopf's
own endpoint on --health-port (/healthz), which fails when its watches die.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app


@dataclass
class Readiness:
    synced: bool = False
    leader_election: bool = False
    leading: bool = False
    controllers: dict[str, bool] = field(default_factory=dict)

    def ready(self) -> tuple[bool, str]:
        if not self.synced:
            return False, "caches not synced"
        if self.leader_election and not self.leading:
            return True, "standby: caches synced, not leading"
        down = [n for n, up in self.controllers.items() if not up]
        if down:
            return False, f"controllers not running: {', '.join(down)}"
        return True, "ok"


state = Readiness()


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):  # probes every few seconds: not worth a log line
        pass


def app(metrics=None):
    metrics = metrics or make_wsgi_app()

    def dispatch(environ, start_response):
        if environ.get("PATH_INFO") == "/readyz":
            ok, why = state.ready()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])
            return [why.encode() + b"\n"]
        return metrics(environ, start_response)

    return dispatch


def serve(port: int, addr: str = "0.0.0.0") -> _Server:
    httpd = make_server(addr, port, app(), _Server, handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    return httpd
