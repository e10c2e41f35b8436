"""`volplane run` as a process: connects, logs JSON, exits cleanly on SIGTERM (issue 2)."""

from __future__ import annotations

import json
import subprocess
import sys


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
