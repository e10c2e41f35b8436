"""Small helpers for the e2e suite: polling, generic object access and Events."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pykube
import pykube.http
import requests
from urllib3.util.retry import Retry

T = TypeVar("T")


def pykube_client(kubeconfig: str, timeout: float | None = 30) -> pykube.HTTPClient:
    """The tests' pykube client: every request that gets 429 Too Many Requests is sent
    again after the server's Retry-After (up to 15 times). The API server answers 429 for a
    CRD's resources while their storage is initializing (right after the CRD is made or
    re-made) and under API Priority and Fairness when a start-up burst fills a priority
    level; neither is an answer a test should see. 429 means the request was not
    processed, so resending is safe for every method."""
    retry = Retry(total=None, connect=0, read=0, redirect=0, other=0, status=15,
                  status_forcelist=(429,), allowed_methods=None, backoff_factor=0.5,
                  backoff_max=4, respect_retry_after_header=True, raise_on_status=False)
    config = pykube.KubeConfig.from_file(kubeconfig)
    adapter = pykube.http.KubernetesHTTPAdapter(config, max_retries=retry)
    return pykube.HTTPClient(config, timeout=timeout, http_adapter=adapter)


_factories: dict[tuple[int, str, str], type[pykube.objects.APIObject]] = {}


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.2,
    message: str = "condition",
) -> T:
    """Calls predicate until it returns something truthy and returns that.

    Exceptions from the predicate count as "not yet" (the object may not exist yet);
    on timeout, raises TimeoutError with `message`, the last value and last exception.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    last_exc: BaseException | None = None
    while True:
        try:
            last = predicate()
            last_exc = None
            if last:
                return last
        except (pykube.exceptions.PyKubeError, requests.RequestException, KeyError,
                IndexError, TypeError, AssertionError) as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f"; last value: {last!r}"
            if last_exc is not None:
                detail += f"; last error: {last_exc!r}"
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {message}{detail}")
        time.sleep(interval)


def holds_for(
    predicate: Callable[[], Any],
    duration: float,
    interval: float = 0.5,
    message: str = "condition",
) -> None:
    """Asserts predicate stays truthy for `duration` seconds (checked every `interval`).

    The predicate may itself raise AssertionError with a more precise message."""
    deadline = time.monotonic() + duration
    start = time.monotonic()
    while True:
        value = predicate()
        assert value, f"{message} stopped holding after {time.monotonic() - start:.1f} s: {value!r}"
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


def kind_class(api: pykube.HTTPClient, api_version: str,
               kind: str) -> type[pykube.objects.APIObject]:
    """A pykube class for any kind (discovered once per client, then cached)."""
    key = (id(api), api_version, kind)
    if key not in _factories:
        builtin = getattr(pykube, kind, None)
        if (
            isinstance(builtin, type)
            and issubclass(builtin, pykube.objects.APIObject)
            and builtin.version == api_version
        ):
            _factories[key] = builtin
        else:
            _factories[key] = pykube.object_factory(api, api_version, kind)
    return _factories[key]


def create(api: pykube.HTTPClient, manifest: dict) -> pykube.objects.APIObject:
    """Creates any object from a manifest dict; returns it as the server stored it."""
    cls = kind_class(api, manifest["apiVersion"], manifest["kind"])
    obj = cls(api, manifest)
    obj.create()
    return obj


def get(
    api: pykube.HTTPClient, api_version: str, kind: str, name: str, namespace: str | None = None
) -> pykube.objects.APIObject:
    """Fetches one object (raises pykube.ObjectDoesNotExist if it is absent)."""
    cls = kind_class(api, api_version, kind)
    query = cls.objects(api, namespace=namespace) if namespace else cls.objects(api)
    return query.get_by_name(name)


def get_or_none(
    api: pykube.HTTPClient, api_version: str, kind: str, name: str, namespace: str | None = None
) -> pykube.objects.APIObject | None:
    try:
        return get(api, api_version, kind, name, namespace)
    except pykube.exceptions.ObjectDoesNotExist:
        return None


def delete_quietly(obj: pykube.objects.APIObject) -> None:
    """Deletes an object, ignoring "already gone"."""
    try:
        obj.delete()
    except pykube.exceptions.ObjectDoesNotExist:
        pass
    except pykube.exceptions.HTTPError as exc:
        if exc.code != 404:
            raise


