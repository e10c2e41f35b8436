"""The volume-plugin registry: upstream's VolumePluginMgr for the attach/detach controller.

It holds the built-in plugins (CSI) and the plugins a prober found (FlexVolume drivers),
and answers "which plugin handles this volume?" by volume source, the way the
controller's populator, reconciler and node-status updater ask it upstream:

    plugin = registry.find_attachable_plugin_by_spec(spec, csi_drivers=...)
    if plugin is None: the volume needs no attaching (CSIDriver attachRequired false,
                       a flex driver whose init said attach: false, inline CSI);
    name = await unique_volume_name(plugin, spec)        # what node.status lists
    plugin.multi_attach_allowed(spec)                    # RWO guard (pure)
    plugin.attach_mechanism == "VolumeAttachment":       # CSI: write a VolumeAttachment
                                                         #  (today's attach/ path)
    plugin.attach_mechanism == "exec":                   # flex: the controller runs
        device = await plugin.attach(spec, node)         #  the driver itself
        await plugin.volumes_are_attached([spec], node)
        await plugin.detach(volume_name, node)

Lookups are synchronous and pure over the registry's current plugin set. The set of
probed plugins changes only in ``refresh()`` (upstream refreshProbedPlugins, which
upstream runs inside every lookup): it applies what the prober saw since the last
refresh. ``run()`` refreshes whenever the prober's watch reports a change (and retries
drivers whose init failed), so a lookup sees a driver a moment after it was copied in.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from .. import logs
from . import metrics
from .prober import FlexVolumeProber, ProbeEvent, ProbeOp, ProbeProblem
from .spec import VolumeSpec, multi_attach_allowed

log = logs.get("volume-plugins")

CSI_PLUGIN_NAME = "kubernetes.io/csi"
CSI_VOLUME_SEP = "^"
ATTACH_BY_VOLUME_ATTACHMENT = "VolumeAttachment"


class NoPluginMatched(LookupError):
    """upstream ErrNoPluginMatched ("no volume plugin matched")."""


class MultiplePluginsMatched(LookupError):
    pass


@runtime_checkable
class VolumePlugin(Protocol):
    """What every registered plugin answers (pure)."""
    name: str

    def can_support(self, spec: VolumeSpec) -> bool: ...


@runtime_checkable
class AttachableVolumePlugin(VolumePlugin, Protocol):
    """What the attach/detach controller asks an attachable plugin.

    Pure: ``attachable``, ``can_attach(spec, csi_drivers=)``, ``multi_attach_allowed``,
    ``default_volume_name``, ``metric_plugin_name``; async: ``get_volume_name`` (may run
    a driver). ``attach_mechanism`` says who does the attaching: "VolumeAttachment" (the
    controller writes one; an external attacher acts) or "exec" (the plugin's async
    ``attach``/``volumes_are_attached``/``detach``)."""
    attach_mechanism: str
    attachable: bool

    def can_attach(self, spec: VolumeSpec, *,
                   csi_drivers: Mapping[str, Mapping] | None = None) -> bool: ...

    def multi_attach_allowed(self, spec: VolumeSpec) -> bool: ...

    def default_volume_name(self, spec: VolumeSpec) -> str: ...

    def metric_plugin_name(self, spec: VolumeSpec | None = None) -> str: ...

    async def get_volume_name(self, spec: VolumeSpec) -> str: ...


# -- names ----------------------------------------------------------------------------------
def get_unique_volume_name(plugin_name: str, volume_name: str) -> str:
    """upstream util.GetUniqueVolumeName: ``<plugin name>/<volume name>``."""
    return f"{plugin_name}/{volume_name}"


def split_unique_name(unique_name: str) -> tuple[str, str]:
    """upstream util.SplitUniqueName: (plugin name, volume name) of a unique volume name,
    the plugin name being its first two components (``kubernetes.io/csi``,
    ``vendor/driver``). Used to detach a volume whose spec is gone (crash recovery)."""
    parts = unique_name.split("/", 2)
    if len(parts) != 3:
        raise ValueError(f"cannot split volume unique name {unique_name} "
                         "to plugin/volume components")
    return f"{parts[0]}/{parts[1]}", parts[2]


async def unique_volume_name(plugin: AttachableVolumePlugin, spec: VolumeSpec) -> str:
    """upstream util.GetUniqueVolumeNameFromSpec (may run the flex driver's getvolumename)."""
    volume_name = await plugin.get_volume_name(spec)
    if not volume_name:
        raise ValueError(f'failed to GetVolumeName from volumePlugin for volumeSpec "{spec.name}"')
    return get_unique_volume_name(plugin.name, volume_name)


_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def qualified_name_errors(name: str) -> list[str]:
    """apimachinery validation.IsQualifiedName: ``[prefix/]name``, prefix a DNS-1123
    subdomain (≤253), name ≤63 alphanumerics with '-', '_', '.' inside."""
    errs = []
    parts = name.split("/")
    if len(parts) == 1:
        short = parts[0]
    elif len(parts) == 2:
        prefix, short = parts
        if not prefix:
            errs.append("prefix part must be non-empty")
        elif len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix):
            errs.append("prefix part must be a lowercase RFC 1123 subdomain")
    else:
        return ["a qualified name must consist of alphanumeric characters, '-', '_' or '.', "
                "with an optional DNS subdomain prefix and '/'"]
    if not short:
        errs.append("name part must be non-empty")
    elif len(short) > 63:
        errs.append("name part must be no more than 63 characters")
    elif not _QUALIFIED_NAME.match(short):
        errs.append("name part must consist of alphanumeric characters, '-', '_' or '.', "
                    "and must start and end with an alphanumeric character")
    return errs


