#!/usr/bin/env python3
"""Writes manifests/monitoring/volplane-dashboard.json (Grafana) from the panel list below.

Only metrics the operator exports are used; tests/e2e/test_observability.py checks it.
"""

import json
from pathlib import Path

PANELS = [
    ("Claims bound / unbound", "timeseries", [
        ("sum(pv_collector_bound_pvc_count)", "bound"),
        ("sum(pv_collector_unbound_pvc_count)", "unbound")]),
    ("Volumes bound / unbound", "timeseries", [
        ("sum(pv_collector_bound_pv_count)", "bound"),
        ("sum(pv_collector_unbound_pv_count)", "unbound")]),
    ("Claim bind latency p50 / p95", "timeseries", [
        ("histogram_quantile(0.5, sum by (le) "
         "(rate(volplane_claim_bind_duration_seconds_bucket[5m])))", "p50"),
        ("histogram_quantile(0.95, sum by (le) "
         "(rate(volplane_claim_bind_duration_seconds_bucket[5m])))", "p95")]),
    ("Pool allocation", "bargauge", [
        ("volplane_pool_allocated_bytes / volplane_pool_capacity_bytes", "{{pool}}")]),
    ("Pool available bytes", "timeseries", [("volplane_pool_available_bytes", "{{pool}}")]),
    ("Volumes per pool", "timeseries", [("volplane_pool_volumes", "{{pool}}")]),
    ("Provisioning failures by reason", "timeseries", [
        ("sum by (reason) (rate(volplane_pool_provision_failures_total[5m]))", "{{reason}}")]),
    ("Attach/detach: desired vs actual", "timeseries", [
        ("sum by (state) (attachdetach_controller_total_volumes)", "{{state}}")]),
    ("Attach/detach errors", "timeseries", [
        ("sum by (operation_name) "
         "(rate(attachdetach_controller_operation_errors_total[5m]))", "{{operation_name}}")]),
    ("Device slots in use per node", "timeseries", [
        ('sum by (node) (volplane_node_device_slots{state="used"})', "{{node}}")]),
    ("API writes by resource", "timeseries", [
        ("sum by (resource, verb) (rate(volplane_api_writes_total[5m]))",
         "{{resource}} {{verb}}")]),
    ("Conflicts (re-read and re-decide)", "timeseries", [
        ("sum by (resource) (rate(volplane_api_conflicts_total[5m]))", "{{resource}}")]),
    ("Work queue depth", "timeseries", [("volplane_workqueue_depth", "{{controller}}")]),
    ("Watch events applied by resource", "timeseries", [
        ("sum by (resource) (rate(volplane_watch_events_total[5m]))", "{{resource}}")]),
    ("Watch request failures (Kopf retries them)", "timeseries", [
        ("sum by (resource) (rate(volplane_watch_errors_total[5m]))", "errors {{resource}}")]),
    ("Leader", "stat", [("max(volplane_leader)", "leader")]),
]


def dashboard() -> dict:
    panels = []
    for i, (title, kind, targets) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "title": title, "type": kind,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "targets": [{"expr": e, "legendFormat": legend, "refId": chr(65 + j)}
                        for j, (e, legend) in enumerate(targets)],
        })
    return {
        "title": "volplane", "uid": "volplane", "schemaVersion": 39, "version": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "tags": ["storage"],
        "templating": {"list": [{"name": "datasource", "type": "datasource",
                                 "query": "prometheus"}]},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "manifests/monitoring/volplane-dashboard.json"
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(out)
