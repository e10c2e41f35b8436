"""The second Kopf patch: indexers and event handlers run inline in Kopf's watcher.

Why it is needed (measured in docs/benchmarks.md). For every watch event Kopf spawns or
feeds a per-object worker task, builds a ``Body`` with three views, a ``Patch``, three
object loggers, recalls the object's memory, enters the error throttler, and then, for
every indexer and every event handler, a cause whose keyword arguments (every view of
the body, every index of the operator) are all built for every call, plus per-call
``State``/``Outcome`` bookkeeping. That is ~1-1.5 ms of CPU per object on the bench
machine; volplane's own handlers are ~6 % of it. No setting or public extension point
changes it.

What this does instead, for a resource kind whose registered handlers are only
``@kopf.index`` and ``@kopf.on.event`` handlers (no on.create/update/delete/resume/field,
no daemons or timers, no admission webhooks), each ``async``, without filters (labels,
annotations, when, field, value), and with no timeout or retry limit: Kopf's
``queueing.watcher`` is replaced for that kind by ``FastWatcher``. It reads Kopf's own
watch stream (``watching.infinite_watch``: LIST or streamed initial listing, pagination,
reconnects, resourceVersions, the LISTED bookmark; unchanged) and for every event, in the
watcher itself (no per-object task):

- indexes it as ``indexing.index_resource`` does: a DELETED event discards the object
  from every index of the operator; otherwise every indexer is called and its result is
  stored under the same key (namespace, name, uid) in Kopf's own ``OperatorIndexers``
  (a Mapping result merged as Kopf does, any other value under ``None``); a result of
  None leaves the object's entries as they were; an error is logged with Kopf's
  message, and discards the object's entries only when Kopf would (PermanentError,
  TemporaryError, or any error of a handler declared with errors=PERMANENT/TEMPORARY);
- then calls the event handlers, in registration order, unless the operator is not yet
  indexed: until every index of the operator is populated (Kopf's ``operator_indexed``
  toggles: every kind's LISTED bookmark) events are held in arrival order. As in Kopf,
  an object's first held event is indexed at once and its later ones only when their
  turn comes after the barrier opens (Kopf's per-object worker indexes the next event
  only after the handlers of the previous one ran). A held event keeps its whole raw
  body, unless every event handler of the kind declared what it reads of it
  (``reads_when_held``: volplane's read name, namespace, uid and resourceVersion); then
  the initial listing's bodies are not all alive at once. Errors are logged, the stream
  goes on;
- removes Kopf's finalizer from an object that carries it, and stores a handler's
  non-None result into the object's status, through Kopf's own patching (as
  ``process_resource_causes`` / ``application.apply`` do). volplane does neither.

Each handler gets only the keyword arguments its signature names (introspected once:
``body``, ``spec``, ``meta``, ``status``, ``name``, ``namespace``, ``uid``, ``labels``,
``annotations``, ``memo``, ``logger``, ``patch``, ``resource``, ``param``, ``retry``,
``started``, ``runtime``, ``type`` and ``event`` for event handlers, and any index by its
id), built only when named. A catch-all ``**kwargs`` whose name starts with ``_`` (unused,
as in volplane's handlers) gets nothing more; any other catch-all gets every argument, as
Kopf gives it. Per-object memos are copies of the operator's memo as in Kopf, kept here
(not in Kopf's per-object memories, which hold a throttler and a daemons record each).

Not reproduced (so such resources keep Kopf's own path or it is said here): sync
handlers (Kopf runs them in threads), Kopf's DEBUG "is invoked"/INFO "succeeded" lines
per handler call (Kopf's loggers are at WARNING in volplane), the retry delay after a
TemporaryError (the indexer is called again on the next event).

Narrow and pinned: one module attribute (``queueing.watcher``) is replaced, and only on
the Kopf version in pyproject.toml whose source of every function whose behaviour this
reproduces hashes to PINNED_DIGEST; otherwise nothing is patched and the operator says so
at start. ``tests/unit/test_kopf_fastpath.py`` fails when the pinned Kopf changes.
``VOLPLANE_KOPF_FASTPATH=0`` turns it off.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import datetime
import functools
import hashlib
import inspect
import os
from collections.abc import Callable
from typing import Any

from kopf._cogs.aiokits import aiotoggles
from kopf._cogs.clients import watching
from kopf._cogs.structs import bodies, finalizers, patches
from kopf._core.actions import application, execution, invocation, loggers, progression
from kopf._core.engines import indexing, posting
from kopf._core.intents import causes
from kopf._core.intents import handlers as khandlers
from kopf._core.reactor import inventory, processing, queueing

from . import logs
from .kopf_patches import kopf_version

PATCHED_VERSION = "1.45.2"
# sha256 of the joined source of everything whose behaviour FastWatcher reproduces, in
# the pinned Kopf, before patching (see _PINNED).
PINNED_DIGEST = "fc2127cd2ec0edb176e98da65bd0439058b2841f37b1ebba7bcec42496a5b483"

_ORIGINAL_WATCHER = queueing.watcher

_PINNED: tuple[Any, ...] = (
    queueing.watcher, queueing.worker, queueing.get_uid,
    processing.process_resource_event, processing.process_resource_causes,
    processing._detect_causes, processing.process_watching_cause,
    indexing.index_resource, indexing.OperatorIndexers, indexing.OperatorIndexer,
    causes.BaseCause, causes.ResourceCause, causes.IndexingCause, causes.WatchingCause,
    execution.Cause, execution.execute_handlers_once, execution.execute_handler_once,
    execution.invoke_handler, invocation.invoke, inventory.ResourceMemories.recall,
    progression.HandlerState.from_scratch, progression.deliver_results,
)

log = logs.get("kopf_fastpath")
RELEASE_BATCH = 500  # held events handled between two yields to the event loop


def original_source_digest() -> str:
    src = "".join(inspect.getsource(obj) for obj in _PINNED)
    return hashlib.sha256(src.encode()).hexdigest()


def applicable() -> bool:
    return kopf_version() == PATCHED_VERSION and original_source_digest() == PINNED_DIGEST


def apply() -> bool:
    """Patch (idempotent); False when this Kopf is not the one the patch was made for."""
    if not applicable():
        return False
    queueing.watcher = watcher
    return True


def revert() -> None:
    """Kopf's own watcher back (benchmarks measure what the fast path buys)."""
    queueing.watcher = _ORIGINAL_WATCHER


