"""Per-plugin metrics of the volume-plugin registry (prometheus-client), served with the
operator's other metrics on --metrics-port.

- volplane_flexvolume_driver_calls_total{driver, command, status}: every execution of
  a FlexVolume driver. ``status`` is the outcome as the caller saw it: success, failure,
  not_supported, invalid_output, timeout, exec_error, driver_bug (exit code and answer
  disagree). A command already known to be unsupported is not executed and not counted.
- volplane_flexvolume_driver_call_duration_seconds{driver, command, status}: how long
  the driver ran.
- volplane_flexvolume_probes_total{driver, result}: prober results per driver
  directory: added, updated, removed, failed.
- volplane_volume_plugins{plugin, attachable}: the plugins the registry can use now
  (1 each; a removed driver's series disappears).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from ..metrics import LATENCY_BUCKETS

flex_driver_calls = Counter(
    "volplane_flexvolume_driver_calls_total",
    "FlexVolume driver executions by driver, command and outcome",
    ["driver", "command", "status"])
flex_driver_call_seconds = Histogram(
    "volplane_flexvolume_driver_call_duration_seconds",
    "Time a FlexVolume driver execution took",
    ["driver", "command", "status"], buckets=LATENCY_BUCKETS)
flex_probes = Counter(
    "volplane_flexvolume_probes_total",
    "FlexVolume prober results per driver directory",
    ["driver", "result"])
volume_plugins = Gauge(
    "volplane_volume_plugins",
    "Volume plugins the registry can use (1 per plugin)",
    ["plugin", "attachable"])


def record_call(driver: str, command: str, status: str, seconds: float) -> None:
    flex_driver_calls.labels(driver, command, status).inc()
    flex_driver_call_seconds.labels(driver, command, status).observe(seconds)


def plugin_added(name: str, attachable: bool) -> None:
    for a in ("true", "false"):
        try:
            volume_plugins.remove(name, a)
        except KeyError:
            pass
    volume_plugins.labels(name, "true" if attachable else "false").set(1)


def plugin_removed(name: str) -> None:
    for a in ("true", "false"):
        try:
            volume_plugins.remove(name, a)
        except KeyError:
            pass