def events_for(
    api: pykube.HTTPClient,
    namespace: str | None,
    name: str,
    kind: str | None = None,
) -> list[dict]:
    """core/v1 Events whose involvedObject is `name` (and `kind`, if given), oldest first.

    Events about cluster-scoped objects (PersistentVolumes, Nodes) are recorded in the
    "default" namespace by upstream controllers; pass namespace=None to search all.
    """
    selector = {"involvedObject.name": name}
    if kind:
        selector["involvedObject.kind"] = kind
    namespace_arg = pykube.all if namespace is None else namespace
    events = pykube.Event.objects(api, namespace=namespace_arg).filter(field_selector=selector)
    found = [event.obj for event in events]

    def stamp(event: dict) -> str:
        return (event.get("lastTimestamp") or event.get("eventTime")
                or event["metadata"].get("creationTimestamp") or "")

    return sorted(found, key=stamp)


def condition(obj: dict, type_: str) -> dict | None:
    """The status condition of the given type, or None."""
    for cond in obj.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == type_:
            return cond
    return None


# ----------------------------------------------------------------------------- raw API by kind
# Plain REST calls through pykube's session, for tests that want the server's answer
# (status codes, validation messages) rather than pykube objects.

POOL_API = "volplane.io/v1alpha1"
POOL_DRIVER = "pool.volplane.io"
CAPACITY_NAMESPACE = "volplane-system"  # where the pool provisioner publishes capacity

# kind -> (apiVersion, plural); every kind the raw helpers below are used with.
KIND_PATHS: dict[str, tuple[str, str]] = {
    "Namespace": ("v1", "namespaces"),
    "Node": ("v1", "nodes"),
    "Pod": ("v1", "pods"),
    "PersistentVolume": ("v1", "persistentvolumes"),
    "PersistentVolumeClaim": ("v1", "persistentvolumeclaims"),
    "StorageClass": ("storage.k8s.io/v1", "storageclasses"),
    "CSIDriver": ("storage.k8s.io/v1", "csidrivers"),
    "CSIStorageCapacity": ("storage.k8s.io/v1", "csistoragecapacities"),
    "VolumeAttachment": ("storage.k8s.io/v1", "volumeattachments"),
    "VolumeAttributesClass": ("storage.k8s.io/v1", "volumeattributesclasses"),
    "StoragePool": (POOL_API, "storagepools"),
    "StorageAllocation": (POOL_API, "storageallocations"),
}


def kind_url(kind: str, name: str = "", namespace: str | None = None,
             sub: str = "") -> tuple[str, str]:
    """(apiVersion, url) for pykube's raw requests; `sub` is a subresource ("status")."""
    version, plural = KIND_PATHS[kind]
    path = f"namespaces/{namespace}/{plural}" if namespace else plural
    if name:
        path += f"/{name}"
    return version, f"{path}/{sub}" if sub else path


def kget(api, kind: str, name: str, namespace: str | None = None) -> dict | None:
    """The object, or None if it does not exist."""
    version, url = kind_url(kind, name, namespace)
    r = api.get(version=version, url=url)
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return r.json()


def klist(api, kind: str, namespace: str | None = None, **params) -> list[dict]:
    """The items of a LIST; `params` are query parameters (labelSelector=...)."""
    version, url = kind_url(kind, namespace=namespace)
    r = api.get(version=version, url=url, params=params)
    r.raise_for_status()
    return r.json().get("items") or []


def kcreate(api, manifest: dict) -> dict:
    """POST a manifest; the created object, or AssertionError with the server's answer."""
    version, url = kind_url(manifest["kind"], namespace=manifest["metadata"].get("namespace"))
    r = api.post(version=version, url=url, json=manifest)
    if not r.ok:
        raise AssertionError(f"create {manifest['kind']} {manifest['metadata']['name']}: "
                             f"{r.status_code} {r.text}")
    return r.json()


def kcreate_strict(api, kind: str, body: dict) -> requests.Response:
    """POST with fieldValidation=Strict (what `kubectl apply --server-side` gets)."""
    version, url = kind_url(kind, namespace=body["metadata"].get("namespace"))
    return api.post(version=version, url=url, json=body, params={"fieldValidation": "Strict"})


def kpatch_response(api, kind: str, name: str, patch: dict, namespace: str | None = None,
                    sub: str = "") -> requests.Response:
    """A JSON merge patch; the raw response, whatever its status."""
    version, url = kind_url(kind, name, namespace, sub)
    return api.patch(version=version, url=url, json=patch,
                     headers={"Content-Type": "application/merge-patch+json"})