def apply_unless_disabled(log: Any) -> None:
    """apply(), unless VOLPLANE_KOPF_FASTPATH=0; says so when not applied."""
    if os.environ.get("VOLPLANE_KOPF_FASTPATH", "1") == "0":
        log.warning("Kopf's event fast path disabled (VOLPLANE_KOPF_FASTPATH=0)")
    elif not apply():
        log.warning("Kopf's event fast path not applied (unexpected Kopf version): "
                    "every watch event takes Kopf's per-object path (slower, more memory)",
                    expected=PATCHED_VERSION)


# --- what a held event keeps -------------------------------------------------------------

HELD_ATTR = "_volplane_reads_when_held"


def reads_when_held(trim: Callable[[dict], dict]) -> Callable[[Any], Any]:
    """Declare, on an event handler, what it reads of an event held until the barrier
    opens: ``trim(raw_event)`` returns a raw event with just that. Every event of the
    initial listing is held (it is indexed at once, its handlers wait for every kind's
    listing); without the declaration each holds its whole body, so the peak memory of a
    start-up holds every object of the cluster. With it (on every event handler of the
    kind, the same function) a held event keeps what `trim` returns. The handler must
    then read nothing else of ``event``/``body`` (its unit test says so)."""
    def mark(fn: Any) -> Any:
        setattr(fn, HELD_ATTR, trim)
        return fn
    return mark


# --- which resources take the fast path ------------------------------------------------