# -- CSI: today's path, described -----------------------------------------------------------
class CSIPlugin:
    """upstream csiPlugin as the attach/detach controller sees it. Attaching is done by
    writing a VolumeAttachment (volplane's attach/ controller does this today); this
    entry answers the questions around it."""

    name = CSI_PLUGIN_NAME
    attach_mechanism = ATTACH_BY_VOLUME_ATTACHMENT
    attachable = True

    def can_support(self, spec: VolumeSpec) -> bool:
        return spec.source("csi") is not None

    def can_attach(self, spec: VolumeSpec, *,
                   csi_drivers: Mapping[str, Mapping] | None = None) -> bool:
        """upstream CanAttach: inline (ephemeral) CSI volumes never; a PV when its
        driver's CSIDriver says ``attachRequired`` true or unset, or has no CSIDriver."""
        if spec.pv is None:
            return False
        csi = spec.source("csi") or {}
        driver = csi.get("driver")
        if not driver:
            return False
        obj = (csi_drivers or {}).get(driver)
        if obj is None:
            return True
        return ((obj.get("spec") or {}).get("attachRequired", True)) is not False

    def multi_attach_allowed(self, spec: VolumeSpec) -> bool:
        return multi_attach_allowed(spec)

    def default_volume_name(self, spec: VolumeSpec) -> str:
        """upstream csiPlugin.GetVolumeName: ``<driver>^<volumeHandle>`` (PVs only)."""
        csi = spec.source("csi") or {}
        if spec.pv is None or not csi.get("driver") or not csi.get("volumeHandle"):
            raise ValueError(f'volume "{spec.name}" has no CSI driver and volumeHandle')
        return f"{csi['driver']}{CSI_VOLUME_SEP}{csi['volumeHandle']}"

    async def get_volume_name(self, spec: VolumeSpec) -> str:
        return self.default_volume_name(spec)

    def metric_plugin_name(self, spec: VolumeSpec | None = None) -> str:
        """upstream GetFullQualifiedPluginNameForVolume: ``kubernetes.io/csi:<driver>``."""
        driver = ((spec.source("csi") if spec else None) or {}).get("driver")
        return f"{self.name}:{driver}" if driver else self.name


# -- the registry ---------------------------------------------------------------------------
OnChange = Callable[[list[ProbeEvent]], Awaitable[None] | None]
OnProblem = Callable[[ProbeProblem], Awaitable[None] | None]


