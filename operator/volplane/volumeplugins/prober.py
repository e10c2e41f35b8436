"""The FlexVolume prober: which drivers are in --flex-volume-plugin-dir right now.

upstream pkg/volume/flexvolume/probe.go, on asyncio and watchfiles (inotify):

* A driver is a directory ``<vendor>~<driver>`` (not starting with '.') holding the
  executable ``<driver>``; its plugin name is ``<vendor>/<driver>``.
* The first probe (and every probe after the directory itself was removed and
  re-created) reads the whole directory; later probes only look at the driver
  directories the watch saw change since (upstream's eventsMap): removing a driver's
  executable or its directory is a remove, anything else inside a driver directory an
  add-or-update, which re-runs ``init`` and replaces the plugin (and with it the cache of
  commands the driver does not support).
* A driver whose ``init`` fails (Failure, Not supported, garbage, a hang, not
  executable) is skipped and reported as a ``ProbeProblem``; it stays pending and is
  probed again on the next refresh (``retry_interval`` later at most), as upstream keeps
  failed entries in its eventsMap. A driver that was working keeps its old plugin
  until a probe of the new one succeeds. The same problem is reported once.
* A missing plugin directory is created (0755); if that fails the prober reports it and
  tries again later. Nothing here raises to the caller: the operator never crashes on
  what it finds in the directory.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from watchfiles import Change, awatch

from .. import logs
from . import metrics
from .flex import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_KILL_GRACE,
    FlexVolumeError,
    FlexVolumePlugin,
    executable_name,
    unescape_qualified_name,
)

log = logs.get("flexvolume-prober")

# upstream kube-controller-manager --flex-volume-plugin-dir default
DEFAULT_PLUGIN_DIR = "/usr/libexec/kubernetes/kubelet-plugins/volume/exec/"
DEFAULT_RETRY_INTERVAL = 30.0


class ProbeOp(Enum):
    ADD_OR_UPDATE = "add-or-update"
    REMOVE = "remove"


@dataclass(frozen=True)
class ProbeEvent:
    """upstream volume.ProbeEvent: ``plugin`` is None for a remove."""
    op: ProbeOp
    plugin_name: str
    plugin: Any = None
    dir_name: str = ""


@dataclass(frozen=True)
class ProbeProblem:
    """A driver directory the prober could not turn into a plugin (``dir_name`` "" for
    the plugin directory itself). ``message`` is upstream's log line; the controller
    turns it into an Event."""
    dir_name: str
    driver: str
    error: str
    command: str = "init"
    permanent: bool = False  # retrying cannot help (an invalid plugin name)

    @property
    def message(self) -> str:
        if not self.dir_name:
            return self.error
        return (f"error creating Flexvolume plugin from directory {self.dir_name}, "
                f"skipping. Error: {self.error}")


PluginFactory = Callable[..., Awaitable[Any]]
OnProblem = Callable[[ProbeProblem], Awaitable[None] | None]


class FlexVolumeProber:
    def __init__(self, plugin_dir: str = DEFAULT_PLUGIN_DIR, *,
                 call_timeout: float | None = DEFAULT_CALL_TIMEOUT,
                 kill_grace: float = DEFAULT_KILL_GRACE,
                 retry_interval: float = DEFAULT_RETRY_INTERVAL,
                 debounce_ms: int = 200,
                 on_problem: OnProblem | None = None,
                 plugin_factory: PluginFactory = FlexVolumePlugin.probe):
        self.plugin_dir = os.path.abspath(plugin_dir)
        self.call_timeout = call_timeout
        self.kill_grace = kill_grace
        self.retry_interval = retry_interval
        self.debounce_ms = debounce_ms
        self.on_problem = on_problem
        self.factory = plugin_factory
        self.changed = asyncio.Event()   # set when the watch queued work for probe()
        self.ready = asyncio.Event()     # set once the watch is established
        self._lock = asyncio.Lock()      # one probe at a time (upstream's mutex)
        self._probe_all_needed = True
        self._pending: dict[str, ProbeOp] = {}   # driver dir name -> operation
        self._known: dict[str, str] = {}          # driver dir name -> plugin name
        self.problems: dict[str, ProbeProblem] = {}  # current, by dir name

    # -- state --------------------------------------------------------------------------
    def has_pending(self) -> bool:
        return self._probe_all_needed or bool(self._pending)

    def _ensure_dir(self) -> None:
        """upstream createPluginDir."""
        if not os.path.isdir(self.plugin_dir):
            os.makedirs(self.plugin_dir, mode=0o755, exist_ok=True)
            log.warning("FlexVolume plugin directory did not exist; created it",
                        dir=self.plugin_dir)

    async def _report(self, problem: ProbeProblem) -> None:
        if self.problems.get(problem.dir_name) == problem:
            return
        self.problems[problem.dir_name] = problem
        log.warning("FlexVolume driver skipped", dir=problem.dir_name or self.plugin_dir,
                    driver=problem.driver, error=problem.message)
        if problem.dir_name:
            metrics.flex_probes.labels(problem.driver, "failed").inc()
        if self.on_problem is not None:
            try:
                res = self.on_problem(problem)
                if asyncio.iscoroutine(res):
                    await res
            except Exception as e:  # a reporting failure must not stop probing
                log.exception("reporting a FlexVolume probe problem failed", error=str(e))

    def _clear(self, dir_name: str) -> None:
        self.problems.pop(dir_name, None)

    # -- probing ------------------------------------------------------------------------
    async def probe(self) -> tuple[list[ProbeEvent], list[ProbeProblem]]:
        """upstream Probe: everything on the first call (or after the directory was
        re-created), else what the watch queued. Never raises."""
        async with self._lock:
            if self._probe_all_needed:
                self._probe_all_needed = False
                return await self._probe_all()
            return await self._probe_pending()

    async def _probe_all(self) -> tuple[list[ProbeEvent], list[ProbeProblem]]:
        try:
            self._ensure_dir()
            names = sorted(e.name for e in os.scandir(self.plugin_dir)
                           if not e.name.startswith(".") and e.is_dir())
        except OSError as e:
            self._probe_all_needed = True
            problem = ProbeProblem("", "", f"error reading the Flexvolume directory "
                                           f"{self.plugin_dir}: {e}")
            await self._report(problem)
            return [], [problem]
        self._clear("")
        self._pending.clear()
        events: list[ProbeEvent] = []
        for gone in sorted(set(self._known) - set(names)):
            events.append(await self._remove(gone))
        for name in names:
            self._pending[name] = ProbeOp.ADD_OR_UPDATE
        more, problems = await self._probe_pending()
        return events + more, problems

    async def _probe_pending(self) -> tuple[list[ProbeEvent], list[ProbeProblem]]:
        events, problems = [], []
        for name, op in list(self._pending.items()):
            if op is ProbeOp.REMOVE:
                event, problem = await self._remove(name), None
            else:
                event, problem = await self._add(name)
            if problem is not None:
                problems.append(problem)
                await self._report(problem)
                if not problem.permanent:
                    continue  # stays pending: retried on the next probe
            if self._pending.get(name) is op:
                del self._pending[name]
            if event is not None:
                events.append(event)
        return events, problems

    async def _remove(self, dir_name: str) -> ProbeEvent:
        self._clear(dir_name)
        plugin_name = self._known.pop(dir_name, None) or unescape_qualified_name(dir_name)
        metrics.flex_probes.labels(plugin_name, "removed").inc()
        return ProbeEvent(ProbeOp.REMOVE, plugin_name, None, dir_name)

    async def _add(self, dir_name: str) -> tuple[ProbeEvent | None, ProbeProblem | None]:
        """upstream newProbeEvent(ProbeAddOrUpdate) + the registry's name check."""
        driver = unescape_qualified_name(dir_name)
        path = os.path.join(self.plugin_dir, dir_name)
        if not os.path.isdir(path):
            # gone again, or a plain file in the plugin directory: not a driver
            if dir_name in self._known:
                return await self._remove(dir_name), None
            self._clear(dir_name)
            return None, None
        from .registry import qualified_name_errors  # (registry imports this module)
        errs = qualified_name_errors(driver)
        if errs:
            return None, ProbeProblem(dir_name, driver, f'volume plugin has invalid name: '
                                                        f'"{driver}": ' + ";".join(errs),
                                      permanent=True)
        try:
            plugin = await self.factory(self.plugin_dir, dir_name,
                                        call_timeout=self.call_timeout,
                                        kill_grace=self.kill_grace)
        except FlexVolumeError as e:
            return None, ProbeProblem(dir_name, driver, str(e), command=e.command)
        except Exception as e:  # anything else a broken driver dir can cause
            return None, ProbeProblem(dir_name, driver, f"{type(e).__name__}: {e}")
        self._clear(dir_name)
        result = "updated" if dir_name in self._known else "added"
        self._known[dir_name] = plugin.name
        metrics.flex_probes.labels(plugin.name, result).inc()
        log.info("FlexVolume driver probed", driver=plugin.name, result=result,
                 attach=plugin.capabilities.attach, path=plugin.driver.path)
        return ProbeEvent(ProbeOp.ADD_OR_UPDATE, plugin.name, plugin, dir_name), None

    # -- watching -----------------------------------------------------------------------
    def handle_changes(self, changes: Iterable[tuple[Change, str]]) -> bool:
        """upstream handleWatchEvent for a batch of watchfiles changes; queues driver
        directories for the next probe. Returns True when the plugin directory itself
        was removed (the watch must be re-established)."""
        root_gone = False
        for change, path in changes:
            abs_path = os.path.abspath(path)
            if os.path.basename(abs_path).startswith("."):
                continue
            if abs_path == self.plugin_dir:
                if change == Change.deleted:
                    root_gone = True
                continue
            rel = os.path.relpath(abs_path, self.plugin_dir)
            if rel == os.curdir or rel.startswith(os.pardir + os.sep) or rel == os.pardir:
                continue
            parts = rel.split(os.sep)
            dir_name = parts[0]
            if dir_name.startswith("."):
                continue
            if self._probe_all_needed:
                continue  # the full probe will see it
            executable = os.path.join(dir_name, executable_name(unescape_qualified_name(dir_name)))
            if change == Change.deleted and (rel == executable or len(parts) == 1):
                self._pending[dir_name] = ProbeOp.REMOVE
            else:
                self._pending[dir_name] = ProbeOp.ADD_OR_UPDATE
        if root_gone:
            self._probe_all_needed = True
        if root_gone or self._pending:
            self.changed.set()
        return root_gone

    async def watch(self) -> None:
        """Watch the plugin directory until cancelled, queueing changes for ``probe``
        and setting ``changed``. Re-creates the directory and re-establishes the watch
        when it is removed or the watcher fails. Never raises but CancelledError."""
        backoff = 1.0
        first = True
        while True:
            try:
                self._ensure_dir()
            except OSError as e:
                await self._report(ProbeProblem("", "", f"error (re-)creating the Flexvolume "
                                                        f"directory {self.plugin_dir}: {e}"))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            try:
                established = False
                async for changes in awatch(self.plugin_dir, watch_filter=None,
                                            debounce=self.debounce_ms, step=50,
                                            rust_timeout=1000, yield_on_timeout=True,
                                            recursive=True, ignore_permission_denied=True):
                    if not established:
                        # the watch exists now: anything that happened before it is
                        # found by a full probe (the first one, or a new one on restart)
                        established = True
                        backoff = 1.0
                        if not first:
                            self._probe_all_needed = True
                            self.changed.set()
                        first = False
                        self.ready.set()
                    if changes and self.handle_changes(changes):
                        log.warning("FlexVolume plugin directory removed; re-creating it",
                                    dir=self.plugin_dir)
                        break
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("FlexVolume plugin directory watch failed; restarting",
                            dir=self.plugin_dir, error=str(e))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
            self._probe_all_needed = True
            self.changed.set()