# The keyword arguments Kopf gives an indexer (IndexingCause) and an event handler
# (WatchingCause), plus invoke_handler's own; indexes are added by their ids.
RESOURCE_KWARGS = frozenset({
    "logger", "memo", "resource", "patch", "body", "spec", "meta", "status", "uid", "name",
    "namespace", "labels", "annotations", "param", "retry", "started", "runtime"})
WATCHING_KWARGS = RESOURCE_KWARGS | {"type", "event"}


@functools.cache
def _signature(fn: Callable[..., Any]) -> tuple[tuple[str, ...], bool, bool]:
    """(the keyword arguments `fn` names, whether it has a catch-all that wants
    everything, whether it can be called with keywords only)."""
    names: list[str] = []
    wants_all = False
    ok = True
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            wants_all = not p.name.startswith("_")
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.append(p.name)
        elif p.kind is p.POSITIONAL_ONLY and p.default is p.empty:
            ok = False
    return tuple(names), wants_all, ok


def _plain(handler: khandlers.ResourceHandler) -> bool:
    if not (handler.labels is None and handler.annotations is None and handler.when is None
            and handler.field is None and handler.value is None):
        return False
    if handler.timeout is not None or handler.retries is not None:
        return False
    if not invocation.is_async_fn(handler.fn):
        return False
    return _signature(handler.fn)[2]


def plan_for(registry: Any, resource: Any) -> tuple[list, list] | None:
    """The indexers and event handlers of `resource` if it can take the fast path."""
    if (registry._changing.has_handlers(resource=resource)
            or registry._spawning.has_handlers(resource=resource)
            or registry._webhooks.has_handlers(resource=resource)):
        return None
    idx = [h for h in registry._indexing.get_all_handlers()
           if h.selector is not None and h.selector.check(resource)]
    evs = [h for h in registry._watching.get_all_handlers()
           if h.selector is not None and h.selector.check(resource)]
    if not all(_plain(h) for h in idx + evs):
        return None
    return idx, evs


async def watcher(*, processor: Any, **kwargs: Any) -> None:
    """Kopf's ``queueing.watcher``, or FastWatcher for the resources it can take."""
    fw = FastWatcher.for_processor(processor, kwargs.get("settings"))
    if fw is None:
        await _ORIGINAL_WATCHER(processor=processor, **kwargs)
    else:
        await fw.run(**kwargs)


# --- the fast path ----------------------------------------------------------------------


class _Event:
    """One event being handled: its raw dict, and the views built from it on demand."""

    __slots__ = ("raw", "type", "obj", "_body", "_patch", "memo")

    def __init__(self, raw: dict, memo: Any) -> None:
        self.raw = raw
        self.type = raw["type"]
        self.obj = raw["object"]
        self._body: bodies.Body | None = None
        self._patch: patches.Patch | None = None
        self.memo = memo

    @property
    def body(self) -> bodies.Body:
        if self._body is None:
            self._body = bodies.Body(self.obj)
        return self._body

    @property
    def patch(self) -> patches.Patch:
        if self._patch is None:
            self._patch = patches.Patch(body=self.body)
        return self._patch


