"""`volplane run` as a process: connects, logs JSON, exits cleanly on SIGTERM (issue 2)."""

from __future__ import annotations

import json
import subprocess
import sys

from .helpers import scrape_metrics


def test_run_connects_logs_json_and_exits_cleanly_on_sigterm(operator):
    operator.start()
    operator.wait_ready(timeout=60)
    assert operator.stop(timeout=30) == 0
    lines = [ln for ln in operator.raw_lines() if ln.strip()]
    parsed = [json.loads(ln) for ln in lines]  # every line is one JSON object
    events = [p.get("event") for p in parsed]
    assert "starting" in events and "caches synced" in events and "stopped" in events
    synced = next(p for p in parsed if p.get("event") == "caches synced")
    assert set(synced["controllers"]) == {"pv-binder", "pool-provisioner", "attachdetach",
                                          "pool-attacher"}
    assert all("timestamp" in p and "level" in p for p in parsed)


def test_controllers_flag_selects_controllers_like_kube_controller_manager(operator):
    operator.start("--controllers", "*,-attachdetach,-pool-attacher")
    operator.wait_ready()
    synced = next(p for p in operator.log_lines() if p.get("event") == "caches synced")
    assert synced["controllers"] == ["pv-binder", "pool-provisioner"]
    # Watches follow the controllers: nothing attach-related is listed.
    assert "pods" not in synced["objects"] and "volumeattachments" not in synced["objects"]


def test_unknown_controller_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "volplane.cli", "run", "--controllers",
                          "*,nope", "--kubeconfig", "/dev/null"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown controller 'nope'" in out.stdout + out.stderr


def test_version():
    out = subprocess.run([sys.executable, "-m", "volplane.cli", "version"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("volplane ")


def test_reflectors_page_and_watch_again_without_listing_again(api, namespace, operator):
    """Pages of 5 and watches the server ends every 2 s: the first LIST sees every PV
    across pages, and changes made while a stream is being re-opened are not missed
    (the next stream starts at the last resourceVersion seen; no second LIST)."""
    import time

    from .helpers import create, wait_for

    cls = f"rw-{namespace}"

    def pv(i):
        return {"apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": f"{namespace}-pv{i:02d}"},
                "spec": {"storageClassName": cls, "accessModes": ["ReadWriteOnce"],
                         "capacity": {"storage": "1Gi"},
                         "persistentVolumeReclaimPolicy": "Retain",
                         "hostPath": {"path": f"/tmp/{namespace}-pv{i:02d}"}}}

    for i in range(12):
        create(api, pv(i))
    operator.start("--controllers", "pv-binder", "--list-page-size", "5",
                   "--watch-timeout", "2")
    operator.wait_ready()
    import pykube

    def phase_of_pvs():
        return [p.obj.get("status", {}).get("phase") for p in pykube.PersistentVolume.objects(api)
                if p.name.startswith(f"{namespace}-pv")]

    wait_for(lambda: phase_of_pvs().count("Available") == 12, timeout=30,
             message="all 12 listed PVs made Available")
    for i in range(4):  # spread over several 2-second streams
        create(api, {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                     "metadata": {"name": f"c{i}", "namespace": namespace},
                     "spec": {"storageClassName": cls, "accessModes": ["ReadWriteOnce"],
                              "resources": {"requests": {"storage": "1Gi"}}}})
        wait_for(lambda i=i: pykube.PersistentVolumeClaim.objects(api, namespace=namespace)
                 .get_by_name(f"c{i}").obj.get("status", {}).get("phase") == "Bound",
                 timeout=30, message=f"claim c{i} bound")
        time.sleep(1.3)
    m = scrape_metrics(operator.metrics_port)
    for res in ("persistentvolumes", "persistentvolumeclaims"):
        assert m[f'volplane_watch_lists_total{{resource="{res}"}}'] == 1, res
        assert m[f'volplane_watch_streams_total{{resource="{res}"}}'] >= 3, res
        assert m.get(f'volplane_watch_errors_total{{resource="{res}"}}', 0) == 0, res
    assert phase_of_pvs().count("Bound") == 4


def test_kopf_watch_layer_still_binds(api, namespace, operator):
    """--watch-layer=kopf (0.1's watch layer, kept for the benchmarks' before/after)
    feeds the same caches: a claim binds to the smallest fitting PV."""
    import pykube

    from .helpers import create, wait_for

    cls = f"kopf-{namespace}"
    for size in ("5Gi", "2Gi"):
        create(api, {"apiVersion": "v1", "kind": "PersistentVolume",
                     "metadata": {"name": f"{namespace}-{size.lower()}"},
                     "spec": {"storageClassName": cls, "accessModes": ["ReadWriteOnce"],
                              "capacity": {"storage": size},
                              "persistentVolumeReclaimPolicy": "Retain",
                              "hostPath": {"path": f"/tmp/{namespace}-{size}"}}})
    operator.start("--controllers", "pv-binder", "--watch-layer", "kopf")
    operator.wait_ready()
    create(api, {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                 "metadata": {"name": "c", "namespace": namespace},
                 "spec": {"storageClassName": cls, "accessModes": ["ReadWriteOnce"],
                          "resources": {"requests": {"storage": "1Gi"}}}})

    def volume():
        c = pykube.PersistentVolumeClaim.objects(api, namespace=namespace).get_by_name("c").obj
        return c["spec"].get("volumeName") if c.get("status", {}).get("phase") == "Bound" else None

    wait_for(volume, timeout=30, message="claim bound")
    assert volume() == f"{namespace}-2gi"
    assert "volplane_watch_lists_total" not in "".join(
        k for k in scrape_metrics(operator.metrics_port) if 'resource="persistentvolumes"' in k)
