"""PV controller effect layer: queues, workers, and the writes that carry out decisions.

Gather, decide, act:
- gather: the cache (Kopf-fed stores) and the VolumeIndex kept beside it;
- decide: `decide.sync_claim` / `decide.sync_volume`, pure functions;
- act: this module, the only place that writes.

Binding is four writes, in upstream's order (pv_controller.go `bind`):

    1. PV    spec.claimRef (+ pv.kubernetes.io/bound-by-controller)
    2. PV    status.phase = Bound
    3. PVC   spec.volumeName (+ pv.kubernetes.io/bind-completed, bound-by-controller)
    4. PVC   status.phase = Bound, capacity and accessModes from the PV

Each write carries the object's resourceVersion as a precondition and each is
skipped when already true, so a bind interrupted after any write is finished
by the next sync: after write 1 the PV is bound to the claim's uid, which
`find_best_match` treats as "pre-bound to this claim, wins at once", and the
volume side waits for the claim side (bound-by-controller) instead of undoing
it. A 409 means we decided on stale data: re-read the object, re-decide.

Two claims can never take one PV: the PV is "assumed" bound in the cache
before write 1 leaves (other workers skip it at once), and write 1's
resourceVersion precondition lets only one of two racing writers win.
"""

from __future__ import annotations

import asyncio
import calendar
import copy
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from .. import faults, logs, metrics
from ..cache import key_of
from ..context import Context
from ..kube import ApiError, pv_path, pvc_path
from ..runtime import CLASSES, PVCS, PVS
from ..workqueue import WorkQueue, process
from . import constants as C
from .decide import (
    BindStep,
    ClaimAction,
    Event,
    VolumeAction,
    claim_bind_patch,
    claim_status_patch,
    is_volume_released,
    missing_bind_steps,
    sync_claim,
    sync_volume,
    volume_bind_patch,
    volume_phase_patch,
    volume_unbind_patch,
)
from .index import VolumeIndex, claim_class, volume_class

log = logs.get("pv-binder")
COMPONENT = "persistentvolume-controller"

Provisioner = Callable[[dict, object], Awaitable[None]]  # (claim, decision)
Deleter = Callable[[dict], Awaitable[bool]]  # pv -> done?


def _claim_key_of_ref(ref: dict | None) -> str | None:
    if not ref or not ref.get("name"):
        return None
    return f"{ref.get('namespace') or ''}/{ref['name']}"


def _became_available(old: dict | None, new: dict) -> bool:
    if (new.get("status") or {}).get("phase") != "Available" or (new.get("spec") or {}).get(
            "claimRef"):
        return False
    return old is None or (old.get("status") or {}).get("phase") != "Available" or bool(
        (old.get("spec") or {}).get("claimRef"))


