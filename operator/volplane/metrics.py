"""Prometheus metrics (prometheus-client), served beside Kopf on --metrics-port.

Upstream-named metrics keep existing dashboards working:
pv_collector_{bound,unbound}_{pv,pvc}_count and volume_operation_total_errors.
The pv_collector gauges are computed from the cache at scrape time (a custom
collector), so keeping them true costs nothing per event.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Mapping

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

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
queue_depth = Gauge("volplane_workqueue_depth",
                    "Unfinished keys of a controller's queue (waiting or being synced)",
                    ["controller"])
events_posted = Counter("volplane_events_total", "Kubernetes Events posted",
                        ["type", "reason"])
leader = Gauge("volplane_leader", "1 when this replica holds the leader lease")
watch_events = Counter("volplane_watch_events_total",
                       "Watch events Kopf handed to the controllers, by resource and type "
                       "(LISTED: the initial listing)", ["resource", "type"])
watch_errors = Counter("volplane_watch_errors_total",
                       "Failed LIST/WATCH attempts Kopf reported (it retries), by resource",
                       ["resource"])


def _class_of(obj: dict) -> str:
    spec = obj.get("spec") or {}
    cls = spec.get("storageClassName")
    if cls is None:
        cls = ((obj.get("metadata") or {}).get("annotations") or {}).get(
            "volume.beta.kubernetes.io/storage-class", "")
    return cls or ""


class PVCollector:
    """pv_collector_* gauges with upstream's names and labels, from the listers."""

    def __init__(self, pvs: Mapping[str, dict], pvcs: Mapping[str, dict]):
        self.pvs = pvs
        self.pvcs = pvcs

    def collect(self):
        # Scrapes run in prometheus-client's thread while the event loop updates the
        # listers: a "changed size during iteration" just means "read again".
        for _ in range(5):
            try:
                return list(self._collect())
            except RuntimeError:
                continue
        return []

    def _collect(self):
        bound_pv, unbound_pv = Tally(), Tally()
        for pv in list(self.pvs.values()):
            phase = (pv.get("status") or {}).get("phase")
            (bound_pv if phase == "Bound" else unbound_pv)[_class_of(pv)] += 1
        bound_pvc, unbound_pvc = Tally(), Tally()
        for pvc in list(self.pvcs.values()):
            phase = (pvc.get("status") or {}).get("phase")
            vac = (pvc.get("spec") or {}).get("volumeAttributesClassName") or ""
            key = (pvc["metadata"].get("namespace", ""), _class_of(pvc), vac)
            (bound_pvc if phase == "Bound" else unbound_pvc)[key] += 1
        pv_doc = "Gauge measuring number of persistent volume currently {}"
        for name, tally, doc in (("bound_pv", bound_pv, pv_doc.format("bound")),
                                 ("unbound_pv", unbound_pv, pv_doc.format("unbound"))):
            g = GaugeMetricFamily(f"pv_collector_{name}_count", doc, labels=["storage_class"])
            for cls, n in tally.items():
                g.add_metric([cls], n)
            yield g
        pvc_doc = "Gauge measuring number of persistent volume claim currently {}"
        for name, tally, doc in (("bound_pvc", bound_pvc, pvc_doc.format("bound")),
                                 ("unbound_pvc", unbound_pvc, pvc_doc.format("unbound"))):
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