class FastWatcher:
    """One resource kind's watch stream, indexed and handled inline (see the module doc)."""

    def __init__(self, *, registry: Any, settings: Any, indexers: indexing.OperatorIndexers,
                 memobase: Any, event_queue: Any, resource: Any,
                 indexing_handlers: list, watching_handlers: list) -> None:
        self.registry = registry
        self.settings = settings
        self.indexers = indexers
        self.memobase = memobase
        self.event_queue = event_queue
        self.resource = resource
        self.indexing_handlers = indexing_handlers
        self.watching_handlers = watching_handlers
        self.finalizer = settings.persistence.finalizer
        self.memos: dict[str, Any] = {}
        # what each handler is called with, worked out once (handler id -> names)
        # what each handler is called with, worked out once
        self._indexers = [(h, self._getters(h, RESOURCE_KWARGS)) for h in indexing_handlers]
        self._watchers = [(h, self._getters(h, WATCHING_KWARGS)) for h in watching_handlers]
        self.needs_memo = any(n == "memo" for _, g in self._indexers + self._watchers
                              for n, _ in g)
        trims = {getattr(h.fn, HELD_ATTR, None) for h in watching_handlers}
        self._trim: Callable[[dict], dict] | None = (
            trims.pop() if len(trims) == 1 and watching_handlers else None)
        # events waiting for the barrier: (raw event, indexed already, its memo if so)
        self._held: collections.deque[tuple[dict, bool, Any]] | None = None
        self._held_uids: set[str] = set()
        self._lock = asyncio.Lock()
        self._error: BaseException | None = None

    @classmethod
    def for_processor(cls, processor: Any, settings: Any) -> FastWatcher | None:
        if not isinstance(processor, functools.partial):
            return None
        if processor.func is not processing.process_resource_event:
            return None
        kw = processor.keywords
        resource = kw.get("resource")
        if resource is None or settings is None:
            return None
        plan = plan_for(kw["registry"], resource)
        if plan is None:
            log.info("Kopf's own event path: the kind has handlers the fast path does not take",
                     resource=str(resource))
            return None
        log.info("Kopf event fast path", resource=str(resource),
                 indexers=[h.id for h in plan[0]], handlers=[h.id for h in plan[1]])
        return cls(registry=kw["registry"], settings=settings, indexers=kw["indexers"],
                   memobase=kw["memobase"], event_queue=kw["event_queue"], resource=resource,
                   indexing_handlers=plan[0], watching_handlers=plan[1])

    # -- the stream --
    async def run(self, *, namespace: Any, settings: Any, resource: Any,
                  operator_paused: aiotoggles.ToggleSet | None = None,
                  operator_indexed: aiotoggles.ToggleSet | None = None,
                  resource_indexed: aiotoggles.Toggle | None = None) -> None:
        self._set_context()
        this = asyncio.current_task()
        opener: asyncio.Task | None = None
        if operator_indexed is not None and not operator_indexed.is_on():
            self._held = collections.deque()
            opener = asyncio.create_task(self._open_when_indexed(operator_indexed, this))
        try:
            stream = watching.infinite_watch(settings=settings, resource=resource,
                                             namespace=namespace, operator_paused=operator_paused)
            async for raw_event in stream:
                if raw_event is watching.Bookmark.LISTED:
                    if operator_indexed is not None and resource_indexed is not None:
                        await operator_indexed.drop_toggle(resource_indexed)
                if isinstance(raw_event, watching.Bookmark):
                    continue
                if raw_event.get("type") == "BOOKMARK":
                    continue
                if self._held is None or not await self._held_back(raw_event,
                                                                   operator_indexed):
                    await self.handle(raw_event)
        except asyncio.CancelledError:
            if self._error is None:
                raise
            raise RuntimeError("Event processing has failed with an unrecoverable error. "
                               "This seems to be a bug of volplane's Kopf fast path. "
                               "The operator will stop to prevent damage.") from self._error
        finally:
            if opener is not None:
                opener.cancel()

    async def _held_back(self, raw_event: dict,
                         operator_indexed: aiotoggles.ToggleSet | None) -> bool:
        """Before the barrier opens: hold the event (True); once it is open, handle what
        was held and let the event through (False)."""
        async with self._lock:
            if self._held is None:
                return False
            if operator_indexed is None or not operator_indexed.is_on():
                await self._hold(raw_event)
                return True
            await self._release()
            return False

    async def _open_when_indexed(self, operator_indexed: aiotoggles.ToggleSet,
                                 watcher_task: asyncio.Task | None) -> None:
        self._set_context()
        try:
            await operator_indexed.wait_for(True)
            async with self._lock:
                if self._held is not None:
                    await self._release()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a bug here: stop the watcher as a failed worker would
            log.exception("event processing failed with an unrecoverable error",
                          resource=str(self.resource))
            self._error = e
            if watcher_task is not None:
                watcher_task.cancel()

    def _set_context(self) -> None:
        posting.event_queue_loop_var.set(asyncio.get_running_loop())
        posting.event_queue_var.set(self.event_queue)

    async def _hold(self, raw_event: dict) -> None:
        """Before the barrier: an object's first event is indexed now (it populates the
        index), its later events wait unindexed, as they wait in Kopf's worker queue."""
        assert self._held is not None
        uid = queueing.get_uid(raw_event)
        if uid in self._held_uids:
            self._held.append((raw_event, False, None))
        else:
            self._held_uids.add(uid)
            memo = self._memo(raw_event)
            await self._index_async(_Event(raw_event, memo))
            self._held.append((self._trimmed(raw_event), True, memo))

    def _trimmed(self, raw_event: dict) -> dict:
        """What an indexed event keeps while it waits: all of it, unless every event
        handler of the kind declared what it reads (``reads_when_held``). Never trimmed:
        an object that carries Kopf's finalizer (the housekeeping reads it)."""
        if self._trim is None:
            return raw_event
        fins = raw_event["object"].get("metadata", {}).get("finalizers")
        if fins and self.finalizer in fins:
            return raw_event
        return self._trim(raw_event)

    async def _release(self) -> None:
        """Handle what was held, in arrival order (under the lock: a new event waits)."""
        held = self._held or collections.deque()
        done = 0
        while held:
            raw_event, indexed, memo = held.popleft()
            await self.handle(raw_event, indexed=indexed, memo=memo)
            done += 1
            if done % RELEASE_BATCH == 0:
                await asyncio.sleep(0)  # probes and other kinds' streams go on meanwhile
        self._held, self._held_uids = None, set()

    # -- one event --
    def _memo(self, raw_event: dict) -> Any:
        if not self.needs_memo:
            return None
        uid = queueing.get_uid(raw_event)
        memo = self.memos.get(uid)
        if memo is None:
            memo = self.memos[uid] = copy.copy(self.memobase)
        if raw_event["type"] == "DELETED":
            del self.memos[uid]
        return memo

    async def handle(self, raw_event: dict, *, indexed: bool = False, memo: Any = None) -> None:
        ev = _Event(raw_event, memo if indexed else self._memo(raw_event))
        if not indexed and self.indexing_handlers:
            await self._index_async(ev)
        for h, getters in self._watchers:
            await self._watch(h, getters, ev)
        if ev.type != "DELETED":
            await self._housekeeping(ev)

    async def _index_async(self, ev: _Event) -> None:
        if ev.type == "DELETED":
            self._discard(ev.obj)
            return
        for h, getters in self._indexers:
            try:
                result = await h.fn(**{n: g(ev) for n, g in getters})
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a handler's error: Kopf logs it
                self._store(h, ev, None, e)
            else:
                self._store(h, ev, result, None)

    def _discard(self, obj: dict) -> None:
        meta = obj.get("metadata", {})
        key = (meta.get("namespace"), meta.get("name"), meta.get("uid"))
        for indexer in self.indexers.values():
            indexer.discard(key)

    def _store(self, h: Any, ev: _Event, result: Any, error: BaseException | None) -> None:
        meta = ev.obj.get("metadata", {})
        key = (meta.get("namespace"), meta.get("name"), meta.get("uid"))
        if error is None:
            if result is not None:
                self.indexers[h.id].replace(key, result)
            return
        if isinstance(error, Exception) and self._failed(h, ev, error, terse=True):
            self.indexers[h.id].discard(key)
        elif not isinstance(error, Exception):
            raise error

    async def _watch(self, h: Any, getters: tuple, ev: _Event) -> None:
        try:
            result = await h.fn(**{n: g(ev) for n, g in getters})
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a handler's error: Kopf logs it, goes on
            self._failed(h, ev, e, terse=False)
            return
        if result is not None:
            progression.deliver_results(
                outcomes={h.id: execution.Outcome(final=True, result=result)}, patch=ev.patch)

    def _failed(self, h: Any, ev: _Event, e: Exception, *, terse: bool) -> bool:
        """Log a handler's error as Kopf does; True when Kopf's outcome carries the
        exception (the indexer's entries of the object are then discarded)."""
        logger = self._logger(ev, terse)
        if isinstance(e, execution.TemporaryError):
            logger.error(f"{h} failed temporarily: {str(e) or repr(e)}")
            return True
        if isinstance(e, execution.PermanentError):
            logger.error(f"{h} failed permanently: {str(e) or repr(e)}")
            return True
        mode = h.errors if h.errors is not None else execution.ErrorsMode.IGNORED
        if mode == execution.ErrorsMode.IGNORED:
            logger.exception(f"{h} failed with an exception and will ignore it: "
                             f"{str(e) or repr(e)}")
            return False
        if mode == execution.ErrorsMode.TEMPORARY:
            backoff = h.backoff if h.backoff is not None else \
                self.settings.execution.default_backoff
            logger.exception(f"{h} failed with an exception and will try again in {backoff} "
                             f"seconds: {str(e) or repr(e)}")
        else:
            logger.exception(f"{h} failed with an exception and will stop now: "
                             f"{str(e) or repr(e)}")
        return True

    def _logger(self, ev: _Event, terse: bool) -> loggers.ObjectLogger:
        cls = loggers.TerseObjectLogger if terse else loggers.LocalObjectLogger
        return cls(body=ev.body, settings=self.settings)

    async def _housekeeping(self, ev: _Event) -> None:
        """What Kopf's processing does after the handlers with no change-detecting
        handler: remove its own finalizer if the object carries it, and apply the patch
        (handler results) if any."""
        fins = ev.obj.get("metadata", {}).get("finalizers")
        if fins and self.finalizer in fins:
            ev.patch.fns.append(functools.partial(finalizers.allow_deletion,
                                                  finalizer=self.finalizer))
        if ev._patch:
            await application.apply(settings=self.settings, resource=self.resource,
                                    body=ev.body, patch=ev.patch, delays=[],
                                    logger=self._logger(ev, False))

    # -- keyword arguments --
    def _names(self, h: Any, known: frozenset[str]) -> tuple[str, ...]:
        names, wants_all, _ = _signature(h.fn)
        if wants_all:
            return tuple(sorted(known | set(self.indexers.indices)))
        return names

    def _getters(self, h: Any, known: frozenset[str]) -> tuple[tuple[str, Getter], ...]:
        """(name, how to get its value from an _Event) for every argument `h` names
        that Kopf would give it; worked out once per handler."""
        indexing_call = known is RESOURCE_KWARGS
        out: list[tuple[str, Getter]] = []
        for name in self._names(h, known):
            if name in self.indexers.indices:  # Kopf: indexes override any other argument
                out.append((name, _const(self.indexers.indices[name])))
            elif name in known:
                out.append((name, self._getter(name, h, indexing_call)))
        return tuple(out)

    def _getter(self, name: str, h: Any, indexing_call: bool) -> Getter:
        simple: dict[str, Getter] = {
            "body": _Event.body.fget,  # type: ignore[attr-defined]
            "type": lambda ev: ev.type,
            "memo": lambda ev: ev.memo,
            "event": lambda ev: ev.raw,
            "spec": lambda ev: ev.body.spec,
            "status": lambda ev: ev.body.status,
            "meta": lambda ev: ev.body.metadata,
            "uid": lambda ev: ev.body.metadata.uid,
            "name": lambda ev: ev.body.metadata.name,
            "namespace": lambda ev: ev.body.metadata.namespace,
            "labels": lambda ev: ev.body.metadata.labels,
            "annotations": lambda ev: ev.body.metadata.annotations,
            "logger": lambda ev: self._logger(ev, indexing_call),
            # an indexer's patch is thrown away, as in Kopf
            "patch": (lambda ev: patches.Patch()) if indexing_call else (lambda ev: ev.patch),
            "resource": _const(self.resource),
            "param": _const(h.param),
            "retry": _const(0),
            "started": lambda ev: datetime.datetime.now(datetime.UTC),
            "runtime": _const(datetime.timedelta(0)),
        }
        return simple[name]


Getter = Callable[[_Event], Any]


def _const(value: Any) -> Getter:
    return lambda ev: value
