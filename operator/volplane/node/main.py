"""`volplane node`: the CSI node plugin of pool.volplane.io, its node agent, and the
kubelet registration and health endpoints, in one process (one DaemonSet container).

    main thread      signals; waits
    gRPC threads     CSI Identity + Node on --csi-address (unix socket),
                     kubelet plugin registration on --registration-dir/<driver>-reg.sock
    agent thread     asyncio loop: the node agent (backing files, pool capacity) and
                     the Kopf operator embedded in it that feeds its caches (watch.py)
    http thread      /healthz (a CSI Probe through the socket, as the livenessprobe
                     sidecar does) and /metrics on --health-port
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import threading
from concurrent import futures

from .. import logs

DRIVER = "pool.volplane.io"


def add_parser(sub) -> None:
    n = sub.add_parser("node", help="run the CSI node plugin and node agent (DaemonSet)")
    n.add_argument("--csi-address", default="/csi/csi.sock",
                   help="unix socket to serve CSI on")
    n.add_argument("--node-id", default=os.environ.get("NODE_NAME") or socket.gethostname(),
                   help="this node's name (default $NODE_NAME)")
    n.add_argument("--backing-root", default="/var/lib/volplane",
                   help="the only directory backing files may live in")
    n.add_argument("--state-dir", default=None,
                   help="per-volume state (default: <dir of --csi-address>/volumes)")
    n.add_argument("--registration-dir", default="",
                   help="kubelet's plugins_registry dir as mounted here; serve the "
                        "registration socket there (empty: do not register)")
    n.add_argument("--kubelet-registration-path",
                   default=f"/var/lib/kubelet/plugins/{DRIVER}/csi.sock",
                   help="the CSI socket's path on the host, told to the kubelet")
    n.add_argument("--health-port", type=int, default=9808,
                   help="/healthz and /metrics (0 disables)")
    n.add_argument("--bind-address", default="0.0.0.0")
    n.add_argument("--agent", action=argparse.BooleanOptionalAction, default=True,
                   help="run the node agent (needs API access)")
    n.add_argument("--kubeconfig", default=None)
    n.add_argument("--max-volumes", type=int, default=0,
                   help="NodeGetInfo max_volumes_per_node (0: the slots of the File "
                        "pools reaching this node, from the agent)")
    n.add_argument("--agent-period", type=float, default=10.0)
    n.add_argument("--delete-grace", type=float, default=30.0,
                   help="seconds a backing file must look orphaned before it is deleted")
    n.add_argument("--log-format", choices=["json", "console"], default="json")
    n.add_argument("--log-level", default="INFO")
    n.set_defaults(fn=run)


def _unix_server(path: str, workers: int):
    import grpc

    if len(os.fsencode(path)) > 107:
        raise SystemExit(f"socket path {path} is longer than the 107 bytes a unix socket "
                         "address holds")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        os.unlink(path)  # a socket left by a previous run
    except FileNotFoundError:
        pass
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_insecure_port(f"unix://{path}")
    return server


def _probe(address: str, timeout: float = 3.0) -> tuple[bool, str]:
    import grpc

    from .gen import csi_pb2, csi_pb2_grpc
    try:
        with grpc.insecure_channel(f"unix://{address}") as ch:
            r = csi_pb2_grpc.IdentityStub(ch).Probe(csi_pb2.ProbeRequest(), timeout=timeout)
    except grpc.RpcError as e:
        return False, f"Probe failed: {e.code().name}: {e.details()}"
    if r.HasField("ready") and not r.ready.value:
        return False, "Probe: not ready"
    return True, "ok"


def _serve_health(port: int, addr: str, csi_address: str, registration) -> None:
    from wsgiref.simple_server import make_server

    from prometheus_client import make_wsgi_app

    from ..serving import _Quiet, _Server

    metrics = make_wsgi_app()

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/healthz":
            ok, why = _probe(csi_address)
            if ok and registration is not None and registration.error:
                ok, why = False, f"kubelet registration failed: {registration.error}"
            start_response("200 OK" if ok else "500 Internal Server Error",
                           [("Content-Type", "text/plain")])
            return [why.encode() + b"\n"]
        return metrics(environ, start_response)

    httpd = make_server(addr, port, app, _Server, handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, name="health", daemon=True).start()


def run(args: argparse.Namespace) -> int:
    logs.configure(args.log_format, args.log_level)
    log = logs.get("node")
    from . import registration as reg
    from . import service
    from .ops import NodeOps, StateStore
    from .system import System

    system = System()
    missing = system.missing_tools()
    if missing:
        log.warning("tools missing: volumes cannot be staged", missing=missing)
    state_dir = args.state_dir or os.path.join(os.path.dirname(args.csi_address), "volumes")
    holder = _start_agent(args, system, log) if args.agent else {}

    def pool_backing(pool: str):
        agent = holder.get("agent")
        return agent.backing_of(pool) if agent is not None else None

    ops = NodeOps(system, StateStore(state_dir), args.backing_root, pool_backing)

    def max_volumes() -> int:
        if args.max_volumes:
            return args.max_volumes
        agent = holder.get("agent")
        if agent is None:
            return 0
        agent.first_round.wait(timeout=15.0)  # registration right after start-up
        return agent.max_volumes()

    def ready() -> bool:
        return not system.missing_tools(("losetup", "mount"))

    server = _unix_server(args.csi_address, workers=8)
    service.add_to_server(server, service.Identity(ready),
                          service.Node(ops, service.NodeInfo(args.node_id, max_volumes)))
    server.start()
    log.info("serving CSI", driver=DRIVER, address=args.csi_address, node=args.node_id,
             backing_root=args.backing_root, state_dir=state_dir)

    registration = (reg.Registration(DRIVER, args.kubelet_registration_path)
                    if args.registration_dir else None)
    # /healthz first: once the kubelet can see the registration socket, all is served.
    if args.health_port:
        _serve_health(args.health_port, args.bind_address, args.csi_address, registration)
    reg_path = os.path.join(args.registration_dir, f"{DRIVER}-reg.sock")
    reg_server = _serve_registration(reg_path, registration, log)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping")
    _stop_agent(holder)
    if reg_server is not None:
        reg_server.stop(grace=1).wait()
        try:
            os.unlink(reg_path)
        except OSError:
            pass
    server.stop(grace=5).wait()
    return 0


def _serve_registration(path: str, registration, log):
    """The kubelet plugin registration socket (None: not registering)."""
    if registration is None:
        return None
    from . import registration as reg

    server = _unix_server(path, workers=2)
    reg.add_to_server(server, registration)
    server.start()
    log.info("serving kubelet registration", socket=path)
    return server


def _start_agent(args, system, log):
    from .. import kopf_fastpath, kopf_patches
    from ..kube import Kube
    from .agent import Agent

    kopf_patches.apply_unless_disabled(log)  # as the operator: Kopf's start-up with many PVs
    kopf_fastpath.apply_unless_disabled(log)  # and its per-event cost
    holder: dict = {}
    ready = threading.Event()
    stopping = threading.Event()

    def main() -> None:
        async def go():
            kube = Kube(args.kubeconfig, qps=20, burst=40, workers=4,
                        user_agent=f"volplane-node/{args.node_id}")
            holder["agent"] = Agent(kube, args.node_id, system, root=args.backing_root,
                                    period=args.agent_period, grace=args.delete_grace)
            if stopping.is_set():
                holder["agent"].stop()
            ready.set()
            try:
                await holder["agent"].run()
            finally:
                await kube.aclose()

        while not stopping.is_set():  # the agent must not take the CSI server down with it
            try:
                asyncio.run(go())
            except SystemExit as e:
                log.error("node agent cannot start", error=str(e))
                ready.set()
                return
            except Exception as e:
                log.exception("node agent crashed; restarting", error=str(e))
            else:
                if not stopping.is_set():
                    log.warning("node agent's watches ended; restarting")
            stopping.wait(5.0)

    holder["stopping"] = stopping
    holder["thread"] = threading.Thread(target=main, name="agent", daemon=True)
    holder["thread"].start()
    ready.wait(timeout=30.0)
    return holder


def _stop_agent(holder: dict, timeout: float = 10.0) -> None:
    """Let the agent close its watches (Kopf's stop flag), then go on without it."""
    if "thread" not in holder:
        return
    holder["stopping"].set()
    agent = holder.get("agent")
    if agent is not None:
        agent.stop()
    holder["thread"].join(timeout)
