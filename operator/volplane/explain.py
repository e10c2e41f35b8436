"""`volplane explain pvc NS/NAME`: why is this claim (still) Pending?

A read-only dry run against the live cluster: it lists PVs and StorageClasses,
runs the same pure decision functions the controller runs, and prints the
decision plus per-criterion counts of why each PV was rejected. It writes
nothing.
"""

from __future__ import annotations

from .kube import ApiError, Kube, pvc_path
from .pv.constants import POOL_PROVISIONER
from .pv.decide import ClaimAction, sync_claim
from .pv.index import HUMAN_ORDER, VolumeIndex


async def explain_claim(kubeconfig: str | None, namespace: str, name: str) -> str:
    kube = Kube(kubeconfig, workers=2)
    try:
        try:
            claim = await kube.get(pvc_path(namespace, name))
        except ApiError as e:
            if e.not_found:
                return f"persistentvolumeclaim {namespace}/{name} not found"
            raise
        pvs = (await kube.get("/api/v1/persistentvolumes"))["items"]
        classes = {c["metadata"]["name"]: c for c in
                   (await kube.get("/apis/storage.k8s.io/v1/storageclasses"))["items"]}
    finally:
        await kube.aclose()
    index = VolumeIndex()
    for pv in pvs:
        index.upsert(pv)
    return render(claim, index, classes)


def render(claim: dict, index: VolumeIndex, classes: dict) -> str:
    md, spec = claim["metadata"], claim.get("spec") or {}
    phase = (claim.get("status") or {}).get("phase", "Pending")
    lines = [f"claim {md['namespace']}/{md['name']}: phase {phase}"]
    req = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
    lines.append(f"  requests {req}, class {spec.get('storageClassName')!r}, "
                 f"accessModes {spec.get('accessModes')}, "
                 f"volumeMode {spec.get('volumeMode') or 'Filesystem'}")
    # A dry run: volplane's own pool provisioner counts as enabled.
    d = sync_claim(claim, index=index, classes=classes, provisioners={POOL_PROVISIONER})
    lines.append(f"decision: {d.action.name}"
                 + (f" volume {d.volume_name}" if d.volume_name else "")
                 + (f" provisioner {d.provisioner}" if getattr(d, 'provisioner', None) else ""))
    if d.event:
        lines.append(f"event: {d.event.type} {d.event.reason}: {d.event.message}")
    if d.action != ClaimAction.BIND and not spec.get("volumeName"):
        res = index.explain(claim, delay_binding=getattr(d, "delay_binding", False))
        lines.append(f"matching: {res.reason}")
        # The same breakdown as the claim's event, one criterion a line, in the order a
        # person checks them (pv/index.py HUMAN_ORDER).
        for criterion in HUMAN_ORDER:
            if res.counts.get(criterion):
                lines.append(f"  {res.counts[criterion]:6d}  {criterion}")
    return "\n".join(lines)
