"""The wiring: which controllers run, what Kopf watches for them, and when they start.

runtime loads controllers; controllers never import runtime (they name the kinds they
read from kinds.py). Kopf runs the operator: start-up and clean-up ordering, signals,
credentials (its login), the liveness endpoint, and the watch layer itself: the
listers, derived indexes and event handlers of every kind the enabled controllers
declared (informers.py).

The "caches synced" barrier is Kopf's own guarantee that no handler runs before every
index is populated: the first call of the handler of the ``default`` namespace (which
always exists) sets ``ctx.synced``. Only then do the controllers' loops start, so no
controller decides on a partial view (e.g. provisioning a new PV because the existing
match was not listed yet).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import importlib
import os
from typing import Any

import kopf

from . import logs, settings
from .context import Context
from .informers import NAMESPACES, handler_id
from .serving import state as readiness
from .settings import initial_streaming
from .watchhealth import WatchHealth

log = logs.get("runtime")

# name -> "module:Class", in start order. All are on by default ("*").
CONTROLLERS: dict[str, str] = {
    "pv-binder": "volplane.pv.controller:PVController",
    "pool-provisioner": "volplane.pools.provisioner:PoolProvisioner",
    "attachdetach": "volplane.attach.controller:AttachDetachController",
    "pool-attacher": "volplane.pools.attacher:PoolAttacher",
}


def parse_controllers(spec: str, known=CONTROLLERS) -> list[str]:
    """kube-controller-manager's --controllers syntax: '*', 'name', '-name'."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    enabled: set[str] = set()
    disabled: set[str] = set()
    for item in items:
        name = item.lstrip("-")
        if item == "*":
            enabled |= set(known)
            continue
        if name not in known:
            raise ValueError(f"unknown controller {name!r}; known: {', '.join(known)}")
        (disabled if item.startswith("-") else enabled).add(name)
    return [n for n in known if n in enabled and n not in disabled]


def load(name: str):
    mod, cls = CONTROLLERS[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def build(ctx: Context, enabled: list[str], elector=None, *, health: WatchHealth | None = None,
          watch_initial: str = "auto", watch_timeout: int = 300) -> kopf.OperatorRegistry:
    """A Kopf registry that feeds the informers and starts `enabled` controllers.

    Followers (elector given, lease not held) keep their caches warm but run no
    controller, so a failover costs no re-list.
    """
    registry = kopf.OperatorRegistry()
    controllers = [load(n)(ctx) for n in enabled]
    _inject_plugins(controllers)
    informers = ctx.informers
    informers.register(registry)
    kinds = list(informers.kinds.values())
    if health is not None:
        health.watch(kinds)
        for kind in kinds:
            informers.listen(kind, lambda *_a, _p=kind.plural: health.alive(_p))
    tasks: list[asyncio.Task] = []
    _register_lifecycle(registry, ctx, kinds, tasks, watch_initial, watch_timeout)
    start = functools.partial(_start_when_synced, ctx, enabled, controllers, elector, tasks)
    _register_start(registry, start)
    _register_barrier(registry, ctx)
    _register_probe(registry, health)
    return registry


def _register_lifecycle(registry: kopf.OperatorRegistry, ctx: Context, kinds: list,
                        tasks: list[asyncio.Task], watch_initial: str,
                        watch_timeout: int) -> None:
    @kopf.on.login(registry=registry)
    def login(**kwargs: Any):
        # A custom registry has none of Kopf's default login handlers; use the
        # kubernetes client's (in-cluster, then $KUBECONFIG), same as our writes.
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **kwargs: Any):
        streaming = await initial_streaming(ctx.kube, watch_initial)
        _configure(settings, [*kinds, NAMESPACES], streaming, watch_timeout)
        ctx.informers.bind(kwargs)  # Kopf's (still empty) indexes: populated before handlers
        ctx.events.start()
        log.info("watching", kinds=[k.plural for k in kinds],
                 initial="stream" if streaming else "list")

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any):
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await ctx.events.stop()
        await ctx.kube.aclose()


