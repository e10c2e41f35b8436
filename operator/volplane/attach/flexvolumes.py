"""The attach/detach controller's FlexVolume half (effects): it runs the drivers.

A FlexVolume whose driver's ``init`` said ``attach: true`` is attached by running the
driver (``attach <json> <node>``), not by writing a VolumeAttachment. The decisions are
the same pure ones as for CSI (desired.pod_volumes with ``flex_drivers``,
reconcile.reconcile); what differs is here:

- the actual state is in memory (``asw``: (unique name, node) -> Actual); it is rebuilt
  at start from ``node.status.volumesAttached`` (actual.flex_actual_from_nodes,
  upstream populateActualStateOfWorld) and checked with ``isattached`` at start and
  every ``flex_verify_period`` (upstream's VolumesAreAttached sync): a volume the driver
  says is not attached leaves the actual state, so a desired one is attached again;
- every driver call runs in its own task (an asyncio subprocess with a timeout, see
  volumeplugins/flex.py), never in a work-queue worker: a hung driver holds only its
  own volume, never the CSI path or other flex volumes. One operation per volume at a
  time (ATTACHING/DETACHING entries make the reconcile wait);
- attach: ATTACHING -> driver ``getvolumename`` + ``attach`` -> ATTACHED with the
  driver's ``device`` as devicePath -> the node report writes it (debounced, as CSI);
- detach: the volume leaves the node report first (written before the driver runs,
  upstream's order), then ``detach <volume name> <node>``; on failure it is reported
  attached again and retried with backoff;
- any driver failure (Failure, non-zero exit, garbage, timeout, Not supported where
  that means failure, a driver that is gone) becomes a FailedAttachVolume /
  FailedDetachVolume Event naming the driver and the command, never an exception in
  the controller. A failed attach leaves the volume *uncertain* (upstream's
  AttachStateUncertain: the driver may have attached it): not reported, attached again
  (with backoff) while desired, detached when no longer desired.

Crash safety: a kill after the driver attached but before the node report leaves no
record; after the restart the volume is still desired, so it is attached again (flex
``attach`` must be idempotent, as upstream requires) and reported. A kill after the node
report dropped a volume but before ``detach`` ran leaves the driver's attachment with
no record (upstream has the same gap); see docs/flexvolume.md.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .. import faults, logs
from ..kinds import claim_ref_keys
from ..volumeplugins import (
    FlexVolumeProber,
    NoPluginMatched,
    ProbeProblem,
    VolumePluginRegistry,
    VolumeSpec,
    split_unique_name,
)
from . import actual as A
from . import desired as D
from . import names as N
from . import reconcile as RC

if TYPE_CHECKING:
    from .controller import AttachDetachController

log = logs.get("attachdetach.flex")

BACKOFF_BASE = 1.0
BACKOFF_MAX = 120.0


def _spec_of(v: D.VolumeRef) -> VolumeSpec:
    if v.pv is not None:
        return VolumeSpec.from_pv(v.pv, read_only=v.read_only)
    return VolumeSpec.from_volume(v.volume or {})


class FlexAttacher:
    def __init__(self, ctl: AttachDetachController):
        self.ctl = ctl
        opts = ctl.ctx.options
        prober = None
        if opts.flex_volume_plugin_dir:
            prober = FlexVolumeProber(opts.flex_volume_plugin_dir,
                                      call_timeout=opts.flex_call_timeout)
        self.registry = VolumePluginRegistry(prober=prober)
        self.verify_period = opts.flex_verify_period
        self.asw: A.ASW = {}
        self.pods_by_key: dict[str, set[str]] = {}   # flex key -> pod keys naming it
        self.keys_by_pod: dict[str, set[str]] = {}
        self.failures: dict[tuple[str, str], int] = {}
        self.retry_at: dict[tuple[str, str], float] = {}
        self.missing_reported: set[tuple[str, str]] = set()   # (pod key, flex key)
        self.tasks: set[asyncio.Task] = set()
        self.held: set[tuple[str, str]] = set()   # detaches waiting for a driver
        self.uncertain: set[tuple[str, str]] = set()   # attach failed: state unknown

    # -- plugins --------------------------------------------------------------------------
    def drivers(self) -> dict[str, bool]:
        """Loaded flex drivers -> attachable (init said attach: true)."""
        return {name: bool(p.attachable) for name, p in self.registry.probed.items()}

    async def run_registry(self) -> None:
        await self.registry.run(on_change=self._plugins_changed, on_problem=self._problem)

    def _plugins_changed(self, events: list) -> None:
        names = {ev.plugin_name for ev in events}
        log.info("flex drivers changed", drivers=sorted(names), loaded=sorted(self.drivers()))
        for key in self.all_keys():
            if split_unique_name(key)[0] in names:
                self.ctl.volumes.add(key)

    def _problem(self, problem: ProbeProblem) -> None:
        log.warning("FlexVolume driver problem", message=problem.message)

    def all_keys(self) -> set[str]:
        return set(self.pods_by_key) | {k for k, _ in self.asw}

    # -- gather ---------------------------------------------------------------------------
    def pod_changed(self, key: str, new: dict | None) -> None:
        """Keep the index of pods per flex volume; queue the volumes a change touches."""
        ctl = self.ctl
        keys = set() if new is None else D.pod_flex_keys(new, pvcs=ctl.pvcs, pvs=ctl.pvs)
        if new is None:
            self.missing_reported = {r for r in self.missing_reported if r[0] != key}
        old = self.keys_by_pod.pop(key, set())
        if keys:
            self.keys_by_pod[key] = keys
        for k in old - keys:
            pods = self.pods_by_key.get(k)
            if pods is not None:
                pods.discard(key)
                if not pods:
                    del self.pods_by_key[k]
        for k in keys:
            self.pods_by_key.setdefault(k, set()).add(key)
        for k in old | keys:
            ctl.volumes.add(k)

    def claim_changed(self, claim_key: str) -> None:
        """A claim's binding changed: its pods' flex keys may have too."""
        for pod_key in list(self.ctl.pods_by_claim.get(claim_key)):
            self.pod_changed(pod_key, self.ctl.pods.get(pod_key))

    def desired_for(self, key: str) -> D.DSW:
        ctl = self.ctl
        pod_keys = set(self.pods_by_key.get(key, ()))
        driver, name = split_unique_name(key)
        pv = ctl.pvs.get(name)
        if pv is not None and D.flex_driver(pv.get("spec")) == driver:
            for ck in claim_ref_keys(pv):
                pod_keys |= set(ctl.pods_by_claim.get(ck))
        drivers = self.drivers()
        acc: dict[tuple[str, str], tuple[D.VolumeRef, list[D.PodRef]]] = {}
        for pod_key in sorted(pod_keys):
            pod = ctl.pods.get(pod_key)
            if pod is None:
                continue
            node, vols = D.pod_volumes(pod, pvcs=ctl.pvcs, pvs=ctl.pvs, drivers=ctl.drivers,
                                       nodes=ctl.nodes, flex_drivers=drivers)
            for v in vols:
                if v.pv_name == key and node:
                    acc.setdefault((key, node), (v, []))[1].append(D.PodRef.of(pod))
        return {k: D.Desired(v, k[1], tuple(sorted(ps))) for k, (v, ps) in acc.items()}

    def actual_for(self, key: str) -> A.ASW:
        return {k: a for k, a in self.asw.items() if k[0] == key}

    def actual_on_node(self, node: str) -> list[A.Actual]:
        """What the node report and its schedule see: uncertain attachments are not
        reported (upstream: only attachedConfirmed volumes are)."""
        return [a for k, a in self.asw.items() if k[1] == node and k not in self.uncertain]

    def _reconcile_view(self, key: str, dsw: D.DSW) -> A.ASW:
        """The actual state the reconcile decides on: an uncertain attachment (its attach
        failed: the driver may have attached it or not) that is still desired is left
        out, so it is attached again (after the backoff); one no longer desired counts as
        attached, so it is detached (upstream's AttachStateUncertain)."""
        return {k: a for k, a in self.actual_for(key).items()
                if not (k in self.uncertain and k in dsw)}

    # -- start ----------------------------------------------------------------------------
    def rebuild(self) -> None:
        """The actual state after a start: the flex entries of every node's report."""
        ctl = self.ctl
        self.asw = A.flex_actual_from_nodes(ctl.nodes, ctl.pvs)
        if self.asw:
            log.info("flex attachments rebuilt from node status",
                     volumes=sorted(f"{k}@{n}" for k, n in self.asw))
        for key, _ in self.asw:
            ctl.volumes.add(key)

    async def verify_loop(self) -> None:
        """upstream's VolumesAreAttached sync: at start, then every verify_period."""
        while True:
            try:
                await self.verify()
            except Exception as e:  # never ends the controller
                log.exception("flex isattached check failed", error=str(e))
            await asyncio.sleep(self.verify_period)

    async def verify(self) -> None:
        await self.registry.probed_once.wait()
        by_driver_node: dict[tuple[str, str], list[tuple[str, D.VolumeRef]]] = {}
        for (key, node), a in list(self.asw.items()):
            if a.state is not A.AState.ATTACHED or (key, node) in self.uncertain:
                continue
            d = self.desired_for(key).get((key, node))
            if d is None:
                continue  # not desired: the reconcile detaches it anyway
            by_driver_node.setdefault((d.volume.driver, node), []).append((key, d.volume))
        for (driver, node), vols in by_driver_node.items():
            self._spawn(self._verify_one(driver, node, vols))

    async def _verify_one(self, driver: str, node: str,
                          vols: list[tuple[str, D.VolumeRef]]) -> None:
        try:
            plugin = self.registry.find_attachable_plugin_by_name(driver)
            if plugin is None:
                return
            answers = await plugin.volumes_are_attached([_spec_of(v) for _, v in vols], node)
        except Exception as e:
            log.warning("flex isattached failed; keeping the actual state", driver=driver,
                        node=node, error=str(e))
            return
        if answers is None:
            return  # Not supported: cannot tell, keep what we have
        for (key, _), attached in zip(vols, answers, strict=False):
            a = self.asw.get((key, node))
            if not attached and a is not None and a.state is A.AState.ATTACHED:
                log.warning("flex volume is not attached, says the driver", volume=key,
                            node=node, driver=driver)
                del self.asw[(key, node)]
                self.ctl._node_changed(node)
                self.ctl.volumes.add(key)

    # -- decide and act -------------------------------------------------------------------
    async def sync(self, key: str) -> float | None:
        if not self.registry.probed_once.is_set():
            # before the first probe no driver is known: every flex volume would look
            # undesired (and rebuilt attachments would be detached)
            return 0.2
        ctl = self.ctl
        dsw = self.desired_for(key)
        self._report_missing_driver(key)
        asw = self._reconcile_view(key, dsw)
        now = ctl.clock()
        ops = ctl.plan(key, dsw, asw, now)
        retry: float | None = None
        multi_now: set[tuple[str, str]] = set()
        for op in ops:
            if op.kind is RC.OpKind.ATTACH:
                wait = self._attach(op, dsw[op.key], now)
            elif op.kind is RC.OpKind.DETACH:
                wait = await self._detach(op, now)
            else:
                wait = await ctl._act(op, now, multi_now)
            if wait is not None:
                retry = wait if retry is None else min(retry, wait)
        for k in [k for k in ctl.multi_reported if k[0] == key and k not in multi_now]:
            ctl.multi_reported.discard(k)
        for k in [k for k in self.failures if k[0] == key and k not in dsw
                  and k not in self.asw]:
            self.failures.pop(k, None)
            self.retry_at.pop(k, None)
        return retry

    def _report_missing_driver(self, key: str) -> None:
        """Pods whose flex volume's driver is not loaded get one Event (upstream skips
        them silently; the driver is named here so the cause is visible)."""
        driver, name = split_unique_name(key)
        if driver in self.registry.probed:
            return
        for pod_key in sorted(self.pods_by_key.get(key, ())):
            pod = self.ctl.pods.get(pod_key)
            node = ((pod or {}).get("spec") or {}).get("nodeName")
            if pod is None or not node or (pod_key, key) in self.missing_reported:
                continue
            self.missing_reported.add((pod_key, key))
            msg = RC.attach_failed_message(
                name, f'no volume plugin matched: flexVolume driver "{driver}" is not '
                "loaded from the FlexVolume plugin directory (missing, or its init failed)")
            self.ctl.ctx.events.emit(D.PodRef.of(pod).as_object(), "Warning", N.FAILED_ATTACH,
                                     msg, component="attachdetach-controller")

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def _backoff(self, k: tuple[str, str], now: float) -> float:
        n = self.failures.get(k, 0) + 1
        self.failures[k] = n
        delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (n - 1))
        self.retry_at[k] = now + delay
        return delay

    def _attach(self, op: RC.Op, d: D.Desired, now: float) -> float | None:
        until = self.retry_at.get(op.key)
        if until is not None and now < until:
            return until - now + 0.01
        v = d.volume
        self.asw[op.key] = A.Actual(pv_name=op.pv_name, node=op.node, va_name="",
                                    attacher=v.driver, state=A.AState.ATTACHING,
                                    unique_name=v.unique_name, multi_attach=v.multi_attach)
        self._spawn(self._run_attach(op.key, v, d.pods))
        return None

    async def _run_attach(self, key: tuple[str, str], v: D.VolumeRef,
                          pods: tuple[D.PodRef, ...]) -> None:
        ctl = self.ctl
        node = key[1]
        started = ctl.clock()
        try:
            plugin = self.registry.find_attachable_plugin_by_name(v.driver)
            if plugin is None:
                raise NoPluginMatched(f'flexVolume driver "{v.driver}" does not attach '
                                      "(init: attach false)")
            spec = _spec_of(v)
            await plugin.get_volume_name(spec)   # upstream: a failure fails the attach
            device = await plugin.attach(spec, node)
        except Exception as e:
            # uncertain: not reported; attached again while desired, detached if not
            self.asw[key] = A.Actual(pv_name=v.pv_name, node=node, va_name="",
                                     attacher=v.driver, state=A.AState.ATTACHED,
                                     unique_name=v.unique_name, multi_attach=v.multi_attach)
            self.uncertain.add(key)
            delay = self._backoff(key, ctl.clock())
            msg = RC.attach_failed_message(v.display_name, str(e))
            log.warning("flex attach failed", volume=v.unique_name, node=node,
                        driver=v.driver, error=str(e), retry_in=delay)
            ctl._post(((p, msg) for p in pods), N.FAILED_ATTACH)
            from .controller import operation_errors
            operation_errors.labels(v.driver, "volume_attach").inc()
            ctl.volumes.add_after(v.pv_name, delay)
            return
        faults.point("flex-attach-1")   # attached by the driver, not yet in node status
        self.uncertain.discard(key)
        self.failures.pop(key, None)
        self.retry_at.pop(key, None)
        self.asw[key] = A.Actual(pv_name=v.pv_name, node=node, va_name="", attacher=v.driver,
                                 state=A.AState.ATTACHED, unique_name=v.unique_name,
                                 multi_attach=v.multi_attach, device_path=device or "")
        from .controller import operation_seconds
        operation_seconds.labels(v.driver, "volume_attach", "success", "false").observe(
            ctl.clock() - started)
        log.info("attach", volume=v.unique_name, node=node, driver=v.driver,
                 device=device, action="attach")
        msg = f'AttachVolume.Attach succeeded for volume "{v.display_name}" '
        ctl._post(((p, msg) for p in pods), N.SUCCESSFUL_ATTACH, "Normal")
        ctl._node_changed(node)
        ctl.volumes.add(v.pv_name)

    async def _detach(self, op: RC.Op, now: float) -> float | None:
        a = self.asw.get(op.key)
        if a is None or a.state is not A.AState.ATTACHED:
            return None
        driver = split_unique_name(op.pv_name)[0]
        if driver not in self.registry.probed:
            # no driver to run (yet: not copied in, or its init fails): keep it reported
            # attached; a driver change requeues it (upstream would drop it from the
            # report and then fail the detach, over and over)
            if op.key not in self.held:
                self.held.add(op.key)
                log.warning("flex detach waits for its driver", volume=op.pv_name,
                            node=op.node, driver=driver)
            return None
        self.held.discard(op.key)
        until = self.retry_at.get(op.key)
        if until is not None and now < until:
            return until - now + 0.01
        self.asw[op.key] = replace(a, state=A.AState.DETACHING)
        ctl = self.ctl
        ctl.detaching.add(op.key)
        try:
            await ctl._sync_node(op.node, force=True)  # report it detached first
        except Exception:
            self.asw[op.key] = a
            ctl.detaching.discard(op.key)
            raise
        faults.point("flex-detach-1")
        self._spawn(self._run_detach(op, a))
        return None

    async def _run_detach(self, op: RC.Op, a: A.Actual) -> None:
        ctl = self.ctl
        started = ctl.clock()
        driver, name = split_unique_name(op.pv_name)
        try:
            plugin = self.registry.find_attachable_plugin_by_name(driver)
            if plugin is None:
                raise NoPluginMatched(f'flexVolume driver "{driver}" does not attach '
                                      "(init: attach false)")
            await plugin.detach(name, op.node)
        except Exception as e:
            self.asw[op.key] = a          # still attached: report it again, retry later
            ctl.detaching.discard(op.key)
            delay = self._backoff(op.key, ctl.clock())
            msg = RC.detach_failed_message(name, str(e))
            log.warning("flex detach failed", volume=op.pv_name, node=op.node,
                        error=str(e), retry_in=delay)
            pv = ctl.pvs.get(name)
            if pv is not None and D.flex_driver(pv.get("spec")) == driver:
                ctl.ctx.events.emit(pv, "Warning", N.FAILED_DETACH, msg,
                                    component="attachdetach-controller")
            from .controller import operation_errors
            operation_errors.labels(driver, "volume_detach").inc()
            ctl._node_changed(op.node)
            ctl.volumes.add_after(op.pv_name, delay)
            return
        self.asw.pop(op.key, None)
        self.uncertain.discard(op.key)
        ctl.detaching.discard(op.key)
        self.failures.pop(op.key, None)
        self.retry_at.pop(op.key, None)
        from .controller import forced_detaches, operation_seconds
        operation_seconds.labels(driver, "volume_detach", "success", "false").observe(
            ctl.clock() - started)
        if op.forced:
            forced_detaches.labels(op.forced).inc()
        log.info("detach", volume=op.pv_name, node=op.node, driver=driver, reason=op.reason,
                 forced=op.forced, action="detach")
        ctl.volumes.add(op.pv_name)
