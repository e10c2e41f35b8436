"""`volplane` command line: run, version, explain."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from . import __version__


def _run(args: argparse.Namespace) -> int:
    if args.kubeconfig:
        # Before the kubernetes package is imported: it reads $KUBECONFIG at import
        # time, and Kopf's login (login_via_client) uses that default.
        os.environ["KUBECONFIG"] = os.path.abspath(args.kubeconfig)
    from . import faults
    faults.install_clock_hook()  # e2e only: VOLPLANE_WALL_CLOCK_OFFSET_FILE
    import kopf

    from . import kopf_fastpath, kopf_patches, logs, runtime, serving
    from .context import Context, Options
    from .events import EventRecorder
    from .informers import Informers
    from .kube import Kube
    from .settings import reconnect_quiet
    from .watchhealth import WatchHealth

    logs.configure(args.log_format, args.log_level)
    log = logs.get("cli")
    if faults.wall_clock_offset() or faults._offset_file:
        log.warning("test hook: the wall clock follows VOLPLANE_WALL_CLOCK_OFFSET_FILE",
                    offset=faults.wall_clock_offset())
    kopf_patches.apply_unless_disabled(log)
    kopf_fastpath.apply_unless_disabled(log)
    try:
        enabled = runtime.parse_controllers(args.controllers)
    except ValueError as e:
        log.error("bad --controllers", error=str(e))
        return 2
    from .leader import default_identity
    identity = args.leader_elect_identity or default_identity()
    kube = Kube(args.kubeconfig, qps=args.kube_api_qps, burst=args.kube_api_burst,
                workers=args.api_workers,
                user_agent=f"volplane/{__version__} ({identity})")
    ctx = Context(kube=kube, informers=Informers(),
                  events=EventRecorder(kube, "persistentvolume-controller"),
                  options=Options(resync_period=args.resync_period, workers=args.workers,
                                  unmount_max_wait=args.unmount_max_wait,
                                  flex_volume_plugin_dir=args.flex_volume_plugin_dir or None,
                                  flex_call_timeout=args.flex_volume_call_timeout,
                                  flex_verify_period=args.flex_volume_verify_period))
    health = WatchHealth(budget=args.watch_reconnect_budget, quiet=reconnect_quiet())
    health.attach()
    elector = None
    if args.leader_elect:
        from .leader import LeaderElector, LeaseConfig
        elector = LeaderElector(kube, LeaseConfig(
            namespace=args.leader_elect_namespace, name=args.leader_elect_name,
            lease_duration=args.leader_elect_lease_duration,
            renew_deadline=args.leader_elect_renew_deadline,
            retry_period=args.leader_elect_retry_period,
            identity=identity))
    registry = runtime.build(ctx, enabled, elector, health=health,
                             watch_initial=args.watch_initial, watch_timeout=args.watch_timeout)
    if args.metrics_port:
        try:
            serving.serve(args.metrics_port, args.bind_address)
        except OSError as e:
            log.error("cannot serve metrics", port=args.metrics_port, error=str(e))
            return 2
    log.info("starting", version=__version__, controllers=enabled,
             metrics_port=args.metrics_port, health_port=args.health_port,
             identity=identity if args.leader_elect else None)
    liveness = (f"http://{args.bind_address}:{args.health_port}/healthz"
                if args.health_port else None)
    kopf.run(registry=registry, clusterwide=True, standalone=True,
             liveness_endpoint=liveness)
    log.info("stopped")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from .explain import explain_claim

    ns, _, name = args.claim.partition("/")
    if not name:
        ns, name = "default", ns
    text = asyncio.run(explain_claim(args.kubeconfig, ns, name))
    print(text)
    return 0


def _check(args: argparse.Namespace) -> int:
    """Gather, check, print; with --wait, re-gather until clean or the time is up."""
    import time

    from .check import gather, report
    from .check.invariants import INVARIANTS, Limits, Scope, check
    from .kube import ApiError, Kube

    only = [i.strip() for i in (args.only or "").split(",") if i.strip()]
    unknown = [i for i in only if i not in INVARIANTS]
    if unknown:
        print(f"unknown invariant(s): {', '.join(unknown)}; known: {', '.join(INVARIANTS)}",
              file=sys.stderr)
        return 2
    limits = Limits(orphan_grace=args.orphan_grace, stuck_after=args.stuck_after,
                    unmount_max_wait=args.unmount_max_wait)
    scope = Scope(exclude_namespaces=frozenset(args.exclude_namespace or ()))

    async def run():
        kube = Kube(args.kubeconfig, qps=50, burst=100, user_agent="volplane-check")
        deadline = time.monotonic() + max(0.0, args.wait)
        try:
            while True:
                snap = await gather.gather(kube)
                rep = check(snap, limits, scope, only or None)
                if rep.ok or time.monotonic() >= deadline:
                    return rep
                await asyncio.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
        finally:
            await kube.aclose()

    try:
        rep = asyncio.run(run())
    except (gather.GatherError, ApiError, OSError) as e:
        print(f"volplane check: cannot read the cluster: {e}", file=sys.stderr)
        return 2
    print(report.as_json(rep) if args.output == "json" else report.text(rep))
    return 0 if rep.ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="volplane", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the operator against the current kubeconfig")
    r.add_argument("--kubeconfig", default=None, help="kubeconfig path (default: in-cluster, "
                   "then $KUBECONFIG / ~/.kube/config)")
    r.add_argument("--controllers", default="*",
                   help="controllers to run, kube-controller-manager style: '*' for all, "
                        "'name' to enable, '-name' to disable (e.g. '*,-attachdetach')")
    r.add_argument("--metrics-port", type=int, default=8080, help="0 disables")
    r.add_argument("--health-port", type=int, default=8081, help="0 disables")
    r.add_argument("--bind-address", default="0.0.0.0")
    r.add_argument("--resync-period", type=float, default=15.0)
    r.add_argument("--workers", type=int, default=16, help="concurrent syncs per controller")
    r.add_argument("--unmount-max-wait", type=float,
                   default=float(os.environ.get("VOLPLANE_UNMOUNT_MAX_WAIT") or 360.0),
                   help="seconds a NotReady node may keep a volume in use before a forced "
                        "detach (upstream's maxWaitForUnmountDuration, default 6 min)")
    r.add_argument("--flex-volume-plugin-dir",
                   default="/usr/libexec/kubernetes/kubelet-plugins/volume/exec/",
                   help="FlexVolume drivers (<vendor>~<driver>/<driver>) the attach/detach "
                        "controller runs; '' disables FlexVolume")
    r.add_argument("--flex-volume-call-timeout", type=float, default=120.0,
                   help="seconds a FlexVolume driver call may run before it is killed")
    r.add_argument("--flex-volume-verify-period", type=float, default=60.0,
                   help="seconds between isattached checks of attached FlexVolumes")
    r.add_argument("--api-workers", type=int, default=16,
                   help="connections for API requests (watches have their own)")
    r.add_argument("--watch-initial", choices=["auto", "stream", "list"], default="auto",
                   help="how Kopf gets each kind's initial state: a streamed watch "
                        "(WatchList, Kubernetes >= 1.34), a paginated LIST, or auto (stream "
                        "when the server has it)")
    r.add_argument("--watch-timeout", type=int, default=300,
                   help="seconds the API server keeps a watch open; Kopf then watches again "
                        "from its last resourceVersion (no new listing)")
    r.add_argument("--watch-reconnect-budget", type=float, default=60.0,
                   help="seconds a watch stream may fail to reconnect before /healthz on "
                        "--health-port answers 500 (the kubelet then restarts the pod)")
    r.add_argument("--kube-api-qps", type=float, default=200.0)
    r.add_argument("--kube-api-burst", type=int, default=400)
    r.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=True,
                   help="take a coordination.k8s.io Lease before acting (default on)")
    r.add_argument("--leader-elect-namespace", default="volplane-system")
    r.add_argument("--leader-elect-name", default="volplane")
    r.add_argument("--leader-elect-lease-duration", type=float, default=15.0)
    r.add_argument("--leader-elect-renew-deadline", type=float, default=10.0)
    r.add_argument("--leader-elect-retry-period", type=float, default=2.0)
    r.add_argument("--leader-elect-identity", default=None,
                   help="unique per process (default: $POD_NAME, else the hostname plus a "
                        "random suffix, as kube-controller-manager does; never the bare "
                        "hostname, which two processes on one host would share)")
    r.add_argument("--log-format", choices=["json", "console"], default="json")
    r.add_argument("--log-level", default="INFO")
    r.set_defaults(fn=_run)

    v = sub.add_parser("version", help="print the version")
    v.set_defaults(fn=lambda a: print(f"volplane {__version__}") or 0)

    e = sub.add_parser("explain", help="why is a claim Pending? (read-only dry run)")
    e.add_argument("what", choices=["pvc"])
    e.add_argument("claim", help="NAMESPACE/NAME")
    e.add_argument("--kubeconfig", default=None)
    e.set_defaults(fn=_explain)

    k = sub.add_parser("check", help="verify volplane's invariants on a cluster (read-only); "
                       "exit 0 when all hold, 1 with a report when not")
    k.add_argument("--kubeconfig", default=None)
    k.add_argument("-o", "--output", choices=["text", "json"], default="text")
    k.add_argument("--stuck-after", type=float, default=120.0,
                   help="seconds a claim, PV or attachment may wait before it counts as stuck")
    k.add_argument("--orphan-grace", type=float, default=30.0,
                   help="age after which an allocation record without its PV is an orphan "
                        "(the pool provisioner's grace)")
    k.add_argument("--unmount-max-wait", type=float, default=360.0,
                   help="the operator's --unmount-max-wait (attachments of NotReady nodes)")
    k.add_argument("--exclude-namespace", action="append", metavar="NS",
                   help="do not judge objects in NS (or bound to them); repeatable. Objects "
                        "and namespaces labelled volplane.io/check-exclude are always skipped")
    k.add_argument("--only", default="", help="comma-separated invariant ids to run")
    k.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="re-check every 2 s until every invariant holds or SECONDS pass "
                        "(a busy cluster converges; the last report is printed)")
    k.set_defaults(fn=_check)

    from .node.main import add_parser as add_node_parser
    add_node_parser(sub)  # volplane node: the CSI node plugin (DaemonSet)

    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
