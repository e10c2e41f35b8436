"""Wires the controllers to Kopf: which resources are watched, and when controllers start.

Kopf runs the operator: start-up and clean-up ordering, signals, credentials,
the liveness endpoint and its probes. What feeds the caches depends on
`--watch-layer`:

- `reflector` (default): one paginated LIST+WATCH reflector per kind
  (reflector.py) feeds each Store. The caches are synced when every reflector
  has completed its first LIST.
- `kopf` (the design until 0.2, kept for comparison; see docs/benchmarks.md):
  `@kopf.index` and `@kopf.on.event`, which write nothing to the watched
  objects. Each watched kind gets:

- an indexer that upserts the object into our cache (Store). Kopf runs
  indexers for the initial listing *before* any handler, so when the first
  handler runs anywhere, every store is fully populated;
- an event handler that applies deletions (Kopf does not call indexers for
  DELETED events; it runs them for every other event, listing included).

  The "caches synced" barrier: Kopf holds every handler until all indexes are
populated. Namespaces always exist ("default", "kube-system"), so the first
namespace event handler call is proof that all stores are complete. Only then
do the controllers' loops start, so no controller decides on a partial view
(e.g. provisioning a new PV because the existing match was not listed yet).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import importlib
from dataclasses import dataclass

import kopf

from . import logs, settings
from .context import Context
from .reflector import Reflector, Reflectors
from .serving import state as readiness

log = logs.get("runtime")


@dataclass(frozen=True)
class Watch:
    group: str
    version: str
    plural: str
    kind: str


PVS = Watch("", "v1", "persistentvolumes", "PersistentVolume")
PVCS = Watch("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")
CLASSES = Watch("storage.k8s.io", "v1", "storageclasses", "StorageClass")

# name -> "module:Class", in start order. All are on by default ("*").
CONTROLLERS: dict[str, str] = {
    "pv-binder": "volplane.pv.controller:PVController",
    "pool-provisioner": "volplane.pools.provisioner:PoolProvisioner",
    "attachdetach": "volplane.attach.controller:AttachDetachController",
    "pool-attacher": "volplane.attach.pool_attacher:PoolAttacher",
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


def build(ctx: Context, enabled: list[str], elector=None) -> kopf.OperatorRegistry:
    """A Kopf registry that feeds the cache and starts `enabled` controllers.

    Followers (elector given, lease not held) keep their caches warm but run no
    controller, so a failover costs no re-list.
    """
    registry = kopf.OperatorRegistry()
    controllers = [load(n)(ctx) for n in enabled]
    watches: dict[str, Watch] = {}
    for c in controllers:
        for w in c.watches:
            watches[w.plural] = w
    reflectors = Reflectors()
    for w in watches.values():
        if ctx.options.watch_layer == "kopf":
            _register_watch(registry, ctx, w)
        else:
            store = ctx.cache.add_store(w.plural, w.kind)
            reflectors.add(Reflector(ctx.kube, store, group=w.group, version=w.version,
                                     plural=w.plural, kind=w.kind,
                                     page_size=ctx.options.list_page_size,
                                     watch_timeout=ctx.options.watch_timeout))
    tasks: list[asyncio.Task] = []

    @kopf.on.login(registry=registry)
    def login(**kwargs):
        # A custom registry has none of Kopf's default login handlers; use the
        # kubernetes client's (in-cluster, then $KUBECONFIG), same as our writes.
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_):
        _configure(settings)
        ctx.events.start()
        for r in reflectors.items:
            tasks.append(_guarded(r.run(), f"reflector-{r.plural}"))
        if reflectors.items:
            async def synced_when_listed():
                await reflectors.wait_synced()
                ctx.synced.set()
            tasks.append(_guarded(synced_when_listed(), "reflectors-synced"))

        async def start_when_synced():
            readiness.leader_election = elector is not None
            readiness.controllers = {c.name: False for c in controllers}
            if elector is not None:
                await elector.ensure_namespace()
                tasks.append(_guarded(elector.run(), "leader-election"))
            await ctx.synced.wait()
            readiness.synced = True
            _release_memory()
            if elector is not None:
                await elector.leading.wait()
                readiness.leading = True
            counts = {p: len(ctx.cache.stores[p]) for p in watches}
            log.info("caches synced", controllers=enabled, objects=counts)
            for c in controllers:
                tasks.append(_guarded(c.run(), f"controller-{c.name}"))
                readiness.controllers[c.name] = True

        tasks.append(_guarded(start_when_synced(), "start-when-synced"))

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_):
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await ctx.events.stop()
        await ctx.kube.aclose()

    @kopf.on.probe(registry=registry, id="watches")
    def watches_probe(**_):
        return reflectors.status()

    if ctx.options.watch_layer == "kopf":
        @kopf.on.event("", "v1", "namespaces", registry=registry)
        async def barrier(**_):
            if not ctx.synced.is_set():
                ctx.synced.set()

    return registry


def _release_memory() -> None:
    """Give the initial LIST's transient memory back to the OS (glibc only).

    The pages of JSON are decoded and dropped one at a time, but glibc keeps the
    freed heap; malloc_trim(0) returns the unused pages. Best effort: a no-op
    elsewhere (musl, macOS).
    """
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
            import os
            os._exit(70)

    return asyncio.create_task(run(), name=name)


def _configure(s: kopf.OperatorSettings) -> None:
    settings.configure(s)


def _register_watch(registry: kopf.OperatorRegistry, ctx: Context, w: Watch) -> None:
    store = ctx.cache.add_store(w.plural, w.kind)

    @kopf.index(w.group, w.version, w.plural, registry=registry, id=f"cache-{w.plural}")
    async def indexer(body, **_):
        store.upsert(body)
        return {}

    @kopf.on.event(w.group, w.version, w.plural, registry=registry, id=f"watch-{w.plural}")
    async def on_event(type, body, **_):
        # Kopf runs the indexer above for every other event, before handlers.
        if type == "DELETED":
            store.deleted(body)
