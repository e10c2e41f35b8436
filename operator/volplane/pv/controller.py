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
import copy
import time

from .. import faults, logs, metrics
from ..context import Context
from ..kinds import (
    CLASSES,
    PODS,
    PODS_BY_CLAIM,
    PVCS,
    PVS,
    PVS_BY_CLAIM,
    UNBOUND_CLAIMS_BY_CLASS,
    pod_claim_keys,
)
from ..kube import ApiError, pv_path, pvc_path
from ..objects import key_of, parse_rfc3339, ref_key, rv_int
from ..workqueue import WorkQueue, process
from . import constants as C
from .decide import (
    ClaimAction,
    PatchClaim,
    PatchVolume,
    Provision,
    Reclaim,
    is_volume_released,
    sync_claim,
    sync_expansion,
    sync_volume,
)
from .index import VolumeIndex, claim_class, volume_class
from .plugins import VolumePlugin

log = logs.get("pv-binder")
COMPONENT = "persistentvolume-controller"

def _became_available(old: dict | None, new: dict) -> bool:
    if (new.get("status") or {}).get("phase") != "Available" or (new.get("spec") or {}).get(
            "claimRef"):
        return False
    return old is None or (old.get("status") or {}).get("phase") != "Available" or bool(
        (old.get("spec") or {}).get("claimRef"))