def _register_start(registry: kopf.OperatorRegistry, start) -> None:
    @kopf.on.startup(registry=registry, id="start-controllers")
    async def start_controllers(settings: kopf.OperatorSettings, **_: Any):
        start(settings.queueing.idle_timeout)


def _start_when_synced(ctx: Context, enabled: list[str], controllers: list, elector,
                       tasks: list[asyncio.Task], idle_timeout: float) -> None:
    async def start_when_synced():
        readiness.leader_election = elector is not None
        readiness.controllers = {c.name: False for c in controllers}
        if elector is not None:
            await elector.ensure_namespace()
            elector.ready = ctx.synced.is_set  # only a warm replica takes the Lease
            tasks.append(_guarded(elector.run(), "leader-election"))
        await ctx.synced.wait()
        readiness.synced = True
        tasks.append(_guarded(_release_memory_later(idle_timeout), "release-memory"))
        if elector is not None:
            await elector.leading.wait()
            readiness.leading = True
        counts = {p: len(lister) for p, lister in ctx.informers.listers.items()}
        log.info("caches synced", controllers=enabled, objects=counts)
        for c in controllers:
            tasks.append(_guarded(c.run(), f"controller-{c.name}"))
            readiness.controllers[c.name] = True

    tasks.append(_guarded(start_when_synced(), "start-when-synced"))


def _register_barrier(registry: kopf.OperatorRegistry, ctx: Context) -> None:
    @kopf.on.event(NAMESPACES.group, NAMESPACES.version, NAMESPACES.plural, registry=registry,
                   id=handler_id("caches-synced"))
    async def barrier(**_: Any):
        if not ctx.synced.is_set():
            ctx.synced.set()


def _register_probe(registry: kopf.OperatorRegistry, health: WatchHealth | None) -> None:
    @kopf.on.probe(registry=registry, id="watches", errors=kopf.ErrorsMode.PERMANENT)
    async def watches_probe(**_: Any):
        if health is None:
            return {}
        dead = health.dead()
        if dead:
            # Kopf answers /healthz with 500 when a probe fails: the kubelet restarts us.
            raise kopf.PermanentError(
                f"watch streams failing for more than {health.budget:g} s: {', '.join(dead)}")
        return health.report()


def _inject_plugins(controllers: list) -> None:
    """Hand the volume plugins of the enabled controllers (``plugins``) to the PV
    controller (``use_plugins``): the pool provisioner is one such plugin."""
    plugins = [p for c in controllers for p in getattr(c, "plugins", ())]
    hosts = [c for c in controllers if hasattr(c, "use_plugins")]
    for host in hosts:
        host.use_plugins(plugins)
    if plugins and not hosts:
        log.warning("no PV controller: its volume plugins are idle (enable pv-binder)",
                    plugins=[p.name for p in plugins])


def _configure(s: kopf.OperatorSettings, kinds, streaming: bool, watch_timeout: int) -> None:
    settings.configure(s, kinds, initial_streaming=streaming, server_timeout=watch_timeout)


async def _release_memory_later(idle_timeout: float) -> None:
    """Once Kopf's per-object workers of the initial listing have ended (idle_timeout
    after their last event; none with the fast path, whose held initial events are
    released when the barrier opens), give the memory they held back to the OS (glibc only:
    malloc_trim returns freed heap pages; a no-op elsewhere)."""
    await asyncio.sleep(idle_timeout + 2.0)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _guarded(coro, name: str) -> asyncio.Task:
    """A task whose crash is logged, not silently dropped. A controller loop that dies
    is a bug; the process exits so that its supervisor restarts it from a clean state."""

    async def run():
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("task crashed", task=name, error=str(e))
            os._exit(70)

    return asyncio.create_task(run(), name=name)
