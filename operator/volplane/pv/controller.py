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

from .. import faults, logs, metrics
from ..cache import key_of
from ..context import Context
from ..kube import ApiError, pv_path, pvc_path
from ..runtime import CLASSES, PVCS, PVS
from ..workqueue import WorkQueue
from . import constants as C
from .decide import ClaimAction, VolumeAction, sync_claim, sync_volume
from .index import VolumeIndex

log = logs.get("pv-binder")
COMPONENT = "persistentvolume-controller"

Provisioner = Callable[[dict, object], Awaitable[None]]  # (claim, decision)
Deleter = Callable[[dict], Awaitable[bool]]  # pv -> done?


def _claim_key_of_ref(ref: dict | None) -> str | None:
    if not ref or not ref.get("name"):
        return None
    return f"{ref.get('namespace') or ''}/{ref['name']}"


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
        self.claims = WorkQueue("claims")
        self.volumes = WorkQueue("volumes")
        # Plugins, registered by other controllers (pool provisioner, ...).
        self.provisioners: dict[str, Provisioner] = {}
        self.deleters: dict[str, Deleter] = {}
        self.recyclers: dict[str, Deleter] = {}
        self._explained: dict[str, tuple[float, str]] = {}
        self._by_claim: dict[str, set[str]] = {}  # claim key -> PVs whose claimRef names it
        self.cache.pvs.listen(self._on_volume)
        self.cache.pvcs.listen(self._on_claim)
        self.cache.classes.listen(self._on_class)
        ctx.pv_controller = self  # so plugins can find us

    # -- gather: store listeners (called synchronously on every change) ----------------------
    def _on_volume(self, name: str, old: dict | None, new: dict | None) -> None:
        if new is None:
            self.index.remove(name)
        else:
            self.index.upsert(new)
        self.volumes.add(name)
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
            asyncio.create_task(self._worker(self.claims, self._sync_claim_key)) for _ in range(n)
        ]
        tasks += [
            asyncio.create_task(self._worker(self.volumes, self._sync_volume_key))
            for _ in range(max(1, n // 2))
        ]
        tasks.append(asyncio.create_task(self._resync()))
        try:
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

    async def _worker(self, queue: WorkQueue, sync) -> None:
        while True:
            key = await queue.get()
            try:
                requeue = await sync(key)
                queue.forget(key)
                if requeue:
                    queue.add_after(key, requeue)
            except ApiError as e:
                outcome = "conflict" if e.conflict else "error"
                metrics.sync_total.labels(self.name, queue.name, outcome).inc()
                if not e.conflict:
                    log.warning("sync failed", key=key, queue=queue.name, error=str(e))
                queue.add_rate_limited(key)
            except Exception as e:  # never let one object kill a worker
                log.exception("sync crashed", key=key, queue=queue.name, error=str(e))
                queue.add_rate_limited(key)
            finally:
                queue.done(key)

    # -- claims ------------------------------------------------------------------------------
    async def _sync_claim_key(self, key: str) -> float | None:
        claim = self.cache.pvcs.get(key)
        if claim is None:
            self._explained.pop(key, None)
            return None
        if claim["metadata"].get("deletionTimestamp") and not (claim.get("spec") or {}).get(
            "volumeName"
        ):
            return None
        d = sync_claim(claim, index=self.index, classes=self.cache.classes, now=time.time())
        a = d.action
        if a == ClaimAction.BIND:
            await self.bind(claim, d.volume_name)
        elif a in (ClaimAction.SET_PENDING, ClaimAction.SET_LOST, ClaimAction.SET_BOUND):
            phase = {
                ClaimAction.SET_PENDING: "Pending",
                ClaimAction.SET_LOST: "Lost",
                ClaimAction.SET_BOUND: "Bound",
            }[a]
            await self._set_claim_phase(claim, phase)
        elif a == ClaimAction.ANNOTATE_PROVISIONER:
            await self._annotate_provisioner(claim, d.provisioner)
        elif a == ClaimAction.PROVISION:
            plugin = self.provisioners.get(d.provisioner or C.POOL_PROVISIONER)
            if plugin is not None:
                await plugin(claim, d)
        self._emit_claim_event(claim, d)
        metrics.sync_total.labels(self.name, "claims", a.name.lower()).inc()
        if a == ClaimAction.WAIT or (a == ClaimAction.NOOP and d.event):
            return None  # the resync loop comes back for Pending claims
        return None

    def _emit_claim_event(self, claim: dict, d) -> None:
        ev = d.event
        if not ev:
            return
        message = ev.message
        if ev.reason == C.FAILED_BINDING and getattr(d, "explain", False):
            message = self._explanation(claim, d)
        self.ctx.events.emit(claim, ev.type, ev.reason, message, component=COMPONENT)

    def _explanation(self, claim: dict, d) -> str:
        """The detailed 'why no PV matched' text, computed at most once per quiet period."""
        key = key_of(claim)
        now = time.monotonic()
        hit = self._explained.get(key)
        if hit and now - hit[0] < 60:
            return hit[1]
        res = self.index.explain(claim, delay_binding=getattr(d, "delay_binding", False))
        text = res.reason
        if d.event and d.event.message and d.event.message not in text:
            text = f"{d.event.message}; {text}"
        self._explained[key] = (now, text)
        return text

    async def _set_claim_phase(self, claim: dict, phase: str) -> None:
        if (claim.get("status") or {}).get("phase") == phase:
            return
        md = claim["metadata"]
        new = await self.ctx.kube.merge_patch(
            pvc_path(md["namespace"], md["name"], "status"),
            {"metadata": {"resourceVersion": md["resourceVersion"]}, "status": {"phase": phase}},
        )
        self._written("persistentvolumeclaims", "patch-status", new)
        if phase == "Lost":
            log.info("claim lost", namespace=md["namespace"], name=md["name"], action="set-lost")

    async def _annotate_provisioner(self, claim: dict, provisioner: str) -> None:
        md = claim["metadata"]
        ann = md.get("annotations") or {}
        if (
            ann.get(C.ANN_STORAGE_PROVISIONER) == provisioner
            and ann.get(C.ANN_BETA_STORAGE_PROVISIONER) == provisioner
        ):
            return
        new = await self.ctx.kube.merge_patch(
            pvc_path(md["namespace"], md["name"]),
            {
                "metadata": {
                    "resourceVersion": md["resourceVersion"],
                    "annotations": {
                        C.ANN_STORAGE_PROVISIONER: provisioner,
                        C.ANN_BETA_STORAGE_PROVISIONER: provisioner,
                    },
                }
            },
        )
        self._written("persistentvolumeclaims", "patch", new)

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
        cmd = claim["metadata"]
        ns, cname, cuid = cmd["namespace"], cmd["name"], cmd["uid"]
        t0 = time.monotonic()
        kube = self.ctx.kube

        # 1. PV spec.claimRef
        ref = (pv.get("spec") or {}).get("claimRef") or {}
        if not (
            ref.get("name") == cname
            and (ref.get("namespace") or "") == ns
            and ref.get("uid") == cuid
        ):
            by_controller = not (
                ref.get("name") == cname
                and (ref.get("namespace") or "") == ns
                and ref.get("uid") in (None, "", cuid)
            )
            new_ref = {
                "kind": "PersistentVolumeClaim",
                "apiVersion": "v1",
                "namespace": ns,
                "name": cname,
                "uid": cuid,
                "resourceVersion": cmd.get("resourceVersion"),
            }
            patch: dict = {
                "metadata": {"resourceVersion": pv["metadata"]["resourceVersion"]},
                "spec": {"claimRef": new_ref},
            }
            if by_controller:
                patch["metadata"]["annotations"] = {C.ANN_BOUND_BY_CONTROLLER: "yes"}
            assumed = copy.deepcopy(pv)
            assumed["spec"]["claimRef"] = new_ref
            original = self.cache.pvs.assume(assumed)
            try:
                pv = await kube.merge_patch(pv_path(volume_name), patch)
            except ApiError as e:
                self.cache.pvs.restore(volume_name, original, assumed)
                if e.conflict:
                    metrics.conflicts.labels(self.name, "persistentvolumes").inc()
                    await self._reread_pv(volume_name)
                raise
            self._written("persistentvolumes", "patch", pv)
            faults.point("bind-1")

        # 2. PV status.phase = Bound
        if (pv.get("status") or {}).get("phase") != "Bound":
            pv = await kube.merge_patch(
                pv_path(volume_name, "status"),
                {
                    "metadata": {"resourceVersion": pv["metadata"]["resourceVersion"]},
                    "status": {"phase": "Bound", "message": None, "reason": None},
                },
            )
            self._written("persistentvolumes", "patch-status", pv)
            faults.point("bind-2")

        # 3. PVC spec.volumeName + annotations
        ann = cmd.get("annotations") or {}
        vname = (claim.get("spec") or {}).get("volumeName")
        if vname != volume_name or ann.get(C.ANN_BIND_COMPLETED) != "yes":
            anns = {C.ANN_BIND_COMPLETED: "yes"}
            if not vname:
                anns[C.ANN_BOUND_BY_CONTROLLER] = "yes"
            try:
                claim = await kube.merge_patch(
                    pvc_path(ns, cname),
                    {
                        "metadata": {
                            "resourceVersion": cmd["resourceVersion"],
                            "annotations": anns,
                        },
                        "spec": {"volumeName": volume_name},
                    },
                )
            except ApiError as e:
                if e.conflict:
                    metrics.conflicts.labels(self.name, "persistentvolumeclaims").inc()
                    await self._reread_claim(ns, cname)
                raise
            self._written("persistentvolumeclaims", "patch", claim)
            faults.point("bind-3")

        # 4. PVC status Bound with the PV's capacity and access modes
        st = claim.get("status") or {}
        pvspec = pv.get("spec") or {}
        if (
            st.get("phase") != "Bound"
            or st.get("capacity") != pvspec.get("capacity")
            or st.get("accessModes") != pvspec.get("accessModes")
        ):
            claim = await kube.merge_patch(
                pvc_path(ns, cname, "status"),
                {
                    "metadata": {"resourceVersion": claim["metadata"]["resourceVersion"]},
                    "status": {
                        "phase": "Bound",
                        "capacity": pvspec.get("capacity"),
                        "accessModes": pvspec.get("accessModes"),
                    },
                },
            )
            self._written("persistentvolumeclaims", "patch-status", claim)
            faults.point("bind-4")
            created = _ts(cmd.get("creationTimestamp"))
            if created:
                metrics.claim_bind_seconds.labels(pvspec.get("storageClassName") or "").observe(
                    max(0.0, time.time() - created)
                )
        log.info(
            "bound",
            kind="PersistentVolumeClaim",
            namespace=ns,
            name=cname,
            volume=volume_name,
            action="bind",
            duration_ms=round((time.monotonic() - t0) * 1000, 1),
        )

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
        d = sync_volume(
            pv,
            claims=self.cache.pvcs,
            classes=self.cache.classes,
            deleters=set(self.deleters),
            recyclers=set(self.recyclers),
        )
        a = d.action
        if a == VolumeAction.SET_PHASE:
            await self._set_volume_phase(pv, d.phase, d.message)
        elif a == VolumeAction.UNBIND:
            await self._unbind(pv)
        elif a == VolumeAction.RECLAIM_DELETE:
            await self._set_volume_phase(pv, "Released", None)
            deleter = self.deleters.get(d.provisioner)
            if deleter is not None:
                await deleter(pv)
        elif a == VolumeAction.RECLAIM_RECYCLE:
            await self._set_volume_phase(pv, "Released", None)
            recycler = self.recyclers.get(d.provisioner)
            if recycler is not None:
                await recycler(pv)
        if d.event:
            self.ctx.events.emit(
                pv, d.event.type, d.event.reason, d.event.message, component=COMPONENT
            )
        metrics.sync_total.labels(self.name, "volumes", a.name.lower()).inc()
        return None

    async def _set_volume_phase(self, pv: dict, phase: str, message: str | None) -> dict:
        st = pv.get("status") or {}
        if st.get("phase") == phase and (message is None or st.get("message") == message):
            return pv
        new = await self.ctx.kube.merge_patch(
            pv_path(pv["metadata"]["name"], "status"),
            {
                "metadata": {"resourceVersion": pv["metadata"]["resourceVersion"]},
                "status": {"phase": phase, "message": message},
            },
        )
        self._written("persistentvolumes", "patch-status", new)
        log.info(
            "volume phase",
            kind="PersistentVolume",
            name=pv["metadata"]["name"],
            action="set-phase",
            phase=phase,
        )
        return new

    async def _unbind(self, pv: dict) -> None:
        """Upstream unbindVolume: undo our own bind entirely; keep a user's pre-bind name."""
        md = pv["metadata"]
        ann = md.get("annotations") or {}
        if ann.get(C.ANN_BOUND_BY_CONTROLLER):
            patch = {
                "metadata": {
                    "resourceVersion": md["resourceVersion"],
                    "annotations": {C.ANN_BOUND_BY_CONTROLLER: None},
                },
                "spec": {"claimRef": None},
            }
        else:
            patch = {
                "metadata": {"resourceVersion": md["resourceVersion"]},
                "spec": {"claimRef": {"uid": None, "resourceVersion": None}},
            }
        new = await self.ctx.kube.merge_patch(pv_path(md["name"]), patch)
        self._written("persistentvolumes", "patch", new)
        faults.point("unbind-1")
        await self._set_volume_phase(new, "Available", None)