def _ts(s: str | None) -> float | None:
    if not s:
        return None
    try:
        return calendar.timegm(time.strptime(s, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return None


class PVController:
    name = "pv-binder"
    watches = (PVS, PVCS, CLASSES)

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cache = ctx.cache
        self.index = VolumeIndex()
        self.claims = WorkQueue("claims", resource="persistentvolumeclaims")
        self.volumes = WorkQueue("volumes", resource="persistentvolumes")
        # Plugins, registered by other controllers (pool provisioner, ...).
        self.provisioners: dict[str, Provisioner] = {}
        self.deleters: dict[str, Deleter] = {}
        self.recyclers: dict[str, Deleter] = {}
        self._explained: dict[str, tuple[float, str]] = {}
        self._by_claim: dict[str, set[str]] = {}
        self._reclaiming: set[str] = set()
        self._pending_by_class: dict[str, set[str]] = {}  # unbound claims by class  # claim key -> PVs whose claimRef names it
        self.cache.pvs.listen(self._on_volume)
        self.cache.pvcs.listen(self._on_claim)
        self.cache.classes.listen(self._on_class)
        ctx.pv_controller = self  # so plugins can find us
        metrics.register_collector("pv-collector", metrics.PVCollector(self.cache))

    # -- gather: store listeners (called synchronously on every change) ----------------------
    def _on_volume(self, name: str, old: dict | None, new: dict | None) -> None:
        if new is None:
            self.index.remove(name)
        else:
            self.index.upsert(new)
        self.volumes.add(name)
        if new is not None and _became_available(old, new):
            # A volume just became matchable: Pending claims of its class retry now
            # rather than at the next resync (upstream waits for the 15 s resync).
            cls = volume_class(new)
            for key in self._pending_by_class.get(cls, ()):
                self.claims.add(key)
        old_ck = _claim_key_of_ref(((old or {}).get("spec") or {}).get("claimRef"))
        new_ck = _claim_key_of_ref(((new or {}).get("spec") or {}).get("claimRef"))
        if old_ck and old_ck != new_ck:
            names = self._by_claim.get(old_ck)
            if names:
                names.discard(name)
                if not names:
                    del self._by_claim[old_ck]
            self.claims.add(old_ck)
        if new_ck:
            self._by_claim.setdefault(new_ck, set()).add(name)
            self.claims.add(new_ck)

    def _on_claim(self, key: str, old: dict | None, new: dict | None) -> None:
        self.claims.add(key)
        if old is not None:
            self._pending_by_class.get(claim_class(old), set()).discard(key)
        if new is not None and (new.get("status") or {}).get("phase") != "Bound":
            self._pending_by_class.setdefault(claim_class(new), set()).add(key)
        obj = new or old
        vol = (obj.get("spec") or {}).get("volumeName")
        if vol:
            self.volumes.add(vol)
        if new is None:
            # Volumes bound to a deleted claim must go Released.
            for pv_name in self._by_claim.get(key, ()):
                self.volumes.add(pv_name)

    def _on_class(self, name: str, old: dict | None, new: dict | None) -> None:
        for key, claim in self.cache.pvcs.items():
            if (claim.get("status") or {}).get("phase") != "Bound":
                self.claims.add(key)

    # -- loops -------------------------------------------------------------------------------
    async def run(self) -> None:
        n = max(1, self.ctx.options.workers)
        tasks = [
            asyncio.create_task(process(self.volumes, self._sync_volume_key,
                                        controller=self.name, log=log))
            for _ in range(max(1, n // 2))
        ]
        try:
            # Volumes first: PVs created while no binder ran are still phase Pending, and
            # only Available ones match. Settling them before the first claim sync makes
            # the first bind pick the smallest fit, not whichever PV went Available first.
            await self.volumes.wait_idle(timeout=30.0)
            tasks += [
                asyncio.create_task(process(self.claims, self._sync_claim_key,
                                            controller=self.name, log=log))
                for _ in range(n)
            ]
            tasks.append(asyncio.create_task(self._resync()))
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    async def _resync(self) -> None:
        """Periodic resync of everything not settled (upstream resyncs every 15 s)."""
        while True:
            await asyncio.sleep(self.ctx.options.resync_period)
            for key, claim in list(self.cache.pvcs.items()):
                if (claim.get("status") or {}).get("phase") != "Bound":
                    self.claims.add(key)
            for name, pv in list(self.cache.pvs.items()):
                if (pv.get("status") or {}).get("phase") != "Bound":
                    self.volumes.add(name)
            metrics.queue_depth.labels("pv-binder-claims").set(len(self.claims))
            metrics.queue_depth.labels("pv-binder-volumes").set(len(self.volumes))

    # -- claims ------------------------------------------------------------------------------
    async def _sync_claim_key(self, key: str) -> float | None:
        claim = self.cache.pvcs.get(key)
        if claim is None:
            self._explained.pop(key, None)
            return None
        d = sync_claim(claim, index=self.index, classes=self.cache.classes, now=time.time())
        a = d.action
        if a == ClaimAction.BIND:
            await self.bind(claim, d.volume_name)
        elif a == ClaimAction.SET_BOUND:
            volume = self.cache.pvs.get(d.volume_name or claim["spec"].get("volumeName"))
            await self._patch_claim(claim, claim_status_patch(claim, C.CLAIM_BOUND, volume),
                                    status=True)
        elif a in (ClaimAction.SET_PENDING, ClaimAction.SET_LOST):
            phase = "Pending" if a == ClaimAction.SET_PENDING else "Lost"
            await self._patch_claim(claim, claim_status_patch(claim, phase, None), status=True)
        elif a == ClaimAction.ASSIGN_DEFAULT_CLASS:
            await self._patch_claim(claim, {"spec": {"storageClassName": d.storage_class}})
        elif a == ClaimAction.ANNOTATE_PROVISIONER:
            claim = await self._annotate_provisioner(claim, d.provisioner)
        elif a == ClaimAction.PROVISION:
            plugin = self.provisioners.get(d.provisioner or C.POOL_PROVISIONER)
            if plugin is None:
                # The pool provisioner is not running (--controllers): say so once.
                d = replace(d, event=Event(C.WARNING, C.PROVISIONING_FAILED,
                    f'provisioner "{d.provisioner}" is not enabled in this volplane'))
            else:
                claim = await self._annotate_provisioner(claim, d.provisioner)
                await plugin(claim, d)
        self._emit_claim_event(claim, d)
        metrics.sync_total.labels(self.name, "claims", a.name.lower()).inc()
        return None

    def _emit_claim_event(self, claim: dict, d) -> None:
        ev = d.event
        if not ev:
            return
        message = self._explanation(claim, d) if d.explain else ev.message
        self.ctx.events.emit(claim, ev.type, ev.reason, message, component=COMPONENT)

    def _explanation(self, claim: dict, d) -> str:
        """The event message plus why no PV matched, computed at most once a minute."""
        key = key_of(claim)
        now = time.monotonic()
        hit = self._explained.get(key)
        if hit and now - hit[0] < 60:
            return hit[1]
        res = self.index.explain(claim, delay_binding=d.delay_binding)
        text = f"{d.event.message}; {res.reason}" if d.event else res.reason
        self._explained[key] = (now, text)
        return text

    async def _patch_claim(self, claim: dict, patch: dict | None, *, status: bool = False,
                           point: str | None = None) -> dict:
        """One merge patch with claim's resourceVersion as precondition; None = nothing."""
        if not patch:
            return claim
        md = claim["metadata"]
        body = {**patch, "metadata": {**(patch.get("metadata") or {}),
                                      "resourceVersion": md["resourceVersion"]}}
        try:
            new = await self.ctx.kube.merge_patch(
                pvc_path(md["namespace"], md["name"], "status" if status else ""), body)
        except ApiError as e:
            if e.conflict:
                metrics.conflicts.labels(self.name, "persistentvolumeclaims").inc()
                await self._reread_claim(md["namespace"], md["name"])
            raise
        self._written("persistentvolumeclaims", "patch-status" if status else "patch", new)
        if point:
            faults.point(point)
        return new

    async def _patch_volume(self, pv: dict, patch: dict | None, *, status: bool = False,
                            point: str | None = None) -> dict:
        if not patch:
            return pv
        md = pv["metadata"]
        body = {**patch, "metadata": {**(patch.get("metadata") or {}),
                                      "resourceVersion": md["resourceVersion"]}}
        try:
            new = await self.ctx.kube.merge_patch(pv_path(md["name"], "status" if status else ""),
                                                  body)
        except ApiError as e:
            if e.conflict:
                metrics.conflicts.labels(self.name, "persistentvolumes").inc()
                await self._reread_pv(md["name"])
            raise
        self._written("persistentvolumes", "patch-status" if status else "patch", new)
        if point:
            faults.point(point)
        return new

    async def _annotate_provisioner(self, claim: dict, provisioner: str) -> dict:
        ann = claim["metadata"].get("annotations") or {}
        if (ann.get(C.ANN_STORAGE_PROVISIONER) == provisioner
                and ann.get(C.ANN_BETA_STORAGE_PROVISIONER) == provisioner):
            return claim
        return await self._patch_claim(claim, {"metadata": {"annotations": {
            C.ANN_STORAGE_PROVISIONER: provisioner,
            C.ANN_BETA_STORAGE_PROVISIONER: provisioner}}})

    def _written(self, resource: str, verb: str, obj: dict | None) -> None:
        metrics.api_writes.labels(self.name, resource, verb).inc()
        if obj:
            store = self.cache.pvs if resource == "persistentvolumes" else self.cache.pvcs
            store.upsert(obj)

    # -- bind (the four writes) ----------------------------------------------------------------
    async def bind(self, claim: dict, volume_name: str) -> None:
        pv = self.cache.pvs.get(volume_name)
        if pv is None:
            return
        t0 = time.monotonic()
        steps = missing_bind_steps(pv, claim)
        was_bound = (claim.get("status") or {}).get("phase") == C.CLAIM_BOUND

        if BindStep.VOLUME_CLAIM_REF in steps:
            patch = volume_bind_patch(pv, claim)
            # Assume the PV taken before the write leaves, so no other worker picks it.
            assumed = copy.deepcopy(pv)
            assumed.setdefault("spec", {}).update(patch.get("spec") or {})
            original = self.cache.pvs.assume(assumed)
            try:
                pv = await self._patch_volume(pv, patch, point="bind-1")
            except BaseException:
                self.cache.pvs.restore(volume_name, original, assumed)
                raise
        if BindStep.VOLUME_PHASE in steps or BindStep.VOLUME_CLAIM_REF in steps:
            pv = await self._patch_volume(pv, volume_phase_patch(pv, C.VOLUME_BOUND),
                                          status=True, point="bind-2")
        claim = await self._patch_claim(claim, claim_bind_patch(claim, pv), point="bind-3")
        claim = await self._patch_claim(claim, claim_status_patch(claim, C.CLAIM_BOUND, pv),
                                        status=True, point="bind-4")
        md = claim["metadata"]
        if not was_bound:
            created = _ts(md.get("creationTimestamp"))
            if created:
                metrics.claim_bind_seconds.labels(claim_class(claim)).observe(
                    max(0.0, time.time() - created))
        log.info("bound", kind="PersistentVolumeClaim", namespace=md["namespace"],
                 name=md["name"], volume=volume_name, action="bind", steps=len(steps),
                 duration_ms=round((time.monotonic() - t0) * 1000, 1))

    async def _reread_pv(self, name: str) -> None:
        try:
            self.cache.pvs.upsert(await self.ctx.kube.get(pv_path(name)))
        except ApiError as e:
            if e.not_found:
                self.cache.pvs.remove(name)

    async def _reread_claim(self, ns: str, name: str) -> None:
        try:
            self.cache.pvcs.upsert(await self.ctx.kube.get(pvc_path(ns, name)))
        except ApiError as e:
            if e.not_found:
                self.cache.pvcs.remove(f"{ns}/{name}")

    # -- volumes -----------------------------------------------------------------------------
    async def _sync_volume_key(self, name: str) -> float | None:
        pv = self.cache.pvs.get(name)
        if pv is None:
            return None
        d = self._decide_volume(pv)
        if d.verify_claim:
            # Upstream's stale-cache guard: never release a volume because our cache
            # missed its claim; ask the API server before acting.
            ref = pv["spec"]["claimRef"]
            await self._reread_claim(ref.get("namespace") or "", ref["name"])
            d = self._decide_volume(pv)
        a = d.action
        if a == VolumeAction.SET_PHASE:
            await self._patch_volume(pv, volume_phase_patch(pv, d.phase, d.status_message),
                                     status=True)
        elif a == VolumeAction.UNBIND:
            pv = await self._patch_volume(pv, volume_unbind_patch(pv), point="unbind-1")
            await self._patch_volume(pv, volume_phase_patch(pv, C.VOLUME_AVAILABLE),
                                     status=True)
        elif a in (VolumeAction.RECLAIM_DELETE, VolumeAction.RECLAIM_RECYCLE):
            await self._reclaim(pv, d)
        if d.event:
            self.ctx.events.emit(pv, d.event.type, d.event.reason, d.event.message,
                                 component=COMPONENT)
        if d.claim_event and d.enqueue_claim is None:
            ref = (pv.get("spec") or {}).get("claimRef") or {}
            claim = self.cache.pvcs.get(_claim_key_of_ref(ref) or "")
            if claim:
                self.ctx.events.emit(claim, d.claim_event.type, d.claim_event.reason,
                                     d.claim_event.message, component=COMPONENT)
        if d.enqueue_claim:
            self.claims.add(d.enqueue_claim)
        metrics.sync_total.labels(self.name, "volumes", a.name.lower()).inc()
        return None

    def _decide_volume(self, pv: dict):
        return sync_volume(pv, claims=self.cache.pvcs, classes=self.cache.classes,
                           deleters=set(self.deleters), recyclers=set(self.recyclers))

    async def _reclaim(self, pv: dict, d) -> None:
        """Hand a Released volume to its deleter/recycler, once at a time per volume."""
        name = pv["metadata"]["name"]
        if name in self._reclaiming:
            return
        plugins = self.deleters if d.action == VolumeAction.RECLAIM_DELETE else self.recyclers
        plugin = plugins.get(d.provisioner)
        if plugin is None:
            return
        # Re-check on fresh objects right before the irreversible step.
        await self._reread_pv(name)
        fresh = self.cache.pvs.get(name)
        if fresh is None or not is_volume_released(fresh, self.cache.pvcs):
            return
        self._reclaiming.add(name)
        try:
            await plugin(fresh)
        finally:
            self._reclaiming.discard(name)