def kpatch(api, kind: str, name: str, patch: dict, namespace: str | None = None,
           sub: str = "") -> dict | None:
    """A JSON merge patch; the patched object, None if it does not exist, else raises."""
    r = kpatch_response(api, kind, name, patch, namespace, sub)
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return r.json()


def kdelete(api, kind: str, name: str, namespace: str | None = None) -> None:
    """DELETE; an object that is already gone is fine."""
    version, url = kind_url(kind, name, namespace)
    r = api.delete(version=version, url=url)
    if r.status_code not in (200, 202, 404):
        r.raise_for_status()


def phase(obj: dict | None) -> str | None:
    return ((obj or {}).get("status") or {}).get("phase")


# ----------------------------------------------------------------------------- leftovers
# Every test works in a fresh namespace `e2e-<6 hex>` (conftest.namespace) and names its
# cluster-scoped objects after it: `<ns>-<suffix>` (PVs, StorageClasses, StoragePools,
# CSIDrivers, fake Nodes) or `<prefix>-<ns>` (test_install's StorageClasses). Objects
# volplane makes for a test follow from those: pool PVs `pvc-<uid>` whose handle is
# `<e2e pool>/...` or whose claim lives in an e2e namespace, their StorageAllocations,
# CSIStorageCapacities and VolumeAttachments. Nothing else is touched.

E2E_NAMESPACE = re.compile(r"^e2e-[0-9a-f]{6}$")
E2E_NAME = re.compile(r"^(?:[a-z]+-)?e2e-[0-9a-f]{6}(?:[-.]|$)")


def _list_or_empty(api, kind: str, namespace: str | None = None, **params) -> list[dict]:
    """klist, but a kind whose CRD (or a namespace) is not there yet lists as empty.

    Retries 429 for a while: the API server answers that for a CRD's resources while
    their storage is still initializing, right after the CRD was (re)created."""
    version, url = kind_url(kind, namespace=namespace)
    deadline = time.monotonic() + 30
    while True:
        r = api.get(version=version, url=url, params=params)
        if r.status_code != 429 or time.monotonic() >= deadline:
            break
        time.sleep(min(float(r.headers.get("Retry-After") or 1), 2.0))
    if r.status_code == 404:
        return []
    r.raise_for_status()
    return r.json().get("items") or []


def _is_e2e_pool_volume(pv: dict) -> bool:
    spec = pv.get("spec") or {}
    csi = spec.get("csi") or {}
    if csi.get("driver") != POOL_DRIVER or not pv["metadata"]["name"].startswith("pvc-"):
        return False
    pool = (csi.get("volumeHandle") or "").split("/", 1)[0]
    ref_ns = (spec.get("claimRef") or {}).get("namespace") or ""
    return bool(E2E_NAME.match(pool) or E2E_NAMESPACE.match(ref_ns))


def remove_e2e_leftovers(api) -> dict[str, list[str]]:
    """Deletes what earlier (killed) e2e sessions left on the cluster; returns kind -> names.

    Meant for the start of a session, before its own tests create anything: every
    object matched then belongs to a session that is over. Finalizers are stripped
    after the delete, as the tests' own cleanups do, because the controller that would
    release them (volplane) is not running."""
    removed: dict[str, list[str]] = {}

    def remove(kind: str, obj: dict, namespace: str | None = None) -> None:
        name = obj["metadata"]["name"]
        version, url = kind_url(kind, name, namespace)
        r = api.delete(version=version, url=url)
        if r.status_code not in (200, 202, 404, 409):  # 409: already being deleted
            r.raise_for_status()
        if kind != "Namespace":
            kpatch_response(api, kind, name, {"metadata": {"finalizers": None}}, namespace)
        removed.setdefault(kind, []).append(name)

    pvs = [pv for pv in _list_or_empty(api, "PersistentVolume")
           if E2E_NAME.match(pv["metadata"]["name"]) or _is_e2e_pool_volume(pv)]
    pv_names = {pv["metadata"]["name"] for pv in pvs}
    for va in _list_or_empty(api, "VolumeAttachment"):
        source = (va.get("spec") or {}).get("source") or {}
        if source.get("persistentVolumeName") in pv_names:
            remove("VolumeAttachment", va)
    for pv in pvs:
        remove("PersistentVolume", pv)
    for rec in _list_or_empty(api, "StorageAllocation"):
        if rec["metadata"]["name"] in pv_names or E2E_NAME.match(
                (rec.get("spec") or {}).get("pool") or ""):
            remove("StorageAllocation", rec)
    for cap in _list_or_empty(api, "CSIStorageCapacity", CAPACITY_NAMESPACE):
        pool = (cap["metadata"].get("annotations") or {}).get("volplane.io/pool") or ""
        if E2E_NAME.match(pool):
            remove("CSIStorageCapacity", cap, CAPACITY_NAMESPACE)
    for kind in ("StoragePool", "StorageClass", "CSIDriver", "Node"):
        for obj in _list_or_empty(api, kind):
            if E2E_NAME.match(obj["metadata"]["name"]):
                remove(kind, obj)
    for ns in _list_or_empty(api, "Namespace", labelSelector="volplane.io/e2e=true"):
        if E2E_NAMESPACE.match(ns["metadata"]["name"]) and not ns["metadata"].get(
                "deletionTimestamp"):
            remove("Namespace", ns)
    return removed