class VolumePluginRegistry:
    """upstream VolumePluginMgr: built-in plugins plus the prober's."""

    def __init__(self, plugins: Iterable[Any] | None = None,
                 prober: FlexVolumeProber | None = None):
        self.plugins: dict[str, Any] = {}
        self.probed: dict[str, Any] = {}
        self.prober = prober
        self.probed_once = asyncio.Event()   # set after the first refresh (or its failure)
        for plugin in (plugins if plugins is not None else [CSIPlugin()]):
            errs = qualified_name_errors(plugin.name)
            if errs:
                raise ValueError(f'volume plugin has invalid name: "{plugin.name}": '
                                 + ";".join(errs))
            if plugin.name in self.plugins:
                raise ValueError(f'volume plugin "{plugin.name}" was registered more than once')
            self.plugins[plugin.name] = plugin
            metrics.plugin_added(plugin.name, bool(getattr(plugin, "attachable", False)))

    # -- changes -------------------------------------------------------------------------
    def apply(self, events: Iterable[ProbeEvent]) -> list[ProbeEvent]:
        """Apply probe events (upstream refreshProbedPlugins' loop); returns those that
        changed the plugin set."""
        applied = []
        for ev in events:
            if ev.op is ProbeOp.ADD_OR_UPDATE and ev.plugin is not None:
                self.probed[ev.plugin_name] = ev.plugin
                metrics.plugin_added(ev.plugin_name, bool(ev.plugin.attachable))
                log.info("loaded volume plugin", plugin=ev.plugin_name,
                         attachable=ev.plugin.attachable)
                applied.append(ev)
            elif ev.op is ProbeOp.REMOVE and ev.plugin_name in self.probed:
                del self.probed[ev.plugin_name]
                metrics.plugin_removed(ev.plugin_name)
                log.info("removed volume plugin", plugin=ev.plugin_name)
                applied.append(ev)
        return applied

    async def refresh(self) -> list[ProbeEvent]:
        """Probe what changed since the last refresh and apply it."""
        if self.prober is None:
            self.probed_once.set()
            return []
        events, _problems = await self.prober.probe()
        applied = self.apply(events)
        self.probed_once.set()
        return applied

    async def run(self, *, on_change: OnChange | None = None,
                  on_problem: OnProblem | None = None) -> None:
        """Keep the probed plugins current until cancelled: watch the plugin directory,
        refresh on every change, retry drivers whose init failed. ``on_change`` gets the
        applied events (e.g. to requeue the volumes of a driver that appeared);
        ``on_problem`` gets each new prober problem (for an Event). Never raises but
        CancelledError."""
        if self.prober is None:
            self.probed_once.set()
            return
        if on_problem is not None:
            self.prober.on_problem = on_problem
        watcher = asyncio.create_task(self.prober.watch(), name="flexvolume-prober-watch")
        try:
            # upstream Init() sets up the watch before the first Probe(): a driver added
            # between the first full probe and the watch would be missed otherwise
            try:
                await asyncio.wait_for(self.prober.ready.wait(), 10.0)
            except TimeoutError:
                log.warning("FlexVolume plugin directory watch not ready; probing anyway",
                            dir=self.prober.plugin_dir)
            while True:
                self.prober.changed.clear()
                try:
                    applied = await self.refresh()
                    if applied and on_change is not None:
                        res = on_change(applied)
                        if asyncio.iscoroutine(res):
                            await res
                except Exception as e:  # a refresh must never end the loop
                    log.exception("volume plugin refresh failed", error=str(e))
                self.probed_once.set()
                wait = self.prober.retry_interval if self.prober.has_pending() else None
                try:
                    await asyncio.wait_for(self.prober.changed.wait(), wait)
                except TimeoutError:
                    pass
        finally:
            watcher.cancel()
            try:
                await watcher
            except (asyncio.CancelledError, Exception):
                pass

    # -- lookups (pure) ------------------------------------------------------------------
    def all_plugins(self) -> list[Any]:
        return [*self.plugins.values(), *self.probed.values()]

    def find_plugin_by_spec(self, spec: VolumeSpec) -> Any:
        """upstream FindPluginBySpec: the one plugin that supports the spec. Raises
        NoPluginMatched (e.g. a flexVolume whose driver is not installed) or
        MultiplePluginsMatched."""
        matched = [p for p in self.all_plugins() if p.can_support(spec)]
        if not matched:
            driver = (spec.source("flexVolume") or {}).get("driver")
            if driver:
                raise NoPluginMatched(f'no volume plugin matched: flexVolume driver "{driver}" '
                                      f"is not installed in the FlexVolume plugin directory")
            raise NoPluginMatched("no volume plugin matched")
        if len(matched) > 1:
            raise MultiplePluginsMatched("multiple volume plugins matched: "
                                         + ",".join(p.name for p in matched))
        return matched[0]

    def find_plugin_by_name(self, name: str) -> Any:
        """upstream FindPluginByName."""
        builtin, probed = self.plugins.get(name), self.probed.get(name)
        if builtin is not None and probed is not None:
            raise MultiplePluginsMatched(f"multiple volume plugins matched: {name} and {name}")
        match = builtin or probed
        if match is None:
            raise NoPluginMatched(f"no volume plugin matched name: {name}")
        return match

    def find_attachable_plugin_by_spec(self, spec: VolumeSpec, *,
                                       csi_drivers: Mapping[str, Mapping] | None = None
                                       ) -> AttachableVolumePlugin | None:
        """upstream FindAttachablePluginBySpec: the plugin when the volume needs
        attaching, None when its plugin does not attach it. Raises like
        find_plugin_by_spec when no (or more than one) plugin supports the spec."""
        plugin = self.find_plugin_by_spec(spec)
        if getattr(plugin, "attachable", False) and plugin.can_attach(
                spec, csi_drivers=csi_drivers):
            return plugin
        return None

    def find_attachable_plugin_by_name(self, name: str) -> AttachableVolumePlugin | None:
        """upstream FindAttachablePluginByName: for a unique name whose spec is gone."""
        plugin = self.find_plugin_by_name(name)
        return plugin if getattr(plugin, "attachable", False) else None