class PVController:
    name = "pv-binder"
    # Pods, as upstream's podIndexer: which pods use a claim (WaitForPodScheduled, and
    # no recycling while a pod still uses the released claim).
    watches = (PVS, PVCS, CLASSES, PODS)

    def __init__(self, ctx: Context):
        self.ctx = ctx
        inf = ctx.informers
        self.pvs = inf.lister(PVS)
        self.pvcs = inf.lister(PVCS)
        self.classes = inf.lister(CLASSES)
        self.pods = inf.lister(PODS)
        self.pods_by_claim = inf.index(PODS_BY_CLAIM)
        self.pvs_by_claim = inf.index(PVS_BY_CLAIM)
        self.unbound_by_class = inf.index(UNBOUND_CLAIMS_BY_CLASS)
        # The matching index: the PV lister sorted for findBestMatch, plus the PVs this
        # controller assumed bound before its write landed (upstream's PV controller
        # keeps the same kind of cache beside its informer). `_stale` names the PVs
        # whose lister entry changed since the index last looked.
        self.index = VolumeIndex()
        self._stale: set[str] = set()
        self.claims = WorkQueue("claims", resource="persistentvolumeclaims",
                                depth=metrics.queue_depth.labels("pv-binder-claims").set)
        self.volumes = WorkQueue("volumes", resource="persistentvolumes",
                                 depth=metrics.queue_depth.labels("pv-binder-volumes").set)
        self.expansions = WorkQueue("expansions",  # bound claims asking for more space
                                    resource="persistentvolumeclaims")
        # Volume plugins by provisioner / driver name (pv/plugins.py), given by the wiring.
        self.plugins: dict[str, VolumePlugin] = {}
        self._explained: dict[str, tuple[float, str]] = {}
        self._reclaiming: set[str] = set()
        inf.listen(PVS, self._on_volume)
        inf.listen(PVCS, self._on_claim)
        inf.listen(CLASSES, self._on_class)
        inf.listen(PODS, self._on_pod)
        metrics.register_collector("pv-collector", metrics.PVCollector(self.pvs, self.pvcs))

    # -- plugins -------------------------------------------------------------------------
    def use_plugins(self, plugins) -> None:
        """The wiring's injection: the volume plugins this controller may call."""
        for plugin in plugins:
            self.plugins[plugin.name] = plugin
            plugin.attach(self)

    def retry_claims(self, provisioner: str) -> None:
        """PluginHost: the plugin for `provisioner` has room again (space freed, a pool
        appeared): its unbound claims without a volume are synced again."""
        for cls in self.unbound_by_class.keys():
            sc = self.classes.get(cls)
            if sc is None or sc.get("provisioner") != provisioner:
                continue
            for key in self.unbound_by_class.get(cls):
                claim = self.pvcs.get(key)
                if claim is not None and not (claim.get("spec") or {}).get("volumeName"):
                    self.claims.add(key)

    # -- gather: listeners (Kopf's event handler calls them; they only enqueue keys) -------
    def _on_volume(self, name: str, old: dict | None, new: dict | None) -> None:
        self._stale.add(name)
        self.volumes.add(name)
        if new is not None and _became_available(old, new):
            # A volume just became matchable: Pending claims of its class retry now
            # rather than at the next resync (upstream waits for the 15 s resync).
            for key in self.unbound_by_class.get(volume_class(new)):
                self.claims.add(key)
        old_ck = ref_key(((old or {}).get("spec") or {}).get("claimRef"))
        new_ck = ref_key(((new or {}).get("spec") or {}).get("claimRef"))
        if old_ck and old_ck != new_ck:
            self.claims.add(old_ck)
        if new_ck:
            self.claims.add(new_ck)

    def _on_claim(self, key: str, old: dict | None, new: dict | None) -> None:
        self.claims.add(key)
        if new is not None and self._expansion_plugin(new) is not None:
            self.expansions.add(key)
        obj = new or old or {}
        vol = (obj.get("spec") or {}).get("volumeName")
        if vol:
            self.volumes.add(vol)
        if new is None:
            # Volumes bound to a deleted claim must go Released.
            for pv_name in self.pvs_by_claim.get(key):
                self.volumes.add(pv_name)

    def _on_pod(self, key: str, old: dict | None, new: dict | None) -> None:
        """A pod of a claim came, was scheduled or went: its (unbound) claims re-emit
        their WaitForFirstConsumer event, and PVs released from them may now recycle."""
        def shape(pod: dict | None) -> tuple:
            if pod is None:
                return ()
            return (((pod.get("spec") or {}).get("nodeName")), pod_claim_keys(pod))

        if shape(old) == shape(new):
            return
        for claim_key in set(pod_claim_keys(old or {})) | set(pod_claim_keys(new or {})):
            if claim_key in self.pvcs:
                self.claims.add(claim_key)
            if new is None:
                for pv_name in self.pvs_by_claim.get(claim_key):
                    self.volumes.add(pv_name)

    def _pods_of(self, claim_key: str) -> list[dict]:
        """The pods that use the claim ``namespace/name`` (upstream findPodsByPVCKey)."""
        return [p for k in self.pods_by_claim.get(claim_key)
                if (p := self.pods.get(k)) is not None]

    def _on_class(self, name: str, old: dict | None, new: dict | None) -> None:
        self._enqueue_unbound_claims()

    def _enqueue_unbound_claims(self) -> None:
        for cls in self.unbound_by_class.keys():
            for key in self.unbound_by_class.get(cls):
                self.claims.add(key)

    def _refresh_index(self) -> None:
        """Bring the matching index up to the PV lister for the PVs that changed. A PV
        this controller assumed bound stays assumed until the lister shows a newer one."""
        while self._stale:
            name = self._stale.pop()
            pv = self.pvs.get(name)
            if pv is None:
                self.index.remove(name)
                continue
            cur = self.index.get(name)
            if cur is None or rv_int(pv) > rv_int(cur):
                self.index.upsert(pv)

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
            tasks.append(asyncio.create_task(process(self.expansions, self._sync_expansion_key,
                                                     controller=self.name, log=log)))
            tasks.append(asyncio.create_task(self._resync()))
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    async def _resync(self) -> None:
        """Periodic resync of everything not settled (upstream resyncs every 15 s)."""
        while True:
            await asyncio.sleep(self.ctx.options.resync_period)
            self._enqueue_unbound_claims()
            for name, pv in list(self.pvs.items()):
                if (pv.get("status") or {}).get("phase") != "Bound":
                    self.volumes.add(name)

    # -- claims ------------------------------------------------------------------------------
    async def _sync_claim_key(self, key: str) -> float | None:
        claim = self.pvcs.get(key)
        if claim is None:
            self._explained.pop(key, None)
            return None
        self._refresh_index()
        d = sync_claim(claim, index=self.index, classes=self.classes,
                       provisioners=set(self.plugins), pods=self._pods_of(key))
        if d.writes:
            volume = self.index.get(d.volume_name) if d.volume_name else None
            was_bound = (claim.get("status") or {}).get("phase") == C.CLAIM_BOUND
            t0 = time.monotonic()
            claim, _ = await self._apply(d.writes, claim, volume)
            self._log_claim(claim, d, t0, was_bound)
        self._emit_claim_event(claim, d)
        metrics.sync_total.labels(self.name, "claims", d.action.name.lower()).inc()
        return None

    def _log_claim(self, claim: dict, d, t0: float, was_bound: bool) -> None:
        md = claim["metadata"]
        took = round((time.monotonic() - t0) * 1000, 1)
        if d.action is not ClaimAction.BIND:
            log.info(d.action.value, kind="PersistentVolumeClaim", namespace=md["namespace"],
                     name=md["name"], reason=d.message, writes=len(d.writes), duration_ms=took)
            return
        if not was_bound:
            created = parse_rfc3339(md.get("creationTimestamp"))
            if created:
                metrics.claim_bind_seconds.labels(claim_class(claim)).observe(
                    max(0.0, time.time() - created))
        log.info("bound", kind="PersistentVolumeClaim", namespace=md["namespace"],
                 name=md["name"], volume=d.volume_name, action="bind", steps=len(d.steps),
                 reason=d.message, duration_ms=took)

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

    async def _patch_pv(self, pv: dict, patch: dict | None, *, status: bool = False,
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

    def _written(self, resource: str, verb: str, obj: dict | None) -> None:
        metrics.api_writes.labels(self.name, resource, verb).inc()
        self._put(resource, obj)

    def _put(self, resource: str, obj: dict | None) -> None:
        """An object the API returned: the listers (and the matching index) see it now."""
        if resource == "persistentvolumes":
            pv = self.pvs.put(obj)
            if pv is not None:
                self.index.upsert(pv)
        else:
            self.pvcs.put(obj)

    # -- act: apply exactly the decision's writes ------------------------------------------
    async def _apply(self, writes, claim: dict | None, pv: dict | None
                     ) -> tuple[dict | None, dict | None]:
        """Carry out a decision's writes in order. Each patch carries the resourceVersion
        of the object it was decided on, or of this decision's previous write to the same
        object; a 409 means the decision was made on stale data: the object is read
        again, the key retried, and the decision made anew (never the write forced)."""
        for w in writes:
            if isinstance(w, PatchVolume):
                pv = await self._patch_volume(pv, w)
            elif isinstance(w, PatchClaim):
                claim = await self._patch_claim(claim, w.patch, status=w.status,
                                                point=w.step or None)
            elif isinstance(w, Provision):
                await self.plugins[w.provisioner].provision(claim, w.storage_class,
                                                           w.selected_node)
            elif isinstance(w, Reclaim):
                await self._reclaim(pv, w)
        return claim, pv

    async def _patch_volume(self, pv: dict | None, w: PatchVolume) -> dict | None:
        if pv is None:
            return None
        if not w.assume:
            return await self._patch_pv(pv, w.patch, status=w.status, point=w.step or None)
        # Assume the PV patched before the write leaves, so no other worker picks it.
        assumed = copy.deepcopy(pv)
        assumed.setdefault("spec", {}).update(w.patch.get("spec") or {})
        self.index.upsert(assumed)
        try:
            return await self._patch_pv(pv, w.patch, status=w.status, point=w.step or None)
        except BaseException:
            if self.index.get(w.name) is assumed:
                self.index.upsert(self.pvs.get(w.name) or pv)
            raise

    async def _reread_pv(self, name: str) -> None:
        try:
            self._put("persistentvolumes", await self.ctx.kube.get(pv_path(name)))
        except ApiError as e:
            if e.not_found:
                self.pvs.gone(name)
                self.index.remove(name)

    async def _reread_claim(self, ns: str, name: str) -> None:
        try:
            self._put("persistentvolumeclaims", await self.ctx.kube.get(pvc_path(ns, name)))
        except ApiError as e:
            if e.not_found:
                self.pvcs.gone(f"{ns}/{name}")

    # -- volumes -----------------------------------------------------------------------------
    async def _sync_volume_key(self, name: str) -> float | None:
        self._refresh_index()
        pv = self.pvs.get(name)
        if pv is None:
            return None
        d = self._decide_volume(pv)
        if d.verify_claim:
            # Upstream's stale-cache guard: never release a volume because our cache
            # missed its claim; ask the API server before acting.
            ref = pv["spec"]["claimRef"]
            await self._reread_claim(ref.get("namespace") or "", ref["name"])
            d = self._decide_volume(pv)
        if d.writes:
            await self._apply(d.writes, None, pv)
            log.info(d.action.value, kind="PersistentVolume", name=name, phase=d.phase,
                     reason=d.message, writes=len(d.writes))
        if d.event:
            self.ctx.events.emit(pv, d.event.type, d.event.reason, d.event.message,
                                 component=COMPONENT)
        if d.claim_event and d.enqueue_claim is None:
            ref = (pv.get("spec") or {}).get("claimRef") or {}
            claim = self.pvcs.get(ref_key(ref) or "")
            if claim:
                self.ctx.events.emit(claim, d.claim_event.type, d.claim_event.reason,
                                     d.claim_event.message, component=COMPONENT)
        if d.enqueue_claim:
            self.claims.add(d.enqueue_claim)
        metrics.sync_total.labels(self.name, "volumes", d.action.name.lower()).inc()
        return None

    def _decide_volume(self, pv: dict):
        claim_key = ref_key((pv.get("spec") or {}).get("claimRef"))
        return sync_volume(pv, claims=self.pvcs, deleters=set(self.plugins),
                           recyclers=set(self.plugins),
                           pods=self._pods_of(claim_key) if claim_key else ())

    async def _reclaim(self, pv: dict | None, w: Reclaim) -> None:
        """Hand a Released volume to its deleter/recycler, once at a time per volume."""
        if pv is None:
            return
        name = pv["metadata"]["name"]
        plugin = self.plugins.get(w.provisioner)
        if name in self._reclaiming or plugin is None:
            return
        # Re-check on fresh objects right before the irreversible step.
        await self._reread_pv(name)
        fresh = self.pvs.get(name)
        if fresh is None or not is_volume_released(fresh, self.pvcs):
            return
        self._reclaiming.add(name)
        try:
            if w.recycle:
                await plugin.recycle(fresh)
            else:
                await plugin.delete(fresh)
        finally:
            self._reclaiming.discard(name)

    # -- expansion ---------------------------------------------------------------------------
    def _expansion_plugin(self, claim: dict) -> str | None:
        volume = self.pvs.get((claim.get("spec") or {}).get("volumeName") or "")
        return sync_expansion(claim, volume, classes=self.classes, expanders=set(self.plugins))

    async def _sync_expansion_key(self, key: str) -> None:
        claim = self.pvcs.get(key)
        if claim is None:
            return
        name = self._expansion_plugin(claim)
        if name is not None:
            await self.plugins[name].expand(claim, self.pvs[claim["spec"]["volumeName"]])
