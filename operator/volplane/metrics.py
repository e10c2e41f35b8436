"""Prometheus metrics (prometheus-client), served beside Kopf on --metrics-port.

Upstream-named metrics keep existing dashboards working:
pv_collector_{bound,unbound}_{pv,pvc}_count and volume_operation_total_errors.
The pv_collector gauges are computed from the cache at scrape time (a custom
collector), so keeping them true costs nothing per event.
"""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from .cache import Cache

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

volume_operation_errors = Counter(
    "volume_operation_total_errors", "Total volume operation errors",
    ["plugin_name", "operation_name"])
volume_operation_seconds = Histogram(
    "volume_operation_total_seconds", "Total volume operation time",
    ["plugin_name", "operation_name", "status"], buckets=LATENCY_BUCKETS)
claim_bind_seconds = Histogram(
    "volplane_claim_bind_duration_seconds",
    "From claim creation to the claim being Bound by volplane",
    ["storage_class"], buckets=LATENCY_BUCKETS)
sync_total = Counter(
    "volplane_sync_total", "Object syncs by controller and outcome",
    ["controller", "kind", "outcome"])
api_writes = Counter(
    "volplane_api_writes_total", "Writes to the Kubernetes API by controller and verb",
    ["controller", "resource", "verb"])
conflicts = Counter(
    "volplane_api_conflicts_total", "Optimistic-concurrency conflicts (re-read and re-decide)",
    ["controller", "resource"])
queue_depth = Gauge("volplane_workqueue_depth", "Keys waiting in a controller's queue",
                    ["controller"])
events_posted = Counter("volplane_events_total", "Kubernetes Events posted",
                        ["type", "reason"])
leader = Gauge("volplane_leader", "1 when this replica holds the leader lease")
watch_events = Counter("volplane_watch_events_total",
                       "Watch events applied to the cache, by resource and type",
                       ["resource", "type"])
watch_lists = Counter("volplane_watch_lists_total",
                      "Full (paginated) LISTs by resource: 1 at start, more after 410 Gone",
                      ["resource"])
watch_streams = Counter("volplane_watch_streams_total",
                        "Watch streams opened by resource (one per server timeout, reconnect or "
                        "LIST)", ["resource"])
watch_errors = Counter("volplane_watch_errors_total",
                       "Watch/list failures that caused a reconnect, by resource",
                       ["resource"])


def _class_of(obj: dict) -> str:
    spec = obj.get("spec") or {}
    cls = spec.get("storageClassName")
    if cls is None:
        cls = ((obj.get("metadata") or {}).get("annotations") or {}).get(
            "volume.beta.kubernetes.io/storage-class", "")
    return cls or ""


class PVCollector:
    """pv_collector_* gauges with upstream's names and labels."""

    def __init__(self, cache: Cache):
        self.cache = cache

    def collect(self):
        bound_pv, unbound_pv = Tally(), Tally()
        for pv in self.cache.pvs.values():
            phase = (pv.get("status") or {}).get("phase")
            (bound_pv if phase == "Bound" else unbound_pv)[_class_of(pv)] += 1
        bound_pvc, unbound_pvc = Tally(), Tally()
        for pvc in self.cache.pvcs.values():
            phase = (pvc.get("status") or {}).get("phase")
            vac = (pvc.get("spec") or {}).get("volumeAttributesClassName") or ""
            key = (pvc["metadata"].get("namespace", ""), _class_of(pvc), vac)
            (bound_pvc if phase == "Bound" else unbound_pvc)[key] += 1
        for name, tally, doc in (("bound_pv", bound_pv, "Gauge measuring number of persistent volume currently bound"),
                                 ("unbound_pv", unbound_pv, "Gauge measuring number of persistent volume currently unbound")):
            g = GaugeMetricFamily(f"pv_collector_{name}_count", doc, labels=["storage_class"])
            for cls, n in tally.items():
                g.add_metric([cls], n)
            yield g
        for name, tally, doc in (("bound_pvc", bound_pvc, "Gauge measuring number of persistent volume claim currently bound"),
                                 ("unbound_pvc", unbound_pvc, "Gauge measuring number of persistent volume claim currently unbound")):
            g = GaugeMetricFamily(f"pv_collector_{name}_count", doc,
                                  labels=["namespace", "storage_class", "volume_attributes_class"])
            for labels, n in tally.items():
                g.add_metric(list(labels), n)
            yield g


_registered: set[str] = set()


def register_collector(name: str, collector) -> None:
    if name not in _registered:
        REGISTRY.register(collector)
        _registered.add(name)