def scrape_metrics(port: int) -> dict[str, float]:
    """Samples of an operator's /metrics on localhost: 'name{labels}' -> value."""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


# ----------------------------------------------------------------------------- nodes

ZONE_LABEL = "topology.kubernetes.io/zone"
CONTROL_PLANE_LABEL = "node-role.kubernetes.io/control-plane"


@dataclass(frozen=True)
class E2ENodes:
    """The nodes a test may pin pods and pools to, found by what the cluster has (never by
    kwok's names): on the local control plane the kwok nodes (label ``type=kwok``), on
    kind (or any cluster) the nodes with a zone label, workers first. ``names`` alternate
    zones like kwok's (0 and 2 in one zone, 1 and 3 in the other)."""

    names: tuple[str, ...]
    zone_a: tuple[str, ...]
    zone_b: tuple[str, ...]
    # nodeSelector for pods the scheduler places (kwok nodes carry type=kwok; on kind the
    # control-plane taint keeps scheduled pods on the workers)
    selector: dict = field(default_factory=dict)
    # kwok plays the kubelets: node status (volumesInUse) is the test's to write
    fake_kubelets: bool = False


def discover_nodes(api: pykube.HTTPClient) -> E2ENodes:
    nodes = [n.obj for n in pykube.Node.objects(api)]
    kwok = sorted((n for n in nodes if (n["metadata"].get("labels") or {}).get("type") == "kwok"),
                  key=lambda n: n["metadata"]["name"])
    if kwok:
        names = tuple(n["metadata"]["name"] for n in kwok)
        return E2ENodes(names=names, zone_a=names[0::2], zone_b=names[1::2],
                        selector={"type": "kwok"}, fake_kubelets=True)

    def order(n: dict) -> tuple:
        labels = n["metadata"].get("labels") or {}
        return (CONTROL_PLANE_LABEL in labels, n["metadata"]["name"])

    zoned: dict[str, list[str]] = {}
    for n in sorted(nodes, key=order):
        zone = (n["metadata"].get("labels") or {}).get(ZONE_LABEL)
        if zone:
            zoned.setdefault(zone, []).append(n["metadata"]["name"])
    zones = sorted(zoned)
    if len(zones) < 2:
        raise RuntimeError(f"the e2e suite needs nodes in two zones ({ZONE_LABEL}); "
                           f"found {zoned or 'none'}")
    a, b = zoned[zones[0]], zoned[zones[1]]
    names = tuple(x for pair in zip(a, b, strict=False) for x in pair)
    # zone lists sorted by name, as the operator lists a pool's nodes
    return E2ENodes(names=names, zone_a=tuple(sorted(a)), zone_b=tuple(sorted(b)))


def node_plugin_registered(api: pykube.HTTPClient, node: str) -> bool:
    """The kubelet of `node` runs volplane's CSI node plugin (its CSINode lists it)."""
    obj = get_or_none(api, "storage.k8s.io/v1", "CSINode", node)
    drivers = ((obj.obj if obj else {}).get("spec") or {}).get("drivers") or []
    return any(d.get("name") == POOL_DRIVER for d in drivers)


def pod_started(api: pykube.HTTPClient, nodes: E2ENodes, pod: dict | None) -> bool:
    """A pod using pool volumes got as far as the cluster lets it: Running where pool
    volumes mount (kwok's fake kubelets, or a node with volplane's node plugin);
    scheduled, with volplane's part done, where the kubelet has no node plugin to ask."""
    if not pod:
        return False
    node = (pod.get("spec") or {}).get("nodeName")
    if not node:
        return False
    if nodes.fake_kubelets or node_plugin_registered(api, node):
        return (pod.get("status") or {}).get("phase") == "Running"
    return True
